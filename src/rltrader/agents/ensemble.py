"""Multi-seed ensembles as one policy: the average of N trained models' action scores.

Why: at these signal-to-noise ratios one training run's greedy policy is largely its seed's noise; averaging
members trained with different seeds keeps what they agree on. The ensemble is a ``PolicyModule`` like any
trained model (``run_ensemble`` in ``rltrader.train`` publishes it: MLflow run, logged model, ``.pt`` with its
integrity sidecar, val table), so the backtest, the registry and the trader take it by name, unchanged.

- ``q_values`` members (D3QN): the mean of their Q-values.
- ``logits`` members (PPO): ``log`` of the mean of their action probabilities (``softmax`` over all actions,
  the module has no mask); the masked argmax / softmax downstream read it as logits. One member gives back its
  own logits shifted by a constant per row (``l - logsumexp(l)``): the same actions, the same probabilities.
- ``classifier`` members: the mean of their ±1/0 scores (a majority vote; ties hold).

Members must agree on kind, context, features, state and actions: averaging scores of different inputs or
actions would be meaningless, so a mismatch is one ``ConfigError`` naming the member. The ensemble runs on the
generic (bar-by-bar) backtest path; its members' weights are its buffers and parameters, so the weights hash
covers every member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rltrader.agents.packaging import PolicyModule
from rltrader.errors import ConfigError

_SHAPE_KEYS = ("kind", "context", "n_features", "n_state", "n_actions")


class EnsembleNet(nn.Module):
    """``(windows, state) → scores``: the members' nets combined by ``kind`` (module docstring)."""

    def __init__(self, nets: Sequence[nn.Module], kind: str) -> None:
        super().__init__()
        if not nets:
            raise ConfigError("ensembles: an ensemble needs at least one member")
        self.members = nn.ModuleList(nets)
        self.kind = kind

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        outs = []
        for net in self.members:
            out = net(windows, state)
            outs.append(out[0] if isinstance(out, tuple) else out)
        scores = torch.stack(outs)  # (N, B, A)
        if self.kind == "logits":
            probs = torch.softmax(scores.float(), dim=2).mean(dim=0)
            out_: torch.Tensor = torch.log(probs.clamp_min(1e-30))
            return out_
        mean: torch.Tensor = scores.float().mean(dim=0)
        return mean


def ensemble_module(members: Sequence[PolicyModule], name: str) -> PolicyModule:
    """One ``PolicyModule`` averaging ``members`` (checked alike); ``meta`` names the members' MLflow runs."""
    if not members:
        raise ConfigError(f"ensembles.{name}: no members")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        for key in _SHAPE_KEYS:
            if getattr(m, key) != getattr(first, key):
                raise ConfigError(f"ensembles.{name}: member {i} has {key} {getattr(m, key)!r}, member 0 has "
                                  f"{getattr(first, key)!r}: members must share inputs, actions and score kind")
        for key in ("feature_names", "mode", "action_names"):
            if m.meta.get(key) != first.meta.get(key):
                raise ConfigError(f"ensembles.{name}: member {i}'s {key} differ from member 0's")
    meta: dict[str, Any] = {k: first.meta[k] for k in ("feature_names", "mode", "action_names") if k in first.meta}
    meta.update(algo=name, members=[{"algo": m.meta.get("algo"), "mlflow_run_id": m.meta.get("mlflow_run_id"),
                                     "weights_sha256": m.meta.get("weights_sha256")} for m in members])
    net = EnsembleNet([m.net for m in members], first.kind)
    return PolicyModule(net, first.kind, first.context, first.n_features, first.n_state, first.n_actions, meta)
