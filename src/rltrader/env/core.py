"""The env step shared by the single and the batch env: one numba kernel over B accounts.

Both envs own an ``EnvCore`` (the single env with B = 1) and call the same kernels, so their semantics cannot
drift apart; the only differences are the API around them (gymnasium vs arrays) and the batch env's auto-reset.

Timing of one step for an account whose next decision bar is ``t`` (session trades ``[start, end)``):

1. the action, decided on features ``[t - context, t)`` and the portfolio marked at ``close[t-1]``, becomes an
   order (``modes.order_for``); it is queued to fill at bar ``t + latency`` — dropped if that is ≥ ``end``;
2. bar ``t``: funding at the open, the order due now fills at ``open[t]``, liquidation check over the bar,
   marked at ``close[t]`` (``execution.process_bar``); on the last bar (``t = end - 1``) any position is then
   force-closed at ``close[t]`` as a taker with slippage (``force_close``);
3. reward from the equity change, minus penalties; the episode ends after the last bar, when a spot/Lowrider
   cycle's sell has filled, or when the account is bankrupt.

Holding (``env.decision_every`` k, ``env.min_hold_bars`` n): the kernel steps one bar at a time everywhere (the
backtest and the live trader call it per bar), and only bars ``k·j`` of an episode/stretch take a decision — on the
others the action is replaced by hold and the mask allows only hold. The training envs' ``step_observe`` runs the k
bars of one decision in one call (rewards summed). ``order_for`` refuses a close/flip while the position has been
open fewer than n bars (``E_HELD``, counted by ``update_held`` after each bar).

Observations for the next decision (bar ``t + 1``): the window ``features[t + 1 - context : t + 1]``, a
position-state vector (``STATE_NAMES``) and the action mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar, cast

import numpy as np
from numba import njit

from rltrader.borrow import borrow
from rltrader.dataset.split import SessionSet
from rltrader.env.modes import (
    E_DSR_A,
    E_DSR_B,
    E_HELD,
    E_N_BUYS,
    E_PEAK,
    E_PREV_EQUITY,
    E_VOL_SCALE,
    EP_DD_PEN,
    EP_DSR_ETA,
    EP_EVERY,
    EP_FLIP_PEN,
    EP_FORCE_CLOSE,
    EP_HOLD_PEN,
    EP_MODE,
    EP_N_ACTIONS,
    EP_REWARD,
    EP_TRADE_PEN,
    EP_TURNOVER_PEN,
    EP_VOL_LOOKBACK,
    EP_VOL_TARGET,
    HOLD,
    MODE_FUTURES,
    MODE_LOWRIDER,
    N_ENV_FIELDS,
    REWARD_LOG,
    REWARD_PNL,
    EnvParams,
    order_for,
    take_profit_due,
)
from rltrader.errors import ConfigError
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    CUR_ROW,
    CUR_TAG,
    CUR_TIME,
    EQUITY,
    QTY,
    XP_CASH,
    XP_LATENCY,
    Accounts,
    EventLog,
    ExecutionParams,
    close_position,
    mark_to_market,
    process_bar,
    reset_account,
)
from rltrader.memcopy import copy_block, prefetch

# Every kernel in this module is compiled WITHOUT numba's runtime (``_nrt=False``): no reference counting at all.
# With borrowed arrays (``rltrader.borrow``) the refcounts were NULL, so no atomics, but numba still emitted ~40
# ``NRT_incref``/``NRT_decref`` calls per account and step (each helper's array arguments and locals), every one a
# call that returns at its NULL check plus the register spills around it: measured at B = 1024 index
# observations, 430 → 255 ns per account step (same outputs, bit for bit). The kernels allocate nothing, so they
# need no runtime; the one construct that would (a slice-to-slice copy, which numba may stage through a temporary
# when the slices could overlap) is a ``memcopy.copy_block`` instead.

_F = TypeVar("_F", bound=Callable[..., Any])


def kernel(inline: Literal["never", "always"] = "never") -> Callable[[_F], _F]:
    """``njit`` as every kernel here is compiled: cached, without numba's runtime (the note above)."""
    return cast(Callable[[_F], _F], njit(cache=True, _nrt=False, inline=inline))  # type: ignore[call-overload]

# --- pointers per account: rows of a (N_PTR, B) int64 array ---------------------------------------------------
P_T, P_START, P_END, P_SESSION, P_K, P_EPISODES = range(6)
N_PTR = 6
STATE_NAMES = ("position_side", "exposure", "unrealized_pnl", "cash", "log_equity", "time_left",
               "pending_exposure", "cost_basis")
N_STATE = len(STATE_NAMES)
# outputs: rows of the float (N_OUT_F, B) and bool (N_OUT_B, B) result arrays
O_REWARD, O_PENALTY, O_FINAL_EQUITY, O_FILLED = range(4)
N_OUT_F = 4
O_TERMINATED, O_TRUNCATED = range(2)
EQUITY_FLOOR = 1e-9
"""Equity below ``EQUITY_FLOOR × initial cash`` counts as bankrupt; the log reward floors it there so rewards
still telescope exactly to log(final / initial)."""


class EnvArrays(NamedTuple):
    """Every array the step kernels read or write, as one argument (numba takes a NamedTuple of arrays).

    Market data: ``bars`` (5, N) open/high/low/close/volume, ``time`` (N,), ``features`` (N, F), ``sess`` (2, S)
    session start/end rows, ``xp`` / ``ep`` the packed execution and env params. Per account: ``acct``
    (execution fields), ``env`` (env fields), ``ptr`` (pointers), ``pending`` (orders in flight, one slot per
    latency bar), ``next_session`` (autoreset target). Outputs: the next observation (``window``, ``state``,
    ``mask``) and the step's results (``out_f``, ``out_b``)."""

    acct: np.ndarray
    env: np.ndarray
    ptr: np.ndarray
    pending: np.ndarray
    sess: np.ndarray
    bars: np.ndarray
    time: np.ndarray
    features: np.ndarray
    xp: np.ndarray
    ep: np.ndarray
    next_session: np.ndarray
    window: np.ndarray
    state: np.ndarray
    mask: np.ndarray
    out_f: np.ndarray
    out_b: np.ndarray


@kernel(inline="always")
def _reset_one(b: int, s: int, k: EnvArrays) -> None:
    acct, env, ptr, pending, sess, xp = k.acct, k.env, k.ptr, k.pending, k.sess, k.xp
    cash = xp[XP_CASH]
    reset_account(acct, b, cash)
    ptr[P_T, b] = sess[0, s]
    ptr[P_START, b] = sess[0, s]
    ptr[P_END, b] = sess[1, s]
    ptr[P_SESSION, b] = s
    ptr[P_K, b] = 0
    pending[b, :] = 0.0
    env[:, b] = 0.0
    env[E_PREV_EQUITY, b] = cash
    env[E_PEAK, b] = cash


@kernel(inline="always")
def is_decision_bar(kk: int, ep: np.ndarray) -> bool:
    """Whether the episode's bar number ``kk`` (0 = its first) takes a decision (``env.decision_every``); on
    the others the env holds."""
    return kk % int(ep[EP_EVERY]) == 0


@kernel()
def vol_scale(close: np.ndarray, t: int, lo: int, ep: np.ndarray) -> float:
    """``min(1, vol_target / σ)`` for a decision at bar ``t``: σ is the RMS 1-bar log return of the closes in
    ``[max(t - vol_lookback, lo), t)`` (``lo``: the first row of the account's gap-free stretch), so only
    closed bars of the same stretch are read. 1 when fewer than two closes or a flat price."""
    i0 = max(t - int(ep[EP_VOL_LOOKBACK]), lo)
    n = 0
    ss = 0.0
    for i in range(i0 + 1, t):
        if close[i - 1] > 0.0 and close[i] > 0.0:
            r = math.log(close[i] / close[i - 1])
            ss += r * r
            n += 1
    if n == 0 or ss <= 0.0:
        return 1.0
    return float(min(1.0, ep[EP_VOL_TARGET] / math.sqrt(ss / n)))


@kernel(inline="always")
def _observe(b: int, k: EnvArrays) -> None:
    """Write account ``b``'s observation for its next decision bar: window, state vector, action mask."""
    acct, env, ptr, pending, close, xp, ep = k.acct, k.env, k.ptr, k.pending, k.bars[3], k.xp, k.ep
    features = k.features
    window_out, state_out, mask_out = k.window, k.state, k.mask
    t = ptr[P_T, b]
    # the window is one contiguous block of the feature matrix: one flat block copy (none for a zero-width
    # window buffer: index observations, where the consumer gathers ``features[t - context : t]`` itself)
    c, f = window_out.shape[1], window_out.shape[2]
    n = c * f
    if n > 0:
        s0, d0 = (t - c) * f, b * n
        copy_block(window_out, d0, features, s0, n)
    ref = close[t - 1]
    cash0 = xp[XP_CASH]
    q = acct[QTY, b]
    eq = acct[EQUITY, b]
    committed = q
    for s in range(pending.shape[1]):
        committed += pending[b, s]
    inv_eq = 1.0 / eq if eq > EQUITY_FLOOR * cash0 else 0.0
    state_out[b, 0] = 1.0 if q > 0.0 else (-1.0 if q < 0.0 else 0.0)
    state_out[b, 1] = q * ref * inv_eq
    state_out[b, 2] = q * (ref - acct[AVG_ENTRY, b]) * inv_eq
    state_out[b, 3] = acct[CASH, b] * inv_eq
    state_out[b, 4] = math.log(max(eq, EQUITY_FLOOR * cash0) / cash0)
    state_out[b, 5] = (ptr[P_END, b] - t) / (ptr[P_END, b] - ptr[P_START, b])
    state_out[b, 6] = (committed - q) * ref * inv_eq
    state_out[b, 7] = abs(q) * acct[AVG_ENTRY, b] / cash0
    if ep[EP_VOL_TARGET] > 0.0:
        env[E_VOL_SCALE, b] = vol_scale(close, t, max(ptr[P_START, b] - c, 0), ep)
    n_actions = mask_out.shape[1]
    mask_out[b, 0] = True
    can_trade = (t + int(xp[XP_LATENCY]) < ptr[P_END, b] and eq > EQUITY_FLOOR * cash0
                 and is_decision_bar(ptr[P_K, b], ep))
    for a in range(1, n_actions):
        mask_out[b, a] = can_trade and order_for(a, committed, ref, acct, env, b, xp, ep) != 0.0


@kernel()
def observe(b: int, k: EnvArrays) -> None:
    """Public entry to the env's own observation for account ``b`` (the live trader observes with this code)."""
    _observe(b, k)


@kernel()
def reset_observe(idx: np.ndarray, sessions: np.ndarray, k: EnvArrays) -> None:
    """Start accounts ``idx`` on ``sessions`` and write their first observations."""
    for j in range(idx.shape[0]):
        _reset_one(idx[j], sessions[j], k)
        _observe(idx[j], k)


@kernel(inline="always")
def update_held(env: np.ndarray, b: int, q0: float, q1: float) -> None:
    """Count the bars the position has been open (``E_HELD``, for ``min_hold_bars``): after a bar that went
    from ``q0`` to ``q1``. Opened or flipped in this bar: 1; flat: 0; otherwise one more."""
    if q1 == 0.0:
        env[E_HELD, b] = 0.0
    elif q0 == 0.0 or (q0 > 0.0) != (q1 > 0.0):
        env[E_HELD, b] = 1.0
    else:
        env[E_HELD, b] += 1.0


@kernel(inline="always")  # inlined: no per-account call passing a dozen array structs
def _step_one(b: int, a: int, k: EnvArrays, autoreset: bool, log: EventLog | None = None,
              observe: bool = True) -> int:
    """Step account ``b`` one bar with action ``a`` (see the module docstring); 1 if its episode ended.
    ``log``: the bar's fills, liquidation, funding and forced close are recorded there (stamped with the bar's
    time, row and the account's session). ``observe=False``: the next observation is not written — for a caller
    that rebuilds it (``_observe``, a pure function of the account, env and pointer state) before it reads it
    (the backtest's quiet-bar loop, whose next bar is usually quiet and needs none)."""
    acct, env, ptr, pending, bars, time, xp, ep = k.acct, k.env, k.ptr, k.pending, k.bars, k.time, k.xp, k.ep
    out_f, out_b = k.out_f, k.out_b
    lat = int(xp[XP_LATENCY])
    nslot = lat + 1
    cash0 = xp[XP_CASH]
    floor = EQUITY_FLOOR * cash0
    mode = int(ep[EP_MODE])
    t, end, kk = ptr[P_T, b], ptr[P_END, b], ptr[P_K, b]
    cl = bars[3]
    ref = cl[t - 1]
    q0 = acct[QTY, b]
    committed = q0
    for s in range(nslot):
        committed += pending[b, s]
    if not is_decision_bar(kk, ep):
        a = HOLD  # between decisions the env holds, whatever the caller passes
    # 1. decision -> order sent now, due at bar t + latency
    dq = 0.0
    if t + lat < end and acct[EQUITY, b] > floor:
        if mode == MODE_LOWRIDER and committed > 0.0 and take_profit_due(acct, b, ref, xp, ep):
            dq = -committed
        elif 0 < a < int(ep[EP_N_ACTIONS]):
            dq = order_for(a, committed, ref, acct, env, b, xp, ep)
    pending[b, kk % nslot] = dq
    due = pending[b, (kk - lat) % nslot]
    pending[b, (kk - lat) % nslot] = 0.0
    # 2. the bar: funding, fill at the open, liquidation, mark; forced close after the last bar
    if log is not None:
        log.cursor[CUR_TIME], log.cursor[CUR_ROW], log.cursor[CUR_TAG] = time[t], t, ptr[P_SESSION, b]
    filled = process_bar(acct, b, due, time[t], bars[0, t], bars[1, t], bars[2, t], cl[t], bars[4, t], xp, log)
    traded = filled != 0.0
    notional = abs(filled) * bars[0, t]
    if filled > 0.0:
        env[E_N_BUYS, b] += 1.0
    last = t == end - 1
    force = ep[EP_FORCE_CLOSE] > 0.0
    if last and force and acct[QTY, b] != 0.0:
        closed = close_position(acct, b, cl[t], bars[4, t], xp, log)
        filled += closed
        notional += abs(closed) * cl[t]
        mark_to_market(acct, b, cl[t])
        traded = True
    update_held(env, b, q0, acct[QTY, b])
    # 3. reward and penalties
    eq, prev = acct[EQUITY, b], env[E_PREV_EQUITY, b]
    reward_kind = int(ep[EP_REWARD])
    if reward_kind == REWARD_LOG:
        r = math.log(max(eq, floor) / max(prev, floor))
    elif reward_kind == REWARD_PNL:
        r = (eq - prev) / cash0
    else:  # differential Sharpe ratio (Moody & Saffell 2001)
        ret = eq / prev - 1.0 if prev > floor else 0.0
        ma, mb = env[E_DSR_A, b], env[E_DSR_B, b]
        da, db = ret - ma, ret * ret - mb
        var = mb - ma * ma
        r = (mb * da - 0.5 * ma * db) / var ** 1.5 if var > 1e-12 else 0.0
        env[E_DSR_A, b] = ma + ep[EP_DSR_ETA] * da
        env[E_DSR_B, b] = mb + ep[EP_DSR_ETA] * db
    q1 = acct[QTY, b]
    pen = 0.0
    if q1 != 0.0:
        pen += ep[EP_HOLD_PEN]
    if traded:
        pen += ep[EP_TRADE_PEN]
        if q0 != 0.0 and q1 != 0.0 and (q0 > 0.0) != (q1 > 0.0):
            pen += ep[EP_FLIP_PEN]
    peak = max(env[E_PEAK, b], eq)
    env[E_PEAK, b] = peak
    if peak > 0.0:
        pen += ep[EP_DD_PEN] * (1.0 - eq / peak)
    if ep[EP_TURNOVER_PEN] > 0.0 and notional > 0.0:
        pen += ep[EP_TURNOVER_PEN] * notional / max(prev, floor)
    env[E_PREV_EQUITY, b] = eq
    out_f[O_REWARD, b] = r - pen
    out_f[O_PENALTY, b] = pen
    out_f[O_FINAL_EQUITY, b] = eq
    out_f[O_FILLED, b] = filled
    # 4. episode end (a spot/Lowrider cycle is over once its sell filled and nothing is in flight)
    in_flight = False
    for s in range(nslot):
        in_flight = in_flight or pending[b, s] != 0.0
    cycle_done = mode != MODE_FUTURES and env[E_N_BUYS, b] > 0.0 and q1 == 0.0 and not in_flight
    terminated = cycle_done or eq <= floor or (last and force)
    truncated = last and not terminated
    out_b[O_TERMINATED, b] = terminated
    out_b[O_TRUNCATED, b] = truncated
    ptr[P_T, b] = t + 1
    ptr[P_K, b] = kk + 1
    ended = 0
    if terminated or truncated:
        ended = 1
        ptr[P_EPISODES, b] += 1
        if autoreset:
            _reset_one(b, k.next_session[b], k)
    if observe:
        _observe(b, k)
    return ended


PREFETCH_AHEAD = 8
"""Accounts ahead of the step loop whose market data it prefetches (``rltrader.memcopy.prefetch``)."""


@kernel(inline="always")
def _prefetch_account(b: int, k: EnvArrays) -> None:
    """Request the cache lines account ``b``'s step reads first: its bar at ``t`` (time, open/high/low/close/
    volume) and, when its episode ends at this bar, its next session's first bar and the close before it (read
    by the auto-reset's observation). The session-table row that needs was requested earlier
    (``_prefetch_session``). A hint only: nothing is read into the step from here."""
    t, bars = k.ptr[P_T, b], k.bars
    prefetch(k.time, t)
    for f in range(bars.shape[0]):
        prefetch(bars[f], t)
    if t + 1 >= k.ptr[P_END, b]:
        s0 = k.sess[0, k.next_session[b]]
        prefetch(k.time, s0)
        for f in range(bars.shape[0]):
            prefetch(bars[f], s0)
        prefetch(bars[3], s0 - 1)


@kernel(inline="always")
def _prefetch_session(b: int, k: EnvArrays) -> None:
    """Request account ``b``'s next session's row of the session table (start and end)."""
    s = k.next_session[b]
    prefetch(k.sess[0], s)
    prefetch(k.sess[1], s)


@kernel()
def step_observe(actions: np.ndarray, k: EnvArrays, autoreset: bool) -> int:
    """Step every account one decision — ``env.decision_every`` bars, or fewer when its episode ends first: the
    action on the first, hold on the rest — auto-reset finished ones onto ``next_session[b]`` (if
    ``autoreset``), and write the next observations. The step's reward, penalty and fill are the sums over its
    bars. Returns how many episodes ended."""
    ended = 0
    out_f = k.out_f
    n = actions.shape[0]
    for b in range(n):
        if b + PREFETCH_AHEAD < n:
            _prefetch_account(b + PREFETCH_AHEAD, k)
        if b + 2 * PREFETCH_AHEAD < n:
            _prefetch_session(b + 2 * PREFETCH_AHEAD, k)
        a = actions[b]
        r, pen, filled = 0.0, 0.0, 0.0
        while True:
            e = _step_one(b, a, k, autoreset)
            r += out_f[O_REWARD, b]
            pen += out_f[O_PENALTY, b]
            filled += out_f[O_FILLED, b]
            if e or is_decision_bar(k.ptr[P_K, b], k.ep):
                break
            a = HOLD
        out_f[O_REWARD, b], out_f[O_PENALTY, b], out_f[O_FILLED, b] = r, pen, filled
        ended += e
    return ended


@kernel(inline="always")
def borrowed(k: EnvArrays) -> EnvArrays:
    """``k`` with every array borrowed (``rltrader.borrow``): for kernels compiled WITH numba's runtime (the
    backtest's loops) that inline the step — no atomic reference counting there. The kernels in this module are
    compiled without the runtime and need no borrowing (the note above ``P_T``)."""
    return EnvArrays(borrow(k.acct), borrow(k.env), borrow(k.ptr), borrow(k.pending), borrow(k.sess),
                     borrow(k.bars), borrow(k.time), borrow(k.features), borrow(k.xp), borrow(k.ep),
                     borrow(k.next_session), borrow(k.window), borrow(k.state), borrow(k.mask), borrow(k.out_f),
                     borrow(k.out_b))


# --- flat entry points: what Python calls ------------------------------------------------------------------------
# numba resolves a NamedTuple argument's type through its Python-level ``typeof`` on every call (measured ~3 µs
# for the 16 arrays of ``EnvArrays``, more than a B = 1 step), while plain array arguments take the dispatcher's
# C fast path. So Python passes the arrays one by one and the tuple is built inside compiled code.

@kernel()
def step_flat(actions: np.ndarray, autoreset: bool, acct: np.ndarray, env: np.ndarray, ptr: np.ndarray,
              pending: np.ndarray, sess: np.ndarray, bars: np.ndarray, time: np.ndarray, features: np.ndarray,
              xp: np.ndarray, ep: np.ndarray, next_session: np.ndarray, window: np.ndarray, state: np.ndarray,
              mask: np.ndarray, out_f: np.ndarray, out_b: np.ndarray) -> int:
    """``step_observe`` over ``EnvArrays(*arrays)`` (the arrays in ``EnvArrays``' field order)."""
    k = EnvArrays(acct, env, ptr, pending, sess, bars, time, features, xp, ep, next_session, window, state, mask,
                  out_f, out_b)
    n: int = step_observe(actions, k, autoreset)
    return n


@kernel()
def reset_flat(idx: np.ndarray, sessions: np.ndarray, acct: np.ndarray, env: np.ndarray, ptr: np.ndarray,
               pending: np.ndarray, sess: np.ndarray, bars: np.ndarray, time: np.ndarray, features: np.ndarray,
               xp: np.ndarray, ep: np.ndarray, next_session: np.ndarray, window: np.ndarray, state: np.ndarray,
               mask: np.ndarray, out_f: np.ndarray, out_b: np.ndarray) -> None:
    """``reset_observe`` over ``EnvArrays(*arrays)``."""
    k = EnvArrays(acct, env, ptr, pending, sess, bars, time, features, xp, ep, next_session, window, state, mask,
                  out_f, out_b)
    reset_observe(idx, sessions, k)


@kernel()
def gather_windows(features: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = features[rows[i] - context : rows[i]]`` (``context = out.shape[1]``): index observations'
    windows on the CPU, one contiguous block copy (``memcpy``) each, as the kernel's own window copy. No bounds
    check here: the caller checks ``context ≤ rows ≤ len(features)`` (``check_rows``)."""
    c, f = out.shape[1], out.shape[2]
    n = c * f
    for i in range(rows.shape[0]):
        copy_block(out, i * n, features, (rows[i] - c) * f, n)


def check_rows(rows: np.ndarray, context: int, n_rows: int) -> np.ndarray:
    """``rows`` as contiguous int64, refused unless every window ``[r - context, r)`` lies inside the feature
    matrix (``gather_windows`` copies without bounds checks)."""
    r = np.ascontiguousarray(rows, dtype=np.int64)
    if r.size and (int(r.min()) < context or int(r.max()) > n_rows):
        raise ValueError(f"decision rows must lie in [{context}, {n_rows}] (context {context}, {n_rows} feature "
                         f"rows); got [{int(r.min())}, {int(r.max())}]")
    return r


def leak_column(data: SessionSet, latency: int, scale: float, horizon: int = 1) -> np.ndarray:
    """The planted-leak feature: row ``r`` holds the log return from the open of bar ``r + 1 + latency`` to the
    close of bar ``r + latency + horizon``.

    The decision for bar ``t`` sees rows up to ``t - 1``, so its newest row reveals the return of exactly the
    bars its order fills in and holds through (``horizon``: ``EnvParams.leak_horizon``, the bars one decision
    commits to). Rows whose bars lie beyond the data hold 0.
    """
    n = len(data.close)
    col = np.zeros(n, np.float32)
    shift = 1 + latency
    h = max(int(horizon), 1)
    if n > shift + h - 1:
        m = n - shift - h + 1
        col[:m] = scale * np.log(data.close[shift + h - 1:shift + h - 1 + m] / data.open[shift:shift + m])
    return col


def bars_block(data: SessionSet) -> np.ndarray:
    """The (5, N) float64 open/high/low/close/volume array the kernels read: the ``SessionSet``'s own block when
    its five price columns are the rows of one C-contiguous float64 array in that order (``continuous_split``
    builds them so; a stacked copy is 75 MB of memory traffic at 1.9 M bars, ~10 ms of a backtest), else a
    stacked copy. The kernels only read it."""
    cols = (data.open, data.high, data.low, data.close, data.volume)
    base = data.open.base
    if (isinstance(base, np.ndarray) and base.ndim == 2 and base.shape == (5, len(data.open))
            and base.dtype == np.float64 and base.flags.c_contiguous
            and all(c.dtype == np.float64 and c.shape == base[i].shape and c.strides == base[i].strides
                    and c.ctypes.data == base[i].ctypes.data for i, c in enumerate(cols))):
        return base
    return np.ascontiguousarray(np.stack(cols), dtype=np.float64)


class EnvCore:
    """Arrays and kernels for B accounts over one ``SessionSet``; both envs are thin APIs over this."""

    def __init__(self, data: SessionSet, execution: ExecutionParams, params: EnvParams, n: int,
                 windows: bool = True) -> None:
        if data.n_sessions == 0:
            raise ConfigError("env: the session set has no sessions")
        if params.mode == "futures_session" and execution.market != "futures":
            raise ConfigError("env.mode: futures_session shorts, it needs execution.market: futures")
        self.data, self.execution, self.params, self.n = data, execution, params, n
        feats = np.ascontiguousarray(data.features, dtype=np.float32)
        if params.leak:
            feats = np.concatenate([feats, leak_column(data, execution.latency_bars, params.leak_scale,
                                                       params.leak_horizon)[:, None]],
                                   axis=1)
        self.features = feats
        self.feature_names = (*data.feature_names, *(("leak_next_return",) if params.leak else ()))
        self.bars = bars_block(data)
        self.time = np.ascontiguousarray(data.time, dtype=np.int64)
        self.sess = np.ascontiguousarray(np.stack([data.start, data.end]), dtype=np.int64)
        self.xp = execution.to_array()
        self.ep = params.to_array(execution.initial_cash)
        self.accounts = Accounts(n, execution.initial_cash)
        self.acct = self.accounts.state
        self.env = np.zeros((N_ENV_FIELDS, n))
        self.ptr = np.zeros((N_PTR, n), np.int64)
        self.pending = np.zeros((n, execution.latency_bars + 1))
        self.n_actions = params.n_actions
        self.context = data.context
        self.observation_shape = (data.context, feats.shape[1])
        # windows=False: index observations — a zero-size window buffer, so the kernel copies nothing and the
        # consumer gathers ``features[t - context : t]`` by decision row (``P_T``) where it computes
        self.window = np.zeros((n, data.context, feats.shape[1]) if windows else (n, 0, feats.shape[1]), np.float32)
        self.state = np.zeros((n, N_STATE), np.float32)
        self.mask = np.zeros((n, self.n_actions), np.bool_)
        self.out_f = np.zeros((N_OUT_F, n))
        self.out_b = np.zeros((2, n), np.bool_)
        self.next_session = np.zeros(n, np.int64)
        self.arrays = EnvArrays(self.acct, self.env, self.ptr, self.pending, self.sess, self.bars, self.time,
                                self.features, self.xp, self.ep, self.next_session, self.window, self.state,
                                self.mask, self.out_f, self.out_b)

    def reset(self, idx: np.ndarray, sessions: np.ndarray, checked: bool = False) -> None:
        sessions = np.asarray(sessions, np.int64)
        if not checked and sessions.size and (sessions.min() < 0 or sessions.max() >= self.data.n_sessions):
            raise ValueError(f"session index out of range [0, {self.data.n_sessions})")
        reset_flat(np.asarray(idx, np.int64), sessions, *self.arrays)

    def step(self, actions: np.ndarray, autoreset: bool) -> int:
        return int(step_flat(actions, autoreset, *self.arrays))

    @property
    def rows(self) -> np.ndarray:
        """Each account's next decision row ``t`` (a view, overwritten by the next step): its observation window
        is ``features[t - context : t]``."""
        return np.asarray(self.ptr[P_T])

    @property
    def last_close(self) -> np.ndarray:
        """Close of the bar before each account's next decision (the price its orders are sized on)."""
        return np.asarray(self.bars[3, self.ptr[P_T] - 1])

    @property
    def n_buys(self) -> np.ndarray:
        return np.asarray(self.env[E_N_BUYS])
