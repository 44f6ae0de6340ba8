"""Backtest metrics on hand-computable curves, their uncertainty, the verdict table and walk-forward arithmetic."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from rltrader.evaluate.metrics import (
    METRIC_NAMES,
    aggregate_folds,
    block_bootstrap,
    combined_equity,
    comparison_table,
    compute_metrics,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    walk_forward_folds,
)

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def curve(values: list[float] | np.ndarray, *, step: timedelta = timedelta(days=1), start: datetime = T0,
          symbol: str = "BTCUSDT", position: list[float] | np.ndarray | None = None,
          fees: list[float] | np.ndarray | None = None) -> pl.DataFrame:
    """Equity rows per the metrics contract; daily bars stamped at 23:59 so each bar is one UTC day."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    first = start + (timedelta(hours=23, minutes=59) if step >= timedelta(days=1) else timedelta(0))
    return pl.DataFrame({
        "time": pl.Series([first + i * step for i in range(n)], dtype=pl.Datetime("us", "UTC")),
        "symbol": [symbol] * n,
        "equity": v,
        "position": np.ones(n) if position is None else np.asarray(position, dtype=np.float64),
        "price": np.full(n, 100.0),
        "fees": np.zeros(n) if fees is None else np.asarray(fees, dtype=np.float64),
    })


def trades_frame(pnl: list[float], *, side: list[int] | None = None, entry: list[float] | None = None,
                 exit_: list[float] | None = None, qty: list[float] | None = None) -> pl.DataFrame:
    n = len(pnl)
    side = side or [1] * n
    entry = entry or [100.0] * n
    exit_ = exit_ or [101.0] * n
    qty = qty or [1.0] * n
    return pl.DataFrame({
        "symbol": ["BTCUSDT"] * n,
        "entry_time": pl.Series([T0 + timedelta(hours=i) for i in range(n)], dtype=pl.Datetime("us", "UTC")),
        "exit_time": pl.Series([T0 + timedelta(hours=i, minutes=30) for i in range(n)],
                               dtype=pl.Datetime("us", "UTC")),
        "side": side, "qty": qty, "entry_price": entry, "exit_price": exit_, "pnl": pnl,
        "fees": [0.1] * n, "notional": [q * e for q, e in zip(qty, entry, strict=True)],
    })


def noisy(n_days: int, seed: int = 0, drift: float = 0.001, vol: float = 0.01) -> pl.DataFrame:
    r = np.random.default_rng(seed).normal(drift, vol, n_days)
    return curve(1000.0 * np.cumprod(1 + r))


# ------------------------------------------------------------------------------------------------ hand-computed
def test_constant_growth_known_return_no_drawdown() -> None:
    eq = 100.0 * 1.01 ** np.arange(1, 11)
    m = compute_metrics(curve(eq), None, initial_cash=100.0, bootstrap=0)
    assert set(m) == set(METRIC_NAMES)
    assert m["total_return"] == pytest.approx(1.01**10 - 1)
    assert m["final_balance_change_pct"] == pytest.approx(100 * (1.01**10 - 1))
    assert m["max_drawdown"] == 0.0
    assert m["annualized_return"] == pytest.approx(0.01 * 365)
    assert m["profit_days_pct"] == 100.0
    assert m["n_days"] == 10 and m["bars_per_year"] == pytest.approx(365)
    # no variation and no fall: the ratios are undefined, not huge numbers from float noise
    assert math.isnan(m["sharpe_daily_annualized"]) and math.isnan(m["sortino"]) and math.isnan(m["calmar"])


def test_known_drawdown_and_calmar() -> None:
    eq = [120.0, 90.0, 110.0, 130.0]
    m = compute_metrics(curve(eq), None, initial_cash=100.0, bootstrap=0)
    assert m["max_drawdown"] == pytest.approx(0.25)  # 120 → 90
    daily = np.array([1.2, 0.75, 110 / 90, 130 / 110]) - 1
    assert m["annualized_return"] == pytest.approx(daily.mean() * 365)
    assert m["calmar"] == pytest.approx(daily.mean() * 365 / 0.25)
    assert m["total_return"] == pytest.approx(0.3)


def test_drawdown_from_initial_cash() -> None:
    m = compute_metrics(curve([80.0, 90.0]), None, initial_cash=100.0, bootstrap=0)
    assert m["max_drawdown"] == pytest.approx(0.2)


def test_sharpe_daily_and_minute_annualization() -> None:
    daily = np.array([0.01, -0.005, 0.02, 0.0, -0.01, 0.015])
    m = compute_metrics(curve(100 * np.cumprod(1 + daily)), None, initial_cash=100.0, bootstrap=0)
    assert m["sharpe_daily_annualized"] == pytest.approx(daily.mean() / daily.std(ddof=1) * math.sqrt(365))
    # minute bars: per-bar returns × √525600
    bar_r = np.random.default_rng(3).normal(0.0, 1e-3, 3 * 1440)
    eq = 1000 * np.cumprod(1 + bar_r)
    mm = compute_metrics(curve(eq, step=timedelta(minutes=1)), None, initial_cash=1000.0, bootstrap=0)
    assert mm["bars_per_year"] == pytest.approx(525_600)
    assert mm["n_days"] == 3 and mm["n_bars"] == 3 * 1440
    assert mm["sharpe_minute_annualized"] == pytest.approx(bar_r.mean() / bar_r.std(ddof=1) * math.sqrt(525_600))


def test_sortino() -> None:
    up_only = np.array([0.01, 0.02, 0.005])
    m = compute_metrics(curve(100 * np.cumprod(1 + up_only)), None, initial_cash=100.0, bootstrap=0)
    assert math.isnan(m["sortino"])  # no down day: infinite ratio, reported as undefined
    daily = np.array([0.02, -0.01, 0.03, -0.02])
    m = compute_metrics(curve(100 * np.cumprod(1 + daily)), None, initial_cash=100.0, bootstrap=0)
    downside = math.sqrt((0.01**2 + 0.02**2) / 4)
    assert m["sortino"] == pytest.approx(daily.mean() / downside * math.sqrt(365))


def test_profit_days_and_day_boundaries() -> None:
    # hourly bars over 4 UTC days: day closes 110, 105, 105, 120 → up, down, flat, up
    closes = [110.0, 105.0, 105.0, 120.0]
    values = np.repeat(closes, 24)
    m = compute_metrics(curve(values, step=timedelta(hours=1)), None, initial_cash=100.0, bootstrap=0)
    assert m["n_days"] == 4
    assert m["profit_days_pct"] == pytest.approx(50.0)
    assert m["bars_per_year"] == pytest.approx(365 * 24)


def test_trade_metrics() -> None:
    tr = trades_frame([10.0, -5.0, 3.0, 0.0], side=[1, -1, 1, -1], entry=[100.0, 100.0, 50.0, 200.0],
                      exit_=[110.0, 102.0, 52.0, 190.0], qty=[1.0, 2.0, 1.0, 0.5])
    eq = curve([100.0, 110.0], fees=[0.2, 0.4])
    m = compute_metrics(eq, tr, initial_cash=100.0, bootstrap=0)
    assert m["win_rate"] == pytest.approx(0.5)
    assert m["n_trades"] == 4 and m["trades_per_day"] == pytest.approx(2.0)
    assert m["avg_trade_size"] == pytest.approx((100 + 200 + 50 + 100) / 4)
    assert m["avg_trade_pnl"] == pytest.approx(2.0)
    # direction from prices: long up ✓, short up ✗, long up ✓, short down ✓
    assert m["direction_accuracy"] == pytest.approx(0.75)
    traded = 1 * 210 + 2 * 202 + 1 * 102 + 0.5 * 390
    assert m["turnover"] == pytest.approx(traded / 105.0 / 2)
    assert m["fees_paid"] == pytest.approx(0.4)  # cumulative fees from the equity curve
    pred = pl.DataFrame({"correct": [True, False, True, None]})
    assert compute_metrics(eq, tr, initial_cash=100.0, predictions=pred, bootstrap=0)["direction_accuracy"] == \
        pytest.approx(2 / 3)


def test_exposure_and_multi_symbol_combination() -> None:
    a = curve([100.0, 101.0, 102.0, 103.0], symbol="BTCUSDT", position=[0, 0, 0, 0])
    b = curve([100.0, 99.0, 98.0, 97.0], symbol="ETHUSDT", position=[0, 1, -1, 0], fees=[0, 1, 2, 2])
    both = pl.concat([a, b])
    comb = combined_equity(both)
    assert comb["equity"].to_list() == [200.0, 200.0, 200.0, 200.0]
    assert comb["exposed"].to_list() == [False, True, True, False]
    m = compute_metrics(both, None, initial_cash=200.0, bootstrap=0)
    assert m["exposure"] == pytest.approx(0.5)
    assert m["fees_paid"] == pytest.approx(2.0)
    assert m["total_return"] == 0.0
    # an explicit ALL curve wins; exposure still comes from the per-symbol rows
    all_rows = curve([200.0, 202.0, 204.0, 206.0], symbol="ALL", position=[0, 0, 0, 0], fees=[0, 1, 2, 3])
    m2 = compute_metrics(pl.concat([both, all_rows]), None, initial_cash=200.0, bootstrap=0)
    assert m2["total_return"] == pytest.approx(0.03)
    assert m2["exposure"] == pytest.approx(0.5)
    assert m2["fees_paid"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------------- uncertainty
def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    eq = noisy(120, seed=1)
    m1 = compute_metrics(eq, None, initial_cash=1000.0, bootstrap=500, seed=7)
    m2 = compute_metrics(eq, None, initial_cash=1000.0, bootstrap=500, seed=7)
    m3 = compute_metrics(eq, None, initial_cash=1000.0, bootstrap=500, seed=8)
    assert m1["sharpe_ci_low"] < m1["sharpe_daily_annualized"] < m1["sharpe_ci_high"]
    assert m1["return_ci_low"] < m1["total_return"] < m1["return_ci_high"]
    assert m1 == m2
    assert m3["sharpe_ci_low"] != m1["sharpe_ci_low"]
    assert m1["bootstrap_block_days"] == round(math.sqrt(120))


def test_block_bootstrap_keeps_blocks() -> None:
    daily = np.arange(1, 17, dtype=np.float64) / 1000  # block length 4: each resample is runs of consecutive days
    sh, tot = block_bootstrap(daily, 50, seed=0)
    assert sh.shape == (50,) and tot.shape == (50,)
    assert np.all(np.isfinite(sh))
    # with block = n and circular wrap, every resample is a rotation: the total return never changes
    _, tot_full = block_bootstrap(daily, 20, seed=0, block=16)
    assert np.allclose(tot_full, np.prod(1 + daily) - 1)


def test_deflated_sharpe_decreases_with_trials_and_is_a_probability() -> None:
    r = np.random.default_rng(5).normal(0.002, 0.01, 200)
    vals = [deflated_sharpe_ratio(r, n) for n in (1, 2, 5, 10, 100, 1000)]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert all(a > b for a, b in itertools.pairwise(vals))
    m = compute_metrics(curve(1000 * np.cumprod(1 + r)), None, initial_cash=1000.0, n_trials=1, bootstrap=0)
    assert m["deflated_sharpe"] == pytest.approx(m["probabilistic_sharpe"])
    assert m["probabilistic_sharpe"] > 0.5  # positive Sharpe → better than a coin flip that it is > 0
    m50 = compute_metrics(curve(1000 * np.cumprod(1 + r)), None, initial_cash=1000.0, n_trials=50, bootstrap=0)
    assert m50["deflated_sharpe"] < m["deflated_sharpe"]


def test_psr_against_normal_formula() -> None:
    # normal-like returns: skew≈0, kurtosis≈3 → PSR ≈ Φ(SR·√(T−1)/√(1 + SR²/2)) with the sample moments
    r = np.random.default_rng(2).normal(0.001, 0.01, 500)
    sr = r.mean() / r.std(ddof=1)
    z = (r - r.mean()) / r.std()
    skew, kurt = (z**3).mean(), (z**4).mean()
    expected = 0.5 * (1 + math.erf(sr * math.sqrt(499) / math.sqrt(1 - skew * sr + (kurt - 1) / 4 * sr**2)
                                   / math.sqrt(2)))
    assert deflated_sharpe_ratio(r, 1) == pytest.approx(expected, rel=1e-9)
    assert expected_max_sharpe(1, 1.0) == 0.0
    assert 0 < expected_max_sharpe(10, 1.0) < expected_max_sharpe(100, 1.0)


# ---------------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("trades", [None, "empty"])
def test_flat_equity_no_trades(trades: str | None) -> None:
    tr = pl.DataFrame() if trades == "empty" else None
    m = compute_metrics(curve([100.0] * 5, position=[0] * 5), tr, initial_cash=100.0)
    assert m["total_return"] == 0.0 and m["sharpe_daily_annualized"] == 0.0 and m["sortino"] == 0.0
    assert m["sharpe_minute_annualized"] == 0.0 and m["max_drawdown"] == 0.0 and m["calmar"] == 0.0
    assert m["trades_per_day"] == 0.0 and m["turnover"] == 0.0 and m["exposure"] == 0.0
    assert math.isnan(m["win_rate"]) and math.isnan(m["avg_trade_size"]) and math.isnan(m["direction_accuracy"])
    assert m["sharpe_ci_low"] == m["sharpe_ci_high"] == 0.0
    assert math.isnan(m["deflated_sharpe"])


def test_one_day_and_empty_and_wipeout() -> None:
    one = compute_metrics(curve([105.0]), None, initial_cash=100.0)
    assert one["total_return"] == pytest.approx(0.05)
    assert math.isnan(one["sharpe_daily_annualized"]) and math.isnan(one["sharpe_ci_low"])
    assert math.isnan(one["deflated_sharpe"])
    empty = compute_metrics(curve([]), pl.DataFrame(), initial_cash=100.0)
    assert empty["total_return"] == 0.0 and empty["n_bars"] == 0 and empty["sharpe_daily_annualized"] == 0.0
    wiped = compute_metrics(curve([50.0, 0.0, 0.0, 0.0]), None, initial_cash=100.0)
    assert wiped["total_return"] == -1.0 and wiped["max_drawdown"] == 1.0
    assert all(isinstance(v, float) for v in wiped.values())
    with pytest.raises(ValueError):
        compute_metrics(curve([1.0]), None, initial_cash=0.0)


# ---------------------------------------------------------------------------------------------------- comparison
def test_comparison_table_verdicts() -> None:
    results = {
        "buy_and_hold": {"sharpe_daily_annualized": 0.87, "total_return": 0.05},
        "flat": {"sharpe_daily_annualized": 0.0, "total_return": 0.0},
        "d3qn": {"sharpe_daily_annualized": 0.41, "total_return": 0.02},
        "ppo": {"sharpe_daily_annualized": 1.5, "total_return": 0.09, "sharpe_ci_low": 1.2, "sharpe_ci_high": 1.9},
        "lucky": {"sharpe_daily_annualized": 1.1, "sharpe_ci_low": -0.5, "sharpe_ci_high": 2.5},
        "broken": {"sharpe_daily_annualized": float("nan")},
    }
    rows, verdicts = comparison_table(results)
    assert [r["name"] for r in rows] == ["ppo", "lucky", "buy_and_hold", "d3qn", "flat", "broken"]
    assert {r["name"]: r["role"] for r in rows}["flat"] == "baseline"
    assert rows[0]["rank"] == 1.0
    text = "\n".join(verdicts)
    assert "d3qn does NOT beat buy_and_hold on sharpe_daily_annualized (0.41 vs 0.87) net of costs" in text
    assert "ppo beats all 2 baselines on sharpe_daily_annualized (1.5 vs best baseline buy_and_hold 0.87)" in text
    lucky = next(v for v in verdicts if v.startswith("lucky"))
    assert "NOT significant" in lucky
    assert "NOT significant" not in next(v for v in verdicts if v.startswith("ppo"))
    assert any(v.startswith("broken does NOT beat") for v in verdicts)
    assert len(verdicts) == 4  # one per agent
    _, v2 = comparison_table({"d3qn": {"total_return": 0.1}}, metric="total_return")
    assert "no claim" in v2[0]
    _, v3 = comparison_table({"x": {"total_return": 0.1}, "y": {"total_return": 0.2}}, baselines={"y"},
                             metric="total_return")
    assert v3 == ["x does NOT beat y on total_return (0.1 vs 0.2) net of costs."]
    _, v4 = comparison_table({"x": {"total_return": 0.3, "n_days": 7.0}, "y": {"total_return": 0.2}},
                             baselines={"y"}, metric="total_return")
    assert v4[0].startswith("x beats all 1 baselines") and "only 7 test days" in v4[0]


# -------------------------------------------------------------------------------------------------- walk-forward
def test_walk_forward_fold_arithmetic() -> None:
    folds = walk_forward_folds(date(2024, 1, 1), date(2024, 4, 1), train_days=30, test_days=14, step_days=14)
    assert len(folds) == 4  # last test must end by April 1st: tests end Feb 14, 28, Mar 13, 27
    for tr_s, tr_e, te_s, te_e in folds:
        assert tr_s < tr_e == te_s < te_e <= date(2024, 4, 1)
        assert (tr_e - tr_s).days == 30 and (te_e - te_s).days == 14
    for (_, _, _, prev_end), (_, _, nxt_start, _) in itertools.pairwise(folds):
        assert prev_end <= nxt_start  # test windows never overlap
    assert folds[0][0] == date(2024, 1, 1) and folds[1][0] == date(2024, 1, 15)
    anchored = walk_forward_folds(date(2024, 1, 1), date(2024, 4, 1), 30, 14, 14, expanding=True)
    assert [f[0] for f in anchored] == [date(2024, 1, 1)] * 4
    assert [f[2:] for f in anchored] == [f[2:] for f in folds]
    dt_folds = walk_forward_folds(T0, T0 + timedelta(days=10), 5, 2, 3)
    assert dt_folds[0] == (T0, T0 + timedelta(days=5), T0 + timedelta(days=5), T0 + timedelta(days=7))
    assert len(dt_folds) == 2
    assert walk_forward_folds(date(2024, 1, 1), date(2024, 1, 10), 30, 7, 7) == []
    with pytest.raises(ValueError):
        walk_forward_folds(date(2024, 1, 1), date(2024, 4, 1), 30, 14, 7)
    with pytest.raises(ValueError):
        walk_forward_folds(date(2024, 1, 1), date(2024, 4, 1), 0, 14, 14)


def test_aggregate_folds() -> None:
    agg = aggregate_folds([{"sharpe": 1.0, "ret": 0.1}, {"sharpe": 3.0, "ret": float("nan")},
                           {"sharpe": -1.0, "ret": -0.1}])
    assert agg["n_folds"] == 3
    assert agg["sharpe_mean"] == pytest.approx(1.0)
    assert agg["sharpe_std"] == pytest.approx(2.0)
    assert agg["sharpe_min"] == -1.0 and agg["sharpe_max"] == 3.0
    assert agg["ret_mean"] == pytest.approx(0.0) and agg["ret_min"] == -0.1
    one = aggregate_folds([{"x": 2.0, "y": float("nan")}])
    assert one["x_std"] == 0.0 and math.isnan(one["y_mean"])
    assert aggregate_folds([]) == {"n_folds": 0.0}
