"""Study rows from the ``features`` stage output: feature matrix, forward returns, splits and costs.

Timing follows the envs' contract (``rltrader.dataset.split``): features of bar ``t`` include its close, so the
order they inform fills at the open of bar ``t + 1 + execution.latency_bars`` (the entry) and a horizon-``h`` trade
exits at the open ``h`` bars later. The forward return is ``log(open[exit] / open[entry])`` — what a trade
could earn before costs, not a close-to-close return a market order could never get.

The target is that return divided by ``sigma_t · √h``, ``sigma_t`` the trailing standard deviation of 1-bar log
returns over ``study.vol_window`` bars (causal): a unit-free target whose size does not swing with the regime,
so a forecaster fitted on calm months is not dominated by a few wild ones. The forecast is turned back into a
return with the same factor before it is compared with costs.

A row belongs to a split when its decision time and its exit bar's open are both inside the split's date range:
no train target reads a price from val, which is what makes the val/test numbers out of sample. Entry and exit
must lie in the bar's own gap-free segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from rltrader.data.schema import interval_us
from rltrader.dataset.build import read_features
from rltrader.errors import ConfigError, DataError
from rltrader.execution import ExecutionParams, fill_price
from rltrader.utils import parse_day

DAY_US = 86_400_000_000


@dataclass
class StudyRows:
    """One row per (symbol, bar) kept for the study; targets per horizon (NaN where undefined)."""

    names: tuple[str, ...]
    x: np.ndarray
    """(N, F) float32 features."""
    symbol_id: np.ndarray
    time: np.ndarray
    """(N,) int64 µs, the decision bar's open time."""
    sigma: np.ndarray
    """(N,) trailing volatility of 1-bar log returns at the decision bar."""
    split_id: np.ndarray
    """(N,) int8 index into ``splits`` (the same row may be in a split for one horizon only: see ``fwd``)."""
    fwd: dict[int, np.ndarray]
    """horizon → (N,) forward log return entry → exit; NaN when entry/exit leave the segment or the split."""
    symbols: tuple[str, ...]
    splits: tuple[str, ...]
    cost: dict[str, dict[str, float]]
    """split → symbol → round-trip cost as a fraction of notional (fees and slippage of both legs)."""

    @property
    def day(self) -> np.ndarray:
        out: np.ndarray = self.time // DAY_US
        return out

    def target(self, h: int) -> np.ndarray:
        """Volatility-normalised forward return (NaN where undefined)."""
        out: np.ndarray = self.fwd[h] / (self.sigma * np.sqrt(h))
        return out

    def row_cost(self, split: str) -> np.ndarray:
        costs = np.array([self.cost.get(split, {}).get(s, np.nan) for s in self.symbols])
        out: np.ndarray = costs[self.symbol_id]
        return out


def split_ranges(settings: Any, names: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for n in names:
        if n not in settings.sessions.splits:
            raise ConfigError(f"study: split {n!r} is not one of sessions.splits "
                              f"({', '.join(settings.sessions.splits)})")
        r = settings.sessions.splits[n]
        out[n] = (parse_day(r.start, f"sessions.splits.{n}.start"), parse_day(r.end, f"sessions.splits.{n}.end"))
    return out


def round_trip_cost(execution: ExecutionParams, notional: float, price: float, volume: float) -> float:
    """Fees and slippage of opening and closing ``notional`` at a typical bar, through the execution kernel's own
    ``fill_price`` (so the study's cost is the one the envs and backtest charge, impact term included)."""
    xp = execution.to_array()  # Settings.execution is the kernel's own ExecutionParams
    qty = notional / price
    buy = fill_price(price, 1.0, qty, volume, xp) / price - 1.0
    sell = 1.0 - fill_price(price, -1.0, qty, volume, xp) / price
    return float(2.0 * execution.taker_fee + buy + sell)


def load_rows(settings: Any, features_dir: Path, symbols: list[str], splits: list[str], *,
              train_split: str, train_stride: int, eval_stride: int, horizons: list[int],
              vol_window: int) -> StudyRows:
    """Valid rows of ``splits`` (every ``train_stride``-th bar of ``train_split``, every ``eval_stride``-th of the
    others, on a fixed time grid), with forward returns per horizon."""
    ranges = split_ranges(settings, splits)
    latency = int(settings.execution.latency_bars)
    step = interval_us(settings.ingest.interval)
    notional = settings.execution.initial_cash * settings.env.position_size * settings.execution.leverage
    parts: list[dict[str, np.ndarray]] = []
    names: tuple[str, ...] | None = None
    cost: dict[str, dict[str, float]] = {s: {} for s in splits}
    for sym_id, sym in enumerate(symbols):
        frame, meta = read_features(features_dir, sym)
        these = tuple(meta["features"])
        if names is not None and these != names:
            raise DataError(f"{features_dir / (sym + '.parquet')}: feature columns differ from the other symbols' "
                            "(re-run `rltrader dataset features`)")
        names = these
        t = frame["open_time"].dt.epoch("us").to_numpy()
        seg = frame["segment"].to_numpy()
        logo = np.log(frame["open"].to_numpy().astype(np.float64))
        logc = np.log(frame["close"].to_numpy().astype(np.float64))
        r1 = np.diff(logc, prepend=np.nan)
        r1[1:][seg[1:] != seg[:-1]] = np.nan
        sigma = (pl.Series(r1).rolling_std(vol_window)).to_numpy()  # NaN inside a window that spans a gap
        n = len(t)
        split_id = np.full(n, -1, dtype=np.int8)
        for k, (name, (lo, hi)) in enumerate(ranges.items()):
            stride = train_stride if name == train_split else eval_stride
            in_split = (t >= lo) & (t < hi) & ((t // step) % stride == 0)
            split_id[in_split] = k
        keep = frame["valid"].to_numpy() & (split_id >= 0) & np.isfinite(sigma) & (sigma > 0)
        idx = np.flatnonzero(keep)
        fwd: dict[int, np.ndarray] = {}
        for h in horizons:
            entry, exit_ = idx + 1 + latency, idx + 1 + latency + h
            ok = exit_ < n
            e, x = np.minimum(entry, n - 1), np.minimum(exit_, n - 1)
            ok &= (seg[e] == seg[idx]) & (seg[x] == seg[idx])
            hi_of_split = np.array([hi for _, hi in ranges.values()])[split_id[idx]]
            ok &= t[x] < hi_of_split
            fwd[h] = np.where(ok, logo[x] - logo[e], np.nan)
        parts.append({"x": frame[list(names)][idx].to_numpy().astype(np.float32), "symbol_id":
                      np.full(len(idx), sym_id, dtype=np.int16), "time": t[idx], "sigma": sigma[idx],
                      "split_id": split_id[idx], **{f"fwd_{h}": fwd[h] for h in horizons}})
        price, vol = frame["close"].to_numpy(), frame["volume"].to_numpy()
        for k, name in enumerate(ranges):
            rows = idx[split_id[idx] == k]
            if len(rows):
                cost[name][sym] = round_trip_cost(settings.execution, notional, float(np.median(price[rows])),
                                                  float(np.median(vol[rows])))
    if names is None:
        raise ConfigError("study.symbols: no symbols to study")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return StudyRows(names=names, x=np.ascontiguousarray(cat["x"]), symbol_id=cat["symbol_id"], time=cat["time"],
                     sigma=cat["sigma"], split_id=cat["split_id"], fwd={h: cat[f"fwd_{h}"] for h in horizons},
                     symbols=tuple(symbols), splits=tuple(ranges), cost=cost)
