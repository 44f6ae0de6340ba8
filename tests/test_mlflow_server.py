"""A real MLflow tracking server, started as mlflow/README.md documents, and the docker-compose services around it.

One ``mlflow server`` subprocess (sqlite store and proxied artifacts in a tmp folder, loopback, a free port) is
shared by the module: a run with a metric and an artifact, a registered model with ``champion``/``previous``,
the Host-header allow-list of the compose service, and its ``mlflow-init`` command as rltrader then uses it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import mlflow
from mlflow import MlflowClient
from rltrader.config import load_settings
from rltrader.testing import TempPostgres, free_port

pytestmark = pytest.mark.slow  # training / DVC / Prefect / MLflow server: tens of seconds each

REPO = Path(__file__).resolve().parents[1]
MLFLOW_CLI = Path(sys.executable).parent / "mlflow"
START_TIMEOUT = 60.0


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    return env


class Server:
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.artifacts = root / "artifacts"
        self.root = root

    def client(self) -> MlflowClient:
        # registry_uri too: otherwise a registry URI set globally by another test would win
        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def status(self, path: str, host: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host})
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    compose_cmd = _compose()["services"]["mlflow"]["command"]
    cmd = [str(MLFLOW_CLI), "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--allowed-hosts", _flag(compose_cmd, "--allowed-hosts")]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=_server_env(), stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {START_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, root)
    finally:
        # its own session: the uvicorn master and workers go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_run_metric_artifact_and_registry_aliases(server: Server, tmp_path: Path) -> None:
    client = server.client()
    exp_id = client.create_experiment("round-trip")
    # --serve-artifacts: new experiments get the proxied location, not a path on the client
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")

    runs = []
    for sharpe in (0.8, 1.25):
        run = client.create_run(exp_id, run_name=f"sharpe-{sharpe}")
        rid = run.info.run_id
        client.log_param(rid, "algo", "d3qn")
        client.log_metric(rid, "val_sharpe", sharpe, step=3)
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({"sharpe": sharpe}))
        client.log_artifact(rid, str(policy), artifact_path="model")
        client.set_terminated(rid)
        runs.append(run)

    rid = runs[1].info.run_id
    got = client.get_run(rid)
    assert got.data.metrics["val_sharpe"] == 1.25
    assert got.data.params["algo"] == "d3qn"
    assert [m.step for m in client.get_metric_history(rid, "val_sharpe")] == [3]
    assert [f.path for f in client.list_artifacts(rid, "model")] == ["model/policy.json"]
    # stored by the server under --artifacts-destination, and readable back through it
    assert list(server.artifacts.rglob("policy.json"))
    down = Path(client.download_artifacts(rid, "model/policy.json", str(tmp_path / "down")))
    assert json.loads(down.read_text()) == {"sharpe": 1.25}

    client.create_registered_model("rltrader")
    versions = [client.create_model_version("rltrader", f"{r.info.artifact_uri}/model", run_id=r.info.run_id)
                for r in runs]
    client.set_registered_model_alias("rltrader", "previous", versions[0].version)
    client.set_registered_model_alias("rltrader", "champion", versions[1].version)

    champ = client.get_model_version_by_alias("rltrader", "champion")
    assert champ.version == versions[1].version
    assert champ.run_id == rid
    assert client.get_model_version_by_alias("rltrader", "previous").run_id == runs[0].info.run_id
    assert client.get_registered_model("rltrader").aliases == {"champion": champ.version,
                                                               "previous": versions[0].version}


def test_host_allow_list_of_the_compose_service(server: Server) -> None:
    path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    # containers reach the server as mlflow:5000; the published port is used as 127.0.0.1 / localhost
    for host in ("mlflow:5000", f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        assert server.status(path, host) == 200, host
    assert server.status(path, "attacker.example") == 403
    assert server.status("/health", "attacker.example") == 200  # what the healthcheck needs


def test_mlflow_init_makes_rltrader_log_artifacts_through_the_server(server: Server, tmp_path: Path) -> None:
    """The compose ``mlflow-init`` command creates experiment ``rltrader`` (idempotently); rltrader's
    ``mlflow_run`` then uses that experiment, so artifacts go to the server instead of train.artifact_root."""
    init_code = _compose()["services"]["mlflow-init"]["command"][-1]
    local_root = tmp_path / "client-artifacts"
    script = f"""
import mlflow
from pathlib import Path
from rltrader.agents.common import mlflow_run
init = {init_code!r}
exec(init)
exec(init)
with mlflow_run({server.url!r}, "rltrader", "probe", Path({str(local_root)!r})) as run:
    mlflow.log_text("probe", "probe.txt")
print(run.info.artifact_uri)
"""
    env = _server_env() | {"MLFLOW_TRACKING_URI": server.url}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("mlflow-artifacts:/")
    assert list(server.artifacts.rglob("probe.txt"))
    assert not local_root.exists()
    exps = [e for e in server.client().search_experiments() if e.name == "rltrader"]
    assert len(exps) == 1


def test_compose_mlflow_service() -> None:
    compose = _compose()
    services = compose["services"]
    pin = f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}"

    ml = services["mlflow"]
    assert ml["build"]["args"]["MLFLOW_IMAGE"] == pin, "pin x-mlflow-image to the venv's mlflow version"
    dockerfile = (REPO / ml["build"]["context"] / ml["build"]["dockerfile"]).read_text()
    assert f"ARG MLFLOW_IMAGE={pin}\n" in dockerfile
    assert "psycopg" in dockerfile  # the official image has no PostgreSQL driver
    assert services["mlflow-init"]["image"] == pin

    cmd = ml["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in cmd
    assert _flag(cmd, "--host") == "0.0.0.0"
    assert _flag(cmd, "--port") == "5000"
    assert "127.0.0.1:5000:5000" in ml["ports"]
    dest = _flag(cmd, "--artifacts-destination")
    assert f"mlflow-artifacts:{dest}" in ml["volumes"]
    assert "mlflow-artifacts" in compose["volumes"]
    assert ml["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert ml["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@timescaledb:5432/mlflow")
    assert ml["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    assert "/health" in " ".join(ml["healthcheck"]["test"])

    init_sql = "./docker/initdb/10-mlflow.sql"
    assert f"{init_sql}:/docker-entrypoint-initdb.d/10-mlflow.sql:ro" in services["timescaledb"]["volumes"]
    assert (REPO / init_sql).is_file()

    init = services["mlflow-init"]
    assert init["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert init["depends_on"]["mlflow"]["condition"] == "service_healthy"

    rl = services["rltrader"]
    assert rl["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    env = {k: str(v) for k, v in rl["environment"].items()}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # what rltrader itself reads: the setting, through its env override
    settings = load_settings(REPO / "no-such-params.yaml", env=env)
    assert settings.train.tracking_uri == "http://mlflow:5000"


@pytest.mark.postgres
def test_initdb_script_creates_the_mlflow_database(pg_server: TempPostgres) -> None:
    psql = shutil.which("psql") or str(pg_server.bin / "psql")
    script = REPO / "docker" / "initdb" / "10-mlflow.sql"
    for _ in range(2):  # the image runs it once; by hand again on an existing volume must be harmless
        subprocess.run([psql, "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-q", pg_server.url, "-f", str(script)],
                       check=True, capture_output=True, timeout=30)
    import psycopg

    with psycopg.connect(pg_server.url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'mlflow'").fetchone() == (1,)
