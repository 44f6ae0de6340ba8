"""The paper trader as a supervised Prefect flow (deployment ``trade-paper``), like ``ingest-live``.

Orchestration only: the work is :func:`rltrader.live.runner.run_trader`, which the CLI (``rltrader trade``) and
the tests call directly. A crash fails the run and Prefect retries it; the deployment is started every 10
minutes with a concurrency limit of 1 that cancels the new run while one is active, so a trader is (re)started
within 10 minutes whenever none is alive, and two never trade at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger

from rltrader.config import load_settings
from rltrader.live.runner import run_trader


@flow(name="trade", retries=5, retry_delay_seconds=30, log_prints=True)
def trade(
    mode: str = "paper",
    symbols: list[str] | None = None,
    model: str | None = None,
    rest_base: str | None = None,
    ws_base: str | None = None,
    max_seconds: float | None = None,
    mlflow_summary: bool = True,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Run the trader (``params.yaml`` ``trader`` section, overridable) until stopped, ``max_seconds``, or — a
    replayed window — the bar before ``until`` (its position closed there, as the backtest's last bar)."""
    summary = run_trader(load_settings(), mode=mode, symbols=symbols, model=model, rest_base=rest_base,
                         ws_base=ws_base, max_seconds=max_seconds, handle_signals=False,
                         mlflow_summary=mlflow_summary, until=until)
    get_run_logger().info("trade %s finished: equity %.4f, %d decisions, session %s", mode, summary["equity"],
                          summary["decisions"], summary["session_id"])
    return summary
