"""The store interface every backend implements, and the factory that picks one from a URL.

Two backends share one contract (and one test suite): an embedded Parquet store (the default, no server)
and PostgreSQL/TimescaleDB. Code above this layer never knows which one it talks to.

Write semantics are the same in both: rows are keyed (klines by market/symbol/interval/open_time, trades by
market/symbol/agg_trade_id, bars by market/symbol/bucket), an existing key is never overwritten (market history
is immutable; the first complete record wins), and each call is atomic: all of its rows are stored or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import polars as pl

from rltrader.data.schema import BAR_SCHEMA, interval_us
from rltrader.errors import DataError

if TYPE_CHECKING:  # psycopg is imported only when a PostgreSQL store is opened
    from rltrader.data.pgbounds import PgBounds


@dataclass(frozen=True)
class WriteResult:
    """How many offered rows were new, and how many were already stored (and therefore skipped)."""

    inserted: int
    skipped: int

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(self.inserted + other.inserted, self.skipped + other.skipped)


@dataclass(frozen=True)
class SeriesStats:
    kind: str  # klines | agg_trades | bars
    market: str
    symbol: str
    interval: str  # kline interval, bar width, or "" for trades
    rows: int
    first: datetime | None
    last: datetime | None
    broken: tuple[str, ...] = ()  # unreadable month files (Parquet store), left out of rows/first/last

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "market": self.market,
            "symbol": self.symbol,
            "interval": self.interval,
            "rows": self.rows,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "broken": list(self.broken),
        }


@runtime_checkable
class Store(Protocol):
    """Market data storage. Time ranges are half-open ``[start, end)``; ``None`` means unbounded."""

    url: str

    def write_klines(self, df: pl.DataFrame) -> WriteResult: ...

    def read_klines(
        self, market: str, symbol: str, interval: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame: ...

    def write_agg_trades(self, df: pl.DataFrame) -> WriteResult: ...

    def read_agg_trades(
        self, market: str, symbol: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame: ...

    def write_bars(self, df: pl.DataFrame, width: str) -> WriteResult:
        """Store bars built live from trades (e.g. 5 s); a window with no trade is a row with trades=0."""
        ...

    def read_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame: ...

    def trade_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        """Bars computed from stored trades (continuous aggregate / date_bin); only windows that had trades."""
        ...

    def quarantine(self, bad: pl.DataFrame) -> int:
        """Keep rows that failed validation (source, line, reason, raw) for a person to look at."""
        ...

    def read_quarantine(self) -> pl.DataFrame: ...

    def stats(self) -> list[SeriesStats]: ...

    def close(self) -> None: ...


# Columns that may be NULL: fields some sources lack (plain OHLCV dumps), and prices of empty bar windows.
NULLABLE = {"quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume"}
NULLABLE_BARS = {"open", "high", "low", "close"}


def check_required(df: pl.DataFrame, nullable: set[str], what: str) -> None:
    """Refuse a batch with NULL in a required column, naming it, before anything is written."""
    counts = df.select(pl.col(c).null_count() for c in df.columns if c not in nullable).row(0, named=True)
    bad = {c: n for c, n in counts.items() if n}
    if bad:
        raise DataError(f"{what}: NULL in required column(s) {bad}; nothing written")


def trade_bars_frame(trades: pl.DataFrame, width: str) -> pl.DataFrame:
    """Aggregate trades into time bars: the one polars definition that the SQL variants must reproduce.

    OHLC by trade order (agg_trade_id), volume and quote volume, count of aggregate trades, and taker-buy
    volume (the buyer is the taker when ``is_buyer_maker`` is false).
    """
    if trades.is_empty():
        return pl.DataFrame(schema=BAR_SCHEMA)
    every = interval_us(width)
    bucket = (pl.col("transact_time").dt.epoch("us") // every * every).cast(pl.Datetime("us", "UTC"))
    out = (
        trades.sort("agg_trade_id")
        .with_columns(bucket=bucket)
        .group_by("market", "symbol", "bucket", maintain_order=True)
        .agg(
            open=pl.col("price").first(),
            high=pl.col("price").max(),
            low=pl.col("price").min(),
            close=pl.col("price").last(),
            volume=pl.col("quantity").sum(),
            quote_volume=(pl.col("price") * pl.col("quantity")).sum(),
            trades=pl.len().cast(pl.Int64),
            taker_buy_volume=pl.col("quantity").filter(~pl.col("is_buyer_maker")).sum(),
        )
        .sort("bucket")
    )
    return out.select(list(BAR_SCHEMA)).cast(BAR_SCHEMA)  # type: ignore[arg-type]


def open_store(url: str | None, data_dir: Path, bounds: PgBounds | None = None) -> Store:
    """``postgresql://…`` → PostgreSQL/TimescaleDB; ``None``, ``parquet`` or ``parquet:///dir`` → Parquet.
    ``bounds``: PostgreSQL's connect/pool/lock/statement bounds (``settings.postgres.bounds()``; None → the
    defaults, which bound every wait too)."""
    if url and url.startswith(("postgres://", "postgresql://")):
        from rltrader.data.postgres_store import PostgresStore

        return PostgresStore(url, bounds=bounds)
    if url and url.startswith("parquet://"):
        path = url.removeprefix("parquet://")
        return _parquet(Path(path) if path else data_dir / "store")
    if url in (None, "", "parquet"):
        return _parquet(data_dir / "store")
    raise ValueError(f"store URL {url!r}: expected postgresql://… or parquet[:///path]")


def _parquet(root: Path) -> Store:
    from rltrader.data.parquet_store import ParquetStore

    return ParquetStore(root)
