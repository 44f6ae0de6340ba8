"""Trading environments over session datasets: a gymnasium env and a vectorized batch env, one semantics.

Both run the execution model of ``rltrader.execution`` through the same kernel (``env.core``); see the modes in
``env.modes`` and the step timing in ``env.core``.
"""

from __future__ import annotations

from typing import Any

from rltrader.env.batch import BatchSessionEnv, BatchStep
from rltrader.env.core import STATE_NAMES, EnvCore, leak_column
from rltrader.env.modes import MODES, REWARDS, EnvParams, lowrider_rule
from rltrader.env.single import SessionEnv
from rltrader.execution import ExecutionParams

__all__ = ["MODES", "REWARDS", "STATE_NAMES", "BatchSessionEnv", "BatchStep", "EnvCore", "EnvParams",
           "ExecutionParams", "SessionEnv", "leak_column", "lowrider_rule", "params_from_settings"]


def params_from_settings(settings: Any) -> tuple[ExecutionParams, EnvParams]:
    """``(ExecutionParams, EnvParams)`` from loaded ``Settings`` (its ``execution`` and ``env`` sections)."""
    return ExecutionParams.from_mapping(settings.execution), EnvParams.from_mapping(settings.env)
