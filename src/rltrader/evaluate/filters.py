"""The backtest's signal/execution filters (``params.yaml: backtest``): one definition for the settings and
the backtest kernel. A leaf module (numpy only) so the settings can validate the section without importing the
backtest engine and its torch/polars dependencies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict

from rltrader.errors import ConfigError

# the action that closes a position, per env mode (lowrider has none: it sells at env.profit_target); the same
# values as env.modes' FuturesAction.CLOSE / SpotAction.SELL (tests/test_structure.py keeps them equal) without
# importing the numba env from the settings
CLOSE_ACTION = {"futures_session": 3, "spot_cycle": 2}

# --- filter parameters packed for the backtest kernel (float vector) -------------------------------------------
F_COOLDOWN, F_MAX_DAY, F_SL, F_TP, F_CLOSE_ACTION = range(5)
N_F = 5


@dataclass(frozen=True)
class BacktestFilters:
    """Signal/execution filters between the policy and the env (``params.yaml: backtest``); 0 = off."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    confidence: float = 0.0
    """Minimum softmax probability of the chosen action (``logits`` models) or Q(chosen) − Q(hold) (``q_values``
    and ``classifier`` models); rule baselines have no scores and are not filtered by it."""
    cooldown_bars: int = 0
    """After a fill in bar f, no new order is sent for decisions at bars f+1 … f+cooldown_bars."""
    max_trades_per_day: int = 0
    """Most orders let through per UTC day and symbol stretch (a flip is one order); 0 = unlimited."""
    stop_loss: float = 0.0
    """Close when the last close is this fraction against the average entry (checked at decision time)."""
    take_profit: float = 0.0
    """Close when the last close is this fraction in favour of the average entry."""
    repeat_cycles: bool = True
    """spot_cycle / lowrider: start a new cycle after one closes (the env ends the episode there).
    ``backtest_sessions`` without filters turns it off, so that its run is exactly the env's episode."""

    def __post_init__(self) -> None:
        for name in ("confidence", "cooldown_bars", "max_trades_per_day", "stop_loss", "take_profit"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"backtest.{name}: must be a finite number ≥ 0 (got {v!r})")
        if self.stop_loss >= 1:
            raise ConfigError(f"backtest.stop_loss: must be a fraction below 1 (got {self.stop_loss!r})")

    @classmethod
    def from_settings(cls, s: Any) -> BacktestFilters:
        """The filter fields of ``Settings.backtest`` (which carries the stage's other keys too)."""
        return cls(confidence=s.confidence, cooldown_bars=s.cooldown_bars, max_trades_per_day=s.max_trades_per_day,
                   stop_loss=s.stop_loss, take_profit=s.take_profit, repeat_cycles=s.repeat_cycles)

    def to_array(self, mode: str) -> np.ndarray:
        close_action = CLOSE_ACTION.get(mode, -1)
        if close_action < 0 and (self.stop_loss > 0 or self.take_profit > 0):
            raise ConfigError("backtest.stop_loss / backtest.take_profit: lowrider has no close action (it sells "
                              "automatically at env.profit_target); set them to 0 in lowrider mode")
        f = np.zeros(N_F)
        f[F_COOLDOWN], f[F_MAX_DAY] = self.cooldown_bars, self.max_trades_per_day
        f[F_SL], f[F_TP], f[F_CLOSE_ACTION] = self.stop_loss, self.take_profit, close_action
        return f
