"""``rltrader data verify [--archive] [--repair]``: is every stored month of klines what it should be?

Per series and month, in either store:

- readable (Parquet: the month file parses to the last page) and in the canonical schema;
- rows unique, on the interval grid, inside the month, and the OHLC / volume invariants hold — the same rules
  every source is validated with on the way in (``archive.kline_checks``); PostgreSQL runs them as SQL;
- with an archive: the month's row count and content fingerprint (``klines_fingerprint``) equal those of the
  CHECKSUM-verified archive files for that month; otherwise rows are classified as missing (in the archive, not
  stored), extra (stored, not in the archive: e.g. from the live stream, kept) or differing.

``repair`` rebuilds a failing month from the archive: the month's archive rows, plus the stored rows the archive
does not have (valid ones only). It is idempotent and atomic — Parquet: the new file is written beside the old
one, the old one is hard-linked into ``<store>/quarantine/months/<time>/…`` and the new one renamed over it;
PostgreSQL: delete and reload in one transaction. Killed at any point, the store is as before or repaired, and a
re-run finishes the job.
"""

from __future__ import annotations

import calendar
import os
import signal
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from rltrader.data.archive import ArchiveSource, kline_checks, load_file, parse_period
from rltrader.data.ingest import klines_fingerprint
from rltrader.data.schema import KLINE_SCHEMA, Market, interval_to_timedelta, interval_us
from rltrader.data.store import Store
from rltrader.errors import DataError, NotInArchiveError
from rltrader.integrity import check_parquet_file, read_parquet

FAULT_ENV = "_RLTRADER_TEST_REPAIR_KILL_AT"  # not RLTRADER_*: those are parameters
"""Tests only: a repair step name (``staged``, ``aside``, ``deleted``, ``loaded``) at which the process SIGKILLs
itself, to prove the repair is atomic."""

SEVERITY = ("ok", "extra rows", "missing rows", "differs", "invalid", "unreadable")
"""Statuses, least to most serious. ``extra rows`` (stored rows the archive lacks) is not a failure."""
FAILED = frozenset({"missing rows", "differs", "invalid", "unreadable"})
VALUE_COLUMNS = [c for c in KLINE_SCHEMA if c not in ("market", "symbol", "interval", "open_time")]


@dataclass
class MonthCheck:
    """What ``verify`` found for one series and month."""

    market: str
    symbol: str
    interval: str
    month: str  # YYYY-MM
    status: str = "ok"
    rows: int | None = None  # stored rows; None when unreadable
    archive_rows: int | None = None  # None: not compared (no --archive, or the archive lacks the month)
    missing: int = 0
    extra: int = 0
    differing: int = 0
    detail: str = ""
    path: str | None = None  # the month file (Parquet store)
    repaired: bool = False

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    @property
    def label(self) -> str:
        return f"{self.market} {self.symbol} {self.interval} {self.month}"

    def worsen(self, status: str, note: str) -> None:
        if SEVERITY.index(status) > SEVERITY.index(self.status):
            self.status = status
        self.detail = f"{self.detail}; {note}" if self.detail else note

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    months: list[MonthCheck]

    @property
    def failed(self) -> list[MonthCheck]:
        return [m for m in self.months if m.failed]

    def summary(self) -> str:
        bad = self.failed
        fixed = sum(m.repaired for m in self.months)
        head = f"{len(self.months)} month(s) checked, {fixed} repaired, {len(bad)} with problems"
        return head + (": " + "; ".join(f"{m.label} {m.status}" for m in bad) if bad else "")

    def as_dict(self) -> dict[str, Any]:
        return {"months": [m.as_dict() for m in self.months], "failed": [m.label for m in self.failed]}


def month_bounds(month: str) -> tuple[datetime, datetime]:
    y, m = (int(x) for x in month.split("-"))
    lo = datetime(y, m, 1, tzinfo=UTC)
    return lo, lo + timedelta(days=calendar.monthrange(y, m)[1])


def _fault(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# -- the row rules, one definition for both stores -------------------------------------------------------------
def frame_problems(df: pl.DataFrame, market: str, symbol: str, interval: str, month: str) -> list[str]:
    """Schema, identity, uniqueness, grid, month and OHLC problems of one stored month (empty: none)."""
    if dict(df.schema) != KLINE_SCHEMA:
        want = ", ".join(f"{k} {v}" for k, v in KLINE_SCHEMA.items())
        return [f"schema is not the canonical one ({want})"]
    out = []
    for col, value in (("market", market), ("symbol", symbol), ("interval", interval)):
        n = df.filter(pl.col(col) != value).height
        if n:
            out.append(f"{n} row(s) with {col} != {value}")
    return out + [f"{n} row(s): {why}" for why, n in _rule_counts(df, interval, month).items() if n]


def _rule_counts(df: pl.DataFrame, interval: str, month: str) -> dict[str, int]:
    ints = df.with_columns(pl.col("open_time", "close_time").dt.epoch("us"))
    counts: dict[str, int] = {}
    for expr, why in kline_checks(interval, month_bounds(month)):
        n = int(ints.select(expr.fill_null(True).sum()).item())
        counts[why] = counts.get(why, 0) + n
    return counts


def valid_rows(df: pl.DataFrame, interval: str, month: str) -> pl.DataFrame:
    """The rows of a stored month that pass every rule (duplicates: the first is kept)."""
    df = df.unique(subset=["open_time"], keep="first", maintain_order=True)
    ints = df.with_columns(pl.col("open_time", "close_time").dt.epoch("us"))
    bad = pl.any_horizontal([e.fill_null(True) for e, _ in kline_checks(interval, month_bounds(month))])
    return df.filter(~ints.select(bad.alias("b")).to_series())


def _pg_rule_sql(interval: str) -> list[tuple[str, str]]:
    """``archive.kline_checks`` as SQL conditions (duplicates cannot exist: the primary key)."""
    step, secs = interval_us(interval), int(interval_to_timedelta(interval).total_seconds())

    def nonfinite(c: str) -> str:
        return f"coalesce({c} = 'NaN'::float8 OR abs({c}) = 'Infinity'::float8, false)"

    required = " OR ".join(nonfinite(c) for c in ("open", "high", "low", "close", "volume"))
    optional = " OR ".join(nonfinite(c) for c in ("quote_volume", "taker_buy_volume", "taker_buy_quote_volume"))
    return [
        (f"({required}) OR ({optional})", "non-finite number"),
        (f"(extract(epoch FROM open_time) * 1000000)::bigint %% {step} <> 0", f"open_time not aligned to {interval}"),
        (f"close_time <= open_time OR close_time >= open_time + interval '{secs} seconds'",
         f"close_time not inside the {interval} candle"),
        ("high < low", "high < low"),
        ("low > least(open, close)", "low above open/close"),
        ("high < greatest(open, close)", "high below open/close"),
        ("volume < 0 OR least(quote_volume, taker_buy_volume, taker_buy_quote_volume) < 0", "negative volume"),
        ("coalesce(trades, 0) < 0", "negative trade count"),
    ]


# -- listing months -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    market: str | None = None
    symbols: tuple[str, ...] = ()
    interval: str | None = None
    start: str | None = None  # YYYY-MM (inclusive)
    end: str | None = None

    @staticmethod
    def of(market: str | None = None, symbols: Iterable[str] = (), interval: str | None = None,
           start: str | None = None, end: str | None = None) -> Scope:
        def month(text: str | None, is_end: bool) -> str | None:
            return parse_period(text, end=is_end).strftime("%Y-%m") if text else None

        return Scope(market, tuple(s.upper() for s in symbols), interval, month(start, False), month(end, True))

    def wants_series(self, market: str, symbol: str, interval: str) -> bool:
        return ((self.market is None or market == self.market) and (not self.symbols or symbol in self.symbols)
                and (self.interval is None or interval == self.interval))

    def wants(self, market: str, symbol: str, interval: str, month: str) -> bool:
        return (self.wants_series(market, symbol, interval) and (self.start is None or month >= self.start)
                and (self.end is None or month <= self.end))


def _parquet_months(root: Path, scope: Scope) -> list[tuple[MonthCheck, Path]]:
    out = []
    for f in sorted((root / "klines").glob("market=*/symbol=*/interval=*/month=*/data.parquet")):
        parts = dict(p.split("=", 1) for p in f.parent.relative_to(root / "klines").parts)
        if scope.wants(parts["market"], parts["symbol"], parts["interval"], parts["month"]):
            out.append((MonthCheck(parts["market"], parts["symbol"], parts["interval"], parts["month"],
                                   path=str(f)), f))
    return out


def _check_parquet_month(check: MonthCheck, path: Path) -> pl.DataFrame | None:
    why = check_parquet_file(path)
    if why is not None:
        check.worsen("unreadable", why)  # the file is check.path
        return None
    df = read_parquet(path, "store month file")
    check.rows = df.height
    for p in frame_problems(df, check.market, check.symbol, check.interval, check.month):
        check.worsen("invalid", p)
    return df


def _pg_months(store: Any, scope: Scope) -> list[MonthCheck]:
    out: list[MonthCheck] = []
    with store.pool.connection() as conn:
        series = conn.execute("SELECT id, market, symbol, interval FROM series WHERE kind = 'klines' "
                              "ORDER BY market, symbol, interval").fetchall()
        for sid, market, symbol, interval in series:
            if not scope.wants_series(market, symbol, interval):
                continue
            rules = _pg_rule_sql(interval)
            cols = ", ".join(f"count(*) FILTER (WHERE {cond})" for cond, _ in rules)
            q = (f"SELECT to_char(open_time AT TIME ZONE 'UTC', 'YYYY-MM') AS m, count(*), {cols} "
                 f"FROM kline_data WHERE series_id = %s GROUP BY 1 ORDER BY 1")
            for m, n, *bad in conn.execute(q.encode(), (sid,)).fetchall():
                if not scope.wants(market, symbol, interval, m):
                    continue
                check = MonthCheck(market, symbol, interval, m, rows=int(n))
                for (_, why), k in zip(rules, bad, strict=True):
                    if k:
                        check.worsen("invalid", f"{k} row(s): {why}")
                out.append(check)
    return out


# -- the archive side -----------------------------------------------------------------------------------------
def archive_month(source: ArchiveSource, market: str, symbol: str, interval: str, month: str
                  ) -> pl.DataFrame | None:
    """The month's rows from the CHECKSUM-verified archive files (monthly, or the published daily ones)."""
    lo, hi = month_bounds(month)
    try:
        plans = source.plan(Market(market), "klines", symbol, interval, lo.date(), (hi - timedelta(days=1)).date())
    except NotInArchiveError:
        return None
    frames = [load_file(source, f).rows for f in plans]
    df = pl.concat(frames) if frames else pl.DataFrame(schema=KLINE_SCHEMA)
    return (df.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < hi))
            .unique(subset=["open_time"], keep="first").sort("open_time"))


def compare(check: MonthCheck, stored: pl.DataFrame, archive: pl.DataFrame) -> None:
    """Row count + fingerprint; when they differ, which rows are missing, extra or different."""
    check.archive_rows = archive.height
    stored = stored.unique(subset=["open_time"], keep="first").sort("open_time")
    if stored.height == archive.height and klines_fingerprint(stored) == klines_fingerprint(archive):
        return
    check.missing = archive.join(stored, on="open_time", how="anti").height
    check.extra = stored.join(archive, on="open_time", how="anti").height
    both = archive.join(stored, on="open_time", how="inner", suffix="_s")
    same = pl.all_horizontal([pl.col(c).eq_missing(pl.col(f"{c}_s")) for c in VALUE_COLUMNS])
    check.differing = both.filter(~same).height
    if check.differing:
        check.worsen("differs", f"{check.differing} row(s) differ from the archive")
    if check.missing:
        check.worsen("missing rows", f"{check.missing} archive row(s) not stored")
    if check.extra:
        check.worsen("extra rows", f"{check.extra} stored row(s) not in the archive (kept)")


def _stored_month(store: Store, check: MonthCheck) -> pl.DataFrame:
    lo, hi = month_bounds(check.month)
    return store.read_klines(check.market, check.symbol, check.interval, lo, hi)


# -- verify -----------------------------------------------------------------------------------------------------
def verify_store(store: Store, scope: Scope = Scope(), source: ArchiveSource | None = None, *,
                 repair: bool = False) -> VerifyReport:
    """Check every stored klines month in ``scope``; against ``source`` when given; repair failures if asked."""
    if repair and source is None:
        raise DataError("verify --repair: needs the archive to reload months from (--archive)")
    from rltrader.data.parquet_store import ParquetStore

    frames: dict[str, pl.DataFrame | None] = {}
    if isinstance(store, ParquetStore):
        checks = []
        for check, path in _parquet_months(store.root, scope):
            frames[check.label] = _check_parquet_month(check, path)
            checks.append(check)
    elif hasattr(store, "pool"):
        checks = _pg_months(store, scope)
    else:
        raise DataError(f"verify: unsupported store {store.url}")
    for check in checks:
        if source is None or check.status == "unreadable":
            continue
        archive = archive_month(source, check.market, check.symbol, check.interval, check.month)
        if archive is None:
            check.detail = (check.detail + "; " if check.detail else "") + "not in the archive"
            continue
        stored = frames.get(check.label)
        compare(check, stored if stored is not None else _stored_month(store, check), archive)
    if repair:
        assert source is not None
        for i, check in enumerate(checks):
            if check.failed:
                checks[i] = repair_month(store, source, check)
    return VerifyReport(checks)


# -- repair -----------------------------------------------------------------------------------------------------
def repaired_rows(stored: pl.DataFrame | None, archive: pl.DataFrame, interval: str, month: str) -> pl.DataFrame:
    """The archive's rows, plus stored rows the archive does not have that pass every rule."""
    rows = archive
    if stored is not None and not stored.is_empty():
        keep = valid_rows(stored, interval, month).join(archive.select("open_time"), on="open_time", how="anti")
        rows = pl.concat([archive, keep])
    return rows.select(list(KLINE_SCHEMA)).cast(KLINE_SCHEMA).sort("open_time")  # type: ignore[arg-type]


def repair_month(store: Store, source: ArchiveSource, check: MonthCheck) -> MonthCheck:
    """Rebuild one month from the archive (atomically); returns the month verified again."""
    archive = archive_month(source, check.market, check.symbol, check.interval, check.month)
    if archive is None or archive.is_empty():
        check.detail += "; not repaired: the archive has no file for this month"
        return check
    from rltrader.data.parquet_store import ParquetStore

    if isinstance(store, ParquetStore):
        _repair_parquet(store, check, archive)
    else:
        _repair_postgres(store, check, archive)
    again = verify_store(store, Scope(check.market, (check.symbol,), check.interval, check.month, check.month),
                         source).months
    if not again:  # nothing stored and nothing in the archive: nothing to verify
        return check
    again[0].repaired = True
    again[0].detail = f"repaired (was {check.status}: {check.detail})" + (f"; {again[0].detail}" if again[0].detail
                                                                         else "")
    return again[0]


def _repair_parquet(store: Any, check: MonthCheck, archive: pl.DataFrame) -> None:
    from rltrader.data.parquet_store import write_month_file

    assert check.path is not None
    target = Path(check.path)
    with store._lock():  # no writer interleaves between our read and our rename
        for stale in target.parent.glob(".data.parquet.*.tmp"):  # left by a killed writer: never read
            stale.unlink(missing_ok=True)
        stored = None if check_parquet_file(target) is not None else read_parquet(target, "store month file")
        rows = repaired_rows(stored, archive, check.interval, check.month)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        write_month_file(rows, tmp)
        _fault("staged")
        aside = (store.root / "quarantine" / "months" / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
                 / target.relative_to(store.root))
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.link(target, aside)  # the old bytes stay, under the quarantine folder
        _fault("aside")
        os.replace(tmp, target)


def _repair_postgres(store: Any, check: MonthCheck, archive: pl.DataFrame) -> None:
    from rltrader.data.postgres_store import _LOCK_SPACE, KLINE_COLUMNS

    lo, hi = month_bounds(check.month)
    stored = _stored_month(store, check)
    rows = repaired_rows(stored, archive, check.interval, check.month)
    keep = rows.join(archive.select("open_time"), on="open_time", how="anti")["open_time"].to_list()
    with store.pool.connection() as conn, conn.transaction():  # one transaction: all of it or none
        sid = store._series_id(conn, "klines", check.market, check.symbol, check.interval, create=False)
        assert sid is not None
        # the per-series lock every writer of the store takes
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE["kline_data"], sid))
        conn.execute("DELETE FROM kline_data WHERE series_id = %s AND open_time >= %s AND open_time < %s "
                     "AND NOT (open_time = ANY(%s))", (sid, lo, hi, keep))
        _fault("deleted")
        store._load_series(conn, archive.with_columns(series_id=pl.lit(sid, pl.Int32)), sid, "kline_data",
                           KLINE_COLUMNS, "open_time", "timestamptz")
        _fault("loaded")

