"""Trading envs on synthetic sessions: API checks, single vs batch parity, reward reconciliation, masks, modes, leak."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from rltrader.config import load_settings
from rltrader.dataset.split import SessionSet
from rltrader.env import BatchSessionEnv, EnvParams, ExecutionParams, SessionEnv, params_from_settings
from rltrader.env.synthetic import synthetic_sessions
from rltrader.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DATA = synthetic_sessions(n_symbols=3, bars_per_symbol=300, n_features=4, context=8, length=12, gap=5)
COSTLY = {"taker_fee": 0.0005, "half_spread_bps": 2.0, "impact": 0.002, "step_size": 0.001, "tick_size": 0.01,
          "min_notional": 5.0}
MODES = {
    "futures": (ExecutionParams(leverage=3.0, **COSTLY), EnvParams()),  # type: ignore[arg-type]
    "spot": (ExecutionParams(market="spot", **COSTLY), EnvParams(mode="spot_cycle", position_size=0.5)),  # type: ignore[arg-type]
    "lowrider": (ExecutionParams(market="spot", **COSTLY),  # type: ignore[arg-type]
                 EnvParams(mode="lowrider", base_lot=1000.0, reluctance=2.0, profit_target=0.001)),
}


def play(env: SessionEnv, session: int, actions: list[int]) -> tuple[list[float], list[float], dict[str, object]]:
    env.reset(options={"session": session})
    rewards, penalties, info = [], [], {}
    for i in range(10_000):
        _, r, term, trunc, info = env.step(actions[i % len(actions)])
        rewards.append(r)
        penalties.append(float(info["penalty"]))  # type: ignore[arg-type]
        if term or trunc:
            break
    return rewards, penalties, info


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is:UserWarning")
@pytest.mark.parametrize("mode", list(MODES))
def test_gymnasium_and_sb3_check_env(mode: str) -> None:
    ex, params = MODES[mode]
    env = SessionEnv(DATA, ex, params)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(SessionEnv(DATA, ex, params), warn=False)


def test_ppo_trains_on_the_env() -> None:
    env = SessionEnv(DATA, *MODES["futures"])
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    obs, _ = env.reset(seed=1)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(int(action))


def test_seeded_reset_is_reproducible() -> None:
    a, b = SessionEnv(DATA), SessionEnv(DATA)
    for seed in (0, 1, 2):
        (oa, ia), (ob, ib) = a.reset(seed=seed), b.reset(seed=seed)
        np.testing.assert_array_equal(oa, ob)
        assert ia["session"] == ib["session"]
    ba, bb = BatchSessionEnv(DATA, num_envs=16), BatchSessionEnv(DATA, num_envs=16)
    ba.reset(seed=7)
    bb.reset(seed=7)
    rng = np.random.default_rng(0)
    for _ in range(40):
        acts = rng.integers(0, 4, 16)
        sa, sb = ba.step(acts), bb.step(acts)
        np.testing.assert_array_equal(sa.window, sb.window)
        np.testing.assert_array_equal(sa.reward, sb.reward)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(list(MODES)), st.sampled_from([0, 2]), st.integers(0, 2**31 - 1),
       st.sampled_from(["log_return", "pnl", "diff_sharpe"]), st.booleans())
def test_batch_env_matches_single_env(mode: str, latency: int, seed: int, reward: str, penalties: bool) -> None:
    """Random actions (invalid ones included) on B accounts: identical observations, rewards, masks, equity, ends
    and resets, with fees, slippage, filters, latency and forced closes."""
    ex, params = MODES[mode]
    ex = ExecutionParams(**{**ex.as_dict(), "latency_bars": latency})
    pen = {"hold_penalty": 1e-4, "flip_penalty": 1e-3, "trade_penalty": 1e-4, "drawdown_penalty": 0.1}
    params = EnvParams(**{**params.as_dict(), "reward": reward, **(pen if penalties else {})})
    n, episodes = 3, 4
    rng = np.random.default_rng(seed)
    schedule = rng.integers(0, DATA.n_sessions, (n, episodes + 1))
    batch = BatchSessionEnv(DATA, ex, params, num_envs=n, session_schedule=schedule)
    singles = [SessionEnv(DATA, ex, params) for _ in range(n)]
    window, state, mask = (x.copy() for x in batch.reset())
    episode = [0] * n
    for b, env in enumerate(singles):
        env.reset(options={"session": int(schedule[b, 0])})
        w, s, m = env.structured_obs()
        np.testing.assert_array_equal(w[0], window[b])
        np.testing.assert_array_equal(s[0], state[b])
        np.testing.assert_array_equal(m[0], mask[b])
    ended = 0
    for _ in range(params_len := DATA.length * episodes):
        actions = rng.integers(0, batch.n_actions, n)
        out = batch.step(actions)
        for b, env in enumerate(singles):
            obs, r, term, trunc, info = env.step(int(actions[b]))
            assert r == pytest.approx(out.reward[b], rel=1e-12, abs=1e-15)
            assert info["penalty"] == pytest.approx(out.penalty[b], rel=1e-12, abs=1e-15)
            assert (term, trunc) == (bool(out.terminated[b]), bool(out.truncated[b]))
            assert info["equity"] == pytest.approx(out.final_equity[b], rel=1e-12)
            if term or trunc:
                ended += 1
                episode[b] += 1
                env.reset(options={"session": int(schedule[b, episode[b] % schedule.shape[1]])})
            w, s, m = env.structured_obs()
            np.testing.assert_array_equal(w[0], out.window[b])
            np.testing.assert_allclose(s[0], out.state[b], rtol=1e-6)
            np.testing.assert_array_equal(m[0], out.mask[b])
            if not (term or trunc):
                np.testing.assert_array_equal(obs[: w.size], w.reshape(-1))
    assert ended >= n and params_len > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_index_observations_gather_the_full_windows(mode: str) -> None:
    """``windows=False``: the kernel copies no window, and the decision rows it hands out gather exactly the
    windows (numpy, and torch through the agents' ``ObsGather``) of the full-observation env, with identical
    states, masks, rewards and ends, across auto-resets."""
    import torch

    ex, params = MODES[mode]
    n = 5
    schedule = np.random.default_rng(1).integers(0, DATA.n_sessions, (n, 6))
    full = BatchSessionEnv(DATA, ex, params, num_envs=n, session_schedule=schedule)
    idx = BatchSessionEnv(DATA, ex, params, num_envs=n, session_schedule=schedule, windows=False)
    assert idx.observation_shape == full.observation_shape == (DATA.context, DATA.n_features)
    w, s, m = full.reset(seed=0)
    w_i, s_i, m_i = idx.reset(seed=0)
    assert w_i.shape == (n, 0, DATA.n_features)  # nothing copied
    np.testing.assert_array_equal(idx.gather(), w)
    np.testing.assert_array_equal(s_i, s)
    np.testing.assert_array_equal(m_i, m)
    from rltrader.agents.common import ObsGather

    gather = ObsGather(idx, torch.device("cpu"))
    buf = torch.full((n, *idx.observation_shape), np.nan)
    np_buf = np.full((n, *idx.observation_shape), np.nan, np.float32)
    rng = np.random.default_rng(2)
    ends = 0
    for _ in range(DATA.length * 4):
        actions = rng.integers(0, full.n_actions, n)
        a, b = full.step(actions), idx.step(actions)
        np.testing.assert_array_equal(idx.gather(b.rows), a.window)
        np.testing.assert_array_equal(gather.windows(b.rows).numpy(), a.window)
        # into reused buffers (the acting loop's path), rows as a tensor too: the same bytes
        assert gather.windows(torch.from_numpy(b.rows), out=buf) is buf
        np.testing.assert_array_equal(buf.numpy(), a.window)
        assert idx.gather(b.rows, out=np_buf) is np_buf
        np.testing.assert_array_equal(np_buf, a.window)
        for name in ("state", "mask", "reward", "penalty", "terminated", "truncated", "final_equity", "filled",
                     "rows"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        ends += int((a.terminated | a.truncated).sum())
    assert ends >= n


@pytest.mark.parametrize("mode", list(MODES))
def test_wide_batch_matches_one_account_batches(mode: str) -> None:
    """A batch wide enough for the step loop's prefetching of accounts ahead (``core.PREFETCH_AHEAD``, including
    the next session of accounts at their last bar) steps every account exactly as a batch of that one account
    does: same windows, state, masks, rewards, ends and resets."""
    from rltrader.env.core import PREFETCH_AHEAD

    ex, params = MODES[mode]
    n = 3 * PREFETCH_AHEAD + 5
    schedule = np.random.default_rng(4).integers(0, DATA.n_sessions, (n, 8))
    wide = BatchSessionEnv(DATA, ex, params, num_envs=n, session_schedule=schedule)
    ones = [BatchSessionEnv(DATA, ex, params, num_envs=1, session_schedule=schedule[b:b + 1]) for b in range(n)]
    wide.reset(seed=0)
    for env in ones:
        env.reset(seed=0)
    rng = np.random.default_rng(5)
    ends = 0
    for _ in range(DATA.length * 3):
        actions = rng.integers(-1, wide.n_actions + 1, n)  # invalid actions included
        out = wide.step(actions)
        for b, env in enumerate(ones):
            one = env.step(actions[b:b + 1])
            for name in ("window", "state", "mask", "reward", "penalty", "terminated", "truncated", "final_equity",
                         "filled", "rows"):
                np.testing.assert_array_equal(getattr(out, name)[b:b + 1], getattr(one, name), err_msg=name)
        ends += int((out.terminated | out.truncated).sum())
    assert ends >= n


def test_window_gather_refuses_rows_outside_the_feature_matrix_and_bad_buffers() -> None:
    """The env's CPU gather copies blocks without bounds checks, so rows whose window would leave the feature
    matrix and output buffers of the wrong shape or layout are refused before it runs (torch's gather refuses
    such rows itself)."""
    import torch

    from rltrader.agents.common import ObsGather

    env = BatchSessionEnv(DATA, num_envs=3, windows=False)
    env.reset(seed=0)
    gather = ObsGather(env, torch.device("cpu"))
    c, n_rows = DATA.context, len(env.features)
    np.testing.assert_array_equal(env.gather(np.array([c, n_rows]))[1], env.features[n_rows - c:])
    for bad in (np.array([c - 1]), np.array([n_rows + 1]), np.array([c, -5])):
        with pytest.raises(ValueError, match="decision rows must lie in"):
            env.gather(bad)
        with pytest.raises(IndexError):
            gather.windows(bad)
    with pytest.raises(ValueError, match="out must be"):
        env.gather(np.array([c, c + 1]), out=np.zeros((2, c + 1, DATA.n_features), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        env.gather(np.array([c, c + 1]), out=np.zeros((2, DATA.n_features, c), np.float32).transpose(0, 2, 1))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reward", ["log_return", "pnl"])
def test_rewards_reconcile_with_the_equity_change(mode: str, reward: str) -> None:
    ex, params = MODES[mode]
    cash = ex.initial_cash
    for pen in (0.0, 1e-3):
        p = EnvParams(**{**params.as_dict(), "reward": reward, "hold_penalty": pen, "trade_penalty": pen,
                         "flip_penalty": pen, "drawdown_penalty": pen})
        env = SessionEnv(DATA, ex, p)
        rng = np.random.default_rng(3)
        for session in range(0, DATA.n_sessions, 7):
            actions = list(rng.integers(0, env.action_space.n, 40))
            rewards, penalties, info = play(env, session, [int(a) for a in actions])
            equity = float(info["equity"])  # type: ignore[arg-type]
            expected = math.log(equity / cash) if reward == "log_return" else (equity - cash) / cash
            assert sum(rewards) + sum(penalties) == pytest.approx(expected, rel=1e-9, abs=1e-12)
            if pen == 0.0:
                assert sum(penalties) == 0.0


def test_futures_session_forced_close_and_flip() -> None:
    ex = ExecutionParams(leverage=2.0, **COSTLY)  # type: ignore[arg-type]
    env = SessionEnv(DATA, ex, EnvParams(flip_penalty=0.5))
    env.reset(options={"session": 0})
    _, _, _, _, info = env.step(1)  # long
    assert info["position"] > 0 and info["fees_paid"] > 0
    _, r, _, _, info = env.step(2)  # flip to short
    assert info["position"] < 0 and info["penalty"] == pytest.approx(0.5) and r < -0.4
    for _ in range(DATA.length - 3):
        _, _, term, _, info = env.step(0)
        assert not term
    fees_before = info["fees_paid"]
    _, _, term, trunc, info = env.step(0)  # last bar: forced close at its close
    assert term and not trunc and info["position"] == 0.0 and info["fees_paid"] > fees_before
    assert env.core.accounts.cash[0] == pytest.approx(info["equity"])


def test_no_forced_close_truncates_with_the_position_marked() -> None:
    ex, params = MODES["lowrider"]
    env = SessionEnv(DATA, ex, EnvParams(**{**params.as_dict(), "force_close": False, "profit_target": 0.5}))
    _, _, info = play(env, 1, [1, 0, 0])
    assert info["position"] > 0 and env.core.out_b[1, 0]


def test_masks() -> None:
    fut = SessionEnv(DATA, ExecutionParams(latency_bars=2))
    _, info = fut.reset(options={"session": 0})
    assert info["action_mask"].tolist() == [True, True, True, False]  # flat: nothing to close
    _, _, _, _, info = fut.step(1)
    assert info["action_mask"].tolist() == [True, False, True, True]  # long in flight: no second long
    for _ in range(DATA.length - 4):  # next decision: bar end - 3, its order fills at end - 1
        _, _, _, _, info = fut.step(0)
    assert info["action_mask"].tolist() == [True, False, True, True]
    _, _, _, _, info = fut.step(0)
    # the last `latency` decisions could not fill before the session ends: hold only
    assert info["action_mask"].tolist() == [True, False, False, False]
    np.testing.assert_array_equal(fut.action_masks(), info["action_mask"])

    spot = SessionEnv(DATA, *MODES["spot"])
    _, info = spot.reset(options={"session": 0})
    assert info["action_mask"].tolist() == [True, True, False]  # no sell without a position
    _, _, _, _, info = spot.step(2)  # invalid: no order
    assert info["position"] == 0.0 and info["fees_paid"] == 0.0
    _, _, _, _, info = spot.step(1)
    assert info["action_mask"].tolist() == [True, False, True]  # one cycle: no second buy
    _, _, term, _, info = spot.step(2)
    assert term and info["position"] == 0.0  # the cycle's sell ends the episode

    ex, params = MODES["lowrider"]  # budget 5000 = 5 lots of 1000: multipliers 0, 1, 2, 4
    low = SessionEnv(DATA, ex, EnvParams(**{**params.as_dict(), "profit_target": 0.5}))
    _, info = low.reset(options={"session": 0})
    assert info["action_mask"].tolist() == [True, True, True, True]
    _, _, _, _, info = low.step(3)  # 4 lots
    assert info["action_mask"].tolist() == [True, False, False, False]  # a 5th lot (+ slippage) breaks the cap


def test_lowrider_takes_profit_automatically_and_rule_policy_runs() -> None:
    ex, params = MODES["lowrider"]
    env = SessionEnv(DATA, ex, params)
    cycles = 0
    for session in range(DATA.n_sessions):
        env.reset(options={"session": session})
        done, info = False, {}
        while not done:
            _, _, term, trunc, info = env.step(env.rule_action())
            assert env.core.accounts.qty[0] * env.core.accounts.avg_entry[0] <= ex.initial_cash / params.reluctance
            done = term or trunc
        if info["bar"] < env.core.ptr[2, 0]:  # ended before the session's end: the take-profit sell filled
            cycles += 1
            assert info["position"] == 0.0 and info["equity"] > ex.initial_cash
    assert cycles > 0
    batch = BatchSessionEnv(DATA, ex, params, num_envs=5)
    batch.reset(seed=0)
    for _ in range(30):
        acts = batch.rule_actions()
        assert batch.action_masks()[np.arange(5), acts].all()
        batch.step(acts)


@pytest.mark.parametrize("latency", [0, 1])
def test_planted_leak_column_reveals_the_fill_bars_return(latency: int) -> None:
    ex = ExecutionParams(latency_bars=latency, taker_fee=0.0, half_spread_bps=0.0, impact=0.0)
    params = EnvParams(leak=True, leak_scale=1000.0, position_size=0.5)
    env = SessionEnv(DATA, ex, params)
    assert env.core.feature_names[-1] == "leak_next_return"
    for session in range(0, DATA.n_sessions, 5):
        env.reset(options={"session": session})
        start, end = int(DATA.start[session]), int(DATA.end[session])
        for t in range(start, end):
            w, _, _ = env.structured_obs()
            fill_bar = t + latency
            if fill_bar < len(DATA.close):
                assert w[0, -1, -1] == pytest.approx(1000 * math.log(DATA.close[fill_bar] / DATA.open[fill_bar]),
                                                     rel=1e-5)
            np.testing.assert_array_equal(w[0, :, :-1], DATA.features[t - DATA.context:t])
            env.step(0)
    # an oracle that trades on the leak earns on every session
    gains = []
    for session in range(DATA.n_sessions):
        env.reset(options={"session": session})
        done = False
        while not done:
            leak = env.structured_obs()[0][0, -1, -1]
            pos = env.core.accounts.qty[0] + env.core.pending[0].sum()
            a = (1 if pos <= 0 else 0) if leak > 0 else (2 if pos >= 0 else 0)
            _, _, term, trunc, info = env.step(a)
            done = term or trunc
        gains.append(info["equity"] / ex.initial_cash - 1)
    assert np.mean(gains) > 0.005 and np.mean(np.array(gains) > 0) > 0.9


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"mode": "moon"}, "env.mode"), ({"lot_multipliers": ()}, "env.lot_multipliers"),
    ({"lot_multipliers": (1.0, 2.0)}, "env.lot_multipliers"), ({"reward": "sortino"}, "env.reward"),
    ({"reluctance": 0.5}, "env.reluctance"), ({"position_size": 0.0}, "env.position_size"),
    ({"hold_penalty": -1.0}, "env.hold_penalty"), ({"rule_schedule": (9,)}, "env.rule_schedule"),
])
def test_bad_env_params_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        EnvParams(**kwargs)  # type: ignore[arg-type]


def test_env_config_from_params_yaml(tmp_path: Path) -> None:
    ex, params = params_from_settings(load_settings(REPO / "params.yaml", env={}))
    assert ex.market == "futures" and params.mode == "futures_session" and params.lot_multipliers[0] == 0
    p = tmp_path / "params.yaml"
    for text, msg in [("env:\n  mode: moon\n", "env.mode"), ("execution:\n  leverage: 0\n", "execution.leverage"),
                      ("env:\n  lot_multipliers: []\n", "env.lot_multipliers"),
                      ("env:\n  rewards: pnl\n", "env.rewards: unknown key")]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_settings(p, env={})
    p.write_text("env:\n  mode: spot_cycle\n  lot_multipliers: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"env\.lot_multipliers"):
        params_from_settings(load_settings(p, env={}))
    with pytest.raises(ConfigError, match=r"env\.mode"):
        SessionEnv(DATA, ExecutionParams(market="spot"), EnvParams())


def test_empty_session_set_is_refused() -> None:
    empty = SessionSet(**{**{f: getattr(DATA, f) for f in DATA.__dataclass_fields__},  # type: ignore[arg-type]
                          "ctx_start": DATA.ctx_start[:0], "start": DATA.start[:0], "end": DATA.end[:0]})
    with pytest.raises(ConfigError, match="no sessions"):
        SessionEnv(empty)


def test_borrowed_arrays_are_the_original_memory() -> None:
    """``borrow`` (the kernels' entry points): the same data, shape and strides, writes land in the original."""
    from numba import njit

    from rltrader.borrow import borrow

    @njit
    def write_through(a: np.ndarray) -> float:
        b = borrow(a)
        b[1, 2] = 7.0
        return float(b.sum()) + b.shape[0] * 100 + b.strides[0]

    a = np.zeros((3, 4))
    assert write_through(a) == 7.0 + 300 + 32
    assert a[1, 2] == 7.0 and a.sum() == 7.0
