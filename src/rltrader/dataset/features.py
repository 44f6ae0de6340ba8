"""Causal features from stored bars, as polars expressions.

Two layers, kept apart on purpose:

- ``indicator_exprs``: the classic indicators in their textbook units (RSI 0–100, EMA in price, …). These are
  what the test compares with the ``ta`` package, so a formula slip cannot hide behind normalisation.
- ``feature_exprs``: what the models see: scale-free transforms of the indicators (distances, ratios,
  z-scores over trailing windows), comparable across symbols and price levels.

Causality: every expression only looks backwards (``shift`` with positive lags, trailing rolling windows,
``adjust=False`` EWMs), and everything runs ``.over("segment")`` where a segment is a stretch of bars without a
missing bar. A gap therefore restarts every window: no feature value mixes bars from both sides of a gap, and
the warm-up rows after a gap are null (sessions never use a null row). Statistics that need more than a
trailing window (the standardisation the sessions stage applies) are fitted on the train split only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from rltrader.config import FeatureSettings
from rltrader.data.schema import interval_us

SEGMENT = "segment"


@dataclass(frozen=True)
class FeatureSpec:
    """The feature list for a parameter set, in column order (the order of the float32 matrix)."""

    names: tuple[str, ...]
    warmup: int
    """Bars after a segment start before every feature is defined (the longest look-back)."""


def segments(time: pl.Expr, interval: str) -> pl.Expr:
    """Segment id per bar: increments wherever the previous bar is not exactly one interval earlier."""
    step = interval_us(interval)
    jump = (time.dt.epoch("us").diff() != step).fill_null(True)
    return jump.cast(pl.Int32).cum_sum()


def _ema(x: pl.Expr, span: int) -> pl.Expr:
    # pandas ewm(span, adjust=False, min_periods=span): recursive from the first value, defined after span bars
    return x.ewm_mean(span=span, adjust=False, min_samples=span)


def _wilder(x: pl.Expr, n: int, idx: pl.Expr) -> pl.Expr:
    """Wilder's smoothing seeded with the simple mean of the first ``n`` values (ATR's definition).

    Written as one EWM: the seed replaces value ``n-1``, earlier values are dropped, so the recursion
    ``s_t = s_{t-1}·(1-1/n) + x_t/n`` starts from the seed exactly as the textbook loop does.
    """
    seeded = pl.when(idx == n - 1).then(x.rolling_mean(n)).when(idx >= n).then(x).otherwise(None)
    return seeded.ewm_mean(alpha=1.0 / n, adjust=False, ignore_nulls=True)


def indicator_exprs(p: FeatureSettings) -> dict[str, pl.Expr]:
    """Raw indicators, per segment (the caller applies ``.over(SEGMENT)``). Units as their authors defined them."""
    close, high, low = pl.col("close"), pl.col("high"), pl.col("low")
    idx = pl.int_range(pl.len())
    diff = close.diff().fill_null(0.0)
    up = pl.when(diff > 0).then(diff).otherwise(0.0)
    down = pl.when(diff < 0).then(-diff).otherwise(0.0)
    ema_up = up.ewm_mean(alpha=1.0 / p.rsi, adjust=False, min_samples=p.rsi)
    ema_down = down.ewm_mean(alpha=1.0 / p.rsi, adjust=False, min_samples=p.rsi)
    fast, slow, signal = p.macd
    macd = _ema(close, fast) - _ema(close, slow)
    # the signal EMA starts at the first defined MACD value, as pandas does with leading NaNs
    macd_signal = macd.ewm_mean(span=signal, adjust=False, min_samples=signal, ignore_nulls=True)
    mavg = close.rolling_mean(p.bollinger)
    mstd = close.rolling_std(p.bollinger, ddof=0)
    hband, lband = mavg + p.bollinger_dev * mstd, mavg - p.bollinger_dev * mstd
    prev_close = close.shift(1)
    true_range = pl.max_horizontal(high, prev_close) - pl.min_horizontal(low, prev_close)
    out: dict[str, pl.Expr] = {
        "rsi": pl.when(ema_down == 0).then(100.0).otherwise(100.0 - 100.0 / (1.0 + ema_up / ema_down))
        .fill_nan(None).alias("rsi"),
        "macd": macd,
        "macd_signal": macd_signal,
        "macd_hist": macd - macd_signal,
        "bb_mavg": mavg,
        "bb_pband": pl.when(hband != lband).then((close - lband) / (hband - lband)).otherwise(None),
        "bb_wband": (hband - lband) / mavg * 100.0,
        "atr": _wilder(true_range, p.atr, idx),
    }
    # RSI is undefined until both EWMs are (ta keeps the 100 of an all-zero start only after min_periods)
    out["rsi"] = pl.when(ema_up.is_null()).then(None).otherwise(out["rsi"]).alias("rsi")
    for n in p.ema:
        out[f"ema_{n}"] = _ema(close, n)
    return out


def _zscore(x: pl.Expr, window: int) -> pl.Expr:
    mean, std = x.rolling_mean(window), x.rolling_std(window)
    # a flat window (std 0) scores 0; the warm-up (std null) stays null
    return pl.when(std.is_null()).then(None).when(std > 0).then((x - mean) / std).otherwise(0.0)


def feature_exprs(p: FeatureSettings) -> dict[str, pl.Expr]:
    """Model inputs: scale-free, causal transforms of the indicators and bars (per segment)."""
    ind = indicator_exprs(p)
    close = pl.col("close")
    log_close = close.log()
    ret1 = log_close.diff()
    feats: dict[str, pl.Expr] = {}
    for h in p.return_horizons:
        feats[f"ret_{h}"] = log_close - log_close.shift(h)
    feats["rsi"] = (ind["rsi"] - 50.0) / 50.0
    for n in p.ema:
        feats[f"ema_dist_{n}"] = close / ind[f"ema_{n}"] - 1.0
    for name in ("macd", "macd_signal", "macd_hist"):
        feats[name] = ind[name] / close
    feats["bb_pctb"] = ind["bb_pband"]
    feats["bb_width"] = ind["bb_wband"] / 100.0
    feats["atr"] = ind["atr"] / close
    for w in p.volatility:
        feats[f"rv_{w}"] = ret1.rolling_std(w)
    feats["volume_z"] = _zscore(pl.col("volume").log1p(), p.zscore_window)
    feats["trades_z"] = _zscore(pl.col("trades").cast(pl.Float64).log1p(), p.zscore_window)
    vol = pl.col("volume")
    feats["taker_buy"] = pl.when(vol > 0).then(pl.col("taker_buy_volume") / vol).otherwise(0.5)
    return feats


def calendar_exprs() -> dict[str, pl.Expr]:
    """Time-of-day and day-of-week on the unit circle (known in advance, so not part of any window)."""
    t = pl.col("open_time")
    minute = t.dt.hour().cast(pl.Float64) * 60 + t.dt.minute().cast(pl.Float64)
    day = t.dt.weekday().cast(pl.Float64) - 1 + minute / 1440.0
    return {
        "tod_sin": (minute * (2 * math.pi / 1440)).sin(),
        "tod_cos": (minute * (2 * math.pi / 1440)).cos(),
        "dow_sin": (day * (2 * math.pi / 7)).sin(),
        "dow_cos": (day * (2 * math.pi / 7)).cos(),
    }


def feature_spec(p: FeatureSettings) -> FeatureSpec:
    names = (*feature_exprs(p), *calendar_exprs())
    _fast, slow, signal = p.macd
    warmup = max(max(p.return_horizons), p.rsi, max(p.ema), slow + signal - 1, p.bollinger, p.atr,
                 max(p.volatility) + 1, p.zscore_window)
    return FeatureSpec(names=tuple(names), warmup=warmup)


def compute_indicators(bars: pl.DataFrame, p: FeatureSettings, interval: str) -> pl.DataFrame:
    """Raw indicators for one symbol's bars (sorted by ``open_time``), per gap-free segment."""
    return (bars.lazy().sort("open_time")
            .with_columns(segments(pl.col("open_time"), interval).alias(SEGMENT))
            .with_columns([e.over(SEGMENT).alias(k) for k, e in indicator_exprs(p).items()])
            .collect())


def compute_features(bars: pl.DataFrame, p: FeatureSettings, interval: str) -> pl.DataFrame:
    """Features for one symbol's bars: ``open_time``, OHLCV, ``segment``, ``valid`` and float32 feature columns.

    ``valid`` is true where every feature is defined (past the warm-up of the bar's segment); a NaN/inf from
    degenerate input (zero prices) is turned into null so it can never reach a model silently.
    """
    spec = feature_spec(p)
    feats = {**feature_exprs(p), **calendar_exprs()}
    df = (bars.lazy().sort("open_time")
          .with_columns(segments(pl.col("open_time"), interval).alias(SEGMENT))
          .with_columns([e.over(SEGMENT).alias(k) for k, e in feats.items()])
          .with_columns([pl.when(pl.col(k).is_finite()).then(pl.col(k)).otherwise(None).cast(pl.Float32).alias(k)
                         for k in spec.names])
          .with_columns(pl.all_horizontal([pl.col(k).is_not_null() for k in spec.names]).alias("valid"))
          .select("open_time", "open", "high", "low", "close", "volume", SEGMENT, "valid", *spec.names))
    return df.collect()
