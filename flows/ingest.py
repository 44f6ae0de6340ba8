"""Ingestion flows: the supervised live stream and the daily archive backfill.

Orchestration only — retries, schedules, logging to Prefect. The work is done by plain functions
(:func:`rltrader.data.stream.run_live`, :func:`rltrader.data.ingest.backfill`, which also reports gaps) that the CLI
and tests call directly too, so a flow never holds logic that is tested only through Prefect.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task

from flows.verify import verify_backfilled
from rltrader.config import load_settings
from rltrader.data.ingest import archive_source, backfill
from rltrader.data.schema import Market
from rltrader.data.store import open_store
from rltrader.data.stream import run_live


@flow(name="ingest-live", retries=5, retry_delay_seconds=30, log_prints=True)
def ingest_live(
    market: str | None = None,
    symbols: list[str] | None = None,
    store_url: str | None = None,
    rest_base: str | None = None,
    ws_base: str | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Run the websocket ingester (``params.yaml`` ``stream`` section, overridable) until stopped.

    Reconnects inside the run are the ingester's job; a crash (e.g. the store unreachable beyond its write
    retries) fails the run and Prefect retries it — a restart loses nothing, since start-up repairs from the
    stored cursors. ``max_seconds`` bounds a run (tests, or a schedule that rotates runs).
    """
    result = run_live(load_settings(), store_url=store_url, market=market, symbols=symbols, rest_base=rest_base,
                      ws_base=ws_base, max_seconds=max_seconds, handle_signals=False)
    get_run_logger().info("ingest-live finished: %s", result)
    return result


@task(retries=3, retry_delay_seconds=120)
def backfill_day(day: str, market: str, symbols: list[str], interval: str, store_url: str | None,
                 archive_base: str | None, through: str | None = None) -> dict[str, object]:
    """Fetch, checksum-verify and upsert one day (or ``day`` … ``through``) of archive klines; returns the ingest
    report (gaps included)."""
    settings = load_settings()
    store = open_store(store_url or settings.data.store_url, settings.data.dir)
    try:
        report = backfill(store, archive_source(settings, archive_base), Market(market), symbols, day, through or day,
                          interval=interval, progress=False)
        return report.as_dict()
    finally:
        store.close()


def yesterday(today: date | None = None) -> str:
    """The UTC day before ``today`` (default: now), as the archive names days."""
    return ((today or datetime.now(UTC).date()) - timedelta(days=1)).isoformat()


@flow(name="backfill-archive", retries=2, retry_delay_seconds=1800, log_prints=True)
def backfill_archive(
    day: str | None = None,
    market: str | None = None,
    symbols: list[str] | None = None,
    interval: str = "1m",
    store_url: str | None = None,
    archive_base: str | None = None,
    through: str | None = None,
) -> dict[str, object]:
    """Load yesterday's (or ``day``'s, or ``day`` … ``through``'s: months as monthly files, the rest as daily ones)
    archive files for the streamed symbols and report gaps.

    Scheduled at 00:30 UTC. Binance publishes daily files some time after midnight; a file not there yet
    fails the task, and the task and flow retries try again later.
    """
    settings = load_settings()
    day = day or yesterday()
    market = market or settings.stream.market.value
    symbols = [s.upper() for s in (symbols or settings.stream.symbols)]
    report = backfill_day(day, market, symbols, interval, store_url, archive_base, through)
    verified = verify_backfilled(market, symbols, interval, day, through or day, store_url,  # fails the run
                                 archive_base)
    gaps = report["gaps"]  # backfill re-scans the day's stored candles after writing
    logger = get_run_logger()
    if gaps:
        logger.warning("backfill-archive %s: %d gap(s) remain: %s", day, len(gaps), gaps)
    logger.info("backfill-archive %s %s %s: %s", day, market, ",".join(symbols), report)
    return {"day": day, "through": through or day, "market": market, "symbols": symbols, "report": report,
            "gaps": gaps, "verify": verified}
