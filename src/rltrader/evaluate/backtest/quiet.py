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

On a quiet bar the loop runs only what changes state: the execution model's ``mark_to_market`` at the close (the
one booking ``process_bar`` makes when funding, the fill and the liquidation check find nothing to do), the held-
bars counter, the equity peak / previous equity, the pointers and the curve row. It skips the observation, the
reward and the penalties; the next non-quiet bar first rebuilds the observation (``core._observe``, a pure function
of the account, env and pointer state) and then takes the env's full step (``engine._advance``), so every fill,
payment and liquidation is the full step's. The tests for "nothing to book" are ``apply_funding``'s and
``check_liquidation``'s own conditions; ``env.modes.order_for`` is called itself (compiled inline).
``tests/test_backtest_quiet.py`` checks every frame and event against the every-bar loop
(``backtest_sessions(fast=False)``), with funding payments, liquidations, stop loss / take profit, cooldown, the
daily cap, ``min_hold_bars``, ``decision_every`` and volatility sizing in play.

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
    update_held,
    vol_scale,
)
from rltrader.env.modes import (
    E_N_BUYS,
    E_PEAK,
    E_PREV_EQUITY,
    E_VOL_SCALE,
    EP_EVERY,
    EP_MODE,
    EP_N_ACTIONS,
    EP_VOL_TARGET,
    MODE_FUTURES,
)
from rltrader.env.modes import order_for as _order_for
from rltrader.evaluate.backtest.decisions import protective_reason
from rltrader.evaluate.filters import F_SL, F_TP
from rltrader.execution import (
    CASH,
    EQUITY,
    FEES,
    FUNDING_PERIOD_US,
    QTY,
    REASON_SIGNAL,
    XP_CASH,
    XP_FUNDING,
    XP_MMR,
    XP_SPOT,
)
from rltrader.execution import mark_to_market as _mark_to_market

order_for = njit(inline="always")(_order_for.py_func)
mark_to_market = njit(inline="always")(_mark_to_market.py_func)
"""``env.modes.order_for`` and ``execution.mark_to_market`` themselves (their Python functions, not copies),
compiled inline into the quiet loop: it runs them on nearly every bar, and a call passes and reference-counts
the arrays each time (measured: 56 → 30 ns per bar of the SMA cross)."""

NOT_QUIET = 0
"""``quiet_run``'s result when the account's next bar needs the full step."""


@njit(cache=True, inline="always")
def quiet_run(b: int, decisions: np.ndarray, k: EnvArrays, run: Continuous, flt: np.ndarray) -> int:
    """Run account ``b``'s bars from its next one on for as long as they are quiet (module docstring; decision
    of bar ``t``: ``decisions[t]``); returns how many (``NOT_QUIET``: the next bar needs the full step). Nothing
    a quiet bar touches changes the position, cash, average entry or fees, so they are read once."""
    acct, env, ptr, xp, ep, bars, time = k.acct, k.env, k.ptr, k.xp, k.ep, k.bars, k.time
    t0 = ptr[P_T, b]
    last = ptr[P_END, b] - 1  # the stretch's last bar is never quiet (forced close, next stretch)
    start, kk0 = ptr[P_START, b], ptr[P_K, b]
    pos0 = run.base[ptr[P_SESSION, b]] - start
    q = acct[QTY, b]
    cash = acct[CASH, b]
    fees = acct[FEES, b] + run.carry[C_FEES, b]
    floor = EQUITY_FLOOR * xp[XP_CASH]
    funding = q != 0.0 and xp[XP_FUNDING] != 0.0
    liq = q != 0.0 and xp[XP_SPOT] == 0.0
    mmr = xp[XP_MMR]
    protect = q != 0.0 and (flt[F_SL] > 0.0 or flt[F_TP] > 0.0)
    if q == 0.0 and int(ep[EP_MODE]) != MODE_FUTURES and env[E_N_BUYS, b] > 0.0:  # a spot cycle just ended
        return NOT_QUIET
    n_actions = int(ep[EP_N_ACTIONS])
    every = int(ep[EP_EVERY])
    vol = ep[EP_VOL_TARGET] > 0.0
    ctx = k.window.shape[1]
    peak = env[E_PEAK, b]
    close = bars[3]
    t = t0
    while t < last:
        c = close[t]
        if not cash + q * c > floor:  # bankrupt at the close (mark_to_market's sum): the episode ends
            break
        if funding and time[t] % FUNDING_PERIOD_US == 0:
            break
        if liq:  # check_liquidation's test at the bar's adverse extreme
            adverse = bars[2, t] if q > 0.0 else bars[1, t]
            if not cash + q * adverse > mmr * abs(q) * adverse:
                break
        if protect:
            ptr[P_T, b] = t
            if protective_reason(b, k, flt) != REASON_SIGNAL:
                break
        a = int(decisions[t])
        if 0 < a < n_actions and (every == 1 or (kk0 + t - t0) % every == 0):  # core.is_decision_bar
            if vol:  # the observation's size factor, which order_for reads
                env[E_VOL_SCALE, b] = vol_scale(close, t, max(start - ctx, 0), ep)
            if order_for(a, q, close[t - 1], acct, env, b, xp, ep) != 0.0:  # latency 0: committed = qty
                break
        eq = mark_to_market(acct, b, c)
        update_held(env, b, q, q)  # per bar: order_for reads it (min_hold_bars)
        peak = max(peak, eq)
        p = pos0 + t
        run.curve_eq[p], run.curve_qty[p], run.curve_fees[p] = eq, q, fees
        t += 1
    n: int = t - t0
    ptr[P_T, b] = t
    if n > 0:
        ptr[P_K, b] = kk0 + n
        env[E_PEAK, b] = peak
        env[E_PREV_EQUITY, b] = acct[EQUITY, b]
    return n
