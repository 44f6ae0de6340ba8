"""Training benchmark: env steps/s including updates, and val return at equal steps, of our D3QN and PPO against
stable-baselines3 DQN and PPO on the same env, with the same network and the same replay ratio, in one run.

    python benchmarks/bench_train.py [--quick] [--sessions DIR] [--val-sessions N] [--dqn-steps N] [--ppo-updates N]
                                     [--repeats N] [--seed S]

Prints one JSON line per figure on stdout::

    {"metric": ..., "value": ..., "unit": ..., "peer": ..., "peer_value": ..., "ratio": ...}

``ratio`` is ours / peer (> 1: ours is better). A human-readable table goes to stderr.

Data: the ``train`` / ``val`` splits under ``data/sessions`` when built (the real data set), else synthetic
sessions (23 Gaussian features, context 30, sessions of 10 bars, a few thousand per split). Execution and env
settings come from ``params.yaml`` (environment overrides ignored); so do the agents' hyperparameters and networks
(``d3qn:`` and ``ppo:``), except the step budgets below and D3QN's ``eps_decay_steps`` (half the run, both sides,
so that ε reaches its floor within the short runs).

Same network: the peers get OUR ``networks.Trunk`` (window encoder + state MLP) as an SB3 ``BaseFeaturesExtractor``
that reshapes the flat ``SessionEnv`` observation (``context × F`` window, then the state) back into
``(window, state)``; with ``net_arch=[]`` SB3 DQN's Q-network is that trunk + one Linear layer (ours: the trunk +
the dueling value/advantage Linears) and SB3 PPO's policy is the trunk shared by a Linear policy head and a Linear
value head (ours: the same ``ActorCritic``; SB3's orthogonal init is off and its policy head is initialised like
ours). Same Adam (eps 1e-5), learning rates, γ, reward scale (× ``reward_scale``, by a ``VecEnvWrapper``), batch
sizes and gradient clipping on both sides. The peers get SB3 2.9 ``DummyVecEnv`` of ``num_envs`` (64) ``SessionEnv``
(our gymnasium env, the vector width of our agents; stated in the ``peer`` field), device cpu.

Figures
  1. ``d3qn_train_steps_per_s``: ``train_d3qn`` (no val, no checkpoints, no progress bar) against SB3 ``DQN``:
     env steps / s over the same window of steps after ``learning_starts`` (both sides: acting, env steps, replay
     writes and gradient updates, as in training). Same replay ratio: ours does ``num_envs × replay_ratio /
     batch_size`` updates of ``batch_size`` per vector step; the peer gets ``train_freq`` / ``gradient_steps`` such
     that it samples as many transitions per env step (64 envs, ratio 4, batch 256: one update of 256 per vector
     step of 64 envs), and the same ``learning_starts``, buffer size (the whole run: nothing is evicted), n-step
     (3), target sync interval in env steps, ε schedule and gradient clip. Differences that remain, all ours:
     prioritized replay (sum tree), double-DQN targets (the online net over the next windows too: about half a
     forward pass of the batch per update with the CNN encoder, ``DuelingQNet.pair``), action
     masks in acting and targets (the peer acts on all actions; invalid ones are no-ops in the env), and windows
     re-gathered from the feature matrix by row instead of stored flat observations. Ours is timed from its own
     per-log-batch rate log (``history['sps']``, log batches aligned to ``learning_starts``), the peer with a
     callback that starts the clock at ``learning_starts`` and stops it when ``learn`` returns. SB3's ε-greedy
     draws once per vector step (with probability ε all envs act at random and the Q-network is not run); ours
     runs the network every vector step and draws per env.
  2. ``ppo_train_steps_per_s``: ``train_ppo`` against SB3 ``PPO`` with the same ``n_steps`` (64) × envs (64) batch,
     minibatch size (batch / 4), epochs (4), clip ranges (policy and value 0.2), entropy / value coefficients,
     GAE λ and linearly annealed learning rate; the peer samples unmasked actions. Timed over every update but
     the first (warm-up): ours from the cumulative rate in its per-update history, the peer with a callback at the
     start of its second rollout until ``learn`` returns.
  3. ``d3qn_val_return_at_equal_steps`` / ``ppo_val_return_at_equal_steps``: mean session return (percent, net
     of costs) of the greedy policy each side has at the end of the runs above (the same number of env steps),
     through the one evaluation path (``agents.evaluate.evaluate``) on the same ``--val-sessions`` val sessions
     (evenly spread over the split). The peers' greedy policy is the argmax of the MASKED Q-values
     (``model.q_net``) resp. policy logits (``policy.get_distribution``), as ours. These lines add ``diff``
     = ours - peer (percentage points); ``ratio`` is ours / peer only when both are positive, else null. After
     the short budgets of this benchmark both numbers are mostly noise around the cost of trading (exactly 0:
     the greedy policy never opens a position, as holding is free): they show whether the faster side learns
     less per env step, they do not rank the algorithms.

Per CPU-second and the compute bound (keys of the two rate lines): ``value`` / ``peer_value`` / ``ratio`` are wall
clock, as a user sees them; ``cpu_value`` / ``peer_cpu_value`` / ``cpu_ratio`` are the same windows' env steps per
process CPU-second (both sides run one thread, so this is the rate on a core of their own; on the shared 2-core
box wall-clock rates swing ±30 % with the other jobs, CPU-second rates far less). ``ceiling`` is the compute
bound measured in the same run (``train_bound.py``): the networks' forward and backward passes, clipping and
optimizer steps that the algorithm does per env step (acting forwards, double-DQN targets, minibatch updates) on
prepared tensors, with no env, no replay and no Python bookkeeping, per CPU-second; ``fraction_of_ceiling`` =
``cpu_value / ceiling``. ``peer_ceiling`` is the same for the peer's algorithm with the same network (SB3 DQN
skips the acting pass with probability ε and has no online pass over the next windows, so its bound is higher:
ours can only pass it by more than that margin with less network work per step); ``peer_fraction_of_ceiling``
its rate as a fraction of that. And the metal under the bound: ``bound_gflop_per_s`` is the bound's arithmetic
rate (its convolutions' and matrix products' FLOPs, forward and backward, counted by torch's ``FlopCounterMode``),
``matmul_peak_gflop_per_s`` this core's single-thread fp32 peak (a 1024³ ``torch.mm``, same run),
``bound_of_matmul_peak`` their ratio, and ``twice_peer_needs_of_matmul_peak`` the fraction of that peak our
algorithm's arithmetic would have to run at to train at twice the peer's steps per CPU-second with no overhead
at all.

Threads: ``torch.set_num_threads(1)`` for both sides (small networks on 2 cores run faster single-threaded, and
``params.yaml: train.threads`` is 1); numba's env kernels run one thread (the batch env's default). Outside every
timer: the data is loaded, the env kernels compiled, and a tiny D3QN and SB3 DQN run (256 steps each) pays torch's
and SB3's first-call costs. Each rate is the best of ``--repeats`` runs (ours and the peer alternating; the same
seed, so the same models): other processes share this machine and steal whole time slices, so single runs vary by
±30 % (every repetition's rate and the load average are printed on stderr). The val figures evaluate the models of
the last repetition.

``--quick`` (< 1 min, ~45 s on an idle box): one repetition, D3QN ``learning_starts`` 1,920 and 5,120 timed
steps, PPO one warm-up + one timed update (4,096 timed steps), 200 val sessions. Default: 2 repetitions,
``learning_starts`` 10,240 (params.yaml: 10,000) and 40,960 timed steps, PPO 1 + 10 updates (40,960 timed steps),
2,000 val sessions (about four minutes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import _harness as h
import gymnasium as gym
import numpy as np
import torch
import train_bound as tb

REPO = h.REPO  # _harness put src/ on the path when the package is not installed

from stable_baselines3 import DQN, PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper  # noqa: E402

from rltrader.agents import d3qn, ppo  # noqa: E402
from rltrader.agents.evaluate import Policy, evaluate  # noqa: E402
from rltrader.agents.networks import NetConfig, Trunk, masked_logits  # noqa: E402
from rltrader.config import load_settings  # noqa: E402
from rltrader.dataset.split import SessionSet, load_split  # noqa: E402
from rltrader.env import EnvParams, ExecutionParams, SessionEnv, params_from_settings  # noqa: E402
from rltrader.env.core import N_STATE  # noqa: E402
from rltrader.env.synthetic import synthetic_sessions  # noqa: E402

SB3 = "stable-baselines3 2.9"


log = h.logger("bench_train")


# -- data ----------------------------------------------------------------------------------------------------
def load_data(sessions_dir: Path) -> tuple[SessionSet, SessionSet, str]:
    if all((sessions_dir / s / "rows.parquet").exists() for s in ("train", "val")):
        return load_split(sessions_dir, "train"), load_split(sessions_dir, "val"), str(sessions_dir)
    kw: dict[str, Any] = {"n_symbols": 4, "bars_per_symbol": 10_000, "n_features": 23, "context": 30, "length": 10}
    return synthetic_sessions(seed=0, **kw), synthetic_sessions(seed=1, **kw), "synthetic"


# -- our network inside SB3 ----------------------------------------------------------------------------------
class TrunkExtractor(BaseFeaturesExtractor):
    """Our ``Trunk`` on SessionEnv's flat observation: ``obs[:, :context*F]`` is the window (row-major), the rest
    the state."""

    def __init__(self, observation_space: gym.spaces.Box, context: int, n_features: int, net: dict[str, Any]
                 ) -> None:
        trunk = Trunk(n_features, N_STATE, NetConfig(**net))
        super().__init__(observation_space, trunk.out_dim)
        assert observation_space.shape == (context * n_features + N_STATE,), observation_space.shape
        self.trunk, self.context, self.n_features = trunk, context, n_features
        self.cut = context * n_features

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        windows = obs[:, :self.cut].reshape(-1, self.context, self.n_features)
        out: torch.Tensor = self.trunk(windows, obs[:, self.cut:])
        return out


class ScaleReward(VecEnvWrapper):
    """Rewards × ``scale`` (our agents' ``reward_scale``), vectorized."""

    def __init__(self, venv: VecEnv, scale: float) -> None:
        super().__init__(venv)
        self.scale = scale

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, reward, done, info = self.venv.step_wait()
        return obs, reward * self.scale, done, info


def peer_env(data: SessionSet, execution: ExecutionParams, env_params: EnvParams, n: int, scale: float) -> VecEnv:
    return ScaleReward(DummyVecEnv([lambda: SessionEnv(data, execution, env_params) for _ in range(n)]), scale)


def flat_obs(windows: np.ndarray, state: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([windows.reshape(len(windows), -1), state], axis=1).astype(np.float32))


def sb3_dqn_policy(model: DQN) -> Policy:
    """Greedy over the masked Q-values of the peer's online net."""

    @torch.no_grad()
    def policy(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        q = model.q_net(flat_obs(windows, state))
        return masked_logits(q, torch.from_numpy(mask)).argmax(dim=1).numpy()

    return policy


def sb3_ppo_policy(model: PPO) -> Policy:
    """Argmax of the peer's masked policy logits."""

    @torch.no_grad()
    def policy(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        model.policy.set_training_mode(False)
        logits = model.policy.get_distribution(flat_obs(windows, state)).distribution.logits
        return masked_logits(logits, torch.from_numpy(mask)).argmax(dim=1).numpy()

    return policy


class Clock(BaseCallback):
    """Starts the clock at the first step with ``num_timesteps >= start_step`` (DQN) or at the start of rollout
    ``start_rollout`` (PPO, 1-based)."""

    def __init__(self, start_step: int | None = None, start_rollout: int | None = None) -> None:
        super().__init__()
        self.start_step, self.start_rollout = start_step, start_rollout
        self.t0: float | None = None
        self.cpu0 = 0.0
        self.step0 = 0
        self.rollouts = 0

    def _start(self) -> None:
        if self.t0 is None:
            self.t0, self.cpu0, self.step0 = time.perf_counter(), time.process_time(), self.num_timesteps

    def _on_rollout_start(self) -> None:
        self.rollouts += 1
        if self.start_rollout is not None and self.rollouts == self.start_rollout:
            self._start()

    def _on_step(self) -> bool:
        if self.start_step is not None and self.num_timesteps >= self.start_step:
            self._start()
        return True


# -- the runs ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    steps: int
    """Env steps in the timed window."""
    seconds: float
    total_steps: int
    updates: int
    """Gradient updates of the whole run."""
    samples_per_step: float
    """Transitions sampled for gradient updates per env step collected, over the whole run after warm-up."""
    val: dict[str, float]
    """``EvalResult.summary()`` of the final greedy policy (empty when not evaluated)."""
    wall: float
    cpu_seconds: float = math.nan
    """Process CPU seconds over the timed window (one thread: what it would take on an idle core)."""
    target_pass: float = 1.0
    """Ours (D3QN): the share of sampled transitions that went through the target net in the timed window (the
    others ended within the n steps, or their value was cached since the last sync: ``d3qn.target_values``)."""

    @property
    def rate(self) -> float:
        return self.steps / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.steps / self.cpu_seconds


def d3qn_config(section: dict[str, Any], learning_starts: int, timed: int, seed: int) -> d3qn.D3QNConfig:
    base = d3qn.D3QNConfig.from_params({**section, "seed": seed, "device": "cpu"})
    total = learning_starts + timed
    return dataclasses.replace(base, total_steps=total, learning_starts=learning_starts, eps_decay_steps=total // 2,
                               buffer_size=min(base.buffer_size, total), eval_every=0, checkpoint_every=0,
                               log_every=10)


def run_ours_d3qn(cfg: d3qn.D3QNConfig, train: SessionSet, val: SessionSet, execution: ExecutionParams,
                  env_params: EnvParams, val_sessions: int) -> Run:
    t0 = time.perf_counter()
    res = d3qn.train_d3qn(train, None, cfg, execution, env_params, progress=False)
    wall = time.perf_counter() - t0
    rows = [r for r in res.history if "sps" in r]
    prev, steps, seconds, cpu = 0.0, 0.0, 0.0, 0.0
    for r in rows:
        if prev >= cfg.learning_starts:  # log batches fully after learning_starts
            steps += r["step"] - prev
            seconds += (r["step"] - prev) / r["sps"]
            cpu += (r["step"] - prev) / r["cpu_sps"]
        prev = r["step"]
    assert steps == res.steps - cfg.learning_starts, (steps, res.steps, cfg.learning_starts)
    ev = evaluate(d3qn.greedy_policy(res.net), val, execution, env_params,
                  max_sessions=val_sessions).summary() if val_sessions else {}
    at_start = next(r["updates"] for r in rows if r["step"] == cfg.learning_starts)
    samples = (res.updates - at_start) * cfg.batch_size / steps  # updates after learning_starts
    timed = [r["target_pass"] for r in rows if r["step"] > cfg.learning_starts and "target_pass" in r]
    return Run(int(steps), seconds, res.steps, res.updates, samples, ev, wall, cpu,
               float(np.mean(timed)) if timed else 1.0)


def run_peer_dqn(cfg: d3qn.D3QNConfig, train: SessionSet, val: SessionSet, execution: ExecutionParams,
                 env_params: EnvParams, val_sessions: int, context: int, n_features: int) -> tuple[Run, str]:
    per_vec = Fraction(cfg.num_envs * cfg.replay_ratio / cfg.batch_size).limit_denominator(1024)
    train_freq, gradient_steps = per_vec.denominator, per_vec.numerator  # updates per vector step, as ours
    target_every = round(cfg.target_sync * cfg.batch_size / cfg.replay_ratio)  # env steps between target syncs
    env = peer_env(train, execution, env_params, cfg.num_envs, cfg.reward_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replay buffer's "not enough memory" guess
        model = DQN(
            "MlpPolicy", env, learning_rate=cfg.lr, buffer_size=cfg.buffer_size, learning_starts=cfg.learning_starts,
            batch_size=cfg.batch_size, tau=cfg.tau, gamma=cfg.gamma, train_freq=(train_freq, "step"),
            gradient_steps=gradient_steps, n_steps=cfg.n_step, target_update_interval=target_every,
            exploration_fraction=cfg.eps_decay_steps / cfg.total_steps, exploration_initial_eps=cfg.eps_start,
            exploration_final_eps=cfg.eps_end, max_grad_norm=cfg.grad_clip, seed=cfg.seed, device="cpu",
            policy_kwargs={"features_extractor_class": TrunkExtractor, "net_arch": [],
                           "features_extractor_kwargs": {"context": context, "n_features": n_features,
                                                         "net": dataclasses.asdict(cfg.net)},
                           "optimizer_kwargs": {"eps": 1e-5}})
    clock = Clock(start_step=cfg.learning_starts)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps, callback=clock)
    t1, cpu1 = time.perf_counter(), time.process_time()
    wall = t1 - t0
    assert clock.t0 is not None and model.num_timesteps == cfg.total_steps, model.num_timesteps
    steps = model.num_timesteps - clock.step0
    ev = evaluate(sb3_dqn_policy(model), val, execution, env_params,
                  max_sessions=val_sessions).summary() if val_sessions else {}
    samples = model._n_updates * cfg.batch_size / (model.num_timesteps - cfg.learning_starts)
    desc = (f"{SB3} DQN, DummyVecEnv of {cfg.num_envs} SessionEnv, our {cfg.net.encoder} trunk "
            f"{cfg.net.channels}/{cfg.net.hidden} + Linear (net_arch=[]), batch {cfg.batch_size}, train_freq "
            f"{train_freq} vector step(s) × {gradient_steps} gradient step(s) (replay ratio {cfg.replay_ratio:g}), "
            f"n_steps {cfg.n_step}, uniform replay, no masks")
    return Run(steps, t1 - clock.t0, model.num_timesteps, model._n_updates, samples, ev, wall,
               cpu1 - clock.cpu0), desc


def ppo_config(section: dict[str, Any], updates: int, seed: int) -> ppo.PPOConfig:
    base = ppo.PPOConfig.from_params({**section, "seed": seed, "device": "cpu", "threads": 1})
    return dataclasses.replace(base, total_steps=updates * base.batch_size, eval_every=10**12,
                               checkpoint_every=10**12)


def run_ours_ppo(cfg: ppo.PPOConfig, train: SessionSet, val: SessionSet, execution: ExecutionParams,
                 env_params: EnvParams, val_sessions: int) -> Run:
    t0 = time.perf_counter()
    res = ppo.train_ppo(train, None, cfg, execution, env_params, progress=False)
    wall = time.perf_counter() - t0
    first, last = res.history[0], res.history[-1]
    elapsed = [r["step"] / r["perf/sps"] for r in (first, last)]  # cumulative seconds at the end of each update
    ev = evaluate(ppo.greedy_policy(res.net), val, execution, env_params,
                  max_sessions=val_sessions).summary() if val_sessions else {}
    samples = cfg.update_epochs * cfg.batch_size * (res.updates - 1) / (res.global_step - first["step"])
    return Run(int(last["step"] - first["step"]), elapsed[1] - elapsed[0], res.global_step,
               res.updates * cfg.update_epochs * cfg.minibatches, samples, ev, wall,
               last["perf/cpu_s"] - first["perf/cpu_s"])


def run_peer_ppo(cfg: ppo.PPOConfig, train: SessionSet, val: SessionSet, execution: ExecutionParams,
                 env_params: EnvParams, val_sessions: int, context: int, n_features: int) -> tuple[Run, str]:
    env = peer_env(train, execution, env_params, cfg.num_envs, cfg.reward_scale)
    lr = cfg.lr

    def schedule(progress_remaining: float) -> float:
        return lr * progress_remaining if cfg.anneal_lr else lr

    model = PPO(
        "MlpPolicy", env, learning_rate=schedule, n_steps=cfg.rollout_steps, batch_size=cfg.minibatch_size,
        n_epochs=cfg.update_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_coef,
        clip_range_vf=cfg.clip_coef if cfg.clip_vloss else None, normalize_advantage=cfg.normalize_advantages,
        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl,
        seed=cfg.seed, device="cpu",
        policy_kwargs={"features_extractor_class": TrunkExtractor, "net_arch": {"pi": [], "vf": []},
                       "features_extractor_kwargs": {"context": context, "n_features": n_features,
                                                     "net": dataclasses.asdict(cfg.net)},
                       "ortho_init": False, "optimizer_kwargs": {"eps": 1e-5}})
    head = model.policy.action_net
    assert isinstance(head, torch.nn.Linear)
    torch.nn.init.orthogonal_(head.weight, 0.01)  # as ActorCritic's policy head
    torch.nn.init.zeros_(head.bias)
    clock = Clock(start_rollout=2)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps, callback=clock)
    t1, cpu1 = time.perf_counter(), time.process_time()
    assert clock.t0 is not None and model.num_timesteps == cfg.total_steps, model.num_timesteps
    ev = evaluate(sb3_ppo_policy(model), val, execution, env_params,
                  max_sessions=val_sessions).summary() if val_sessions else {}
    steps = model.num_timesteps - clock.step0
    samples = cfg.update_epochs * cfg.batch_size * (cfg.num_updates - 1) / steps
    desc = (f"{SB3} PPO, DummyVecEnv of {cfg.num_envs} SessionEnv, our {cfg.net.encoder} trunk "
            f"{cfg.net.channels}/{cfg.net.hidden} + Linear heads (net_arch=[]), n_steps {cfg.rollout_steps}, "
            f"batch {cfg.minibatch_size}, {cfg.update_epochs} epochs, no masks")
    grad_steps = model._n_updates * cfg.minibatches  # SB3 counts epochs
    return Run(steps, t1 - clock.t0, model.num_timesteps, grad_steps, samples, ev, t1 - t0, cpu1 - clock.cpu0), desc


# -- reporting -----------------------------------------------------------------------------------------------
@dataclass
class Figure:
    metric: str
    value: float
    unit: str
    peer: str
    peer_value: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More keys of the JSON line (the compute bound and the fractions of it)."""

    @property
    def is_return(self) -> bool:
        return self.unit == "%"

    @property
    def ratio(self) -> float | None:
        if self.is_return and not (self.value > 0 and self.peer_value > 0):
            return None
        return h.ratio(self.value, self.peer_value)

    def line(self) -> dict[str, Any]:
        extra = {"diff": round(self.value - self.peer_value, 4)} if self.is_return else {}
        extra.update(self.extra)
        return h.line(self.metric, self.value, self.unit, self.peer, self.peer_value,
                      digits=4 if self.is_return else 0, ratio_value=self.ratio, **extra)


def emit(fig: Figure, figures: list[Figure]) -> None:
    figures.append(fig)
    h.emit(fig.line())


def summary(figures: Sequence[Figure], extra: Sequence[str]) -> None:
    head = f"{'metric':32} {'ours':>12} {'peer':>12} {'unit':>8} {'ratio':>6} {'diff':>9}"
    out = ["", head, "-" * len(head)]
    for f in figures:
        r = f"{f.ratio:6.2f}" if f.ratio is not None else f"{'-':>6}"
        d = f"{f.value - f.peer_value:+9.4f}" if f.is_return else ""
        fmt = "12.4f" if f.is_return else "12,.0f"
        out.append(f"{f.metric:32} {f.value:{fmt}} {f.peer_value:{fmt}} {f.unit:>8} {r} {d}")
    out.append("")
    out += [f"peer of {f.metric}: {f.peer}" for f in figures if not f.is_return]
    out += ["", *extra]
    h.table(out)


def describe(name: str, r: Run) -> str:
    out = (f"{name}: {r.steps:,} timed steps in {r.seconds:.2f} s ({r.rate:,.0f} steps/s); run {r.total_steps:,} "
           f"steps, {r.updates:,} gradient steps, {r.samples_per_step:.2f} sampled transitions per env step after "
           f"warm-up, {r.wall:.1f} s wall")
    if r.target_pass < 1.0:
        out += f"; {r.target_pass:.0%} of the sampled transitions through the target net"
    if r.val:
        out += (f"; val mean return {100 * r.val['mean_return']:+.4f} %, win rate {100 * r.val['win_rate']:.1f} %, "
                f"{r.val['trades_per_session']:.2f} trades/session")
    return out


# -- main ----------------------------------------------------------------------------------------------------
def bound_keys(ours: Run, peer: Run, bound: tb.Bound, peak: float) -> dict[str, Any]:
    """The compute bound (its best repetition) and each side's rate as a fraction of its own bound; the bound's
    arithmetic rate against the core's matrix-multiply peak ``peak`` (GFLOP/s), and the rate twice the peer's
    per-CPU-second speed would need from our algorithm's arithmetic (as a fraction of that peak)."""
    return {"bound_gflop_per_s": round(bound.gflops, 1), "matmul_peak_gflop_per_s": round(peak, 1),
            "bound_of_matmul_peak": round(bound.gflops / peak, 3),
            "twice_peer_needs_of_matmul_peak": round(2 * peer.cpu_rate * bound.flop_per_step / 1e9 / peak, 3),
            "cpu_value": round(ours.cpu_rate), "peer_cpu_value": round(peer.cpu_rate),
            "cpu_ratio": h.ratio(ours.cpu_rate, peer.cpu_rate), "cpu_unit": "steps per CPU-second",
            "ceiling": round(bound.ours), "fraction_of_ceiling": round(ours.cpu_rate / bound.ours, 3),
            "peer_ceiling": round(bound.peer), "peer_fraction_of_ceiling": round(peer.cpu_rate / bound.peer, 3),
            "ceiling_what": "the networks' forward/backward passes and optimizer steps of the same run's "
                            "algorithm alone, on prepared tensors (no env, no replay); see train_bound.py"}


def best_bound(name: str, bounds: Sequence[tb.Bound]) -> tb.Bound:
    best = max(bounds, key=lambda b: b.ours)
    log(f"{name}: " + ", ".join(f"{b.ours:,.0f}" for b in bounds) + f" steps/s over {len(bounds)} repetition(s)")
    return best


def best_of(name: str, runs: Sequence[Run]) -> Run:
    """The fastest repetition's rate (wall clock and CPU time each), with the last repetition's (evaluated)
    model."""
    best = max(runs, key=lambda r: r.rate)
    best_cpu = max(runs, key=lambda r: r.cpu_rate)
    rates = ", ".join(f"{r.rate:,.0f} ({r.cpu_rate:,.0f} per CPU-s)" for r in runs)
    log(f"{name}: {rates} steps/s over {len(runs)} repetition(s)")
    return dataclasses.replace(runs[-1], steps=best.steps, seconds=best.seconds, wall=best.wall,
                               cpu_seconds=best_cpu.cpu_seconds * best.steps / best_cpu.steps)


def main(argv: Sequence[str] | None = None) -> None:
    ap = h.parser(__doc__, "small step budgets, one repetition (< 1 min in all)")
    ap.add_argument("--sessions", type=Path, default=REPO / "data" / "sessions",
                    help="session dataset folder; its train/val splits are used when built (default: %(default)s)")
    ap.add_argument("--val-sessions", type=int, default=0, help="val sessions evaluated (default 2000, quick 200)")
    ap.add_argument("--dqn-steps", type=int, default=0,
                    help="timed D3QN env steps after learning_starts (default 40960, quick 5120)")
    ap.add_argument("--ppo-updates", type=int, default=0,
                    help="timed PPO updates after one warm-up (default 10, quick 1)")
    ap.add_argument("--repeats", type=int, default=0, help="repetitions, ours and the peer alternating; best rate "
                    "(default 2, quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()

    settings = load_settings(REPO / "params.yaml", env={})
    execution, env_params = params_from_settings(settings)
    train, val, source = load_data(args.sessions)
    probe = SessionEnv(train, execution, env_params)
    probe.reset(seed=0)  # numba kernels load (or compile) outside the timers
    probe.step(0)
    context, n_features = probe.core.window.shape[1:]
    log(f"data: {train.n_sessions:,} train / {val.n_sessions:,} val sessions ({source}), {n_features} features, "
        f"context {context}, length {train.length}; mode {env_params.mode}")

    val_sessions = args.val_sessions or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 2)
    dcfg_section = dict(settings.d3qn)
    step_unit = int(dcfg_section.get("num_envs", 64)) * 10  # one log batch of ours (log_every = 10)
    if args.quick:
        learning_starts, dqn_timed, ppo_updates = 3 * step_unit, 8 * step_unit, 1
    else:
        starts = int(dcfg_section.get("learning_starts", 10_000))
        learning_starts, dqn_timed, ppo_updates = math.ceil(starts / step_unit) * step_unit, 64 * step_unit, 10
    if args.dqn_steps:
        dqn_timed = math.ceil(args.dqn_steps / step_unit) * step_unit
    ppo_updates = args.ppo_updates or ppo_updates
    dcfg = d3qn_config(dcfg_section, learning_starts, dqn_timed, args.seed)
    pcfg = ppo_config(dict(settings.ppo), 1 + ppo_updates, args.seed)
    figures: list[Figure] = []

    # warm-up outside every timer: torch's lazy initialisation (autograd, Adam), SB3's first calls
    t0 = time.perf_counter()
    tiny = dataclasses.replace(dcfg, total_steps=4 * dcfg.num_envs, learning_starts=2 * dcfg.num_envs,
                               buffer_size=max(4 * dcfg.num_envs, dcfg.batch_size), eps_decay_steps=1, log_every=1)
    run_ours_d3qn(tiny, train, val, execution, env_params, 0)
    run_peer_dqn(tiny, train, val, execution, env_params, 0, context, n_features)
    log(f"warm-up {time.perf_counter() - t0:.1f} s")

    log(f"D3QN: {dcfg.num_envs} envs, learning_starts {dcfg.learning_starts:,}, {dqn_timed:,} timed steps, "
        f"net {dcfg.net}, {repeats} repetition(s)")
    ours_runs: list[Run] = []
    peer_runs: list[Run] = []
    bounds: list[tb.Bound] = []
    peer_d_desc = ""
    n_actions = int(probe.action_space.n)
    mean_eps = float(np.mean([dcfg.epsilon(s) for s in range(dcfg.learning_starts, dcfg.total_steps, dcfg.num_envs)]))
    for i in range(repeats):
        ev = val_sessions if i == repeats - 1 else 0
        ours_runs.append(run_ours_d3qn(dcfg, train, val, execution, env_params, ev))
        log(describe("ours D3QN", ours_runs[-1]))
        run, peer_d_desc = run_peer_dqn(dcfg, train, val, execution, env_params, ev, context, n_features)
        peer_runs.append(run)
        log(describe("SB3 DQN", run))
        bounds.append(tb.d3qn_bound(dcfg, train, n_actions, mean_eps, ours_runs[-1].target_pass))
        log(bounds[-1].describe("D3QN"))
    ours_d, peer_d = best_of("ours D3QN", ours_runs), best_of("SB3 DQN", peer_runs)
    bound_d = best_bound("D3QN compute bound", bounds)
    peak = tb.matmul_peak()
    log(f"this core's fp32 matrix-multiply peak (1024³ torch.mm, one thread): {peak:.1f} GFLOP/s")
    emit(Figure("d3qn_train_steps_per_s", ours_d.rate, "steps/s", peer_d_desc, peer_d.rate,
                bound_keys(ours_d, peer_d, bound_d, peak)), figures)

    log(f"PPO: {pcfg.num_envs} envs × {pcfg.rollout_steps} steps, 1 warm-up + {ppo_updates} timed updates, "
        f"net {pcfg.net}, {repeats} repetition(s)")
    ours_runs, peer_runs, bounds = [], [], []
    peer_p_desc = ""
    for i in range(repeats):
        ev = val_sessions if i == repeats - 1 else 0
        ours_runs.append(run_ours_ppo(pcfg, train, val, execution, env_params, ev))
        log(describe("ours PPO", ours_runs[-1]))
        run, peer_p_desc = run_peer_ppo(pcfg, train, val, execution, env_params, ev, context, n_features)
        peer_runs.append(run)
        log(describe("SB3 PPO", run))
        bounds.append(tb.ppo_bound(pcfg, train, n_actions, calls=2 if args.quick else 4))
        log(bounds[-1].describe("PPO"))
    ours_p, peer_p = best_of("ours PPO", ours_runs), best_of("SB3 PPO", peer_runs)
    bound_p = best_bound("PPO compute bound", bounds)
    emit(Figure("ppo_train_steps_per_s", ours_p.rate, "steps/s", peer_p_desc, peer_p.rate,
                bound_keys(ours_p, peer_p, bound_p, peak)), figures)

    val_desc = (f"{SB3} {{}} after the same {{:,}} env steps: greedy over masked outputs, mean return of "
                f"{min(val_sessions, val.n_sessions):,} val sessions (agents.evaluate), percent")
    emit(Figure("d3qn_val_return_at_equal_steps", 100 * ours_d.val["mean_return"], "%",
                val_desc.format("DQN", dcfg.total_steps), 100 * peer_d.val["mean_return"]), figures)
    emit(Figure("ppo_val_return_at_equal_steps", 100 * ours_p.val["mean_return"], "%",
                val_desc.format("PPO", pcfg.total_steps), 100 * peer_p.val["mean_return"]), figures)

    extra = [f"data: {source}; best of {repeats} repetition(s) per rate, val of the last",
             describe("ours D3QN", ours_d), describe("SB3 DQN ", peer_d), describe("ours PPO ", ours_p),
             describe("SB3 PPO ", peer_p), "",
             bound_d.describe("D3QN") + f" (SB3 acting: mean ε {mean_eps:.2f} of the timed window)",
             bound_p.describe("PPO"),
             f"per CPU-second: D3QN ours {ours_d.cpu_rate:,.0f}, SB3 DQN {peer_d.cpu_rate:,.0f} "
             f"({ours_d.cpu_rate / peer_d.cpu_rate:.2f}×); PPO ours {ours_p.cpu_rate:,.0f}, SB3 PPO "
             f"{peer_p.cpu_rate:,.0f} ({ours_p.cpu_rate / peer_p.cpu_rate:.2f}×)",
             f"fraction of the compute bound (per CPU-second): D3QN ours {ours_d.cpu_rate / bound_d.ours:.1%}, "
             f"SB3 DQN {peer_d.cpu_rate / bound_d.peer:.1%} (of its own bound); PPO ours "
             f"{ours_p.cpu_rate / bound_p.ours:.1%}, SB3 PPO {peer_p.cpu_rate / bound_p.peer:.1%}",
             f"the bounds' arithmetic against this core's matmul peak ({peak:.1f} GFLOP/s): D3QN "
             f"{bound_d.gflops / peak:.0%}, PPO {bound_p.gflops / peak:.0%}; twice the peer's rate per CPU-second "
             f"would need D3QN {2 * peer_d.cpu_rate * bound_d.flop_per_step / 1e9 / peak:.0%}, PPO "
             f"{2 * peer_p.cpu_rate * bound_p.flop_per_step / 1e9 / peak:.0%} of it", "",
             f"d3qn config: {dcfg}", f"ppo config: {pcfg}", "",
             f"torch threads {torch.get_num_threads()}; load average (1 min) at start {load0:.1f}, at end "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes share this machine, so rates "
             f"vary between runs; total {time.perf_counter() - t_start:.1f} s"]
    summary(figures, extra)


if __name__ == "__main__":
    main()
