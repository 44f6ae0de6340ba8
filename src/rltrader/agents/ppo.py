"""PPO with a TCN encoder over the batch session env (the PPO reference design), written to read like CleanRL's ppo.py.

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

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
    pick_device,
    save_checkpoint,
    seed_everything,
    set_threads,
)
from rltrader.agents.configs import PPOConfig as PPOConfig  # re-exported
from rltrader.agents.evaluate import Policy, evaluate
from rltrader.agents.networks import ActorCritic, masked_logits
from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams

CHECKPOINT_NAME = "ppo.pt"


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
    return masked_greedy_policy(net, lambda w, s: net(w, s)[0], lambda mask: check_mask(mask, n_actions), dev)


# --- checkpoints --------------------------------------------------------------------------------------------------


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
    set_threads(cfg.threads)
    np_rng = seed_everything(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    env = BatchSessionEnv(train, execution, env_params, num_envs=cfg.num_envs, windows=False)  # rows: ObsGather
    gather = ObsGather(env, device)
    n_features, context, n_state = env.core.features.shape[1], train.context, env.core.state.shape[1]
    net = ActorCritic(n_features, context, n_state, env.n_actions, cfg.net).to(device)
    model: nn.Module = torch.compile(net) if cfg.compile else net  # type: ignore[assignment]
    optimizer = make_adam(net.parameters(), cfg.lr, device)
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

    bar = TrainingProgress("ppo", cfg.num_updates, update, enabled=progress)
    start_time, start_step, start_cpu = time.perf_counter(), global_step, time.process_time()
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
                    nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm, foreach=True)
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
                "perf/cpu_s": time.process_time() - start_cpu,  # this call's CPU seconds: blind to other load
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
            bar.update(advance=1, info=_progress_info(metrics))
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


def _progress_info(m: dict[str, float]) -> str:
    """The progress bar's line: speed, KL, entropy, and the latest episode and val returns."""
    info = f"sps {m['perf/sps']:.0f} kl {m['ppo/approx_kl']:.4f} ent {m['loss/entropy']:.3f}"
    if "episode/return_mean" in m:
        info += f" ep {m['episode/return_mean']:+.4f}"
    if "val/mean_return" in m:
        info += f" val {m['val/mean_return']:+.4f}"
    return info
