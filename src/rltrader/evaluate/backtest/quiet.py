"""Quiet bars: the precomputed-decision loop's shortcut for bars on which nothing but the mark can happen.

With precomputed decisions (``rule_decisions``: SMA cross, buy & hold, flat) most bars send no order: the policy
repeats the side it already holds (``order_for`` refuses a long while long) or holds. On such a bar the env's full
step still builds the policy's observation (state vector with a ``log``, the action mask with one ``order_for``
per action), the reward and the penalties — none of which a precomputed policy or the result frames read. A
*quiet* bar is one where, by the env's own rules,

- it is not the stretch's last bar (forced close, the move to the next stretch);
- the decision sends no order: hold, not a decision bar (``env.decision_every``), or ``order_for`` gives 0 (the
  mask's own test), and no stop loss / take profit is due (``decisions.protective_reason``);
- the bar books nothing: no funding payment due, no liquidation (the account's equity at the bar's adverse
  extreme stays above the maintenance margin), not bankrupt at the close, no spot cycle ending.

On a quiet bar the loop runs only what changes state: the execution model's own ``process_bar`` with no order
(funding and liquidation find nothing to do, the account is marked at the close), the held-bars counter, the
equity peak / previous equity, the pointers and the curve row. It skips the observation, the reward and the
penalties; the next non-quiet bar first rebuilds the observation (``core._observe``, a pure function of the
account, env and pointer state) and then takes the env's full step (``engine._advance``), so every fill is the
full step's. The quiet test reads the execution model's conditions; should they ever disagree with what
``process_bar`` did (a fill, a cash change, bankruptcy on a bar called quiet), the loop stops with an error
instead of producing a different run. ``tests/test_backtest_quiet.py`` checks every frame against the every-bar
loop (``backtest_sessions(fast=False)``).

Not used with latency (an order in flight makes a bar non-quiet in ways the decision does not show) nor in
Lowrider mode (its take-profit is the env's own order on any bar); ``engine`` runs those bar by bar.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rltrader.env.continuous import C_FEES, Continuous
from rltrader.env.core import (
    EQUITY_FLOOR,
    P_END,
    P_K,
    P_SESSION,
    P_START,
    P_T,
    EnvArrays,
    is_decision_bar,
    update_held,
    vol_scale,
)
from rltrader.env.modes import (
    E_N_BUYS,
    E_PEAK,
    E_PREV_EQUITY,
    E_VOL_SCALE,
    EP_MODE,
    EP_N_ACTIONS,
    EP_VOL_TARGET,
    MODE_FUTURES,
    order_for,
)
from rltrader.evaluate.backtest.decisions import protective_reason
from rltrader.execution import (
    CASH,
    EQUITY,
    FEES,
    FUNDING_PERIOD_US,
    N_FILLS,
    QTY,
    REASON_SIGNAL,
    XP_CASH,
    XP_FUNDING,
    XP_MMR,
    XP_SPOT,
    process_bar,
)

QUIET, NOT_QUIET, DISAGREE = 1, 0, -1
"""``quiet_bar``'s results: the bar was run quietly; it needs the full step; the execution model booked
something on a bar the test called quiet (a bug: the caller raises)."""


@njit(cache=True, inline="always")
def quiet_bar(b: int, a: int, k: EnvArrays, run: Continuous, flt: np.ndarray) -> int:
    """Run account ``b``'s next bar (decision ``a``) if it is quiet (module docstring); ``NOT_QUIET`` leaves
    every array untouched (but ``E_VOL_SCALE``, which the full step's observation rewrites with the same
    value)."""
    acct, env, ptr, xp, ep, bars = k.acct, k.env, k.ptr, k.xp, k.ep, k.bars
    t = ptr[P_T, b]
    if t >= ptr[P_END, b] - 1:
        return NOT_QUIET
    q = acct[QTY, b]
    cash = acct[CASH, b]
    floor = EQUITY_FLOOR * xp[XP_CASH]
    c = bars[3, t]
    if not cash + q * c > floor:  # bankrupt at the close (mark_to_market's sum): the episode ends
        return NOT_QUIET
    if q != 0.0:
        if xp[XP_FUNDING] != 0.0 and k.time[t] % FUNDING_PERIOD_US == 0:
            return NOT_QUIET
        if xp[XP_SPOT] == 0.0:  # check_liquidation's test at the bar's adverse extreme
            adverse = bars[2, t] if q > 0.0 else bars[1, t]
            if not cash + q * adverse > xp[XP_MMR] * abs(q) * adverse:
                return NOT_QUIET
        if protective_reason(b, k, flt) != REASON_SIGNAL:
            return NOT_QUIET
    elif int(ep[EP_MODE]) != MODE_FUTURES and env[E_N_BUYS, b] > 0.0:  # a spot cycle just ended
        return NOT_QUIET
    if is_decision_bar(ptr[P_K, b], ep) and 0 < a < int(ep[EP_N_ACTIONS]):
        if ep[EP_VOL_TARGET] > 0.0:  # the observation's size factor, which order_for reads
            env[E_VOL_SCALE, b] = vol_scale(bars[3], t, max(ptr[P_START, b] - k.window.shape[1], 0), ep)
        if order_for(a, q, bars[3, t - 1], acct, env, b, xp, ep) != 0.0:  # latency 0: committed = qty
            return NOT_QUIET
    nf = acct[N_FILLS, b]
    process_bar(acct, b, 0.0, k.time[t], bars[0, t], bars[1, t], bars[2, t], c, bars[4, t], xp)
    eq = acct[EQUITY, b]
    if acct[N_FILLS, b] != nf or acct[CASH, b] != cash or not eq > floor:
        return DISAGREE
    update_held(env, b, q, q)
    env[E_PEAK, b] = max(env[E_PEAK, b], eq)
    env[E_PREV_EQUITY, b] = eq
    ptr[P_T, b] = t + 1
    ptr[P_K, b] += 1
    pos = run.base[ptr[P_SESSION, b]] + t - ptr[P_START, b]
    run.curve_eq[pos], run.curve_qty[pos] = eq, q
    run.curve_fees[pos] = acct[FEES, b] + run.carry[C_FEES, b]
    return QUIET
