"""Deployments with their schedules, declared in the repo; ``python -m flows.deploy`` serves them.

``flow.serve`` needs no work pool: this process polls the Prefect API (``PREFECT_API_URL``, or a local
``prefect server start``) and runs scheduled flows itself. ``backfill-archive`` runs daily at 00:30 UTC,
``nightly-retrain`` (backfill → ``dvc repro`` → promote) at 02:00 UTC, one at a time; ``train`` has no schedule
(started from the UI or the control API, ``rltrader api serve``) and queues runs so two trainings never share the
CPUs; ``tune`` runs a study and ``tune-worker`` is one worker of it (serve it on every machine that should take
trials: ``tune`` with ``fan_out="deployment"`` starts runs of it);
``ingest-live`` is started every 10 minutes with a concurrency limit of 1 that cancels the new run while one is
active — so the stream is (re)started within 10 minutes whenever no run is alive (crash beyond its retries,
host restart) and never runs twice. ``trade-paper`` supervises the paper trader the same way.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.ingest import backfill_archive, ingest_live
from flows.retrain import nightly_retrain
from flows.trade import trade
from flows.train import train
from flows.tune import tune, tune_worker

BACKFILL_CRON = "30 0 * * *"
RETRAIN_CRON = "0 2 * * *"


def deployments() -> list[Any]:
    return [
        backfill_archive.to_deployment(
            "backfill-archive-daily", schedules=[Cron(BACKFILL_CRON, timezone="UTC")],
            description="Yesterday's archive files, verified, upserted, gaps reported", tags=["ingest", "archive"],
        ),
        ingest_live.to_deployment(
            "ingest-live", interval=600, tags=["ingest", "live"],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description="Supervised websocket ingester (restarted if not running)",
        ),
        trade.to_deployment(
            "trade-paper", interval=600, tags=["trade", "paper"], parameters={"mode": "paper"},
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description="Supervised paper trader on the champion (restarted if not running, never two at once)",
        ),
        nightly_retrain.to_deployment(
            "nightly-retrain", schedules=[Cron(RETRAIN_CRON, timezone="UTC")], tags=["train", "registry"],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            description="Backfill the latest data, rebuild via dvc repro, promote a champion only through the gates",
        ),
        train.to_deployment(
            "train", tags=["train"],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Train one algorithm (rltrader train <algo>) on the current sessions; runs queue up",
        ),
        tune.to_deployment(
            "tune", tags=["train", "tune"],
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="Optuna study (rltrader tune <kind>): fans trials out, then report + params.tuned.yaml",
        ),
        tune_worker.to_deployment(
            "tune-worker", tags=["tune"],
            description="One worker of a tuning study; every machine serving it takes trials of the same study",
        ),
    ]


def main() -> None:
    serve(*deployments())


if __name__ == "__main__":
    main()
