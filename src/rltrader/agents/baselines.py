"""Baselines every agent is compared with, on the same env and the same evaluation (``agents.evaluate``).

Rule baselines are policies over the env's arrays: vectorised across accounts, no per-account Python. Those
that read raw prices (SMA cross) or the account (Lowrider) get the env through ``bind(env)`` before the first
decision, and only ever look at closed bars (rows before the decision row).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from rltrader.env.batch import BatchSessionEnv
from rltrader.env.core import P_T
from rltrader.env.modes import BUY, CLOSE, HOLD, LONG, SELL, SHORT
from rltrader.errors import ConfigError

__all__ = ["BUY", "CLOSE", "HOLD", "LONG", "SELL", "SHORT", "BuyAndHold", "Flat", "LowriderRule", "RandomPolicy",
           "SMACross", "rule_baselines", "sma_sides"]
SMALLEST_LOT = 1
"""Lowrider: action 1 buys ``lot_multipliers[1]`` lots (the first non-hold lot)."""


class Flat:
    """Never trades: the zero line every agent must clear net of fees."""

    name = "flat"

    def __call__(self, window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.zeros(len(mask), dtype=np.int64)


class BuyAndHold:
    """Goes long (futures) / buys (spot, Lowrider's largest lot) at the first decision and holds to the end."""

    name = "buy_and_hold"

    def __init__(self, mode: str) -> None:
        self.entry = {"futures_session": LONG, "spot_cycle": BUY}.get(mode, -1)

    def __call__(self, window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        flat = state[:, 0] == 0
        if self.entry < 0:  # lowrider: the largest lot allowed
            largest = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
            return np.where(flat, largest, HOLD).astype(np.int64)
        return np.where(flat & mask[:, self.entry], self.entry, HOLD).astype(np.int64)


class RandomPolicy:
    """Uniform over the valid actions."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = mask / mask.sum(axis=1, keepdims=True)
        return np.asarray((p.cumsum(axis=1) > self.rng.random((len(mask), 1))).argmax(axis=1), dtype=np.int64)


@njit(cache=True)
def sma_sides(close: np.ndarray, fast: int, slow: int, hi: int, lo: int, out: np.ndarray) -> None:
    """``out[t]``: ``hi`` when the fast SMA of the closes before row ``t`` is above the slow one, else ``lo``
    (``lo`` for ``t < slow``) — THE SMA-cross signal, used by ``SMACross`` and by the backtest's precomputed
    decisions (``evaluate.backtest.decisions.rule_decisions``), so the two cannot drift apart.

    One pass, no temporaries: the SMAs are differences of the cumulative sums ``cs[t] = cs[t-1] + close[t-1]``
    (``cs[0] = 0``, the sequential sum numpy's ``cumsum`` computes, so the same bits), accumulated on the fly with
    the last ``slow + 1`` of them in a ring buffer, instead of two ``len(close)``-long arrays (``np.cumsum`` and
    its zero-prefixed copy: 15 MB each at 1.9 M bars, measured ~15 ms of the backtest's 1.9 M-bar SMA run)."""
    size = 1
    while size < slow + 1:
        size *= 2
    m = size - 1
    ring = np.zeros(size)
    cs = 0.0  # cs[t]
    for t in range(out.shape[0]):
        up = t >= slow and (cs - ring[(t - fast) & m]) / fast > (cs - ring[(t - slow) & m]) / slow
        out[t] = hi if up else lo
        if t + 1 < out.shape[0]:
            cs = cs + close[t]
            ring[(t + 1) & m] = cs


class SMACross:
    """Long while the fast SMA of closes is above the slow one, short (futures) / out (spot) below."""

    name = "sma_cross"

    def __init__(self, mode: str, fast: int | None = None, slow: int | None = None) -> None:
        """Default windows: slow = min(20, context), fast = slow // 4 (set at ``bind``: the context is the
        history the session offers, and the signal must not read bars before it)."""
        self.mode, self.fast_arg, self.slow_arg = mode, fast, slow
        self.fast, self.slow = 0, 0
        self.env: BatchSessionEnv | None = None
        self.up: np.ndarray = np.zeros(0, np.bool_)
        """Per row of the env's bars: the fast SMA of the closes before it is above the slow one (``sma_sides``)."""

    def set_windows(self, context: int) -> None:
        """The windows for sessions with ``context`` bars of history (checked: the signal reads only those)."""
        self.slow = self.slow_arg or min(20, context)
        self.fast = self.fast_arg or max(1, self.slow // 4)
        if not 0 < self.fast < self.slow:
            raise ConfigError(f"baselines.sma: need 0 < fast < slow (got {self.fast}, {self.slow})")
        if context < self.slow:
            raise ConfigError(f"baselines.sma: slow window {self.slow} is longer than the context ({context}); "
                              "the signal would read bars before the session's context")

    def bind(self, env: BatchSessionEnv) -> None:
        self.set_windows(env.core.data.context)
        self.env = env
        close = env.core.bars[3]
        self.up = np.empty(close.shape[0], np.bool_)
        sma_sides(close, self.fast, self.slow, True, False, self.up)

    def __call__(self, window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        assert self.env is not None, "SMACross.bind(env) first"
        t = self.env.core.ptr[P_T]  # closes of rows < t are known at the decision (t ≥ context ≥ slow)
        up = self.up[t]
        side = state[:, 0]
        if self.mode == "futures_session":
            want = np.where(up, LONG, SHORT)
            act = np.where((up & (side > 0)) | (~up & (side < 0)), HOLD, want)
        elif self.mode == "spot_cycle":
            act = np.where(up & (side == 0), BUY, np.where(~up & (side > 0), SELL, HOLD))
        else:
            act = np.where(up & (side == 0), SMALLEST_LOT, HOLD)
        act = np.where(mask[np.arange(len(mask)), act], act, HOLD)
        return act.astype(np.int64)


class LowriderRule:
    """Seed 000's rule-based Lowrider: the env's fixed lot schedule (``env.lowrider_rule``)."""

    name = "lowrider_rule"

    def __init__(self) -> None:
        self.env: BatchSessionEnv | None = None

    def bind(self, env: BatchSessionEnv) -> None:
        if env.params.mode != "lowrider":
            raise ConfigError("baselines: lowrider_rule needs env.mode: lowrider")
        self.env = env

    def __call__(self, window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        assert self.env is not None, "LowriderRule.bind(env) first"
        return np.asarray(self.env.rule_actions(), dtype=np.int64)


def rule_baselines(mode: str, seed: int = 0) -> list[Callable[..., np.ndarray]]:
    """The rule baselines that apply to a trading mode."""
    out: list[Callable[..., np.ndarray]] = [Flat(), BuyAndHold(mode), RandomPolicy(seed), SMACross(mode)]
    if mode == "lowrider":
        out.append(LowriderRule())
    return out
