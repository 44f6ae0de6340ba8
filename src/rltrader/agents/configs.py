"""Every agent's typed configuration, one dataclass per ``params.yaml`` section (``d3qn``, ``ppo``, ``cnn``).

The schema lives here and nowhere else: ``rltrader.config`` validates the sections of ``params.yaml`` against
these classes when the settings load (an unknown key or a bad value names it), and the training code builds
them from the same sections. No torch import, so loading the settings stays cheap; the algorithm modules
re-export their config (``rltrader.agents.d3qn.D3QNConfig`` …).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rltrader.errors import ConfigError

ENCODERS = ("cnn", "tcn")
"""Window encoders of ``agents.networks``: ``cnn`` (the D3QN reference design's) and ``tcn`` (dilated causal)."""


@dataclass(frozen=True)
class NetConfig:
    """Window encoder and MLP sizes shared by every agent network (``<algo>.net`` in ``params.yaml``)."""

    encoder: str = "tcn"
    """``cnn`` (two convolutions and pooling) or ``tcn`` (dilated causal convolutions)."""
    channels: int = 64
    hidden: int = 256
    tcn_levels: int = 4
    kernel: int = 3
    dropout: float = 0.0


def config_from_params(cls: type[Any], section: str, values: dict[str, Any] | None) -> Any:
    """A typed dataclass config from a params.yaml section; an unknown key or a wrong type names the key."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"params.yaml: {section}.{key}: unknown key (known: {', '.join(fields)})")
        default = getattr(cls(), key) if all(f.default is not dataclasses.MISSING
                                             or f.default_factory is not dataclasses.MISSING
                                             for f in fields.values()) else None
        if default is not None and not isinstance(default, bool) and isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"params.yaml: {section}.{key}: expected a number, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and float(value) != int(value):
                raise ConfigError(f"params.yaml: {section}.{key}: expected an integer, got {value!r}")
            values[key] = type(default)(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"params.yaml: {section}.{key}: expected true/false, got {value!r}")
        elif isinstance(default, tuple) and isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params.yaml: {section}: {exc}") from exc


def net_config(section: str, value: Any, default: NetConfig) -> NetConfig:
    """``<section>.net``: a ``NetConfig``, or a mapping of its fields over the algorithm's ``default`` net; the
    encoder must be one of ``ENCODERS`` and the sizes positive (errors name ``<section>.net.<key>``)."""
    if isinstance(value, dict):
        value = config_from_params(NetConfig, f"{section}.net", {**dataclasses.asdict(default), **value})
    if not isinstance(value, NetConfig):
        raise ConfigError(f"{section}.net: expected a mapping of NetConfig fields, got {value!r}")
    if value.encoder not in ENCODERS:
        raise ConfigError(f"{section}.net.encoder: unknown encoder {value.encoder!r} (expected one of "
                          f"{', '.join(ENCODERS)})")
    for key in ("channels", "hidden", "tcn_levels", "kernel"):
        if not getattr(value, key) >= 1:
            raise ConfigError(f"{section}.net.{key}: must be ≥ 1 (got {getattr(value, key)!r})")
    if not 0 <= value.dropout < 1:
        raise ConfigError(f"{section}.net.dropout: must be in [0, 1) (got {value.dropout!r})")
    return value


def _default_net() -> NetConfig:
    """The D3QN reference design's network: the CNN encoder, 32 channels, a 128-unit trunk."""
    return NetConfig(encoder="cnn", channels=32, hidden=128)


@dataclass(frozen=True)
class D3QNConfig:
    """``params.yaml: d3qn``. Step counts are env steps summed over the envs."""

    total_steps: int = 2_000_000
    num_envs: int = 64
    lr: float = 2.5e-4
    gamma: float = 0.99
    n_step: int = 3
    batch_size: int = 256
    buffer_size: int = 500_000
    """Transitions kept (rounded to whole vector steps)."""
    learning_starts: int = 10_000
    """Env steps collected before the first gradient update."""
    replay_ratio: float = 4.0
    """Transitions sampled for gradient updates per transition collected: each vector step does
    ``num_envs * replay_ratio / batch_size`` updates (64 envs, ratio 4, batch 256: one update per vector step);
    a fractional count carries over to the next vector step."""
    reward_scale: float = 100.0
    """Rewards are multiplied by this before learning (log returns of a few bps → O(0.1) TD errors); the
    Q-values are in these units. Evaluation always reports unscaled session returns."""
    eps_start: float = 1.0
    eps_end: float = 0.02
    eps_decay_steps: int = 250_000
    """ε falls linearly from ``eps_start`` to ``eps_end`` over this many env steps."""
    tau: float = 1.0
    """1.0: hard target sync every ``target_sync`` updates; < 1: Polyak ``θ' ← (1-τ)θ' + τθ`` every update."""
    target_sync: int = 1_000
    """Updates between hard target syncs (``tau = 1`` only)."""
    grad_clip: float = 10.0
    """Max global gradient norm."""
    per_alpha: float = 0.6
    per_beta_start: float = 0.4
    """IS-weight exponent at step 0, annealed linearly to 1 at ``total_steps``."""
    net: NetConfig = field(default_factory=_default_net)
    """Window encoder and MLP sizes (``params.yaml: d3qn.net`` is a dict of ``NetConfig`` fields)."""
    eval_every: int = 100_000
    """Env steps between greedy evaluations on val (model selection); 0: only at the end."""
    eval_sessions: int = 2_000
    """Val sessions per evaluation (the first ones of the split); 0: all."""
    checkpoint_every: int = 200_000
    """Env steps between checkpoints (``checkpoint_dir`` given); 0: only at the end."""
    log_every: int = 100
    """Vector steps between MLflow metric batches (and the non-finite parameter check)."""
    device: str = "auto"
    compile: bool = False
    """``torch.compile`` the online net (GPU runs; off by default)."""
    seed: int = 0
    threads: int = 0
    """CPU threads for torch (``torch.set_num_threads``); 0 leaves torch's default (the train stage sets
    ``train.threads``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "net", net_config("d3qn", self.net, _default_net()))

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"d3qn.{key}: {why} (got {getattr(self, key)!r})")

        for key in ("total_steps", "num_envs", "n_step", "batch_size", "buffer_size", "target_sync", "log_every"):
            if not getattr(self, key) >= 1:
                raise bad(key, "must be ≥ 1")
        for key in ("learning_starts", "eps_decay_steps", "eval_every", "eval_sessions", "checkpoint_every", "threads"):
            if not getattr(self, key) >= 0:
                raise bad(key, "must be ≥ 0")
        for key in ("lr", "replay_ratio", "reward_scale", "grad_clip"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise bad(key, "must be a finite number > 0")
        if not 0 < self.gamma <= 1:
            raise bad("gamma", "must be in (0, 1]")
        if not 0 < self.tau <= 1:
            raise bad("tau", "must be in (0, 1] (1 = hard sync every target_sync updates)")
        if not 0 <= self.eps_start <= 1:
            raise bad("eps_start", "must be in [0, 1]")
        if not 0 <= self.eps_end <= self.eps_start:
            raise bad("eps_end", "must be in [0, eps_start]")
        if not self.per_alpha >= 0:
            raise bad("per_alpha", "must be ≥ 0 (0 = uniform replay)")
        if not 0 <= self.per_beta_start <= 1:
            raise bad("per_beta_start", "must be in [0, 1]")
        if self.buffer_size < self.batch_size:
            raise bad("buffer_size", f"must be ≥ batch_size ({self.batch_size})")
    @classmethod
    def from_params(cls, values: dict[str, Any] | None) -> D3QNConfig:
        """From ``params.yaml``'s ``d3qn:`` section (unknown keys and wrong types name the key)."""
        cfg: D3QNConfig = config_from_params(cls, "d3qn", values)
        return cfg

    @property
    def updates_per_vector_step(self) -> float:
        return self.num_envs * self.replay_ratio / self.batch_size

    def epsilon(self, step: int) -> float:
        frac = min(1.0, step / self.eps_decay_steps) if self.eps_decay_steps > 0 else 1.0
        return (1.0 - frac) * self.eps_start + frac * self.eps_end

    def beta(self, step: int) -> float:
        frac = min(1.0, step / self.total_steps)
        return (1.0 - frac) * self.per_beta_start + frac



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

        object.__setattr__(self, "net", net_config("ppo", self.net, NetConfig()))
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



@dataclass(frozen=True)
class CNNConfig:
    """``params.yaml: cnn``: the supervised direction classifier (``agents.cnn_classifier``)."""

    epochs: int = 2
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    threshold: float = 0.55
    """Trade only when the predicted probability of the direction is at least this."""
    max_samples: int = 300_000
    """Train decisions used per epoch at most (a random subset when the split has more)."""
    net: NetConfig = field(default_factory=lambda: NetConfig(encoder="cnn"))
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "net", net_config("cnn", self.net, NetConfig(encoder="cnn")))
        if self.epochs < 1 or self.batch_size < 1 or self.max_samples < 1:
            raise ConfigError("cnn.epochs, cnn.batch_size, cnn.max_samples: must be ≥ 1")
        if not self.lr > 0:
            raise ConfigError(f"cnn.lr: must be > 0 (got {self.lr})")
        if not 0.5 <= self.threshold < 1:
            raise ConfigError(f"cnn.threshold: must be in [0.5, 1) (got {self.threshold})")


@dataclass(frozen=True)
class XGBConfig:
    """``params.yaml: xgb``: the study's XGBoost forecaster as a threshold policy (``agents.forecast_policy``)."""

    horizons: list[int] = field(default_factory=lambda: [15, 60, 240])
    """Forward horizons (bars) fitted; the one traded is chosen on ``select_split``."""
    thresholds: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Trade when |forecast| > k × round-trip cost, for each k; chosen on ``select_split``."""
    min_trades: int = 30
    """A (horizon, k) with fewer trades on ``select_split`` is not chosen."""
    train_split: str = "train"
    select_split: str = "val"
    train_stride: int = 20
    """Fit on every k-th train bar (the study's default: overlapping targets carry little extra information)."""
    eval_stride: int = 1
    vol_window: int = 60
    """Targets are forward returns / (trailing volatility × √h); σ is the feature ``rv_<vol_window>``."""
    target_clip: float = 5.0
    rounds: int = 100
    depth: int = 4
    eta: float = 0.05
    threads: int = 1
    device: str = "auto"
    """Unused (CPU trees); accepted because ``train.device`` fills every algorithm's section."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.horizons or any(h < 1 for h in self.horizons):
            raise ConfigError(f"xgb.horizons: need at least one horizon ≥ 1 bar (got {list(self.horizons)})")
        if not self.thresholds or any(not k >= 0 for k in self.thresholds):
            raise ConfigError(f"xgb.thresholds: need k ≥ 0 (got {list(self.thresholds)})")
        if self.select_split == self.train_split:
            raise ConfigError("xgb.select_split: must differ from xgb.train_split (k is chosen out of sample)")
        if min(self.min_trades, self.train_stride, self.eval_stride, self.rounds, self.depth, self.threads) < 1:
            raise ConfigError("xgb.min_trades, train_stride, eval_stride, rounds, depth, threads: must be ≥ 1")
        if self.vol_window < 2 or not self.eta > 0 or not self.target_clip > 0:
            raise ConfigError("xgb.vol_window ≥ 2, xgb.eta > 0, xgb.target_clip > 0")


CONFIGS: dict[str, type[Any]] = {"d3qn": D3QNConfig, "ppo": PPOConfig, "cnn": CNNConfig, "xgb": XGBConfig}
"""The config class of each algorithm, by its ``params.yaml`` section name."""
