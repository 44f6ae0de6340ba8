"""What a stored month of each kind must satisfy, as polars expressions (Parquet) and as SQL (PostgreSQL).

Three kinds of stored series (see :mod:`rltrader.data.store`):

- ``klines``: the rules every kline source is validated with on the way in (:func:`archive.kline_checks`);
- ``agg_trades``: the archive's aggTrades rules (:func:`archive.agg_trade_checks`: price > 0, quantity > 0,
  first <= last trade id, unique ids, inside the month), plus what only a whole stored series shows: in id
  order the trade times never go back and the trade-id ranges never overlap;
- ``bars`` (the stream's 5 s bars, :mod:`rltrader.data.bars`): on the width grid, unique, inside the month;
  a window with trades has OHLC with low <= open/close <= high, an empty window (``trades = 0``) has no prices
  and zero volumes; volumes >= 0 and the taker-buy volume within the volume.

One list per kind serves both stores, so "invalid" means the same thing wherever the month lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

from rltrader.data.archive import agg_trade_checks, kline_checks
from rltrader.data.schema import AGG_TRADE_SCHEMA, BAR_SCHEMA, KLINE_SCHEMA, interval_to_timedelta, interval_us
from rltrader.data.store import NULLABLE, NULLABLE_BARS

Rule = tuple[pl.Expr, str]  # (is the row bad, why); on frames whose time columns are epoch µs integers


@dataclass(frozen=True)
class Kind:
    """One kind of stored series: its store name, schema, key and time columns, PostgreSQL table."""

    name: str  # klines | agg_trades | bars: the Parquet folder and PostgreSQL ``series.kind``
    schema: dict[str, pl.DataType]
    key: str  # unique per series
    time: str  # decides the month
    ident: tuple[str, ...]  # series identity columns stored in each row
    pg_table: str
    nullable: frozenset[str]

    @property
    def values(self) -> list[str]:
        """Columns compared with a reference (everything but the identity and the key)."""
        return [c for c in self.schema if c not in (*self.ident, self.key)]

    @property
    def time_columns(self) -> list[str]:
        return [c for c, t in self.schema.items() if isinstance(t, pl.Datetime)]


KLINES = Kind("klines", KLINE_SCHEMA, "open_time", "open_time", ("market", "symbol", "interval"), "kline_data",
              frozenset(NULLABLE))
AGG_TRADES = Kind("agg_trades", AGG_TRADE_SCHEMA, "agg_trade_id", "transact_time", ("market", "symbol"),
                  "agg_trade_data", frozenset())
BARS = Kind("bars", BAR_SCHEMA, "bucket", "bucket", ("market", "symbol"), "bar_data", frozenset(NULLABLE_BARS))
KINDS = {k.name: k for k in (KLINES, AGG_TRADES, BARS)}


def _us_bounds(period: tuple[datetime, datetime]) -> tuple[int, int]:
    return int(period[0].timestamp() * 1_000_000), int(period[1].timestamp() * 1_000_000)


def row_rules(kind: Kind, interval: str, period: tuple[datetime, datetime]) -> list[Rule]:
    """(is_bad, why) per row of one stored month (``period`` = its [start, end)); frames sorted by the key.

    A rule that comes out null counts as broken (a required field missing), except where a rule says otherwise.
    """
    required = [c for c in kind.schema if c not in kind.nullable]
    nulls: Rule = (pl.any_horizontal([pl.col(c).is_null() for c in required]), "null in a required column")
    if kind is KLINES:
        return [nulls, *kline_checks(interval, period)]
    if kind is AGG_TRADES:
        return [
            nulls,
            *agg_trade_checks(period),
            ((pl.col("transact_time") < pl.col("transact_time").shift(1)).fill_null(False),
             "transact_time goes back while agg_trade_id increases"),
            ((pl.col("first_trade_id") <= pl.col("last_trade_id").shift(1)).fill_null(False),
             "trade ids overlap the previous aggregate trade"),
        ]
    lo, hi = _us_bounds(period)
    step = interval_us(interval)
    prices = ["open", "high", "low", "close"]
    volumes = ["volume", "quote_volume", "taker_buy_volume"]
    empty = pl.col("trades") == 0
    return [
        nulls,
        (~pl.all_horizontal([pl.col(c).is_finite().fill_null(True) for c in prices])
         | ~pl.all_horizontal([pl.col(c).is_finite() for c in volumes]), "non-finite number"),
        (pl.col("bucket") % step != 0, f"bucket not aligned to {interval}"),
        ((pl.col("bucket") < lo) | (pl.col("bucket") >= hi), "bucket outside the month"),
        (pl.col("bucket").is_duplicated(), "duplicate bucket"),
        (pl.col("trades") < 0, "negative trade count"),
        (empty & (pl.any_horizontal([pl.col(c).is_not_null() for c in prices])
                  | pl.any_horizontal([pl.col(c) != 0 for c in volumes])), "empty window with prices or volume"),
        (~empty & pl.any_horizontal([pl.col(c).is_null() for c in prices]), "window with trades lacks a price"),
        ((pl.col("high") < pl.col("low")).fill_null(False), "high < low"),
        ((pl.col("low") > pl.min_horizontal("open", "close")).fill_null(False), "low above open/close"),
        ((pl.col("high") < pl.max_horizontal("open", "close")).fill_null(False), "high below open/close"),
        (pl.min_horizontal(volumes) < 0, "negative volume"),
        (pl.col("taker_buy_volume") > pl.col("volume") * (1 + 1e-9) + 1e-12, "taker buy volume above volume"),
    ]


def _nonfinite(c: str) -> str:
    return f"coalesce({c} = 'NaN'::float8 OR abs({c}) = 'Infinity'::float8, false)"


def pg_rules(kind: Kind, interval: str) -> list[tuple[str, str]]:
    """:func:`row_rules` as SQL conditions over one series (duplicates cannot exist: the primary key).

    agg_trades conditions also see ``prev_time`` / ``prev_last`` (the previous trade in id order).
    """
    if kind is KLINES:
        step, secs = interval_us(interval), int(interval_to_timedelta(interval).total_seconds())
        required = " OR ".join(_nonfinite(c) for c in ("open", "high", "low", "close", "volume"))
        optional = " OR ".join(_nonfinite(c) for c in ("quote_volume", "taker_buy_volume", "taker_buy_quote_volume"))
        return [
            (f"({required}) OR ({optional})", "non-finite number"),
            (f"(extract(epoch FROM open_time) * 1000000)::bigint %% {step} <> 0",
             f"open_time not aligned to {interval}"),
            (f"close_time <= open_time OR close_time >= open_time + interval '{secs} seconds'",
             f"close_time not inside the {interval} candle"),
            ("high < low", "high < low"),
            ("low > least(open, close)", "low above open/close"),
            ("high < greatest(open, close)", "high below open/close"),
            ("volume < 0 OR least(quote_volume, taker_buy_volume, taker_buy_quote_volume) < 0", "negative volume"),
            ("coalesce(trades, 0) < 0", "negative trade count"),
        ]
    if kind is AGG_TRADES:
        return [
            (f"{_nonfinite('price')} OR {_nonfinite('quantity')}", "non-finite number"),
            ("price <= 0", "price <= 0"),
            ("quantity <= 0", "quantity <= 0"),
            ("first_trade_id > last_trade_id", "first_trade_id > last_trade_id"),
            ("transact_time < prev_time", "transact_time goes back while agg_trade_id increases"),
            ("first_trade_id <= prev_last", "trade ids overlap the previous aggregate trade"),
        ]
    step = interval_us(interval)
    prices = ("open", "high", "low", "close")
    return [
        (" OR ".join(_nonfinite(c) for c in (*prices, "volume", "quote_volume", "taker_buy_volume")),
         "non-finite number"),
        (f"(extract(epoch FROM bucket) * 1000000)::bigint %% {step} <> 0", f"bucket not aligned to {interval}"),
        ("trades < 0", "negative trade count"),
        ("trades = 0 AND (" + " OR ".join(f"{c} IS NOT NULL" for c in prices)
         + " OR volume <> 0 OR quote_volume <> 0 OR taker_buy_volume <> 0)", "empty window with prices or volume"),
        ("trades <> 0 AND (" + " OR ".join(f"{c} IS NULL" for c in prices) + ")", "window with trades lacks a price"),
        ("high < low", "high < low"),
        ("low > least(open, close)", "low above open/close"),
        ("high < greatest(open, close)", "high below open/close"),
        ("least(volume, quote_volume, taker_buy_volume) < 0", "negative volume"),
        ("taker_buy_volume > volume * (1 + 1e-9) + 1e-12", "taker buy volume above volume"),
    ]


def with_epochs(df: pl.DataFrame, kind: Kind) -> pl.DataFrame:
    """The frame the rules read: time columns as epoch µs, sorted by the key (order rules compare neighbours)."""
    return df.sort(kind.key, maintain_order=True, nulls_last=True).with_columns(
        pl.col(kind.time_columns).dt.epoch("us"))


def rule_counts(df: pl.DataFrame, kind: Kind, interval: str, period: tuple[datetime, datetime]) -> dict[str, int]:
    ints = with_epochs(df, kind)
    counts: dict[str, int] = {}
    for expr, why in row_rules(kind, interval, period):
        n = int(ints.select(expr.fill_null(True).sum()).item())
        counts[why] = counts.get(why, 0) + n
    return counts


def valid_rows(df: pl.DataFrame, kind: Kind, interval: str, period: tuple[datetime, datetime]) -> pl.DataFrame:
    """The rows of a stored month that pass every rule (duplicate keys: the first is kept)."""
    df = df.unique(subset=[kind.key], keep="first", maintain_order=True).sort(kind.key, nulls_last=True)
    ints = with_epochs(df, kind)
    bad = pl.any_horizontal([e.fill_null(True) for e, _ in row_rules(kind, interval, period)])
    return df.filter(~ints.select(bad.alias("b")).to_series())
