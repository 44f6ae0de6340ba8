"""Both Prefect flows on an ephemeral Prefect server: the daily archive backfill against the local archive
copy, and a bounded live-ingest run against the replay server; plus the declared schedules."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from conftest import SHARED_ARCHIVE

# Prefect reads its home and telemetry settings when first imported: set them before that.
_HOME = tempfile.mkdtemp(prefix="rltrader-prefect-")
for _k, _v in {"PREFECT_HOME": _HOME, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DVC_NO_ANALYTICS": "1"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds the top-level `flows` package

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.deploy import BACKFILL_CRON, deployments  # noqa: E402
from flows.ingest import backfill_archive, ingest_live, yesterday  # noqa: E402
from rltrader.data.parquet_store import ParquetStore  # noqa: E402
from rltrader.data.schema import Market  # noqa: E402
from rltrader.sim import ReplayClock, ReplayServer, run_in_thread  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_archive")]  # Prefect flows on the real shared data

ARCHIVE = SHARED_ARCHIVE  # missing data fails these tests (shared_archive fixture), they never skip


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Flows load params.yaml from the working directory: give them an empty one (defaults + arguments)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLTRADER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_backfill_archive_loads_yesterday_and_reports_gaps(prefect_harness: None, workdir: Path) -> None:
    assert yesterday(date(2020, 1, 3)) == "2020-01-02"
    store_url = f"parquet://{workdir / 'store'}"
    result = backfill_archive(day=yesterday(date(2020, 1, 3)), market="spot", symbols=["BTCUSDT"],
                              store_url=store_url, archive_base=str(ARCHIVE))
    assert result["gaps"] == []
    assert result["report"]["inserted"] == 1440 and result["report"]["files"] == 1  # type: ignore[index]
    again = backfill_archive(day="2020-01-02", market="spot", symbols=["BTCUSDT"], store_url=store_url,
                             archive_base=str(ARCHIVE))
    assert again["report"]["inserted"] == 0 and again["report"]["skipped"] == 1440  # type: ignore[index]
    stored = ParquetStore(workdir / "store").read_klines("spot", "BTCUSDT", "1m")
    assert stored.height == 1440
    assert stored.get_column("open_time").min() == datetime(2020, 1, 2, tzinfo=UTC)


def test_backfill_archive_fails_when_a_stored_month_differs_from_the_archive(prefect_harness: None,
                                                                             workdir: Path) -> None:
    """The verify task after the backfill fails the run, naming the month, when stored rows were altered."""
    import polars as pl

    from rltrader.data.parquet_store import write_month_file
    from rltrader.errors import DataError

    store_url = f"parquet://{workdir / 'store'}"
    backfill_archive(day="2020-01-01", market="spot", symbols=["BTCUSDT"], store_url=store_url,
                     archive_base=str(ARCHIVE))  # clean: verify passes (2020-01-02/03 not stored: not a failure)
    f = (workdir / "store" / "klines" / "market=spot" / "symbol=BTCUSDT" / "interval=1m" / "month=2020-01"
         / "data.parquet")
    df = pl.read_parquet(f)
    write_month_file(df.with_columns(pl.when(pl.int_range(pl.len()) == 100).then(pl.col("volume") * 2)
                                     .otherwise(pl.col("volume")).alias("volume")), f)
    with pytest.raises(DataError, match=r"spot BTCUSDT 1m 2020-01 differs \(1 row"):
        backfill_archive.with_options(retries=0)(day="2020-01-02", market="spot", symbols=["BTCUSDT"],
                                                 store_url=store_url, archive_base=str(ARCHIVE))


def test_ingest_live_bounded_run_against_replay(prefect_harness: None, workdir: Path) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    srv = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], t0, t0, clock=ReplayClock(t0, 0.0),
                                    heartbeat_s=None)
    with run_in_thread(srv):
        result = ingest_live(market="spot", symbols=["BTCUSDT"], store_url=f"parquet://{workdir / 'store'}",
                             rest_base=srv.rest_base_url, ws_base=srv.ws_base_url, max_seconds=4.0)
    assert result["trades_stored"] == 5000
    assert result["klines_stored"] == 12
    assert result["bars_stored"] > 140
    assert ParquetStore(workdir / "store").read_agg_trades("spot", "BTCUSDT").height == 5000


def test_deployments_declare_schedules() -> None:
    by_name = {d.name: d for d in deployments()}
    cron = by_name["backfill-archive-daily"].schedules[0].schedule
    assert (cron.cron, cron.timezone) == (BACKFILL_CRON, "UTC") and BACKFILL_CRON == "30 0 * * *"
    live = by_name["ingest-live"]
    assert live.schedules and live.concurrency_limit == 1


def test_nightly_retrain_backfills_rebuilds_and_decides(prefect_harness: None, workdir: Path) -> None:
    """The whole nightly flow on tiny params with the stage functions: data through September is backfilled
    beyond the params' February, every stage runs, and the promotion decision is in the summary (and in MLflow)."""
    import json

    import yaml
    from test_dvc_pipeline import REPO, TINY, TINY_TRAIN

    from flows.retrain import nightly_retrain

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in {**TINY, **TINY_TRAIN}.items():
        params[section].update(values)
    params["data"] = {"dir": str(workdir / "data"), "archive_base": str(ARCHIVE)}
    params["train"].update({"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "artifact_root": str(workdir / "art"),
                            "checkpoint_dir": str(workdir / "ckpt"), "models_dir": str(workdir / "models"),
                            "val_sessions": 100})
    params["backtest"]["bootstrap"] = 100
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(params))
    os.environ.pop("RLTRADER_DATA_DIR", None)  # the fixture's override would beat the file; monkeypatch restores

    summary = nightly_retrain(params=str(path), through="2023-09-30", use_dvc=False,
                              reports_dir=str(workdir / "reports"))
    assert summary["backfill"]["start"] == "2023-02-01"  # nothing stored yet: from the params' start
    # the shared archive has AVAXUSDT for 2023-02 and 2023-09 (not the months between): both land, the hole is
    # reported as a gap, not an error
    assert summary["backfill"]["inserted"] == (28 + 30) * 1440 and summary["gaps"] >= 1
    assert summary["rebuild"]["stages"] == ["ingest", "features", "sessions", "study", "train@d3qn", "train@ppo",
                                            "train@cnn", "train@xgb", "train@lowrider", "ensemble@d3qn_ens",
                                            "backtest", "promote"]
    assert summary["decision"] in ("promote", "refuse") and summary["challenger"] in ("d3qn", "ppo", "xgb", "d3qn_ens")
    decision = json.loads((workdir / "reports" / "promotion.json").read_text())
    assert decision["action"] == summary["decision"]
    assert summary["failed_gates"] == [g["name"] for g in decision["gates"] if not g["passed"]]
    stored = ParquetStore(workdir / "data" / "store").read_klines("futures-um", "AVAXUSDT", "1m")
    assert stored["open_time"].max().month == 9  # type: ignore[union-attr]


def test_nightly_retrain_is_scheduled_at_two_utc() -> None:
    from flows.deploy import RETRAIN_CRON

    deps = {d.name: d for d in deployments()}
    assert RETRAIN_CRON == "0 2 * * *"
    sched = deps["nightly-retrain"].schedules[0].schedule
    assert sched.cron == RETRAIN_CRON and sched.timezone == "UTC"


@pytest.mark.slow
def test_tune_flow_fans_trials_out_and_reports(prefect_harness: None, workdir: Path) -> None:
    """The `tune` flow on an ephemeral Prefect server: two worker tasks share one sqlite study of the `filters`
    objective on tiny stage outputs; exactly the asked trials finish, both tasks take some, the report and
    params.tuned.yaml are written."""
    import optuna
    import yaml
    from test_sessions import fill_store, make_settings

    from flows.tune import tune
    from rltrader.dataset.build import run_features_stage, run_sessions_stage
    from rltrader.tune.storage import FINISHED

    base = make_settings(workdir)
    run_features_stage(base, fill_store(workdir))
    run_sessions_stage(base)
    d = base.model_dump(mode="json")
    d["train"] = {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "artifact_root": str(workdir / "art")}
    d["tune"] = {"model": "random", "folds": 2, "metric": "sharpe_minute_annualized",
                 "out_dir": str(workdir / "reports" / "tune"), "heartbeat_seconds": 1, "grace_seconds": 4}
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    os.environ.pop("RLTRADER_DATA_DIR", None)
    out = tune(kind="filters", trials=4, workers=2, params=str(path))
    study = optuna.load_study(study_name="filters", storage=f"sqlite:///{workdir}/data/tune/optuna.db")
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == 4 == len(trials)
    assert len({t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}) == 2  # both worker tasks took trials
    assert out["best_params"] == study.best_params and out["trials_counted"] == 4
    assert (workdir / "reports" / "tune" / "filters" / "report.html").is_file()
    assert yaml.safe_load((workdir / "params.tuned.yaml").read_text()) == {"backtest": study.best_params}


def test_tune_deployments_are_declared() -> None:
    by_name = {d.name: d for d in deployments()}
    assert {"tune", "tune-worker"} <= set(by_name)
    assert by_name["tune"].concurrency_limit == 1


def test_trade_flow_paper_over_the_replay_server(prefect_harness: None, shared_archive: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``trade`` flow (deployment ``trade-paper``) under Prefect: paper mode against the replay server for two
    replayed hours of real NEARUSDT bars; the flow run completes and its session's fills are in the records."""
    import polars as pl
    import yaml
    from conftest import NEAR_APRIL, build_near_april

    from flows.trade import trade
    from rltrader.data.archive import parse_klines, read_zip_member
    from rltrader.live.records import Records
    from rltrader.sim import ReplayData

    built = build_near_april(shared_archive, tmp_path / "built")
    day0 = datetime(2023, 4, 10, tzinfo=UTC)
    until = datetime(2023, 4, 10, 2, tzinfo=UTC)
    rows = parse_klines(read_zip_member(shared_archive / NEAR_APRIL), source=NEAR_APRIL, market=Market.FUTURES_UM,
                        symbol="NEARUSDT", interval="1m").rows
    store = ParquetStore(tmp_path / "store")  # the history before the window; the stream stores the window
    store.write_klines(rows.filter(pl.col("open_time") < day0))
    store.close()
    params = {  # build_near_april's sections (its features and sessions metadata) + the trader's
        "data": {"dir": str(built.data.dir), "store_url": f"parquet://{tmp_path / 'store'}"},
        "ingest": {"market": "futures-um", "symbols": ["NEARUSDT"], "interval": "1m"},
        "sessions": {"context": built.sessions.context, "length": 10, "stride": 10, "embargo": 60,
                     "volatility_percentile": 0,
                     "splits": {k: {"start": str(v.start), "end": str(v.end)}
                                for k, v in built.sessions.splits.items()}},
        "backtest": {"bootstrap": 0},
        "trader": {"symbols": ["NEARUSDT"], "model": "sma_cross", "history_bars": 0,
                   "records_url": str(tmp_path / "trader.db")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    window = rows.filter((pl.col("open_time") >= day0) & (pl.col("open_time") < until + pl.duration(minutes=5)))
    server = ReplayServer(ReplayData(Market.FUTURES_UM, window), day0, speed=0)
    with run_in_thread(server) as srv:
        summary = trade(mode="paper", rest_base=srv.rest_base_url, ws_base=srv.ws_base_url, max_seconds=240,
                        mlflow_summary=False, until=until)
    records = Records(tmp_path / "trader.db")
    sid = str(summary["session_id"])
    fills = records.fills(sid)
    assert len(fills) >= 2 and "order" in {f["kind"] for f in fills}
    assert all(day0.timestamp() * 1e6 <= f["time"] < until.timestamp() * 1e6 for f in fills)
    assert summary["decisions"] >= 60 and records.status(sid)["session"]["ended_at"] is not None
    assert sum(1 for o in records.orders(sid) if o["status"] == "filled") == sum(
        1 for f in fills if f["kind"] == "order")
