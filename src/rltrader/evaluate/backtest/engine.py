"""The backtest's run loop: decisions → filters → the env's continuous step, over every account and bar.

Three paths, the same step (``env.continuous.continuous_step``) and the same filters (``decisions``):

- precomputed decisions (``_run_rows``): rules whose decisions do not depend on fills (``rule_decisions``);
  bars that send no order and book nothing but the mark take the quiet-bar shortcut (``quiet``);
- split networks (``_run_split``): the window part of our networks precomputed in blocks of ``SPLIT_BLOCK``
  decision positions (one batched forward pass each), the state-dependent head, the masked argmax and the
  confidence in the numba loop;
- everything else (``fast=False``, other networks, random, Lowrider rule): bar by bar over all accounts, one
  batched decision per bar (``decide_batch`` for models).

Accounts are independent, so the numba loops run them one after the other. A loop stops early when the event
log might overflow (``MAX_EVENTS_PER_BAR`` free slots are kept); the caller grows the log and resumes.
"""

from __future__ import annotations

import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numba import njit

from rltrader.agents.packaging import head_scores, head_scratch
from rltrader.borrow import borrow
from rltrader.dataset.split import SessionSet
from rltrader.env.continuous import (
    C_DONE,
    STEP_FILLED,
    STEP_NEXT_STRETCH,
    Continuous,
    ContinuousRun,
    continuous_step,
)
from rltrader.env.core import P_SESSION, P_START, P_T, EnvArrays, EnvCore, _observe, borrowed
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError, DataError
from rltrader.evaluate.backtest.data import backtest_params, continuous_split
from rltrader.evaluate.backtest.decisions import (
    FS_LAST_FILL,
    POLICY_NAMES,
    BacktestFilters,
    EnvView,
    FilterArrays,
    decide_batch,
    filter_decision,
    is_confident,
    load_policy,
    masked_argmax,
    rule_decisions,
)
from rltrader.evaluate.backtest.frames import BacktestResult, assemble
from rltrader.evaluate.backtest.quiet import NOT_QUIET, quiet_run
from rltrader.execution import CUR_N, MAX_EVENTS_PER_BAR, EventLog, ExecutionParams

if TYPE_CHECKING:  # typing only: the settings module imports nothing from here
    from rltrader.config import Settings

SPLIT_BLOCK = 1024
"""Decision positions per precomputed block of the split-network path (one batched forward pass)."""


class SplitHead(NamedTuple):
    """A ``SplitPolicy``'s state-dependent head for the numba loop (``packaging.head_scores``'s arrays)."""

    code: int
    state_weight: np.ndarray
    hidden_weight_t: np.ndarray
    hidden_bias: np.ndarray
    out_weight: np.ndarray
    out_bias: np.ndarray
    head_params: np.ndarray


@njit(cache=True, inline="always")
def _advance(b: int, a: int, confident: bool, k: EnvArrays, run: Continuous, log: EventLog,
             f: FilterArrays, observe: bool = True) -> None:
    """One decision + bar for account ``b``: the filters, then the env's continuous step (``observe``: write the
    next observation, ``continuous_step``'s)."""
    t = k.ptr[P_T, b]
    a, reason = filter_decision(b, a, confident, k, f)
    flags = continuous_step(b, a, reason, k, run, log, observe)
    if flags & STEP_FILLED:
        f.state[FS_LAST_FILL, b] = t
    if flags & STEP_NEXT_STRETCH:  # a new stretch: no cooldown carried over the gap
        f.state[FS_LAST_FILL, b] = -1e18


@njit(cache=True, inline="always")
def _borrowed(k: EnvArrays, run: Continuous, log: EventLog, f: FilterArrays) -> tuple[EnvArrays, Continuous,
                                                                                     EventLog, FilterArrays]:
    """The loops' arrays borrowed (``rltrader.borrow``: no atomic reference counting per account and bar); the
    caller holds the real ones for the call."""
    run_b = Continuous(borrow(run.chain_next), borrow(run.base), borrow(run.eq0), borrow(run.carry),
                       borrow(run.curve_eq), borrow(run.curve_qty), borrow(run.curve_fees), run.repeat)
    return borrowed(k), run_b, EventLog(borrow(log.data), borrow(log.cursor)), FilterArrays(borrow(f.params),
                                                                                             borrow(f.state))


@njit(cache=True, inline="always")
def _log_full(log: EventLog, n_accounts: int) -> bool:
    return bool(log.cursor[CUR_N] + MAX_EVENTS_PER_BAR * n_accounts > log.data.shape[1])


@njit(cache=True)
def _run_rows(decisions: np.ndarray, order: np.ndarray, j0: int, quiet: bool, k: EnvArrays, run: Continuous,
              log: EventLog, f: FilterArrays) -> int:
    """Precomputed decisions (``decisions[row]`` = action for the decision at bar ``row``): every account of
    ``order[j0:]`` run to its end, one after the other. ``quiet``: bars on which only the mark can happen take
    the quiet-bar shortcut (``quiet.quiet_run``), the others the env's full step after a fresh observation.
    Returns the index it stopped at — ``len(order)`` when done, earlier when the event log is nearly full."""
    k, run, log, f = _borrowed(k, run, log, f)
    for j in range(j0, order.shape[0]):
        b = order[j]
        stale = quiet  # (re)entering: the observation may predate quiet bars of an earlier call
        while run.carry[C_DONE, b] == 0.0:
            if quiet and quiet_run(b, decisions, k, run, f.params) != NOT_QUIET:
                stale = True
                continue
            a = int(decisions[k.ptr[P_T, b]])
            if _log_full(log, 1):
                return j
            if stale:  # the full step's filters read the mask: rebuild the observation the quiet bars skipped
                _observe(b, k)
            # with quiet bars the step writes no observation: the next bar is usually quiet and reads none, and
            # a full step rebuilds it first (``stale``) — one observation per full step instead of two
            _advance(b, a, True, k, run, log, f, not quiet)
            stale = quiet
    n: int = order.shape[0]
    return n


@njit(cache=True)
def _step_batch(idx: np.ndarray, actions: np.ndarray, confident: np.ndarray, k: EnvArrays, run: Continuous,
                log: EventLog, f: FilterArrays) -> None:
    """One bar for the accounts ``idx`` with their actions (the caller keeps the log's room for them)."""
    k, run, log, f = _borrowed(k, run, log, f)
    for j in range(idx.shape[0]):
        _advance(idx[j], actions[j], confident[j], k, run, log, f)


@njit(cache=True)
def _run_split(pre: np.ndarray, q_lo: int, q_hi: int, qbase: np.ndarray, head: SplitHead, softmax: bool,
               threshold: float, order: np.ndarray, j0: int, k: EnvArrays, run: Continuous, log: EventLog,
               f: FilterArrays) -> int:
    """A split network's decisions for the positions ``[q_lo, q_hi)`` (``pre[q - q_lo]``: position ``q``'s
    precomputed row; ``q = qbase[stretch] + t - start``): every account of ``order[j0:]`` run until its next
    decision lies beyond the block (or it is done). Returns ``len(order)`` when the block is done, the index it
    stopped at when the event log is nearly full, -1 if an account's position went back."""
    k, run, log, f = _borrowed(k, run, log, f)
    n_actions = k.mask.shape[1]
    h1, h2, out = head_scratch(head.hidden_weight_t, head.out_weight)
    sc = np.zeros(n_actions, np.float32)
    probs = np.zeros(n_actions)
    ptr = k.ptr
    for j in range(j0, order.shape[0]):
        b = order[j]
        while run.carry[C_DONE, b] == 0.0:
            q = qbase[ptr[P_SESSION, b]] + ptr[P_T, b] - ptr[P_START, b]
            if q >= q_hi:
                break
            if q < q_lo:
                return -1
            if _log_full(log, 1):
                return j
            head_scores(pre[q - q_lo], k.state[b], head.code, head.state_weight, head.hidden_weight_t,
                        head.hidden_bias, head.out_weight, head.out_bias, head.head_params, h1, h2, out, sc)
            a = masked_argmax(sc, k.mask[b])
            confident = is_confident(sc, k.mask[b], a, softmax, threshold, probs)
            _advance(b, a, confident, k, run, log, f)
    n: int = order.shape[0]
    return n


def backtest_sessions(data: SessionSet, policy: Any, execution: ExecutionParams, env_params: EnvParams,
                      filters: BacktestFilters | None = None, *, chain: bool = False, bar_us: int | None = None,
                      seed: int = 0, fast: bool = True) -> BacktestResult:
    """Run ``policy`` over every session of ``data`` through the env's continuous mode, with ``filters`` (None =
    off: each session is exactly the env's episode, from ``initial_cash``).

    ``chain``: one account per symbol plays that symbol's sessions in time order, each starting with the
    previous one's final equity (the continuous backtest; sessions must not overlap in time). Otherwise one
    account per session, all at once; the per-symbol curve then banks each session's PnL (fixed-size trading).
    ``policy``: a ``PolicyModule`` (scores → masked argmax), a baseline name, or any ``agents.evaluate`` policy
    callable (``bind(env)`` honoured). ``bar_us``: bar width for the close times (inferred from the data when
    None). ``fast``: run our networks split (``PolicyModule.split``: window part precomputed in blocks, the rest
    in the numba loop) and precomputed rule decisions with the quiet-bar shortcut (``quiet``); False steps every
    ``PolicyModule`` with one batched forward pass per bar and every rule bar through the env's full step (the
    generic paths, which the fast ones are tested against)."""
    cpu = [_time.process_time()]  # phase boundaries (CPU seconds of the process): meta["cpu_seconds"]
    filters = filters or BacktestFilters(repeat_cycles=False)  # exactly the env's episodes
    if data.n_sessions == 0:
        raise DataError("backtest: the session set has no sessions (nothing to trade)")
    if chain and not env_params.force_close:
        raise ConfigError("env.force_close: a chained (continuous) backtest closes positions at data gaps; "
                          "it needs force_close: true")
    if isinstance(policy, str):
        policy = load_policy(policy, env_params.mode, seed)
    kind = getattr(policy, "kind", None)
    module = policy if kind is not None and hasattr(policy, "scores") else None
    n_accounts = len(np.unique(data.symbol_id[data.start])) if chain else data.n_sessions
    core = EnvCore(data, execution, env_params, n_accounts)
    if module is not None and (module.context != data.context or module.n_features != core.features.shape[1]
                               or module.n_actions != core.n_actions):
        raise ConfigError(f"backtest.policy: the model expects context {module.context}, {module.n_features} "
                          f"features, {module.n_actions} actions; the data/env give {data.context}, "
                          f"{core.features.shape[1]}, {core.n_actions}")
    flt = FilterArrays.create(filters, env_params.mode, n_accounts)
    view = EnvView(core)
    M = int((data.end - data.start).sum())
    cont = ContinuousRun(core, chain=chain, repeat=filters.repeat_cycles, events=max(1024, M // 8))
    B, accounts, k = core.n, cont.accounts, core.arrays
    t0 = _time.perf_counter()
    cpu.append(_time.process_time())

    decisions = None if module is not None else rule_decisions(policy, view, execution.latency_bars)
    cpu.append(_time.process_time())
    split = module.split() if module is not None and fast and hasattr(module, "split") else None
    # paths that need no observation windows: a zero-width feature matrix makes the kernel's window copy free
    k0 = k._replace(features=np.zeros((core.features.shape[0], 0), np.float32),
                    window=np.zeros((B, data.context, 0), np.float32))
    if split is not None:
        head = SplitHead(split.code, split.state_weight, split.hidden_weight_t, split.hidden_bias, split.out_weight,
                         split.out_bias, split.head_params)
        # positions numbered in the order each account plays its stretches: an account only moves forward
        lengths, seq = cont.lengths, cont.sequence
        qbase = np.zeros(data.n_sessions, np.int64)
        qbase[seq] = np.cumsum(lengths[seq]) - lengths[seq]
        q_rows = np.repeat(data.start[seq] - qbase[seq], lengths[seq]) + np.arange(M)
        for q_lo in range(0, M, SPLIT_BLOCK):
            q_hi = min(M, q_lo + SPLIT_BLOCK)
            pre = split.precompute(core.features, q_rows[q_lo:q_hi])
            j = 0
            while j < B:
                j = _run_split(pre, q_lo, q_hi, qbase, head, kind == "logits", float(filters.confidence), accounts,
                               j, k0, cont.run, cont.log, flt)
                if j < 0:
                    raise RuntimeError("backtest: an account's decision position went back (session order)")
                if j < B:
                    cont.reserve(1)
        path = f"split network: window part precomputed in blocks of {SPLIT_BLOCK}, the rest in one numba loop"
    elif decisions is not None:
        # quiet bars (no order, nothing to book: ``quiet``) skip the observation and reward; not with latency
        # (an order in flight) nor Lowrider (its take-profit is the env's order on any bar)
        quiet = fast and execution.latency_bars == 0 and env_params.mode != "lowrider"
        j = 0
        while j < B:
            j = _run_rows(decisions, accounts, j, quiet, k0, cont.run, cont.log, flt)
            if j < B:
                cont.reserve(1)
        path = "vectorised decisions, one numba loop" + (" (quiet bars: mark only)" if quiet else "")
    else:
        bind = getattr(policy, "bind", None)
        if module is None and bind is not None:
            bind(view)
        active = accounts.copy()
        ones = np.ones(B, bool)
        while active.size:
            cont.reserve(active.size)
            if module is not None:
                acts = np.zeros(active.size, np.int64)
                conf = np.zeros(active.size, np.bool_)
                sc = np.ascontiguousarray(module.scores(core.window[active], core.state[active]), np.float32)
                decide_batch(sc, core.mask[active], kind == "logits", float(filters.confidence), acts, conf)
            else:
                acts = np.asarray(policy(core.window, core.state, core.mask), np.int64)[active]
                conf = ones[:active.size]
            _step_batch(active, acts, conf, k, cont.run, cont.log, flt)
            active = active[~cont.done[active]]
        path = "stepped bar by bar, one batched decision per bar"
    run_s = _time.perf_counter() - t0
    cpu.append(_time.process_time())
    result = assemble(data, cont, flt.state, cont.log.events(), execution, bar_us)
    cpu.append(_time.process_time())
    phases = ("setup", "decisions", "loop", "frames")  # env arrays + event log; rule decisions; the run; frames
    name = getattr(policy, "name", None)
    if name is None:
        name = module.meta.get("algo", "model") if module is not None else type(policy).__name__
    result.meta.update(policy=name, policy_kind=kind or "rule", path=path, run_seconds=run_s, chain=chain,
                       cpu_seconds=dict(zip(phases, np.diff(cpu).tolist(), strict=True)),
                       filters=dict(filters.__dict__), env=env_params.as_dict(), execution=execution.as_dict())
    return result


def run_backtest(settings: Settings, policy: Any, *, split: str | None = None, sessions_dir: Path | None = None,
                 features_dir: Path | None = None, data: SessionSet | None = None) -> BacktestResult:
    """Backtest ``policy`` (a ``PolicyModule``, a baseline name, a ``.pt`` path or an MLflow model URI)
    continuously over ``split`` (default ``backtest.split``) with the settings' execution, env and filters.
    ``data``: that split's ``continuous_split``, when the caller runs several policies over it."""
    from rltrader.data.schema import interval_us

    bt = settings.backtest
    split = split or bt.split
    execution, env_params = backtest_params(settings)
    if data is None:
        data = continuous_split(settings, split, sessions_dir=sessions_dir, features_dir=features_dir)
    if settings.train.threads > 0 and not (isinstance(policy, str) and policy in POLICY_NAMES):
        import torch

        torch.set_num_threads(settings.train.threads)
    result = backtest_sessions(data, policy, execution, env_params, BacktestFilters.from_settings(bt), chain=True,
                               bar_us=interval_us(settings.ingest.interval), seed=bt.seed)
    result.meta.update(split=split, range=data.meta["range"], trade_size_quote=bt.trade_size_quote,
                       position_size=env_params.position_size)
    return result
