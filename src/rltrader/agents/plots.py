"""Training insights as PNG (as in the PPO reference design): learning curves and the agent's action scores
over sessions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rltrader.agents.packaging import PolicyModule
from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.modes import EnvParams
from rltrader.execution import ExecutionParams

_CURVES = ("val/mean_return", "episode_pnl", "episode/return_mean", "loss", "td_abs", "q_mean", "loss/policy",
           "loss/value", "loss/entropy", "ppo/approx_kl", "epsilon", "val_accuracy")
"""History keys plotted when present: D3QN's and PPO's (both log val as ``val/…``) and the classifier's."""


def plot_learning_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    keys = [k for k in _CURVES if any(k in h for h in history)]
    fig, axes = plt.subplots(max(1, len(keys)), 1, figsize=(8, 1.9 * max(1, len(keys))), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=False):
        pts = [(h.get("step", h.get("epoch", i)), h[key]) for i, h in enumerate(history) if key in h]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, lw=1.2)
        ax.set_ylabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("env steps")
    fig.suptitle(f"{title}: learning curves", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_action_scores(module: PolicyModule, data: SessionSet, execution: ExecutionParams, env_params: EnvParams,
                       path: Path, n_sessions: int = 4) -> None:
    """Price and the agent's per-action scores (softmax, i.e. probabilities for PPO/classifier) step by step
    over a few val sessions, greedy actions marked."""
    n = min(n_sessions, data.n_sessions)
    picks = np.linspace(0, data.n_sessions - 1, n).astype(np.int64)
    env = BatchSessionEnv(data, execution, env_params, num_envs=n, session_schedule=picks[:, None])
    window, state, mask = env.reset(seed=0)
    names = env_params.action_names
    probs, acts = [], []
    from rltrader.evaluate.backtest.decisions import masked_softmax  # the backtest's own (one implementation)

    for _ in range(data.length):
        p, a = masked_softmax(module.scores(window, state), mask)
        probs.append(p)
        acts.append(a)
        env.step(a)
    p, a = np.stack(probs, axis=1), np.stack(acts, axis=1)  # (n, length, A), (n, length)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 4.6), squeeze=False, sharex=True)
    for j, sid in enumerate(picks):
        st, en = int(data.start[sid]), int(data.end[sid])
        x = np.arange(en - st)
        axes[0, j].plot(x, data.close[st:en], color="black", lw=1.1)
        for k, name in enumerate(names):
            hit = a[j] == k
            if k and hit.any():
                axes[0, j].scatter(x[hit], data.close[st:en][hit], s=18, label=name)
            axes[1, j].plot(x, p[j, :, k], lw=1.1, label=name)
        axes[0, j].set_title(f"{data.session_symbol(int(sid))} session {int(sid)}", fontsize=8)
        axes[1, j].set_ylim(0, 1)
        axes[1, j].tick_params(labelsize=7)
        axes[0, j].tick_params(labelsize=7)
    axes[1, 0].set_ylabel("action probability", fontsize=8)
    axes[0, 0].set_ylabel("close", fontsize=8)
    axes[1, -1].legend(fontsize=7)
    fig.suptitle(f"{module.meta.get('algo', 'agent')}: actions over val sessions (softmax of scores)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
