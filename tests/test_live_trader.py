"""The paper trader on a replayed day of real bars gives exactly the backtest's fills and equity."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import build_near_april

from rltrader.config import Settings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.schema import Market
from rltrader.errors import ConfigError
from rltrader.evaluate.backtest import BacktestResult, run_backtest
from rltrader.live.features import IncrementalFeatures
from rltrader.live.gateway import PaperBroker
from rltrader.live.records import Records
from rltrader.live.trader import bars_from_frame, build_trader

NEAR = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)


@pytest.fixture(scope="module")
def built(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Real NEARUSDT bars (April 2023) through the features and sessions stages; backtest split = one day."""
    return build_near_april(shared_archive, tmp_path_factory.mktemp("trader"))


def _with_latency(settings: Settings, latency: int) -> Settings:
    return settings.model_copy(update={"execution": replace(settings.execution, latency_bars=latency)})


def _paper(settings: Settings, model: str, tmp: Path) -> tuple[Records, str]:
    store = ParquetStore(settings.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", "NEARUSDT", "1m"))
    store.close()
    records = Records(tmp / "trader.db")
    trader = build_trader(settings, mode="paper", symbols=["NEARUSDT"], model=model, records=records,
                          broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
    t0 = int(DAY0.timestamp() * 1e6)
    trader.warm_up("NEARUSDT", (b for b in bars if b.time < t0))
    trader.run_bars(("NEARUSDT", b) for b in bars if b.time >= t0)
    return records, trader.session_id


def _assert_parity(bt: BacktestResult, records: Records, sid: str) -> None:
    """Fills (time, kind, qty, price, fee) and every bar's equity of the paper session equal the backtest's."""
    ref = bt.fills.filter(pl.col("symbol") == "NEARUSDT")
    ours = records.fills(sid)
    assert ref.height >= 2 and len(ours) == ref.height, (len(ours), ref.height)
    ref_t = ref["time"].dt.epoch("us").to_list()
    for r, o, t in zip(ref.iter_rows(named=True), ours, ref_t, strict=True):
        assert (o["time"], o["kind"]) == (t, r["kind"])
        assert o["qty"] == pytest.approx(r["qty"], rel=1e-12) and o["price"] == pytest.approx(r["price"], rel=1e-12)
        assert o["fee"] == pytest.approx(r["fee"], rel=1e-9, abs=1e-12)
    eq = bt.equity.filter(pl.col("symbol") == "NEARUSDT")
    marks = records.marks(sid)
    bt_eq = dict(zip((eq["time"].dt.epoch("us") - 60_000_000).to_list(), eq["equity"].to_list(), strict=True))
    ours_eq = {m["bar_time"]: m["equity"] for m in marks if m["bar_time"] in bt_eq}
    assert len(ours_eq) == len(bt_eq)
    for t, e in bt_eq.items():
        assert ours_eq[t] == pytest.approx(e, rel=1e-12), t
    # every decision was recorded, orders are the fills' orders, and none was sent twice
    orders = records.orders(sid)
    assert len({o["client_order_id"] for o in orders}) == len(orders)
    assert sum(1 for f in ours if f["kind"] == "order") == sum(1 for o in orders if o["status"] == "filled")
    assert len(records.decisions(sid)) >= 1440 - 1


@pytest.mark.slow
@pytest.mark.parametrize(("model", "latency", "hold"), [
    ("sma_cross", 0, {}), ("buy_and_hold", 0, {}), ("sma_cross", 2, {}),
    # the env's hold settings (issue 14): decisions every 5 bars, positions kept ≥ 7 bars, volatility-sized
    ("sma_cross", 1, {"decision_every": 5, "min_hold_bars": 7, "vol_target": 0.001}),
], ids=["sma", "buy_and_hold", "sma_latency2", "sma_hold_settings"])
def test_paper_parity_with_backtest(built: Settings, tmp_path: Path, model: str, latency: int,
                                    hold: dict[str, float]) -> None:
    settings = _with_latency(built, latency)
    if hold:
        settings = settings.model_copy(update={"env": replace(settings.env, **hold)})
    bt = run_backtest(settings, model, split="backtest")
    records, sid = _paper(settings, model, tmp_path)
    _assert_parity(bt, records, sid)


def _with_filters(settings: Settings, **filters: float) -> Settings:
    return settings.model_copy(update={"backtest": replace(settings.backtest, **filters)})


FILTER_CASES = {
    "cooldown": {"cooldown_bars": 20},
    "max_trades_per_day": {"max_trades_per_day": 7},
    "stop_loss": {"stop_loss": 0.003},
    "take_profit": {"take_profit": 0.003},
    "all": {"cooldown_bars": 5, "max_trades_per_day": 25, "stop_loss": 0.004, "take_profit": 0.004},
}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "latency"), [*((c, 0) for c in FILTER_CASES), ("cooldown", 2), ("all", 2)])
def test_paper_parity_with_backtest_filters(built: Settings, tmp_path: Path, case: str, latency: int) -> None:
    """The backtest's filters run in the trader as the backtest's own code (``decisions.filter_decision``):
    with each one set, and all together, the paper session's fills and equity are the backtest's. Each filter
    must bind on this day (else the case proves nothing): fewer fills than unfiltered, or protective exits."""
    settings = _with_latency(_with_filters(built, **FILTER_CASES[case]), latency)
    bt = run_backtest(settings, "sma_cross", split="backtest")
    records, sid = _paper(settings, "sma_cross", tmp_path)
    _assert_parity(bt, records, sid)
    plain = run_backtest(_with_latency(built, latency), "sma_cross", split="backtest")
    if case in ("stop_loss", "take_profit"):
        assert case in bt.trades["exit_reason"].to_list()
        assert any(d["reason"] == case for d in records.decisions(sid))
    else:
        assert bt.totals["blocked_decisions"] > 0 and bt.fills.height < plain.fills.height
        assert any(d["reason"] == "filtered" for d in records.decisions(sid))


def test_live_mode_refuses_without_the_flag_and_keys(built: Settings, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from rltrader.live.runner import KEY_VARS, LIVE_FLAG, run_trader

    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=LIVE_FLAG):
        run_trader(built, mode="live", mlflow_summary=False, handle_signals=False)
    with pytest.raises(ConfigError, match="choose paper, testnet or live"):
        build_trader(built, mode="real", symbols=["NEARUSDT"], model="flat", records=Records(tmp_path / "t.db"),
                     broker=PaperBroker(np.zeros(0)))


def _assert_same_fills(bt_fills: pl.DataFrame, ours: list[dict[str, object]]) -> None:
    ref = bt_fills.filter(pl.col("symbol") == "NEARUSDT")
    assert ref.height >= 2 and len(ours) == ref.height, (len(ours), ref.height)
    for r, o, t in zip(ref.iter_rows(named=True), ours, ref["time"].dt.epoch("us").to_list(), strict=True):
        assert (o["time"], o["kind"]) == (t, r["kind"])
        assert o["qty"] == pytest.approx(r["qty"], rel=1e-12) and o["price"] == pytest.approx(r["price"], rel=1e-12)
        assert o["fee"] == pytest.approx(r["fee"], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_paper_run_over_the_replay_server_stream_equals_backtest(built: Settings, shared_archive: Path,
                                                                 tmp_path: Path) -> None:
    """`rltrader trade --mode paper` end to end: the replay server streams the day's closed klines (websocket
    + REST repair) into the store and the trader; fills equal the backtest's on the same bars."""
    from rltrader.live.runner import run_trader
    from rltrader.sim import ReplayData, ReplayServer, run_in_thread

    rows = parse_klines(read_zip_member(shared_archive / NEAR), source=NEAR, market=Market.FUTURES_UM,
                        symbol="NEARUSDT", interval="1m").rows
    day = rows.filter((pl.col("open_time") >= DAY0) & (pl.col("open_time") < DAY1 + pl.duration(minutes=5)))
    server = ReplayServer(ReplayData(Market.FUTURES_UM, day), DAY0, speed=0)
    store = ParquetStore(tmp_path / "store")  # the history before the day; the stream stores the day itself
    store.write_klines(rows.filter(pl.col("open_time") < DAY0))
    store.close()
    settings = built.model_copy(update={
        "data": built.data.model_copy(update={"store_url": f"parquet://{tmp_path / 'store'}"}),
        "train": built.train.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                "artifact_root": tmp_path / "artifacts"}),
        "trader": built.trader.model_copy(update={"symbols": ["NEARUSDT"], "model": "sma_cross",
                                                  "history_bars": 0, "records_url": str(tmp_path / "t.db")})})
    with run_in_thread(server) as srv:
        summary = run_trader(settings, mode="paper", rest_base=srv.rest_base_url, ws_base=srv.ws_base_url,
                             until=DAY1, max_seconds=240, handle_signals=False)
    records = Records(tmp_path / "t.db")
    _assert_same_fills(run_backtest(built, "sma_cross", split="backtest").fills, records.fills(summary["session_id"]))
    # the session summary in MLflow: a run named `trade`, tagged, with the final equity
    import mlflow

    run = mlflow.MlflowClient(settings.train.tracking_uri).get_run(str(summary["mlflow_run_id"]))
    assert run.info.run_name == "trade" and run.data.tags["mode"] == "paper"
    assert run.data.tags["session_id"] == summary["session_id"]
    assert run.data.metrics["equity"] == pytest.approx(float(summary["equity"]))
    assert records.status(str(summary["session_id"]))["session"]["summary"]["decisions"] == summary["decisions"]


@pytest.mark.slow
@pytest.mark.parametrize("filters", [{}, {"cooldown_bars": 5, "max_trades_per_day": 25}], ids=["plain", "filters"])
def test_testnet_mode_against_the_fake_exchange_equals_backtest(
        built: Settings, shared_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        filters: dict[str, float]) -> None:
    """`rltrader trade --mode testnet --rest-base <replay server>`: orders go over Binance's signed API to the
    replay exchange, which fills them in the execution kernel; the replay clock is stepped a bar at a time, each
    step waiting for the trader to have handled the bar (lock-step, so wall-clock speed cannot move a fill).
    Every order fill and every bar's equity equal the backtest's; the last bar's close (the backtest closes at
    the close price, a live order can only fill at the next open) is checked for side and size."""
    import threading
    from datetime import timedelta

    from rltrader.live.runner import KEY_VARS, run_trader
    from rltrader.sim import ReplayClock, ReplayData, ReplayServer, run_in_thread

    key, secret = "trader-test-key", "trader-test-secret"
    for var, val in zip(KEY_VARS, (key, secret), strict=True):
        monkeypatch.setenv(var, val)
    settings = built.model_copy(update={
        "execution": replace(built.execution, step_size=1.0),  # NEARUSDT futures: whole NEAR
        "backtest": replace(built.backtest, trade_size_quote=5000.0, **filters),  # below the leverage cap
        "data": built.data.model_copy(update={"store_url": f"parquet://{tmp_path / 'store'}"}),
        "trader": built.trader.model_copy(update={"symbols": ["NEARUSDT"], "model": "sma_cross", "history_bars": 0,
                                                  "records_url": str(tmp_path / "t.db")})})
    rows = parse_klines(read_zip_member(shared_archive / NEAR), source=NEAR, market=Market.FUTURES_UM,
                        symbol="NEARUSDT", interval="1m").rows
    store = ParquetStore(tmp_path / "store")
    store.write_klines(rows.filter(pl.col("open_time") < DAY0))
    store.close()
    day = rows.filter((pl.col("open_time") >= DAY0) & (pl.col("open_time") < DAY1 + pl.duration(minutes=5)))
    clock = ReplayClock(DAY0, 0.0, paused=True)
    server = ReplayServer(ReplayData(Market.FUTURES_UM, day), clock=clock, heartbeat_s=None,
                          api_keys={key: secret}, execution=settings.execution)
    handled: list[int] = []
    cond = threading.Condition()

    def processed(sym: str, t: int) -> None:
        with cond:
            handled.append(t)
            cond.notify_all()

    result: dict[str, object] = {}
    with run_in_thread(server) as srv:
        worker = threading.Thread(target=lambda: result.update(run_trader(
            settings, mode="testnet", rest_base=srv.rest_base_url, ws_base=srv.ws_base_url, until=DAY1,
            max_seconds=600, handle_signals=False, mlflow_summary=False, on_processed=processed)))
        worker.start()
        for m in range(1, 1441):
            clock.advance_to(DAY0 + timedelta(minutes=m))
            want = int((DAY0 + timedelta(minutes=m - 1)).timestamp() * 1e6)
            with cond:
                assert cond.wait_for(lambda w=want: bool(handled) and handled[-1] >= w, timeout=60), m
        clock.advance_to(DAY1 + timedelta(minutes=2))  # the final close order fills at the next open
        # a wall-clock budget, not a speed check: once (CI alongside two full `dvc repro` runs on 2 cores) the
        # stop path took longer than 120 s; the fills and marks below are what the test checks
        worker.join(300)
    assert not worker.is_alive()
    bt = run_backtest(settings, "sma_cross", split="backtest")
    records = Records(tmp_path / "t.db")
    sid = str(result["session_id"])
    ours = records.fills(sid)
    ref = bt.fills.filter(pl.col("symbol") == "NEARUSDT")
    _assert_same_fills(ref.filter(pl.col("kind") == "order"), [f for f in ours if f["qty"] and f is not ours[-1]])
    last_ref, last = ref.row(-1, named=True), ours[-1]
    assert last_ref["kind"] == "forced_close" and last["qty"] == pytest.approx(last_ref["qty"], rel=1e-12)
    eq = bt.equity.filter(pl.col("symbol") == "NEARUSDT")
    bt_eq = dict(zip((eq["time"].dt.epoch("us") - 60_000_000).to_list(), eq["equity"].to_list(), strict=True))
    marks = {m["bar_time"]: m["equity"] for m in records.marks(sid)}
    last_bar = max(bt_eq)
    for t, e in bt_eq.items():
        if t != last_bar:
            assert marks[t] == pytest.approx(e, rel=1e-9), t
    assert all(o["status"] == "filled" for o in records.orders(sid)[:-1])
    if filters:  # the filters bound: decisions blocked, in the backtest and (as "filtered") in the journal
        assert bt.totals["blocked_decisions"] > 0
        assert any(d["reason"] == "filtered" for d in records.decisions(sid))


def test_a_missing_bar_closes_and_takes_no_new_risk_until_the_window_is_whole(built: Settings, tmp_path: Path) -> None:
    store = ParquetStore(built.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", "NEARUSDT", "1m"))
    store.close()
    t0 = int(DAY0.timestamp() * 1e6)
    hole = (t0 + 600 * 60_000_000, t0 + 610 * 60_000_000)  # 10 minutes missing at 10:00
    records = Records(tmp_path / "t.db")
    trader = build_trader(built, mode="paper", symbols=["NEARUSDT"], model="sma_cross", records=records,
                          broker=PaperBroker(np.zeros(0)))
    trader.warm_up("NEARUSDT", (b for b in bars if b.time < t0))
    trader.run_bars(("NEARUSDT", b) for b in bars if t0 <= b.time and not hole[0] <= b.time < hole[1])
    sid = trader.session_id
    orders = records.orders(sid)
    first_after = hole[1] + 60_000_000  # the first decision after the gap is for the bar after the first bar back
    gap_orders = [o for o in orders if o["reason"] == "gap"]
    assert len(gap_orders) == 1 and gap_orders[0]["bar_time"] == first_after and gap_orders[0]["status"] == "filled"
    ctx = trader.norm.context
    quiet = [d for d in records.decisions(sid) if first_after <= d["bar_time"] < first_after + (ctx - 1) * 60_000_000]
    assert len(quiet) == ctx - 1 and all(d["action_name"] == "hold" and "no new risk" in d["reason"] for d in quiet)
    assert not [o for o in orders if first_after < o["bar_time"] < first_after + (ctx - 1) * 60_000_000]
    # the gap restarted the feature windows (as the batch stage's segments): trading resumes after their
    # warm-up plus a whole context of valid rows
    resume = min(o["bar_time"] for o in orders if o["bar_time"] > first_after)
    assert resume >= hole[1] + (IncrementalFeatures(built.features).warmup - 1 + ctx) * 60_000_000
    fills = records.fills(sid)
    assert [f["position_after"] for f in fills if f["time"] == first_after] == [0.0]  # flat after the gap


@pytest.mark.slow
def test_paper_parity_with_backtest_for_a_network(built: Settings, tmp_path: Path) -> None:
    """A D3QN-shaped network (the deployable PolicyModule, as a .pt file): the trader's per-bar forward pass on its
    incremental, standardised features trades exactly as the backtest's batched path on the batch features."""
    import torch

    from rltrader.agents.networks import DuelingQNet, NetConfig
    from rltrader.agents.packaging import PolicyModule
    from rltrader.env.core import N_STATE
    from rltrader.live.trader import Normalization

    norm = Normalization.from_sessions(built.data.dir / "sessions")
    torch.manual_seed(3)
    net = DuelingQNet(len(norm.names), norm.context, N_STATE, 4, NetConfig(encoder="cnn", channels=16, hidden=32))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)  # decisive scores: an untrained net must still trade (and not tie)
    module = PolicyModule(net.eval(), "q_values", norm.context, len(norm.names), N_STATE, 4,
                          {"algo": "d3qn", "feature_names": list(norm.names), "mode": "futures_session"})
    path = tmp_path / "tiny.pt"
    torch.save(module, path)
    bt = run_backtest(built, str(path), split="backtest")
    records, sid = _paper(built, str(path), tmp_path)
    _assert_same_fills(bt.fills, records.fills(sid))
    scores = [d["scores"] for d in records.decisions(sid) if d["scores"] is not None]
    assert len(scores) > 1000 and all(len(s) == 4 for s in scores)  # every decision recorded its action scores
    # the confidence filter (q_values: Q(chosen) - Q(hold)), at the median gap of the unfiltered run's orders,
    # and with every other filter on top: the backtest's decisions, through its own filter code
    gaps = [d["scores"][d["action"]] - d["scores"][0] for d in records.decisions(sid)
            if d["scores"] is not None and d["target"] is not None]
    threshold = float(np.median(gaps))
    for filters in ({"confidence": threshold},
                    {"confidence": threshold, "cooldown_bars": 3, "max_trades_per_day": 40, "stop_loss": 0.004,
                     "take_profit": 0.004}):
        settings = _with_filters(built, **filters)
        bt_f = run_backtest(settings, str(path), split="backtest")
        (tmp_path / f"f{len(filters)}").mkdir()
        records_f, sid_f = _paper(settings, str(path), tmp_path / f"f{len(filters)}")
        _assert_parity(bt_f, records_f, sid_f)
        assert bt_f.totals["blocked_decisions"] > 0 and bt_f.fills.height < bt.fills.height


@pytest.mark.slow
def test_champion_alias_is_pinned_and_reloaded_only_when_following(built: Settings, tmp_path: Path) -> None:
    import torch

    import mlflow
    from rltrader.agents.common import mlflow_run
    from rltrader.agents.networks import DuelingQNet, NetConfig
    from rltrader.agents.packaging import PolicyModule
    from rltrader.env.core import N_STATE
    from rltrader.live.policy import alias_moved, resolve
    from rltrader.live.runner import _maybe_reload
    from rltrader.live.trader import Normalization

    settings = built.model_copy(update={"train": built.train.model_copy(update={
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": tmp_path / "artifacts"})})
    t = settings.train
    norm = Normalization.from_sessions(built.data.dir / "sessions")
    client = mlflow.MlflowClient(t.tracking_uri, registry_uri=t.tracking_uri)
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = DuelingQNet(len(norm.names), norm.context, N_STATE, 4, NetConfig(encoder="cnn", channels=8, hidden=16))
        module = PolicyModule(net.eval(), "q_values", norm.context, len(norm.names), N_STATE, 4,
                              {"algo": "d3qn", "feature_names": list(norm.names), "mode": "futures_session"})
        with mlflow_run(t.tracking_uri, t.experiment, f"train-{seed}", t.artifact_root):
            info = mlflow.pytorch.log_model(module, name="model", serialization_format="pickle",
                                            pip_requirements=["torch"])
        mlflow.set_registry_uri(t.tracking_uri)
        mlflow.register_model(info.model_uri, "rltrader")
    client.set_registered_model_alias("rltrader", "champion", "1")
    records = Records(tmp_path / "t.db")
    trader = build_trader(settings, mode="paper", symbols=["NEARUSDT"], model="models:/rltrader@champion",
                          records=records, broker=PaperBroker(np.zeros(0)))
    assert trader.model_version == "1" and trader.policy_name == "models:/rltrader/1"
    assert alias_moved(settings, trader.resolved) is None
    client.set_registered_model_alias("rltrader", "champion", "2")
    assert trader.model_version == "1"  # pinned: promotion does not change a running trader by itself
    assert alias_moved(settings, trader.resolved) == "2"
    _maybe_reload(trader, settings, alias_moved, resolve)  # what trader.follow_champion does between bars
    assert trader.model_version == "2" and trader.module is not None
    assert records.status(trader.session_id)["session"]["model_version"] == "2"
    with pytest.raises(ConfigError, match="no version of 'nothing' has the alias 'champion'"):
        resolve(settings, "models:/nothing@champion", "futures_session")
