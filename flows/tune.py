"""Tuning as Prefect flows: ``tune`` creates (or resumes) an Optuna study and fans its trials out, ``tune-worker`` is
one worker of a study.

Orchestration only: the study, the workers and the report are :mod:`rltrader.tune` (the functions behind
``rltrader tune``). Fan-out:

* ``fan_out="tasks"`` (default): ``workers`` concurrent Prefect tasks in this flow run, each a worker
  (:func:`rltrader.tune.runner.run_worker`) — one machine, visible task by task in the Prefect UI.
* ``fan_out="deployment"``: ``workers`` runs of the ``tune-worker`` deployment, picked up by whichever machines
  serve it (``python -m flows.deploy`` on each, all pointing at the same Prefect API and the same PostgreSQL study
  storage); this flow then waits until the study holds its trials and writes the report.

Either way the budget, the heartbeat and the retry of a dead worker's trial are the study's (``tune/storage.py``),
so a worker lost with its machine costs one retried trial, not the study.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger, task

from rltrader.config import load_settings
from rltrader.tune.runner import open_study, parent_run, run_worker
from rltrader.tune.storage import FINISHED, safe_url, storage_url

WORKER_DEPLOYMENT = "tune-worker/tune-worker"


def _settings(params: str | None) -> Any:
    return load_settings(params) if params else load_settings()


@task(name="tune-worker-task")
def worker_task(params: str | None, kind: str, study: str, storage: str, trials: int, index: int) -> int:
    """One worker: trials until the study holds ``trials`` finished ones; returns how many it ran."""
    return run_worker(_settings(params), kind, study, storage, trials, worker_index=index)


@flow(name="tune-worker", log_prints=True)
def tune_worker(kind: str, study: str, storage: str, trials: int, params: str | None = None,
                index: int = 0) -> int:
    """A worker of an existing study, as its own flow run (the ``tune-worker`` deployment's unit of work)."""
    return run_worker(_settings(params), kind, study, storage_url(storage, _settings(params).data.dir), trials,
                      worker_index=index)


@flow(name="tune", log_prints=True)
def tune(kind: str, trials: int | None = None, workers: int = 2, params: str | None = None,
         storage: str | None = None, study: str | None = None,
         fan_out: Literal["tasks", "deployment"] = "tasks", poll_seconds: float = 5.0) -> dict[str, Any]:
    """Create or resume study ``study`` (default: ``kind``), run ``workers`` workers, then write the report and
    ``params.tuned.yaml``. Returns the report's headline (best value and params, PBO, deflated Sharpe, trials)."""
    from rltrader.tune.report import write_tune_report

    logger = get_run_logger()
    settings = _settings(params)
    n = trials or settings.tune.trials
    url = storage_url(storage or settings.tune.storage, settings.data.dir)
    name = study or kind
    st, _ = open_study(settings, kind, name, url, create=True)
    parent_run(settings, st, kind, url)
    logger.info("tune %s: %d trials over %d workers (%s), storage %s", name, n, workers, fan_out, safe_url(url))
    if fan_out == "tasks":
        futures = [worker_task.submit(params, kind, name, url, n, i) for i in range(workers)]
        ran = [f.result() for f in futures]
        logger.info("tune %s: trials per worker %s", name, ran)
    else:
        from prefect.deployments import run_deployment

        for i in range(workers):
            run_deployment(WORKER_DEPLOYMENT, timeout=0, parameters={
                "kind": kind, "study": name, "storage": url, "trials": n, "params": params, "index": i})
        while sum(t.state in FINISHED for t in st.get_trials(deepcopy=False)) < n:
            time.sleep(poll_seconds)
    result = write_tune_report(settings, kind, name, url)
    logger.info("tune %s: best %s %s, PBO %s, deflated Sharpe %s over %s trials", name, result["best_value"],
                result["best_params"], result["pbo"], result["deflated_sharpe"], result["trials_counted"])
    return {k: v for k, v in result.items() if k != "backtest_effect"}
