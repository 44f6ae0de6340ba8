"""The compute bound of ``bench_train.py``: the training loops' network work alone, timed in the same run.

What a training step cannot avoid is the arithmetic of its networks; everything else (the env, the replay
buffer and its sum tree, window gathers, Python bookkeeping) is overhead. This module times that arithmetic on
tensors prepared once (real feature rows gathered into windows before the clock starts, all actions valid), with
the very networks, optimizer (``common.make_adam``), loss helpers and gradient clipping the agents use, so
``ours / bound`` says how close a loop runs to the limit of this machine and ``peer bound`` says how much work
the peer's algorithm asks for (an upper limit of its own rate).

Per env step, at ``num_envs`` envs per vector step:

- D3QN: one acting forward pass of ``num_envs`` windows per vector step, plus ``num_envs × replay_ratio /
  batch_size`` updates, each ``d3qn.target_values`` + ``d3qn.learn_step`` as ``td_update`` calls them: the
  double-DQN target (the online net's forward over the batch's next windows — sharing one convolution pass with
  its forward over the windows, ``DuelingQNet.pair``, for the CNN encoder — and the target net's over the share
  of rows the run sent through it: not the episodes that ended within the n steps, not the values cached since
  the last sync), the online forward + backward over the batch, clipping and an Adam step.
- SB3 DQN (same network and batch): its ε-greedy skips the network for the whole vector step with probability
  ε (the mean ε over the timed window is used), and its target is the target net's max (no online pass over
  the next windows).
- PPO (ours and SB3 alike): ``rollout_steps`` acting forward passes of ``num_envs`` windows, one bootstrap value
  pass, then ``update_epochs × minibatches`` forward + backward passes of a minibatch with the clipped loss,
  per ``rollout_steps × num_envs`` env steps.

Each piece is timed in process CPU seconds (blind to the other processes on a shared machine), the best mean
over a few timed blocks, so the bound is optimistic, as a ceiling should be.

How close the bound itself is to the metal: each piece's floating-point operations are counted once
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, forward and backward), so the
bound has a GFLOP/s figure, compared with this core's single-thread fp32 matrix-multiply peak measured in the same
run (``matmul_peak``: a 1024³ ``torch.mm``, the best case of the same BLAS). Small convolutions over 30-bar
windows cannot reach a large GEMM's rate; the gap says how much any implementation of the same arithmetic could
still gain on this CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from rltrader.agents import d3qn, ppo
from rltrader.agents.common import make_adam
from rltrader.agents.networks import ActorCritic, DuelingQNet
from rltrader.dataset.split import SessionSet
from rltrader.env.core import N_STATE


def best_mean(fn: Callable[[], object], calls: int, blocks: int) -> float:
    """CPU seconds per call: the fastest of ``blocks`` blocks of ``calls`` calls (after one untimed call).

    Process CPU time, as the training rates it is compared with: on a shared machine wall time counts the slices
    other processes take; one torch thread's CPU time is what the work costs on a core of its own."""
    fn()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls)
    return best


def _inputs(data: SessionSet, n: int, rng: np.random.Generator, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real windows (decision rows drawn from the sessions; ``extra`` more bars after each) and random
    position states."""
    feats = torch.from_numpy(np.ascontiguousarray(data.features))
    rows = torch.from_numpy(rng.choice(data.start, n)) + torch.from_numpy(rng.integers(0, data.length - extra, n))
    windows = feats[rows[:, None] + torch.arange(-data.context, extra)]
    return windows, torch.from_numpy(rng.normal(size=(n, N_STATE)).astype(np.float32))


def flops_of(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call (convolutions and matrix products, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(n: int = 1024, calls: int = 8, blocks: int = 3) -> float:
    """GFLOP/s of one thread's fp32 ``n × n`` matrix product: the core's practical arithmetic peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_mean(lambda: torch.mm(a, b), calls, blocks) / 1e9


@dataclass
class Bound:
    ours: float
    """Env steps per CPU-second of our algorithm's network work."""
    peer: float
    """Env steps per CPU-second of the peer's network work (same network and batch)."""
    act_ms: float
    update_ms: float
    peer_update_ms: float
    flop_per_step: float
    """Floating-point operations of our algorithm's network work per env step."""
    peer_flop_per_step: float

    @property
    def gflops(self) -> float:
        """The arithmetic rate the bound runs at (GFLOP per CPU-second)."""
        return self.ours * self.flop_per_step / 1e9

    def describe(self, name: str) -> str:
        return (f"{name} compute bound: {self.ours:,.0f} steps per CPU-second (acting forward {self.act_ms:.2f} ms "
                f"per vector step, update {self.update_ms:.2f} ms; {self.flop_per_step / 1e6:.2f} MFLOP per env "
                f"step = {self.gflops:.1f} GFLOP/s); peer's own bound {self.peer:,.0f} (update "
                f"{self.peer_update_ms:.2f} ms, {self.peer_flop_per_step / 1e6:.2f} MFLOP per env step)")


def d3qn_bound(cfg: d3qn.D3QNConfig, data: SessionSet, n_actions: int, mean_eps: float, target_pass: float = 1.0,
               blocks: int = 3, calls: int = 8) -> Bound:
    """``target_pass``: the share of a batch's rows the training run sent through the target net (measured in
    the same run; ``d3qn.target_values`` skips the rows whose episode ended within the n steps and reads back
    the ones cached since the last sync), so the bound does the target work the run did."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_features = data.features.shape[1]
    online = DuelingQNet(n_features, data.context, N_STATE, n_actions, cfg.net)
    target = DuelingQNet(n_features, data.context, N_STATE, n_actions, cfg.net)
    target.load_state_dict(online.state_dict())
    target.requires_grad_(False)
    opt = make_adam(online.parameters(), cfg.lr, torch.device("cpu"))
    act_w, act_s = _inputs(data, cfg.num_envs, rng)
    shift = cfg.n_step if online.can_pair(data.context) else 0  # as train_d3qn (every batch qualifies there)
    ext, s = _inputs(data, cfg.batch_size, rng, extra=cfg.n_step)
    w, nw = ext[:, :data.context].contiguous(), ext[:, cfg.n_step:].contiguous()
    _, ns = _inputs(data, cfg.batch_size, rng)
    mask = torch.ones(cfg.batch_size, n_actions, dtype=torch.bool)
    action = torch.from_numpy(rng.integers(0, n_actions, cfg.batch_size))
    ret = torch.from_numpy(rng.normal(size=cfg.batch_size).astype(np.float32))
    disc = torch.full((cfg.batch_size,), cfg.gamma**cfg.n_step)
    weights = torch.ones(cfg.batch_size)
    # the rows td_update sends through the target net: the first ones skipped, as many as the run skipped
    passed = np.where(np.arange(cfg.batch_size) < round(cfg.batch_size * (1.0 - target_pass)), 0.0,
                      cfg.gamma**cfg.n_step).astype(np.float32)

    def act() -> None:
        with torch.no_grad():
            online(act_w, act_s)

    def update() -> None:  # ours: td_update's target_values + learn_step on the same tensors it hands them
        q_target, _ = d3qn.target_values(target, nw, ns, passed)
        d3qn.learn_step(online, target, opt, cfg, windows=ext if shift else w, next_windows=None if shift else nw,
                        state=s, action=action, next_state=ns, next_mask=mask, returns=ret, discount=disc,
                        weights=weights, step=0, shift=shift, q_target=q_target)

    def peer_update() -> None:  # SB3 DQN: max of the target net over the next windows, Huber loss, clip, Adam
        with torch.no_grad():
            y = ret + disc * target(nw, ns).max(dim=1).values
        q = online(w, s).gather(1, action[:, None]).squeeze(1)
        loss = F.smooth_l1_loss(q, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(online.parameters(), cfg.grad_clip, foreach=True)
        opt.step()

    act_t = best_mean(act, 4 * calls, blocks)
    upd_t = best_mean(update, calls, blocks)
    peer_t = best_mean(peer_update, calls, blocks)
    per_vec = cfg.updates_per_vector_step
    ours = cfg.num_envs / (act_t + per_vec * upd_t)
    peer = cfg.num_envs / ((1.0 - mean_eps) * act_t + per_vec * peer_t)
    act_f, upd_f, peer_f = flops_of(act), flops_of(update), flops_of(peer_update)
    return Bound(ours, peer, 1e3 * act_t, 1e3 * upd_t, 1e3 * peer_t, (act_f + per_vec * upd_f) / cfg.num_envs,
                 ((1.0 - mean_eps) * act_f + per_vec * peer_f) / cfg.num_envs)


def ppo_bound(cfg: ppo.PPOConfig, data: SessionSet, n_actions: int, blocks: int = 2, calls: int = 4) -> Bound:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = ActorCritic(data.features.shape[1], data.context, N_STATE, n_actions, cfg.net)
    opt = make_adam(net.parameters(), cfg.lr, torch.device("cpu"))
    act_w, act_s = _inputs(data, cfg.num_envs, rng)
    mb = cfg.minibatch_size
    w, s = _inputs(data, mb, rng)
    mask = torch.ones(mb, n_actions, dtype=torch.bool)
    actions = torch.from_numpy(rng.integers(0, n_actions, mb))
    old_logp = torch.full((mb,), -float(np.log(n_actions)))
    adv = torch.from_numpy(rng.normal(size=mb).astype(np.float32))
    ret = torch.from_numpy(rng.normal(size=mb).astype(np.float32))
    val = torch.zeros(mb)

    def act() -> None:
        with torch.no_grad():
            net(act_w, act_s)

    def minibatch() -> None:  # the clipped surrogate, clipped value loss and entropy bonus of train_ppo
        logits, new_value = net(w, s)
        logp_all, entropy = ppo.masked_distribution(logits, mask)
        ratio = (logp_all.gather(1, actions[:, None]).squeeze(1) - old_logp).exp()
        a = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
        v_clip = val + torch.clamp(new_value - val, -cfg.clip_coef, cfg.clip_coef)
        v = 0.5 * torch.max((new_value - ret) ** 2, (v_clip - ret) ** 2).mean()
        loss = pg - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm, foreach=True)
        opt.step()

    act_t = best_mean(act, 4 * calls, blocks)
    mb_t = best_mean(minibatch, calls, blocks)
    per_update = (cfg.rollout_steps + 1) * act_t + cfg.update_epochs * cfg.minibatches * mb_t
    rate = cfg.rollout_steps * cfg.num_envs / per_update
    steps = cfg.rollout_steps * cfg.num_envs
    flop = ((cfg.rollout_steps + 1) * flops_of(act) + cfg.update_epochs * cfg.minibatches * flops_of(minibatch)) / steps
    return Bound(rate, rate, 1e3 * act_t, 1e3 * per_update, 1e3 * per_update, flop, flop)
