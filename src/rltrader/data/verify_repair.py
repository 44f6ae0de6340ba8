"""``rltrader data verify --repair``: rebuild a failing stored month from its sources, atomically.

- klines and aggTrades: the month's reference rows (the archive, and REST for the days the archive has not
  published: :mod:`rltrader.data.verify_source`), plus the valid stored rows the reference does not have (e.g.
  from the live stream, newer than what REST was asked for);
- 5 s bars: no archive or REST serves them (they are built from the live stream). The valid stored bars are
  kept; a window that lost its bar is rebuilt from the stored trades (the bars' ground truth, see
  :mod:`rltrader.data.bars`) by the stream's own bar builder run offline, empty windows (``trades = 0``) included.
  When nothing is left to rebuild from, a broken Parquet file is moved to the quarantine folder (the store
  reads again) and the report says the month cannot be re-fetched.

Parquet: the new file is written beside the old one, the old one hard-linked into
``<store>/quarantine/months/<time>/…``, the new one renamed over it. PostgreSQL: delete and reload in one
transaction under the writers' per-series lock. Killed at any step, the store is as before or repaired.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from rltrader.data.archive import ArchiveSource
from rltrader.data.bars import build_bars
from rltrader.data.store import Store
from rltrader.data.verify import MonthCheck, Scope, check_months, fault, stored_month
from rltrader.data.verify_rules import AGG_TRADES, BARS, Kind, valid_rows
from rltrader.data.verify_source import Reference, RestSource, month_bounds, reference_month
from rltrader.errors import DataError
from rltrader.integrity import check_parquet_file, read_parquet

NO_SOURCE_BARS = ("cannot be re-fetched: 5 s bars are built from the live stream (no archive or REST serves "
                  "them) and the store holds no trades for them")


def repaired_rows(kind: Kind, stored: pl.DataFrame | None, ref: pl.DataFrame, interval: str,
                  month: str) -> pl.DataFrame:
    """The reference's rows, plus stored rows the reference does not have that pass every rule."""
    rows = ref
    if stored is not None and not stored.is_empty():
        keep = valid_rows(stored, kind, interval, month_bounds(month)).join(ref.select(kind.key), on=kind.key,
                                                                            how="anti")
        rows = pl.concat([ref.select(list(kind.schema)).cast(kind.schema),  # type: ignore[arg-type]
                          keep.select(list(kind.schema)).cast(kind.schema)])  # type: ignore[arg-type]
    return rows.select(list(kind.schema)).cast(kind.schema).sort(kind.key)  # type: ignore[arg-type]


def rebuilt_bars(store: Store, check: MonthCheck, stored: pl.DataFrame | None) -> tuple[pl.DataFrame, str]:
    """Valid stored bars + bars rebuilt from the stored trades for the windows that lost theirs; what was done.

    Rebuilt with :func:`bars.build_bars`, the offline twin of the stream's bar builder: from the month's first
    to its last stored trade every window gets a bar, an empty one (``trades = 0``) where no trade fell.
    """
    lo, hi = month_bounds(check.month)
    kept = (valid_rows(stored, BARS, check.interval, (lo, hi)) if stored is not None
            else pl.DataFrame(schema=BARS.schema))
    why = ""
    try:
        trades = store.read_agg_trades(check.market, check.symbol, lo, hi)
    except DataError as exc:  # the trades month is broken too (and could not be repaired)
        trades, why = pl.DataFrame(schema=AGG_TRADES.schema), f"stored trades unreadable ({exc})"
    built = build_bars(trades.sort("agg_trade_id"), check.interval)[0] if trades.height else kept.clear()
    rebuilt = built.join(kept.select("bucket"), on="bucket", how="anti")
    rows = pl.concat([kept, rebuilt.select(list(BARS.schema)).cast(BARS.schema)]).sort("bucket")  # type: ignore[arg-type]
    note = f"{kept.height} valid bar(s) kept, {rebuilt.height} rebuilt from {trades.height} stored trade(s)"
    dropped = (check.rows or 0) - kept.height
    if dropped > 0:
        note += f", {dropped} broken bar(s) dropped"
    return rows, "; ".join(p for p in (note, why) if p)


def repair_month(store: Store, check: MonthCheck, source: ArchiveSource | None, rest: RestSource | None,
                 ref: Reference | None = None) -> MonthCheck:
    """Rebuild one month (atomically); returns the month verified again."""
    from rltrader.data.parquet_store import ParquetStore

    notes: list[str] = []
    if check.kind == "bars":
        def build(stored: pl.DataFrame | None) -> pl.DataFrame:
            rows, note = rebuilt_bars(store, check, stored)
            notes.append(note)
            return rows
    else:
        if ref is None:
            ref = reference_month(check.spec, check.market, check.symbol, check.interval, check.month, source, rest)
        if ref is None or (ref.rows.is_empty() and check.status == "unreadable"):
            check.note("not repaired: no archive file (and no --rest-base) for this month")
            return check
        reference = ref.rows

        def build(stored: pl.DataFrame | None) -> pl.DataFrame:
            return repaired_rows(check.spec, stored, reference, check.interval, check.month)

    if isinstance(store, ParquetStore):
        aside = _repair_parquet(store, check, build)
        if aside is not None:  # nothing to rebuild the month from
            check.note(f"moved to {aside} — " + (NO_SOURCE_BARS if check.kind == "bars" else
                                                 "no valid row stored and none in its sources"))
            return check
    else:
        rows = build(stored_month(store, check))
        if rows.is_empty() and check.kind == "bars":
            check.note(f"not repaired: {NO_SOURCE_BARS}")
            return check
        _repair_postgres(store, check, rows, None if ref is None else ref.rows)
    refs = {check.label: ref} if ref is not None else None
    again = check_months(store, Scope().only(check), source, rest, references=refs).months
    if not again:  # nothing stored and nothing in the sources: nothing to verify
        return check
    fixed = again[0]
    fixed.repaired = True
    was = f"repaired (was {check.status}: {check.detail})" + "".join(f"; {n}" for n in notes if n)
    fixed.detail = was + (f"; {fixed.detail}" if fixed.detail else "")
    return fixed


def _readable(path: Path) -> pl.DataFrame | None:
    return None if check_parquet_file(path) is not None else read_parquet(path, "store month file")


def _aside(store: Any, target: Path) -> Path:
    aside: Path = (store.root / "quarantine" / "months" / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
             / target.relative_to(store.root))
    aside.parent.mkdir(parents=True, exist_ok=True)
    return aside


def _repair_parquet(store: Any, check: MonthCheck,
                    build: Callable[[pl.DataFrame | None], pl.DataFrame]) -> Path | None:
    """Rewrite the month as one base file with ``build(stored rows or None)``; when that is empty, move the
    month's files aside (the base's new place returned) so the store reads again. Under the store's writer
    lock from read to rename.

    The month is its base plus live deltas (:mod:`rltrader.data.parquet_store`): the rows of every readable one
    are kept, the new base records the last delta seq it replaces (one rename supersedes them all), and the
    deltas are unlinked after it — hard-linked beside the old base in the quarantine folder first."""
    from rltrader.data.parquet_store import BASE_NAME, list_month, write_month_file

    assert check.path is not None
    month_dir = Path(check.path).parent
    target = month_dir / BASE_NAME
    with store._lock():  # no writer interleaves between our read and our rename
        for stale in month_dir.glob(".*.tmp"):  # left by a killed writer: never read
            stale.unlink(missing_ok=True)
        # a base with a broken footer: every delta counts as live
        listing = list_month(month_dir, strict=False, for_writer=True)
        frames = [df for f in listing.files if (df := _readable(f)) is not None]
        rows = build(pl.concat(frames) if frames else None)
        aside = _aside(store, target)
        deltas = [p for _, p in listing.deltas] + list(listing.stale)
        if rows.is_empty():
            for f in [*deltas, *([listing.base] if listing.base else [])]:  # the base last: until it goes,
                os.replace(f, aside.with_name(f.name))  # a killed repair leaves a month a re-run finishes
            return aside
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        write_month_file(rows, tmp, listing.last_seq)
        fault("staged")
        for f in listing.files:
            os.link(f, aside.with_name(f.name))  # the old bytes stay, under the quarantine folder
        fault("aside")
        os.replace(tmp, target)  # the commit point: the new base supersedes every delta listed
        for f in deltas:
            f.unlink(missing_ok=True)
    return None


def _repair_postgres(store: Any, check: MonthCheck, rows: pl.DataFrame, ref: pl.DataFrame | None) -> None:
    """Replace the month's rows by ``rows`` in one transaction (klines/trades: only the rows not kept)."""
    from rltrader.data.pgbounds import bounded
    from rltrader.data.postgres_store import _LOCK_SPACE, AGG_TRADE_COLUMNS, BAR_VALUE_COLUMNS, KLINE_COLUMNS

    kind = check.spec
    lo, hi = month_bounds(check.month)
    series = " ".join(x for x in (check.market, check.symbol, check.interval, check.month) if x)
    # the store's bounds: a tripped one is a StoreError naming the month, and the transaction is rolled back
    with (bounded(store.bounds, f"repair of {kind.pg_table} ({series})") as site,
          store.pool.connection() as conn, conn.transaction()):  # one transaction: all of it or none
        sid = store._series_id(conn, kind.name, check.market, check.symbol, check.interval, create=False)
        assert sid is not None
        if kind is BARS or ref is None:
            conn.execute("DELETE FROM bar_data WHERE series_id = %s AND bucket >= %s AND bucket < %s", (sid, lo, hi))
            fault("deleted")
            cols = ["bucket", *BAR_VALUE_COLUMNS]
            with conn.cursor() as cur, cur.copy(
                    f"COPY bar_data (series_id, {', '.join(cols)}) FROM STDIN".encode()) as cp:
                for row in rows.select(cols).iter_rows():
                    cp.write_row((sid, *row))
            fault("loaded")
            return
        keep = rows.join(ref.select(kind.key), on=kind.key, how="anti")[kind.key].to_list()
        # the per-series lock every writer of the store takes
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE[kind.pg_table], sid))
        conn.execute(f"DELETE FROM {kind.pg_table} WHERE series_id = %s AND {kind.time} >= %s AND {kind.time} < %s "
                     f"AND NOT ({kind.key} = ANY(%s))".encode(), (sid, lo, hi, keep))
        fault("deleted")
        columns, key_type = (KLINE_COLUMNS, "timestamptz") if kind.name == "klines" else (AGG_TRADE_COLUMNS, "int8")
        if not ref.is_empty():
            store._load_series(conn, ref.with_columns(series_id=pl.lit(sid, pl.Int32)), sid, kind.pg_table,
                               columns, kind.key, key_type, site)
        fault("loaded")
