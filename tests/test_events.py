"""Execution events: the backtest's fills, liquidations, forced closes and funding are the kernel's own bookings,
and they reconcile with the accounts and the equity curve."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from rltrader.dataset.split import SessionSet
from rltrader.env import EnvParams, ExecutionParams
from rltrader.env.continuous import ContinuousRun
from rltrader.env.core import EnvCore
from rltrader.env.synthetic import synthetic_sessions
from rltrader.evaluate.backtest import BacktestFilters, backtest_sessions
from rltrader.execution import (
    CUR_ROW,
    CUR_TIME,
    EV_FEE,
    EV_FUNDING,
    EV_INSURANCE,
    EV_KIND,
    EV_PX,
    EV_QTY,
    EV_REALIZED,
    EV_REASON,
    EV_ROW,
    EV_SLIP,
    EV_TAG,
    FEES,
    FUNDING,
    FUNDING_PERIOD_US,
    INSURANCE,
    KIND_FORCED,
    KIND_FUNDING,
    KIND_LIQUIDATION,
    KIND_ORDER,
    REALIZED,
    REASON_END,
    SLIPPAGE,
    Accounts,
    EventLog,
    fill_price,
    process_bar,
)

EX = ExecutionParams()


def one_stretch(n: int, seed: int = 1, vol: float = 0.003, stretches: int = 1) -> SessionSet:
    """One symbol, ``stretches`` back-to-back gap-free stretches over ``n`` bars (1-minute bars from t = 0)."""
    d = synthetic_sessions(n_symbols=1, bars_per_symbol=n, length=10, volatility=vol, seed=seed)
    cut = np.linspace(0, n, stretches + 1).astype(np.int64)
    start, end = cut[:-1] + d.context, cut[1:]
    return replace(d, ctx_start=start - d.context, start=start, end=end, length=0,
                   time=np.arange(n, dtype=np.int64) * 60_000_000)


def crash(data: SessionSet, at: int, drop: float) -> SessionSet:
    """The same data with every price from bar ``at`` on scaled by ``1 - drop`` (a gap down at ``at``'s open)."""
    f = np.ones(len(data.close))
    f[at:] = 1.0 - drop
    return replace(data, open=data.open * f, high=data.high * f, low=data.low * f, close=data.close * f)


def replay(data: SessionSet, res: object, execution: ExecutionParams) -> np.ndarray:
    """The backtest's order fills replayed bar by bar through ``execution.process_bar`` on a fresh account of
    the kernel alone: its events (one stretch, from initial cash)."""
    ev = res.events  # type: ignore[attr-defined]
    orders = ev[:, ev[EV_KIND] == KIND_ORDER]
    want = np.zeros(len(data.close))
    want[orders[EV_ROW].astype(np.int64)] = orders[EV_QTY]
    acc = Accounts(1, execution.initial_cash)
    log = EventLog.empty(64)
    xp = execution.to_array()
    for t in range(int(data.start[0]), int(data.end[0])):
        log.cursor[CUR_TIME], log.cursor[CUR_ROW] = data.time[t], t
        process_bar(acc.state, 0, want[t], int(data.time[t]), data.open[t], data.high[t], data.low[t],
                    data.close[t], data.volume[t], xp, log)
    return log.events()


def test_liquidation_event_is_the_kernels() -> None:
    base = one_stretch(600, seed=2, vol=0.001)
    data = crash(base, 300, 0.08)  # 8 % gap down: a 20x long is wiped out
    ex = replace(EX, leverage=20.0)
    res = backtest_sessions(data, "buy_and_hold", ex, EnvParams())
    ev = res.events
    liq = ev[:, ev[EV_KIND] == KIND_LIQUIDATION]
    assert liq.shape[1] == 1 and int(liq[EV_ROW, 0]) == 300
    assert res.totals["liquidations"] == 1.0
    # the fills frame shows exactly the kernel's booking (no price backed out of cash changes)
    row = res.fills.filter(pl.col("kind") == "liquidation").row(0, named=True)
    assert row["price"] == liq[EV_PX, 0] and row["fee"] == liq[EV_FEE, 0] and row["realized"] == liq[EV_REALIZED, 0]
    assert data.low[300] <= liq[EV_PX, 0] <= data.high[300]
    assert liq[EV_INSURANCE, 0] > 0.0  # the gap went through the bankruptcy price: the insurance fund covers it
    assert res.trades["exit_reason"].to_list() == ["liquidation"]
    # the same orders through the bare execution kernel book the same events, bit for bit
    kernel = replay(data, res, ex)
    fills = ev[:, ev[EV_KIND] != KIND_FUNDING]
    assert kernel.shape == fills.shape
    for f in (EV_ROW, EV_KIND, EV_REASON, EV_QTY, EV_PX, EV_FEE, EV_SLIP, EV_REALIZED, EV_INSURANCE):
        assert np.array_equal(kernel[f], fills[f]), f


def test_funding_events_match_the_accounts() -> None:
    n = 3 * 480 + 100  # crosses three 8-hour funding timestamps
    data = one_stretch(n, seed=3)
    ex = replace(EX, funding_rate_8h=0.0005)
    res = backtest_sessions(data, "buy_and_hold", ex, EnvParams())
    ev = res.events
    fund = ev[:, ev[EV_KIND] == KIND_FUNDING]
    rows = fund[EV_ROW].astype(np.int64)
    assert len(rows) == 3 and (data.time[rows] % FUNDING_PERIOD_US == 0).all()
    assert np.array_equal(fund[EV_FUNDING], fund[EV_QTY] * data.open[rows] * ex.funding_rate_8h)
    assert fund[EV_FUNDING].sum() == pytest.approx(res.totals["funding"], rel=1e-12)
    assert res.trades["funding"].sum() == pytest.approx(res.totals["funding"], rel=1e-12)
    assert res.totals["funding"] > 0  # a long pays a positive rate


def test_forced_close_at_every_gap_is_the_kernels_fill() -> None:
    data = one_stretch(900, seed=4, stretches=3)
    res = backtest_sessions(data, "buy_and_hold", EX, EnvParams(), chain=True)
    ev = res.events
    forced = ev[:, ev[EV_KIND] == KIND_FORCED]
    assert forced.shape[1] == 3 and (forced[EV_REASON] == REASON_END).all()
    assert np.array_equal(forced[EV_ROW].astype(np.int64), data.end - 1)  # each stretch's last bar
    xp = EX.to_array()
    for i in range(3):
        t, dq = int(forced[EV_ROW, i]), forced[EV_QTY, i]
        px = fill_price(data.close[t], np.sign(dq), abs(dq), data.volume[t], xp)
        assert forced[EV_PX, i] == px and forced[EV_FEE, i] == abs(dq) * px * EX.taker_fee
    assert set(res.trades["exit_reason"].to_list()) == {"end_of_data"}


@pytest.mark.parametrize(("mode", "market", "policy", "flt"), [
    ("futures_session", "futures", "random", BacktestFilters(repeat_cycles=False)),
    ("futures_session", "futures", "sma_cross",
     BacktestFilters(stop_loss=0.004, take_profit=0.006, repeat_cycles=False)),
    ("spot_cycle", "spot", "random", BacktestFilters(repeat_cycles=True)),
    ("lowrider", "spot", "lowrider_rule", BacktestFilters(repeat_cycles=True)),
])
def test_events_reconcile_with_accounts_and_equity(mode: str, market: str, policy: str,
                                                   flt: BacktestFilters) -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=500, length=60, volatility=0.004, seed=6)
    ex = replace(EX, market=market, funding_rate_8h=0.0003 if market == "futures" else 0.0,  # type: ignore[arg-type]
                 leverage=3.0 if market == "futures" else 1.0)
    res = backtest_sessions(data, policy, ex, EnvParams(mode=mode), flt)  # type: ignore[arg-type]
    ev = res.events
    st = res.stretches
    tag = ev[EV_TAG].astype(np.int64)
    for s in range(data.n_sessions):
        e = ev[:, tag == s]
        # initial cash + realized - fees - funding + insurance = final equity (every stretch ends flat)
        recon = (st["start_equity"][s] + e[EV_REALIZED].sum() - e[EV_FEE].sum() - e[EV_FUNDING].sum()
                 + e[EV_INSURANCE].sum())
        assert recon == pytest.approx(st["final_equity"][s], rel=1e-12, abs=1e-9)
    # unfiltered (no cycle restarts) every stretch is one account: its events, summed in booking order, ARE its
    # totals, as the account fields after driving the continuous mode one bar at a time from Python show
    if flt == BacktestFilters(repeat_cycles=False):
        core_totals = {FEES: EV_FEE, REALIZED: EV_REALIZED, FUNDING: EV_FUNDING, SLIPPAGE: EV_SLIP,
                       INSURANCE: EV_INSURANCE}
        res_acct = _final_accounts(data, policy, ex, EnvParams(mode=mode), flt)  # type: ignore[arg-type]
        for s in range(data.n_sessions):
            e = ev[:, tag == s]
            for field, col in core_totals.items():
                total = 0.0
                for v in e[col]:
                    total += v
                assert total == res_acct[field, s], (s, field)
    assert res.trades["pnl"].sum() == pytest.approx(res.totals["pnl"], abs=1e-6)
    assert res.totals["fills"] == float((ev[EV_KIND] != KIND_FUNDING).sum())


def _final_accounts(data: SessionSet, policy: str, ex: ExecutionParams, params: EnvParams,
                    flt: BacktestFilters) -> np.ndarray:
    """The account fields after the run, by driving the continuous mode one bar at a time from Python."""
    from rltrader.evaluate.backtest import make_policy
    from rltrader.evaluate.backtest.decisions import EnvView

    core = EnvCore(data, ex, params, data.n_sessions)
    run = ContinuousRun(core, chain=False, repeat=flt.repeat_cycles, events=0)
    pol = make_policy(policy, params.mode)
    if hasattr(pol, "bind"):
        pol.bind(EnvView(core))
    active = run.accounts.copy()
    while active.size:
        acts = np.asarray(pol(core.window, core.state, core.mask), np.int64)[active]
        run.step(active, acts)
        active = active[~run.done[active]]
    return core.acct.copy()


def test_one_bar_at_a_time_equals_the_backtest() -> None:
    """The public one-bar entry point (``ContinuousRun.step``) gives the backtest's curve and events."""
    data = one_stretch(700, seed=5, stretches=2)
    params = EnvParams()
    res = backtest_sessions(data, "random", EX, params, chain=True, seed=3)
    from rltrader.evaluate.backtest import make_policy

    core = EnvCore(data, EX, params, 1)
    run = ContinuousRun(core, chain=True, repeat=False, events=16)
    pol = make_policy("random", params.mode, seed=3)
    while not run.done[0]:
        run.step(np.array([0]), np.asarray(pol(core.window, core.state, core.mask), np.int64))
    per = res.equity.filter(pl.col("symbol") != "ALL")["equity"].to_numpy()
    assert np.array_equal(run.run.curve_eq, per)  # one symbol, stretches in time order: the same rows
    assert np.array_equal(run.log.events(), res.events)
