"""Tuning with Optuna on tiny real stage outputs: one process on sqlite end to end (report, MLflow nested runs,
params.tuned.yaml read back by the settings), and worker processes sharing a study in the suite's real PostgreSQL —
exactly N trials, no duplicate numbers, and a SIGKILLed worker's trial failed by the heartbeat and retried."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from test_sessions import fill_store, make_settings

from rltrader.config import Settings, load_settings
from rltrader.dataset.build import run_features_stage, run_sessions_stage
from rltrader.errors import DataError
from rltrader.tune import run_tune
from rltrader.tune.runner import open_study, parent_run, start_workers
from rltrader.tune.storage import FINISHED, storage_url


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features and sessions of two synthetic symbols (10 days; val = 2 days), built by the real stages."""
    tmp = tmp_path_factory.mktemp("tune")
    base = make_settings(tmp)
    run_features_stage(base, fill_store(tmp))
    run_sessions_stage(base)
    return tmp


def tiny(root: Path, work: Path, **tune: Any) -> Settings:
    d = make_settings(root).model_dump(mode="json")
    d["train"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db", "artifact_root": str(work / "artifacts")}
    # the filters of the `random` baseline: no training needed, a trial is two short backtests. The daily Sharpe
    # needs more than the two val days, so these folds are scored on the per-bar Sharpe.
    d["tune"] = {"model": "random", "folds": 2, "metric": "sharpe_minute_annualized",
                 "out_dir": str(work / "reports" / "tune"), "heartbeat_seconds": 1, "grace_seconds": 4, **tune}
    d["data"]["dir"] = str(root / "data")
    return Settings.model_validate(d)


def test_tuned_params_overlay_params_yaml(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"d3qn": {"lr": 0.1, "n_step": 3},
                                                          "backtest": {"cooldown_bars": 2}}))
    assert load_settings(tmp_path / "params.yaml", env={}).d3qn == {"lr": 0.1, "n_step": 3}
    (tmp_path / "params.tuned.yaml").write_text(yaml.safe_dump({"d3qn": {"lr": 0.001}}))
    s = load_settings(tmp_path / "params.yaml", env={})
    assert s.d3qn == {"lr": 0.001, "n_step": 3} and s.backtest.cooldown_bars == 2


@pytest.mark.slow
def test_tune_filters_one_process_end_to_end(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("RLTRADER_PARAMS", str(tmp_path / "params.yaml"))
    settings = tiny(built, tmp_path)
    out = run_tune(settings, "filters", trials=5, storage=f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name="filters", storage=f"sqlite:///{tmp_path}/optuna.db")
    finished = [t for t in study.get_trials() if t.state in FINISHED]
    assert len(finished) == 5 and out["best_params"] == study.best_params
    assert set(study.best_params) == {"cooldown_bars", "max_trades_per_day"}  # a rule baseline has no confidence
    assert out["trials_counted"] == 5  # every trial counted, not only the winner
    best_folds = study.best_trial.user_attrs["folds"]
    assert [f["fold"] for f in best_folds] == [0, 1] and best_folds[0]["end"] == best_folds[1]["start"]
    # the val folds tile val; the backtest split is only reported, after the study
    assert best_folds[0]["start"] == "2024-01-06" and best_folds[1]["end"] == "2024-01-08"
    assert [r["filters"] for r in out["backtest_effect"]] == ["params.yaml filters", "tuned filters"]
    summary = json.loads((tmp_path / "reports" / "tune" / "filters" / "summary.json").read_text())
    assert summary["trials_counted"]["total"] == 5 and "pbo" in summary and "deflated_sharpe" in summary
    for png in ("history.png", "importances.png", "parallel.png"):
        assert (tmp_path / "reports" / "tune" / "filters" / png).stat().st_size > 1000
    # params.tuned.yaml beside params.yaml, and the settings read the winner back
    tuned = yaml.safe_load((tmp_path / "params.tuned.yaml").read_text())
    assert tuned == {"backtest": study.best_params}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"backtest": {"cooldown_bars": 0}}))
    assert load_settings(env={"RLTRADER_PARAMS": str(tmp_path / "params.yaml")}).backtest.cooldown_bars == \
        study.best_params["cooldown_bars"]
    # MLflow: one parent run, each trial a nested run with its params and fold table
    client = mlflow.tracking.MlflowClient(settings.train.tracking_uri)
    exp = client.get_experiment_by_name(settings.train.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == "tune-filters"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(int(r.data.tags["rltrader.trial"]) for r in children) == [t.number for t in study.get_trials()]
    assert all("cooldown_bars" in r.data.params for r in children)


def test_join_needs_an_existing_study(built: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no study 'nope'"):
        run_tune(tiny(built, tmp_path), "filters", join="nope", storage=f"sqlite:///{tmp_path}/o.db")


def _wait(procs: list[Any], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
    return codes


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_study_in_postgres(built: Path, tmp_path: Path, pg_url: str) -> None:
    settings = tiny(built, tmp_path)
    url = storage_url(pg_url, tmp_path)
    study, _ = open_study(settings, "filters", "shared", url, create=True)
    parent_run(settings, study, "filters", url)
    procs = start_workers(settings, "filters", "shared", url, n_trials=6, workers=2)
    assert _wait(procs, 300) == [0, 0]
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state in FINISHED for t in trials) == 6 and len(trials) == 6  # exactly N, nothing over budget
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert workers == {"0", "1"}  # both processes took trials


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkilled_worker_trial_is_failed_and_retried(built: Path, tmp_path: Path, pg_url: str) -> None:
    settings = tiny(built, tmp_path)
    url = storage_url(pg_url, tmp_path)
    study, _ = open_study(settings, "filters", "killed", url, create=True)
    parent_run(settings, study, "filters", url)
    victim, survivor = start_workers(settings, "filters", "killed", url, n_trials=6, workers=2)
    killed: int | None = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline:
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,))  # inside the objective: params drawn
                   if t.user_attrs.get("worker", "").split(":")[1:2] == [str(victim.pid)] and t.params]
        if not running:
            time.sleep(0.05)
            continue
        os.kill(victim.pid, signal.SIGSTOP)  # freeze it, then check the trial is still running: kill mid-trial
        now = study._storage.get_trial(running[0]._trial_id)
        if now.state == TrialState.RUNNING:
            os.kill(victim.pid, signal.SIGKILL)
            killed = running[0].number
        else:
            os.kill(victim.pid, signal.SIGCONT)
    assert killed is not None, "the victim never ran a trial"
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert _wait([survivor], 300) == [0]

    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    assert len(by_number) == len(trials)  # no duplicate numbers
    assert by_number[killed].state == TrialState.FAIL  # detected by the heartbeat, not left running
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == by_number[killed].params  # the same trial again, not a new draw
    assert sum(t.state in FINISHED for t in trials) == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_tune_d3qn_trains_each_walk_forward_fold(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tiny d3qn trials: each trains from scratch in both expanding folds inside train+val (never past val's
    end), each fold run is tagged as the trial's (so it is not counted twice), and the winner lands in
    params.tuned.yaml under d3qn."""
    import mlflow

    monkeypatch.setenv("RLTRADER_PARAMS", str(tmp_path / "params.yaml"))
    s = tiny(built, tmp_path, fold_days=1, val_days=1, pruner="none")
    d = s.model_dump(mode="json")
    d["train"].update({"checkpoint_dir": str(tmp_path / "ckpt"), "models_dir": str(tmp_path / "models"),
                       "val_sessions": 50})
    d["d3qn"] = {"total_steps": 300, "num_envs": 8, "learning_starts": 100, "batch_size": 16, "buffer_size": 1000,
                 "eval_every": 300, "eval_sessions": 20, "checkpoint_every": 300, "net": {"channels": 4, "hidden": 8}}
    settings = Settings.model_validate(d)
    out = run_tune(settings, "d3qn", trials=2, storage=f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name="d3qn", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.get_trials()) == 2 and out["trials_counted"] == 2
    for t in study.get_trials():
        folds = t.user_attrs["folds"]
        assert [(f["start"], f["end"]) for f in folds] == [("2024-01-06", "2024-01-07"), ("2024-01-07", "2024-01-08")]
        runs = [mlflow.tracking.MlflowClient(settings.train.tracking_uri).get_run(f["run_id"]) for f in folds]
        assert {r.data.tags["rltrader.tune_trial"] for r in runs} == {f"d3qn/{t.number}"}
        assert {r.data.params["d3qn.lr"] for r in runs} == {str(t.params["lr"])}  # the trial's value was trained
    assert yaml.safe_load((tmp_path / "params.tuned.yaml").read_text())["d3qn"] == study.best_params


@pytest.mark.slow
def test_tune_xgb_forecaster_on_val_folds(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's XGBoost forecaster: each fold fits on everything before its val window and is scored on the
    window as a cost-aware threshold strategy; the winner goes to params.tuned.yaml's study section."""
    monkeypatch.setenv("RLTRADER_PARAMS", str(tmp_path / "params.yaml"))
    d = tiny(built, tmp_path, pruner="none").model_dump(mode="json")
    d["study"] = {"horizons": [1, 5], "train_stride": 2, "vol_window": 10}
    settings = Settings.model_validate(d)
    out = run_tune(settings, "xgb", trials=3, storage=f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name="xgb", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.get_trials()) == 3 and set(out["best_params"]) == {"xgb_rounds", "xgb_depth", "xgb_eta"}
    folds = study.best_trial.user_attrs["folds"]
    assert [(f["start"], f["end"]) for f in folds] == [("2024-01-06", "2024-01-07"), ("2024-01-07", "2024-01-08")]
    assert all(f["n_trades"] >= 0 for f in folds) and len(study.best_trial.user_attrs["daily"]) == 2
    assert yaml.safe_load((tmp_path / "params.tuned.yaml").read_text()) == {"study": study.best_params}
    assert load_settings(env={"RLTRADER_PARAMS": str(tmp_path / "params.yaml")}).study.xgb_depth == \
        study.best_params["xgb_depth"]


def test_cli_tune_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rltrader.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["tune", "nope"])
    assert res.exit_code == 1 and "unknown kind 'nope'" in res.output
    res = CliRunner().invoke(app, ["tune", "filters", "--storage", "mongodb://x"])
    assert res.exit_code == 1 and "tune.storage" in res.output
