"""The backtest's fast paths against the general ones: the quiet-bar loop of precomputed decisions against the
env's full step on every bar, and the result frames' numba passes against the vectorised definitions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import pytest

from rltrader.dataset.split import SessionSet
from rltrader.env import EnvParams, ExecutionParams
from rltrader.env.synthetic import synthetic_sessions
from rltrader.evaluate.backtest import BacktestFilters, backtest_sessions
from rltrader.evaluate.backtest import frames as frames_mod
from rltrader.evaluate.backtest.decisions import DAY_US
from rltrader.evaluate.backtest.frames import _combine, _day_ends, infer_bar_us

EX = ExecutionParams(tick_size=0.01, step_size=0.001, min_notional=5.0)
ALL = BacktestFilters(cooldown_bars=3, max_trades_per_day=6, stop_loss=0.004, take_profit=0.006)


def long_sets(n_symbols: int = 2, n: int = 3000, vol: float = 0.003, seed: int = 1, pieces: int = 3) -> SessionSet:
    """``n_symbols`` symbols of ``n`` bars, each cut into ``pieces`` gap-free stretches (a chained run crosses
    stretch ends), bar times 1 minute apart and ~one day long so the per-day filter resets."""
    d = synthetic_sessions(n_symbols=n_symbols, bars_per_symbol=n, length=10, volatility=vol, seed=seed)
    cuts = np.linspace(0, n, pieces + 1).astype(np.int64)
    st = np.concatenate([s * n + cuts[:-1] + d.context for s in range(n_symbols)])
    en = np.concatenate([s * n + cuts[1:] for s in range(n_symbols)])
    return replace(d, ctx_start=st - d.context, start=st, end=en, length=0)


def assert_same(fast: Any, slow: Any) -> None:
    assert "quiet bars" in fast.meta["path"] and "quiet bars" not in slow.meta["path"]
    for name in ("equity", "fills", "trades", "daily", "stretches"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.schema == b.schema and a.equals(b, null_equal=True), name
    assert fast.totals == slow.totals
    assert np.array_equal(fast.events, slow.events)


CASES = {
    "sma": ("sma_cross", EX, EnvParams(), None),
    "sma_filters": ("sma_cross", EX, EnvParams(), ALL),
    "bh_filters": ("buy_and_hold", EX, EnvParams(), ALL),
    "flat": ("flat", EX, EnvParams(), ALL),
    # funding every 8 h (bars at funding times are not quiet) and leverage 10 with a wide margin: liquidations
    "sma_funding_liquidation": ("sma_cross", replace(EX, funding_rate_8h=0.001, leverage=10.0,
                                                     maintenance_margin=0.08), EnvParams(),
                                BacktestFilters(cooldown_bars=3)),
    "sma_hold_every_vol": ("sma_cross", EX, EnvParams(min_hold_bars=4, decision_every=3, vol_target=0.001,
                                                       vol_lookback=20), ALL),
    "spot_sma": ("sma_cross", replace(EX, market="spot"), EnvParams(mode="spot_cycle"), ALL),
    "spot_bh": ("buy_and_hold", replace(EX, market="spot"), EnvParams(mode="spot_cycle", position_size=0.5),
                BacktestFilters(stop_loss=0.003, take_profit=0.003)),
}


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_quiet_bars_give_the_full_steps_run(case: str, chain: bool) -> None:
    policy, ex, params, flt = CASES[case]
    data = long_sets(vol=0.004 if "liquidation" in case else 0.003)
    fast = backtest_sessions(data, policy, ex, params, flt, chain=chain)
    slow = backtest_sessions(data, policy, ex, params, flt, chain=chain, fast=False)
    assert_same(fast, slow)
    if policy != "flat":
        assert fast.totals["fills"] > 10
    if case == "sma_funding_liquidation":
        assert fast.totals["liquidations"] > 0 and fast.totals["funding"] != 0.0
    if flt is not None and flt.stop_loss > 0 and policy != "flat":
        assert {"stop_loss", "take_profit"} & set(fast.trades["exit_reason"].drop_nulls().to_list())


def test_quiet_bars_not_used_with_latency_or_lowrider() -> None:
    data = long_sets(n=600)
    res = backtest_sessions(data, "sma_cross", replace(EX, latency_bars=1), EnvParams(), chain=True)
    assert "quiet" not in res.meta["path"]  # with latency the SMA runs stepped; flat keeps the every-bar loop
    flat = backtest_sessions(data, "flat", replace(EX, latency_bars=1), EnvParams(), chain=True)
    assert flat.meta["path"] == "vectorised decisions, one numba loop"
    low = backtest_sessions(data, "flat", replace(EX, market="spot"), EnvParams(mode="lowrider"), chain=True)
    assert low.meta["path"] == "vectorised decisions, one numba loop"


# ------------------------------------------------------------------------------------------ the result frames


def test_frames_sorted_rows_path_equals_stretch_order_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-overlapping stretches are written stretch by stretch; the general path sorts every row by (symbol,
    close time). Both must give the same frames."""
    data = long_sets(n_symbols=3, n=900)
    args = (data, "sma_cross", EX, EnvParams(), ALL)
    for chain in (True, False):
        direct = backtest_sessions(*args, chain=chain)
        with monkeypatch.context() as m:
            m.setattr(frames_mod, "_stretches_in_order", lambda *a: None)
            sorted_rows = backtest_sessions(*args, chain=chain)
        for name in ("equity", "fills", "trades", "daily", "stretches"):
            assert getattr(direct, name).equals(getattr(sorted_rows, name), null_equal=True), name


def test_overlapping_sessions_are_sorted_by_time() -> None:
    """Unchained sessions of one symbol that overlap in time (a sessions-stage split with stride < length): the
    per-symbol curve is sorted by time and the combined curve covers every distinct time once."""
    d = synthetic_sessions(n_symbols=2, bars_per_symbol=300, length=10, seed=2)
    st = np.concatenate([s * 300 + np.arange(d.context, 280, 5) for s in range(2)])
    data = replace(d, start=st, end=st + 10, ctx_start=st - d.context)
    res = backtest_sessions(data, "sma_cross", EX, EnvParams())
    per = res.equity.filter(pl.col("symbol") != "ALL")
    assert per.height == 10 * len(st)
    for _, g in per.group_by("symbol"):
        assert g["time"].is_sorted()
    allc = res.combined()
    assert allc["time"].is_sorted() and allc["time"].n_unique() == allc.height
    assert allc.height == per["time"].n_unique()


def combine_reference(per_t: np.ndarray, per_v: np.ndarray, bounds: np.ndarray, fill: float) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """Forward-fill each symbol's curve onto the sorted union of times and add them, symbol after symbol
    (``fill`` before a symbol's first row)."""
    t_all = np.unique(per_t)
    tot = np.zeros(len(t_all))
    for k in range(len(bounds) - 1):
        t, e = per_t[bounds[k]:bounds[k + 1]], per_v[bounds[k]:bounds[k + 1]]
        j = np.searchsorted(t, t_all, side="right") - 1
        tot += np.where(j >= 0, e[np.maximum(j, 0)], fill)
    return t_all, tot


def test_combine_merge_equals_forward_fill_and_sum() -> None:
    """The merge pass against the forward-fill-and-sum definition (equity, fees, gross exposure; the same bits),
    and its day ends against ``_day_ends`` over the merged times (negative times too: floor days)."""
    rng = np.random.default_rng(4)
    parts = [np.sort(rng.choice(500, size=n, replace=False)) for n in (40, 1, 120)]
    parts.append(np.repeat(np.sort(rng.choice(500, size=30, replace=False)), 2))  # repeated times (overlaps)
    per_t = (np.concatenate(parts).astype(np.int64) - 250) * (DAY_US // 7)  # ~71 days, some before the epoch
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    per_eq, per_fee, per_q, per_px = (rng.normal(size=len(per_t)) for _ in range(4))
    M = len(per_t)
    t_all, tot_eq, tot_fee, gross = np.empty(M, np.int64), np.empty(M), np.empty(M), np.empty(M)
    last = np.empty(M, np.int64)
    n, nd = _combine(per_t, per_eq, per_fee, per_q, per_px, bounds, 7.5, t_all, tot_eq, tot_fee, gross, last)
    want_t, want_eq = combine_reference(per_t, per_eq, bounds, 7.5)
    assert np.array_equal(t_all[:n], want_t)
    assert np.array_equal(tot_eq[:n], want_eq)  # the same additions in the same order: the same bits
    assert np.array_equal(tot_fee[:n], combine_reference(per_t, per_fee, bounds, 0.0)[1])
    assert np.array_equal(gross[:n], combine_reference(per_t, np.abs(per_q * per_px), bounds, 0.0)[1])
    want_last, seg = np.empty(n, np.int64), np.empty(n, np.int64)
    m = _day_ends(np.array([0, n], np.int64), t_all[:n], want_last, seg)
    assert 10 < nd == m and np.array_equal(last[:nd], want_last[:m])


def test_infer_bar_us() -> None:
    d = synthetic_sessions(n_symbols=2, bars_per_symbol=50, seed=1)
    assert infer_bar_us(d) == 60_000_000
    assert infer_bar_us(replace(d, time=d.time * 5)) == 300_000_000
    assert infer_bar_us(replace(d, time=np.zeros_like(d.time))) == 60_000_000  # no step: the 1-minute default


def test_env_reads_a_bars_block_in_place() -> None:
    """Price columns that are the rows of one (5, N) block (``continuous_split``'s layout) are the env's bars
    as is; separate columns are stacked into a copy. Same backtest either way."""
    from rltrader.env.core import EnvCore, bars_block

    d = long_sets(n_symbols=2, n=900)
    block = np.stack([d.open, d.high, d.low, d.close, d.volume])
    db = replace(d, open=block[0], high=block[1], low=block[2], close=block[3], volume=block[4])
    assert bars_block(db) is block and EnvCore(db, EX, EnvParams(), 2).bars is block
    copied = bars_block(d)
    assert copied is not block and np.array_equal(copied, block)
    swapped = replace(db, high=block[2], low=block[1])  # rows of the block, in the wrong order: a copy
    assert bars_block(swapped) is not block and np.array_equal(bars_block(swapped)[1], block[2])
    a = backtest_sessions(d, "sma_cross", EX, EnvParams(), ALL, chain=True)
    b = backtest_sessions(db, "sma_cross", EX, EnvParams(), ALL, chain=True)
    for name in ("equity", "fills", "trades", "daily", "stretches"):
        assert getattr(a, name).equals(getattr(b, name), null_equal=True), name
