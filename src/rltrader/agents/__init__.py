"""The trading agents. ``ALGORITHMS`` is the one list of trainable algorithms: the ``train`` CLI, the backtest
stage's default models, the pipeline and (checked by a test) dvc.yaml's ``train`` foreach all follow it.
Kept import-light (no torch): the settings read it."""

from __future__ import annotations

ALGORITHMS: tuple[str, ...] = ("d3qn", "ppo", "cnn", "xgb")
"""``rltrader train <algo>``; each has a ``params.yaml`` section of its own (``agents.configs.CONFIGS``)."""
