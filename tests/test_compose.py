"""docker-compose.yml: `docker compose config` where Docker's compose plugin exists; everywhere a structure check:
every service has a pinned image or a build and a healthcheck, and every `rltrader …` command in it exists in
the CLI with the options it passes (typer's CliRunner, `--help` of each subcommand)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rltrader.cli import app

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?(?::\?[^}]*)?\}")


def _services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _defaults(token: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with the defaults (what `docker compose up` runs)."""
    return _VAR.sub(lambda m: m.group(2) or "x", token)


def test_every_service_is_pinned_and_has_a_healthcheck() -> None:
    services = _services()
    assert {"timescaledb", "mlflow", "prefect-server", "prefect-worker", "stream", "trader"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image")
        if "build" not in svc:
            assert image and ":" in image, f"{name}: image without a tag"
            tag = image.rsplit(":", 1)[1]
            assert "latest" not in tag and re.search(r"\d", tag), f"{name}: tag {tag!r} is not pinned"
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name}: no healthcheck"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} published beyond loopback"


def test_every_rltrader_command_exists_with_its_options() -> None:
    runner = CliRunner()
    checked = 0
    for name, svc in _services().items():
        build = svc.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        if context != "." or "entrypoint" in svc or "command" not in svc:
            continue  # not the rltrader image (its entrypoint is `rltrader`), or another program
        cmd = [_defaults(str(t)) for t in svc["command"]]
        path = []
        for t in cmd:
            if t.startswith("-"):
                break
            path.append(t)
        res = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert res.exit_code == 0, f"{name}: `rltrader {' '.join(path)}` does not exist: {res.output}"
        for opt in (t for t in cmd if t.startswith("--")):
            assert opt in res.output, f"{name}: `rltrader {' '.join(path)}` has no option {opt}"
        checked += 1
    assert checked >= 3  # rltrader, stream, trader


def test_the_worker_serves_the_declared_deployments() -> None:
    svc = _services()["prefect-worker"]
    assert svc["entrypoint"] == ["python", "-m", "flows.deploy"]
    text = (REPO / "flows" / "deploy.py").read_text()
    for deployment in ("ingest-live", "nightly-retrain", "trade-paper"):
        assert f'"{deployment}"' in text
    assert svc["environment"]["PREFECT_API_URL"].startswith("http://prefect-server:")


def test_the_trader_serves_its_api_only_with_a_token() -> None:
    svc = _services()["trader"]
    assert "--api-port" in svc["command"] and svc["command"][svc["command"].index("--api-host") + 1] == "0.0.0.0"
    assert ":?" in svc["environment"]["RLTRADER_API_TOKEN"]  # compose refuses to start without one
    assert "paper" in _defaults(svc["command"][svc["command"].index("--mode") + 1])


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0, reason="no docker compose here; the "
    "structure checks above cover the file")
def test_docker_compose_config_accepts_the_file() -> None:
    env = dict(os.environ, RLTRADER_API_TOKEN="x" * 24)
    res = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
