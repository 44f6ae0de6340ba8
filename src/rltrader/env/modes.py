"""Trading modes: what an action means, which actions are valid, and the rule-based Lowrider policy.

Action 0 is *hold* in every mode, so a masked-out agent always has a valid action and "do nothing" has the
same index everywhere.

- ``futures_session`` (the D3QN reference design): hold / long / short / close. One position at a time; long
  while short flips (close + open in one order). Long/short size the position at ``position_size`` × the leverage cap.
- ``spot_cycle`` (the PPO reference design): hold / buy / sell, long only, one cycle: a buy of ``position_size``
  × cash, then a sell of everything; the episode ends when the sell fills.
- ``lowrider`` (the PPO reference design's DCA mode): action ``k`` buys ``lot_multipliers[k] × base_lot``
  (quote) at market, as long as the cycle's cost basis stays within the budget cap ``initial_cash / reluctance``.
  Selling is automatic, not an action: once the last close values the position, net of the exit taker fee, at
  ``profit_target`` above its cost (average entry plus the fees paid), the whole position is sold at the next fill
  bar's open and the episode ends when that fills. The agent therefore only decides *how much to buy when*; the
  rule-based Lowrider (``lowrider_rule``) is the same mode driven by a fixed lot schedule.

Orders are decided on the last closed bar (price reference ``close[t-1]``) and filled by the execution model
(``rltrader.execution``) at bar ``t + latency``'s open; sizes here are the orders *sent*, the fill may clip them
(cash, leverage cap, step grid, min notional). An invalid action (masked out) sends no order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Literal

import numpy as np
from numba import njit
from pydantic import ConfigDict

from rltrader.errors import ConfigError
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    EQUITY,
    FEES,
    QTY,
    XP_MIN_NOTIONAL,
    XP_STEP,
    XP_TAKER,
    max_position,
    round_qty,
)

MODES = ("futures_session", "spot_cycle", "lowrider")
REWARDS = ("log_return", "pnl", "diff_sharpe")
MODE_FUTURES, MODE_SPOT, MODE_LOWRIDER = 0, 1, 2
REWARD_LOG, REWARD_PNL, REWARD_DSR = 0, 1, 2


class FuturesAction(IntEnum):
    """``futures_session`` action indices (the policy's output; the env's ``order_for``)."""

    HOLD = 0
    LONG = 1
    SHORT = 2
    CLOSE = 3


class SpotAction(IntEnum):
    """``spot_cycle`` action indices. Lowrider's action ``k`` buys ``lot_multipliers[k]`` lots (0 = hold)."""

    HOLD = 0
    BUY = 1
    SELL = 2


# plain ints of the enums for numba kernels (an IntEnum member is not a compile-time int constant there)
HOLD = int(FuturesAction.HOLD)
LONG, SHORT, CLOSE = int(FuturesAction.LONG), int(FuturesAction.SHORT), int(FuturesAction.CLOSE)
BUY, SELL = int(SpotAction.BUY), int(SpotAction.SELL)
FUTURES_ACTIONS = tuple(a.name.lower() for a in FuturesAction)
SPOT_ACTIONS = tuple(a.name.lower() for a in SpotAction)

# --- env parameters packed for the kernels; lot multipliers follow from EP_MULTS on ----------------------------
(EP_MODE, EP_REWARD, EP_SIZE, EP_FORCE_CLOSE, EP_HOLD_PEN, EP_FLIP_PEN, EP_TRADE_PEN, EP_DD_PEN, EP_DSR_ETA,
 EP_BASE_LOT, EP_BUDGET, EP_PROFIT_TARGET, EP_N_ACTIONS, EP_EVERY, EP_MIN_HOLD, EP_TURNOVER_PEN, EP_VOL_TARGET,
 EP_VOL_LOOKBACK, EP_MULTS) = range(19)

# --- per-account env state: rows of a (N_ENV_FIELDS, B) float64 array -------------------------------------------
E_PREV_EQUITY, E_PEAK, E_DSR_A, E_DSR_B, E_N_BUYS, E_HELD, E_VOL_SCALE = range(7)
N_ENV_FIELDS = 7
"""``E_HELD``: bars the current position has been open (its opening fill's bar counts; 0 when flat);
``E_VOL_SCALE``: the volatility-targeting size factor for the next decision (written by the observation)."""


@dataclass(frozen=True)
class EnvParams:
    """Mode, reward and penalties (``params.yaml: env``). Context and session length come from the dataset."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # params.yaml validation: unknown keys are errors

    mode: Literal["futures_session", "spot_cycle", "lowrider"] = "futures_session"
    reward: Literal["log_return", "pnl", "diff_sharpe"] = "log_return"
    """``log_return``: log(equity_t / equity_t-1), sums to the episode's log growth; ``pnl``: equity change /
    initial cash, sums to the episode's return; ``diff_sharpe``: Moody & Saffell's differential Sharpe ratio
    (does not sum to the equity change; ``info['equity']`` does)."""
    position_size: float = 1.0
    """Fraction of the leverage cap (futures) or of the cash (spot) a long/short/buy commits."""
    force_close: bool = True
    """Close any position at the last bar's close (taker). False: the episode is truncated, the position marked."""
    hold_penalty: float = 0.0
    """Subtracted per bar a position is held through the close."""
    flip_penalty: float = 0.0
    """Subtracted per fill that reverses the position (long ↔ short)."""
    trade_penalty: float = 0.0
    """Subtracted per fill (over-trading)."""
    drawdown_penalty: float = 0.0
    """Times the current drawdown from the episode's equity peak, subtracted per bar."""
    dsr_eta: float = 0.01
    """Adaptation rate of the differential Sharpe ratio's moving moments."""
    lot_multipliers: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    """Lowrider: the lot of action k is ``lot_multipliers[k] * base_lot``; the first must be 0 (hold)."""
    base_lot: float = 100.0
    """Lowrider: one lot, in quote currency."""
    reluctance: float = 4.0
    """Lowrider: a cycle may commit at most ``initial_cash / reluctance``."""
    profit_target: float = 0.005
    """Lowrider: the cycle closes once the position is worth this much more than its cost, net of fees."""
    rule_drop_step: float = 0.01
    """Rule-based Lowrider: buy the next lot when the last close is this fraction below the average entry."""
    rule_schedule: tuple[int, ...] = field(default=(1, 1, 2, 3))
    """Rule-based Lowrider: action index of the 1st, 2nd, … buy (the last repeats)."""
    decision_every: int = 1
    """Bars between two decisions. In between the env holds (an action there sends nothing, the mask allows
    only hold); one training step spans the k bars and its reward is their sum. 1: a decision every bar."""
    min_hold_bars: int = 0
    """An open position cannot be closed or flipped until it has been open this many bars (its fill bar
    counts): those actions are masked. Lowrider's automatic take-profit and the forced close are exempt."""
    turnover_penalty: float = 0.0
    """Times the bar's traded notional / equity before the bar, subtracted from the reward (the fees are
    already in the equity; this discourages churn beyond them)."""
    vol_target: float = 0.0
    """Volatility-scaled size: a long/short/buy commits ``position_size × min(1, vol_target / σ)``, σ the RMS
    1-bar log return of the last ``vol_lookback`` closes before the decision (per bar, e.g. 0.001 = 0.1 %).
    0: off (fixed ``position_size``). Lowrider sizes by its lots, not by this."""
    vol_lookback: int = 60
    """Bars of closes σ is measured over (capped at the session's context before its first bar)."""
    leak: bool = False
    """Sanity option: append a feature that reveals the return of the bars the next decision commits to (the
    fill bar, through ``max(decision_every, min_hold_bars)`` bars) — a learner must exploit it."""
    leak_scale: float = 1000.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"env.{name}: {why} (got {getattr(self, name)!r})")

        if self.mode not in MODES:
            raise bad("mode", f"unknown mode, expected one of {', '.join(MODES)}")
        if self.reward not in REWARDS:
            raise bad("reward", f"unknown reward, expected one of {', '.join(REWARDS)}")
        if not 0 < self.position_size <= 1:
            raise bad("position_size", "must be in (0, 1]")
        for name in ("hold_penalty", "flip_penalty", "trade_penalty", "drawdown_penalty"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be ≥ 0")
        if not 0 < self.dsr_eta < 1:
            raise bad("dsr_eta", "must be in (0, 1)")
        m = self.lot_multipliers
        if len(m) < 2 or m[0] != 0 or any(not (x > 0 and math.isfinite(x)) for x in m[1:]):
            raise bad("lot_multipliers", "must be [0, then at least one positive multiplier]")
        if not self.base_lot > 0:
            raise bad("base_lot", "must be > 0")
        if not self.reluctance >= 1:
            raise bad("reluctance", "must be ≥ 1 (the budget cap is initial cash / reluctance)")
        if not self.profit_target > 0:
            raise bad("profit_target", "must be > 0")
        if not 0 < self.rule_drop_step < 1:
            raise bad("rule_drop_step", "must be in (0, 1)")
        if not self.rule_schedule or any(not 0 < a < len(m) for a in self.rule_schedule):
            raise bad("rule_schedule", f"must be non-empty action indices in [1, {len(m) - 1}]")
        if not self.leak_scale > 0:
            raise bad("leak_scale", "must be > 0")
        if not (isinstance(self.decision_every, int) and self.decision_every >= 1):
            raise bad("decision_every", "must be an integer ≥ 1")
        if not (isinstance(self.min_hold_bars, int) and self.min_hold_bars >= 0):
            raise bad("min_hold_bars", "must be an integer ≥ 0")
        if not (self.turnover_penalty >= 0 and math.isfinite(self.turnover_penalty)):
            raise bad("turnover_penalty", "must be ≥ 0")
        if not (self.vol_target >= 0 and math.isfinite(self.vol_target)):
            raise bad("vol_target", "must be ≥ 0 (0 = off)")
        if not (isinstance(self.vol_lookback, int) and self.vol_lookback >= 2):
            raise bad("vol_lookback", "must be an integer ≥ 2")

    @property
    def leak_horizon(self) -> int:
        """Bars the planted leak's return spans: what one decision's position is committed for."""
        return max(self.decision_every, self.min_hold_bars, 1)

    @property
    def n_actions(self) -> int:
        return {"futures_session": len(FuturesAction), "spot_cycle": len(SpotAction)}.get(
            self.mode, len(self.lot_multipliers))

    @property
    def close_action(self) -> int:
        """The action that closes the position (futures: close, spot: sell); -1 for lowrider (it sells by rule)."""
        return {"futures_session": CLOSE, "spot_cycle": SELL}.get(self.mode, -1)

    @property
    def action_names(self) -> tuple[str, ...]:
        if self.mode == "futures_session":
            return FUTURES_ACTIONS
        if self.mode == "spot_cycle":
            return SPOT_ACTIONS
        return tuple("hold" if x == 0 else f"buy_x{x:g}" for x in self.lot_multipliers)

    def to_array(self, initial_cash: float) -> np.ndarray:
        ep = np.zeros(EP_MULTS + len(self.lot_multipliers))
        ep[EP_MODE] = MODES.index(self.mode)
        ep[EP_REWARD] = REWARDS.index(self.reward)
        ep[EP_SIZE], ep[EP_FORCE_CLOSE] = self.position_size, float(self.force_close)
        ep[EP_HOLD_PEN], ep[EP_FLIP_PEN] = self.hold_penalty, self.flip_penalty
        ep[EP_TRADE_PEN], ep[EP_DD_PEN], ep[EP_DSR_ETA] = self.trade_penalty, self.drawdown_penalty, self.dsr_eta
        ep[EP_BASE_LOT], ep[EP_BUDGET] = self.base_lot, initial_cash / self.reluctance
        ep[EP_PROFIT_TARGET], ep[EP_N_ACTIONS] = self.profit_target, self.n_actions
        ep[EP_EVERY], ep[EP_MIN_HOLD], ep[EP_TURNOVER_PEN] = self.decision_every, self.min_hold_bars, \
            self.turnover_penalty
        ep[EP_VOL_TARGET], ep[EP_VOL_LOOKBACK] = self.vol_target, self.vol_lookback
        ep[EP_MULTS:] = self.lot_multipliers
        return ep

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@njit(cache=True, inline="always")
def take_profit_due(acct: np.ndarray, b: int, ref: float, xp: np.ndarray, ep: np.ndarray) -> bool:
    """Lowrider's exit: the position, sold at ``ref`` net of the taker fee, beats its cost by the profit target."""
    q = acct[QTY, b]
    if q <= 0.0:
        return False
    cost = q * acct[AVG_ENTRY, b] + acct[FEES, b]
    return bool(q * ref * (1.0 - xp[XP_TAKER]) >= cost * (1.0 + ep[EP_PROFIT_TARGET]))


@njit(cache=True, inline="always")
def order_for(a: int, committed: float, ref: float, acct: np.ndarray, env: np.ndarray, b: int, xp: np.ndarray,
              ep: np.ndarray) -> float:
    """The signed order quantity action ``a`` sends; 0 when the action is invalid in the current state.

    ``committed`` is the position once the orders already sent (latency) have filled, so a second "long"
    while a long is in flight is invalid, exactly as it would be for a live trader tracking its open orders.

    Inlined (``inline="always"``) into the env's step and its action-mask loop, which call it up to n_actions
    times per account and step: as a call, each passed four array structs by value on the stack (measured
    ~30 ns of a ~210 ns batch account step at B = 1024).
    """
    mode = int(ep[EP_MODE])
    step = xp[XP_STEP]
    dq = 0.0
    if a == HOLD:
        return 0.0
    # min hold: a position open (or opening) fewer than min_hold_bars bars may not be closed or flipped
    locked = committed != 0.0 and env[E_HELD, b] < ep[EP_MIN_HOLD]
    size = ep[EP_SIZE] * (env[E_VOL_SCALE, b] if ep[EP_VOL_TARGET] > 0.0 else 1.0)
    if mode == MODE_FUTURES:
        if locked:
            return 0.0  # close, or a long/short that would flip (the same side is refused below anyway)
        if a == CLOSE:
            dq = -committed
        else:
            side = 1.0 if a == LONG else -1.0
            if committed * side > 0.0:
                return 0.0
            target = round_qty(size * max_position(acct[EQUITY, b], ref, xp), step)
            if target <= 0.0:
                return 0.0
            dq = side * target - committed
    elif mode == MODE_SPOT:
        if a == BUY:
            if committed != 0.0 or env[E_N_BUYS, b] > 0.0:  # one cycle: no second buy
                return 0.0
            dq = round_qty(size * acct[CASH, b] / (ref * (1.0 + xp[XP_TAKER])), step)
        elif a == SELL and not locked:
            dq = -committed if committed > 0.0 else 0.0
    else:
        if (committed == 0.0 and env[E_N_BUYS, b] > 0.0) or take_profit_due(acct, b, ref, xp, ep):
            return 0.0  # cycle closed or closing: only hold
        lot = ep[EP_MULTS + a] * ep[EP_BASE_LOT]
        pending_cost = (committed - acct[QTY, b]) * ref
        spent = acct[QTY, b] * acct[AVG_ENTRY, b] + pending_cost
        if spent + lot > ep[EP_BUDGET] * (1.0 + 1e-9) or lot * (1.0 + xp[XP_TAKER]) > acct[CASH, b] - pending_cost:
            return 0.0
        dq = round_qty(lot / ref, step)
    if dq != 0.0 and committed + dq != 0.0 and abs(dq) * ref < xp[XP_MIN_NOTIONAL]:
        return 0.0
    return dq


def lowrider_rule(last_close: np.ndarray, qty: np.ndarray, avg_entry: np.ndarray, n_buys: np.ndarray,
                  mask: np.ndarray, params: EnvParams) -> np.ndarray:
    """The rule-based Lowrider's actions for B accounts (numpy; works for the single env with B = 1).

    Flat: buy the schedule's first lot. Holding: buy the next scheduled lot once the last close is
    ``rule_drop_step × (buys so far)`` below the average entry — deeper drops earn larger lots. The take-profit
    exit is the mode's own. A scheduled lot the mask refuses (budget, cash) falls back to the largest valid
    smaller one, else hold.
    """
    schedule = np.asarray(params.rule_schedule)
    nb = n_buys.astype(np.int64)
    want = schedule[np.minimum(nb, len(schedule) - 1)]
    trigger = (qty == 0) | (last_close <= avg_entry * (1.0 - params.rule_drop_step * np.maximum(nb, 1)))
    actions = np.where(trigger, want, HOLD)
    idx = np.arange(mask.shape[1])
    allowed = mask & (idx[None, :] <= actions[:, None])  # valid actions no larger than the scheduled one
    return np.asarray(np.where(allowed.any(axis=1), mask.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1), HOLD),
                      dtype=np.int64)
