"""``SessionEnv``: a ``gymnasium.Env`` over the sessions of a ``SessionSet`` (one account, one session per episode).

The observation is one flat float32 vector — the context window (``context × features``, row-major, oldest bar
first) followed by the position state (``core.STATE_NAMES``) — so SB3's ``MlpPolicy`` takes it as is. The action
mask is in ``info["action_mask"]`` and ``action_masks()`` (the sb3-contrib ``MaskablePPO`` convention).
``structured_obs()`` returns the batch env's form (window, state, mask with a leading axis of 1) for parity checks.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from rltrader.dataset.split import SessionSet
from rltrader.env.core import N_STATE, O_PENALTY, O_REWARD, P_SESSION, P_T, EnvCore
from rltrader.env.modes import EnvParams, lowrider_rule
from rltrader.execution import ExecutionParams


class SessionEnv(gym.Env[np.ndarray, np.int64]):
    """One account trading one session per episode; ``reset(options={"session": i})`` picks the session."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's own class attribute)

    def __init__(self, data: SessionSet, execution: ExecutionParams | None = None,
                 params: EnvParams | None = None) -> None:
        self.core = EnvCore(data, execution or ExecutionParams(), params or EnvParams(), 1)
        self.params, self.execution = self.core.params, self.core.execution
        c, f = self.core.window.shape[1:]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (c * f + N_STATE,), np.float32)
        self.action_space = gym.spaces.Discrete(self.core.n_actions)
        self._actions = np.zeros(1, np.int64)
        self._zero, self._session = np.zeros(1, np.int64), np.zeros(1, np.int64)
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        n = self.core.data.n_sessions
        session = (options or {}).get("session")
        if session is None:
            session = int(self.np_random.integers(n))
        elif not 0 <= session < n:
            raise ValueError(f"options['session'] = {session}: out of range [0, {n})")
        self._session[0] = session
        self.core.reset(self._zero, self._session, checked=True)
        self._done = False
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self._actions[0] = int(action)
        self.core.step(self._actions, autoreset=False)
        out_f, out_b = self.core.out_f, self.core.out_b
        terminated, truncated = bool(out_b[0, 0]), bool(out_b[1, 0])
        self._done = terminated or truncated
        info = self._info()
        info["penalty"] = float(out_f[O_PENALTY, 0])
        return self._obs(), float(out_f[O_REWARD, 0]), terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return np.array(self.core.mask[0])

    def structured_obs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(window (1, context, F), state (1, S), mask (1, A)): the batch env's observation form."""
        return self.core.window.copy(), self.core.state.copy(), self.core.mask.copy()

    def rule_action(self) -> int:
        """The rule-based Lowrider's action for the current state (lowrider mode)."""
        c = self.core
        return int(lowrider_rule(c.last_close, c.accounts.qty, c.accounts.avg_entry, c.n_buys, c.mask,
                                 self.params)[0])

    def _obs(self) -> np.ndarray:
        return np.concatenate((self.core.window.reshape(-1), self.core.state[0]))

    def _info(self) -> dict[str, Any]:
        c = self.core
        return {"action_mask": c.mask[0].copy(), "equity": float(c.accounts.equity[0]),
                "position": float(c.accounts.qty[0]), "fees_paid": float(c.accounts.fees_paid[0]),
                "session": int(c.ptr[P_SESSION, 0]), "bar": int(c.ptr[P_T, 0])}
