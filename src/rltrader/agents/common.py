"""What every agent shares: seeding, device choice, observation gathering, env snapshots for resume, NaN
guards and the MLflow run wrapper. Kept small so each algorithm module reads top to bottom on its own."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rltrader.env.batch import BatchSessionEnv
from rltrader.env.core import P_T
from rltrader.errors import RLTraderError


class TrainingError(RLTraderError):
    """Training cannot go on (NaN/inf loss or parameters, inconsistent shapes); says where and when."""


def seed_everything(seed: int, deterministic: bool = True) -> np.random.Generator:
    """Seed Python, numpy and torch; on CPU with ``deterministic`` the run is bit-reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return np.random.default_rng(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ObsGather:
    """Observation windows re-gathered on the agent's device from the env's feature matrix by decision row.

    Replay buffers and rollouts store the decision row (``t``: the window is ``features[t - context : t]``)
    instead of the window, so the matrix is uploaded to the device once and batches are one index away.
    """

    def __init__(self, env: BatchSessionEnv, device: torch.device) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(env.core.features)).to(device)
        self.context = env.core.data.context
        self.offsets = torch.arange(-self.context, 0, device=device)
        self.device = device

    def windows(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        r = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        return self.features[r[:, None] + self.offsets]


def decision_rows(env: BatchSessionEnv) -> np.ndarray:
    """Each account's next decision row (copy: the env reuses its buffers)."""
    return np.array(env.core.ptr[P_T], copy=True)


_ENV_ARRAYS = ("acct", "env", "ptr", "pending", "window", "state", "mask", "out_f", "out_b", "next_session")


def env_state(env: BatchSessionEnv) -> dict[str, Any]:
    """Everything that changes while the batch env runs (accounts, pointers, buffers, sampler), for checkpoints."""
    core = env.core
    return {"arrays": {k: getattr(core, k).copy() for k in _ENV_ARRAYS},
            "rng": env._rng.bit_generator.state}


def load_env_state(env: BatchSessionEnv, state: dict[str, Any]) -> None:
    core = env.core
    for k, v in state["arrays"].items():
        getattr(core, k)[...] = v
    env._rng.bit_generator.state = state["rng"]


def check_finite(step: int, **values: torch.Tensor | float) -> None:
    """Stop with the step and the offending quantity rather than train on NaN/inf."""
    for name, v in values.items():
        ok = bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else np.isfinite(v)
        if not ok:
            raise TrainingError(f"non-finite {name} at step {step}: training stopped (lower the learning rate, "
                                "check the features for NaN/inf, or clip rewards)")


def check_params_finite(step: int, module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"non-finite parameter {name} at step {step}: training stopped")


@contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str, artifact_root: Path | None = None,
               run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run on ``tracking_uri`` (embedded sqlite by default) with artifacts under ``artifact_root``.

    ``run_id`` re-opens a run (``--resume``). Telemetry stays off; nothing here contacts the network.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # a tracking server stores artifacts itself (mlflow-artifacts:/); a local path is only for embedded stores
        remote = tracking_uri.startswith(("http://", "https://"))
        location = (artifact_root / experiment).resolve().as_uri() if artifact_root and not remote else None
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                          run_name=None if run_id else run_name) as run:
        yield run
