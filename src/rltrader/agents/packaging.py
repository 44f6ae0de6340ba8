"""One deployable form for every trained network: a module taking the flat observation the envs describe
(``context × F`` window values, then the ``S`` state values) and returning one score per action.

That is what is logged with ``mlflow.pytorch`` (with an input example and a signature), registered, loaded by
the backtest and the trader: none of them needs to know which algorithm produced it. Scores are Q-values
(D3QN), logits (PPO) or class logits mapped to actions (CNN classifier); the policy is always the argmax over
valid actions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class PolicyModule(nn.Module):
    def __init__(self, net: nn.Module, kind: str, context: int, n_features: int, n_state: int, n_actions: int,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.context, self.n_features, self.n_state, self.n_actions = context, n_features, n_state, n_actions
        self.meta = dict(meta or {})

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, context·F + S) → (B, A) action scores."""
        w = obs[:, : self.context * self.n_features].reshape(-1, self.context, self.n_features)
        s = obs[:, self.context * self.n_features:]
        out = self.net(w, s)
        scores: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return scores

    def scores(self, window: np.ndarray, state: np.ndarray) -> np.ndarray:
        device = next(self.parameters()).device
        with torch.no_grad():
            w = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)).to(device)
            s = torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)).to(device)
            out = self.net(w, s)
            scores = out[0] if isinstance(out, tuple) else out
        return np.asarray(scores.float().cpu().numpy())

    def policy(self) -> Any:
        """A greedy ``evaluate``-compatible policy (masked argmax)."""
        module = self

        def act(window: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
            sc = module.scores(window, state)
            sc = np.where(mask, sc, -np.inf)
            return np.asarray(sc.argmax(axis=1), dtype=np.int64)

        return act

    def example_input(self, n: int = 2) -> np.ndarray:
        return np.zeros((n, self.context * self.n_features + self.n_state), dtype=np.float32)
