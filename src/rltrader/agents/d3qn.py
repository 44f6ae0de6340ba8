"""D3QN (the D3QN reference design): dueling double DQN with prioritized n-step replay over B vectorized session envs.

One file, read top to bottom (CleanRL style):

- ``D3QNConfig``: every knob, from ``params.yaml: d3qn`` (``D3QNConfig.from_params`` / ``config_from_params``).
- acting: ε-greedy over the VALID actions only — with probability ε a uniform draw among the mask's true
  entries, else the argmax of the masked Q-values (``select_actions``).
- learning (``td_update``): sample a prioritized batch (``replay.PrioritizedReplay``; windows re-gathered on the
  device from stored decision rows), n-step target ``R + γ^k · Q_target(s', argmax_a' Q_online(s', a'))`` with
  the argmax over the next state's MASKED Q (double DQN), Huber loss weighted by the importance-sampling weights
  (β annealed to 1), gradient clipping, new priorities ``|TD|``; the target net follows by hard copy every
  ``target_sync`` updates (``tau = 1``) or Polyak averaging every update (``tau < 1``). The network work is
  ``learn_step``; with the CNN encoder the online net's passes over a transition's window and its successor's
  (n bars later, overlapping in context − n bars) share their convolutions (``DuelingQNet.pair``: the same
  values, about half a pass saved).
- ``train_d3qn``: the loop — collect one step of every env, then ``num_envs × replay_ratio / batch_size``
  gradient updates (fractional ratios carry over), evaluate the greedy policy on val every ``eval_every`` env
  steps (the best one is kept), log to MLflow, checkpoint every ``checkpoint_every`` env steps. A resumed run
  (same seed, CPU) ends with exactly the weights of an unbroken one: the checkpoint holds everything that
  changes — nets, optimizer, replay arrays and sum tree, env state, numpy and torch RNG states, counters.

Steps are env steps summed over the envs (one vector step = ``num_envs`` steps).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rltrader.agents.common import (
    ObsGather,
    TrainingError,
    TrainingProgress,
    check_finite,
    check_params_finite,
    decision_rows,
    env_state,
    load_checkpoint,
    load_env_state,
    make_adam,
    masked_greedy_policy,
    needs_mode_switch,
    pick_device,
    save_checkpoint,
    seed_everything,
    set_threads,
)
from rltrader.agents.configs import D3QNConfig
from rltrader.agents.evaluate import Policy, evaluate
from rltrader.agents.networks import DuelingQNet, NetConfig, masked_logits, n_params
from rltrader.agents.replay import Batch, PrioritizedReplay
from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.core import N_STATE
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams

CHECKPOINT_NAME = "d3qn.pt"


@dataclass
class D3QNResult:
    best_state: dict[str, torch.Tensor]
    """Online-net weights (CPU) of the best val evaluation; the final weights when there is no val set."""
    final_state: dict[str, torch.Tensor]
    net: DuelingQNet
    """The final online net (on the training device)."""
    spec: dict[str, Any]
    """What ``build_q_net`` needs to rebuild the net: shapes, NetConfig fields, feature and action names."""
    history: list[dict[str, float]]
    """One row per log batch / evaluation, each with its ``step``."""
    best_val: dict[str, float]
    """``EvalResult.summary()`` of the best evaluation (empty without val)."""
    best_step: int
    steps: int
    updates: int
    steps_per_second: float


# --- network helpers ----------------------------------------------------------------------------------------


def build_q_net(spec: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None,
                device: torch.device | str = "cpu") -> DuelingQNet:
    """A ``DuelingQNet`` from ``D3QNResult.spec`` (optionally loaded with weights)."""
    net = DuelingQNet(spec["n_features"], spec["context"], spec["n_state"], spec["n_actions"],
                      NetConfig(**spec["net"]))
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net.to(device)


def _n_actions(net: nn.Module) -> int:
    head = getattr(net, "advantage", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    orig = getattr(net, "_orig_mod", None)  # torch.compile wrapper
    return _n_actions(orig) if isinstance(orig, nn.Module) else -1


def check_action_shape(net: nn.Module, n_actions: int) -> None:
    """An env whose mask has ``n_actions`` columns must meet a net with as many Q outputs."""
    have = _n_actions(net)
    if have != -1 and have != n_actions:
        raise ConfigError(f"d3qn: the env's action mask has {n_actions} actions but the Q-network outputs {have} "
                          "(env.mode changed since the net was built? use a net trained for this mode)")


def q_values(net: nn.Module, windows: torch.Tensor | np.ndarray, state: torch.Tensor | np.ndarray,
             mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Masked Q-values ``(B, A)`` (invalid actions at the dtype's lowest value), without gradients."""
    device = next(net.parameters()).device
    m = torch.as_tensor(mask, device=device, dtype=torch.bool)
    check_action_shape(net, m.shape[1])
    w = torch.as_tensor(windows, device=device, dtype=torch.float32)
    s = torch.as_tensor(state, device=device, dtype=torch.float32)
    with torch.no_grad():
        return masked_logits(net(w, s), m)


def greedy_policy(net: nn.Module, device: torch.device | str | None = None) -> Policy:
    """The argmax of the masked Q-values, as an ``evaluate()`` policy (numpy in, numpy out)."""
    if device is not None:
        net.to(device)
    return masked_greedy_policy(net, net, lambda mask: check_action_shape(net, mask.shape[1]),
                                next(net.parameters()).device)


def random_valid_actions(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row drawn uniformly among the row's valid actions (hold, index 0, is always valid)."""
    return np.asarray(np.where(mask, rng.random(mask.shape), -1.0).argmax(axis=1), dtype=np.int64)


def select_actions(net: nn.Module, windows: torch.Tensor, state: torch.Tensor, mask: np.ndarray, epsilon: float,
                   rng: np.random.Generator, step: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """ε-greedy over valid actions: returns (actions, masked Q). The rng draws are the same whatever ε is, so
    a run's random stream does not depend on the schedule."""
    q = q_values(net, windows, state, mask)
    check_finite(step, q_values=q)  # invalid actions hold the dtype's lowest value: finite
    greedy = q.argmax(dim=1).cpu().numpy()
    explore = rng.random(len(mask)) < epsilon
    return np.where(explore, random_valid_actions(mask, rng), greedy).astype(np.int64), q


def double_q_target(online: nn.Module, target: nn.Module, next_windows: torch.Tensor, next_state: torch.Tensor,
                    next_mask: torch.Tensor, returns: torch.Tensor, discount: torch.Tensor) -> torch.Tensor:
    """n-step double-DQN target: ``R + γ^k · Q_target(s', argmax_{valid a'} Q_online(s', a'))``.

    ``discount`` is 0 where the episode ended within the n steps (then ``s'`` is another episode's and unused).
    """
    with torch.no_grad():
        return bootstrap_target(online(next_windows, next_state), target, next_windows, next_state, next_mask,
                                returns, discount)


def bootstrap_target(q_next_online: torch.Tensor, target: nn.Module, next_windows: torch.Tensor,
                     next_state: torch.Tensor, next_mask: torch.Tensor, returns: torch.Tensor,
                     discount: torch.Tensor, q_target: torch.Tensor | None = None) -> torch.Tensor:
    """``double_q_target`` given the online net's Q of the successor observations (computed by the caller), and
    optionally the target net's (``target_values``; else one target pass over ``next_windows`` here)."""
    with torch.no_grad():
        best = masked_logits(q_next_online, next_mask).argmax(dim=1, keepdim=True)
        q_t = target(next_windows, next_state) if q_target is None else q_target
        q_next: torch.Tensor = q_t.gather(1, best).squeeze(1)
        return returns + discount * q_next


class TargetCache:
    """The target net's Q-values of each replay slot's bootstrap observation, reused until either changes.

    Between two hard syncs (``tau = 1``: every ``target_sync`` updates) the target net is fixed, and a slot's
    successor observation is fixed from the moment it becomes sampleable until the slot is written again. PER
    samples a transition several times in that span (``replay_ratio`` samples per env step on average, high
    priorities more), so its ``Q_target(s', ·)`` row is computed once and read back after: the same values
    (a row's result does not depend on the other rows of the pass), one target pass less per hit. ``forget``
    is called for the slots ``PrioritizedReplay.add`` writes, ``clear`` at every sync. Not used with Polyak
    averaging (the target changes every update)."""

    def __init__(self, size: int, n_actions: int, device: torch.device) -> None:
        self.q = torch.zeros(size, n_actions, device=device)
        self.valid = np.zeros(size, dtype=bool)

    def forget(self, slots: slice | np.ndarray) -> None:
        self.valid[slots] = False

    def clear(self) -> None:
        self.valid[:] = False

    def state(self) -> dict[str, Any]:
        return {"q": self.q.cpu().clone(), "valid": self.valid.copy()}

    def load(self, state: dict[str, Any]) -> None:
        self.q.copy_(state["q"])
        self.valid[:] = state["valid"]


def target_values(target: nn.Module, next_windows: torch.Tensor, next_state: torch.Tensor, discount: np.ndarray,
                  slots: np.ndarray | None = None, cache: TargetCache | None = None) -> tuple[torch.Tensor, int]:
    """``Q_target(s', ·)`` of a batch, ``(B, A)``, and how many rows went through the target net.

    Only the rows whose bootstrap term counts are computed: where ``discount`` is 0 (the episode ended within
    the n steps) the row is never read (``R + 0 · Q``) and holds 0; with a ``cache`` (and the batch's replay
    ``slots``) a row computed since the last sync is read back. ``discount`` is the host copy, so that choosing
    rows never waits for a device."""
    dev = next_windows.device

    def idx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev)

    if slots is None:  # a cache is keyed by the batch's replay slots
        cache = None
    need = discount != 0
    hit = need & cache.valid[slots] if cache is not None else np.zeros_like(need)
    need &= ~hit
    rows = np.flatnonzero(need)
    ri = idx(rows)
    with torch.no_grad():
        if len(rows) == len(need):
            q: torch.Tensor = target(next_windows, next_state)
        else:
            q = torch.zeros(len(need), _n_actions(target), device=dev)
            if len(rows):
                q[ri] = target(next_windows[ri], next_state[ri])
        if cache is not None:
            assert slots is not None
            if hit.any():
                q[idx(np.flatnonzero(hit))] = cache.q[idx(slots[hit])]
            if len(rows):
                cache.q[idx(slots[rows])] = q[ri]
                cache.valid[slots[rows]] = True
    return q, len(rows)


def shared_windows(batch: Batch, n_step: int) -> bool:
    """Whether every transition's bootstrap window is its own window ``n_step`` bars on (``next_row = row + n``),
    or does not count (``discount`` 0: the episode ended within the n steps, the target is the reward sum alone)
    — then one ``ObsGather.extended`` gather and ``DuelingQNet.pair`` serve both."""
    return bool(((batch.next_rows == batch.rows + n_step) | (batch.discount == 0)).all())


def learn_step(online: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, cfg: D3QNConfig, *,
               windows: torch.Tensor, next_windows: torch.Tensor | None, state: torch.Tensor, action: torch.Tensor,
               next_state: torch.Tensor, next_mask: torch.Tensor, returns: torch.Tensor, discount: torch.Tensor,
               weights: torch.Tensor, step: int, shift: int = 0, q_target: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network work of one update: double-DQN targets, the weighted Huber loss, backward, clipping, Adam.

    ``shift`` = 0: ``windows`` / ``next_windows`` are the observation and successor windows. ``shift`` = n
    (``next_windows`` None): ``windows`` holds each observation window plus the n bars after it
    (``ObsGather.extended``; the successor window is ``[:, n:]``) and the online net's two passes share their
    convolutions (``DuelingQNet.pair``, the same values). Returns (loss, TD errors, Q of the taken actions,
    gradient norm). ``returns`` are already scaled by ``reward_scale``. ``q_target``: the target net's Q of the
    successor observations when the caller has them (``target_values``: only the rows that count, cached ones
    read back); else one target pass over the whole batch here. The compute bound of
    ``benchmarks/bench_train.py`` times this very function."""
    if next_windows is None:
        assert isinstance(online, DuelingQNet) and shift > 0
        next_windows = windows[:, shift:]
        q_all, q_next_online = online.pair(windows, state, next_state, shift)
    else:
        with torch.no_grad():
            q_next_online = online(next_windows, next_state)
        q_all = online(windows, state)
    y = bootstrap_target(q_next_online, target, next_windows, next_state, next_mask, returns, discount, q_target)
    q = q_all.gather(1, action[:, None]).squeeze(1)
    td = y - q
    loss = (weights * F.smooth_l1_loss(q, y, reduction="none")).mean()
    check_finite(step, loss=loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    grad_norm = nn.utils.clip_grad_norm_(online.parameters(), cfg.grad_clip, foreach=True)
    optimizer.step()
    return loss.detach(), td.detach(), q.detach(), grad_norm


def td_update(online: nn.Module, target: nn.Module, optimizer: torch.optim.Optimizer, gather: ObsGather,
              replay: PrioritizedReplay, cfg: D3QNConfig, beta: float, rng: np.random.Generator,
              step: int, can_pair: bool = False, cache: TargetCache | None = None) -> dict[str, float]:
    """One gradient step on a prioritized batch; updates the priorities. Returns loss / |TD| / Q means and
    ``target_pass``, the share of the batch's rows that went through the target net (``target_values``).

    ``can_pair``: the online net has ``pair`` (``DuelingQNet.can_pair``); it is used when every transition of
    the batch qualifies (``shared_windows``). ``cache``: the target net's values by replay slot (hard syncs)."""
    dev = gather.device
    b = replay.sample(cfg.batch_size, beta, rng)
    shift = cfg.n_step if can_pair and shared_windows(b, cfg.n_step) else 0
    windows = gather.extended(b.rows, shift) if shift else gather.windows(b.rows)
    next_windows = None if shift else gather.windows(b.next_rows)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(dev)

    next_state = t(b.next_state)
    q_target, passes = target_values(target, windows[:, shift:] if next_windows is None else next_windows,
                                     next_state, b.discount, b.slots, cache)
    loss, td, q, grad_norm = learn_step(
        online, target, optimizer, cfg, windows=windows, next_windows=next_windows, state=t(b.state),
        action=t(b.action), next_state=next_state, next_mask=t(b.next_mask),
        returns=t(b.returns) * cfg.reward_scale, discount=t(b.discount), weights=t(b.weights), step=step, shift=shift,
        q_target=q_target)
    td_abs = td.abs()
    replay.update_priorities(b.slots, td_abs.cpu().numpy().astype(np.float64))
    return {"loss": float(loss), "td_abs": float(td_abs.mean()), "q_mean": float(q.mean()),
            "grad_norm": float(grad_norm), "target_pass": passes / len(b.slots)}


def sync_target(online: nn.Module, target: nn.Module, tau: float) -> None:
    with torch.no_grad():
        if tau >= 1.0:
            target.load_state_dict(online.state_dict())
        else:
            for p_t, p in zip(target.parameters(), online.parameters(), strict=True):
                p_t.lerp_(p, tau)


# --- checkpoints ----------------------------------------------------------------------------------------------

_REPLAY_ARRAYS = ("row_of_obs", "state", "mask", "action", "reward", "done")
_REPLAY_SCALARS = ("max_priority", "head", "written")


def replay_state(rb: PrioritizedReplay) -> dict[str, Any]:
    return {**{k: getattr(rb, k).copy() for k in _REPLAY_ARRAYS}, **{k: getattr(rb, k) for k in _REPLAY_SCALARS},
            "tree": rb.tree.tree.copy()}


def load_replay_state(rb: PrioritizedReplay, state: dict[str, Any]) -> None:
    for k in _REPLAY_ARRAYS:
        if getattr(rb, k).shape != state[k].shape:
            raise ConfigError(f"d3qn: checkpoint replay buffer {k} has shape {state[k].shape}, this "
                              f"run's {getattr(rb, k).shape} (buffer_size/num_envs/mode changed: "
                              "resume with the same config)")
        getattr(rb, k)[...] = state[k]
    for k in _REPLAY_SCALARS:
        setattr(rb, k, state[k])
    rb.tree.tree[...] = state["tree"]


@dataclass
class _Counters:
    """Loop state that changes every step (checkpointed as is)."""

    step: int = 0
    updates: int = 0
    update_credit: float = 0.0
    last_eval: int = 0
    last_ckpt: int = 0
    best_step: int = -1
    best_return: float = -math.inf
    best_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    # accumulators of the current log batch
    vec_steps: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    action_counts: list[int] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)


def _stat(c: _Counters, key: str, value: float) -> None:
    c.stats[key] = c.stats.get(key, 0.0) + value


# --- training ---------------------------------------------------------------------------------------------------


def train_d3qn(train: SessionSet, val: SessionSet | None, cfg: D3QNConfig, execution: ExecutionParams,
               env_params: EnvParams, *, run: Any = None, checkpoint_dir: Path | None = None, resume: bool = False,
               progress: bool = True) -> D3QNResult:
    """Train D3QN on ``train``; select the best greedy policy on ``val`` (see the module docstring).

    ``run``: an active MLflow run (metrics logged with ``mlflow.log_metrics``) or None. ``resume``: continue
    from ``checkpoint_dir/d3qn.pt`` if it exists (same config expected; ``total_steps`` may be raised).
    """
    rng = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    env = BatchSessionEnv(train, execution, env_params, num_envs=cfg.num_envs)
    env.reset(seed=cfg.seed)
    context, n_features = env.observation_shape
    spec = {"n_features": int(n_features), "context": int(context), "n_state": N_STATE,
            "n_actions": env.n_actions, "net": dataclasses.asdict(cfg.net),
            "feature_names": list(env.feature_names), "action_names": list(env_params.action_names)}
    online = build_q_net(spec, device=device)
    target = build_q_net(spec, device=device)
    target.load_state_dict(online.state_dict())
    target.requires_grad_(False)
    optimizer = make_adam(online.parameters(), cfg.lr, device)
    replay = PrioritizedReplay(cfg.buffer_size, cfg.num_envs, N_STATE, env.n_actions, alpha=cfg.per_alpha,
                               n_step=cfg.n_step, gamma=cfg.gamma)
    gather = ObsGather(env, device)
    cache = TargetCache(replay.size, env.n_actions, device) if cfg.tau >= 1.0 else None
    c = _Counters(action_counts=[0] * env.n_actions)

    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck["spec"]["n_actions"] != env.n_actions or ck["spec"]["n_features"] != n_features:
            raise ConfigError(f"d3qn: checkpoint {ckpt_path} has {ck['spec']['n_actions']} actions × "
                              f"{ck['spec']['n_features']} features, this env {env.n_actions} × {n_features} "
                              "(env.mode or the feature set changed: start a fresh run)")
        online.load_state_dict(ck["online"])
        target.load_state_dict(ck["target"])
        optimizer.load_state_dict(ck["optimizer"])
        load_replay_state(replay, ck["replay"])
        load_env_state(env, ck["env"])
        if cache is not None and "target_cache" in ck:  # older checkpoints: recomputed (the same values)
            cache.load(ck["target_cache"])
        rng.bit_generator.state = ck["np_rng"] if "np_rng" in ck else ck["rng"]  # "rng": older checkpoints
        torch.set_rng_state(ck["torch_rng"])
        c = ck["counters"]
        best_state: dict[str, torch.Tensor] = ck["best_state"]
    else:
        best_state = {k: v.detach().cpu().clone() for k, v in online.state_dict().items()}
    net_fwd: nn.Module = online
    if cfg.compile:
        net_fwd = torch.compile(online)  # type: ignore[assignment]

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        check_params_finite(c.step, online)
        save_checkpoint(ckpt_path, {
            "config": dataclasses.asdict(cfg), "spec": spec, "online": online.state_dict(),
            "target": target.state_dict(), "optimizer": optimizer.state_dict(), "replay": replay_state(replay),
            "env": env_state(env), "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "counters": c, "best_state": best_state,
            **({"target_cache": cache.state()} if cache is not None else {})})

    def run_eval() -> None:
        nonlocal best_state
        if val is None:
            return
        res = evaluate(greedy_policy(online), val, execution, env_params,
                       max_sessions=cfg.eval_sessions or None)
        summary = res.summary()
        row = {"step": float(c.step), **{f"val/{k}": v for k, v in summary.items()}}
        c.history.append(row)
        if summary["mean_return"] > c.best_return:
            c.best_return, c.best_step, c.best_val = summary["mean_return"], c.step, summary
            best_state = {k: v.detach().cpu().clone() for k, v in online.state_dict().items()}
        if run is not None:
            import mlflow

            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=c.step)

    def flush_logs(sps: float, cpu_sps: float) -> None:
        n_up = c.stats.pop("n_updates", 0.0)
        row: dict[str, float] = {"step": float(c.step), "epsilon": cfg.epsilon(c.step), "beta": cfg.beta(c.step),
                                 "sps": sps, "cpu_sps": cpu_sps, "updates": float(c.updates)}
        for k, v in c.stats.items():
            row[k] = v / n_up if n_up else math.nan
        total = sum(c.action_counts)
        for name, n in zip(env_params.action_names, c.action_counts, strict=True):
            row[f"action_{name}"] = n / total if total else 0.0
        if c.episode_returns:
            row["episode_pnl"] = float(np.mean(c.episode_returns))
            row["episodes"] = float(len(c.episode_returns))
        c.history.append(row)
        if run is not None:
            import mlflow

            mlflow.log_metrics({k: v for k, v in row.items() if k != "step" and math.isfinite(v)}, step=c.step)
        c.stats, c.action_counts, c.episode_returns, c.vec_steps = {}, [0] * env.n_actions, [], 0

    bar = TrainingProgress("d3qn", cfg.total_steps, c.step, enabled=progress)
    initial = execution.initial_cash
    updates_per_vec = cfg.updates_per_vector_step
    switch_mode = needs_mode_switch(online)
    # one convolution pass over a transition's window and its successor's (a plain module only: not compiled)
    can_pair = net_fwd is online and online.can_pair(int(context))
    t0, step0 = time.perf_counter(), c.step
    t_log, step_log, cpu_log = t0, c.step, time.process_time()  # cpu_sps: per CPU-second, blind to other load
    try:
        while c.step < cfg.total_steps:
            # 1. act in every env (ε-greedy over valid actions) and store the transition by decision row
            core = env.core
            rows = decision_rows(env)
            state, mask = core.state.copy(), core.mask.copy()
            eps = cfg.epsilon(c.step)
            if switch_mode:
                online.eval()
            actions, _ = select_actions(net_fwd, torch.from_numpy(core.window), torch.from_numpy(state), mask,
                                        eps, rng, c.step)
            if switch_mode:
                online.train()
            out = env.step(actions)
            done = out.terminated | out.truncated
            if cache is not None:  # the slots this step overwrites: their successors change
                cache.forget(slice(replay.head * replay.B, (replay.head + 1) * replay.B))
            replay.add(rows, state, mask, actions, out.reward, done)
            c.step += cfg.num_envs
            c.vec_steps += 1
            for a, n in enumerate(np.bincount(actions, minlength=env.n_actions)):
                c.action_counts[a] += int(n)
            if done.any():
                c.episode_returns.extend((out.final_equity[done] / initial - 1.0).tolist())
            # 2. learn: num_envs × replay_ratio / batch_size updates per vector step
            if c.step >= cfg.learning_starts and replay.tree.total > 0:
                c.update_credit += updates_per_vec
                while c.update_credit >= 1.0:
                    c.update_credit -= 1.0
                    info = td_update(net_fwd, target, optimizer, gather, replay, cfg, cfg.beta(c.step), rng, c.step,
                                     can_pair, cache)
                    c.updates += 1
                    _stat(c, "n_updates", 1.0)
                    for k, v in info.items():
                        _stat(c, k, v)
                    if cfg.tau < 1.0:
                        sync_target(online, target, cfg.tau)
                    elif c.updates % cfg.target_sync == 0:
                        sync_target(online, target, 1.0)
                        if cache is not None:
                            cache.clear()
            # 3. log, evaluate, checkpoint
            if c.vec_steps >= cfg.log_every:
                check_params_finite(c.step, online)
                now = time.perf_counter()
                cpu_now = time.process_time()
                sps = (c.step - step_log) / max(now - t_log, 1e-9)
                cpu_sps = (c.step - step_log) / max(cpu_now - cpu_log, 1e-9)
                t_log, step_log, cpu_log = now, c.step, cpu_now
                flush_logs(sps, cpu_sps)
                bar.update(info=f"ε {eps:.2f}  {sps:,.0f} steps/s  loss {c.history[-1].get('loss', 0):.4f}")
            if cfg.eval_every and c.step // cfg.eval_every > c.last_eval // cfg.eval_every:
                c.last_eval = c.step
                run_eval()
            if cfg.checkpoint_every and c.step // cfg.checkpoint_every > c.last_ckpt // cfg.checkpoint_every:
                c.last_ckpt = c.step
                checkpoint()
            bar.update(completed=c.step)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    check_params_finite(c.step, online)
    if val is not None and c.last_eval != c.step:
        c.last_eval = c.step
        run_eval()
    if c.vec_steps:
        flush_logs((c.step - step_log) / max(time.perf_counter() - t_log, 1e-9),
                   (c.step - step_log) / max(time.process_time() - cpu_log, 1e-9))
    if c.last_ckpt != c.step:
        c.last_ckpt = c.step
        checkpoint()
    final_state = {k: v.detach().cpu().clone() for k, v in online.state_dict().items()}
    if val is None:
        best_state, c.best_step = final_state, c.step
    sps = (c.step - step0) / elapsed if elapsed > 0 else 0.0
    if run is not None:
        import mlflow

        mlflow.log_metrics({"sps_total": sps, "n_params": float(n_params(online))}, step=c.step)
    return D3QNResult(best_state=best_state, final_state=final_state, net=online, spec=spec, history=c.history,
                      best_val=dict(c.best_val), best_step=c.best_step, steps=c.step, updates=c.updates,
                      steps_per_second=sps)


__all__ = ["CHECKPOINT_NAME", "D3QNConfig", "D3QNResult", "TargetCache", "TrainingError", "bootstrap_target",
           "build_q_net", "check_action_shape", "double_q_target", "greedy_policy", "learn_step", "load_checkpoint",
           "q_values", "random_valid_actions", "save_checkpoint", "select_actions", "shared_windows", "sync_target",
           "target_values", "td_update", "train_d3qn"]
