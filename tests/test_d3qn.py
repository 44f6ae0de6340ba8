"""D3QN: learns a planted leak and a predictable price process, resumes bit-exactly, stops on NaN, names bad
config keys, and never picks a masked action.

The learning tests run on CPU in seconds: small CNN (16 channels, 64 hidden), 32 envs, ~10k env steps. Torch is
pinned to one intra-op thread here: for nets this small two OpenMP threads on a shared 2-core box are up to
~100× slower (spin-waiting), which says nothing about D3QN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rltrader.agents import d3qn
from rltrader.agents.common import ObsGather, TrainingError
from rltrader.agents.d3qn import (
    D3QNConfig,
    build_q_net,
    double_q_target,
    greedy_policy,
    q_values,
    random_valid_actions,
    select_actions,
    sync_target,
    train_d3qn,
)
from rltrader.agents.evaluate import Policy, evaluate
from rltrader.agents.networks import DuelingQNet, NetConfig
from rltrader.dataset.split import SessionSet
from rltrader.env.batch import BatchSessionEnv
from rltrader.env.core import leak_column
from rltrader.env.modes import EnvParams
from rltrader.env.synthetic import synthetic_sessions
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams

SMALL_NET = NetConfig(encoder="cnn", channels=16, hidden=64)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fast_config(steps: int, **kw: Any) -> D3QNConfig:
    base: dict[str, Any] = {
        "total_steps": steps, "num_envs": 32, "batch_size": 128, "buffer_size": 50_000, "learning_starts": 1_000,
        "replay_ratio": 4.0, "lr": 1e-3, "gamma": 0.9, "n_step": 3, "eps_decay_steps": steps // 2,
        "target_sync": 100, "net": SMALL_NET, "eval_every": 0, "checkpoint_every": 0, "log_every": 20,
    }
    return D3QNConfig(**{**base, **kw})


def masked_choice(want: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``want`` where the mask allows it, else hold (already in that position)."""
    return np.where(mask[np.arange(len(mask)), want], want, 0)


def random_policy(seed: int) -> Policy:
    rng = np.random.default_rng(seed)
    return lambda w, s, m: random_valid_actions(m, rng)


def zigzag_sessions(n_symbols: int = 4, bars: int = 400, half: int = 4, step: float = 0.002, context: int = 16,
                    length: int = 10, gap: int = 3, phase: int = 0, seed: int = 0) -> SessionSet:
    """Prices moving ``half`` bars up by ``step`` (log), then ``half`` bars down, forever (symbol s shifted by s
    bars). Feature 0 is the bar's log return / step (±1), feature 1 noise. Bar t's return is minus bar t-half's,
    so the optimal policy is long when the window's row -half (bar t-half; the newest row is bar t-1) fell."""
    rng = np.random.default_rng(seed)
    n = n_symbols * bars
    lr = np.concatenate([np.where((np.arange(bars) + s + phase) // half % 2 == 0, step, -step)
                         for s in range(n_symbols)])
    close = np.concatenate([100.0 * np.exp(np.cumsum(lr[s * bars:(s + 1) * bars])) for s in range(n_symbols)])
    open_ = close * np.exp(-lr)
    features = np.stack([lr / step, rng.normal(size=n)], axis=1).astype(np.float32)
    starts = np.asarray([s * bars + t for s in range(n_symbols) for t in range(context, bars - length + 1,
                                                                               length + gap)], np.int64)
    return SessionSet(features=features, open=open_, high=np.maximum(open_, close) * 1.0005,
                      low=np.minimum(open_, close) * 0.9995, close=close, volume=np.full(n, 5_000.0),
                      time=np.tile(np.arange(bars, dtype=np.int64) * 60_000_000, n_symbols),
                      symbol_id=np.repeat(np.arange(n_symbols, dtype=np.int16), bars), ctx_start=starts - context,
                      start=starts, end=starts + length, symbols=tuple(f"Z{i}USDT" for i in range(n_symbols)),
                      feature_names=("ret", "noise"), context=context, length=length)


# --- learning ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_the_planted_leak() -> None:
    """The leak feature (last column; its newest row = scaled log return of the very bar the order fills in,
    ``env.core.leak_column``) makes "long if it is > 0 else short" optimal. Costs are cut to a 1 bp taker fee
    and no spread/impact so the oracle's return is clearly positive (with Binance costs a flip every bar eats
    most of a 0.2 %-volatility bar); D3QN must reach 90 % of it on the train sessions."""
    data = synthetic_sessions(n_symbols=3, bars_per_symbol=400, n_features=4, context=16, length=10, seed=0)
    xp = ExecutionParams(taker_fee=0.0001, half_spread_bps=0.0, impact=0.0)
    ep = EnvParams(leak=True)
    leak = leak_column(data, xp.latency_bars, ep.leak_scale)
    assert np.isclose(leak[data.start[0] - 1], ep.leak_scale * np.log(data.close[data.start[0]]
                                                                       / data.open[data.start[0]]))

    def oracle(w: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
        return masked_choice(np.where(w[:, -1, -1] > 0, 1, 2), m)

    oracle_ret = evaluate(oracle, data, xp, ep).mean_return
    random_ret = evaluate(random_policy(0), data, xp, ep).mean_return
    assert oracle_ret > 0.01 > random_ret

    res = train_d3qn(data, None, fast_config(10_000), xp, ep, progress=False)
    agent_ret = evaluate(greedy_policy(build_q_net(res.spec, res.final_state)), data, xp, ep).mean_return
    assert agent_ret >= 0.9 * oracle_ret, (agent_ret, oracle_ret, random_ret)
    assert res.steps == 10_016 and res.updates > 200 and res.steps_per_second > 0
    last = res.history[-1]
    assert {"loss", "td_abs", "q_mean", "epsilon", "beta", "action_long", "episode_pnl", "sps"} <= set(last)


@pytest.mark.slow
def test_beats_random_on_a_zigzag_market() -> None:
    """Square-wave prices (4 bars up, 4 down) under the default Binance cost model: the optimal policy reads
    the window (long when its row -4 fell) and flips every 4 bars; random trading loses the fees. D3QN, selected
    on a val set with other phases, must close most of the gap between random and optimal."""
    train, val = zigzag_sessions(phase=0), zigzag_sessions(phase=2, seed=1)
    xp, ep = ExecutionParams(), EnvParams()

    def optimal(w: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
        return masked_choice(np.where(w[:, -4, 0] < 0, 1, 2), m)

    best = evaluate(optimal, val, xp, ep).mean_return
    rand = evaluate(random_policy(1), val, xp, ep).mean_return
    assert best > 0.01 and rand < -0.003

    res = train_d3qn(train, val, fast_config(9_600, eval_every=3_200), xp, ep, progress=False)
    agent = evaluate(greedy_policy(build_q_net(res.spec, res.best_state)), val, xp, ep).mean_return
    assert agent == pytest.approx(res.best_val["mean_return"])
    assert agent > rand + 0.8 * (best - rand), (agent, best, rand)
    assert [h["step"] for h in res.history if "val/mean_return" in h] == [3_200.0, 6_400.0, 9_600.0]


# --- resume -----------------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def _tiny() -> tuple[SessionSet, SessionSet, D3QNConfig]:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=200, n_features=3, context=8, length=6, seed=3)
    val = synthetic_sessions(n_symbols=1, bars_per_symbol=200, n_features=3, context=8, length=6, seed=4)
    cfg = D3QNConfig(total_steps=16 * 60, num_envs=16, batch_size=32, buffer_size=4_000, learning_starts=160,
                     replay_ratio=3.0, lr=1e-3, eps_decay_steps=600, target_sync=7, n_step=2,
                     net=NetConfig(encoder="cnn", channels=8, hidden=16), eval_every=256, checkpoint_every=320,
                     log_every=5, seed=11)
    return data, val, cfg


def test_same_seed_gives_the_same_weights() -> None:
    """Two runs with one seed end with identical weights and learning curves (CPU, one thread); another seed
    does not (the check can fail)."""
    data, _, cfg = _tiny()
    cfg = dataclasses.replace(cfg, total_steps=16 * 30, eval_every=0, checkpoint_every=0)
    xp, ep = ExecutionParams(), EnvParams()
    a, b = (train_d3qn(data, None, cfg, xp, ep, progress=False) for _ in range(2))
    c = train_d3qn(data, None, dataclasses.replace(cfg, seed=cfg.seed + 1), xp, ep, progress=False)
    assert a.updates == b.updates > 0
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    assert [r.get("loss") for r in a.history] == [r.get("loss") for r in b.history]
    assert not all(torch.equal(a.final_state[k], c.final_state[k]) for k in a.final_state)


@pytest.mark.slow
def test_resume_after_a_kill_ends_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, val, cfg = _tiny()
    xp, ep = ExecutionParams(), EnvParams()
    whole = train_d3qn(data, val, cfg, xp, ep, checkpoint_dir=tmp_path / "a", progress=False)

    real_save = d3qn.save_checkpoint
    saved: list[int] = []

    def save_then_die(path: Path, payload: dict[str, Any]) -> None:
        real_save(path, payload)
        saved.append(payload["counters"].step)
        raise _Killed

    monkeypatch.setattr(d3qn, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_d3qn(data, val, cfg, xp, ep, checkpoint_dir=tmp_path / "b", progress=False)
    assert saved == [320]
    monkeypatch.setattr(d3qn, "save_checkpoint", real_save)
    resumed = train_d3qn(data, val, cfg, xp, ep, checkpoint_dir=tmp_path / "b", resume=True, progress=False)

    assert resumed.steps == whole.steps and resumed.updates == whole.updates
    for name in ("final_state", "best_state"):
        a, b = getattr(whole, name), getattr(resumed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ca = d3qn.load_checkpoint(tmp_path / "a" / d3qn.CHECKPOINT_NAME)
    cb = d3qn.load_checkpoint(tmp_path / "b" / d3qn.CHECKPOINT_NAME)
    assert all(torch.equal(ca["target"][k], cb["target"][k]) for k in ca["target"])
    assert np.array_equal(ca["replay"]["tree"], cb["replay"]["tree"])
    assert resumed.best_val == whole.best_val and resumed.best_step == whole.best_step

    def learning(h: list[dict[str, float]]) -> list[tuple[float, ...]]:
        return [(r["step"], r.get("loss", 0.0), r.get("val/mean_return", 0.0)) for r in h]

    assert learning(resumed.history) == learning(whole.history)
    # a finished run resumed again does nothing more
    again = train_d3qn(data, val, cfg, xp, ep, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert all(torch.equal(again.final_state[k], whole.final_state[k]) for k in whole.final_state)


def test_resume_refuses_a_checkpoint_of_another_mode(tmp_path: Path) -> None:
    data, _, cfg = _tiny()
    cfg = D3QNConfig(**{**cfg.__dict__, "total_steps": 160, "eval_every": 0})
    train_d3qn(data, None, cfg, ExecutionParams(), EnvParams(), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="has 4 actions"):
        train_d3qn(data, None, cfg, ExecutionParams(market="spot"), EnvParams(mode="spot_cycle"),
                   checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_metrics_go_to_mlflow_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    calls: list[tuple[dict[str, float], int]] = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda m, step=None: calls.append((dict(m), int(step or 0))))
    data, val, cfg = _tiny()
    train_d3qn(data, val, cfg, ExecutionParams(), EnvParams(), run=object(), progress=True)
    keys = set().union(*(m for m, _ in calls))
    assert {"loss", "td_abs", "q_mean", "epsilon", "beta", "action_hold", "action_long", "action_short",
            "action_close", "episode_pnl", "sps", "val/mean_return", "val/win_rate", "val/session_sharpe",
            "sps_total"} <= keys
    steps = [s for _, s in calls]
    assert steps == sorted(steps) and len(calls) < 60  # batched, not one call per update


# --- failures ---------------------------------------------------------------------------------------------------


def test_exploding_learning_rate_stops_with_the_step() -> None:
    data, _, cfg = _tiny()
    cfg = D3QNConfig(**{**cfg.__dict__, "lr": 1e10, "eval_every": 0, "checkpoint_every": 0})
    with pytest.raises(TrainingError, match=r"non-finite .* at step \d+"):
        train_d3qn(data, None, cfg, ExecutionParams(), EnvParams(), progress=False)


def test_nan_feature_stops_with_the_step() -> None:
    data, _, cfg = _tiny()
    data.features[:, 1] = np.nan
    with pytest.raises(TrainingError, match=r"non-finite q_values at step 0"):
        train_d3qn(data, None, cfg, ExecutionParams(), EnvParams(), progress=False)


@pytest.mark.parametrize(("values", "key"), [
    ({"lr": -1e-3}, "d3qn.lr"), ({"n_step": 0}, "d3qn.n_step"), ({"gamma": 1.5}, "d3qn.gamma"),
    ({"tau": 0.0}, "d3qn.tau"), ({"eps_end": 0.5, "eps_start": 0.1}, "d3qn.eps_end"),
    ({"net": {"encoder": "lstm"}}, "d3qn.net.encoder"), ({"net": {"hiden": 3}}, "d3qn.net.hiden"),
    ({"net": {"channels": 0}}, "d3qn.net.channels"), ({"batch_size": "big"}, "d3qn.batch_size"),
    ({"learning_rate": 1e-3}, "d3qn.learning_rate"), ({"buffer_size": 10}, "d3qn.buffer_size"),
])
def test_bad_config_names_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        D3QNConfig.from_params(values)


def test_config_from_params_yaml_section() -> None:
    cfg = D3QNConfig.from_params({"lr": 1e-4, "num_envs": 8, "net": {"channels": 8}, "tau": 0.01})
    assert cfg.net == NetConfig(encoder="cnn", channels=8, hidden=128) and cfg.num_envs == 8 and cfg.tau == 0.01
    assert D3QNConfig(num_envs=64, replay_ratio=4, batch_size=256).updates_per_vector_step == 1.0
    assert D3QNConfig().epsilon(0) == 1.0 and D3QNConfig().epsilon(10**9) == D3QNConfig().eps_end
    assert D3QNConfig(total_steps=100).beta(100) == 1.0


def test_mask_width_must_match_the_net() -> None:
    net = build_q_net({"n_features": 3, "context": 8, "n_state": 8, "n_actions": 4, "net": SMALL_NET.__dict__})
    with pytest.raises(ConfigError, match="3 actions but the Q-network outputs 4"):
        q_values(net, np.zeros((2, 8, 3), np.float32), np.zeros((2, 8), np.float32), np.ones((2, 3), bool))


# --- masking ----------------------------------------------------------------------------------------------------

_NET = build_q_net({"n_features": 3, "context": 8, "n_state": 8, "n_actions": 4, "net": SMALL_NET.__dict__})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 40), eps=st.sampled_from([0.0, 0.3, 1.0]))
def test_actions_are_always_valid(seed: int, batch: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, 4)) < 0.4
    mask[:, 0] = True  # hold is always valid in every mode
    w = torch.from_numpy(rng.normal(size=(batch, 8, 3)).astype(np.float32) * 5)
    s = torch.from_numpy(rng.normal(size=(batch, 8)).astype(np.float32))
    greedy = greedy_policy(_NET)(w.numpy(), s.numpy(), mask)
    assert mask[np.arange(batch), greedy].all()
    actions, q = select_actions(_NET, w, s, mask, eps, rng)
    assert mask[np.arange(batch), actions].all()
    assert (q[torch.from_numpy(~mask)] == torch.finfo(q.dtype).min).all()


def test_random_actions_are_uniform_over_valid_ones() -> None:
    rng = np.random.default_rng(0)
    mask = np.tile(np.array([[True, False, True, True]]), (30_000, 1))
    counts = np.bincount(random_valid_actions(mask, rng), minlength=4) / 30_000
    assert counts[1] == 0 and np.allclose(counts[[0, 2, 3]], 1 / 3, atol=0.015)


class _FixedQ(nn.Module):
    def __init__(self, q: list[float]) -> None:
        super().__init__()
        self.q = torch.tensor([q])
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.q.expand(len(windows), -1) + self.w


@pytest.mark.parametrize("shift", [1, 3, 7])
def test_paired_pass_equals_two_forward_passes(shift: int) -> None:
    """One convolution pass over a window and the ``shift`` bars after it gives the online net's Q of both
    windows, and the same gradient, as two separate forward passes (within float rounding)."""
    torch.manual_seed(0)
    net = DuelingQNet(5, 16, 4, 3, NetConfig(encoder="cnn", channels=8, hidden=16))
    assert net.can_pair(16)
    ext, state, next_state = torch.randn(9, 16 + shift, 5), torch.randn(9, 4), torch.randn(9, 4)
    q, q_next = net.pair(ext, state, next_state, shift)
    torch.testing.assert_close(q_next, net(ext[:, shift:], next_state), rtol=1e-5, atol=1e-6)
    assert not q_next.requires_grad
    q.square().sum().backward()  # type: ignore[no-untyped-call]
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    ref = net(ext[:, :16], state)
    torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-6)
    ref.square().sum().backward()  # type: ignore[no-untyped-call]
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    tcn = DuelingQNet(5, 16, 4, 3, NetConfig(encoder="tcn", channels=8, hidden=16))
    assert not tcn.can_pair(16)  # causal dilated blocks see the whole window: nothing to share


def test_learn_step_with_shared_windows_matches_separate_windows() -> None:
    """``learn_step`` on one extended gather (the shared-convolution path) and on two gathers gives the same loss,
    TD errors and updated weights; transitions whose episode ended (discount 0) may bootstrap from any window."""
    data, _, cfg = _tiny()
    gather = ObsGather(BatchSessionEnv(data, ExecutionParams(), EnvParams(), num_envs=4), torch.device("cpu"))
    rng = np.random.default_rng(0)
    n, b = cfg.n_step, 16
    rows = rng.choice(data.start, b) + rng.integers(0, data.length - n, b)
    rows[0] = len(data.features) - 1  # an ended episode at the matrix end: its extended rows are clamped
    discount = torch.full((b,), cfg.gamma**n)
    discount[0] = 0.0
    kw = {"state": torch.randn(b, 8), "action": torch.from_numpy(rng.integers(0, 3, b)),
          "next_state": torch.randn(b, 8), "next_mask": torch.ones(b, 3, dtype=torch.bool),
          "returns": torch.randn(b), "discount": discount, "weights": torch.rand(b), "step": 0}
    out = []
    for shared in (False, True):
        torch.manual_seed(1)
        online = build_q_net({"n_features": 3, "context": 8, "n_state": 8, "n_actions": 3,
                              "net": {"encoder": "cnn", "channels": 8, "hidden": 16}})
        target = build_q_net({"n_features": 3, "context": 8, "n_state": 8, "n_actions": 3,
                              "net": {"encoder": "cnn", "channels": 8, "hidden": 16}})
        opt = torch.optim.Adam(online.parameters(), lr=1e-3)
        if shared:
            res = d3qn.learn_step(online, target, opt, cfg, windows=gather.extended(rows, n), next_windows=None,
                                  shift=n, **kw)
        else:
            res = d3qn.learn_step(online, target, opt, cfg, windows=gather.windows(rows),
                                  next_windows=gather.windows(np.minimum(rows + n, len(data.features) - 1)), **kw)
        out.append((res, [p.detach().clone() for p in online.parameters()]))
    (a, wa), (b_, wb) = out
    for x, y in zip(a, b_, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(wa, wb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_double_q_target_argmax_skips_masked_actions() -> None:
    online = _FixedQ([0.0, 9.0, 1.0, 2.0])  # the masked action 1 looks best to the online net
    target = _FixedQ([10.0, 100.0, 20.0, 30.0])
    mask = torch.tensor([[True, False, True, True], [True, False, False, False]])
    y = double_q_target(online, target, torch.zeros(2, 8, 3), torch.zeros(2, 8), mask,
                        returns=torch.tensor([1.0, 1.0]), discount=torch.tensor([0.5, 0.0]))
    # row 0: online's best valid action is 3 → target's Q(3) = 30; row 1: episode over → just the return
    assert y.tolist() == [1.0 + 0.5 * 30.0, 1.0]


def test_soft_target_sync_is_polyak() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = b.weight.detach().clone()
    sync_target(a, b, 0.25)
    assert torch.allclose(b.weight, 0.75 * before + 0.25 * a.weight)
    sync_target(a, b, 1.0)
    assert torch.equal(b.weight, a.weight)


# --- the target net's values: only the rows that count, each computed once per sync ---------------------------


def test_target_values_skip_dead_rows_and_read_back_cached_ones() -> None:
    torch.manual_seed(0)
    net = DuelingQNet(4, 12, 8, 3, SMALL_NET)
    w, s = torch.randn(40, 12, 4), torch.randn(40, 8)
    with torch.no_grad():
        full = net(w, s)
    disc = np.where(np.arange(40) % 4 == 0, 0.0, 0.9).astype(np.float32)  # every 4th episode ended: not read
    q, passes = d3qn.target_values(net, w, s, disc)
    alive = disc != 0
    assert passes == alive.sum() == 30
    assert torch.allclose(q[alive], full[alive], atol=1e-6) and (q[~alive] == 0).all()
    cache = d3qn.TargetCache(100, 3, torch.device("cpu"))
    slots = np.arange(40) + 50
    q1, p1 = d3qn.target_values(net, w, s, disc, slots, cache)
    assert p1 == 30 and cache.valid[slots[alive]].all() and not cache.valid[slots[~alive]].any()
    with torch.no_grad():  # the net changes without a sync: cached rows are read back, the others computed
        for p in net.parameters():
            p.add_(1.0)
    half = np.arange(40) % 2 == 0
    cache.forget(slots[half])
    q2, p2 = d3qn.target_values(net, w, s, disc, slots, cache)
    assert p2 == (alive & half).sum()
    assert torch.equal(q2[alive & ~half], q1[alive & ~half])  # cached: exactly the stored values
    assert not torch.allclose(q2[alive & half], q1[alive & half])  # recomputed with the changed net
    cache.clear()
    assert d3qn.target_values(net, w, s, disc, slots, cache)[1] == 30


def test_cached_target_values_are_never_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through hard syncs and a replay ring that wraps many times, every value the cache serves equals a fresh
    target pass over the same successor observations (the check runs on every batch of a real training run)."""
    data, _, cfg = _tiny()
    cfg = dataclasses.replace(cfg, total_steps=16 * 60, buffer_size=16 * 12, target_sync=7, eval_every=0,
                              checkpoint_every=0)
    real = d3qn.target_values
    served: list[int] = []

    def checked(target: nn.Module, nw: torch.Tensor, ns: torch.Tensor, disc: np.ndarray,
                slots: np.ndarray | None = None, cache: d3qn.TargetCache | None = None) -> tuple[torch.Tensor, int]:
        assert cache is not None and slots is not None
        hit = (disc != 0) & cache.valid[slots]
        q, passes = real(target, nw, ns, disc, slots, cache)
        with torch.no_grad():
            fresh = target(nw, ns)
        alive = torch.from_numpy(disc != 0)
        assert torch.allclose(q[alive], fresh[alive], atol=1e-5, rtol=1e-5)
        served.append(int(hit.sum()))
        assert passes == int((disc != 0).sum()) - served[-1]
        return q, passes

    monkeypatch.setattr(d3qn, "target_values", checked)
    res = train_d3qn(data, None, cfg, ExecutionParams(), EnvParams(), progress=False)
    assert res.updates >= 4 * cfg.target_sync and sum(served) > 0  # syncs happened and the cache served rows
    assert any(0 < r.get("target_pass", 0.0) < 1 for r in res.history)
