"""Backtest metrics with their uncertainty, the agent-vs-baselines verdict, and walk-forward fold arithmetic.

Why this module exists: a single headline return on one test period says little. Every number here is computed
net of costs from the backtest's own equity curve and trade list, the Sharpe ratio comes with a block-bootstrap
confidence interval and a deflated version that pays for the number of configurations tried, and the comparison
table states in plain words when an agent does not beat a baseline.

Input contract (what the backtest writes)
-----------------------------------------
``equity: pl.DataFrame`` — one row per bar and symbol:

=============  ==========================  ==============================================================
column         dtype                       meaning
=============  ==========================  ==============================================================
``time``       Datetime(µs, UTC)           bar close time; bars of one symbol are strictly increasing
``symbol``     Utf8                        market symbol, or ``"ALL"`` for the combined (portfolio) curve
``equity``     Float64                     account equity in quote currency, marked to market, net of costs
``position``   Float64                     signed position quantity after the bar (``+`` long, ``-`` short)
``price``      Float64                     mark price of the bar
``fees``       Float64                     cumulative fees paid up to and including the bar
=============  ==========================  ==============================================================

The *combined curve* is the ``"ALL"`` rows when present. Otherwise it is the single symbol's curve, or, with
several symbols and no ``"ALL"`` rows, the per-symbol equities (and fees) summed on the union of bar times after
forward-filling each symbol (times before every symbol has a bar are dropped). ``initial_cash`` is the starting
capital of the combined curve. A bar counts as *exposed* when any symbol's position is non-zero.

``trades: pl.DataFrame`` — one row per round trip: ``symbol`` (Utf8), ``entry_time``/``exit_time``
(Datetime µs UTC), ``side`` (``+1`` long / ``-1`` short), ``qty`` (> 0), ``entry_price``, ``exit_price``,
``pnl`` (quote, net of fees), ``fees`` (quote), ``notional`` (entry ``qty × entry_price``).

``predictions: pl.DataFrame | None`` — optional, a Boolean column ``correct`` per decision that took a side. Without
it, direction accuracy is the fraction of trades whose price moved in the traded direction (gross of fees).

Conventions
-----------
* Days are UTC calendar days. The daily return of day *d* is its last equity over the previous day's last equity
  (the first day over ``initial_cash``), so the compounded daily returns reproduce the total return exactly.
* ``sharpe_daily_annualized`` = mean / std (ddof 1) of daily returns × √365: crypto trades every calendar day, so
  a year has 365 daily returns, not 252. ``sharpe_minute_annualized`` = the same on per-bar returns × √(bars per
  year), bars per year = 365 days / median bar spacing (525 600 for 1-minute bars). Per-bar Sharpe is usually
  inflated by intraday autocorrelation; the daily one is the headline.
* ``sortino`` — daily, annualized with √365, downside deviation √mean(min(r, 0)²) against a 0 target.
* ``max_drawdown`` is a positive fraction of the running peak (0.2 = a 20 % fall), peak including
  ``initial_cash``. ``calmar`` = ``annualized_return`` / ``max_drawdown`` with the *arithmetic* annualized return
  mean(daily) × 365 (compounding a few test days to a year explodes).
* ``*_pct`` keys are percentages (0–100); ``win_rate``, ``direction_accuracy``, ``exposure`` are fractions.
* ``turnover`` = traded notional of both legs, Σ qty × (entry + exit price), / mean equity / number of days.
* Uncertainty: a circular block bootstrap (Politis & Romano 1992, a moving-block bootstrap that wraps around so
  every day is equally likely) over daily returns, block length round(√n_days), keeps the serial dependence of
  returns within a block; 95 % percentile intervals for the daily Sharpe and the total return. Deterministic for
  a ``seed``.
* ``deflated_sharpe`` (Bailey & López de Prado 2014) — the probability that the true per-day Sharpe exceeds the
  Sharpe the best of ``n_trials`` unskilled configurations would show by luck, corrected for skew and kurtosis of
  daily returns. ``n_trials = 1`` gives the probabilistic Sharpe ratio against 0 (``probabilistic_sharpe``).

Degenerate inputs never raise. Flat or empty equity gives 0 for returns, Sharpe, Sortino, drawdown and Calmar;
a ratio whose denominator vanishes while its numerator does not (one day, constant growth, no down days, no
drawdown) is NaN, meaning *undefined*, not zero. Averages over no trades (``win_rate``, ``avg_trade_size``,
``direction_accuracy``) are NaN; counts and sums over no trades (``trades_per_day``, ``turnover``, ``n_trades``)
are 0. Intervals and the deflated Sharpe are NaN when fewer than two days exist or returns do not vary.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from datetime import date, timedelta
from statistics import NormalDist
from typing import TypeVar

import numpy as np
import polars as pl

DAYS_PER_YEAR = 365
"""Crypto markets trade every calendar day."""
MINUTE_BARS_PER_YEAR = DAYS_PER_YEAR * 24 * 60
"""525 600: used when the bar spacing cannot be measured (fewer than two bars)."""
EULER_GAMMA = 0.5772156649015329
CI_LEVEL = 0.95
MIN_RELIABLE_DAYS = 30
"""Below this many test days a verdict carries a warning: daily Sharpe and its bootstrap interval are too noisy."""

SHARPE_ANNUALIZATION_NOTE = (
    "Sharpe ratios are annualized for markets that trade every day: sharpe_daily_annualized = mean/std of UTC "
    "daily returns × √365; sharpe_minute_annualized = mean/std of per-bar returns × √(bars per year), "
    "525 600 bars per year for 1-minute bars. Sortino uses daily returns × √365. All figures are net of fees, "
    "slippage and funding as simulated by the backtest."
)

METRIC_NAMES: tuple[str, ...] = (
    "total_return", "final_balance_change_pct", "annualized_return", "sharpe_daily_annualized",
    "sharpe_minute_annualized", "sortino", "max_drawdown", "calmar", "win_rate", "direction_accuracy",
    "profit_days_pct", "trades_per_day", "avg_trade_size", "avg_trade_pnl", "exposure", "turnover", "fees_paid",
    "sharpe_ci_low", "sharpe_ci_high", "return_ci_low", "return_ci_high", "probabilistic_sharpe", "deflated_sharpe",
    "n_trials", "n_days", "n_bars", "n_trades", "bars_per_year", "bootstrap_block_days",
)
"""Every key :func:`compute_metrics` returns, in report order."""

DEFAULT_BASELINES: frozenset[str] = frozenset({"flat", "buy_and_hold", "random", "sma_cross", "lowrider_rule"})
"""Names of the rule baselines (``rltrader.agents.baselines``); any other result is treated as an agent."""

TABLE_COLUMNS: tuple[str, ...] = (
    "total_return", "return_ci_low", "return_ci_high", "sharpe_daily_annualized", "sharpe_ci_low", "sharpe_ci_high",
    "deflated_sharpe", "sortino", "max_drawdown", "calmar", "win_rate", "profit_days_pct", "trades_per_day",
    "exposure", "fees_paid",
)

_CI_KEYS = {"sharpe_daily_annualized": ("sharpe_ci_low", "sharpe_ci_high"),
            "total_return": ("return_ci_low", "return_ci_high")}
_NORMAL = NormalDist()
_NAN = float("nan")


# --------------------------------------------------------------------------------------------------------- curves
def combined_equity(equity: pl.DataFrame) -> pl.DataFrame:
    """The portfolio curve (``time``, ``equity``, ``fees``, ``exposed``) sorted by time — see the module contract.

    Exposure is read from the per-symbol rows when they exist, because the ``"ALL"`` row's summed signed quantity
    across different assets has no meaning (a long and a short would cancel)."""
    empty = pl.DataFrame(schema={"time": pl.Datetime("us", "UTC"), "equity": pl.Float64, "fees": pl.Float64,
                                 "exposed": pl.Boolean})
    if equity.height == 0:
        return empty
    has_fees = "fees" in equity.columns
    has_pos = "position" in equity.columns
    df = equity.with_columns(
        pl.col("equity").cast(pl.Float64),
        (pl.col("fees").cast(pl.Float64) if has_fees else pl.lit(0.0)).fill_null(0.0).alias("fees"),
        ((pl.col("position").cast(pl.Float64).fill_null(0.0) != 0) if has_pos else pl.lit(False)).alias("exposed"),
    )
    per_symbol = df.filter(pl.col("symbol") != "ALL")
    syms = per_symbol["symbol"].unique().to_list()
    if "ALL" in df["symbol"]:
        curve = df.filter(pl.col("symbol") == "ALL").select("time", "equity", "fees", "exposed").sort("time")
        if per_symbol.height:
            exp = per_symbol.group_by("time").agg(pl.col("exposed").any().alias("_exp"))
            curve = (curve.join(exp, on="time", how="left")
                     .with_columns(pl.col("_exp").fill_null(pl.col("exposed")).alias("exposed")).drop("_exp"))
        return curve
    if len(syms) == 1:
        return df.select("time", "equity", "fees", "exposed").sort("time")
    wide = (df.select("time", "symbol", "equity", "fees", "exposed")
            .pivot(on="symbol", index="time", values=["equity", "fees", "exposed"], aggregate_function="last")
            .sort("time"))
    wide = wide.with_columns(pl.exclude("time").forward_fill()).drop_nulls()
    eq_cols = [c for c in wide.columns if c.startswith("equity_")]
    fee_cols = [c for c in wide.columns if c.startswith("fees_")]
    exp_cols = [c for c in wide.columns if c.startswith("exposed_")]
    return wide.select("time", pl.sum_horizontal(eq_cols).alias("equity"), pl.sum_horizontal(fee_cols).alias("fees"),
                       pl.any_horizontal(exp_cols).alias("exposed"))


def _chain_returns(values: np.ndarray, initial: float) -> np.ndarray:
    """Simple returns of ``values`` chained from ``initial``; 0 after the account is wiped out (nothing left)."""
    prev = np.concatenate([[initial], values[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(prev > 0, values / np.where(prev > 0, prev, 1.0) - 1.0, 0.0)
    return np.asarray(r, dtype=np.float64)


def daily_returns(curve: pl.DataFrame, initial_cash: float) -> np.ndarray:
    """UTC-day returns of a combined curve: each day's last equity over the previous day's (first: ``initial_cash``)."""
    if curve.height == 0:
        return np.zeros(0)
    eod = (curve.sort("time").group_by(pl.col("time").dt.truncate("1d").alias("day"), maintain_order=True)
           .agg(pl.col("equity").last()).sort("day"))
    return _chain_returns(eod["equity"].to_numpy().astype(np.float64), initial_cash)


def bars_per_year(times: pl.Series) -> float:
    """365 days over the median bar spacing; 525 600 (1-minute bars) when fewer than two distinct bars exist."""
    t = times.unique().sort().cast(pl.Int64).to_numpy()
    if len(t) < 2:
        return float(MINUTE_BARS_PER_YEAR)
    step_us = float(np.median(np.diff(t)))
    return DAYS_PER_YEAR * 86_400e6 / step_us if step_us > 0 else float(MINUTE_BARS_PER_YEAR)


def drawdown(values: np.ndarray, initial: float) -> np.ndarray:
    """Per-bar drawdown as a positive fraction of the running peak (peak includes ``initial``)."""
    if len(values) == 0:
        return np.zeros(0)
    peak = np.maximum.accumulate(np.concatenate([[initial], values]))[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(peak > 0, 1.0 - values / np.where(peak > 0, peak, 1.0), 0.0)
    return np.clip(np.asarray(dd, dtype=np.float64), 0.0, None)


# ----------------------------------------------------------------------------------------------------- statistics
def _is_flat(r: np.ndarray) -> bool:
    return len(r) == 0 or bool(np.all(r == 0))


def _std_vanishes(sd: float, mean: float) -> bool:
    """Float noise from dividing a geometric curve is ~1e-17; treat such a spread as zero so constant growth gives
    an undefined (NaN) Sharpe rather than 1e15."""
    return not sd > 1e-14 + 1e-9 * abs(mean)


def sharpe_ratio(returns: np.ndarray, periods_per_year: float) -> float:
    """mean / std (ddof 1) × √periods_per_year. 0 for no or all-zero returns; NaN when undefined (one return or
    no variation with a non-zero mean)."""
    r = np.asarray(returns, dtype=np.float64)
    if _is_flat(r):
        return 0.0
    if len(r) < 2:
        return _NAN
    mean, sd = float(r.mean()), float(r.std(ddof=1))
    if _std_vanishes(sd, mean):
        return _NAN
    return mean / sd * math.sqrt(periods_per_year)


def sortino_ratio(returns: np.ndarray, periods_per_year: float) -> float:
    """mean / downside deviation × √periods_per_year with a 0 target. 0 for flat returns; NaN with one return or
    no down periods (the ratio would be infinite)."""
    r = np.asarray(returns, dtype=np.float64)
    if _is_flat(r):
        return 0.0
    if len(r) < 2:
        return _NAN
    down = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    if down == 0:
        return _NAN
    return float(r.mean()) / down * math.sqrt(periods_per_year)


def expected_max_sharpe(n_trials: int, sharpe_variance: float) -> float:
    """Expected maximum of ``n_trials`` zero-mean Sharpe estimates with the given variance (Bailey & López de Prado
    2014, eq. of the 'false strategy theorem'); 0 for a single trial."""
    if n_trials <= 1:
        return 0.0
    n = float(n_trials)
    z = (1 - EULER_GAMMA) * _NORMAL.inv_cdf(1 - 1 / n) + EULER_GAMMA * _NORMAL.inv_cdf(1 - 1 / (n * math.e))
    return math.sqrt(max(sharpe_variance, 0.0)) * z


def deflated_sharpe_ratio(returns: np.ndarray, n_trials: int = 1, sharpe_variance: float | None = None) -> float:
    """P(true per-period Sharpe > best-of-``n_trials`` luck), corrected for skew and kurtosis (Bailey & López de
    Prado 2014):  Φ((SR − SR₀)·√(T−1) / √(1 − γ₃·SR + (γ₄−1)/4·SR²)).

    ``sharpe_variance`` is the variance of the per-period Sharpe ratios across the trials; when the trials' Sharpes
    are not known it defaults to the estimator's sampling variance under no skill, 1/(T−1) — i.e. the benchmark is
    what the luckiest of ``n_trials`` skill-less strategies would show on this many days. NaN when T < 2, returns do
    not vary, or the moment correction is not positive."""
    r = np.asarray(returns, dtype=np.float64)
    t = len(r)
    if t < 2:
        return _NAN
    mean, sd = float(r.mean()), float(r.std(ddof=1))
    if _std_vanishes(sd, mean):
        return _NAN
    sr = mean / sd
    z = (r - mean) / float(r.std(ddof=0))
    skew, kurt = float(np.mean(z**3)), float(np.mean(z**4))
    var = 1.0 / (t - 1) if sharpe_variance is None else sharpe_variance
    sr0 = expected_max_sharpe(n_trials, var)
    denom = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr * sr
    if not denom > 0:
        return _NAN
    return _NORMAL.cdf((sr - sr0) * math.sqrt(t - 1) / math.sqrt(denom))


def circular_block_indices(n: int, n_samples: int, seed: int = 0, block: int | None = None) -> np.ndarray:
    """``(n_samples, n)`` indices into ``n`` days for a circular block bootstrap: blocks of ``block`` consecutive
    days (default round(√n)) drawn with wrap-around until n are filled. Shared by the Sharpe/return intervals here
    and the study's IC intervals (``rltrader.study.signal``).

    Drawn by ``arch.bootstrap.CircularBlockBootstrap`` (a maintained implementation): given the same numpy Generator
    it draws exactly the indices the hand-written version here drew before (tests/test_stats.py)."""
    from arch.bootstrap import CircularBlockBootstrap

    b = block if block is not None else max(1, round(math.sqrt(n)))
    b = min(max(1, b), n)
    boot = CircularBlockBootstrap(b, np.arange(n), seed=np.random.default_rng(seed))
    idx: np.ndarray = np.stack([boot.index for _ in boot.bootstrap(n_samples)]).reshape(  # type: ignore[misc]
        n_samples, n)
    return idx


def block_bootstrap(daily: np.ndarray, n_samples: int, seed: int = 0,
                    block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Circular block bootstrap of daily returns → (annualized Sharpe, total return) per resample.

    Blocks of ``block`` consecutive days (default round(√n), the usual rate for the block length) are drawn with
    wrap-around until n days are filled, so short-range serial dependence (volatility clusters, multi-day trends)
    survives resampling — an i.i.d. bootstrap would understate the spread. Resamples whose Sharpe is undefined are
    NaN. The blocks come from :func:`circular_block_indices` (``arch.bootstrap.CircularBlockBootstrap``)."""
    r = np.asarray(daily, dtype=np.float64)
    n = len(r)
    if n == 0 or n_samples <= 0:
        return np.zeros(0), np.zeros(0)
    s = r[circular_block_indices(n, n_samples, seed, block)]
    total = np.prod(1.0 + s, axis=1) - 1.0
    if n < 2:
        return np.full(n_samples, 0.0 if r[0] == 0 else _NAN), total
    mean, sd = s.mean(axis=1), s.std(axis=1, ddof=1)
    flat = np.all(s == 0, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sh = np.where(sd > 1e-14 + 1e-9 * np.abs(mean), mean / sd * math.sqrt(DAYS_PER_YEAR), _NAN)
    sh = np.where(flat, 0.0, sh)
    return sh, total


def _ci(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0:
        return _NAN, _NAN
    a = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(finite, [a, 100 - a])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------------- metrics
def compute_metrics(equity: pl.DataFrame, trades: pl.DataFrame | None, *, initial_cash: float,
                    predictions: pl.DataFrame | None = None, n_trials: int = 1, bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """All metrics of one backtest (keys: :data:`METRIC_NAMES`), net of costs; see the module docstring for the
    input contract, the annualization and the value of each metric on degenerate input.

    ``n_trials`` is the number of configurations tried (hyper-parameter trials, agents, seeds) before this one was
    picked — it only lowers ``deflated_sharpe``. ``bootstrap`` resamples (0 disables the intervals)."""
    if not initial_cash > 0:
        raise ValueError(f"initial_cash must be positive, got {initial_cash}")
    curve = combined_equity(equity)
    eq = curve["equity"].to_numpy().astype(np.float64)
    n_bars = len(eq)
    final = float(eq[-1]) if n_bars else float(initial_cash)
    total_return = final / initial_cash - 1.0

    daily = daily_returns(curve, initial_cash)
    n_days = len(daily)
    bpy = bars_per_year(curve["time"]) if n_bars else float(MINUTE_BARS_PER_YEAR)
    bar_r = _chain_returns(eq, initial_cash)

    ann_return = float(daily.mean()) * DAYS_PER_YEAR if n_days else 0.0
    dd = drawdown(eq, initial_cash)
    mdd = float(dd.max()) if n_bars else 0.0
    calmar = ann_return / mdd if mdd > 0 else (0.0 if ann_return == 0 else _NAN)

    tr = trades if trades is not None else pl.DataFrame()
    n_trades = tr.height
    if n_trades:
        pnl = tr["pnl"].cast(pl.Float64).to_numpy()
        qty = np.abs(tr["qty"].cast(pl.Float64).to_numpy())
        entry = tr["entry_price"].cast(pl.Float64).to_numpy()
        exit_ = tr["exit_price"].cast(pl.Float64).to_numpy()
        side = np.sign(tr["side"].cast(pl.Float64).to_numpy())
        notional = (np.abs(tr["notional"].cast(pl.Float64).to_numpy()) if "notional" in tr.columns
                    else qty * entry)
        win_rate = float(np.mean(pnl > 0))
        avg_size = float(np.mean(notional))
        avg_pnl = float(np.mean(pnl))
        traded = float(np.sum(qty * (entry + exit_)))
        trade_dir = float(np.mean(side * (exit_ - entry) > 0))
        trade_fees = float(tr["fees"].cast(pl.Float64).sum()) if "fees" in tr.columns else 0.0
    else:
        win_rate = avg_size = avg_pnl = trade_dir = _NAN
        traded = trade_fees = 0.0

    direction = trade_dir
    if predictions is not None and "correct" in predictions.columns:
        c = predictions["correct"].drop_nulls()
        direction = float(c.cast(pl.Float64).mean()) if len(c) else _NAN  # type: ignore[arg-type]

    mean_eq = float(eq.mean()) if n_bars else float(initial_cash)
    turnover = (traded / mean_eq / n_days if mean_eq > 0 else _NAN) if n_days and traded else 0.0
    fees_paid = float(curve["fees"][-1]) if n_bars and "fees" in equity.columns else trade_fees

    sh_samples, ret_samples = block_bootstrap(daily, bootstrap, seed)
    s_lo, s_hi = _ci(sh_samples) if n_days >= 2 else (_NAN, _NAN)
    r_lo, r_hi = _ci(ret_samples) if n_days >= 2 else (_NAN, _NAN)

    return {
        "total_return": total_return,
        "final_balance_change_pct": 100.0 * total_return,
        "annualized_return": ann_return,
        "sharpe_daily_annualized": sharpe_ratio(daily, DAYS_PER_YEAR),
        "sharpe_minute_annualized": sharpe_ratio(bar_r, bpy),
        "sortino": sortino_ratio(daily, DAYS_PER_YEAR),
        "max_drawdown": mdd,
        "calmar": calmar,
        "win_rate": win_rate,
        "direction_accuracy": direction,
        "profit_days_pct": 100.0 * float(np.mean(daily > 0)) if n_days else 0.0,
        "trades_per_day": n_trades / n_days if n_days else 0.0,
        "avg_trade_size": avg_size,
        "avg_trade_pnl": avg_pnl,
        "exposure": float(curve["exposed"].mean()) if n_bars else 0.0,  # type: ignore[arg-type]
        "turnover": turnover,
        "fees_paid": fees_paid,
        "sharpe_ci_low": s_lo,
        "sharpe_ci_high": s_hi,
        "return_ci_low": r_lo,
        "return_ci_high": r_hi,
        "probabilistic_sharpe": deflated_sharpe_ratio(daily, 1),
        "deflated_sharpe": deflated_sharpe_ratio(daily, n_trials),
        "n_trials": float(n_trials),
        "n_days": float(n_days),
        "n_bars": float(n_bars),
        "n_trades": float(n_trades),
        "bars_per_year": bpy,
        "bootstrap_block_days": float(max(1, round(math.sqrt(n_days)))) if n_days else 0.0,
    }


# ---------------------------------------------------------------------------------------------------- comparison
def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


def _get(m: Mapping[str, float], key: str) -> float:
    v = m.get(key, _NAN)
    return float(v) if v is not None else _NAN


def comparison_table(results: Mapping[str, Mapping[str, float]], *, baselines: Collection[str] | None = None,
                     metric: str = "sharpe_daily_annualized", columns: Sequence[str] = TABLE_COLUMNS,
                     ) -> tuple[list[dict[str, str | float]], list[str]]:
    """Rank agents and baselines evaluated on the same data, and say plainly whether each agent beats each baseline.

    ``results`` maps a name to its :func:`compute_metrics` dict; names in ``baselines`` (default
    :data:`DEFAULT_BASELINES`) are baselines, every other name an agent. Rows (``name``, ``role``, ``rank`` and the
    ``columns``) are sorted by ``metric``, best first, NaN last. One verdict line per agent: an agent only "beats" a
    baseline with a strictly higher, finite ``metric``; a win that lies inside the agent's bootstrap interval is
    flagged as not significant, because a number that could be luck must not read as a result; fewer than
    :data:`MIN_RELIABLE_DAYS` test days (``n_days``) add a caution."""
    base_names = DEFAULT_BASELINES if baselines is None else frozenset(baselines)
    cols = list(dict.fromkeys([metric, *columns]))

    def key(name: str) -> tuple[int, float, str]:
        v = _get(results[name], metric)
        return (0, -v, name) if math.isfinite(v) else (1, 0.0, name)

    rows: list[dict[str, str | float]] = []
    for rank, name in enumerate(sorted(results, key=key), start=1):
        row: dict[str, str | float] = {"rank": float(rank), "name": name,
                                       "role": "baseline" if name in base_names else "agent"}
        row.update({c: _get(results[name], c) for c in cols})
        rows.append(row)

    agents = [n for n in results if n not in base_names]
    bases = [n for n in results if n in base_names]
    verdicts: list[str] = []
    if not agents:
        verdicts.append("No agent among the results: baselines only, nothing to judge.")
    for a in sorted(agents, key=key):
        x = _get(results[a], metric)
        if not bases:
            verdicts.append(f"{a}: no baseline was evaluated on the same data, so no claim can be made.")
            continue
        vals = {b: _get(results[b], metric) for b in bases}
        comparable = {b: v for b, v in vals.items() if math.isfinite(v)}
        if not math.isfinite(x):
            verdicts.append(f"{a} does NOT beat the baselines on {metric}: its value is undefined (nan) net of costs.")
            continue
        lost = sorted((b for b, v in comparable.items() if not x > v), key=lambda b: -comparable[b])
        missing = sorted(b for b in vals if b not in comparable)
        if lost:
            verdicts.append(f"{a} does NOT beat {', '.join(lost)} on {metric} "
                            f"({_fmt(x)} vs {', '.join(_fmt(comparable[b]) for b in lost)}) net of costs.")
        elif comparable:
            best = max(comparable, key=lambda b: comparable[b])
            line = (f"{a} beats all {len(comparable)} baselines on {metric} ({_fmt(x)} vs best baseline {best} "
                    f"{_fmt(comparable[best])}) net of costs")
            ci = _CI_KEYS.get(metric)
            if ci is not None:
                lo, hi = _get(results[a], ci[0]), _get(results[a], ci[1])
                if math.isfinite(lo) and lo <= comparable[best]:
                    line += (f"; NOT significant: {best}'s value lies inside {a}'s {int(CI_LEVEL * 100)}% "
                             f"bootstrap interval [{_fmt(lo)}, {_fmt(hi)}]")
            verdicts.append(line + ".")
        else:
            verdicts.append(f"{a} cannot be compared on {metric}: every baseline's value is undefined.")
        if missing and comparable:
            verdicts[-1] += f" ({', '.join(missing)}: undefined, not compared.)"
        days = _get(results[a], "n_days")
        if math.isfinite(days) and days < MIN_RELIABLE_DAYS:
            verdicts[-1] += f" Caution: only {int(days)} test days (< {MIN_RELIABLE_DAYS}); the comparison is noisy."
    return rows, verdicts


# -------------------------------------------------------------------------------------------------- walk-forward
D = TypeVar("D", bound=date)


def walk_forward_folds(start: D, end: D, train_days: int, test_days: int, step_days: int, *,
                       expanding: bool = False) -> list[tuple[D, D, D, D]]:
    """Rolling (or, with ``expanding``, anchored) train/test windows over ``[start, end)``.

    Each fold is ``(train_start, train_end, test_start, test_end)``, half-open, ``train_end == test_start``, so
    training always precedes its test. ``step_days >= test_days`` is required: overlapping test windows would
    count the same days in several folds and make the aggregate look more certain than it is. Only folds whose
    test window ends on or before ``end`` are returned (a truncated last test would not be comparable)."""
    if train_days <= 0 or test_days <= 0 or step_days <= 0:
        raise ValueError("train_days, test_days and step_days must be positive")
    if step_days < test_days:
        raise ValueError(f"step_days ({step_days}) < test_days ({test_days}) would overlap test windows")
    folds: list[tuple[D, D, D, D]] = []
    k = 0
    while True:
        train_start: D = start if expanding else start + timedelta(days=k * step_days)
        train_end: D = start + timedelta(days=k * step_days + train_days)
        test_end: D = train_end + timedelta(days=test_days)
        if test_end > end:
            break
        folds.append((train_start, train_end, train_end, test_end))
        k += 1
    return folds


def aggregate_folds(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{key}_mean``, ``{key}_std`` (ddof 1; 0 for one fold), ``{key}_min`` and ``{key}_max`` over folds for every
    metric key, ignoring NaN folds for that key (all-NaN → NaN), plus ``n_folds``. The minimum matters as much as
    the mean: one losing fold is what a live deployment may meet first."""
    out: dict[str, float] = {"n_folds": float(len(per_fold))}
    keys = list(dict.fromkeys(k for m in per_fold for k in m))
    for k in keys:
        v = np.array([_get(m, k) for m in per_fold], dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            out.update({f"{k}_mean": _NAN, f"{k}_std": _NAN, f"{k}_min": _NAN, f"{k}_max": _NAN})
            continue
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out[f"{k}_min"] = float(v.min())
        out[f"{k}_max"] = float(v.max())
    return out
