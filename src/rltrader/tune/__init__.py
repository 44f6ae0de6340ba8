"""Hyper-parameter tuning with Optuna: studies in sqlite or PostgreSQL, workers on one or many machines, trials
scored on walk-forward folds inside train+val, every trial a nested MLflow run, the winner in params.tuned.yaml.

``rltrader tune d3qn|ppo|xgb|filters --trials N [--workers K]`` — see ``runner.run_tune``; ``--join STUDY --storage
postgresql://…`` adds a machine's workers to a running study (``runner.run_worker``)."""

from rltrader.tune.objectives import KINDS, SPACES
from rltrader.tune.runner import run_tune, run_worker

__all__ = ["KINDS", "SPACES", "run_tune", "run_worker"]
