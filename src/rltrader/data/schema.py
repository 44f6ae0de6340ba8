"""Canonical in-memory shapes of market data.

Every source (archive zips, CSV dumps, REST, websocket) is normalised into these polars schemas before
it reaches a store, so stores, validation and features only ever see one layout. Timestamps are
``Datetime("us", "UTC")`` because that is exactly PostgreSQL's ``timestamptz`` resolution and Binance's
finest (spot files switched to microseconds in 2025).
"""

from __future__ import annotations

import re
from datetime import timedelta

import polars as pl

from rltrader.market import Market as Market  # re-exported: the data layer's callers import it from here

TS = pl.Datetime("us", "UTC")

KLINE_KEY = ("market", "symbol", "interval", "open_time")
AGG_TRADE_KEY = ("market", "symbol", "agg_trade_id")

KLINE_SCHEMA: dict[str, pl.DataType] = {
    "market": pl.String(),
    "symbol": pl.String(),
    "interval": pl.String(),
    "open_time": TS,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "close_time": TS,
    "quote_volume": pl.Float64(),
    "trades": pl.Int64(),
    "taker_buy_volume": pl.Float64(),
    "taker_buy_quote_volume": pl.Float64(),
}

AGG_TRADE_SCHEMA: dict[str, pl.DataType] = {
    "market": pl.String(),
    "symbol": pl.String(),
    "agg_trade_id": pl.Int64(),
    "price": pl.Float64(),
    "quantity": pl.Float64(),
    "first_trade_id": pl.Int64(),
    "last_trade_id": pl.Int64(),
    "transact_time": TS,
    "is_buyer_maker": pl.Boolean(),
    "is_best_match": pl.Boolean(),
}

# Bars aggregated from trades (5 s live bars, 1 m roll-ups). ``trades`` = number of aggregate trades.
BAR_SCHEMA: dict[str, pl.DataType] = {
    "market": pl.String(),
    "symbol": pl.String(),
    "bucket": TS,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "quote_volume": pl.Float64(),
    "trades": pl.Int64(),
    "taker_buy_volume": pl.Float64(),
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "line": pl.Int64(),
    "reason": pl.String(),
    "raw": pl.String(),
    "quarantined_at": TS,
}

_INTERVAL_RE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def interval_to_timedelta(interval: str) -> timedelta:
    """Length of a Binance kline interval such as ``1m``, ``5s`` or ``4h`` (``1M`` months are not fixed)."""
    m = _INTERVAL_RE.match(interval)
    if not m:
        raise ValueError(f"interval {interval!r} is not a fixed-length Binance interval like 1s, 1m, 4h, 1d")
    return timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def interval_us(interval: str) -> int:
    """Interval length in microseconds, the unit of our timestamps."""
    return int(interval_to_timedelta(interval) / timedelta(microseconds=1))


# Binance epochs are ms, or µs where asked for (spot's MICROSECOND mode, spot archive files since 2025).
# A ms epoch stays below this until the year 5138, a µs epoch has been above it since 1973.
US_THRESHOLD = 10**14


def epoch_to_us(v: int) -> int:
    """A Binance epoch in ms or µs → µs (our resolution)."""
    return v if v >= US_THRESHOLD else v * 1000


def close_time_us(v: int) -> int:
    """A kline close time (ms or µs) at ms resolution, so every source agrees (µs sources write ...59.999999)."""
    return epoch_to_us(v) // 1000 * 1000


def empty_klines() -> pl.DataFrame:
    return pl.DataFrame(schema=KLINE_SCHEMA)


def empty_agg_trades() -> pl.DataFrame:
    return pl.DataFrame(schema=AGG_TRADE_SCHEMA)


def empty_bars() -> pl.DataFrame:
    return pl.DataFrame(schema=BAR_SCHEMA)
