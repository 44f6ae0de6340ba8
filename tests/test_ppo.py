"""PPO (seed 000): it learns what is learnable, resumes bit-identically, stops on NaN, validates its config and
never samples a masked action. CPU only, small networks, single torch thread (fast and reproducible)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrader.agents import ppo
from rltrader.agents.common import TrainingError
from rltrader.agents.configs import config_from_params
from rltrader.agents.evaluate import evaluate
from rltrader.agents.networks import ActorCritic, NetConfig
from rltrader.agents.ppo import (
    PPOConfig,
    action_probabilities,
    greedy_policy,
    masked_distribution,
    sample_actions,
    train_ppo,
)
from rltrader.dataset.split import SessionSet
from rltrader.env.modes import EnvParams
from rltrader.env.synthetic import synthetic_sessions
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams

SMALL_NET = {"channels": 16, "hidden": 64, "tcn_levels": 2}
LEARN = {"num_envs": 32, "rollout_steps": 32, "lr": 1e-3, "update_epochs": 4, "minibatches": 4, "device": "cpu",
         "threads": 1, "net": SMALL_NET}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def random_policy(seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)

    def policy(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = mask / mask.sum(axis=1, keepdims=True)
        return np.asarray((p.cumsum(axis=1) > rng.random(len(mask))[:, None]).argmax(axis=1))

    return policy


# --- (1) planted leak ---------------------------------------------------------------------------------------------


def leak_oracle(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The leak column (last feature) of the newest window row is the scaled log return of the bar the order
    fills in (``env.core.leak_column``): be long for a rising bar, short for a falling one (hold if already)."""
    want = np.where(windows[:, -1, -1] > 0, 1, 2)
    return np.where(mask[np.arange(len(mask)), want], want, 0)


@pytest.mark.slow
def test_learns_planted_leak() -> None:
    train = synthetic_sessions(n_symbols=4, bars_per_symbol=600, n_features=3, context=16, length=10, seed=1)
    val = synthetic_sessions(n_symbols=2, bars_per_symbol=600, n_features=3, context=16, length=10, seed=2)
    # Low costs (1 bp taker fee, no spread or impact) so that trading on the leak is clearly profitable: the
    # oracle flips often and full Binance costs would eat most of the ±0.2 % moves.
    execution = ExecutionParams(taker_fee=0.0001, half_spread_bps=0.0, impact=0.0)
    env_params = EnvParams(leak=True)
    oracle = evaluate(leak_oracle, val, execution, env_params).mean_return
    rand = evaluate(random_policy(), val, execution, env_params).mean_return
    assert oracle > 0.005  # ~1.5 % per 10-bar session

    cfg = PPOConfig(total_steps=8192, eval_every=2048, **LEARN)  # type: ignore[arg-type]
    result = train_ppo(train, val, cfg, execution, env_params, progress=False)
    assert result.best_val is not None
    net = copy.deepcopy(result.net)
    net.load_state_dict(result.best_state)
    learned = evaluate(greedy_policy(net), val, execution, env_params).mean_return
    assert learned == pytest.approx(result.best_val["mean_return"])
    print(f"leak: oracle {oracle:.4f} ppo {learned:.4f} random {rand:.4f} sps {result.steps_per_second:.0f}")
    assert learned >= 0.9 * oracle
    assert rand < 0.2 * oracle


# --- (2) a deterministic zig-zag ----------------------------------------------------------------------------------


def zigzag_sessions(n_bars: int, step: float = 0.004, context: int = 8, length: int = 12, gap: int = 1,
                    phase: int = 0, seed: int = 0) -> SessionSet:
    """Prices go up, up, down, down, … by ``step`` (log) per bar. Feature 0 is each bar's direction (±1), two
    more are noise. The next bar's direction is minus the direction two bars back: the optimal policy is
    long before a rising bar and short before a falling one, which the window reveals exactly."""
    rng = np.random.default_rng(seed)
    direction = np.tile([1.0, 1.0, -1.0, -1.0], n_bars // 4 + 2)[phase:phase + n_bars]
    close = 100.0 * np.exp(np.cumsum(step * direction))
    open_ = np.concatenate([[100.0], close[:-1]])
    features = np.column_stack([direction, rng.normal(size=(n_bars, 2))]).astype(np.float32)
    start = np.arange(context, n_bars - length + 1, length + gap, dtype=np.int64)
    return SessionSet(features=features, open=open_, high=np.maximum(open_, close) * 1.0005,
                      low=np.minimum(open_, close) * 0.9995, close=close, volume=np.full(n_bars, 1e6),
                      time=np.arange(n_bars, dtype=np.int64) * 60_000_000, symbol_id=np.zeros(n_bars, np.int16),
                      ctx_start=start - context, start=start, end=start + length, symbols=("ZIGUSDT",),
                      feature_names=("direction", "noise0", "noise1"), context=context, length=length)


def zigzag_optimal(windows: np.ndarray, state: np.ndarray, mask: np.ndarray) -> np.ndarray:
    want = np.where(windows[:, -2, 0] < 0, 1, 2)  # next direction = -(direction two bars back)
    return np.where(mask[np.arange(len(mask)), want], want, 0)


@pytest.mark.slow
def test_beats_random_on_zigzag() -> None:
    train = zigzag_sessions(1200, seed=0)
    val = zigzag_sessions(600, phase=1, gap=2, seed=1)
    execution = ExecutionParams()  # full default (Binance futures) costs
    env_params = EnvParams()
    optimal = evaluate(zigzag_optimal, val, execution, env_params).mean_return
    rand = evaluate(random_policy(), val, execution, env_params).mean_return
    cfg = PPOConfig(total_steps=24576, eval_every=4096, **LEARN)  # type: ignore[arg-type]
    result = train_ppo(train, val, cfg, execution, env_params, progress=False)
    assert result.best_val is not None
    learned = result.best_val["mean_return"]
    print(f"zigzag: optimal {optimal:.4f} ppo {learned:.4f} random {rand:.4f}")
    assert optimal > 0.02 and rand < 0
    assert learned > rand + 0.5 * (optimal - rand)


# --- (3) resume ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path: Path) -> None:
    train = synthetic_sessions(n_symbols=2, bars_per_symbol=300, n_features=3, context=12, length=8, seed=3)
    val = synthetic_sessions(n_symbols=1, bars_per_symbol=300, n_features=3, context=12, length=8, seed=4)
    execution, env_params = ExecutionParams(), EnvParams()
    # 8 updates of 8 envs × 16 steps = 128 env steps; checkpoints every 2 updates, evaluation every 3
    cfg = PPOConfig(total_steps=1024, num_envs=8, rollout_steps=16, minibatches=2, update_epochs=2,
                    checkpoint_every=256, eval_every=384, net=NetConfig(channels=8, hidden=32, tcn_levels=2),
                    device="cpu", threads=1, seed=7)
    whole = train_ppo(train, val, cfg, execution, env_params, progress=False, checkpoint_dir=tmp_path / "a")
    # "killed" after update 5: the checkpoint is from update 4, update 5's work is lost and redone on resume
    part = train_ppo(train, val, cfg, execution, env_params, progress=False, checkpoint_dir=tmp_path / "b",
                     stop_after=640)
    assert not part.completed and part.global_step == 640
    resumed = train_ppo(train, val, cfg, execution, env_params, progress=False, checkpoint_dir=tmp_path / "b",
                        resume=True)
    assert resumed.completed and resumed.global_step == whole.global_step == 1024
    for (k, a), (k2, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    for k, a in whole.best_state.items():
        assert torch.equal(a, resumed.best_state[k]), k
    assert whole.best_val == resumed.best_val

    assert len(whole.history) == len(resumed.history) == 8
    for m1, m2 in zip(whole.history, resumed.history, strict=True):
        assert m1.keys() == m2.keys()
        for k in m1.keys() - {"perf/sps", "perf/cpu_s"}:  # timings differ run to run
            assert m1[k] == m2[k] or (np.isnan(m1[k]) and np.isnan(m2[k])), k


def test_same_seed_gives_the_same_weights() -> None:
    """Two runs with one seed end with identical weights and metrics (CPU, one thread); another seed does not."""
    train = synthetic_sessions(n_symbols=2, bars_per_symbol=300, n_features=3, context=12, length=8, seed=3)
    cfg = PPOConfig(total_steps=384, num_envs=8, rollout_steps=16, minibatches=2, update_epochs=2,
                    net=NetConfig(channels=8, hidden=32, tcn_levels=2), device="cpu", threads=1, seed=7)
    a, b = (train_ppo(train, None, cfg, ExecutionParams(), EnvParams(), progress=False) for _ in range(2))
    c = train_ppo(train, None, dataclasses.replace(cfg, seed=8), ExecutionParams(), EnvParams(),
                  progress=False)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [m["loss/policy"] for m in a.history] == [m["loss/policy"] for m in b.history]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --- (4) NaN / inf ------------------------------------------------------------------------------------------------


def _tiny_cfg(**kw: Any) -> PPOConfig:
    base: dict[str, Any] = {"total_steps": 512, "num_envs": 8, "rollout_steps": 16, "minibatches": 2,
                            "update_epochs": 1, "net": NetConfig(channels=8, hidden=16, tcn_levels=1),
                            "device": "cpu", "threads": 1}
    return PPOConfig(**{**base, **kw})


def test_nan_features_stop_with_the_step() -> None:
    data = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=12, length=8)
    data.features[:] = np.nan
    with pytest.raises(TrainingError, match=r"update 1: non-finite logits at step 0"):
        train_ppo(data, None, _tiny_cfg(), ExecutionParams(), EnvParams(), progress=False)


def test_nan_loss_stops_with_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    class Poisoned(ActorCritic):
        """The value head turns NaN in the second update (2 minibatch passes per update in train mode)."""

        calls = 0

        def forward(self, windows: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, value = super().forward(windows, state)
            if self.training:
                Poisoned.calls += 1
                if Poisoned.calls > 2:
                    value = value * float("nan")
            return logits, value

    monkeypatch.setattr(ppo, "ActorCritic", Poisoned)
    data = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=12, length=8)
    with pytest.raises(TrainingError, match=r"update 2: non-finite loss at step 256"):
        train_ppo(data, None, _tiny_cfg(), ExecutionParams(), EnvParams(), progress=False)


# --- (5) config errors name the key -------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "key"), [
    ({"clip_coef": 0}, "ppo.clip_coef"),
    ({"clip_coef": -0.1}, "ppo.clip_coef"),
    ({"minibatches": 3}, "ppo.minibatches"),
    ({"net": {"encoder": "lstm"}}, "ppo.net.encoder"),
    ({"net": {"chanels": 8}}, "ppo.net.chanels"),
    ({"net": {"channels": 0}}, "ppo.net.channels"),
    ({"net": "tcn"}, "ppo.net"),
    ({"bogus": 1}, "ppo.bogus"),
    ({"lr": "fast"}, "ppo.lr"),
    ({"num_envs": 0}, "ppo.num_envs"),
    ({"gamma": 1.5}, "ppo.gamma"),
    ({"target_kl": -1.0}, "ppo.target_kl"),
    ({"target_kl": "small"}, "ppo.target_kl"),
    ({"device": "tpu"}, "ppo.device"),
    ({"total_steps": 100}, "ppo.total_steps"),
    ({"clip_vloss": "yes"}, "ppo.clip_vloss"),
])
def test_config_errors_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_params(PPOConfig, "ppo", values)


def test_config_from_params_with_nested_net() -> None:
    cfg = PPOConfig.from_params({"total_steps": 2e5, "num_envs": 16, "net": {"encoder": "cnn", "channels": 8},
                                 "target_kl": 0.02})
    assert cfg.total_steps == 200_000 and isinstance(cfg.total_steps, int)
    assert cfg.net == NetConfig(encoder="cnn", channels=8) and cfg.target_kl == 0.02
    assert PPOConfig().net.encoder == "tcn"


def test_mask_shape_mismatch_is_a_config_error() -> None:
    net = ActorCritic(3, 12, 8, 3, NetConfig(channels=8, hidden=16, tcn_levels=1))
    windows, state = np.zeros((2, 12, 3), np.float32), np.zeros((2, 8), np.float32)
    with pytest.raises(ConfigError, match="action mask"):
        greedy_policy(net)(windows, state, np.ones((2, 4), bool))
    with pytest.raises(ConfigError, match="action mask"):
        action_probabilities(net, windows, state, np.ones((2, 4), bool))


def test_resume_with_another_mode_is_a_config_error(tmp_path: Path) -> None:
    data = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=12, length=8)
    train_ppo(data, None, _tiny_cfg(total_steps=128), ExecutionParams(), EnvParams(), progress=False,
              checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="checkpoint"):
        train_ppo(data, None, _tiny_cfg(total_steps=128), ExecutionParams(market="spot"),
                  EnvParams(mode="spot_cycle"), progress=False, checkpoint_dir=tmp_path, resume=True)


# --- (6) masks ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_actions=st.integers(2, 6), scale=st.sampled_from([1.0, 10.0, 1e4]))
def test_masked_actions_are_never_sampled(seed: int, n_actions: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((256, n_actions)) < 0.5
    mask[np.arange(256), rng.integers(n_actions, size=256)] = True  # at least one valid action per row
    logits = torch.from_numpy(rng.normal(size=(256, n_actions)) * scale).float()
    logits[torch.from_numpy(~mask)] += 1e6  # masked actions would dominate without the mask
    m = torch.from_numpy(mask)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        actions, logp = sample_actions(logits, m, gen)
        assert m[torch.arange(256), actions].all()
        assert torch.isfinite(logp).all()
    logp_all, entropy = masked_distribution(logits, m)
    probs = logp_all.exp()
    assert (probs[~m] == 0).all() and torch.allclose(probs.sum(1), torch.ones(256))
    assert torch.isfinite(entropy).all() and (entropy >= -1e-6).all()
    assert (entropy <= torch.log(m.sum(1).float()) + 1e-5).all()  # entropy over the valid actions only


def test_policies_respect_env_masks() -> None:
    data = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=12, length=8)
    net = ActorCritic(3, 12, 8, 4, NetConfig(channels=8, hidden=16, tcn_levels=1))
    with torch.no_grad():
        net.policy.bias[:] = torch.tensor([0.0, 50.0, 40.0, 30.0])  # strongly prefers long, then short, close
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(64, 12, 3)).astype(np.float32)
    state = np.zeros((64, 8), np.float32)
    mask = rng.random((64, 4)) < 0.5
    mask[:, 0] = True
    probs = action_probabilities(net, windows, state, mask)
    assert (probs[~mask] == 0).all() and np.allclose(probs.sum(1), 1)
    actions = greedy_policy(net)(windows, state, mask)
    assert mask[np.arange(64), actions].all()
    result = evaluate(greedy_policy(net), data, ExecutionParams(), EnvParams())
    assert result.action_counts[1] > 0 and result.action_counts.sum() > 0


@pytest.mark.slow
def test_logs_to_mlflow(tmp_path: Path) -> None:
    from rltrader.agents.common import mlflow_run

    data = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=12, length=8)
    with mlflow_run(f"sqlite:///{tmp_path}/mlflow.db", "ppo-test", "tiny", artifact_root=tmp_path / "art") as run:
        result = train_ppo(data, data, _tiny_cfg(total_steps=256, eval_every=128), ExecutionParams(), EnvParams(),
                           run=run, progress=True)
    import mlflow

    history = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        run.info.run_id, "ppo/approx_kl")
    assert [m.step for m in history] == [128, 256] and len(result.history) == 2
    assert {"loss/policy", "actions/long", "logits/max_prob", "val/mean_return", "perf/sps"} <= set(
        result.history[-1])
    assert mlflow is not None
