"""``rltrader data verify [--archive] [--rest-base URL] [--repair]``: is every stored month what it should be?

Per series and month of each kind (klines, aggTrades, the stream's 5 s bars), in either store:

- readable (Parquet: the month file parses to the last page) and in the canonical schema;
- rows unique, inside the month, and the kind's invariants hold (:mod:`rltrader.data.verify_rules`: the rules
  every source is validated with on the way in, plus ordering rules for trades); PostgreSQL runs them as SQL;
- with a source (:mod:`rltrader.data.verify_source`): the month's rows equal those of the CHECKSUM-verified
  archive files (klines: row count + content fingerprint) and, with ``--rest-base``, those REST serves for the
  days the archive has not published; otherwise rows are classified as missing (in the source, not stored),
  extra (stored, not in the source: e.g. from the live stream, kept) or differing.

``repair`` (:mod:`rltrader.data.verify_repair`) rebuilds a failing month from its sources (5 s bars: from the
stored trades), keeping the valid stored rows the sources lack. It is idempotent and atomic — Parquet: the new
file is written beside the old one, the old one is hard-linked into ``<store>/quarantine/months/<time>/…`` and
the new one renamed over it; PostgreSQL: delete and reload in one transaction. Killed at any point, the store is
as before or repaired, and a re-run finishes the job.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from rltrader.data.archive import ArchiveSource, parse_period
from rltrader.data.ingest import klines_fingerprint
from rltrader.data.store import Store
from rltrader.data.verify_rules import AGG_TRADES, BARS, KINDS, KLINES, Kind, pg_rules, rule_counts
from rltrader.data.verify_source import Reference, RestSource, month_bounds, reference_month
from rltrader.errors import DataError
from rltrader.integrity import check_parquet_file, read_parquet

__all__ = ["FAULT_ENV", "MonthCheck", "Scope", "VerifyReport", "month_bounds", "verify_store"]

FAULT_ENV = "_RLTRADER_TEST_REPAIR_KILL_AT"  # not RLTRADER_*: those are parameters
"""Tests only: a repair step name (``staged``, ``aside``, ``deleted``, ``loaded``) at which the process SIGKILLs
itself, to prove the repair is atomic."""

SEVERITY = ("ok", "extra rows", "missing rows", "differs", "invalid", "unreadable")
"""Statuses, least to most serious. ``extra rows`` (stored rows the sources lack) is not a failure."""
FAILED = frozenset({"missing rows", "differs", "invalid", "unreadable"})
_LABEL = {"klines": "", "agg_trades": "aggTrades", "bars": "bars"}


@dataclass
class MonthCheck:
    """What ``verify`` found for one series and month."""

    market: str
    symbol: str
    interval: str  # kline interval, bar width, or "" for trades
    month: str  # YYYY-MM
    status: str = "ok"
    rows: int | None = None  # stored rows; None when unreadable
    archive_rows: int | None = None  # reference rows (archive + REST); None: not compared
    missing: int = 0
    extra: int = 0
    differing: int = 0
    detail: str = ""
    path: str | None = None  # the month file (Parquet store)
    repaired: bool = False
    kind: str = "klines"  # klines | agg_trades | bars

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.market, self.symbol, _LABEL[self.kind], self.interval, self.month) if p)

    def worsen(self, status: str, note: str) -> None:
        if SEVERITY.index(status) > SEVERITY.index(self.status):
            self.status = status
        self.note(note)

    def note(self, text: str) -> None:
        if text:
            self.detail = f"{self.detail}; {text}" if self.detail else text

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


def fault(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# -- the row rules, one definition for both stores -------------------------------------------------------------
def frame_problems(df: pl.DataFrame, check: MonthCheck) -> list[str]:
    """Schema, identity, uniqueness, grid, month and invariant problems of one stored month (empty: none)."""
    kind = check.spec
    if dict(df.schema) != kind.schema:
        want = ", ".join(f"{k} {v}" for k, v in kind.schema.items())
        return [f"schema is not the canonical one ({want})"]
    out = []
    for col in kind.ident:
        value = getattr(check, col)
        n = df.filter(pl.col(col) != value).height
        if n:
            out.append(f"{n} row(s) with {col} != {value}")
    counts = rule_counts(df, kind, check.interval, month_bounds(check.month))
    return out + [f"{n} row(s): {why}" for why, n in counts.items() if n]


# -- listing months -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    market: str | None = None
    symbols: tuple[str, ...] = ()
    interval: str | None = None  # kline interval / bar width; trades have none and are not filtered by it
    start: str | None = None  # YYYY-MM (inclusive)
    end: str | None = None
    kinds: tuple[str, ...] = ()  # klines, agg_trades, bars; empty: all

    @staticmethod
    def of(market: str | None = None, symbols: Iterable[str] = (), interval: str | None = None,
           start: str | None = None, end: str | None = None, kinds: Iterable[str] = ()) -> Scope:
        def month(text: str | None, is_end: bool) -> str | None:
            return parse_period(text, end=is_end).strftime("%Y-%m") if text else None

        kinds = tuple(kinds)
        for k in kinds:
            if k not in KINDS:
                raise DataError(f"verify: unknown kind {k!r} (expected one of {', '.join(KINDS)})")
        return Scope(market, tuple(s.upper() for s in symbols), interval, month(start, False), month(end, True),
                     kinds)

    def wants_series(self, kind: str, market: str, symbol: str, interval: str) -> bool:
        return ((not self.kinds or kind in self.kinds) and (self.market is None or market == self.market)
                and (not self.symbols or symbol in self.symbols)
                and (self.interval is None or kind == "agg_trades" or interval == self.interval))

    def wants(self, kind: str, market: str, symbol: str, interval: str, month: str) -> bool:
        return (self.wants_series(kind, market, symbol, interval) and (self.start is None or month >= self.start)
                and (self.end is None or month <= self.end))

    def only(self, check: MonthCheck) -> Scope:
        return Scope(check.market, (check.symbol,), check.interval or None, check.month, check.month, (check.kind,))


_LEVELS = {"klines": "market=*/symbol=*/interval=*", "agg_trades": "market=*/symbol=*",
           "bars": "width=*/market=*/symbol=*"}


def _parquet_months(root: Path, scope: Scope) -> list[tuple[MonthCheck, list[Path]]]:
    """Every stored month in scope with the files holding its rows (base + live deltas: ``month_files``)."""
    from rltrader.data.parquet_store import BASE_NAME, month_files

    out = []
    for kind, levels in _LEVELS.items():
        for d in sorted((root / kind).glob(f"{levels}/month=*")):
            files = month_files(d, strict=False)  # a base with a broken footer is listed, then reported
            if not files:
                continue
            parts = dict(p.split("=", 1) for p in d.relative_to(root / kind).parts)
            interval = parts.get("interval", parts.get("width", ""))
            if scope.wants(kind, parts["market"], parts["symbol"], interval, parts["month"]):
                out.append((MonthCheck(parts["market"], parts["symbol"], interval, parts["month"],
                                       path=str(d / BASE_NAME if (d / BASE_NAME) in files else files[0]),
                                       kind=kind), files))
    return out


def _check_parquet_month(check: MonthCheck, files: list[Path]) -> pl.DataFrame | None:
    """The month's rows (base + deltas) checked; None when a file does not parse (``check.path`` names it)."""
    for f in files:
        why = check_parquet_file(f)
        if why is not None:
            check.path = str(f)
            check.worsen("unreadable", why if f.name == "data.parquet" else f"{f.name}: {why}")
            return None
    frames = [read_parquet(f, "store month file") for f in files]
    df = pl.concat(frames) if len(frames) > 1 else frames[0]
    check.rows = df.height
    for p in frame_problems(df, check):
        check.worsen("invalid", p)
    return df


def _pg_month_sql(kind: Kind, conds: list[str]) -> str:
    cols = ", ".join(f"count(*) FILTER (WHERE {c})" for c in conds)
    month = f"to_char({kind.time} AT TIME ZONE 'UTC', 'YYYY-MM')"
    if kind is AGG_TRADES:  # the order rules compare each trade with the previous one by id
        return (f"SELECT m, count(*), {cols} FROM (SELECT *, {month} AS m, "
                "lag(transact_time) OVER w AS prev_time, lag(last_trade_id) OVER w AS prev_last "
                "FROM agg_trade_data WHERE series_id = %s WINDOW w AS (ORDER BY agg_trade_id)) d "
                "GROUP BY 1 ORDER BY 1")
    return f"SELECT {month} AS m, count(*), {cols} FROM {kind.pg_table} WHERE series_id = %s GROUP BY 1 ORDER BY 1"


def _pg_months(store: Any, scope: Scope) -> list[MonthCheck]:
    out: list[MonthCheck] = []
    with store.pool.connection() as conn:
        for kind in (KLINES, AGG_TRADES, BARS):
            series = conn.execute("SELECT id, market, symbol, interval FROM series WHERE kind = %s "
                                  "ORDER BY market, symbol, interval", (kind.name,)).fetchall()
            for sid, market, symbol, interval in series:
                if not scope.wants_series(kind.name, market, symbol, interval):
                    continue
                rules = pg_rules(kind, interval)
                q = _pg_month_sql(kind, [cond for cond, _ in rules])
                for m, n, *bad in conn.execute(q.encode(), (sid,)).fetchall():
                    if not scope.wants(kind.name, market, symbol, interval, m):
                        continue
                    check = MonthCheck(market, symbol, interval, m, rows=int(n), kind=kind.name)
                    for (_, why), k in zip(rules, bad, strict=True):
                        if k:
                            check.worsen("invalid", f"{k} row(s): {why}")
                    out.append(check)
    return out


# -- comparing with the sources ---------------------------------------------------------------------------------
def compare(check: MonthCheck, stored: pl.DataFrame, ref: Reference) -> None:
    """Row count + content; when they differ, which rows are missing, extra or different."""
    kind, reference = check.spec, ref.rows
    check.archive_rows = reference.height
    stored = stored.unique(subset=[kind.key], keep="first").sort(kind.key)
    if stored.height == reference.height and (
            klines_fingerprint(stored) == klines_fingerprint(reference) if kind is KLINES
            else stored.equals(reference)):
        check.note(ref.note())
        return
    key = kind.key
    check.missing = reference.join(stored, on=key, how="anti").height
    check.extra = stored.join(reference, on=key, how="anti").height
    both = reference.join(stored, on=key, how="inner", suffix="_s")
    same = pl.all_horizontal([pl.col(c).eq_missing(pl.col(f"{c}_s")) for c in kind.values])
    check.differing = both.filter(~same).height
    what = "REST" if ref.rest_spans else "the archive"
    if check.differing:
        check.worsen("differs", f"{check.differing} row(s) differ from {what}")
    if check.missing:
        check.worsen("missing rows", f"{check.missing} row(s) of {what} not stored")
    if check.extra:
        check.worsen("extra rows", f"{check.extra} stored row(s) not in {what} (kept)")
    check.note(ref.note())  # after the findings: which days each source covered


def stored_month(store: Store, check: MonthCheck) -> pl.DataFrame:
    lo, hi = month_bounds(check.month)
    if check.kind == "klines":
        return store.read_klines(check.market, check.symbol, check.interval, lo, hi)
    if check.kind == "agg_trades":
        return store.read_agg_trades(check.market, check.symbol, lo, hi)
    return store.read_bars(check.market, check.symbol, check.interval, lo, hi)


# -- verify -----------------------------------------------------------------------------------------------------
def verify_store(store: Store, scope: Scope = Scope(), source: ArchiveSource | None = None, *,
                 repair: bool = False, rest_base: str | None = None) -> VerifyReport:
    """Check every stored month in ``scope``; against ``source`` (and REST at ``rest_base`` for the days the
    archive lacks) when given; repair failures if asked."""
    rest = RestSource(rest_base) if rest_base is not None else None
    try:
        return check_months(store, scope, source, rest, repair=repair)
    finally:
        if rest is not None:
            rest.close()


def check_months(store: Store, scope: Scope, source: ArchiveSource | None, rest: RestSource | None, *,
                 repair: bool = False, references: dict[str, Reference] | None = None) -> VerifyReport:
    """:func:`verify_store` with the sources open; ``references`` (label → reference) spares a refetch."""
    from rltrader.data.parquet_store import ParquetStore

    frames: dict[str, pl.DataFrame | None] = {}
    if isinstance(store, ParquetStore):
        checks = []
        for check, files in _parquet_months(store.root, scope):
            frames[check.label] = _check_parquet_month(check, files)
            checks.append(check)
    elif hasattr(store, "pool"):
        checks = _pg_months(store, scope)
    else:
        raise DataError(f"verify: unsupported store {store.url}")
    refs = dict(references or {})
    for check in checks:
        if check.status == "unreadable":
            continue
        ref = refs.get(check.label)
        if ref is None:
            ref = reference_month(check.spec, check.market, check.symbol, check.interval, check.month, source, rest)
        if ref is None:
            if check.kind != "bars" and (source is not None or rest is not None):
                check.note("not in the archive")
            continue
        refs[check.label] = ref
        stored = frames.get(check.label)
        compare(check, stored if stored is not None else stored_month(store, check), ref)
    if repair:
        from rltrader.data.verify_repair import repair_month

        for i, check in enumerate(checks):  # klines, trades, then bars: bars are rebuilt from repaired trades
            if check.failed:
                checks[i] = repair_month(store, check, source, rest, refs.get(check.label))
    return VerifyReport(checks)
