"""The post-backfill integrity check, as a Prefect task both scheduled flows run after their backfill.

Orchestration only: the work is :func:`rltrader.data.verify.verify_store` (what ``rltrader data verify --archive``
runs). A wrong month fails the task, and with it the flow run, with the months named in the error; the fix is
``rltrader data verify --archive --repair`` (deliberately not automatic: a person should see that storage
corrupted something).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from rltrader.config import load_settings
from rltrader.data.ingest import archive_source
from rltrader.data.store import open_store
from rltrader.data.verify import Scope, verify_store
from rltrader.errors import DataError

FAIL_ON = ("unreadable", "invalid", "differs")
"""Statuses that fail the run. ``missing rows`` does not: days not stored yet are the backfill's reported gaps
(e.g. a store started mid-month), not damage."""


@task(retries=0)
def verify_backfilled(market: str, symbols: list[str], interval: str, start: str, end: str,
                      store_url: str | None = None, archive_base: str | None = None,
                      params: str | None = None) -> dict[str, Any]:
    """Verify the stored months ``start``..``end`` (YYYY-MM[-DD]) of ``symbols`` against the archive."""
    settings = load_settings(params) if params else load_settings()
    store = open_store(store_url or settings.data.store_url, settings.data.dir)
    try:
        report = verify_store(store, Scope.of(market, symbols, interval, start, end, kinds=["klines"]),
                              archive_source(settings, archive_base))
    finally:
        store.close()
    get_run_logger().info("verify: %s", report.summary())
    wrong = [m for m in report.months if m.status in FAIL_ON]
    if wrong:
        raise DataError(f"verify after backfill: {len(wrong)} stored month(s) are wrong: "
                        + "; ".join(f"{m.label} {m.status} ({m.detail})" for m in wrong)
                        + " — `rltrader data verify --archive --repair` rebuilds them from the archive")
    return {"months": len(report.months), "summary": report.summary()}
