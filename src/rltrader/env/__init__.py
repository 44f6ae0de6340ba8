"""Trading environments over session datasets: a gymnasium env and a vectorized batch env, one semantics.

Both run the execution model of ``rltrader.execution`` through the same kernel (``env.core``); see the modes in
``env.modes`` and the step timing in ``env.core``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rltrader.env.modes import MODES, REWARDS, EnvParams, lowrider_rule
from rltrader.execution import ExecutionParams

if TYPE_CHECKING:
    from rltrader.config import Settings
    from rltrader.env.batch import BatchSessionEnv, BatchStep
    from rltrader.env.core import STATE_NAMES, EnvCore, leak_column
    from rltrader.env.single import SessionEnv

# The envs (polars, gymnasium) load on first use: the settings import ``env.modes`` for ``EnvParams`` and
# must stay cheap to import.
_LAZY = {"BatchSessionEnv": "batch", "BatchStep": "batch", "STATE_NAMES": "core", "EnvCore": "core",
         "leak_column": "core", "SessionEnv": "single"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"rltrader.env.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rltrader.env' has no attribute {name!r}")


__all__ = ["MODES", "REWARDS", "STATE_NAMES", "BatchSessionEnv", "BatchStep", "EnvCore", "EnvParams",
           "ExecutionParams", "SessionEnv", "leak_column", "lowrider_rule", "params_from_settings"]


def params_from_settings(settings: Settings) -> tuple[ExecutionParams, EnvParams]:
    """``(ExecutionParams, EnvParams)`` of loaded ``Settings``: its ``execution`` and ``env`` sections are these
    very classes, validated when the settings loaded."""
    return settings.execution, settings.env
