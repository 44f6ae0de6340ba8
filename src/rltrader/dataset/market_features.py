"""Features beyond one symbol's 1-minute bars: a market factor and higher timeframes. Both causal.

Why: at 1-minute bars a single symbol's own indicators carry little forecast power (the signal study,
``rltrader.study``, measures how little). Two sources the literature finds more promising are added here, each
switchable in ``params.yaml`` so the study's ablation can keep or drop it on out-of-sample evidence:

- **Market-wide** (``features.market``): the equal-weighted 1-bar log return of all ``ingest.symbols`` that have
  the bar (at least ``features.market_min_symbols`` of them, else undefined), summed over each return horizon
  (``mkt_ret_<h>``); each symbol's return minus the market's over the same horizon (``resid_ret_<h>``, a beta-1
  residual: what the symbol did on its own); and the market's realised volatility (``mkt_rv_<w>``). The market
  series restarts its windows at its own gaps exactly as a symbol's features do.
- **Multi-timeframe** (``features.timeframes``): each higher timeframe's bars are aggregated from COMPLETE groups
  of base bars (a group missing a bar is a gap there), and their features — 1-bar and ``tf_lookback``-bar
  returns, volatility, RSI, log distance to the rolling high/low of ``tf_lookback`` bars (4 days at 4 h) — become
  visible at the first base bar that opens after the higher bar closed. A 15 m bar ``[00:00, 00:15)`` is
  therefore seen from the 1 m bar opening at 00:15 on, never earlier, even though the 00:14 bar's close is the
  same instant: one bar of conservatism that no off-by-one can turn into look-ahead.

Every value at a bar depends only on bars at or before it (the property test in ``tests/test_market_features.py``
changes data after ``t`` and checks nothing at or before ``t`` moves, for every symbol).
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from rltrader.config import FeatureSettings
from rltrader.data.schema import interval_us
from rltrader.dataset.features import SEGMENT, FeatureSpec, compute_features, feature_spec, indicator_exprs, segments
from rltrader.errors import ConfigError

MARKET_RET = "mkt_r"
"""Internal column: the market's 1-bar log return."""


def _tf_prefix(tf: str) -> str:
    return f"tf{tf}_"


def market_names(p: FeatureSettings) -> list[str]:
    if not p.market:
        return []
    return ([f"mkt_ret_{h}" for h in p.return_horizons] + [f"resid_ret_{h}" for h in p.return_horizons]
            + [f"mkt_rv_{w}" for w in p.volatility])


def timeframe_names(p: FeatureSettings) -> list[str]:
    out: list[str] = []
    n = p.tf_lookback
    for tf in p.timeframes:
        pre = _tf_prefix(tf)
        out += [f"{pre}ret_1", f"{pre}ret_{n}", f"{pre}rv_{n}", f"{pre}rsi", f"{pre}hi_dist_{n}", f"{pre}lo_dist_{n}"]
    return out


def _tf_bars(tf: str, interval: str) -> tuple[int, int]:
    """(µs per higher bar, base bars per higher bar), or a ConfigError naming ``features.timeframes``."""
    try:
        tf_us, base_us = interval_us(tf), interval_us(interval)
    except Exception as exc:
        raise ConfigError(f"features.timeframes: {tf!r} is not an interval like 15m, 1h or 4h") from exc
    if tf_us % base_us or tf_us // base_us < 2:
        raise ConfigError(f"features.timeframes: {tf} is not a multiple (≥ 2×) of the bar interval {interval}")
    return tf_us, tf_us // base_us


def full_feature_spec(p: FeatureSettings, interval: str = "1m") -> FeatureSpec:
    """The base spec plus the market and timeframe columns the params switch on (in that order).

    ``warmup`` is an upper bound in base bars: a higher-timeframe feature needs ``max(tf_lookback + 1, rsi)``
    complete higher bars, and the first higher bar of a segment may be partial, and the last is seen one bar late.
    """
    base = feature_spec(p)
    warmup = base.warmup
    for tf in p.timeframes:
        _, n = _tf_bars(tf, interval)
        warmup = max(warmup, (max(p.tf_lookback + 1, p.rsi) + 2) * n)
    return FeatureSpec(names=(*base.names, *market_names(p), *timeframe_names(p)), warmup=warmup)


def _epoch(col: str = "open_time") -> pl.Expr:
    return pl.col(col).dt.epoch("us")


def market_frame(bars_by_symbol: Mapping[str, pl.DataFrame], p: FeatureSettings, interval: str) -> pl.DataFrame:
    """The market factor on the union of the symbols' bars: ``open_time``, ``mkt_r`` and the ``mkt_*`` features.

    A bar enters only where at least ``market_min_symbols`` symbols have both it and the bar before it (a return
    needs two bars); the market's own gaps restart its windows.
    """
    rets = []
    for bars in bars_by_symbol.values():
        r = (bars.lazy().sort("open_time").select("open_time", "close")
             .with_columns(segments(pl.col("open_time"), interval).alias(SEGMENT))
             .with_columns(pl.col("close").log().diff().over(SEGMENT).alias("r"))
             .filter(pl.col("r").is_finite())
             .select("open_time", "r"))
        rets.append(r)
    if not rets:
        return pl.DataFrame(schema={"open_time": pl.Datetime("us", "UTC"), MARKET_RET: pl.Float64})
    m = (pl.concat(rets).group_by("open_time").agg(pl.col("r").mean().alias(MARKET_RET), pl.len().alias("n"))
         .filter(pl.col("n") >= p.market_min_symbols).sort("open_time")
         .with_columns(segments(pl.col("open_time"), interval).alias(SEGMENT)))
    feats = {f"mkt_ret_{h}": pl.col(MARKET_RET).rolling_sum(h) for h in p.return_horizons}
    feats |= {f"mkt_rv_{w}": pl.col(MARKET_RET).rolling_std(w) for w in p.volatility}
    return (m.with_columns([e.over(SEGMENT).alias(k) for k, e in feats.items()])
            .select("open_time", MARKET_RET, *feats).collect())


def timeframe_frame(bars: pl.DataFrame, p: FeatureSettings, interval: str, tf: str) -> pl.DataFrame:
    """One symbol's ``tf`` features keyed by ``tf_key``: the open time (µs) of the higher bar they describe.

    A base bar opening at ``T`` reads the higher bar whose key is ``floor(T, tf) - tf`` (the last one closed).
    """
    tf_us, n = _tf_bars(tf, interval)
    pre, lb = _tf_prefix(tf), p.tf_lookback
    agg = (bars.lazy().sort("open_time")
           .with_columns((_epoch() // tf_us * tf_us).alias("tf_key"))
           .group_by("tf_key", maintain_order=True)
           .agg(pl.col("open").first(), pl.col("high").max(), pl.col("low").min(), pl.col("close").last(),
                pl.len().alias("n"))
           .filter(pl.col("n") == n).sort("tf_key")
           .with_columns(((pl.col("tf_key").diff() != tf_us).fill_null(True)).cast(pl.Int32).cum_sum()
                         .alias(SEGMENT)))
    lc = pl.col("close").log()
    ret1 = lc.diff()
    feats = {
        f"{pre}ret_1": ret1,
        f"{pre}ret_{lb}": lc - lc.shift(lb),
        f"{pre}rv_{lb}": ret1.rolling_std(lb),
        f"{pre}rsi": (indicator_exprs(p)["rsi"] - 50.0) / 50.0,
        f"{pre}hi_dist_{lb}": lc - pl.col("high").rolling_max(lb).log(),
        f"{pre}lo_dist_{lb}": lc - pl.col("low").rolling_min(lb).log(),
    }
    return (agg.with_columns([e.over(SEGMENT).alias(k) for k, e in feats.items()])
            .select("tf_key", *feats).collect())


def compute_all_features(bars_by_symbol: Mapping[str, pl.DataFrame], p: FeatureSettings,
                         interval: str) -> dict[str, pl.DataFrame]:
    """Per symbol: :func:`rltrader.dataset.features.compute_features` plus the switched-on market and timeframe
    columns, with ``valid`` re-derived over all of them (same column contract, more feature columns)."""
    spec = full_feature_spec(p, interval)
    extra = [*market_names(p), *timeframe_names(p)]
    if p.market and len(bars_by_symbol) < p.market_min_symbols:
        raise ConfigError(f"features.market: the market factor needs at least features.market_min_symbols = "
                          f"{p.market_min_symbols} symbols, ingest.symbols has {len(bars_by_symbol)} "
                          f"({', '.join(bars_by_symbol)}); add symbols or set features.market: false")
    market = market_frame(bars_by_symbol, p, interval) if p.market else None
    out: dict[str, pl.DataFrame] = {}
    for symbol, bars in bars_by_symbol.items():
        df = compute_features(bars, p, interval)
        if not extra:
            out[symbol] = df
            continue
        lf = df.lazy()
        for tf in p.timeframes:
            tf_us, _ = _tf_bars(tf, interval)
            tfx = timeframe_frame(bars, p, interval, tf).lazy()
            lf = (lf.with_columns((_epoch() // tf_us * tf_us - tf_us).alias("tf_key"))
                  .join(tfx, on="tf_key", how="left").drop("tf_key"))
        if market is not None:
            lf = lf.join(market.lazy(), on="open_time", how="left")
            lf = lf.with_columns([(pl.col(f"ret_{h}") - pl.col(f"mkt_ret_{h}")).alias(f"resid_ret_{h}")
                                  for h in p.return_horizons]).drop(MARKET_RET)
        out[symbol] = (lf.with_columns([pl.when(pl.col(k).is_finite()).then(pl.col(k)).otherwise(None)
                                        .cast(pl.Float32).alias(k) for k in extra])
                       .with_columns((pl.col("valid") & pl.all_horizontal([pl.col(k).is_not_null() for k in extra]))
                                     .alias("valid"))
                       .select("open_time", "open", "high", "low", "close", "volume", SEGMENT, "valid", *spec.names)
                       .sort("open_time").collect())
    return out
