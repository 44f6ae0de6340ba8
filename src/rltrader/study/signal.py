"""What the study measures about a forecast: plain numpy, no model knowledge.

- Information coefficient: Pearson and rank (Spearman, average ranks for ties) correlation of forecast and
  realised target. Its 95 % interval comes from a circular block bootstrap over DAYS (blocks of round(√days) days):
  overlapping forward returns and volatility clusters make neighbouring bars far from independent, so an i.i.d.
  interval would be several times too narrow. The rank interval resamples the global ranks (not re-ranked).
- Hit rate: how often the forecast's sign is the realised return's sign (zeros left out).
- Deciles: forecast decile → mean realised return, the shape a tradable signal must show (monotone, and the
  outer deciles beyond the cost).
- Threshold strategy: trade in the forecast's direction when ``|forecast| > k × round-trip cost``; its gross edge
  per trade is ``mean(sign(f) · r)``, which is also its break-even round-trip cost. Its interval resamples days
  too: only when the LOWER end clears the cost is the edge more than a few lucky days.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from rltrader.evaluate.metrics import circular_block_indices

CI_LEVEL = 0.95


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / den if den > 0 else math.nan


def ranks(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = pl.Series(x).rank("average").to_numpy().astype(np.float64)
    return out


def rank_ic(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def bootstrap_corr_ci(x: np.ndarray, y: np.ndarray, day: np.ndarray, n_samples: int, seed: int = 0
                      ) -> tuple[float, float]:
    """95 % circular block bootstrap interval of ``pearson(x, y)``, resampling whole days (per-day sums)."""
    if n_samples <= 0 or len(x) < 3:
        return math.nan, math.nan
    _, d = np.unique(day, return_inverse=True)
    nd = int(d.max()) + 1
    sums = np.stack([np.bincount(d, weights=w, minlength=nd)
                     for w in (np.ones_like(x), x, y, x * x, y * y, x * y)])  # (6, days)
    idx = circular_block_indices(nd, n_samples, seed)
    s = sums[:, idx].sum(axis=2)  # (6, samples)
    n, sx, sy, sxx, syy, sxy = s
    cov = sxy - sx * sy / n
    var = (sxx - sx * sx / n) * (syy - sy * sy / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(var > 0, cov / np.sqrt(np.maximum(var, 1e-300)), np.nan)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return math.nan, math.nan
    a = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(r, [a, 100 - a])
    return float(lo), float(hi)


def hit_rate(f: np.ndarray, r: np.ndarray) -> float:
    m = (f != 0) & (r != 0)
    return float(np.mean(np.sign(f[m]) == np.sign(r[m]))) if m.any() else math.nan


def deciles(f: np.ndarray, r: np.ndarray, n: int = 10) -> list[dict[str, float]]:
    """Forecast quantile bins → count, mean forecast and mean realised return (both in the caller's units)."""
    if len(f) < n:
        return []
    edges = np.quantile(f, np.linspace(0, 1, n + 1))
    b = np.clip(np.searchsorted(edges, f, side="right") - 1, 0, n - 1)
    out = []
    for k in range(n):
        m = b == k
        out.append({"decile": k + 1, "n": int(m.sum()), "forecast": float(f[m].mean()) if m.any() else math.nan,
                    "realised": float(r[m].mean()) if m.any() else math.nan})
    return out


def bootstrap_mean_ci(v: np.ndarray, day: np.ndarray, n_samples: int, seed: int = 0) -> tuple[float, float]:
    """95 % circular block bootstrap interval of ``mean(v)`` resampling whole days: a handful of lucky days can
    carry a threshold strategy's average, and this interval shows it."""
    if n_samples <= 0 or len(v) < 2:
        return math.nan, math.nan
    _, d = np.unique(day, return_inverse=True)
    nd = int(d.max()) + 1
    total, count = np.bincount(d, weights=v, minlength=nd), np.bincount(d, minlength=nd).astype(np.float64)
    idx = circular_block_indices(nd, n_samples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = total[idx].sum(axis=1) / count[idx].sum(axis=1)
    means = means[np.isfinite(means)]
    if len(means) == 0:
        return math.nan, math.nan
    a = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a])
    return float(lo), float(hi)


def threshold_table(f_ret: np.ndarray, r: np.ndarray, cost: np.ndarray, day: np.ndarray,
                    ks: Sequence[float], bootstrap: int = 0, seed: int = 0) -> list[dict[str, float]]:
    """Per k: trades (|f| > k × cost), trades per day, gross (with its day-block interval) and net mean per trade
    (fractions of notional)."""
    n_days = max(1, len(np.unique(day)))
    out = []
    for k in ks:
        m = np.abs(f_ret) > k * cost
        n = int(m.sum())
        pnl = np.sign(f_ret[m]) * r[m]
        gross = float(np.mean(pnl)) if n else math.nan
        lo, hi = bootstrap_mean_ci(pnl, day[m], bootstrap, seed) if n else (math.nan, math.nan)
        c = float(cost[m].mean()) if n else float(np.nanmean(cost)) if len(cost) else math.nan
        out.append({"k": float(k), "trades": n, "trades_per_day": n / n_days, "gross": gross, "gross_lo": lo,
                    "gross_hi": hi, "cost": c, "net": gross - c if n else math.nan,
                    "hit_rate": hit_rate(f_ret[m], r[m]) if n else math.nan})
    return out


def choose_threshold(rows: Sequence[dict[str, float]], min_trades: int) -> dict[str, float] | None:
    """The k with the largest total net result (``trades × net``) among those with ``min_trades`` trades."""
    ok = [r for r in rows if r["trades"] >= min_trades and math.isfinite(r["net"])]
    return max(ok, key=lambda r: r["trades"] * r["net"]) if ok else None


def evaluate_forecast(f: np.ndarray, y: np.ndarray, f_ret: np.ndarray, r: np.ndarray, cost: np.ndarray,
                      day: np.ndarray, *, ks: Sequence[float], bootstrap: int, seed: int) -> dict[str, Any]:
    """All measurements of one forecast on one set of rows. ``f``/``y``: normalised forecast and target (IC);
    ``f_ret``/``r``: the same in return units (costs, deciles)."""
    ic = pearson(f, y)
    ric = rank_ic(f, y)
    lo, hi = bootstrap_corr_ci(f, y, day, bootstrap, seed)
    rlo, rhi = bootstrap_corr_ci(ranks(f), ranks(y), day, bootstrap, seed)
    return {"n": len(f), "days": len(np.unique(day)), "ic": ic, "ic_lo": lo, "ic_hi": hi, "rank_ic": ric,
            "rank_ic_lo": rlo, "rank_ic_hi": rhi, "hit_rate": hit_rate(f, r),
            "mean_abs_forecast": float(np.mean(np.abs(f_ret))) if len(f_ret) else math.nan,
            "cost": float(np.mean(cost)) if len(cost) else math.nan,
            "thresholds": threshold_table(f_ret, r, cost, day, ks, bootstrap, seed), "deciles": deciles(f_ret, r)}
