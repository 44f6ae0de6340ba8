"""Workers: each asks for a trial under the study's budget lock, runs it with a heartbeat, tells the result and
records it as a nested MLflow run under the study's parent run — until the study holds ``trials`` finished trials.

``run_tune`` (``rltrader tune KIND``) creates or resumes the study, starts ``workers`` processes here, waits for the
study to finish (workers on other machines may be adding trials too) and writes the tuning report. ``run_worker``
(``rltrader tune KIND --join STUDY --storage postgresql://…``, the Prefect ``tune`` flow's task) is one worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from rltrader.config import Settings
from rltrader.errors import ConfigError
from rltrader.tune.objectives import KINDS, FiltersObjective, Objective, TrainObjective
from rltrader.tune.storage import (
    FINISHED,
    Heartbeat,
    budget_lock,
    load_study,
    open_storage,
    quiet,
    safe_url,
    storage_url,
)

console = Console(stderr=True)
PARENT_RUN_ATTR = "mlflow_parent_run_id"


def study_dir(settings: Settings, study: str) -> Path:
    """Local scratch of a study (fold sessions shared by this machine's trials)."""
    return Path(settings.data.dir) / "tune" / study


def make_pruner(name: str, folds: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(folds, 1))
    return optuna.pruners.NopPruner()


def make_objective(settings: Settings, kind: str, study: str) -> Objective:
    if kind == "filters":
        return FiltersObjective(settings)
    if kind == "xgb":
        from rltrader.tune.forecast import XGBObjective

        return XGBObjective(settings)
    if kind in ("d3qn", "ppo"):
        return TrainObjective(settings, kind, study_dir(settings, study), on_run=_tag_fold_run(settings, study))
    raise ConfigError(f"tune: unknown kind {kind!r} (one of {', '.join(KINDS)})")


def _tag_fold_run(settings: Settings, study: str) -> Any:
    def tag(run_id: str, trial: optuna.Trial, fold: int) -> None:
        from mlflow.tracking import MlflowClient

        # counted once, as its Optuna trial (evaluate.stats.trials_run), not again as a training run
        MlflowClient(settings.train.tracking_uri).set_tag(run_id, "rltrader.tune_trial", f"{study}/{trial.number}")
    return tag


# --------------------------------------------------------------------------------------------------------- MLflow
def _experiment_id(settings: Settings) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    t = settings.train
    mlflow.set_tracking_uri(t.tracking_uri)
    client = MlflowClient(t.tracking_uri)
    exp = client.get_experiment_by_name(t.experiment)
    if exp is not None:
        return client, str(exp.experiment_id)
    remote = t.tracking_uri.startswith(("http://", "https://"))
    location = (Path(t.artifact_root) / t.experiment).resolve().as_uri() if not remote else None
    try:
        return client, str(client.create_experiment(t.experiment, artifact_location=location))
    except Exception:  # another worker created it meanwhile
        exp = client.get_experiment_by_name(t.experiment)
        if exp is None:
            raise
        return client, str(exp.experiment_id)


def parent_run(settings: Settings, study: optuna.Study, kind: str, url: str) -> str:
    """The study's MLflow parent run (created once, its id kept in the study's user attributes)."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        return str(run_id)
    client, exp_id = _experiment_id(settings)
    run = client.create_run(exp_id, run_name=f"tune-{study.study_name}",
                            tags={"rltrader.study": study.study_name, "rltrader.tune_kind": kind,
                                  "optuna.storage": safe_url(url)})
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return str(run.info.run_id)


def log_trial(settings: Settings, study: optuna.Study, trial: FrozenTrial, kind: str) -> str:
    """One trial as a nested MLflow run: params, the running objective per fold (a curve), each fold's score,
    the fold table (``folds.json``), and its state."""
    from mlflow.entities import Metric, Param

    client, exp_id = _experiment_id(settings)
    tags = {"mlflow.parentRunId": str(study.user_attrs.get(PARENT_RUN_ATTR, "")), "rltrader.study": study.study_name,
            "rltrader.trial": str(trial.number), "rltrader.tune_kind": kind, "optuna.state": trial.state.name}
    if "failed_trial" in trial.system_attrs:
        tags["optuna.retry_of"] = str(trial.system_attrs["failed_trial"])
    run = client.create_run(exp_id, run_name=f"trial-{trial.number}", tags=tags)
    now = int(time.time() * 1000)
    metric = settings.tune.metric
    metrics = [Metric(f"wf_{metric}_running_mean", float(v), now, int(step))
               for step, v in sorted(trial.intermediate_values.items())]
    folds = trial.user_attrs.get("folds", [])
    metrics += [Metric(f"fold_{metric}", float(r[metric]), now, int(r["fold"])) for r in folds
                if r[metric] == r[metric]]
    if trial.value is not None:
        metrics.append(Metric("objective", float(trial.value), now, 0))
    params = [Param(k, str(v)) for k, v in trial.params.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.log_dict(run.info.run_id, {"folds": folds, "params": trial.params, "state": trial.state.name},
                    "folds.json")
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(trial.state, "FAILED")
    client.set_terminated(run.info.run_id, status)
    return str(run.info.run_id)


# -------------------------------------------------------------------------------------------------------- workers
def open_study(settings: Settings, kind: str, name: str, url: str, *, create: bool,
               worker_index: int = 0) -> tuple[optuna.Study, Any]:
    t = settings.tune
    storage = open_storage(url, t.heartbeat_seconds, t.grace_seconds, t.max_retry)
    sampler = optuna.samplers.TPESampler(seed=t.seed * 1000 + worker_index, n_startup_trials=5)
    pruner = make_pruner(t.pruner, t.folds)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
        study.set_user_attr("kind", kind)
        study.set_user_attr("metric", t.metric)
    else:
        study = load_study(name, storage, sampler=sampler, pruner=pruner)
        if study.user_attrs.get("kind", kind) != kind:
            raise ConfigError(f"tune --join {name}: that study tunes {study.user_attrs['kind']!r}, not {kind!r}")
    return study, storage


def _take(study: optuna.Study, url: str, n_trials: int) -> tuple[optuna.Trial | None, bool]:
    """Under the budget lock: fail stale trials (their retries are enqueued), then ask for a trial if the study
    still has room. Returns (trial or None, study finished)."""
    with budget_lock(url, study.study_name), quiet():
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= n_trials:
            return None, True
        if waiting or done + running < n_trials:
            return study.ask(), False
        return None, False


def run_worker(settings: Settings, kind: str, name: str, url: str, n_trials: int, *, worker_index: int = 0,
               poll_seconds: float = 1.0, objective: Objective | None = None) -> int:
    """Run trials of study ``name`` until it holds ``n_trials`` finished ones; returns how many this worker ran.

    When the study is full of running trials, the worker polls: if one of them stops beating (its worker died),
    it is failed here after ``tune.grace_seconds`` and its retry is picked up by whoever asks next."""
    study, storage = open_study(settings, kind, name, url, create=False, worker_index=worker_index)
    objective = objective or make_objective(settings, kind, name)
    ran = 0
    while True:
        trial, finished = _take(study, url, n_trials)
        if finished:
            return ran
        if trial is None:
            time.sleep(poll_seconds)
            continue
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{worker_index}")
        with Heartbeat(storage, trial._trial_id, settings.tune.heartbeat_seconds):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                frozen = study.tell(trial, state=TrialState.PRUNED)
            except Exception:
                frozen = study.tell(trial, state=TrialState.FAIL)
                log_trial(settings, study, frozen, kind)
                raise
            else:
                frozen = study.tell(trial, value)
        ran += 1
        log_trial(settings, study, frozen, kind)
        console.print(f"tune {name}: trial {frozen.number} {frozen.state.name.lower()} "
                      f"value={frozen.value if frozen.value is not None else 'n/a'} (worker {worker_index})")


def start_workers(settings: Settings, kind: str, name: str, url: str, n_trials: int, workers: int,
                  first_index: int = 0) -> list[subprocess.Popen[bytes]]:
    """``workers`` worker processes on this machine (``python -m rltrader.tune.runner``: fresh interpreters, no
    torch/numba state shared with the caller, killable one by one). The settings travel as a JSON file."""
    sdir = study_dir(settings, name)
    sdir.mkdir(parents=True, exist_ok=True)
    cfg = sdir / f"settings-{os.getpid()}.json"
    cfg.write_text(json.dumps(settings.model_dump(mode="json")))
    return [subprocess.Popen([sys.executable, "-m", "rltrader.tune.runner", str(cfg), kind, name, url, str(n_trials),
                              str(first_index + i)]) for i in range(workers)]


def _main(argv: list[str]) -> None:
    cfg, kind, name, url, n, index = argv
    settings = Settings.model_validate(json.loads(Path(cfg).read_text()))
    run_worker(settings, kind, name, url, int(n), worker_index=int(index))


def run_tune(settings: Settings, kind: str, *, trials: int | None = None, workers: int = 1,
             storage: str | None = None, study: str | None = None, join: str | None = None,
             report: bool = True) -> dict[str, Any]:
    """``rltrader tune KIND``: create/resume (or ``join``) a study and run ``workers`` local workers until it
    holds ``trials`` finished trials; then (not when joining) write the report and ``params.tuned.yaml``."""
    if kind not in KINDS:
        raise ConfigError(f"tune: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if workers < 1:
        raise ConfigError(f"tune --workers: must be at least 1 (got {workers})")
    n = trials or settings.tune.trials
    url = storage_url(storage or settings.tune.storage, settings.data.dir)
    name = join or study or kind
    st, _ = open_study(settings, kind, name, url, create=join is None)
    parent_run(settings, st, kind, url)
    console.print(f"tune {name}: {n} trials, {workers} local worker(s), storage {safe_url(url)}")
    if workers == 1:
        ran = run_worker(settings, kind, name, url, n)
    else:
        procs = start_workers(settings, kind, name, url, n, workers)
        codes = [p.wait() for p in procs]
        bad = [f"{i} (exit {c})" for i, c in enumerate(codes) if c != 0]
        if bad:
            raise RuntimeError(f"tune {name}: worker(s) {', '.join(bad)} failed (see their output above)")
        ran = -1
    out: dict[str, Any] = {"study": name, "storage": safe_url(url), "trials": n, "ran_here": ran}
    if report and join is None:
        from rltrader.tune.report import write_tune_report

        out.update(write_tune_report(settings, kind, name, url))
    return out


if __name__ == "__main__":
    _main(sys.argv[1:])
