"""Decisions: policies by name, the masked argmax / softmax / confidence of model scores, and the filters.

One implementation of each, shared by every path that turns scores into an action: the backtest's split-network
numba loop (inlined), its generic bar-by-bar path (``decide_batch``), and the report's action probabilities
(``masked_softmax``: ``evaluate.stage.action_probabilities``, ``agents.plots``).

Filters (``params.yaml: backtest``, as in the D3QN reference design) sit between the policy and the env's
continuous step; a filtered
decision becomes hold. ``stop_loss`` / ``take_profit`` (fractions of the average entry, on the last close at
decision time) send the mode's close action and bypass the other filters (a protective exit must not be blocked
by a cooldown); ``cooldown_bars`` blocks orders for that many decisions after a bar with a fill;
``max_trades_per_day`` caps the orders let through per UTC day (per account); ``confidence`` needs the chosen
action's softmax probability (``logits`` models) or ``Q(chosen) - Q(hold)`` (``q_values``, and ``classifier``
whose scores are already thresholded) to reach it — hold is what a filtered decision becomes, so the gap to hold
is the value given up. Rule baselines have no scores; the confidence filter does not apply to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from rltrader.agents.baselines import BuyAndHold, Flat, LowriderRule, RandomPolicy, SMACross, sma_sides
from rltrader.env.core import P_T, EnvArrays, EnvCore
from rltrader.env.modes import BUY, HOLD, LONG, SELL, SHORT, lowrider_rule
from rltrader.errors import ConfigError
from rltrader.evaluate.filters import F_CLOSE_ACTION, F_COOLDOWN, F_MAX_DAY, F_SL, F_TP
from rltrader.evaluate.filters import BacktestFilters as BacktestFilters  # re-exported
from rltrader.execution import AVG_ENTRY, QTY, REASON_SIGNAL, REASON_SL, REASON_TP

POLICY_NAMES = ("flat", "buy_and_hold", "random", "sma_cross", "lowrider_rule")
DAY_US = 86_400_000_000

# --- filter parameters (float vector) and per-account filter state (rows of a (N_FS, B) array) -----------------
FS_LAST_FILL, FS_DAY, FS_COUNT, FS_BLOCKED = range(4)
N_FS = 4


class FilterArrays(NamedTuple):
    """The filters for the kernels: ``params`` (``BacktestFilters.to_array``), ``state`` (N_FS, B)."""

    params: np.ndarray
    state: np.ndarray

    @classmethod
    def create(cls, filters: BacktestFilters, mode: str, n: int) -> FilterArrays:
        state = np.zeros((N_FS, n))
        state[FS_LAST_FILL] = -1e18
        state[FS_DAY] = -1.0
        return cls(filters.to_array(mode), state)


# ============================================================================ scores → action (numba, one copy)


@njit(cache=True, inline="always")
def masked_argmax(sc: np.ndarray, mask: np.ndarray) -> int:
    """The best valid action, first of equal maxima (numpy's argmax over ``where(mask, sc, -inf)``)."""
    a, best = 0, -np.inf
    for k in range(sc.shape[0]):
        if mask[k] and sc[k] > best:
            a, best = k, sc[k]
    return a


@njit(cache=True, inline="always")
def masked_softmax_row(sc: np.ndarray, mask: np.ndarray, out: np.ndarray) -> int:
    """``out``: the softmax of the scores over the valid actions (0 for the others), in float64; returns the
    masked argmax (whose probability is ``1 / Σ exp(score - best)``)."""
    a = masked_argmax(sc, mask)
    best = float(sc[a])
    tot = 0.0
    for k in range(sc.shape[0]):
        if mask[k]:
            tot += math.exp(sc[k] - best)
    for k in range(sc.shape[0]):
        out[k] = math.exp(sc[k] - best) / tot if mask[k] else 0.0
    return a


@njit(cache=True, inline="always")
def is_confident(sc: np.ndarray, mask: np.ndarray, a: int, softmax: bool, threshold: float,
                 probs: np.ndarray) -> bool:
    """The confidence filter for the (greedy) action ``a``: its softmax probability (``softmax``: logits
    models) or its score's gap to hold (q_values, classifier) reaches ``threshold``; always when it is 0."""
    if threshold <= 0.0:
        return True
    if softmax:
        masked_softmax_row(sc, mask, probs)
        return bool(probs[a] >= threshold)
    return bool(sc[a] - sc[HOLD] >= threshold)


@njit(cache=True)
def decide_batch(scores: np.ndarray, mask: np.ndarray, softmax: bool, threshold: float, actions: np.ndarray,
                 confident: np.ndarray) -> None:
    """Greedy actions and their confidence for a batch of score rows (the generic path)."""
    probs = np.zeros(scores.shape[1])
    for i in range(scores.shape[0]):
        a = masked_argmax(scores[i], mask[i])
        actions[i] = a
        confident[i] = is_confident(scores[i], mask[i], a, softmax, threshold, probs)


@njit(cache=True)
def _softmax_rows(scores: np.ndarray, mask: np.ndarray, probs: np.ndarray, actions: np.ndarray) -> None:
    for i in range(scores.shape[0]):
        actions[i] = masked_softmax_row(scores[i], mask[i], probs[i])


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities over the valid actions (n, A) float64, greedy actions (n,) int64) of a batch of scores."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    probs = np.zeros(scores.shape)
    actions = np.zeros(len(scores), np.int64)
    _softmax_rows(scores, mask, probs, actions)
    return probs, actions


# ================================================================================================== the filters


@njit(cache=True, inline="always")
def protective_reason(b: int, k: EnvArrays, flt: np.ndarray) -> int:
    """``REASON_SL`` / ``REASON_TP`` when account ``b``'s open position has crossed the stop loss / take profit
    (on the last close before its next decision bar), else ``REASON_SIGNAL`` — one copy, read by the filters and
    by the engine's quiet-bar test."""
    q = k.acct[QTY, b]
    avg = k.acct[AVG_ENTRY, b]
    if q != 0.0 and int(flt[F_CLOSE_ACTION]) > 0 and (flt[F_SL] > 0.0 or flt[F_TP] > 0.0) and avg > 0.0:
        move = (k.bars[3, k.ptr[P_T, b] - 1] / avg - 1.0) * (1.0 if q > 0.0 else -1.0)
        if flt[F_SL] > 0.0 and move <= -flt[F_SL]:
            return REASON_SL
        if flt[F_TP] > 0.0 and move >= flt[F_TP]:
            return REASON_TP
    return REASON_SIGNAL


@njit(cache=True, inline="always")
def filter_decision(b: int, a: int, confident: bool, k: EnvArrays, f: FilterArrays) -> tuple[int, int]:
    """Account ``b``'s action after the filters (module docstring), and its reason (``REASON_SL`` /
    ``REASON_TP`` for a protective exit, else ``REASON_SIGNAL``)."""
    flt, fs, mask = f.params, f.state, k.mask
    t = k.ptr[P_T, b]
    if a < 0 or a >= mask.shape[1]:
        a = HOLD
    close_a = int(flt[F_CLOSE_ACTION])
    reason = protective_reason(b, k, flt)
    if flt[F_MAX_DAY] > 0.0:
        day = k.time[t] // DAY_US
        if day != fs[FS_DAY, b]:
            fs[FS_DAY, b] = day
            fs[FS_COUNT, b] = 0.0
    if reason != REASON_SIGNAL and mask[b, close_a]:
        a = close_a
    else:
        reason = REASON_SIGNAL
        if a != HOLD and mask[b, a]:  # only a decision that would send an order is filtered (and counted)
            blocked = not confident
            if flt[F_COOLDOWN] > 0.0 and t - fs[FS_LAST_FILL, b] <= flt[F_COOLDOWN]:
                blocked = True
            if flt[F_MAX_DAY] > 0.0 and fs[FS_COUNT, b] >= flt[F_MAX_DAY]:
                blocked = True
            if blocked:
                a = HOLD
                fs[FS_BLOCKED, b] += 1.0
    if a != HOLD and mask[b, a]:  # an order is sent
        fs[FS_COUNT, b] += 1.0
    return a, reason


# ============================================================================================ policies by name


class EnvView:
    """What the rule baselines' ``bind(env)`` reads of a ``BatchSessionEnv``: the core, params, rule actions."""

    def __init__(self, core: EnvCore) -> None:
        self.core, self.params, self.execution = core, core.params, core.execution
        self.n_actions = core.n_actions
        self.num_envs = core.n

    def rule_actions(self) -> np.ndarray:
        c = self.core
        return lowrider_rule(c.last_close, c.accounts.qty, c.accounts.avg_entry, c.n_buys, c.mask, self.params)


def make_policy(name: str, mode: str, seed: int = 0) -> Callable[..., np.ndarray]:
    """A rule baseline by name (``POLICY_NAMES``)."""
    table: dict[str, Callable[[], Callable[..., np.ndarray]]] = {
        "flat": Flat, "buy_and_hold": lambda: BuyAndHold(mode), "random": lambda: RandomPolicy(seed),
        "sma_cross": lambda: SMACross(mode), "lowrider_rule": LowriderRule}
    if name not in table:
        raise ConfigError(f"backtest.policy: unknown policy {name!r} (a baseline: {', '.join(POLICY_NAMES)}; or a "
                          f"model: a .pt file, models:/…, runs:/…)")
    return table[name]()


def load_policy(spec: str, mode: str, seed: int = 0) -> Any:
    """A baseline name, a ``torch.save``d ``PolicyModule`` (``.pt``) or an MLflow model URI → a policy object."""
    if spec in POLICY_NAMES:
        return make_policy(spec, mode, seed)
    if spec.endswith(".pt") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise ConfigError(f"backtest.policy: model file {spec} does not exist")
        from rltrader.agents.packaging import load_policy_file

        return load_policy_file(spec)  # hash-checked; a corrupt file is one error line naming it
    if spec.startswith(("models:/", "runs:/", "file:", "mlflow-artifacts:")):
        from rltrader.agents.packaging import load_mlflow_policy

        return load_mlflow_policy(spec)
    return make_policy(spec, mode, seed)  # raises with the list of names


def rule_decisions(policy: Any, view: EnvView, latency: int) -> np.ndarray | None:
    """Every bar's decision for a rule whose decisions do not depend on fills, as an int8 vector over the rows;
    None when the policy must be stepped bar by bar.

    ``flat`` always; without latency ``buy_and_hold`` and ``sma_cross`` (futures, spot) — their env baselines
    only consult the position to avoid re-sending an order the env would reject anyway (``order_for`` returns 0
    for a long while long), so "long when the fast SMA is above the slow one, else short" gives the same fills.
    With latency an order can be in flight, the baseline then looks at the filled position and the target form
    would not (it could cancel a pending flip)."""
    mode = view.params.mode
    n = view.core.bars.shape[1]
    if isinstance(policy, Flat):
        return np.full(n, HOLD, np.int8)
    if latency > 0 or mode not in ("futures_session", "spot_cycle"):
        return None  # an order may be in flight: the baselines' decisions then depend on the filled position
    if isinstance(policy, BuyAndHold):
        return np.full(n, LONG if mode == "futures_session" else BUY, np.int8)
    if isinstance(policy, SMACross):
        policy.set_windows(view.core.data.context)
        hi, lo = (LONG, SHORT) if mode == "futures_session" else (BUY, SELL)
        out = np.empty(n, np.int8)
        sma_sides(view.core.bars[3], policy.fast, policy.slow, hi, lo, out)  # the agent's signal, one pass
        return out
    return None
