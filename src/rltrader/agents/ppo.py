"""PPO with a TCN encoder over the batch session env (seed 000's agent), written to read like CleanRL's ppo.py.

One update:

1. **Rollout**: ``rollout_steps`` steps of ``num_envs`` accounts. Stored per step: the decision row (the window
   is re-gathered from the feature matrix by row, ``ObsGather``), the position state, the action mask, the
   action, its log-probability, the value estimate, the reward and whether the episode ended in that step.
   Actions are sampled from the MASKED logits (``networks.masked_logits``): an invalid action has probability 0.
2. **GAE**: the batch env auto-resets, so the observation after a step whose episode ended belongs to the next
   session; ``done[t]`` cuts both the bootstrap and the λ-trace there. A truncated session (``force_close:
   false``) counts as an end too: ``time_left`` is part of the state, so the session's horizon is part of the MDP.
3. **Update**: ``update_epochs`` passes over the batch in ``minibatches`` shuffled minibatches with the clipped
   surrogate objective, an entropy bonus (over the valid actions only), a value loss (optionally clipped around
   the rollout's values) and gradient-norm clipping; optional early stop once the approximate KL passes
   ``target_kl``.

Around it: greedy evaluation on the validation split every ``eval_every`` env steps with the one evaluation path
(``agents.evaluate.evaluate``), keeping the best network by validation mean return; MLflow metrics once per
update; atomic checkpoints every ``checkpoint_every`` env steps holding everything that changes (network,
optimizer, env, RNGs, counters, history, current observations), so a killed run resumed from its checkpoint ends
bit-identical (on CPU, fixed seed) to an unbroken one.
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

from rltrader.agents.common import (
    ObsGather,
    TrainingError,
    check_finite,
    check_params_finite,
    config_from_params,
    decision_rows,
    env_state,
    load_env_state,
    pick_device,
    seed_everything,
)
from rltrader.agents.evaluate import Policy, evaluate
from rltrader.agents.networks import ActorCritic, NetConfig, masked_logits
from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams
from rltrader.integrity import load_checkpoint_file, write_torch

CHECKPOINT_NAME = "ppo.pt"
ENCODERS = ("cnn", "tcn")


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (``params.yaml: ppo``; ``net`` may be given as a mapping)."""

    total_steps: int = 1_000_000
    """Env steps summed over the envs; the run does ``total_steps // (num_envs * rollout_steps)`` updates."""
    num_envs: int = 64
    rollout_steps: int = 128
    """Steps per env per rollout: the batch is ``num_envs * rollout_steps`` transitions."""
    lr: float = 3e-4
    anneal_lr: bool = True
    """Linearly anneal the learning rate to 0 over the run."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 4
    minibatches: int = 4
    """Minibatches per epoch; must divide the batch."""
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    """Stop the update's epochs early once the approximate KL exceeds this (None: never)."""
    normalize_advantages: bool = True
    reward_scale: float = 100.0
    """Rewards are multiplied by this for learning only (log returns per bar are ~1e-3; ×100 = percent)."""
    net: NetConfig = field(default_factory=NetConfig)
    eval_every: int = 50_000
    """Evaluate greedily on the validation split every this many env steps (and after the last update)."""
    eval_max_sessions: int = 0
    """Validation sessions per evaluation (0: all)."""
    checkpoint_every: int = 100_000
    """Checkpoint every this many env steps (at update boundaries) and after the last update."""
    device: str = "auto"
    compile: bool = False
    """``torch.compile`` the network for the forward passes (the state dict stays the plain module's)."""
    seed: int = 0
    threads: int = 0
    """CPU threads for torch (``torch.set_num_threads``); 0 leaves torch's default. Small networks on a shared
    CPU often run fastest with 1."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ppo.{name}: {why} (got {getattr(self, name)!r})")

        net: Any = self.net
        if isinstance(net, dict):
            net = config_from_params(NetConfig, "ppo.net", net)
            object.__setattr__(self, "net", net)
        if not isinstance(net, NetConfig):
            raise bad("net", "must be a mapping of network settings")
        if net.encoder not in ENCODERS:
            raise ConfigError(f"ppo.net.encoder: unknown encoder {net.encoder!r} (expected one of "
                              f"{', '.join(ENCODERS)})")
        for key in ("channels", "hidden", "tcn_levels", "kernel"):
            if not getattr(net, key) >= 1:
                raise ConfigError(f"ppo.net.{key}: must be ≥ 1 (got {getattr(net, key)!r})")
        if not 0 <= net.dropout < 1:
            raise ConfigError(f"ppo.net.dropout: must be in [0, 1) (got {net.dropout!r})")
        for name in ("num_envs", "rollout_steps", "update_epochs", "minibatches", "eval_every", "checkpoint_every"):
            if not getattr(self, name) >= 1:
                raise bad(name, "must be ≥ 1")
        if not self.threads >= 0:
            raise bad("threads", "must be ≥ 0 (0: torch's default)")
        if not self.eval_max_sessions >= 0:
            raise bad("eval_max_sessions", "must be ≥ 0 (0: all sessions)")
        for name in ("lr", "clip_coef", "max_grad_norm", "reward_scale"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise bad(name, "must be a finite number > 0")
        for name in ("ent_coef", "vf_coef"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise bad(name, "must be a finite number ≥ 0")
        if not 0 < self.gamma <= 1:
            raise bad("gamma", "must be in (0, 1]")
        if not 0 <= self.gae_lambda <= 1:
            raise bad("gae_lambda", "must be in [0, 1]")
        kl = self.target_kl
        if kl is not None and (isinstance(kl, bool) or not isinstance(kl, (int, float)) or not kl > 0):
            raise bad("target_kl", "must be > 0 or null")
        if self.batch_size % self.minibatches:
            raise bad("minibatches", f"must divide the batch num_envs × rollout_steps = {self.batch_size}")
        if self.total_steps < self.batch_size:
            raise bad("total_steps", f"must be ≥ one batch, num_envs × rollout_steps = {self.batch_size}")
        if not isinstance(self.device, str) or not (self.device == "auto"
                                                    or self.device.split(":")[0] in ("cpu", "cuda", "mps")):
            raise bad("device", "must be auto, cpu, cuda[:n] or mps")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.rollout_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.minibatches

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size

    @classmethod
    def from_params(cls, values: dict[str, Any] | None) -> PPOConfig:
        """From params.yaml's ``ppo:`` section; an unknown or mistyped key raises ``ConfigError`` naming it."""
        cfg: PPOConfig = config_from_params(cls, "ppo", values)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PPOResult:
    best_state: dict[str, torch.Tensor]
    """State dict (CPU) of the network with the best validation mean return (the final one without ``val``)."""
    net: ActorCritic
    """The network after the last update."""
    history: list[dict[str, float]]
    """One metrics dict per update (``step`` = env steps so far), the same numbers MLflow receives."""
    best_val: dict[str, float] | None
    """``EvalResult.summary()`` of the best evaluation, with ``step``; None without ``val``."""
    steps_per_second: float
    """Env steps per wall-clock second of this call (rollouts, updates, evaluation and checkpoints)."""
    global_step: int
    updates: int
    completed: bool = True
    """False when ``stop_after`` ended the call before ``total_steps``."""


# --- acting -------------------------------------------------------------------------------------------------------


def check_mask(mask: torch.Tensor | np.ndarray, n_actions: int) -> None:
    """The env's action mask must match the network's policy head."""
    if mask.ndim != 2 or mask.shape[1] != n_actions:
        raise ConfigError(f"ppo: the env's action mask has shape {tuple(mask.shape)} but the network has {n_actions} "
                          "actions (env.mode changed since the network/checkpoint was made?)")


def masked_distribution(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the valid actions (invalid: a huge negative, probability exactly 0) and the
    entropy over the valid actions only."""
    logp = torch.log_softmax(masked_logits(logits, mask), dim=-1)
    entropy = -(logp.exp() * logp).masked_fill(~mask, 0.0).sum(-1)
    return logp, entropy


def sample_actions(logits: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one valid action per row from the masked logits; returns (actions, their log-probabilities)."""
    logp, _ = masked_distribution(logits, mask)
    actions = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return actions, logp.gather(1, actions[:, None]).squeeze(1)


def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def action_probabilities(net: ActorCritic, windows: np.ndarray | torch.Tensor, state: np.ndarray | torch.Tensor,
                         mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B, A) action probabilities of the policy (masked actions: 0), for the training-insight plots."""
    device = _device_of(net)
    m = torch.as_tensor(mask, device=device, dtype=torch.bool)
    check_mask(m, net.policy.out_features)
    was_training = net.training
    net.eval()
    logits, _ = net(torch.as_tensor(windows, device=device, dtype=torch.float32),
                    torch.as_tensor(state, device=device, dtype=torch.float32))
    net.train(was_training)
    logp, _ = masked_distribution(logits, m)
    return np.asarray(logp.exp().cpu().numpy(), dtype=np.float64)


def greedy_policy(net: ActorCritic, device: torch.device | str | None = None) -> Policy:
    """The deterministic policy for evaluation: argmax of the masked logits."""
    dev = torch.device(device) if device is not None else _device_of(net)
    n_actions = net.policy.out_features

    @torch.no_grad()
    def policy(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        check_mask(mask, n_actions)
        was_training = net.training
        net.eval()
        logits, _ = net(torch.as_tensor(windows, device=dev), torch.as_tensor(state, device=dev))
        net.train(was_training)
        m = torch.as_tensor(mask, device=dev)
        return np.asarray(masked_logits(logits, m).argmax(dim=1).cpu().numpy(), dtype=np.int64)

    return policy


# --- checkpoints --------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically: written to a temporary file next to ``path`` and renamed over it."""
    write_torch(path, payload)  # the payload's sha256 is embedded: load_checkpoint refuses a damaged file


def load_checkpoint(path: Path) -> dict[str, Any]:
    return load_checkpoint_file(path)  # type: ignore[no-any-return]


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


# --- training -----------------------------------------------------------------------------------------------------


def train_ppo(train: SessionSet, val: SessionSet | None, cfg: PPOConfig, execution: ExecutionParams,
              env_params: EnvParams, *, run: Any = None, checkpoint_dir: Path | None = None, resume: bool = False,
              progress: bool = True, stop_after: int | None = None) -> PPOResult:
    """Train PPO on ``train``; keep the network that evaluates best on ``val``.

    ``run``: an active MLflow run (metrics logged once per update) or None. ``checkpoint_dir``: where
    ``ppo.pt`` is written; ``resume=True`` continues from it when it exists. ``stop_after``: end the call after
    the update that reaches this many env steps, as if the process were killed there (tests of resume).
    """
    if resume and checkpoint_dir is None:
        raise ConfigError("ppo: resume needs a checkpoint directory")
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    np_rng = seed_everything(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    env = BatchSessionEnv(train, execution, env_params, num_envs=cfg.num_envs)
    gather = ObsGather(env, device)
    n_features, context, n_state = env.core.features.shape[1], train.context, env.core.state.shape[1]
    net = ActorCritic(n_features, context, n_state, env.n_actions, cfg.net).to(device)
    model: nn.Module = torch.compile(net) if cfg.compile else net  # type: ignore[assignment]
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=1e-5)
    action_names = env_params.action_names

    T, N, A, S = cfg.rollout_steps, cfg.num_envs, env.n_actions, n_state
    rows_buf = torch.zeros((T, N), dtype=torch.long, device=device)
    state_buf = torch.zeros((T, N, S), dtype=torch.float32, device=device)
    mask_buf = torch.zeros((T, N, A), dtype=torch.bool, device=device)
    actions_buf = torch.zeros((T, N), dtype=torch.long, device=device)
    logp_buf = torch.zeros((T, N), device=device)
    values_buf = torch.zeros((T, N), device=device)
    rewards_buf = torch.zeros((T, N), device=device)
    dones_buf = torch.zeros((T, N), device=device)

    global_step, update = 0, 0
    history: list[dict[str, float]] = []
    best_val: dict[str, float] | None = None
    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None

    _, state_np, mask_np = env.reset(seed=cfg.seed)
    next_rows = torch.as_tensor(decision_rows(env), device=device)
    next_state = torch.from_numpy(state_np.copy()).to(device)
    next_mask = torch.from_numpy(mask_np.copy()).to(device)
    check_mask(next_mask, net.policy.out_features)

    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        for key in ("num_envs", "rollout_steps"):
            if ck["config"][key] != getattr(cfg, key):
                raise ConfigError(f"ppo.{key}: the checkpoint {ckpt_path} was made with {ck['config'][key]}, the "
                                  f"config says {getattr(cfg, key)}; resume with the same value or start afresh")
        try:
            net.load_state_dict(ck["net"])
        except RuntimeError as exc:
            raise ConfigError(f"ppo: checkpoint {ckpt_path} does not fit this network/env (net, mode or features "
                              f"changed): {str(exc).splitlines()[0]}") from exc
        optimizer.load_state_dict(ck["optimizer"])
        load_env_state(env, ck["env"])
        np_rng.bit_generator.state = ck["np_rng"]
        gen.set_state(ck["torch_gen"])
        torch.set_rng_state(ck["torch_rng"])
        global_step, update = int(ck["global_step"]), int(ck["update"])
        history, best_val, best_state = ck["history"], ck["best_val"], ck["best_state"]
        next_rows = ck["obs"]["rows"].to(device)
        next_state = ck["obs"]["state"].to(device)
        next_mask = ck["obs"]["mask"].to(device)

    def checkpoint() -> None:
        assert ckpt_path is not None
        save_checkpoint(ckpt_path, {
            "config": cfg.as_dict(), "net": net.state_dict(), "optimizer": optimizer.state_dict(),
            "env": env_state(env), "np_rng": np_rng.bit_generator.state, "torch_gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "global_step": global_step, "update": update, "history": history,
            "best_val": best_val, "best_state": best_state,
            "obs": {"rows": next_rows.cpu(), "state": next_state.cpu(), "mask": next_mask.cpu()}})

    bar = _ProgressBar(cfg.num_updates, update, enabled=progress)
    start_time, start_step = time.perf_counter(), global_step
    initial_cash = execution.initial_cash
    try:
        while update < cfg.num_updates:
            update += 1
            if cfg.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * (1.0 - (update - 1) / cfg.num_updates)
            step_before = global_step

            # ---- rollout ------------------------------------------------------------------------------------
            ep_returns: list[float] = []
            # logits statistics accumulate on the device (no per-step sync on a GPU)
            logit_stats = torch.zeros(4, dtype=torch.float64, device=device)  # sum, sum of squares, count, Σ max p
            net.eval()
            for t in range(T):
                rows_buf[t], state_buf[t], mask_buf[t] = next_rows, next_state, next_mask
                with torch.no_grad():
                    logits, value = model(gather.windows(next_rows), next_state)
                    check_finite(global_step, logits=logits, value=value)
                    action, logp = sample_actions(logits, next_mask, gen)
                    valid = logits.masked_fill(~next_mask, 0.0).double()
                    max_prob = masked_distribution(logits, next_mask)[0].exp().amax(-1).sum().double()
                    logit_stats += torch.stack([valid.sum(), (valid * valid).sum(), next_mask.sum().double(), max_prob])
                actions_buf[t], logp_buf[t], values_buf[t] = action, logp, value
                out = env.step(action.cpu().numpy())
                global_step += N
                done = out.terminated | out.truncated
                rewards_buf[t] = torch.from_numpy(out.reward * cfg.reward_scale).to(device)
                dones_buf[t] = torch.from_numpy(done.astype(np.float32)).to(device)
                if done.any():
                    ep_returns.extend((out.final_equity[done] / initial_cash - 1.0).tolist())
                next_rows = torch.as_tensor(decision_rows(env), device=device)
                next_state = torch.from_numpy(out.state.copy()).to(device)
                next_mask = torch.from_numpy(out.mask.copy()).to(device)

            # ---- GAE (done[t]: the episode ended in step t, the next observation is a new session's) ----------
            with torch.no_grad():
                _, next_value = model(gather.windows(next_rows), next_state)
                advantages = torch.zeros_like(rewards_buf)
                last = torch.zeros(N, device=device)
                for t in reversed(range(T)):
                    nxt = next_value if t == T - 1 else values_buf[t + 1]
                    nonterminal = 1.0 - dones_buf[t]
                    delta = rewards_buf[t] + cfg.gamma * nxt * nonterminal - values_buf[t]
                    last = delta + cfg.gamma * cfg.gae_lambda * nonterminal * last
                    advantages[t] = last
                returns = advantages + values_buf
            net.train()

            # ---- update ------------------------------------------------------------------------------------
            b_rows, b_state, b_mask = rows_buf.reshape(-1), state_buf.reshape(-1, S), mask_buf.reshape(-1, A)
            b_actions, b_logp = actions_buf.reshape(-1), logp_buf.reshape(-1)
            b_adv, b_ret, b_val = advantages.reshape(-1), returns.reshape(-1), values_buf.reshape(-1)
            clipfracs: list[float] = []
            pg_loss = v_loss = entropy_loss = approx_kl = old_approx_kl = torch.zeros((), device=device)
            epochs_done = 0
            for _epoch in range(cfg.update_epochs):
                perm = torch.from_numpy(np_rng.permutation(cfg.batch_size)).to(device)
                for start in range(0, cfg.batch_size, cfg.minibatch_size):
                    mb = perm[start:start + cfg.minibatch_size]
                    logits, new_value = model(gather.windows(b_rows[mb]), b_state[mb])
                    logp_all, entropy = masked_distribution(logits, b_mask[mb])
                    new_logp = logp_all.gather(1, b_actions[mb, None]).squeeze(1)
                    logratio = new_logp - b_logp[mb]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs.append(float(((ratio - 1.0).abs() > cfg.clip_coef).float().mean()))
                    mb_adv = b_adv[mb]
                    if cfg.normalize_advantages and len(mb) > 1:
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                    if cfg.clip_vloss:
                        v_unclipped = (new_value - b_ret[mb]) ** 2
                        v_clipped = b_val[mb] + torch.clamp(new_value - b_val[mb], -cfg.clip_coef, cfg.clip_coef)
                        v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_ret[mb]) ** 2).mean()
                    else:
                        v_loss = 0.5 * ((new_value - b_ret[mb]) ** 2).mean()
                    entropy_loss = entropy.mean()
                    loss = pg_loss - cfg.ent_coef * entropy_loss + cfg.vf_coef * v_loss
                    check_finite(global_step, loss=loss)
                    optimizer.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                epochs_done += 1
                if cfg.target_kl is not None and float(approx_kl) > cfg.target_kl:
                    break
            check_params_finite(global_step, net)

            # ---- metrics -----------------------------------------------------------------------------------
            y_pred, y_true = b_val.cpu().numpy(), b_ret.cpu().numpy()
            var_y = float(np.var(y_true))
            counts = np.bincount(b_actions.cpu().numpy(), minlength=A) / cfg.batch_size
            logit_sum, logit_sq, logit_n, maxprob_sum = logit_stats.tolist()
            logit_mean = logit_sum / max(logit_n, 1.0)
            elapsed = time.perf_counter() - start_time
            metrics: dict[str, float] = {
                "step": float(global_step), "update": float(update),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "loss/policy": float(pg_loss.detach()), "loss/value": float(v_loss.detach()),
                "loss/entropy": float(entropy_loss.detach()),
                "ppo/approx_kl": float(approx_kl), "ppo/old_approx_kl": float(old_approx_kl),
                "ppo/clip_fraction": float(np.mean(clipfracs)) if clipfracs else 0.0,
                "ppo/explained_variance": float("nan") if var_y == 0 else 1.0 - float(np.var(y_true - y_pred)) / var_y,
                "ppo/epochs": float(epochs_done),
                "logits/valid_mean": logit_mean,
                "logits/valid_std": math.sqrt(max(logit_sq / max(logit_n, 1.0) - logit_mean**2, 0.0)),
                "logits/max_prob": maxprob_sum / cfg.batch_size,
                "rollout/reward_mean": float(rewards_buf.mean()) / cfg.reward_scale,
                "episode/count": float(len(ep_returns)),
                "perf/sps": (global_step - start_step) / elapsed if elapsed > 0 else 0.0,
                **{f"actions/{name}": float(c) for name, c in zip(action_names, counts, strict=True)},
            }
            if ep_returns:
                metrics["episode/return_mean"] = float(np.mean(ep_returns))
                metrics["episode/return_std"] = float(np.std(ep_returns))
            last_update = update == cfg.num_updates
            if val is not None and (_crossed(step_before, global_step, cfg.eval_every) or last_update):
                result = evaluate(greedy_policy(net, device), val, execution, env_params,
                                  max_sessions=cfg.eval_max_sessions or None)
                summary = result.summary()
                metrics.update({f"val/{k}": v for k, v in summary.items()})
                if best_val is None or summary["mean_return"] > best_val["mean_return"]:
                    best_val = {**summary, "step": float(global_step)}
                    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                metrics["val/best_mean_return"] = best_val["mean_return"]
            history.append(metrics)
            if run is not None:
                import mlflow

                mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=global_step,
                                   run_id=run.info.run_id)
            bar.advance(metrics)
            if ckpt_path is not None and (_crossed(step_before, global_step, cfg.checkpoint_every) or last_update):
                checkpoint()
            if stop_after is not None and global_step >= stop_after and not last_update:
                break
    except TrainingError as exc:
        raise TrainingError(f"ppo update {update}: {exc}") from exc
    finally:
        bar.close()

    if val is None:
        best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    elapsed = time.perf_counter() - start_time
    return PPOResult(best_state=best_state, net=net, history=history, best_val=best_val,
                     steps_per_second=(global_step - start_step) / elapsed if elapsed > 0 else 0.0,
                     global_step=global_step, updates=update, completed=update >= cfg.num_updates)


class _ProgressBar:
    """A rich progress bar over updates showing the latest key metrics (a no-op when disabled)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.progress: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
        self.progress.start()
        self.task = self.progress.add_task("ppo", total=total, completed=done, info="")

    def advance(self, m: dict[str, float]) -> None:
        if self.progress is None:
            return
        info = f"sps {m['perf/sps']:.0f} kl {m['ppo/approx_kl']:.4f} ent {m['loss/entropy']:.3f}"
        if "episode/return_mean" in m:
            info += f" ep {m['episode/return_mean']:+.4f}"
        if "val/mean_return" in m:
            info += f" val {m['val/mean_return']:+.4f}"
        self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
