"""The risk engine: each limit refuses or reduces the order and the journal says why; states persist across a
restart; the operator's halt / resume / flatten; a property test over random orders; a replayed day of real
bars with injected breaches where no limit is ever exceeded."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import build_near_april
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rltrader.config import RiskSettings, Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.execution import ExecutionParams
from rltrader.live.control import resume
from rltrader.live.gateway import OrderRequest, PaperBroker, Reduced
from rltrader.live.records import Records
from rltrader.live.risk import RiskEngine, RiskLimits, RiskState, reduces, state_of
from rltrader.live.trader import bars_from_frame, build_trader

NEAR = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)
T0 = int(DAY0.timestamp() * 1e6)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _engine(tmp_path: Path, clock: Clock | None = None, step: float = 0.0, min_notional: float = 0.0,
            **limits: float) -> RiskEngine:
    xp = ExecutionParams(step_size=step, min_notional=min_notional).to_array()
    return RiskEngine(RiskLimits(**limits), Records(tmp_path / "j.db"), xp, "s1", clock or Clock())  # type: ignore[arg-type]


def _req(qty: float, pos: float = 0.0, px: float = 10.0, sym: str = "A") -> OrderRequest:
    return OrderRequest(sym, T0, f"c-{sym}-{qty}-{pos}", qty, px, "signal", pos + qty == 0.0, pos)


def test_notional_caps_reduce_the_order_on_the_step_grid(tmp_path: Path) -> None:
    eng = _engine(tmp_path, step=0.5, max_order_notional=1000, max_symbol_notional=1500, max_total_notional=2500)
    eng.on_mark("A", 0.0, 10.0, 5000.0, T0)
    eng.on_mark("B", 80.0, 10.0, 5000.0, T0)  # 800 of the total used by B
    v = eng(_req(250.0))
    assert isinstance(v, Reduced) and v.req.qty == 100.0 and "max_order_notional 1000" in v.why
    v = eng(_req(100.0, pos=90.0))  # symbol: 1500 / 10 - 90 = 60 left
    assert isinstance(v, Reduced) and v.req.qty == 60.0 and "max_symbol_notional" in v.why
    eng.on_mark("B", 160.0, 10.0, 5000.0, T0)  # total: 2500 - 1600 = 900 → 90 for A
    v = eng(_req(-100.0))
    assert isinstance(v, Reduced) and v.req.qty == -90.0 and "max_total_notional" in v.why
    assert eng(_req(50.0)) is None  # within every limit: untouched
    # reducing orders are never capped, and are flagged reduce-only
    v = eng(_req(-500.0, pos=500.0))
    assert v is None or (isinstance(v, Reduced) and v.req.qty == -500.0 and v.req.reduce_only)


def test_leverage_cap_and_exchange_minimum(tmp_path: Path) -> None:
    eng = _engine(tmp_path, step=1.0, min_notional=5.0, max_leverage=2.0)
    eng.on_mark("A", 0.0, 10.0, 1000.0, T0)
    v = eng(_req(300.0))
    assert isinstance(v, Reduced) and v.req.qty == 200.0 and "max_leverage 2" in v.why
    v = eng(_req(10.0, pos=199.6))  # 0.4 left: below the step grid and the minimum → refused
    assert isinstance(v, str) and "max_leverage" in v and "below the exchange minimum" in v
    assert eng(_req(0.3)) == "filter: quantity 0.3 is not on the step grid 1"
    assert eng(_req(0.0 + 1.0, px=1.0)) == "filter: notional 1 below the minimum 5"


def test_orders_per_minute(tmp_path: Path) -> None:
    clock = Clock()
    eng = _engine(tmp_path, clock, max_orders_per_minute=2)
    eng.on_mark("A", 0.0, 10.0, 1000.0, T0)
    assert eng(_req(1.0)) is None and eng(_req(2.0)) is None
    assert eng(_req(3.0)) == "max_orders_per_minute 2: 2 sent in the last 60 s"
    v = eng(_req(-1.0, pos=1.0))  # a reducing order still passes
    assert v is None or isinstance(v, Reduced)
    clock.t += 61.0
    assert eng(_req(4.0)) is None


def test_daily_loss_halts_drawdown_reduces_and_both_survive_a_restart(tmp_path: Path) -> None:
    eng = _engine(tmp_path, max_daily_loss=0.05, max_drawdown=0.02)
    eng.on_mark("A", 10.0, 10.0, 1000.0, T0)
    eng.on_mark("A", 10.0, 10.0, 1010.0, T0 + 60_000_000)  # the peak
    eng.on_mark("A", 10.0, 10.0, 985.0, T0 + 120_000_000)  # 2.5 % below the peak, 1.5 % on the day
    assert eng.state is RiskState.REDUCING
    assert eng(_req(5.0, pos=10.0)) == "REDUCING: max_drawdown (order 5 would not reduce position 10)"
    assert eng(_req(-15.0, pos=10.0)) == "REDUCING: max_drawdown (order -15 would not reduce position 10)"  # a flip
    v = eng(_req(-10.0, pos=10.0))  # the close passes, flagged reduce-only
    assert isinstance(v, Reduced) and v.req.qty == -10.0 and v.req.reduce_only and v.why == ""
    # a restart: the engine reads the journal's state, peak and day
    eng2 = _engine(tmp_path, max_daily_loss=0.05, max_drawdown=0.02)
    assert eng2.state is RiskState.REDUCING and eng2.peak == 1010.0
    eng2.on_mark("A", 10.0, 10.0, 940.0, T0 + 180_000_000)  # 6 % on the day
    assert eng2.state is RiskState.HALTED
    assert eng2(_req(-10.0, pos=10.0)) == "HALTED: max_daily_loss"
    ev = eng2.records.risk_events()
    assert [(e["state_from"], e["state_to"], e["reason"]) for e in ev] == [
        ("ACTIVE", "REDUCING", "max_drawdown"), ("REDUCING", "HALTED", "max_daily_loss")]
    assert ev[1]["numbers"]["equity"] == 940.0 and ev[1]["numbers"]["day_start"] == 1000.0
    assert _engine(tmp_path).state is RiskState.HALTED  # persists until resume
    resume(eng2.records)
    assert _engine(tmp_path).state is RiskState.ACTIVE


def test_stale_data_and_invalid_features_take_no_new_risk(tmp_path: Path) -> None:
    clock = Clock()
    eng = _engine(tmp_path, clock, stale_after_s=90)
    eng.on_bar("A")
    eng.on_mark("A", 10.0, 10.0, 1000.0, T0)
    clock.t += 100
    assert eng(_req(5.0, pos=10.0)) == "no new risk: stale data: no closed bar for 100 s (limit 90 s)"
    assert not isinstance(eng(_req(-5.0, pos=10.0)), str)  # reducing is allowed
    eng.on_bar("A", valid=False)
    assert eng(_req(5.0, pos=10.0)) == "no new risk: NaN features"
    eng.on_bar("A", repairing=True)
    assert eng(_req(5.0, pos=10.0)) == "no new risk: REST repair running"
    eng.on_bar("A")
    assert eng(_req(5.0, pos=10.0)) is None


LIMITS = RiskLimits(max_order_notional=500.0, max_symbol_notional=800.0, max_total_notional=1200.0,
                    max_leverage=1.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.floats(-300, 300, allow_nan=False),
                          st.floats(0.5, 20.0)), min_size=1, max_size=40))
def test_no_order_sequence_exceeds_a_limit(tmp_path_factory: pytest.TempPathFactory,
                                           orders: list[tuple[str, float, float]]) -> None:
    eng = RiskEngine(LIMITS, Records(tmp_path_factory.mktemp("p") / "j.db"), ExecutionParams(step_size=0.01)
                     .to_array(), "s1")
    pos = {"A": 0.0, "B": 0.0, "C": 0.0}
    px = {"A": 10.0, "B": 10.0, "C": 10.0}
    for s in pos:
        eng.on_mark(s, 0.0, 10.0, 800.0 / 3, T0)  # equity 800 → leverage room 1200 (= the total cap)
    eps = 1e-6
    for sym, qty, price in orders:
        qty = round(qty, 2)
        if qty == 0.0:
            continue
        px[sym] = price
        eng.on_mark(sym, pos[sym], price, 800.0 / 3, T0)
        req = OrderRequest(sym, T0, "c", qty, price, "signal", pos[sym] + qty == 0.0, pos[sym])
        v = eng(req)
        if isinstance(v, str):
            continue
        sent = v.req if isinstance(v, Reduced) else req
        if not reduces(pos[sym], sent.qty):
            assert abs(sent.qty) * price <= LIMITS.max_order_notional + eps
            after = abs(pos[sym] + sent.qty) * price
            assert after <= LIMITS.max_symbol_notional + eps
            total = after + sum(abs(pos[s]) * px[s] for s in pos if s != sym)
            assert total <= LIMITS.max_total_notional + eps
        pos[sym] += sent.qty
        eng.on_mark(sym, pos[sym], price, 800.0 / 3, T0)


# -- the trader on a replayed day ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Real NEARUSDT bars (April 2023) through the features and sessions stages; backtest split = one day."""
    return build_near_april(shared_archive, tmp_path_factory.mktemp("risk"))


def _run_day(settings: Settings, records: Records, bars_until: int | None = None,
             between: object = None) -> str:
    store = ParquetStore(settings.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", "NEARUSDT", "1m"))
    store.close()
    trader = build_trader(settings, mode="paper", symbols=["NEARUSDT"], model="sma_cross", records=records,
                          broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
    trader.warm_up("NEARUSDT", (b for b in bars if b.time < T0))
    for i, b in enumerate(b for b in bars if b.time >= T0):
        if bars_until is not None and i == bars_until and callable(between):
            between(trader)
        trader.on_bar("NEARUSDT", b)
    return trader.session_id


@pytest.mark.slow
def test_a_replayed_day_with_injected_breaches_never_exceeds_a_limit(built: Settings, tmp_path: Path) -> None:
    """Real NEARUSDT bars, the sma_cross rule (frequent orders sized at the whole equity): the per-order cap
    reduces every opening order, the day's loss limit halts the trader part-way; every refusal and reduction is
    in the journal, and no order that was sent breaks a limit."""
    risk = RiskSettings(max_order_notional=2500.0, max_symbol_notional=3000.0, max_daily_loss=0.004,
                        stale_after_s=0)
    settings = built.model_copy(update={"risk": risk})
    records = Records(tmp_path / "j.db")
    sid = _run_day(settings, records)
    orders = records.orders(sid)
    sent = [o for o in orders if o["status"] in ("sent", "filled")]
    blocked = [o for o in orders if o["status"] == "blocked"]
    reduced = [o for o in orders if (o["detail"] or "").startswith("reduced")]
    assert len(sent) >= 4 and reduced and blocked
    fills = {f["client_order_id"]: f for f in records.fills(sid) if f["kind"] == "order"}
    for o in sent:
        f = fills[o["client_order_id"]]
        pos_before = f["position_after"] - f["qty"]
        if not reduces(pos_before, f["qty"]):
            assert abs(o["qty"]) * o["ref_price"] <= 2500.0 + 1e-6
            assert abs(f["position_after"]) * o["ref_price"] <= 3000.0 + 1e-6
    assert all(o["detail"] for o in blocked)
    ev = records.risk_events()
    assert [e["reason"] for e in ev] == ["max_daily_loss"] and ev[0]["state_to"] == "HALTED"
    assert all(o["detail"].startswith("HALTED") for o in blocked if o["written_at"] > ev[0]["at"])
    halted_at = ev[0]["at"]
    assert not [o for o in orders if o["written_at"] > halted_at and o["status"] in ("sent", "filled")]
    # the state is the journal's: a restarted trader is still HALTED and sends nothing
    records2 = Records(tmp_path / "j.db")
    assert state_of(records2)["state"] == "HALTED"
    sid2 = _run_day(settings, records2)
    assert all(o["status"] == "blocked" for o in records2.orders(sid2))


@pytest.mark.slow
def test_an_operator_halt_blocks_every_later_order_through_the_risk_engine(built: Settings, tmp_path: Path) -> None:
    """`rltrader trade halt` (``live.control``, the journal's state) mid-day: from the next order on the risk
    engine refuses everything, with the operator's reason on each order; `resume` makes it ACTIVE again.
    (stop/flatten/reload/reconcile between bars: tests/test_live_ops.py.)"""
    from rltrader.cli import app

    db = tmp_path / "j.db"
    runner = CliRunner()
    settings = built.model_copy(update={"risk": RiskSettings(stale_after_s=0)})
    records = Records(db)

    def halt_now(trader: object) -> None:
        res = runner.invoke(app, ["trade", "halt", "--reason", "test", "--records", str(db)])
        assert res.exit_code == 0, res.output

    sid = _run_day(settings, records, bars_until=600, between=halt_now)
    cut = T0 + 601 * 60_000_000  # the first bar decided after the halt
    before = [o for o in records.orders(sid) if o["bar_time"] < cut]
    after = [o for o in records.orders(sid) if o["bar_time"] >= cut]
    assert any(o["status"] == "filled" for o in before) and after
    assert all(o["status"] == "blocked" and o["detail"] == "HALTED: operator: halt (test)" for o in after)
    assert state_of(records)["state"] == "HALTED"  # it persists
    res = runner.invoke(app, ["trade", "resume", "--records", str(db)])
    assert res.exit_code == 0 and state_of(records)["state"] == "ACTIVE"


def test_reduces() -> None:
    assert reduces(10.0, -4.0) and reduces(10.0, -10.0) and reduces(-3.0, 3.0)
    assert not reduces(10.0, -11.0) and not reduces(0.0, 1.0) and not reduces(10.0, 1.0)
    assert replace(_req(1.0), reduce_only=True).reduce_only
