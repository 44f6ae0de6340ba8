"""Read-only SQL over the stored market data: DuckDB over the Parquet store, or the PostgreSQL store itself.

One query, either store. Both expose the same relations with the same columns:

- ``klines`` (market, symbol, interval, open_time, open, high, low, close, volume, close_time, quote_volume,
  trades, taker_buy_volume, taker_buy_quote_volume),
- ``agg_trades`` (market, symbol, agg_trade_id, price, quantity, first_trade_id, last_trade_id, transact_time,
  is_buyer_maker, is_best_match),
- ``bars`` (width, market, symbol, bucket, open, high, low, close, volume, quote_volume, trades, taker_buy_volume).

On PostgreSQL these are the views of ``migrations/001_base.sql``. Over Parquet they are DuckDB views over the
store's month files (``parquet_store.py`` layout), plus the dataset stages' outputs: ``features`` (every
``<data.dir>/features/<SYMBOL>.parquet`` with a ``symbol`` column) and ``sessions_<split>`` /
``sessions_<split>_index`` (``<data.dir>/sessions/<split>/rows.parquet`` / ``index.parquet``). Sessions in both
databases are pinned to UTC, so ``date_trunc('day', open_time)`` means the same day on either.

DuckDB's postgres scanner would need an extension download (no network here, nor on many servers), so a
PostgreSQL store is queried directly through psycopg.

Read-only by construction, not by convention:

- The statement is classified with DuckDB's own parser: exactly one statement, of type SELECT (which includes
  ``WITH … SELECT``, ``VALUES``, ``FROM t``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``); anything else is refused
  before it reaches a database.
- DuckDB runs in memory over views; afterwards file system access is limited to the store and dataset folders
  and the configuration is locked, so a query can neither read other files nor switch that back.
- PostgreSQL runs the query inside a ``READ ONLY`` transaction that is rolled back, through the extended query
  protocol, which refuses a second statement smuggled after a ``;`` (e.g. ``COMMIT; DROP …``). The store is
  opened without ``PostgresStore`` so not even its schema migration runs.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl

from rltrader.data.schema import AGG_TRADE_SCHEMA, BAR_SCHEMA, KLINE_SCHEMA
from rltrader.errors import RLTraderError

_DUCK_TYPES = {pl.String: "VARCHAR", pl.Float64: "DOUBLE", pl.Int64: "BIGINT", pl.Boolean: "BOOLEAN"}


class SQLError(RLTraderError):
    """The query failed: the database's own message (syntax, unknown column, …)."""


class ReadOnlyError(SQLError):
    """The statement would change something (or is not a query); it was not run."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    engine: str  # "duckdb" (Parquet store) | "postgresql"

    def records(self) -> list[dict[str, Any]]:
        """Rows as JSON-ready dicts (times ISO 8601, decimals as floats, bytes base64)."""
        return [{c: jsonable(v) for c, v in zip(self.columns, row, strict=True)} for row in self.rows]

    def to_json(self) -> str:
        return json.dumps(self.records())

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for row in self.rows:
            w.writerow(["" if v is None else _csv_cell(v) for v in row])
        return buf.getvalue()


def jsonable(v: Any) -> Any:
    """One representation for both engines' Python values (psycopg and DuckDB differ: Decimal vs float, …)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, UUID):
        return str(v)
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return str(v)


def _csv_cell(v: Any) -> Any:
    j = jsonable(v)
    return json.dumps(j) if isinstance(j, list | dict) else j


# ---------------------------------------------------------------------------------------------- read-only check


def check_read_only(query: str, *, strict: bool = True) -> None:
    """Refuse anything but one SELECT. ``strict=False`` lets a statement DuckDB cannot parse through (PostgreSQL
    dialect the DuckDB parser lacks): the PostgreSQL path's read-only transaction still guards it."""
    import duckdb

    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        if strict:
            raise SQLError(str(exc)) from exc
        return
    if not stmts:
        raise SQLError("empty query: give one SELECT statement")
    if len(stmts) > 1:
        raise ReadOnlyError(f"{len(stmts)} statements given: run one SELECT at a time (nothing was run)")
    kind = stmts[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ReadOnlyError(f"{kind.name} statement refused: SQL over the store is read-only, only SELECT (WITH … "
                            f"SELECT, VALUES, DESCRIBE, SHOW, SUMMARIZE) is allowed; nothing was run or changed")


# ---------------------------------------------------------------------------------------------- store resolution


def resolve_store(url: str | None, data_dir: Path) -> tuple[str, str | Path]:
    """``("postgresql", url)`` or ``("parquet", root)``: the URL rules of :func:`rltrader.data.store.open_store`,
    without opening a store (``PostgresStore`` would apply migrations; this path must not write)."""
    if url and url.startswith(("postgres://", "postgresql://")):
        return "postgresql", url
    if url and url.startswith("parquet://"):
        path = url.removeprefix("parquet://")
        return "parquet", Path(path) if path else data_dir / "store"
    if url in (None, "", "parquet"):
        return "parquet", data_dir / "store"
    raise ValueError(f"store URL {url!r}: expected postgresql://… or parquet[:///path]")


def run_sql(query: str, store_url: str | None, data_dir: Path) -> QueryResult:
    """Run one read-only query on the store ``store_url`` names (settings' ``data.store_url`` rules)."""
    kind, target = resolve_store(store_url, data_dir)
    if kind == "postgresql":
        return run_postgres(query, str(target))
    from rltrader.dataset.build import FEATURES_DIR, SESSIONS_DIR

    return run_duckdb(query, Path(target), features_dir=data_dir / FEATURES_DIR, sessions_dir=data_dir / SESSIONS_DIR)


# ---------------------------------------------------------------------------------------------- DuckDB over Parquet


def _lit(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _lits(paths: Sequence[Path]) -> str:
    """A DuckDB list literal of file paths."""
    return "[" + ", ".join(_lit(p) for p in paths) + "]"


def _empty_view(schema: dict[str, pl.DataType], extra: Sequence[tuple[str, str]] = ()) -> str:
    """A typed, empty relation: queries over a store without that kind of data still bind (and return 0 rows)."""
    cols = [f"CAST(NULL AS {t}) AS {c}" for c, t in extra]
    for c, dt in schema.items():
        t = "TIMESTAMPTZ" if isinstance(dt, pl.Datetime) else _DUCK_TYPES[type(dt)]
        cols.append(f"CAST(NULL AS {t}) AS {c}")
    return f"SELECT {', '.join(cols)} LIMIT 0"


def parquet_views(root: Path, features_dir: Path | None = None,
                  sessions_dir: Path | None = None) -> dict[str, str]:
    """View name → DuckDB SELECT over the files that exist now (column order as PostgreSQL's views)."""
    from rltrader.data.parquet_store import live_files

    views: dict[str, str] = {}
    specs = [("klines", 3, KLINE_SCHEMA), ("agg_trades", 2, AGG_TRADE_SCHEMA)]
    for name, levels, schema in specs:
        # the store's own listing (base + live deltas per month): a glob of data.parquet misses the deltas' rows
        files = live_files(root, name, levels)
        if files:
            views[name] = (f"SELECT {', '.join(schema)} FROM read_parquet({_lits(files)}, "
                           f"hive_partitioning = false, union_by_name = true)")
        else:
            views[name] = _empty_view(schema)
    bar_files = live_files(root, "bars", 3)  # width=/market=/symbol=/month=; the width lives only in the path
    if bar_files:
        views["bars"] = (f"SELECT regexp_extract(filename, '/width=([^/]+)/', 1) AS width, {', '.join(BAR_SCHEMA)} "
                         f"FROM read_parquet({_lits(bar_files)}, hive_partitioning = false, "
                         f"union_by_name = true, filename = true)")
    else:
        views["bars"] = _empty_view(BAR_SCHEMA, [("width", "VARCHAR")])
    if features_dir is not None and any(features_dir.glob("*.parquet")):
        views["features"] = (r"SELECT regexp_extract(filename, '([^/]+)\.parquet$', 1) AS symbol, "
                             f"* EXCLUDE (filename) FROM read_parquet({_lit(features_dir / '*.parquet')}, "
                             f"union_by_name = true, filename = true)")
    if sessions_dir is not None and sessions_dir.is_dir():
        for split in sorted(p for p in sessions_dir.iterdir() if p.is_dir() and p.name.isidentifier()):
            for file, suffix in (("rows.parquet", ""), ("index.parquet", "_index")):
                if (split / file).is_file():
                    views[f"sessions_{split.name}{suffix}"] = f"SELECT * FROM read_parquet({_lit(split / file)})"
    return views


def run_duckdb(query: str, root: Path, *, features_dir: Path | None = None,
               sessions_dir: Path | None = None) -> QueryResult:
    """Query the Parquet store (and dataset outputs) with DuckDB in memory; nothing on disk is written."""
    import duckdb

    check_read_only(query)
    if not root.is_dir():
        raise SQLError(f"Parquet store {root} does not exist (backfill first, or pass --store)")
    views = parquet_views(root, features_dir, sessions_dir)
    allowed = [str(d.resolve()) for d in (root, features_dir, sessions_dir) if d is not None and d.is_dir()]
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET autoinstall_known_extensions = false")  # no network look-ups from a query
        for name, select in views.items():
            con.execute(f'CREATE VIEW "{name}" AS {select}')
        con.execute(f"SET allowed_directories = [{', '.join(_lit(d) for d in allowed)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            cur = con.execute(query)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchall()
        except duckdb.Error as exc:
            raise SQLError(str(exc)) from exc
    finally:
        con.close()
    return QueryResult(columns, rows, "duckdb")


# ---------------------------------------------------------------------------------------------- PostgreSQL


def run_postgres(query: str, url: str, *, statement_timeout_s: float | None = None) -> QueryResult:
    """Run the query on PostgreSQL in a READ ONLY transaction (rolled back), session time zone UTC."""
    check_read_only(query, strict=False)
    return _execute_postgres(query, url, statement_timeout_s=statement_timeout_s)


def _execute_postgres(query: str, url: str, *, statement_timeout_s: float | None = None) -> QueryResult:
    import psycopg

    from rltrader.data.pgbounds import PgBounds

    try:  # the store's default bounds (connect, lock, statement); ``statement_timeout_s`` overrides the last
        with psycopg.connect(url, autocommit=False, **PgBounds().connect_kwargs(url)) as conn:
            conn.read_only = True  # BEGIN READ ONLY
            try:
                with conn.cursor() as cur:
                    cur.execute("SET TRANSACTION READ ONLY")
                    cur.execute("SET LOCAL TIME ZONE 'UTC'")
                    if statement_timeout_s:
                        cur.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_s * 1000)}")
                    # binary=True → extended protocol: exactly one statement, however many ';' the text has
                    cur.execute(query.encode(), binary=True)
                    columns = [d.name for d in cur.description or []]
                    rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
            finally:
                conn.rollback()
    except psycopg.Error as exc:
        raise SQLError(_pg_message(exc)) from exc
    return QueryResult(columns, rows, "postgresql")


def _pg_message(exc: Exception) -> str:
    sqlstate = getattr(getattr(exc, "diag", None), "sqlstate", None)
    msg = str(exc).strip()
    return f"{msg} (SQLSTATE {sqlstate})" if sqlstate else msg
