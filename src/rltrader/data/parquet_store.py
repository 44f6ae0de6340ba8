"""Embedded Parquet store: the default, needs no server, and is what DVC stages read.

Layout (hive-style, one folder per month)::

    <root>/klines/market=futures-um/symbol=FILUSDT/interval=1m/month=2023-08/data.parquet
    <root>/klines/market=futures-um/symbol=FILUSDT/interval=1m/month=2023-08/delta-0000000007.parquet
    <root>/agg_trades/market=spot/symbol=BTCUSDT/month=2026-01/data.parquet
    <root>/bars/width=5s/market=spot/symbol=BTCUSDT/month=2026-01/data.parquet
    <root>/quarantine/<utc-time>-<n>.parquet

A month is its base file ``data.parquet`` plus the *live* delta files beside it (append-then-compact): a commit
into a month that already has a base writes only its new rows, as ``delta-<seq>.parquet`` (seq grows by one per
delta), so a live stream's commit costs what it writes, not what the month holds (a whole-month rewrite per
commit capped the stream's ceiling). The base records in its footer (``rltrader_through_delta``) the last delta
seq merged into it; a delta whose seq is at or below that is *superseded* (its rows are in the base) and every
reader ignores it. Readers must list a month with :func:`month_files` (the store's reads, ``stats``, ``verify``,
the SQL views do): a glob of ``data.parquet`` alone misses the deltas' rows.

Compaction merges the live deltas into a new base: when a commit would leave more than ``max_deltas`` deltas or
more than ``max_delta_rows`` delta rows, at :meth:`ParquetStore.close` for the months this store wrote deltas
into, and on :meth:`ParquetStore.compact`. Crash-safe by ordering: the new base (through = the last merged seq)
is written under a temporary name, renamed over the old one (one atomic step: before it the old base + deltas are
read, after it the new base and the now-superseded deltas are ignored), and only then are the merged deltas
unlinked (one left behind by a crash is superseded, never counted twice, and removed by the next writer).

Every file is prepared under a temporary (dot-)name and renamed into place, so a crash never leaves a torn file;
writers hold an exclusive ``flock`` on the store so two processes cannot interleave read-merge-write cycles.
Key semantics are those of :mod:`rltrader.data.store` in every file state: a row whose key is stored (in the
base or a live delta) is skipped, the first one offered wins.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from rltrader.data.schema import (
    AGG_TRADE_KEY,
    AGG_TRADE_SCHEMA,
    BAR_SCHEMA,
    KLINE_KEY,
    KLINE_SCHEMA,
    QUARANTINE_SCHEMA,
)
from rltrader.data.store import NULLABLE, NULLABLE_BARS, SeriesStats, WriteResult, check_required, trade_bars_frame
from rltrader.errors import DataError
from rltrader.integrity import (
    STORE_REPAIR_HINT,
    aggregate_files,
    parse_errors,
    reading,
    scan_or_name,
    write_parquet,
)

BASE_NAME = "data.parquet"
DELTA_PREFIX = "delta-"
THROUGH_KEY = b"rltrader_through_delta"
MAX_DELTAS = 32
"""Default: a month with more live deltas than this is compacted (reads open base + up to this many files)."""
MAX_DELTA_ROWS = 250_000
"""Default: a month whose deltas would hold more rows than this is compacted (a big batch goes to the base)."""


def _month_key(ts: datetime) -> str:
    return f"{ts.year:04d}-{ts.month:02d}"


def delta_name(seq: int) -> str:
    return f"{DELTA_PREFIX}{seq:010d}.parquet"


def delta_seq(name: str) -> int | None:
    """The seq of a delta file name, None for any other name (temporary files start with a dot)."""
    if not (name.startswith(DELTA_PREFIX) and name.endswith(".parquet")):
        return None
    digits = name[len(DELTA_PREFIX):-len(".parquet")]
    return int(digits) if digits.isdigit() else None


def write_month_file(df: pl.DataFrame, path: Path, through: int = 0) -> None:
    """How a month file is written (by every write and by ``rltrader data verify --repair``, byte for byte):
    zstd, statistics, and a CRC per page so a flipped byte is caught by a checked read (``verify``, merges).
    ``through``: the last delta seq whose rows this base holds (0 for a delta, or a base that merged none)."""
    table = df.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), THROUGH_KEY: str(through).encode()})
    write_parquet(table, path)


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    """Identity of one version of a file: a rename over it (compaction, repair) changes the inode."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


_THROUGH: dict[str, tuple[tuple[int, int, int], int]] = {}


def base_through(path: Path, st: os.stat_result | None = None) -> int:
    """The last delta seq merged into the base ``path`` (0 for a base written before deltas existed); the
    footer is read once per file version (cached by inode, size, mtime). A bad footer: DataError naming it."""
    import pyarrow.parquet as pq

    st = st or path.stat()
    hit = _THROUGH.get(str(path))
    if hit is not None and hit[0] == _sig(st):
        return hit[1]
    with reading(path, "store month file", STORE_REPAIR_HINT):
        meta = pq.read_metadata(path).metadata or {}
        raw = meta.get(THROUGH_KEY, b"0")
        if not raw.isdigit():
            raise ValueError(f"footer key {THROUGH_KEY.decode()}={raw!r} is not a delta seq")
        through = int(raw)
    _THROUGH[str(path)] = (_sig(st), through)
    return through


@dataclass(frozen=True)
class MonthListing:
    """One month folder as a reader must see it: the base (if any), the live deltas in seq order, and the
    superseded deltas (rows already in the base; left by a crash between a compaction's rename and unlink)."""

    base: Path | None
    deltas: tuple[tuple[int, Path], ...]
    stale: tuple[Path, ...]
    last_seq: int  # the highest seq seen (base's through included): the next delta is last_seq + 1
    base_sig: tuple[int, int, int] | None = None  # the base version whose footer gave the split live/stale

    @property
    def files(self) -> list[Path]:
        return ([self.base] if self.base else []) + [p for _, p in self.deltas]


def list_month(month_dir: Path, strict: bool = True, for_writer: bool = False) -> MonthListing:
    """The files of one month folder. ``strict=False`` (verify): a base whose footer cannot be read counts as
    having merged no delta, so the month still lists (and verify reports the base as unreadable).
    ``for_writer``: read the base's footer even when no delta is left, as ``last_seq`` must not fall back below
    the base's through (a reader of a month without deltas needs only the base and skips that footer)."""
    try:
        entries = list(os.scandir(month_dir))
    except FileNotFoundError:
        return MonthListing(None, (), (), 0)
    base: Path | None = None
    base_st: os.stat_result | None = None
    seqs: list[tuple[int, Path]] = []
    for e in entries:
        if e.name == BASE_NAME:
            base, base_st = Path(e.path), e.stat()
        elif (s := delta_seq(e.name)) is not None:
            seqs.append((s, Path(e.path)))
    seqs.sort()
    through = 0
    if base is not None and (seqs or for_writer):
        try:
            through = base_through(base, base_st)
        except DataError:
            if strict:
                raise
    live = tuple((s, p) for s, p in seqs if s > through)
    stale = tuple(p for s, p in seqs if s <= through)
    return MonthListing(base, live, stale, max([through, *(s for s, _ in seqs)]),
                        _sig(base_st) if base_st is not None else None)


def month_files(month_dir: Path, strict: bool = True) -> list[Path]:
    """Every file holding the month's rows (base first, then live deltas by seq): what a reader must read."""
    return list_month(month_dir, strict).files


def store_month_dirs(root: Path, table: str, levels: int) -> list[Path]:
    """The month folders of one table (``levels``: partition folders above ``month=``), sorted."""
    base = root / table
    return sorted(base.glob("/".join(["*"] * levels + ["month=*"]))) if base.is_dir() else []


def live_files(root: Path, table: str, levels: int) -> list[Path]:
    """Every file a reader of ``table`` must read, over all months (the SQL views)."""
    return [f for d in store_month_dirs(root, table, levels) for f in month_files(d)]


@dataclass(frozen=True)
class _KeyRange:
    """Rows and key range (physical ints) of one file version: a commit reads a file's keys only when the
    keys it offers fall inside this range (a stream appending newer keys never does)."""

    sig: tuple[int, int, int]
    rows: int
    lo: int | None
    hi: int | None


class ParquetStore:
    """Store backed by Parquet files under one folder (layout and crash safety: the module docstring)."""

    def __init__(self, root: Path, max_deltas: int = MAX_DELTAS, max_delta_rows: int = MAX_DELTA_ROWS) -> None:
        if max_deltas < 0 or max_delta_rows < 0:
            raise ValueError("max_deltas and max_delta_rows must be >= 0")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"parquet://{self.root}"
        self.max_deltas, self.max_delta_rows = max_deltas, max_delta_rows
        import pyarrow.parquet  # noqa: F401  (imported now, not inside a live stream's first commit: ~0.1 s)
        self._ranges: dict[str, _KeyRange] = {}
        self._frames: dict[str, tuple[tuple[int, int, int], pl.DataFrame]] = {}  # deltas we wrote, their rows
        self._dirty: dict[Path, tuple[dict[str, pl.DataType], str]] = {}  # months with deltas we wrote

    # -- plumbing --------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _series_dir(self, table: str, **parts: str) -> Path:
        d = self.root / table
        for k, v in parts.items():
            d = d / f"{k}={v}"
        return d

    def _key_range(self, path: Path, key_col: str) -> _KeyRange:
        """Rows and key range of one file, cached per file version (computed from its key column once)."""
        sig = _sig(path.stat())
        hit = self._ranges.get(str(path))
        if hit is not None and hit.sig == sig:
            return hit
        keys = self._keys(path, key_col)
        phys = keys.to_physical()
        out = _KeyRange(sig, keys.len(), phys.min(), phys.max())  # type: ignore[arg-type]
        self._ranges[str(path)] = out
        return out

    def _remember(self, path: Path, df: pl.DataFrame, key_col: str) -> None:
        """Cache what we just renamed into place: its key range, and a delta's rows (a compaction then reads
        only the base from disk: reading ~30 small files cost ~3 ms each, more than the whole merge)."""
        sig = _sig(path.stat())
        phys = df.get_column(key_col).to_physical()
        self._ranges[str(path)] = _KeyRange(sig, df.height, phys.min(), phys.max())  # type: ignore[arg-type]
        if path.name != BASE_NAME:
            self._frames[str(path)] = (sig, df)

    def _forget(self, path: Path) -> None:
        """``path`` is unlinked: drop what we cached about it."""
        self._ranges.pop(str(path), None)
        self._frames.pop(str(path), None)

    @staticmethod
    def _keys(path: Path, key_col: str) -> pl.Series:
        return _read_checked(path, [key_col]).get_column(key_col)

    def _read_file(self, path: Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        hit = self._frames.get(str(path))
        if hit is not None and hit[0] == _sig(path.stat()):  # a delta this store wrote, unchanged since
            return hit[1]
        return _read_checked(path).cast(schema)  # type: ignore[arg-type]

    def _merged(self, listing: MonthListing, schema: dict[str, pl.DataType], sort_col: str,
                new: pl.DataFrame | None = None) -> pl.DataFrame:
        frames = [self._read_file(f, schema) for f in listing.files]
        if new is not None:
            frames.append(new)
        return pl.concat(frames).sort(sort_col) if frames else pl.DataFrame(schema=schema)

    def _upsert(
        self,
        df: pl.DataFrame,
        table: str,
        schema: dict[str, pl.DataType],
        partition_cols: Sequence[str],
        time_col: str,
        key: Sequence[str],
        sort_col: str,
        extra_parts: dict[str, str] | None = None,
    ) -> WriteResult:
        """Store the rows whose key is not stored yet (first offered wins); all-or-nothing per call.

        Per month: into an empty month, the rows become its base; otherwise they are checked against the keys
        of the base and live deltas whose key range they touch, and written as one new delta — or, when that
        would pass ``max_deltas``/``max_delta_rows``, merged with base and deltas into a new base."""
        if df.is_empty():
            return WriteResult(0, 0)
        df = df.select(list(schema)).cast(schema)  # type: ignore[arg-type]
        check_required(df, NULLABLE_BARS if table == "bars" else NULLABLE, table)
        df = df.unique(subset=list(key), keep="first", maintain_order=True)
        [key_col] = [k for k in key if k not in partition_cols]  # the key within one series folder
        offered = df.height
        t = pl.col(time_col)  # year * 100 + month: one integer op (a per-row strftime cost more than the write)
        df = df.with_columns(_month=t.dt.year().cast(pl.Int32) * 100 + t.dt.month().cast(pl.Int32))
        groups = df.partition_by([*partition_cols, "_month"], maintain_order=True, include_key=True,
                                 as_dict=True)
        staged: list[tuple[Path, Path, pl.DataFrame, tuple[Path, ...]]] = []  # tmp, target, rows, superseded
        inserted = compactions = 0
        with self._lock():
            try:
                for group_key, part in groups.items():
                    values = dict(zip([*partition_cols, "_month"], group_key, strict=True))
                    parts = dict(extra_parts or {})
                    parts.update({c: str(values[c]) for c in partition_cols})
                    ym = int(values["_month"])  # type: ignore[call-overload]
                    month_dir = self._series_dir(table, **parts) / f"month={ym // 100:04d}-{ym % 100:02d}"
                    listing = list_month(month_dir, for_writer=True)
                    new = self._only_new(part.drop("_month"), listing, key_col)
                    if new.is_empty():
                        continue
                    inserted += new.height
                    staged.append(self._stage(month_dir, listing, new, schema, sort_col, key_col,
                                              may_compact=compactions == 0))
                    compactions += staged[-1][1].name == BASE_NAME
            except BaseException:
                for tmp, *_ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            for tmp, target, rows, superseded in staged:
                os.replace(tmp, target)
                self._remember(target, rows, key_col)
                for old in superseded:  # after the rename: the new base supersedes them already
                    old.unlink(missing_ok=True)
                    self._forget(old)
                if target.name != BASE_NAME:
                    self._dirty[target.parent] = (schema, sort_col)
                else:
                    self._dirty.pop(target.parent, None)
        return WriteResult(inserted, offered - inserted)

    def _only_new(self, new: pl.DataFrame, listing: MonthListing, key_col: str) -> pl.DataFrame:
        """``new`` less the rows whose key the month's base or live deltas hold."""
        for stale in listing.stale:  # superseded (a crash after a compaction's rename): we hold the lock
            stale.unlink(missing_ok=True)
            self._forget(stale)
        phys = new.get_column(key_col).to_physical()
        lo, hi = phys.min(), phys.max()
        for f in listing.files:
            r = self._key_range(f, key_col)
            if r.rows and r.lo <= hi and lo <= r.hi:  # type: ignore[operator]
                # an overlapping write is a backfill or repair of this month: the whole file is read checked
                # (every page's CRC), as the whole-month merge did, so a damaged month is named before anything
                # is written beside it; a stream's appends never overlap and never pay for it
                hit = self._frames.get(str(f))  # a delta this store wrote, unchanged since: rows in memory
                rows = hit[1] if hit is not None and hit[0] == _sig(f.stat()) else _read_checked(f)
                new = new.join(rows.select(key_col), on=key_col, how="anti")
                if new.is_empty():
                    break
        return new

    def _stage(self, month_dir: Path, listing: MonthListing, new: pl.DataFrame, schema: dict[str, pl.DataType],
               sort_col: str, key_col: str, may_compact: bool
               ) -> tuple[Path, Path, pl.DataFrame, tuple[Path, ...]]:
        """Write the file this commit adds to one month under a temporary name: a delta, or a new base.

        The thresholds are soft within one call: after its first compaction, a call's other months compact
        only past twice the thresholds. A stream's symbols fill their months in step and would otherwise all
        compact in the same commit, one lag spike of N compactions instead of N spikes of one."""
        delta_rows = sum(self._key_range(p, key_col).rows for _, p in listing.deltas)
        month_dir.mkdir(parents=True, exist_ok=True)
        superseded: tuple[Path, ...]
        if listing.base is None and not listing.deltas:
            target, rows, through, superseded = month_dir / BASE_NAME, new.sort(sort_col), listing.last_seq, ()
        elif listing.base is None or self._over(len(listing.deltas) + 1, delta_rows + new.height,
                                                1 if may_compact else 2):
            target, through = month_dir / BASE_NAME, listing.last_seq
            rows = self._merged(listing, schema, sort_col, new)
            superseded = tuple(p for _, p in listing.deltas)
        else:
            target, rows, through, superseded = month_dir / delta_name(listing.last_seq + 1), new, 0, ()
        tmp = month_dir / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            write_month_file(rows, tmp, through)
        except BaseException:  # a half-written temporary file (full disk) is not left behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp, target, rows, superseded

    def _over(self, deltas: int, rows: int, factor: int) -> bool:
        return deltas > factor * self.max_deltas or rows > factor * self.max_delta_rows

    def _compact_month(self, month_dir: Path, schema: dict[str, pl.DataType], sort_col: str) -> bool:
        """Merge a month's live deltas into its base (caller holds the lock); False when it had none."""
        listing = list_month(month_dir, for_writer=True)
        for stale in listing.stale:
            stale.unlink(missing_ok=True)
        if not listing.deltas:
            return False
        rows = self._merged(listing, schema, sort_col)
        target = month_dir / BASE_NAME
        tmp = month_dir / f".{BASE_NAME}.{uuid.uuid4().hex}.tmp"
        try:
            write_month_file(rows, tmp, listing.last_seq)
            os.replace(tmp, target)  # the commit point: from here on the deltas are superseded
        finally:
            tmp.unlink(missing_ok=True)
        for _, p in listing.deltas:
            p.unlink(missing_ok=True)
            self._forget(p)
        return True

    def compact(self) -> int:
        """Merge every month's live deltas into its base (e.g. before copying the store by hand); returns
        the number of months compacted."""
        n = 0
        with self._lock():
            for table, levels, (schema, sort_col) in _TABLES:
                for d in store_month_dirs(self.root, table, levels):
                    n += self._compact_month(d, schema, sort_col)
            self._dirty.clear()
        return n

    def _scan(
        self,
        series_dir: Path,
        schema: dict[str, pl.DataType],
        time_col: str,
        start: datetime | None,
        end: datetime | None,
        sort_col: str,
    ) -> pl.DataFrame:
        """Base + live deltas of the months in range, in one scan. Lock-free: a compaction may rename a new base
        in between our listing and our read (and we would read its rows and the deltas it merged), so the read
        is accepted only if every base is the version listed, else done again (a compaction is rare)."""
        if not series_dir.is_dir():
            return pl.DataFrame(schema=schema)
        lo = _month_key(start) if start else ""
        hi = _month_key(end) if end else "9999-99"
        dirs = sorted(p for p in series_dir.iterdir() if p.name.startswith("month=") and lo <= p.name[6:] <= hi)

        def collect(fs: Sequence[Path]) -> pl.DataFrame:
            lf = pl.scan_parquet(list(fs))
            if start is not None:
                lf = lf.filter(pl.col(time_col) >= start)
            if end is not None:
                lf = lf.filter(pl.col(time_col) < end)
            return lf.sort(sort_col).collect().cast(schema)  # type: ignore[arg-type]

        for _ in range(20):
            listings = [list_month(d) for d in dirs]
            files = [f for m in listings for f in m.files]
            if not files:
                return pl.DataFrame(schema=schema)
            bases = {m.base: m.base_sig for m in listings if m.base is not None and m.base_sig and m.deltas}
            try:
                out = collect(files)
            except parse_errors():
                if all(f.exists() for f in files) and _same(bases):
                    return scan_or_name(files, collect, "store month file", STORE_REPAIR_HINT)
                continue  # a compaction unlinked what we listed: list again
            if _same(bases):
                return out
        raise DataError(f"{series_dir}: the months kept changing under the reader (20 compactions in a row)")

    # -- klines ----------------------------------------------------------------------------------------
    def write_klines(self, df: pl.DataFrame) -> WriteResult:
        return self._upsert(df, "klines", KLINE_SCHEMA, ["market", "symbol", "interval"], "open_time",
                            KLINE_KEY, "open_time")

    def read_klines(
        self, market: str, symbol: str, interval: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("klines", market=market, symbol=symbol, interval=interval)
        return self._scan(d, KLINE_SCHEMA, "open_time", start, end, "open_time")

    # -- trades ----------------------------------------------------------------------------------------
    def write_agg_trades(self, df: pl.DataFrame) -> WriteResult:
        return self._upsert(df, "agg_trades", AGG_TRADE_SCHEMA, ["market", "symbol"], "transact_time",
                            AGG_TRADE_KEY, "agg_trade_id")

    def read_agg_trades(
        self, market: str, symbol: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("agg_trades", market=market, symbol=symbol)
        return self._scan(d, AGG_TRADE_SCHEMA, "transact_time", start, end, "agg_trade_id")

    # -- bars ------------------------------------------------------------------------------------------
    def write_bars(self, df: pl.DataFrame, width: str) -> WriteResult:
        return self._upsert(df, "bars", BAR_SCHEMA, ["market", "symbol"], "bucket",
                            ("market", "symbol", "bucket"), "bucket", extra_parts={"width": width})

    def read_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("bars", width=width, market=market, symbol=symbol)
        return self._scan(d, BAR_SCHEMA, "bucket", start, end, "bucket")

    def trade_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        return trade_bars_frame(self.read_agg_trades(market, symbol, start, end), width)

    # -- quarantine & stats ----------------------------------------------------------------------------
    def quarantine(self, bad: pl.DataFrame) -> int:
        if bad.is_empty():
            return 0
        out = bad.with_columns(quarantined_at=pl.lit(datetime.now(UTC))).select(list(QUARANTINE_SCHEMA))
        d = self.root / "quarantine"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = d / f".{name}.tmp"
        out.cast(QUARANTINE_SCHEMA).write_parquet(tmp)  # type: ignore[arg-type]
        os.replace(tmp, d / name)
        return out.height

    def read_quarantine(self) -> pl.DataFrame:
        d = self.root / "quarantine"
        files = sorted(d.glob("*.parquet")) if d.is_dir() else []
        if not files:
            return pl.DataFrame(schema=QUARANTINE_SCHEMA)
        return scan_or_name(files, lambda fs: pl.read_parquet(list(fs)).cast(QUARANTINE_SCHEMA),  # type: ignore[arg-type]
                            "quarantine file", "move it out of the quarantine folder")

    def stats(self) -> list[SeriesStats]:
        out: list[SeriesStats] = []
        specs = [
            ("klines", "klines", ["market", "symbol", "interval"], "open_time"),
            ("agg_trades", "agg_trades", ["market", "symbol"], "transact_time"),
            ("bars", "bars", ["width", "market", "symbol"], "bucket"),
        ]
        for kind, table, levels, time_col in specs:
            base = self.root / table
            for series in sorted(base.glob("/".join(["*"] * len(levels)))) if base.is_dir() else []:
                files = [f for d in sorted(series.glob("month=*")) for f in month_files(d, strict=False)]
                if not files:
                    continue
                parts = dict(p.split("=", 1) for p in series.relative_to(base).parts)
                n, lo, hi, broken = aggregate_files(files, time_col)  # a broken month is listed, not fatal
                out.append(SeriesStats(kind, parts["market"], parts["symbol"],
                                       parts.get("interval", parts.get("width", "")), n, lo, hi,
                                       tuple(str(f) for f in broken)))
        return out

    def close(self) -> None:
        """Compact the months this store wrote deltas into (a stream's session ends with plain month files)."""
        if not self._dirty:
            return
        with self._lock():
            for d, (schema, sort_col) in sorted(self._dirty.items()):
                self._compact_month(d, schema, sort_col)
            self._dirty.clear()


_TABLES: list[tuple[str, int, tuple[dict[str, pl.DataType], str]]] = [
    ("klines", 3, (KLINE_SCHEMA, "open_time")),  # type: ignore[list-item]
    ("agg_trades", 2, (AGG_TRADE_SCHEMA, "agg_trade_id")),  # type: ignore[list-item]
    ("bars", 3, (BAR_SCHEMA, "bucket")),  # type: ignore[list-item]
]


def _read_checked(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """One store file, page CRCs verified (as :func:`rltrader.integrity.read_arrow`), through ``ParquetFile``:
    ``pq.read_table`` builds a dataset per call (~7 ms each here, and a ~1 s import of ``pyarrow.dataset`` and
    pandas on first use, paid inside a live stream's commit)."""
    import pyarrow.parquet as pq

    with reading(path, _what(path), STORE_REPAIR_HINT), pq.ParquetFile(path, page_checksum_verification=True) as fh:
        out = pl.from_arrow(fh.read(columns=columns))
    assert isinstance(out, pl.DataFrame)
    return out


def _what(path: Path) -> str:
    return "store month file" if path.name == BASE_NAME else "store delta file"


def _same(sigs: dict[Path, tuple[int, int, int]]) -> bool:
    """True when every base is still the version whose footer the listing used."""
    try:
        return all(_sig(p.stat()) == s for p, s in sigs.items())
    except FileNotFoundError:
        return False
