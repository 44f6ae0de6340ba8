"""On-demand training: one ``rltrader train <algo>`` as a Prefect flow, so runs started from the UI or the
control API (``POST /train/{algo}``) show up in Prefect and queue behind each other.

Orchestration only: the work is :func:`rltrader.train.run_train`, the function ``rltrader train`` and the DVC
``train@<algo>`` stages call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from rltrader.config import load_settings
from rltrader.train import run_train


@flow(name="train", log_prints=True)
def train(algo: str, params: str | None = None, resume: bool = False, metrics: str | None = None) -> dict[str, Any]:
    """Train ``algo`` (d3qn, ppo, cnn) with ``params`` (default ``params.yaml``); returns the MLflow run and model."""
    settings = load_settings(params) if params else load_settings()
    result = run_train(settings, algo, resume=resume, progress=False,
                       metrics_path=Path(metrics or f"reports/train_{algo}.json"))
    get_run_logger().info("train %s: MLflow run %s, model %s", algo, result.get("run_id"), result.get("model_uri"))
    return {k: v for k, v in result.items() if isinstance(v, str | int | float | bool | None)}
