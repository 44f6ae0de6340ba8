"""The trading agents. ``ALGORITHMS`` is the one list of trainable algorithms: the ``train`` CLI, the backtest
stage's default models, the pipeline and (checked by a test) dvc.yaml's ``train`` foreach all follow it.
Kept import-light (no torch): the settings read it."""

from __future__ import annotations

ALGORITHMS: tuple[str, ...] = ("d3qn", "ppo", "cnn", "xgb")
"""``rltrader train <algo>``; each has a ``params.yaml`` section of its own (``agents.configs.CONFIGS``)."""

VARIANTS: dict[str, str] = {"lowrider": "d3qn"}
"""Trained models that are an algorithm in another env mode: ``rltrader train <name>`` trains the algorithm with
its own ``params.yaml`` section ``<name>`` (the algorithm's knobs) in that mode (``train.variant_settings``).
``lowrider``: D3QN sizing the Lowrider's lots (``env.mode: lowrider`` on spot), judged in the backtest's Lowrider
table against the rule-based Lowrider (issue 14, part 4)."""

TRAINED: tuple[str, ...] = (*ALGORITHMS, *VARIANTS)
"""Everything ``rltrader train`` accepts, in dvc.yaml's ``train`` foreach order."""
