"""Ingest benchmark: every shared 1m kline zip into PostgreSQL and Parquet, ours against a naive peer.

    python benchmarks/bench_ingest.py [--quick] [--archive-base PATH] [--repeats N]

One run starts its own throwaway PostgreSQL server (``rltrader.testing.TempPostgres``), loads the same files
with our path and with the peer into separate databases of that server, and prints one JSON line per figure
on stdout::

    {"metric": ..., "value": ..., "unit": ..., "peer": ..., "peer_value": ..., "ratio": ...}

``ratio`` is ours / peer (> 1: ours is better). A human-readable table goes to stderr.

Figures
  1. ``pg_write_new_rows_per_s``: ``PostgresStore.write_klines`` of frames already parsed (one call per file,
     as ``backfill`` does) into an empty database, against psycopg ``executemany`` of
     ``INSERT … ON CONFLICT DO NOTHING`` into a plain table keyed (market, symbol, interval, open_time) with the
     same columns. The peer's Python rows are built outside its timer (generous to the peer).
  2. ``pg_write_reload_rows_per_s``: the same frames again into the loaded databases; both must insert 0 rows.
  3. ``pg_backfill_e2e_rows_per_s`` / ``parquet_backfill_e2e_rows_per_s``: ``ingest.backfill`` from the zips
     (sha256 check, CRC-checked unzip, parse, validate, store, gap scan). Peer: a naive loader, the ``csv``
     module over the zip member (with the same sha256 check) feeding the executemany path above, resp.
     ``pyarrow.parquet.write_table`` per file.
  4. ``parquet_write_new_rows_per_s`` / ``parquet_write_reload_rows_per_s``: ``ParquetStore.write_klines``
     against ``pandas.DataFrame.to_parquet`` of the same frame when pandas is installed, else
     ``pyarrow.parquet.write_table`` of the same Arrow table (zstd, as our store writes). The peer is not
     idempotent: its "re-load" simply rewrites the files.

Row counts are asserted: every table holds exactly the files' data rows after a load, and re-loads insert 0.
``--quick`` (< 1 min) runs the executemany peers on a subset of the files (stated in the ``peer`` field) and
ours once on the full set.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import shutil
import signal
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import _harness as h
import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

REPO = h.REPO  # _harness put src/ on the path when the package is not installed

from psycopg.copy import QueuedLibpqWriter  # noqa: E402

from rltrader.data import pgcopy  # noqa: E402
from rltrader.data.archive import ArchiveFile, ArchiveSource, Freq, load_file  # noqa: E402
from rltrader.data.ingest import backfill  # noqa: E402
from rltrader.data.parquet_store import ParquetStore, live_files  # noqa: E402
from rltrader.data.postgres_store import KLINE_COLUMNS, PostgresStore  # noqa: E402
from rltrader.data.schema import Market  # noqa: E402
from rltrader.testing import TempPostgres  # noqa: E402

DEFAULT_ARCHIVE_BASE = REPO.parent / "shared" / "data" / "binance"
INTERVAL = "1m"
US_THRESHOLD = 10**14  # epochs at or above this are microseconds (spot files from 2025 on)

PEER_TABLE_DDL = """
CREATE TABLE klines_peer (
    market                 text             NOT NULL,
    symbol                 text             NOT NULL,
    interval               text             NOT NULL,
    open_time              timestamptz      NOT NULL,
    open                   double precision NOT NULL,
    high                   double precision NOT NULL,
    low                    double precision NOT NULL,
    close                  double precision NOT NULL,
    volume                 double precision NOT NULL,
    close_time             timestamptz      NOT NULL,
    quote_volume           double precision,
    trades                 bigint,
    taker_buy_volume       double precision,
    taker_buy_quote_volume double precision,
    PRIMARY KEY (market, symbol, interval, open_time)
)"""
PEER_INSERT = (
    "INSERT INTO klines_peer (market, symbol, interval, open_time, open, high, low, close, volume, close_time, "
    "quote_volume, trades, taker_buy_volume, taker_buy_quote_volume) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
PEER_EXECUTEMANY = "psycopg executemany INSERT ON CONFLICT DO NOTHING"


log = h.logger("bench_ingest")


# -- the data set ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KlineFile:
    archive: ArchiveFile
    path: Path


def discover(base: Path) -> list[KlineFile]:
    """Every ``<market>/<freq>/klines/<SYMBOL>/1m/*.zip`` under the archive base, in path order."""
    out: list[KlineFile] = []
    for path in sorted(base.rglob(f"*-{INTERVAL}-*.zip")):
        rel = path.relative_to(base).parts
        if len(rel) < 6 or rel[-4] != "klines" or rel[-2] != INTERVAL:
            continue
        market = Market.SPOT if rel[0] == "spot" else Market.FUTURES_UM
        if rel[-5] not in ("monthly", "daily"):
            continue
        freq: Freq = "monthly" if rel[-5] == "monthly" else "daily"
        symbol = rel[-3]
        period = path.stem.split(f"-{INTERVAL}-", 1)[1]
        f = ArchiveFile(market, "klines", symbol, INTERVAL, freq, period)
        if f.relpath != "/".join(rel):
            raise RuntimeError(f"{path}: does not follow the archive layout ({f.relpath})")
        out.append(KlineFile(f, path))
    if not out:
        raise SystemExit(f"no 1m kline zips under {base}")
    return out


def _period_dates(f: ArchiveFile) -> tuple[date, date]:
    lo, hi = f.period_bounds
    return lo.date(), (hi - timedelta(days=1)).date()


def backfill_runs(files: Sequence[KlineFile]) -> list[tuple[Market, str, str, str, int]]:
    """Contiguous runs of files per (market, symbol, freq) → backfill calls ``(market, symbol, start, end, n)``."""
    runs: list[tuple[Market, str, str, str, int]] = []
    key: tuple[Market, str, str] | None = None
    start = end = ""
    last: date | None = None
    n = 0
    for kf in sorted(files, key=lambda k: (k.archive.market, k.archive.symbol, k.archive.freq, k.archive.period)):
        f = kf.archive
        lo, hi = _period_dates(f)
        k = (f.market, f.symbol, f.freq)
        if k == key and last is not None and lo == last + timedelta(days=1):
            end, last, n = f.period, hi, n + 1
            continue
        if key is not None:
            runs.append((key[0], key[1], start, end, n))
        key, start, end, last, n = k, f.period, f.period, hi, 1
    if key is not None:
        runs.append((key[0], key[1], start, end, n))
    return runs


def peer_subset(files: Sequence[KlineFile], target_rows: int, rows_of: dict[Path, int]) -> list[KlineFile]:
    """An evenly strided subset of the files holding about ``target_rows`` rows (for --quick)."""
    total = sum(rows_of[f.path] for f in files)
    if total <= target_rows:
        return list(files)
    stride = max(1, math.ceil(total / target_rows))
    return list(files[::stride])


# -- timing helpers ----------------------------------------------------------------------------------------
Timing = h.Timing


def checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def count_rows(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # table names are constants here
    assert row is not None
    return int(row[0])


# -- our paths ---------------------------------------------------------------------------------------------
def ours_pg_write(url: str, frames: Sequence[pl.DataFrame], expect_inserted: int) -> float:
    """Seconds for write_klines of every frame (one call per file); asserts the inserted count."""
    store = PostgresStore(url)
    try:
        checkpoint(url)
        inserted = skipped = 0
        t0 = time.perf_counter()
        for df in frames:
            r = store.write_klines(df)
            inserted += r.inserted
            skipped += r.skipped
        dt = time.perf_counter() - t0
    finally:
        store.close()
    offered = sum(df.height for df in frames)
    assert inserted == expect_inserted, f"write_klines inserted {inserted}, expected {expect_inserted}"
    assert inserted + skipped == offered, (inserted, skipped, offered)
    return dt


def ours_pg_backfill(url: str, source: ArchiveSource, runs: Sequence[tuple[Market, str, str, str, int]],
                     expect_rows: int) -> float:
    store = PostgresStore(url)
    try:
        checkpoint(url)
        inserted = 0
        t0 = time.perf_counter()
        for market, symbol, start, end, _ in runs:
            inserted += backfill(store, source, market, [symbol], start, end, interval=INTERVAL,
                                 progress=False).inserted
        dt = time.perf_counter() - t0
    finally:
        store.close()
    assert inserted == expect_rows, f"backfill inserted {inserted}, expected {expect_rows}"
    assert count_rows(url, "kline_data") == expect_rows
    return dt


def ours_parquet_backfill(root: Path, source: ArchiveSource, runs: Sequence[tuple[Market, str, str, str, int]],
                          expect_rows: int) -> float:
    store = ParquetStore(root)
    inserted = 0
    t0 = time.perf_counter()
    for market, symbol, start, end, _ in runs:
        inserted += backfill(store, source, market, [symbol], start, end, interval=INTERVAL,
                             progress=False).inserted
    dt = time.perf_counter() - t0
    assert inserted == expect_rows, f"parquet backfill inserted {inserted}, expected {expect_rows}"
    return dt


def ours_parquet_write(root: Path, frames: Sequence[pl.DataFrame], expect_inserted: int) -> float:
    store = ParquetStore(root)
    inserted = 0
    t0 = time.perf_counter()
    for df in frames:
        inserted += store.write_klines(df).inserted
    dt = time.perf_counter() - t0
    assert inserted == expect_inserted, f"parquet write inserted {inserted}, expected {expect_inserted}"
    return dt


def parquet_rows(root: Path) -> int:
    files = live_files(root, "klines", 3)  # base + live deltas per month: what a reader of the store sees
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def raw_copy_ceiling(url: str, frames: Sequence[pl.DataFrame]) -> float:
    """Encode + binary COPY of every frame into an empty kline_data, no key scan: the load path's ceiling."""
    store = PostgresStore(url)  # creates the schema
    store.close()
    prepared = [df.with_columns(series_id=pl.lit(i, pl.Int32)) for i, df in enumerate(frames)]
    names = ", ".join(c for c, _ in KLINE_COLUMNS)
    checkpoint(url)
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for df in prepared:
                with cur.copy(f"COPY kline_data ({names}) FROM STDIN (FORMAT BINARY)",
                              writer=QueuedLibpqWriter(cur)) as cp:
                    cp.write(pgcopy.encode(df, KLINE_COLUMNS))
        dt = time.perf_counter() - t0
    assert count_rows(url, "kline_data") == sum(df.height for df in frames)
    return dt


# -- the peer (naive loaders) ------------------------------------------------------------------------------
def _peer_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    return df.rows()


def peer_pg_write(url: str, frames: Sequence[pl.DataFrame]) -> tuple[float, int]:
    """Seconds spent in executemany (row building excluded) and rowcount sum; one transaction per file."""
    spent = 0.0
    affected = 0
    checkpoint(url)
    with psycopg.connect(url) as conn:
        for df in frames:
            rows = _peer_rows(df)
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                cur.executemany(PEER_INSERT, rows)
                affected += max(cur.rowcount, 0)
            conn.commit()
            spent += time.perf_counter() - t0
    return spent, affected


def _verify_sha256(path: Path) -> None:
    sidecar = path.with_name(path.name + ".CHECKSUM")
    expected = sidecar.read_text().split()[0].lower()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise RuntimeError(f"{path}: checksum mismatch")


def _to_dt(v: str) -> datetime:
    n = int(v)
    us = n if n >= US_THRESHOLD else n * 1000
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def naive_csv_rows(kf: KlineFile) -> Iterator[tuple[Any, ...]]:
    """The zip's CSV through the ``csv`` module, typed per field: what a hand-written loader does."""
    _verify_sha256(kf.path)
    f = kf.archive
    with zipfile.ZipFile(kf.path) as zf:
        member = zf.namelist()[0]
        with zf.open(member) as raw:
            for rec in csv.reader(io.TextIOWrapper(raw, encoding="ascii", newline="")):
                if not rec or not rec[0][:1].isdigit():
                    continue  # header
                yield (f.market.value, f.symbol, INTERVAL, _to_dt(rec[0]), float(rec[1]), float(rec[2]),
                       float(rec[3]), float(rec[4]), float(rec[5]), _to_dt(rec[6]), float(rec[7]), int(rec[8]),
                       float(rec[9]), float(rec[10]))


def count_csv_rows(kf: KlineFile) -> int:
    with zipfile.ZipFile(kf.path) as zf, zf.open(zf.namelist()[0]) as raw:
        return sum(1 for line in io.TextIOWrapper(raw, encoding="ascii") if line[:1].isdigit())


def peer_pg_e2e(url: str, files: Sequence[KlineFile]) -> float:
    checkpoint(url)
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        for kf in files:
            with conn.cursor() as cur:
                cur.executemany(PEER_INSERT, list(naive_csv_rows(kf)))
            conn.commit()
        return time.perf_counter() - t0


PEER_ARROW_SCHEMA = pa.schema([
    ("market", pa.string()), ("symbol", pa.string()), ("interval", pa.string()),
    ("open_time", pa.timestamp("us", "UTC")), ("open", pa.float64()), ("high", pa.float64()),
    ("low", pa.float64()), ("close", pa.float64()), ("volume", pa.float64()),
    ("close_time", pa.timestamp("us", "UTC")), ("quote_volume", pa.float64()), ("trades", pa.int64()),
    ("taker_buy_volume", pa.float64()), ("taker_buy_quote_volume", pa.float64()),
])  # fmt: skip


def peer_parquet_e2e(root: Path, files: Sequence[KlineFile]) -> tuple[float, int]:
    t0 = time.perf_counter()
    for i, kf in enumerate(files):
        cols = list(zip(*naive_csv_rows(kf), strict=True))
        table = pa.table([pa.array(c, type=t.type) for c, t in zip(cols, PEER_ARROW_SCHEMA, strict=True)],
                         schema=PEER_ARROW_SCHEMA)
        pq.write_table(table, root / f"{i:04d}.parquet", compression="zstd")
    dt = time.perf_counter() - t0
    return dt, sum(pq.ParquetFile(p).metadata.num_rows for p in root.glob("*.parquet"))


def parquet_peer_writer() -> tuple[str, Callable[[pl.DataFrame, Path], None]]:
    try:
        import pandas  # noqa: F401
    except ImportError:
        def write_arrow(df: pl.DataFrame, path: Path) -> None:
            pq.write_table(df.to_arrow(), path, compression="zstd")

        return "pyarrow.parquet.write_table (zstd; pandas not installed)", write_arrow

    def write_pandas(df: pl.DataFrame, path: Path) -> None:
        df.to_pandas().to_parquet(path, compression="zstd")

    return "pandas DataFrame.to_parquet (zstd)", write_pandas


def peer_parquet_write(root: Path, frames: Sequence[pl.DataFrame], write: Callable[[pl.DataFrame, Path], None]
                       ) -> float:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, df in enumerate(frames):
        write(df, root / f"{i:04d}.parquet")
    return time.perf_counter() - t0


# -- reporting ---------------------------------------------------------------------------------------------
@dataclass
class Figure:
    metric: str
    ours: Timing
    peer: str | None
    peer_t: Timing | None
    note: str = ""

    def line(self) -> dict[str, Any]:
        pv = self.peer_t.rate if self.peer_t else None
        return h.line(self.metric, self.ours.rate, "rows/s", self.peer, pv, digits=0,
                      ratio_value=h.ratio(self.ours.rate, pv))


def emit(fig: Figure, figures: list[Figure]) -> None:
    figures.append(fig)
    h.emit(fig.line())


def summary(figures: Sequence[Figure], extra: Sequence[str]) -> None:
    head = f"{'metric':34} {'ours rows/s':>12} {'rows':>9} {'best s':>7} {'peer rows/s':>12} {'rows':>9} " \
           f"{'best s':>7} {'ratio':>6}"
    out = ["", head, "-" * len(head)]
    for f in figures:
        p = f.peer_t
        ps = f"{p.rate:12,.0f} {p.rows:9,d} {p.best:7.2f} {f.ours.rate / p.rate:6.2f}" if p else f"{'-':>12}"
        out.append(f"{f.metric:34} {f.ours.rate:12,.0f} {f.ours.rows:9,d} {f.ours.best:7.2f} {ps}")
    out.append("")
    out += [f"peer of {f.metric}: {f.peer}{'; ' + f.note if f.note else ''}" for f in figures]
    out += ["", *extra]
    h.table(out)


# -- main --------------------------------------------------------------------------------------------------
def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the context managers: the server is stopped


def run(args: argparse.Namespace) -> None:
    load0 = os.getloadavg()[0]
    base = Path(args.archive_base).resolve()
    files = discover(base)
    source = ArchiveSource(str(base))
    t0 = time.perf_counter()
    parsed = [load_file(source, kf.archive) for kf in files]
    parse_s = time.perf_counter() - t0
    for kf, p in zip(files, parsed, strict=True):
        if not p.bad.is_empty():
            raise SystemExit(f"{kf.path}: {p.bad.height} invalid rows; the benchmark needs clean files")
    frames = [p.rows for p in parsed]
    rows_of = {kf.path: df.height for kf, df in zip(files, frames, strict=True)}
    csv_rows = {kf.path: count_csv_rows(kf) for kf in files}
    assert csv_rows == rows_of, "parsed row counts differ from the files' data lines"
    total = sum(rows_of.values())
    runs = backfill_runs(files)
    log(f"{len(files)} files, {total:,} rows, {len(runs)} backfill ranges; parse (checksum+unzip+parse+validate) "
        f"{parse_s:.2f} s = {total / parse_s:,.0f} rows/s")

    repeats = args.repeats if args.repeats else (1 if args.quick else 3)
    peer_files = peer_subset(files, args.peer_rows, rows_of) if args.quick else list(files)
    peer_frames = [frames[files.index(kf)] for kf in peer_files]
    peer_total = sum(df.height for df in peer_frames)
    peer_desc = (f"{len(peer_files)} of {len(files)} files, {peer_total:,} rows" if len(peer_files) < len(files)
                 else f"all {len(files)} files, {peer_total:,} rows")
    figures: list[Figure] = []
    extra: list[str] = [f"files: {len(files)}, rows: {total:,}; peer data: {peer_desc}; ours best of {repeats}, "
                        f"executemany peers best of {args.peer_repeats}"]

    with TempPostgres() as pg, tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp_s:
        tmp = Path(tmp_s)
        log(f"PostgreSQL on port {pg.port}")

        # (1) + (2) store write, new range and re-load
        new = Timing(total)
        reload = Timing(total)
        url = ""
        for i in range(repeats):
            url = pg.create_database(f"ours_write_{i}")
            new.seconds.append(ours_pg_write(url, frames, total))
            assert count_rows(url, "kline_data") == total
            for _ in range(repeats if i == repeats - 1 else 0):
                reload.seconds.append(ours_pg_write(url, frames, 0))
            assert count_rows(url, "kline_data") == total
        peer_new = Timing(peer_total)
        peer_reload = Timing(peer_total)
        for i in range(args.peer_repeats):
            purl = pg.create_database(f"peer_write_{i}")
            with psycopg.connect(purl, autocommit=True) as conn:
                conn.execute(PEER_TABLE_DDL)
            dt, affected = peer_pg_write(purl, peer_frames)
            peer_new.seconds.append(dt)
            assert count_rows(purl, "klines_peer") == peer_total
            assert affected == peer_total, (affected, peer_total)
            if i == args.peer_repeats - 1:
                dt, affected = peer_pg_write(purl, peer_frames)
                peer_reload.seconds.append(dt)
                assert affected == 0, f"peer re-load inserted {affected} rows"
                assert count_rows(purl, "klines_peer") == peer_total
        emit(Figure("pg_write_new_rows_per_s", new, f"{PEER_EXECUTEMANY} ({peer_desc})", peer_new,
                    "rows built from the frames outside the peer's timer"), figures)
        emit(Figure("pg_write_reload_rows_per_s", reload, f"{PEER_EXECUTEMANY} re-run ({peer_desc})", peer_reload,
                    "both inserted 0 rows (asserted)"), figures)

        ceiling = Timing(total)
        for i in range(0 if args.quick else repeats):
            ceiling.seconds.append(raw_copy_ceiling(pg.create_database(f"ceiling_{i}"), frames))
        if ceiling.seconds:
            extra.append(f"ceiling, encode + binary COPY into empty kline_data, no key scan: {ceiling.rate:,.0f} "
                         f"rows/s ({ceiling.best:.2f} s); our new-range write reaches "
                         f"{new.rate / ceiling.rate:.0%} of it")

        # (3) end to end from the zips
        e2e = Timing(total)
        for i in range(repeats):
            e2e.seconds.append(ours_pg_backfill(pg.create_database(f"ours_backfill_{i}"), source, runs, total))
        peer_e2e = Timing(peer_total)
        for i in range(args.peer_repeats):
            purl = pg.create_database(f"peer_backfill_{i}")
            with psycopg.connect(purl, autocommit=True) as conn:
                conn.execute(PEER_TABLE_DDL)
            peer_e2e.seconds.append(peer_pg_e2e(purl, peer_files))
            assert count_rows(purl, "klines_peer") == peer_total
        emit(Figure("pg_backfill_e2e_rows_per_s", e2e,
                    f"naive loader: csv module over the zip (sha256 checked) + {PEER_EXECUTEMANY} ({peer_desc})",
                    peer_e2e, f"ours = ingest.backfill, {len(runs)} calls, incl. plan and gap scan"), figures)

        pq_e2e = Timing(total)
        for i in range(repeats):
            root = tmp / f"ours_pq_backfill_{i}"
            pq_e2e.seconds.append(ours_parquet_backfill(root, source, runs, total))
            assert parquet_rows(root) == total
            shutil.rmtree(root)
        pq_peer_e2e = Timing(peer_total)
        for i in range(args.peer_repeats):
            root = tmp / f"peer_pq_backfill_{i}"
            root.mkdir()
            dt, n = peer_parquet_e2e(root, peer_files)
            assert n == peer_total, (n, peer_total)
            pq_peer_e2e.seconds.append(dt)
            shutil.rmtree(root)
        emit(Figure("parquet_backfill_e2e_rows_per_s", pq_e2e,
                    f"naive loader: csv module over the zip (sha256 checked) + pyarrow.parquet.write_table per file "
                    f"({peer_desc})", pq_peer_e2e), figures)

        # (4) Parquet store write, new and re-load
        peer_name, peer_write = parquet_peer_writer()
        pq_new, pq_reload = Timing(total), Timing(total)
        for i in range(repeats):
            root = tmp / f"ours_pq_{i}"
            pq_new.seconds.append(ours_parquet_write(root, frames, total))
            assert parquet_rows(root) == total
            if i == repeats - 1:
                for _ in range(repeats):
                    pq_reload.seconds.append(ours_parquet_write(root, frames, 0))
                assert parquet_rows(root) == total
            shutil.rmtree(root)
        pq_peer = Timing(total)
        pq_peer_re = Timing(total)
        for i in range(repeats):
            root = tmp / f"peer_pq_{i}"
            pq_peer.seconds.append(peer_parquet_write(root, frames, peer_write))
            if i == repeats - 1:
                for _ in range(repeats):
                    pq_peer_re.seconds.append(peer_parquet_write(root, frames, peer_write))
            assert sum(pq.ParquetFile(p).metadata.num_rows for p in root.glob("*.parquet")) == total
            shutil.rmtree(root)
        emit(Figure("parquet_write_new_rows_per_s", pq_new, f"{peer_name}, one file per frame", pq_peer), figures)
        emit(Figure("parquet_write_reload_rows_per_s", pq_reload,
                    f"{peer_name}, rewrite of the same files (not idempotent)", pq_peer_re,
                    "ours inserted 0 rows (asserted)"), figures)

    extra.append(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                 "CPUs: other processes share this machine, so rates vary between runs")
    summary(figures, extra)


def main(argv: Sequence[str] | None = None) -> None:
    ap = h.parser(__doc__, "one repetition; executemany peers on a file subset")
    ap.add_argument("--archive-base", default=str(DEFAULT_ARCHIVE_BASE),
                    help="folder mirroring data.binance.vision's data/ (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=0, help="repetitions of our paths (best of N; default 3, 1 quick)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="repetitions of the executemany peers (slow)")
    ap.add_argument("--peer-rows", type=int, default=100_000, help="--quick: about this many rows for the peers")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    run(args)


if __name__ == "__main__":
    main()
