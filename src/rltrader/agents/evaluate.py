"""Run any policy over every session of a split, once, with the batch env: the one evaluation every agent and
baseline goes through (same env, same execution model, same sessions), so their numbers are comparable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.modes import EnvParams
from rltrader.execution import ExecutionParams

Policy = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(windows (B, context, F), state (B, S), mask (B, A)) → actions (B,). Must only pick unmasked actions."""


@dataclass
class EvalResult:
    session_return: np.ndarray
    """(S,) final equity / initial cash - 1 per session, net of all costs."""
    reward_sum: np.ndarray
    """(S,) sum of the env's rewards per session (equals log(1 + return) for the log reward)."""
    trades: np.ndarray
    """(S,) fills per session (forced closes included)."""
    action_counts: np.ndarray
    """(A,) how often each action was chosen."""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mean_return(self) -> float:
        return float(self.session_return.mean())

    def summary(self) -> dict[str, float]:
        r = self.session_return
        return {"mean_return": float(r.mean()), "median_return": float(np.median(r)),
                "win_rate": float((r > 0).mean()), "sessions": float(len(r)),
                "trades_per_session": float(self.trades.mean()),
                "session_sharpe": float(r.mean() / r.std()) if r.std() > 0 else 0.0, **self.extra}


def evaluate(policy: Policy, data: SessionSet, execution: ExecutionParams, env_params: EnvParams, *,
             max_sessions: int | None = None, num_envs: int = 256, env: BatchSessionEnv | None = None) -> EvalResult:
    """Every session (or ``max_sessions`` of them, evenly spread over the split) exactly once; deterministic
    for a deterministic policy. Account ``b`` plays the picked sessions ``b, b + B, b + 2B, …``."""
    if max_sessions is None or max_sessions >= data.n_sessions:
        ids = np.arange(data.n_sessions)
    else:
        ids = np.unique(np.linspace(0, data.n_sessions - 1, max(max_sessions, 1)).round().astype(np.int64))
    n = len(ids)
    B = min(num_envs, n)
    per = -(-n // B)
    schedule = ids[(np.arange(B)[:, None] + B * np.arange(per + 1)[None, :]) % n]
    if env is None:
        env = BatchSessionEnv(data, execution, env_params, num_envs=B, session_schedule=schedule)
    bind = getattr(policy, "bind", None)
    if bind is not None:  # rule baselines that read prices or the accounts
        bind(env)
    window, state, mask = env.reset(seed=0)
    episode = np.zeros(B, dtype=np.int64)
    ret = np.zeros(n)
    rsum = np.zeros(n)
    trades = np.zeros(n)
    counts = np.zeros(env.n_actions, dtype=np.int64)
    running_r = np.zeros(B)
    running_t = np.zeros(B)
    done_sessions = np.zeros(n, dtype=bool)
    initial = execution.initial_cash
    while not done_sessions.all():
        actions = np.asarray(policy(window, state, mask), dtype=np.int64)
        active = (episode < per) & (np.arange(B) + B * episode < n)
        counts += np.bincount(actions[active], minlength=env.n_actions)
        step = env.step(actions)
        running_r += step.reward
        running_t += step.filled != 0
        ended = np.flatnonzero(step.terminated | step.truncated)
        for b in ended:
            e = episode[b]
            sid = b + B * e
            if e < per and sid < n and not done_sessions[sid]:
                ret[sid] = step.final_equity[b] / initial - 1.0
                rsum[sid] = running_r[b]
                trades[sid] = running_t[b]
                done_sessions[sid] = True
            episode[b] += 1
            running_r[b] = 0.0
            running_t[b] = 0.0
    return EvalResult(ret, rsum, trades, counts)
