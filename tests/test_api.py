"""Control API against Prefect's test harness: each POST creates exactly one flow run of the right deployment with
the given parameters; a second /data/collect while one is alive is 409; a wrong or missing token is 401 and creates
nothing; without a token the API refuses to bind beyond loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

_HOME = tempfile.mkdtemp(prefix="rltrader-prefect-")
for _k, _v in {"PREFECT_HOME": _HOME, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds the top-level `flows` package

from fastapi.testclient import TestClient  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.deploy import deployments  # noqa: E402
from rltrader.api import triggers  # noqa: E402
from rltrader.api.app import create_app  # noqa: E402
from rltrader.api.auth import check_bind  # noqa: E402
from rltrader.errors import ConfigError  # noqa: E402

TOKEN = "test-token-5b1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A Prefect API with the repo's deployments registered (schedules left out: the harness's scheduler would
    otherwise pre-create runs and the counts below would race it)."""
    with prefect_test_harness(server_startup_timeout=120):
        for dep in deployments():
            dep.schedules = []
            dep.apply()
        yield


@pytest.fixture
def client(harness: None) -> Iterator[TestClient]:
    with TestClient(create_app(token=TOKEN)) as c:
        yield c


def runs_of(deployment: str) -> list[Any]:
    async def read() -> list[Any]:
        async with get_client() as pc:
            dep = await pc.read_deployment_by_name(deployment)
            return list(await pc.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))))

    return asyncio.run(read())


def test_trigger_names_are_the_declared_deployments() -> None:
    declared = {f"{d.flow_name}/{d.name}" for d in deployments()}
    assert set(triggers.DEPLOYMENTS) <= declared
    assert {d.name: d.concurrency_limit for d in deployments()}["train"] == 1


def test_no_token_binds_only_to_loopback() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ConfigError, match="RLTRADER_API_TOKEN"):
            check_bind(host, None)
        check_bind(host, TOKEN)


@pytest.mark.slow
def test_wrong_or_missing_token_is_401_and_creates_nothing(client: TestClient) -> None:
    before = {r.id for r in runs_of(triggers.TRAIN)}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        for method, url in (("post", "/train/ppo"), ("post", "/data/collect"), ("post", "/pipeline/run"),
                            ("post", "/data/backfill"), ("get", f"/runs/{UUID(int=1)}")):
            r = client.request(method, url, headers=headers, json={})
            assert r.status_code == 401, (headers, url, r.text)
    assert {r.id for r in runs_of(triggers.TRAIN)} == before


@pytest.mark.slow
def test_each_post_creates_one_run_of_its_deployment(client: TestClient) -> None:
    cases = [
        ("/train/ppo", {"resume": True}, triggers.TRAIN, {"algo": "ppo", "resume": True}),
        ("/data/backfill", {"day": "2020-01-01", "through": "2020-01-03", "market": "spot", "symbols": ["btcusdt"]},
         triggers.BACKFILL, {"day": "2020-01-01", "through": "2020-01-03", "market": "spot", "symbols": ["BTCUSDT"],
                             "interval": "1m"}),
        ("/pipeline/run", {"through": "2023-09-30", "use_dvc": False}, triggers.PIPELINE,
         {"through": "2023-09-30", "use_dvc": False}),
    ]
    for url, body, deployment, params in cases:
        before = {r.id for r in runs_of(deployment)}
        r = client.post(url, json=body, headers=AUTH)
        assert r.status_code == 202, r.text
        out = r.json()
        new = [run for run in runs_of(deployment) if run.id not in before]
        assert len(new) == 1 and str(new[0].id) == out["id"]
        assert new[0].parameters == params == out["parameters"]
        assert out["deployment"] == deployment and out["state"] == "SCHEDULED" and "api" in new[0].tags
        got = client.get(f"/runs/{out['id']}", headers=AUTH).json()
        assert got["id"] == out["id"] and got["deployment"] == deployment and got["parameters"] == params
    assert client.post("/train/sac", headers=AUTH).status_code == 422
    assert client.post("/data/backfill", json={"day": "yesterday"}, headers=AUTH).status_code == 422
    assert client.get(f"/runs/{UUID(int=7)}", headers=AUTH).status_code == 404


@pytest.mark.slow
def test_collect_start_conflict_stop_and_restart(client: TestClient) -> None:
    before = {r.id for r in runs_of(triggers.COLLECT)}
    r = client.post("/data/collect", json={"symbols": ["BTCUSDT", "ethusdt"], "market": "spot"}, headers=AUTH)
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["parameters"] == {"symbols": ["BTCUSDT", "ETHUSDT"], "market": "spot"}
    again = client.post("/data/collect", json={"symbols": ["SOLUSDT"]}, headers=AUTH)
    assert again.status_code == 409 and first["id"] in again.json()["detail"]
    new = [run for run in runs_of(triggers.COLLECT) if run.id not in before]
    assert [str(run.id) for run in new] == [first["id"]]  # the refused POST created nothing

    stop = client.post("/data/collect", json={"action": "stop"}, headers=AUTH)
    assert stop.status_code == 202, stop.text
    assert stop.json()["cancelled"] == [first["id"]] and stop.json()["paused"] is True
    assert client.get(f"/runs/{first['id']}", headers=AUTH).json()["state"] == "CANCELLED"

    restart = client.post("/data/collect", json={"max_seconds": 30}, headers=AUTH)
    assert restart.status_code == 202, restart.text
    assert restart.json()["parameters"] == {"max_seconds": 30.0}

    async def paused() -> bool:
        async with get_client() as pc:
            return bool((await pc.read_deployment_by_name(triggers.COLLECT)).paused)

    assert asyncio.run(paused()) is False  # start resumed the supervisor schedule the stop had paused
    assert client.post("/data/collect", json={"action": "stop"}, headers=AUTH).json()["cancelled"] == [
        restart.json()["id"]]

    # a run scheduled for later (as the supervisor schedule creates them) is not a stream that is alive now …
    async def schedule_later() -> str:
        from prefect.states import Scheduled

        async with get_client() as pc:
            dep = await pc.read_deployment_by_name(triggers.COLLECT)
            run = await pc.create_flow_run_from_deployment(
                dep.id, state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=1)))
            return str(run.id)

    later = asyncio.run(schedule_later())
    now = client.post("/data/collect", json={}, headers=AUTH)
    assert now.status_code == 202, now.text
    # … but stop cancels it too, or it would restart the stream in an hour
    stopped = client.post("/data/collect", json={"action": "stop"}, headers=AUTH).json()["cancelled"]
    assert sorted(stopped) == sorted([later, now.json()["id"]])
    assert {client.get(f"/runs/{i}", headers=AUTH).json()["state"] for i in stopped} == {"CANCELLED"}


@pytest.mark.slow
def test_backfill_flow_takes_a_range(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     shared_archive: Path) -> None:
    """What /data/backfill's ``through`` asks of the backfill-archive flow: every day of the range is loaded."""
    from flows.ingest import backfill_archive
    from rltrader.data.parquet_store import ParquetStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLTRADER_DATA_DIR", str(tmp_path / "data"))
    out = backfill_archive(day="2020-01-01", through="2020-01-03", market="spot", symbols=["BTCUSDT"],
                           store_url=f"parquet://{tmp_path / 'store'}", archive_base=str(shared_archive))
    assert out["through"] == "2020-01-03" and out["gaps"] == []
    assert out["report"]["inserted"] == 3 * 1440  # type: ignore[index]
    assert ParquetStore(tmp_path / "store").read_klines("spot", "BTCUSDT", "1m").height == 3 * 1440
