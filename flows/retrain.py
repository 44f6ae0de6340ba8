"""The nightly retrain: backfill the latest data → rebuild (``dvc repro``, or the same stage functions) → promote.

Orchestration only. Backfilling is ``rltrader.data.ingest.backfill``; the rebuild is ``dvc repro`` when the
working directory is a DVC repo (only what changed re-runs; its last stage is ``promote``), else
``rltrader.pipeline.run_pipeline``, the same stage functions in the same order. Each task retries on its own, and
the flow returns (and logs) a run summary: rows added, stages run, the promotion decision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.verify import verify_backfilled
from rltrader.config import load_settings
from rltrader.data.ingest import archive_source, backfill
from rltrader.data.store import open_store
from rltrader.integrity import PROMOTE_PRODUCER, read_report


def _settings(params: str | None) -> Any:
    return load_settings(params) if params else load_settings()


@task(retries=3, retry_delay_seconds=900)
def backfill_latest(params: str | None, through: str | None) -> dict[str, Any]:
    """Archive files from the day after the newest stored bar (the earliest across ``ingest.symbols``) through
    ``through`` (a day; default yesterday, UTC). Idempotent: stored rows are skipped; files Binance has not
    published yet become reported gaps, and the next night fills them."""
    settings = _settings(params)
    cfg = settings.ingest
    end = through or (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    store = open_store(settings.data.store_url, settings.data.dir)
    try:
        last = [s.last for s in store.stats() if s.kind == "klines" and s.market == cfg.market.value
                and s.symbol in cfg.symbols and s.interval == cfg.interval and s.last is not None]
        first = cfg.start if len(cfg.start) > 7 else f"{cfg.start}-01"  # params name months or days
        start = (min(last) + timedelta(minutes=1)).date().isoformat() if len(last) == len(cfg.symbols) else first
        if start > end:
            return {"start": start, "end": end, "inserted": 0, "note": "already up to date"}
        report = backfill(store, archive_source(settings), cfg.market, cfg.symbols, start, end,
                          interval=cfg.interval, skip_bad_rows=cfg.skip_bad_rows, progress=False)
    finally:
        store.close()
    return {"start": start, "end": end, **report.as_dict()}


@task(retries=1, retry_delay_seconds=600)
def rebuild(params: str | None, use_dvc: bool, reports_dir: str) -> dict[str, Any]:
    """``dvc repro`` or the stage functions. No forced ingest: the stage is ``always_changed`` in dvc.yaml, so
    ``dvc repro`` re-checks the store the backfill changed behind DVC's back, and what follows re-runs only when
    its fingerprints moved."""
    if use_dvc:
        dvc = [sys.executable, "-m", "dvc"]
        env = {**os.environ, **({"RLTRADER_PARAMS": params} if params else {})}
        proc = subprocess.run([*dvc, "repro"], check=True, env=env, capture_output=True, text=True)
        print(proc.stdout[-4000:])
        ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage '")]
        return {"runner": "dvc", "stages": ran}
    from rltrader.pipeline import run_pipeline

    result = run_pipeline(_settings(params), reports_dir=Path(reports_dir))
    return {"runner": "functions", "stages": list(result["seconds"]), "seconds": result["seconds"]}


@flow(name="nightly-retrain", retries=1, retry_delay_seconds=1800, log_prints=True)
def nightly_retrain(params: str | None = None, through: str | None = None, use_dvc: bool | None = None,
                    reports_dir: str = "reports") -> dict[str, Any]:
    """Scheduled at 02:00 UTC (``flows/deploy.py``), after the 00:30 archive backfill has had time to land."""
    logger = get_run_logger()
    if use_dvc is None:  # a DVC checkout with dvc installed: let DVC decide what to re-run
        use_dvc = Path("dvc.yaml").is_file() and Path(".dvc").is_dir() and shutil.which("git") is not None
    added = backfill_latest(params, through)
    logger.info("backfill: %s", {k: v for k, v in added.items() if k != "gaps"})
    cfg = _settings(params).ingest
    if added["start"] <= added["end"]:  # a wrong stored month fails the run here, before anything trains on it
        verify_backfilled(cfg.market.value, list(cfg.symbols), cfg.interval, added["start"], added["end"],
                          params=params)
    built = rebuild(params, use_dvc, reports_dir)
    decision_path = Path(reports_dir) / "promotion.json"
    decision = (read_report(decision_path, "promotion decision", PROMOTE_PRODUCER) if decision_path.is_file()
                else {})
    summary = {
        "backfill": {k: added.get(k) for k in ("start", "end", "files", "inserted", "skipped", "note") if k in added},
        "gaps": len(added.get("gaps", [])),
        "rebuild": built,
        "decision": decision.get("action"),
        "challenger": decision.get("challenger"),
        "challenger_version": decision.get("challenger_version"),
        "champion_before": decision.get("champion_version"),
        "failed_gates": [g["name"] for g in decision.get("gates", []) if not g["passed"]],
    }
    logger.info("nightly-retrain summary: %s", json.dumps(summary, default=str))
    return summary
