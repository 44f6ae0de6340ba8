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

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Final

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


def _wilder(x: pl.Expr, n: int, idx: pl.Expr, seed: pl.Expr | None = None) -> pl.Expr:
    """Wilder's smoothing seeded with the simple mean of the first ``n`` values (ATR's definition).

    Written as one EWM: the seed replaces value ``n-1``, earlier values are dropped, so the recursion
    ``s_t = s_{t-1}·(1-1/n) + x_t/n`` starts from the seed exactly as the textbook loop does. ``seed`` is
    ``x.rolling_mean(n)`` (passed in when the caller has it as a column already).
    """
    seed = x.rolling_mean(n) if seed is None else seed
    seeded = pl.when(idx == n - 1).then(seed).when(idx >= n).then(x).otherwise(None)
    return seeded.ewm_mean(alpha=1.0 / n, adjust=False, ignore_nulls=True)


# The formulas, each written once as a function of its inputs. ``indicator_exprs`` / ``feature_exprs`` nest them
# into self-contained expressions (for ``.over``); ``_feature_stages`` feeds them materialised columns so every
# shared intermediate (log close, EWMs, rolling moments) is computed once. Same operations in the same order, so
# both give bit-identical values.
def _up_down(diff: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    return pl.when(diff > 0).then(diff).otherwise(0.0), pl.when(diff < 0).then(-diff).otherwise(0.0)


def _rsi_ewm(x: pl.Expr, p: FeatureSettings) -> pl.Expr:
    return x.ewm_mean(alpha=1.0 / p.rsi, adjust=False, min_samples=p.rsi)


def _rsi(ema_up: pl.Expr, ema_down: pl.Expr) -> pl.Expr:
    rsi = (pl.when(ema_down == 0).then(100.0).otherwise(100.0 - 100.0 / (1.0 + ema_up / ema_down))
           .fill_nan(None))
    # RSI is undefined until both EWMs are (ta keeps the 100 of an all-zero start only after min_periods)
    return pl.when(ema_up.is_null()).then(None).otherwise(rsi)


def _macd_signal(macd: pl.Expr, p: FeatureSettings) -> pl.Expr:
    # the signal EMA starts at the first defined MACD value, as pandas does with leading NaNs
    return macd.ewm_mean(span=p.macd[2], adjust=False, min_samples=p.macd[2], ignore_nulls=True)


def _bands(mavg: pl.Expr, mstd: pl.Expr, p: FeatureSettings) -> tuple[pl.Expr, pl.Expr]:
    return mavg + p.bollinger_dev * mstd, mavg - p.bollinger_dev * mstd


def _pband(close: pl.Expr, hband: pl.Expr, lband: pl.Expr) -> pl.Expr:
    return pl.when(hband != lband).then((close - lband) / (hband - lband)).otherwise(None)


def _wband(hband: pl.Expr, lband: pl.Expr, mavg: pl.Expr) -> pl.Expr:
    return (hband - lband) / mavg * 100.0


def _true_range(high: pl.Expr, low: pl.Expr, prev_close: pl.Expr) -> pl.Expr:
    return pl.max_horizontal(high, prev_close) - pl.min_horizontal(low, prev_close)


def indicator_exprs(p: FeatureSettings) -> dict[str, pl.Expr]:
    """Raw indicators, per segment (the caller applies ``.over(SEGMENT)``). Units as their authors defined them."""
    close, high, low = pl.col("close"), pl.col("high"), pl.col("low")
    idx = pl.int_range(pl.len())
    up, down = _up_down(close.diff().fill_null(0.0))
    fast, slow, _signal = p.macd
    macd = _ema(close, fast) - _ema(close, slow)
    macd_signal = _macd_signal(macd, p)
    mavg = close.rolling_mean(p.bollinger)
    mstd = close.rolling_std(p.bollinger, ddof=0)
    hband, lband = _bands(mavg, mstd, p)
    out: dict[str, pl.Expr] = {
        "rsi": _rsi(_rsi_ewm(up, p), _rsi_ewm(down, p)).alias("rsi"),
        "macd": macd,
        "macd_signal": macd_signal,
        "macd_hist": macd - macd_signal,
        "bb_mavg": mavg,
        "bb_pband": _pband(close, hband, lband),
        "bb_wband": _wband(hband, lband, mavg),
        "atr": _wilder(_true_range(high, low, close.shift(1)), p.atr, idx),
    }
    for n in p.ema:
        out[f"ema_{n}"] = _ema(close, n)
    return out


def _zscore(x: pl.Expr, window: int, mean: pl.Expr | None = None, std: pl.Expr | None = None) -> pl.Expr:
    mean = x.rolling_mean(window) if mean is None else mean
    std = x.rolling_std(window) if std is None else std
    # a flat window (std 0) scores 0; the warm-up (std null) stays null
    return pl.when(std.is_null()).then(None).when(std > 0).then((x - mean) / std).otherwise(0.0)


def _taker_buy() -> pl.Expr:
    vol = pl.col("volume")
    return pl.when(vol > 0).then(pl.col("taker_buy_volume") / vol).otherwise(0.5)


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
    feats["taker_buy"] = _taker_buy()
    return feats


def _feature_stages(p: FeatureSettings) -> list[dict[str, pl.Expr]]:
    """``feature_exprs`` as layers of columns: each layer only reads the bars and earlier layers' columns.

    Why: nested inside one ``.over`` per feature, polars recomputes every shared input (the log close six times,
    each EMA twice, the Bollinger moments twice, each z-score's rolling std three times) and partitions the frame
    once per feature. Materialised once per segment, the same operations run once. Temporary columns start
    with ``_`` and are dropped by the caller.
    """
    c = pl.col
    close = c("close")
    fast, slow, _signal = p.macd
    emas = sorted({*p.ema, fast, slow})
    s1: dict[str, pl.Expr] = {
        "_lc": close.log(), "_d": close.diff().fill_null(0.0), "_pc": close.shift(1),
        "_vl": c("volume").log1p(), "_tl": c("trades").cast(pl.Float64).log1p(), "_idx": pl.int_range(pl.len()),
    }
    up, down = _up_down(c("_d"))
    s2: dict[str, pl.Expr] = {
        "_up": up, "_down": down, "_r1": c("_lc").diff(), "_tr": _true_range(c("high"), c("low"), c("_pc")),
        "_mavg": close.rolling_mean(p.bollinger), "_mstd": close.rolling_std(p.bollinger, ddof=0),
        **{f"_ema{n}": _ema(close, n) for n in emas},
        **{f"_{x}m": c(f"_{x}").rolling_mean(p.zscore_window) for x in ("vl", "tl")},
        **{f"_{x}s": c(f"_{x}").rolling_std(p.zscore_window) for x in ("vl", "tl")},
        **{f"ret_{h}": c("_lc") - c("_lc").shift(h) for h in p.return_horizons},
    }
    hband, lband = _bands(c("_mavg"), c("_mstd"), p)
    s3: dict[str, pl.Expr] = {
        "_eu": _rsi_ewm(c("_up"), p), "_ed": _rsi_ewm(c("_down"), p), "_macd": c(f"_ema{fast}") - c(f"_ema{slow}"),
        "_hb": hband, "_lb": lband, "_trm": c("_tr").rolling_mean(p.atr),
        **{f"rv_{w}": c("_r1").rolling_std(w) for w in p.volatility},
        "volume_z": _zscore(c("_vl"), p.zscore_window, c("_vlm"), c("_vls")),
        "trades_z": _zscore(c("_tl"), p.zscore_window, c("_tlm"), c("_tls")),
        "taker_buy": _taker_buy(),
        **{f"ema_dist_{n}": close / c(f"_ema{n}") - 1.0 for n in p.ema},
    }
    s4: dict[str, pl.Expr] = {
        "_rsi": _rsi(c("_eu"), c("_ed")), "_sig": _macd_signal(c("_macd"), p),
        "_atr": _wilder(c("_tr"), p.atr, c("_idx"), c("_trm")),
        "bb_pctb": _pband(close, c("_hb"), c("_lb")), "_wb": _wband(c("_hb"), c("_lb"), c("_mavg")),
    }
    s5: dict[str, pl.Expr] = {
        "rsi": (c("_rsi") - 50.0) / 50.0, "macd": c("_macd") / close, "macd_signal": c("_sig") / close,
        "macd_hist": (c("_macd") - c("_sig")) / close, "bb_width": c("_wb") / 100.0, "atr": c("_atr") / close,
    }
    return [s1, s2, s3, s4, s5]


def calendar_exprs() -> dict[str, pl.Expr]:
    """Time-of-day and day-of-week on the unit circle (known in advance, so not part of any window).

    Minute of day and weekday come from integer arithmetic on the UTC epoch (1970-01-01 was a Thursday): the
    same whole numbers as ``dt.hour() * 60 + dt.minute()`` and ``dt.weekday() - 1``, without the time-zone
    machinery those go through.
    """
    t = pl.col("open_time").dt.epoch("us")
    minute = ((t // 60_000_000) % 1440).cast(pl.Float64)
    day = ((t // 86_400_000_000 + 3) % 7).cast(pl.Float64) + minute / 1440.0
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
            .collect(engine=ENGINE))


ENGINE: Final = "in-memory"
"""Polars' engine for the feature queries. Not the default (``auto`` → streaming in polars 2): the streaming
engine's rolling kernels round differently (a rolling mean can move by one ulp), and the features' values are
pinned to the in-memory kernels' (the ``over`` windows always ran on them)."""

MAX_SLICED_SEGMENTS = 64
"""Up to this many segments the features are computed on each segment's slice (no window partitioning);
above it, one ``.over(SEGMENT)`` pass per layer (gappy data: one small query per segment would cost more)."""


_WEEK_MIN = 7 * 1440
_MONDAY_MIN = 4 * 1440  # 1970-01-05, the first Monday of the epoch, in minutes


@functools.cache
def _calendar_table() -> pl.DataFrame:
    """``calendar_exprs`` (as float32) at every minute of a week, starting Monday 00:00 UTC."""
    t = pl.Series("open_time", (_MONDAY_MIN + pl.int_range(_WEEK_MIN, eager=True)) * 60_000_000)
    frame = pl.DataFrame(t.cast(pl.Datetime("us", "UTC")))
    return (frame.lazy().select([e.alias(k) for k, e in calendar_exprs().items()])
            .select([_finite_f32(k) for k in calendar_exprs()]).collect(engine=ENGINE))


def _calendar(time: pl.Series) -> pl.DataFrame:
    """The calendar columns of ``time``, looked up by minute of the week: the calendar features only depend on
    it, so 10 080 sines and cosines (once per process) replace four per bar, with the very same values."""
    minutes = time.dt.epoch("us") // 60_000_000
    if time.len() and (minutes.min() or 0) < _MONDAY_MIN:  # type: ignore[operator]  # before it: compute
        return time.to_frame().lazy().select([e.alias(k) for k, e in calendar_exprs().items()]).select(
            [_finite_f32(k) for k in calendar_exprs()]).collect(engine=ENGINE)
    idx = (minutes - _MONDAY_MIN) % _WEEK_MIN
    return _calendar_table().select(pl.all().gather(idx))


def _finite_f32(name: str) -> pl.Expr:
    col = pl.col(name)
    return pl.when(col.is_finite()).then(col).otherwise(None).cast(pl.Float32).alias(name)


def compute_features(bars: pl.DataFrame, p: FeatureSettings, interval: str) -> pl.DataFrame:
    """Features for one symbol's bars: ``open_time``, OHLCV, ``segment``, ``valid`` and float32 feature columns.

    ``valid`` is true where every feature is defined (past the warm-up of the bar's segment); a NaN/inf from
    degenerate input (zero prices) is turned into null so it can never reach a model silently.

    Each gap-free segment is a zero-copy slice run through the layers of :func:`_feature_stages` (the same
    values as ``feature_exprs(p)[k].over(SEGMENT)``, without partitioning the frame once per feature); the
    slices' queries run together in polars' thread pool.
    """
    spec = feature_spec(p)
    cal = calendar_exprs()
    windowed = spec.names[:-len(cal)]
    lf = bars.lazy().select("open_time", "open", "high", "low", "close", "volume", "trades", "taker_buy_volume")
    if not bars["open_time"].is_sorted():  # stores return sorted bars: skip the sort's copy then
        lf = lf.sort("open_time")
    df = lf.with_columns(segments(pl.col("open_time"), interval).alias(SEGMENT)).collect(engine=ENGINE)
    stages = _feature_stages(p)
    seg = df[SEGMENT]
    n_seg = int(seg[-1]) if df.height else 0
    if n_seg <= MAX_SLICED_SEGMENTS:
        bounds = [0, *(seg.diff().fill_null(0) != 0).arg_true().to_list(), df.height]
        queries = []
        for lo, hi in itertools.pairwise(bounds):
            lf = df.slice(lo, hi - lo).lazy()
            for stage in stages:
                lf = lf.with_columns([e.alias(k) for k, e in stage.items()])
            queries.append(lf.select([_finite_f32(k) for k in windowed]))  # float32 per slice: half the memory
        feats = pl.concat(pl.collect_all(queries, engine=ENGINE))
        lf = pl.concat([df, feats], how="horizontal").lazy()
    else:
        lf = df.lazy()
        for stage in stages:
            lf = lf.with_columns([e.over(SEGMENT).alias(k) for k, e in stage.items()])
        lf = lf.with_columns([_finite_f32(k) for k in windowed])
    out = (pl.concat([lf.collect(engine=ENGINE), _calendar(df["open_time"])], how="horizontal").lazy()
           .with_columns(pl.all_horizontal([pl.col(k).is_not_null() for k in spec.names]).alias("valid"))
           .select("open_time", "open", "high", "low", "close", "volume", SEGMENT, "valid", *spec.names))
    return out.collect(engine=ENGINE)
