"""``BatchSessionEnv``: B accounts stepping B sessions at once — the training workhorse.

Same kernels as ``SessionEnv`` (``core.step_observe``), so fills, rewards, masks and observations are identical;
the differences are the array API and auto-reset: an account whose episode ended is put on its next session in
the same step (SB3 ``VecEnv`` convention), the step's ``reward``/``terminated``/``final_equity`` belonging to
the episode that ended and ``window``/``state``/``mask`` to the new one's first decision.

Observations come from one preloaded float32 feature array; the kernel copies each account's window straight
into a preallocated ``(B, context, F)`` buffer. The arrays returned by ``reset``/``step`` ARE those buffers: the
next step overwrites them, so copy what you keep (``torch.from_numpy`` shares them without a copy).

Index observations (``windows=False``): the kernel copies no window (the ``window`` buffer is ``(B, 0, F)``);
each account's observation is its decision row ``rows[b]`` (window ``features[rows[b] - context : rows[b]]``)
plus the state vector and mask, and the consumer gathers the windows where it computes — ``gather(rows)`` on the
CPU, or one index into the feature matrix uploaded once as a tensor (``agents.common.ObsGather``). At B = 1024
the full windows are ~3 MB per step, most of a step's memory traffic, which the agents then gather again anyway.

One thread: a numba ``prange`` variant of the kernel was measured ~10× slower on the 2-core dev box (shared
with other jobs, each step waits for the slowest thread), so it was left out.

Sessions: drawn uniformly with ``np.random.Generator`` seeded by ``reset(seed)``, or, with
``session_schedule`` ``(B, M)``, account ``b`` plays ``schedule[b, 0], schedule[b, 1], …`` (cycling) —
how a parity test or an evaluation sweep forces the session order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rltrader.dataset.split import SessionSet
from rltrader.env.core import (
    O_FILLED,
    O_FINAL_EQUITY,
    O_PENALTY,
    O_REWARD,
    O_TERMINATED,
    O_TRUNCATED,
    P_EPISODES,
    EnvCore,
    check_rows,
    gather_windows,
)
from rltrader.env.modes import EnvParams, lowrider_rule
from rltrader.execution import ExecutionParams


@dataclass(frozen=True)
class BatchStep:
    """One batch step's results; every field is a view of the env's buffers (valid until the next step)."""

    window: np.ndarray
    """(B, context, F) float32: features of the bars before each account's next decision."""
    state: np.ndarray
    """(B, S) float32 position state (``core.STATE_NAMES``)."""
    mask: np.ndarray
    """(B, A) bool: valid actions for the next decision."""
    reward: np.ndarray
    """(B,) float64, penalties already subtracted."""
    penalty: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_equity: np.ndarray
    """(B,) equity after this step's bar: for accounts whose episode ended, that episode's final equity."""
    filled: np.ndarray
    """(B,) signed quantity filled in this step's bar (order and forced close)."""
    rows: np.ndarray
    """(B,) int64 next decision row of each account: ``window[b]`` is ``features[rows[b] - context : rows[b]]``."""


class BatchSessionEnv:
    """B accounts over a ``SessionSet``: ``reset(seed)`` → (window, state, mask); ``step(actions)`` → ``BatchStep``."""

    def __init__(self, data: SessionSet, execution: ExecutionParams | None = None, params: EnvParams | None = None,
                 num_envs: int = 1024, session_schedule: np.ndarray | None = None, windows: bool = True) -> None:
        if num_envs < 1:
            raise ValueError("num_envs must be ≥ 1")
        self.core = EnvCore(data, execution or ExecutionParams(), params or EnvParams(), num_envs, windows=windows)
        self.params, self.execution, self.num_envs = self.core.params, self.core.execution, num_envs
        self.n_actions = self.core.n_actions
        self.windows = windows
        self.observation_shape = self.core.observation_shape
        self.features = self.core.features
        """(N, F) float32 feature matrix the decision rows index (``features[t - context : t]``)."""
        self.feature_names = self.core.feature_names
        if session_schedule is not None:
            session_schedule = np.asarray(session_schedule, np.int64)
            if session_schedule.ndim != 2 or session_schedule.shape[0] != num_envs or session_schedule.shape[1] < 1:
                raise ValueError(f"session_schedule must have shape ({num_envs}, M ≥ 1)")
        self._schedule = session_schedule
        self._rng = np.random.default_rng()
        self._all = np.arange(num_envs)

    def _draw(self, accounts: np.ndarray, episode: np.ndarray) -> np.ndarray:
        if self._schedule is not None:
            return np.asarray(self._schedule[accounts, episode % self._schedule.shape[1]])
        return self._rng.integers(self.core.data.n_sessions, size=len(accounts))

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if seed is not None or self._schedule is None:
            self._rng = np.random.default_rng(seed)
        core = self.core
        zeros = np.zeros(self.num_envs, np.int64)
        core.reset(self._all, self._draw(self._all, zeros))
        core.ptr[P_EPISODES] = 0
        core.next_session[:] = self._draw(self._all, zeros + 1)
        return core.window, core.state, core.mask

    def step(self, actions: np.ndarray) -> BatchStep:
        core = self.core
        ended = core.step(np.asarray(actions, np.int64), autoreset=True)
        if ended:
            done = np.flatnonzero(core.out_b[O_TERMINATED] | core.out_b[O_TRUNCATED])
            core.next_session[done] = self._draw(done, core.ptr[P_EPISODES, done] + 1)
        f, b = core.out_f, core.out_b
        return BatchStep(core.window, core.state, core.mask, f[O_REWARD], f[O_PENALTY], b[O_TERMINATED],
                         b[O_TRUNCATED], f[O_FINAL_EQUITY], f[O_FILLED], core.rows)

    @property
    def rows(self) -> np.ndarray:
        """(B,) each account's next decision row (a view of the env's pointers, valid until the next step)."""
        return self.core.rows

    def gather(self, rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The ``(len(rows), context, F)`` windows of decision rows ``rows`` (default: the current ones) on the
        CPU — what ``windows=True`` would have handed out; ``out``: a buffer to reuse."""
        r = check_rows(self.core.rows if rows is None else rows, self.core.context, len(self.features))
        if out is None:
            out = np.empty((len(r), *self.observation_shape), np.float32)
        elif out.shape != (len(r), *self.observation_shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(len(r), *self.observation_shape)}")
        gather_windows(self.core.features, r, out)
        return out

    def action_masks(self) -> np.ndarray:
        return self.core.mask

    def rule_actions(self) -> np.ndarray:
        """The rule-based Lowrider's actions for every account (lowrider mode)."""
        c = self.core
        return lowrider_rule(c.last_close, c.accounts.qty, c.accounts.avg_entry, c.n_buys, c.mask, self.params)
