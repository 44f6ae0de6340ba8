"""PostgreSQL / TimescaleDB store through psycopg 3.

Idempotent bulk load, fast: per series a writer takes a transaction-scoped advisory lock, reads the keys
already stored in the batch's key range (one bytea of packed keys, decoded with numpy), drops those rows, and streams
only the new rows with binary COPY straight into the table (encoding the next chunk while a psycopg writer
thread sends the previous one). A re-load of an existing range thus costs one key scan; a new range one COPY.
Should a writer that bypasses our lock race us, the COPY hits the primary key and the batch is retried
through a staging table with ``INSERT … ON CONFLICT DO NOTHING``.

When the ``timescaledb`` extension is available the migration turns the data tables into hypertables with
compression policies and adds continuous aggregates rolling trades into 5 s and 1 m bars; otherwise the same
bar query runs with ``date_bin`` on plain tables. Results are the same either way.

Every wait is bounded (:mod:`rltrader.data.pgbounds`, ``params.yaml`` ``postgres:``): connects, the pool, locks and
statements. A tripped bound raises one :class:`~rltrader.errors.StoreError` naming the operation, table, series and
bound, after the call's transaction rolled back (a write stores all of its rows or none).
"""

from __future__ import annotations

import logging
from datetime import datetime
from importlib import resources
from typing import Any

import numpy as np
import polars as pl
import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg_pool import ConnectionPool

from rltrader.data import pgcopy
from rltrader.data.pgbounds import PgBounds, Site, bounded, connect, fmt_s, ms
from rltrader.data.pgcopy import PgType
from rltrader.data.schema import (
    AGG_TRADE_SCHEMA,
    BAR_SCHEMA,
    KLINE_SCHEMA,
    QUARANTINE_SCHEMA,
    interval_to_timedelta,
)
from rltrader.data.store import NULLABLE, NULLABLE_BARS, SeriesStats, WriteResult, check_required

log = logging.getLogger(__name__)

KLINE_COLUMNS: list[tuple[str, PgType]] = [
    ("series_id", "int4"), ("open_time", "timestamptz"), ("open", "float8"), ("high", "float8"),
    ("low", "float8"), ("close", "float8"), ("volume", "float8"), ("close_time", "timestamptz"),
    ("quote_volume", "float8"), ("trades", "int8"), ("taker_buy_volume", "float8"),
    ("taker_buy_quote_volume", "float8"),
]  # fmt: skip
AGG_TRADE_COLUMNS: list[tuple[str, PgType]] = [
    ("series_id", "int4"), ("agg_trade_id", "int8"), ("price", "float8"), ("quantity", "float8"),
    ("first_trade_id", "int8"), ("last_trade_id", "int8"), ("transact_time", "timestamptz"),
    ("is_buyer_maker", "bool"), ("is_best_match", "bool"),
]  # fmt: skip
BAR_VALUE_COLUMNS = ["open", "high", "low", "close", "volume", "quote_volume", "trades", "taker_buy_volume"]

_LOCK_SPACE = {"kline_data": 1, "agg_trade_data": 2}  # advisory lock namespaces, stable across processes
_KEY_SEND = {"timestamptz": "timestamptz_send", "int8": "int8send"}  # key → its 8-byte big-endian bytea
COPY_CHUNK_ROWS = 131_072  # ~17 MB of kline payload: big enough to amortise, small enough to overlap
COPY_STATEMENT_ROWS = 32 * COPY_CHUNK_ROWS
"""Rows per COPY statement (same transaction): ~2-4 s at the measured 1-2 M rows/s, so the statement bound caps a
stall, not the size of an archive file (a month of aggTrades is ~100 M rows in one write)."""

# Widths that have a continuous aggregate when TimescaleDB is present.
CAGG_WIDTHS = {"5s": ("trade_bars_5s", "5 seconds"), "1m": ("trade_bars_1m", "1 minute")}

_BAR_AGGS = """
    max(price) AS high, min(price) AS low,
    sum(quantity) AS volume, sum(price * quantity) AS quote_volume, count(*) AS trades,
    coalesce(sum(quantity) FILTER (WHERE NOT is_buyer_maker), 0) AS taker_buy_volume
"""


def _timescale_sql() -> list[str]:
    stmts = [
        "CREATE EXTENSION IF NOT EXISTS timescaledb",
        # A hypertable needs its time column in every unique index; an agg_trade_id fixes its
        # transact_time, so the effective key stays (series, agg_trade_id).
        "ALTER TABLE agg_trade_data DROP CONSTRAINT agg_trade_data_pkey",
        "ALTER TABLE agg_trade_data ADD PRIMARY KEY (series_id, agg_trade_id, transact_time)",
        "SELECT create_hypertable('kline_data', 'open_time', chunk_time_interval => INTERVAL '7 days', "
        "if_not_exists => TRUE, migrate_data => TRUE)",
        "SELECT create_hypertable('agg_trade_data', 'transact_time', chunk_time_interval => INTERVAL '1 day', "
        "if_not_exists => TRUE, migrate_data => TRUE)",
        "ALTER TABLE kline_data SET (timescaledb.compress, timescaledb.compress_segmentby = 'series_id', "
        "timescaledb.compress_orderby = 'open_time')",
        "SELECT add_compression_policy('kline_data', INTERVAL '30 days', if_not_exists => TRUE)",
        "ALTER TABLE agg_trade_data SET (timescaledb.compress, timescaledb.compress_segmentby = 'series_id', "
        "timescaledb.compress_orderby = 'transact_time, agg_trade_id')",
        "SELECT add_compression_policy('agg_trade_data', INTERVAL '7 days', if_not_exists => TRUE)",
    ]
    for view, width in CAGG_WIDTHS.values():
        stmts += [
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {view}
                WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
                SELECT series_id, time_bucket(INTERVAL '{width}', transact_time) AS bucket,
                       first(price, agg_trade_id) AS open, last(price, agg_trade_id) AS close, {_BAR_AGGS}
                FROM agg_trade_data GROUP BY series_id, bucket WITH NO DATA""",
            f"SELECT add_continuous_aggregate_policy('{view}', start_offset => INTERVAL '1 day', "
            f"end_offset => INTERVAL '{width}', schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE)",
        ]
    return stmts


def _migrations(timescale: bool) -> list[tuple[int, str, list[str]]]:
    base = resources.files("rltrader.data.migrations").joinpath("001_base.sql").read_text()
    migs = [(1, "base tables", [base])]
    if timescale:
        migs.append((2, "timescaledb hypertables, compression, continuous aggregates", _timescale_sql()))
    return migs


def _pg_interval(width: str) -> str:
    return f"{int(interval_to_timedelta(width).total_seconds())} seconds"


class PostgresStore:
    """Store backed by PostgreSQL; uses TimescaleDB features when the extension is installable."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4, bounds: PgBounds | None = None) -> None:
        """Connects (bounded: an unreachable server is one StoreError naming host and port, not a pool that
        retries in the background while the first call waits), migrates, then opens the pool."""
        self.url = url
        self.bounds = bounds or PgBounds()
        self.pool = ConnectionPool(url, kwargs=self.bounds.connect_kwargs(url), min_size=min_size,
                                   max_size=max_size, timeout=self.bounds.pool_timeout, open=False)
        self.timescale = False
        self._series: dict[tuple[str, str, str, str], int] = {}
        self.migrate()
        self.pool.open()

    def __repr__(self) -> str:
        return "PostgresStore(<url hidden>)"  # URLs may carry passwords

    # -- schema ----------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Apply pending migrations once, under an advisory lock so concurrent starters don't race."""
        with (
            bounded(self.bounds, "migrate the store schema"),
            connect(self.url, self.bounds, "PostgreSQL store") as conn,
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_xact_lock(727274)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).fetchone() is not None
            self.timescale = available or 2 in done
            for version, name, stmts in _migrations(self.timescale):
                if version in done:
                    continue
                for stmt in stmts:
                    conn.execute(stmt.encode())
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                log.info("applied migration %03d: %s", version, name)

    def _series_id(self, conn: psycopg.Connection[Any], kind: str, market: str, symbol: str, interval: str,
                   *, create: bool) -> int | None:
        key = (kind, market, symbol, interval)
        if key in self._series:
            return self._series[key]
        row = conn.execute("SELECT id FROM series WHERE kind = %s AND market = %s AND symbol = %s AND interval = %s",
                           key).fetchone()
        if row is None and create:
            row = conn.execute(
                "INSERT INTO series (kind, market, symbol, interval) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (kind, market, symbol, interval) DO UPDATE SET kind = EXCLUDED.kind RETURNING id",
                key).fetchone()
        if row is None:
            return None
        if not create:  # ids created inside a transaction are cached only once we know it committed
            self._series[key] = int(row[0])
        return int(row[0])

    # -- generic idempotent bulk load ------------------------------------------------------------------
    def _load(self, df: pl.DataFrame, kind: str, table: str, schema: dict[str, pl.DataType],
              columns: list[tuple[str, PgType]], key_col: str, key_type: PgType) -> WriteResult:
        if df.is_empty():
            return WriteResult(0, 0)
        if df.schema != pl.Schema(schema):
            df = df.select(list(schema)).cast(schema)  # type: ignore[arg-type]
        check_required(df, NULLABLE, kind)
        series_cols = ["market", "symbol", "interval"] if "interval" in schema else ["market", "symbol"]
        total = WriteResult(0, 0)
        with (
            bounded(self.bounds, f"write_{kind} into {table}") as site,
            self.pool.connection() as conn,
            conn.transaction(),  # one transaction: the call is atomic
        ):
            for ident, part in df.group_by(series_cols, maintain_order=True):
                names = [str(v) for v in ident]
                site.what = f"write_{kind} into {table} ({' '.join(n for n in names if n)})"
                sid = self._series_id(conn, kind, names[0], names[1], names[2] if len(names) > 2 else "",
                                      create=True)
                assert sid is not None
                keys = part.get_column(key_col)
                strictly_increasing = keys.len() < 2 or bool((keys.diff().drop_nulls().cast(pl.Int64) > 0).all())
                uniq = part if strictly_increasing else part.unique(subset=[key_col], keep="first",
                                                                     maintain_order=True)
                total += self._load_series(conn, uniq.with_columns(series_id=pl.lit(sid, pl.Int32)), sid,
                                           table, columns, key_col, key_type, site)
                total += WriteResult(0, part.height - uniq.height)  # repeats within the batch
        return total

    def _load_series(self, conn: psycopg.Connection[Any], part: pl.DataFrame, sid: int, table: str,
                     columns: list[tuple[str, PgType]], key_col: str, key_type: PgType, site: Site) -> WriteResult:
        self._series_lock(conn, table, sid, site)
        lo, hi = part.get_column(key_col).min(), part.get_column(key_col).max()
        # One bytea of 8-byte big-endian keys: COPY TO STDOUT sends a message per row, and iterating those
        # (~1 µs/row in psycopg) bounded the re-load path. A bytea caps one call at ~134M keys per series.
        query = sql.SQL("SELECT string_agg({send}({k}), ''::bytea) FROM {t} "
                        "WHERE series_id = {s} AND {k} BETWEEN {lo} AND {hi}").format(
            send=sql.Identifier(_KEY_SEND[key_type]), k=sql.Identifier(key_col), t=sql.Identifier(table),
            s=sql.Literal(sid), lo=sql.Literal(lo), hi=sql.Literal(hi))
        with conn.cursor(binary=True) as cur:
            row = cur.execute(query).fetchone()
        new = part
        if row is not None and row[0]:
            keys = np.frombuffer(row[0], ">i8").astype(np.int64)
            existing = (pl.Series(key_col, keys + pgcopy.PG_EPOCH_US).cast(pl.Datetime("us", "UTC"))
                        if key_type == "timestamptz" else pl.Series(key_col, keys)).to_frame()
            new = part.join(existing, on=key_col, how="anti")
        if new.is_empty():
            return WriteResult(0, part.height)
        names = sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns)
        copy_in = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(table), names)
        try:
            with conn.transaction(), conn.cursor() as cur:  # savepoint: a race falls back below
                for off in range(0, new.height, COPY_STATEMENT_ROWS):
                    self._copy_chunks(cur, copy_in, new.slice(off, COPY_STATEMENT_ROWS), columns)
            return WriteResult(new.height, part.height - new.height)
        except psycopg.errors.UniqueViolation:
            log.warning("concurrent writer on %s series %s; falling back to ON CONFLICT load", table, sid)
        stage = sql.Identifier(f"_stage_{table}")
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DROP").format(
                stage, sql.Identifier(table)))
            cur.execute(sql.SQL("TRUNCATE {}").format(stage))
            copy_stage = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(stage, names)
            for off in range(0, new.height, COPY_STATEMENT_ROWS):
                self._copy_chunks(cur, copy_stage, new.slice(off, COPY_STATEMENT_ROWS), columns)
            cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
                sql.Identifier(table), names, names, stage))
            inserted = cur.rowcount
        return WriteResult(inserted, part.height - inserted)

    def _series_lock(self, conn: psycopg.Connection[Any], table: str, sid: int, site: Site) -> None:
        """The series' advisory lock. Its holder is another writer of the same series, whose write may run a long
        COPY, so this one wait is bounded by the statement bound, not the (shorter) lock bound meant for
        sessions holding table locks. Uncontended (the usual case) it costs one round trip, as before the bounds:
        only a lock that is taken pays for switching the bound."""
        key = (_LOCK_SPACE[table], sid)
        row = conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", key).fetchone()
        if row is not None and row[0]:
            return
        long, short = ms(self.bounds.statement_timeout), ms(self.bounds.lock_timeout)
        site.lock_wait = (f"waited statement_timeout {fmt_s(self.bounds.statement_timeout)} for another writer "
                          "of this series (its advisory lock)")
        conn.execute(f"SET LOCAL lock_timeout = {long}".encode())
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", key)
        conn.execute(f"SET LOCAL lock_timeout = {short}".encode())
        site.lock_wait = ""

    @staticmethod
    def _copy_chunks(cur: psycopg.Cursor[Any], statement: sql.Composed, df: pl.DataFrame,
                     columns: list[tuple[str, PgType]]) -> None:
        """Encode chunk i+1 while psycopg's writer thread sends chunk i (2 cores: client and server overlap)."""
        n = df.height
        if df.null_count().sum_horizontal().item():  # nullable optional fields: row-wise binary COPY
            with cur.copy(statement) as cp:
                cp.set_types([t for _, t in columns])
                for row in df.select([c for c, _ in columns]).iter_rows():
                    cp.write_row(row)
            return
        with cur.copy(statement, writer=QueuedLibpqWriter(cur)) as cp:
            for off in range(0, n, COPY_CHUNK_ROWS):
                cp.write(pgcopy.encode(df.slice(off, COPY_CHUNK_ROWS), columns, header=off == 0,
                                       trailer=off + COPY_CHUNK_ROWS >= n))

    def _read(self, kind: str, table: str, columns: list[tuple[str, PgType]], schema: dict[str, pl.DataType],
              ident: dict[str, str], time_col: str, start: datetime | None, end: datetime | None,
              order: str) -> pl.DataFrame:
        what = f"read_{kind} from {table} ({' '.join(ident.values())})"
        with bounded(self.bounds, what, write=False), self.pool.connection() as conn:
            sid = self._series_id(conn, kind, ident["market"], ident["symbol"], ident.get("interval", ""),
                                  create=False)
            if sid is None:
                return pl.DataFrame(schema=schema)
            fixed = [(c, t) for c, t in columns if c != "series_id"]
            conds = [sql.SQL("series_id = {}").format(sql.Literal(sid))]
            if start is not None:
                conds.append(sql.SQL("{} >= {}").format(sql.Identifier(time_col), sql.Literal(start)))
            if end is not None:
                conds.append(sql.SQL("{} < {}").format(sql.Identifier(time_col), sql.Literal(end)))
            select = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c, _ in fixed), sql.Identifier(table),
                sql.SQL(" AND ").join(conds), sql.Identifier(order))
            buf = bytearray()
            with conn.cursor() as cur, cur.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select)) as cp:
                for chunk in cp:
                    buf += chunk
            if not buf:
                return pl.DataFrame(schema=schema)
            try:
                df = pgcopy.decode(bytes(buf), fixed)
            except ValueError:  # NULLs in optional fields (e.g. rows imported from OHLCV dumps)
                rows = conn.execute(select).fetchall()
                df = pl.DataFrame(rows, schema=[c for c, _ in fixed], orient="row")
        df = df.with_columns(*[pl.lit(v).alias(k) for k, v in ident.items()])
        return df.select(list(schema)).cast(schema)  # type: ignore[arg-type]

    # -- klines ----------------------------------------------------------------------------------------
    def write_klines(self, df: pl.DataFrame) -> WriteResult:
        return self._load(df, "klines", "kline_data", KLINE_SCHEMA, KLINE_COLUMNS, "open_time", "timestamptz")

    def read_klines(
        self, market: str, symbol: str, interval: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        return self._read("klines", "kline_data", KLINE_COLUMNS, KLINE_SCHEMA,
                          {"market": market, "symbol": symbol, "interval": interval},
                          "open_time", start, end, "open_time")

    # -- trades ----------------------------------------------------------------------------------------
    def write_agg_trades(self, df: pl.DataFrame) -> WriteResult:
        return self._load(df, "agg_trades", "agg_trade_data", AGG_TRADE_SCHEMA, AGG_TRADE_COLUMNS,
                          "agg_trade_id", "int8")

    def read_agg_trades(
        self, market: str, symbol: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        return self._read("agg_trades", "agg_trade_data", AGG_TRADE_COLUMNS, AGG_TRADE_SCHEMA,
                          {"market": market, "symbol": symbol}, "transact_time", start, end, "agg_trade_id")

    # -- bars ------------------------------------------------------------------------------------------
    def write_bars(self, df: pl.DataFrame, width: str) -> WriteResult:
        """Small, nullable rows (empty windows): staging table + ON CONFLICT, via psycopg's row COPY."""
        if df.is_empty():
            return WriteResult(0, 0)
        df = df.select(list(BAR_SCHEMA)).cast(BAR_SCHEMA)  # type: ignore[arg-type]
        check_required(df, NULLABLE_BARS, "bars")
        cols = ["series_id", "bucket", *BAR_VALUE_COLUMNS]
        names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
        inserted = 0
        with (
            bounded(self.bounds, f"write_bars into bar_data ({width})") as site,
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS _stage_bars (LIKE bar_data) ON COMMIT DROP")
            for (market, symbol), part in df.group_by(["market", "symbol"], maintain_order=True):
                site.what = f"write_bars into bar_data ({market} {symbol} {width})"
                sid = self._series_id(conn, "bars", str(market), str(symbol), width, create=True)
                cur.execute("TRUNCATE _stage_bars")
                with cur.copy(sql.SQL("COPY _stage_bars ({}) FROM STDIN").format(names)) as cp:
                    for row in part.select("bucket", *BAR_VALUE_COLUMNS).iter_rows():
                        cp.write_row((sid, *row))
                cur.execute(sql.SQL("INSERT INTO bar_data ({}) SELECT {} FROM _stage_bars ON CONFLICT DO NOTHING")
                            .format(names, names))
                inserted += cur.rowcount
        return WriteResult(inserted, df.height - inserted)

    def read_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        with (
            bounded(self.bounds, f"read_bars from bar_data ({market} {symbol} {width})", write=False),
            self.pool.connection() as conn,
        ):
            sid = self._series_id(conn, "bars", market, symbol, width, create=False)
            if sid is None:
                return pl.DataFrame(schema=BAR_SCHEMA)
            rows = conn.execute(
                "SELECT %s, %s, bucket, " + ", ".join(BAR_VALUE_COLUMNS) + " FROM bar_data WHERE series_id = %s"
                " AND bucket >= coalesce(%s, '-infinity'::timestamptz)"
                " AND bucket < coalesce(%s, 'infinity'::timestamptz)"
                " ORDER BY bucket", (market, symbol, sid, start, end)).fetchall()
        return pl.DataFrame(rows, schema=BAR_SCHEMA, orient="row")

    def trade_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        """Bars from stored trades: the continuous aggregate when there is one, else ``date_bin``."""
        cols = "bucket, open, high, low, close, volume, quote_volume, trades, taker_buy_volume"
        bounds = ("series_id = %s AND {t} >= coalesce(%s, '-infinity'::timestamptz)"
                  " AND {t} < coalesce(%s, 'infinity'::timestamptz)")
        with (
            bounded(self.bounds, f"trade_bars from agg_trade_data ({market} {symbol} {width})", write=False),
            self.pool.connection() as conn,
        ):
            sid = self._series_id(conn, "agg_trades", market, symbol, "", create=False)
            if sid is None:
                return pl.DataFrame(schema=BAR_SCHEMA)
            if self.timescale and width in CAGG_WIDTHS:
                q = f"SELECT {cols} FROM {CAGG_WIDTHS[width][0]} WHERE {bounds.format(t='bucket')} ORDER BY bucket"
                params: tuple[Any, ...] = (sid, start, end)
            else:
                q = f"""SELECT {cols} FROM (
                          SELECT date_bin(%s::interval, transact_time, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bucket,
                                 (array_agg(price ORDER BY agg_trade_id))[1] AS open,
                                 (array_agg(price ORDER BY agg_trade_id DESC))[1] AS close, {_BAR_AGGS}
                          FROM agg_trade_data WHERE {bounds.format(t='transact_time')}
                          GROUP BY bucket) b ORDER BY bucket"""
                params = (_pg_interval(width), sid, start, end)
            rows = conn.execute(q.encode(), params).fetchall()
        return pl.DataFrame([(market, symbol, *r) for r in rows], schema=BAR_SCHEMA, orient="row")

    # -- quarantine & stats ----------------------------------------------------------------------------
    def quarantine(self, bad: pl.DataFrame) -> int:
        if bad.is_empty():
            return 0
        with (
            bounded(self.bounds, "quarantine into quarantine"),
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy("COPY quarantine (source, line, reason, raw) FROM STDIN") as cp,
        ):
            for row in bad.select("source", "line", "reason", "raw").iter_rows():
                cp.write_row(row)
        return bad.height

    def read_quarantine(self) -> pl.DataFrame:
        with bounded(self.bounds, "read_quarantine from quarantine", write=False), self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT source, line, reason, raw, quarantined_at FROM quarantine ORDER BY id").fetchall()
        return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA, orient="row")

    def stats(self) -> list[SeriesStats]:
        queries = [
            ("klines", "kline_data", "open_time"),
            ("agg_trades", "agg_trade_data", "transact_time"),
            ("bars", "bar_data", "bucket"),
        ]
        out: list[SeriesStats] = []
        with bounded(self.bounds, "stats of the data tables", write=False), self.pool.connection() as conn:
            for kind, table, t in queries:
                q = (f"SELECT s.market, s.symbol, s.interval, d.n, d.lo, d.hi FROM series s JOIN "
                     f"(SELECT series_id, count(*) n, min({t}) lo, max({t}) hi FROM {table} GROUP BY series_id) d "
                     f"ON d.series_id = s.id ORDER BY 1, 2, 3")
                for m, s, i, n, lo, hi in conn.execute(q.encode()).fetchall():
                    out.append(SeriesStats(kind, m, s, i, int(n), lo, hi))
        return out

    def close(self) -> None:
        self.pool.close()
