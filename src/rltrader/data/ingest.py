"""Ingest stages as plain functions: the CLI, DVC, Prefect flows, tests and benchmarks all call these.

Order of work in a backfill is chosen so that bad input never half-lands: every file is fetched and its
checksum verified, then every file is parsed and validated, and only when all of that passed are rows
written (one atomic store call per file). Invalid rows always go to the quarantine with file, line and
reason; unless ``skip_bad_rows`` is set they also stop the whole backfill before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rltrader.config import Settings
from rltrader.data.archive import ArchiveFile, ArchiveSource, Kind, Parsed, load_file, parse_period
from rltrader.data.schema import KLINE_SCHEMA, Market, interval_us
from rltrader.data.store import Store, WriteResult
from rltrader.errors import ValidationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gap:
    """Missing candles ``[start, end)`` of one series."""

    market: str
    symbol: str
    interval: str
    start: datetime
    end: datetime

    @property
    def missing(self) -> int:
        return int((self.end - self.start) / timedelta(microseconds=interval_us(self.interval)))

    def as_dict(self) -> dict[str, object]:
        return {"market": self.market, "symbol": self.symbol, "interval": self.interval,
                "start": self.start.isoformat(), "end": self.end.isoformat(), "missing": self.missing}


@dataclass
class IngestReport:
    files: int = 0
    inserted: int = 0
    skipped: int = 0
    quarantined: int = 0
    gaps: list[Gap] = field(default_factory=list)

    def add(self, r: WriteResult) -> None:
        self.inserted += r.inserted
        self.skipped += r.skipped

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["gaps"] = [g.as_dict() for g in self.gaps]
        d["missing_candles"] = sum(g.missing for g in self.gaps)
        return d


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=True)


def archive_source(settings: Settings, base: str | None = None) -> ArchiveSource:
    """The configured archive (or ``base``), downloading into the data folder's cache."""
    return ArchiveSource(base or settings.data.archive_base, settings.data.dir / "cache" / "archive")


def range_bounds(start: str, end: str) -> tuple[datetime, datetime]:
    """Inclusive ``YYYY-MM[-DD]`` dates → half-open UTC datetimes ``[start, end)``."""
    s, e = parse_period(start), parse_period(end, end=True)
    return (datetime(s.year, s.month, s.day, tzinfo=UTC),
            datetime(e.year, e.month, e.day, tzinfo=UTC) + timedelta(days=1))


def _check_bad(parsed: Sequence[tuple[ArchiveFile | str, Parsed]], store: Store, skip_bad_rows: bool) -> int:
    bad = [p.bad for _, p in parsed if not p.bad.is_empty()]
    if not bad:
        return 0
    all_bad = pl.concat(bad)
    store.quarantine(all_bad)
    if skip_bad_rows:
        log.warning("quarantined %d invalid rows; loading the valid rows", all_bad.height)
        return all_bad.height
    first = all_bad.row(0, named=True)
    raise ValidationError(
        f"{first['source']}: line {first['line']}: {first['reason']} ({all_bad.height} invalid row(s) "
        f"quarantined; nothing stored; --skip-bad-rows loads the valid rows)", all_bad.height)


def backfill(
    store: Store,
    source: ArchiveSource,
    market: Market,
    symbols: Iterable[str],
    start: str,
    end: str,
    *,
    interval: str = "1m",
    kind: Kind = "klines",
    skip_bad_rows: bool = False,
    progress: bool = True,
) -> IngestReport:
    """Load archive files for an inclusive date range into the store; idempotent and all-or-nothing."""
    lo, hi = range_bounds(start, end)
    symbols = [s.upper() for s in symbols]
    report = IngestReport()
    plans: list[ArchiveFile] = []
    for sym in symbols:  # an unknown symbol fails here, before anything is fetched or stored
        plans += source.plan(market, kind, sym, interval if kind == "klines" else None, lo.date(),
                             (hi - timedelta(days=1)).date())
    parsed: list[tuple[ArchiveFile | str, Parsed]] = []
    with _progress(progress) as bar:
        task = bar.add_task(f"verify+parse {kind}", total=len(plans))
        for f in plans:
            parsed.append((f, load_file(source, f)))
            bar.advance(task)
    report.quarantined = _check_bad(parsed, store, skip_bad_rows)
    time_col = "open_time" if kind == "klines" else "transact_time"
    with _progress(progress) as bar:
        task = bar.add_task(f"store {kind}", total=len(parsed))
        for _, p in parsed:
            rows = p.rows.filter((pl.col(time_col) >= lo) & (pl.col(time_col) < hi))
            report.add(store.write_klines(rows) if kind == "klines" else store.write_agg_trades(rows))
            report.files += 1
            bar.advance(task)
    if kind == "klines":
        for sym in symbols:
            report.gaps += find_gaps(store, market.value, sym, interval, lo, hi)
    log.info("backfill %s %s %s..%s: %s", market.value, ",".join(symbols), start, end, report.as_dict())
    return report


def find_gaps(store: Store, market: str, symbol: str, interval: str, start: datetime | None = None,
              end: datetime | None = None) -> list[Gap]:
    """Runs of missing candles in ``[start, end)`` (default: between the first and last stored candle)."""
    times = store.read_klines(market, symbol, interval, start, end).get_column("open_time")
    step = timedelta(microseconds=interval_us(interval))
    if times.is_empty():
        return [Gap(market, symbol, interval, start, end)] if start and end else []
    parts = [times]  # stay columnar: a Python round trip of every timestamp cost ~2.5 s per 1.2M rows
    if start is not None:
        parts.insert(0, pl.Series([start - step], dtype=times.dtype))
    if end is not None:
        parts.append(pl.Series([end], dtype=times.dtype))
    s = pl.concat(parts)
    frame = pl.DataFrame({"prev": s.head(-1), "next": s.tail(-1)}).filter(pl.col("next") - pl.col("prev") > step)
    return [Gap(market, symbol, interval, prev + step, nxt) for prev, nxt in frame.iter_rows()]


def fill_gaps_from_archive(store: Store, source: ArchiveSource, gaps: Sequence[Gap], *,
                           progress: bool = False) -> IngestReport:
    """Fill gaps with archive files for the days they touch; what the archive lacks stays a gap."""
    report = IngestReport()
    for g in gaps:
        last = g.end - timedelta(microseconds=1)
        sub = backfill(store, source, Market(g.market), [g.symbol], g.start.date().isoformat(),
                       last.date().isoformat(), interval=g.interval, progress=progress)
        report.files += sub.files
        report.inserted += sub.inserted
        report.skipped += sub.skipped
    for key in {(g.market, g.symbol, g.interval) for g in gaps}:
        lo = min(g.start for g in gaps if (g.market, g.symbol, g.interval) == key)
        hi = max(g.end for g in gaps if (g.market, g.symbol, g.interval) == key)
        report.gaps += find_gaps(store, *key, lo, hi)
    return report


def import_csv(
    store: Store,
    path: Path,
    *,
    market: Market,
    symbol: str,
    interval: str,
    tz: str,
    time_col: str,
    time_format: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
) -> IngestReport:
    """Import an OHLCV CSV that is not archive format (e.g. REST dumps with datetime strings)."""
    from rltrader.data.csv_import import read_ohlcv_csv

    parsed = read_ohlcv_csv(path, market=market, symbol=symbol, interval=interval, tz=tz, time_col=time_col,
                            time_format=time_format, columns=columns or {})
    report = IngestReport(files=1)
    report.quarantined = _check_bad([(str(path), parsed)], store, skip_bad_rows)
    report.add(store.write_klines(parsed.rows))
    if not parsed.rows.is_empty():
        times = parsed.rows.get_column("open_time")
        step = timedelta(microseconds=interval_us(interval))
        report.gaps = find_gaps(store, market.value, symbol, interval, times.min(), times.max() + step)  # type: ignore[operator,arg-type]
    return report


def klines_fingerprint(df: pl.DataFrame) -> str:
    """Content hash of stored bars, independent of store and file layout: downstream DVC stages key on it."""
    h = hashlib.sha256()
    for name in KLINE_SCHEMA:
        col = df.get_column(name)
        if col.dtype == pl.String:
            if col.len() > 1 and col.null_count() == 0 and col.n_unique() == 1:
                # one value (market, symbol, interval of a series): the same bytes without a Python list
                v = col[0].encode()
                h.update((v + b"\x00") * (col.len() - 1) + v)
            else:
                h.update("\x00".join(col.to_list()).encode())
        else:
            h.update(col.cast(pl.Float64 if col.dtype == pl.Float64 else pl.Int64).fill_null(-1).to_numpy().tobytes())
    return h.hexdigest()


RUN_COUNTS = ("inserted", "skipped")
"""What one ingest run did (not the stored state): printed by the stage, kept out of its metrics file."""


def run_ingest_stage(settings: Settings, store: Store, metrics_path: Path, *, progress: bool = False
                     ) -> dict[str, object]:
    """DVC ``ingest`` stage: backfill params.yaml's ``ingest`` section, write the stored state's metrics.

    The metrics file describes the STORE, not this run: archive files, gaps and, per series, rows, range and a
    content fingerprint. It is the features stage's dependency, so it must come out byte-identical whenever the
    stored bars are the same — which is why this run's ``inserted`` / ``skipped`` counts (all rows inserted on a
    fresh machine, all skipped on a re-run) are returned and printed but not written there. The stage is
    ``always_changed`` in dvc.yaml: its real input (the archive, the store) is outside the repo, so it runs on
    every ``dvc repro`` (seconds when everything is stored) and a fresh clone with an empty store fills it, while
    the stages after it re-run only when the fingerprints move."""
    cfg = settings.ingest
    source = archive_source(settings)
    report = backfill(store, source, cfg.market, cfg.symbols, cfg.start, cfg.end, interval=cfg.interval,
                      skip_bad_rows=cfg.skip_bad_rows, progress=progress)
    result = report.as_dict()
    result["series"] = [
        {**s.as_dict(), "sha256": klines_fingerprint(store.read_klines(s.market, s.symbol, s.interval))}
        for s in store.stats()
        if s.kind == "klines" and s.market == cfg.market.value and s.symbol in cfg.symbols
        and s.interval == cfg.interval
    ]
    state = {k: v for k, v in result.items() if k not in RUN_COUNTS}
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(metrics_path)
    return result



def fill_gaps_from_rest(store: Store, rest_base: str | None, gaps: Sequence[Gap]) -> IngestReport:
    """Fill gaps with closed candles from Binance REST (or a replay server / testnet at ``rest_base``)."""
    from rltrader.data.rest import fetch_klines, make_client

    report = IngestReport()
    clients = {m: make_client(m, rest_base) for m in {Market(g.market) for g in gaps}}
    try:
        for g in gaps:
            rows = fetch_klines(clients[Market(g.market)], g.market, g.symbol, g.interval, g.start, g.end)
            report.add(store.write_klines(rows))
        for g in gaps:
            report.gaps += find_gaps(store, g.market, g.symbol, g.interval, g.start, g.end)
    finally:
        for c in clients.values():
            c.close_connection()
    return report
