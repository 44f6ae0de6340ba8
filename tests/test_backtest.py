"""Backtest engine: parity with the env's rollout, filters, continuity over gaps, causality, bad input."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from rltrader.agents.baselines import SMACross
from rltrader.agents.cnn_classifier import ClassifierActions
from rltrader.agents.evaluate import evaluate
from rltrader.agents.networks import ActorCritic, Classifier, DuelingQNet, NetConfig
from rltrader.agents.packaging import PolicyModule
from rltrader.config import Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.dataset.build import run_features_stage, run_sessions_stage
from rltrader.dataset.split import SessionSet, load_split
from rltrader.env import BatchSessionEnv, EnvParams, ExecutionParams
from rltrader.env.core import N_STATE
from rltrader.env.synthetic import synthetic_sessions
from rltrader.errors import ConfigError, DataError
from rltrader.evaluate.backtest import (
    BacktestFilters,
    backtest_params,
    backtest_sessions,
    continuous_split,
    make_policy,
    run_backtest,
)
from rltrader.testing import synthetic_klines

DAY = 1440
EX = ExecutionParams()


def env_rollout(data: SessionSet, policy: Any, execution: ExecutionParams, params: EnvParams) -> np.ndarray:
    """(S, length) signed quantity the batch env fills per session and step (account s plays session s)."""
    S = data.n_sessions
    env = BatchSessionEnv(data, execution, params, num_envs=S, session_schedule=np.arange(S)[:, None])
    if hasattr(policy, "bind"):
        policy.bind(env)
    window, state, mask = env.reset(seed=0)
    filled = np.zeros((S, data.length))
    done = np.zeros(S, bool)
    for k in range(data.length):
        out = env.step(policy(window, state, mask))
        filled[:, k] = np.where(done, 0.0, out.filled)
        done |= out.terminated | out.truncated
    return filled


def backtest_fills(result: Any, data: SessionSet) -> np.ndarray:
    f = result.fills
    t = f["time"].cast(pl.Int64).to_numpy()
    s = f["stretch"].to_numpy()
    step = (t - data.time[data.start[s]]) // 60_000_000
    out = np.zeros((data.n_sessions, data.length))
    np.add.at(out, (s, step), f["qty"].to_numpy())
    return out


class TinyNet(nn.Module):
    """A linear scorer over the flat observation: enough to exercise the model path (module level: picklable)."""

    def __init__(self, n_in: int, n_actions: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_actions)

    def forward(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(torch.cat([w.flatten(1), s], dim=1)) * 5.0
        return out


def tiny_module(data: SessionSet, n_actions: int, kind: str = "logits", seed: int = 0) -> PolicyModule:
    torch.manual_seed(seed)
    net = TinyNet(data.context * data.n_features + N_STATE, n_actions)
    return PolicyModule(net, kind, data.context, data.n_features, N_STATE, n_actions, {"algo": "tiny"})


# ------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("mode", "market", "latency", "names"), [
    ("futures_session", "futures", 0, ["sma_cross", "random", "buy_and_hold"]),
    ("futures_session", "futures", 2, ["sma_cross", "random"]),
    ("spot_cycle", "spot", 0, ["sma_cross", "random"]),
    ("lowrider", "spot", 1, ["lowrider_rule", "random"]),
])
def test_parity_with_env_rollout(mode: str, market: str, latency: int, names: list[str]) -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=300, length=12, volatility=0.004, seed=3)
    ex = replace(EX, market=market, latency_bars=latency)  # type: ignore[arg-type]
    params = EnvParams(mode=mode)  # type: ignore[arg-type]
    for name in names:
        res = backtest_sessions(data, make_policy(name, mode), ex, params)
        ev = evaluate(make_policy(name, mode), data, ex, params, num_envs=data.n_sessions)
        # same final equity per session, bit for bit, and the same fills step by step
        assert np.array_equal(res.stretches["return"].to_numpy(), ev.session_return), name
        assert np.allclose(backtest_fills(res, data), env_rollout(data, make_policy(name, mode), ex, params),
                           rtol=0, atol=1e-12), name
        # the trade list accounts for the whole PnL
        pnl = res.stretches["final_equity"].to_numpy() - res.stretches["start_equity"].to_numpy()
        assert res.trades["pnl"].sum() == pytest.approx(pnl.sum(), abs=1e-6)
        assert res.trades["fees"].sum() == pytest.approx(res.totals["fees"], rel=1e-9)
    assert res.meta["path"]


def test_parity_nn_policy_and_vectorised_sma() -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=200, length=10, seed=5)
    params = EnvParams()
    module = tiny_module(data, params.n_actions)
    res = backtest_sessions(data, module, EX, params)
    ev = evaluate(module.policy(), data, EX, params, num_envs=data.n_sessions)
    assert np.array_equal(res.stretches["return"].to_numpy(), ev.session_return)
    assert res.totals["fills"] > 0
    # the vectorised SMA decisions equal the env baseline's step-by-step ones
    sma = backtest_sessions(data, "sma_cross", EX, params)
    assert sma.meta["path"].startswith("vectorised")
    assert np.array_equal(backtest_fills(sma, data), env_rollout(data, SMACross("futures_session"), EX, params))


# ------------------------------------------------------------------ split networks (precomputed window part)


NETS = ("d3qn", "ppo", "cnn")


def small_net(name: str, data: SessionSet, n_actions: int, mode: str = "futures_session",
              seed: int = 0) -> PolicyModule:
    """A small random network of each of our kinds (CNN encoder for D3QN and the classifier, TCN for PPO)."""
    torch.manual_seed(seed)
    cnn, tcn = NetConfig(encoder="cnn", channels=8, hidden=16), NetConfig(encoder="tcn", channels=8, hidden=16,
                                                                         tcn_levels=2)
    args = (data.n_features, data.context, N_STATE)
    net: nn.Module
    if name == "d3qn":
        net, kind = DuelingQNet(*args, n_actions, cnn), "q_values"
    elif name == "ppo":
        net, kind = ActorCritic(*args, n_actions, tcn), "logits"
        nn.init.normal_(net.policy.weight, std=0.3)  # PPO starts near-uniform; spread the logits to trade
    else:
        net, kind = ClassifierActions(Classifier(*args, 2, cnn), 0.5, mode), "classifier"
    return PolicyModule(net.eval(), kind, data.context, data.n_features, N_STATE, n_actions)


def assert_same_run(fast: Any, generic: Any) -> None:
    assert fast.meta["path"].startswith("split network") and generic.meta["path"].startswith("stepped")
    for name in ("fills", "trades", "equity", "stretches", "daily"):
        assert getattr(fast, name).equals(getattr(generic, name)), name
    assert fast.totals == generic.totals


@pytest.mark.parametrize("name", NETS)
def test_split_head_scores_match_module(name: str) -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=200, length=20, seed=7)
    module = small_net(name, data, EnvParams().n_actions)
    split = module.split()
    assert split is not None
    rows = np.concatenate([np.arange(a, b) for a, b in zip(data.start, data.end, strict=True)])  # runs with gaps
    windows = data.features[rows[:, None] + np.arange(-data.context, 0)]
    state = np.random.default_rng(0).normal(size=(len(rows), N_STATE)).astype(np.float32)
    state[:, 0] = np.sign(state[:, 0])
    got = split.scores(split.precompute(data.features, rows), state)
    want = module.scores(windows, state)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    assert tiny_module(data, 4).split() is None  # not one of our networks: the generic path


@pytest.mark.slow
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize(("chain", "confident"), [(False, False), (True, False), (True, True)])
def test_split_network_parity_with_generic_path(name: str, chain: bool, confident: bool) -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=400, length=40, volatility=0.004, seed=5)
    params = EnvParams()
    module = small_net(name, data, params.n_actions)
    # thresholds inside each small net's range: the Q gap to hold, the softmax probability, the classifier's 1
    threshold = {"d3qn": 0.012, "ppo": 0.3, "cnn": 0.5}[name] if confident else 0.0
    flt = BacktestFilters(confidence=threshold, cooldown_bars=2)
    fast = backtest_sessions(data, module, EX, params, flt, chain=chain)
    generic = backtest_sessions(data, module, EX, params, flt, chain=chain, fast=False)
    assert_same_run(fast, generic)
    assert fast.totals["fills"] > 10
    if confident and name != "cnn":  # the classifier's gap to hold is 1 whenever it trades
        assert fast.totals["blocked_decisions"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NETS)
def test_split_network_parity_spot_and_latency(name: str) -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=300, length=30, volatility=0.004, seed=8)
    params = EnvParams(mode="spot_cycle")
    ex = replace(EX, market="spot", latency_bars=1)
    module = small_net(name, data, params.n_actions, mode="spot_cycle", seed=1)
    flt = BacktestFilters(repeat_cycles=True)
    assert_same_run(backtest_sessions(data, module, ex, params, flt, chain=True),
                    backtest_sessions(data, module, ex, params, flt, chain=True, fast=False))


# ---------------------------------------------------------------------------------- stages: continuous backtest


SPLITS = {"train": {"start": "2024-01-01", "end": "2024-01-05"},
          "val": {"start": "2024-01-05", "end": "2024-01-06"},
          "test": {"start": "2024-01-06", "end": "2024-01-07"},
          "backtest": {"start": "2024-01-07", "end": "2024-01-09"}}
FEATURES = {"return_horizons": [1, 3], "rsi": 5, "ema": [4, 8], "macd": [3, 6, 3], "bollinger": 5, "atr": 4,
            "volatility": [4], "zscore_window": 10}
GAP = (6 * DAY + 700, 6 * DAY + 730)  # inside the backtest range


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("bt")
    settings = Settings.model_validate({
        "data": {"dir": str(tmp / "data")},
        "ingest": {"market": "futures-um", "symbols": ["AAAUSDT", "BBBUSDT"], "interval": "1m"},
        "features": FEATURES,
        "sessions": {"context": 10, "length": 5, "stride": 5, "embargo": 15, "volatility_percentile": 0,
                     "splits": SPLITS},
    })
    store = ParquetStore(tmp / "data" / "store")
    store.write_klines(synthetic_klines("AAAUSDT", "2024-01-01", 8 * DAY, seed=1, missing=(GAP,)))
    store.write_klines(synthetic_klines("BBBUSDT", "2024-01-01", 8 * DAY, seed=2, price=3.0))
    run_features_stage(settings, store)
    run_sessions_stage(settings)
    return settings


@pytest.mark.slow
def test_stage_sessions_parity_and_standardisation(built: Settings) -> None:
    sdir = built.data.dir / "sessions"
    bt = load_split(sdir, "backtest")
    params = EnvParams()
    for name in ("sma_cross", "random"):
        res = backtest_sessions(bt, name, EX, params)
        ev = evaluate(make_policy(name, params.mode), bt, EX, params, num_envs=bt.n_sessions)
        assert np.array_equal(res.stretches["return"].to_numpy(), ev.session_return)
    # the continuous data's features equal the sessions stage's on every shared bar
    cont = continuous_split(built, "backtest")
    a = pl.DataFrame({"s": cont.symbol_id, "t": cont.time, "i": np.arange(len(cont.time))})
    b = pl.DataFrame({"s": bt.symbol_id, "t": bt.time, "j": np.arange(len(bt.time))})
    m = a.join(b, on=["s", "t"])
    assert m.height == len(bt.time)
    assert np.array_equal(cont.features[m["i"].to_numpy()], bt.features[m["j"].to_numpy()])


def test_continuous_run_never_spans_a_gap(built: Settings) -> None:
    cont = continuous_split(built, "backtest")
    assert cont.n_sessions == 3  # AAAUSDT split by the gap, BBBUSDT whole
    res = run_backtest(built, "sma_cross")
    eq = res.equity.filter(pl.col("symbol") != "ALL")
    # positions are flat on the last bar of every stretch, and no stretch contains the gap
    last = eq.group_by("stretch").agg(pl.col("position").last(), pl.col("time").diff().max().alias("step"))
    assert (last["position"] == 0).all()
    assert (last["step"].dt.total_minutes() == 1).all()
    gap_lo = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=GAP[0])
    trades = res.trades.filter(pl.col("symbol") == "AAAUSDT")
    spans = trades.filter((pl.col("entry_time") < gap_lo) & (pl.col("exit_time") > gap_lo))
    assert spans.height == 0
    # the second AAAUSDT stretch continues with the first one's equity (continuous account)
    st = res.stretches.filter(pl.col("symbol") == "AAAUSDT").sort("start")
    assert st["start_equity"][1] == st["final_equity"][0]
    assert res.trades["pnl"].sum() == pytest.approx(res.totals["final_equity"] - res.totals["initial_cash"], abs=1e-6)
    # the combined curve: both symbols from initial cash, forward-filled
    allc = res.combined()
    assert res.initial_cash == 2 * EX.initial_cash
    assert allc["equity"][-1] == pytest.approx(res.totals["final_equity"])
    assert set(res.daily["symbol"].unique()) == {"AAAUSDT", "BBBUSDT", "ALL"}
    assert {"time", "symbol", "equity", "position", "price", "fees"} <= set(res.equity.columns)
    assert {"entry_time", "exit_time", "side", "qty", "entry_price", "exit_price", "pnl", "fees",
            "notional"} <= set(res.trades.columns)


# ------------------------------------------------------------------------------------------------------ filters


def long_set(n: int = 3000, seed: int = 1, vol: float = 0.003) -> SessionSet:
    """One symbol, one long continuous stretch (variable-length session set)."""
    d = synthetic_sessions(n_symbols=1, bars_per_symbol=n, length=10, volatility=vol, seed=seed)
    return replace(d, ctx_start=np.array([0]), start=np.array([d.context]), end=np.array([n]), length=0,
                   time=np.arange(n, dtype=np.int64) * 60_000_000)


def test_cooldown_blocks_trades() -> None:
    data = long_set()
    params = EnvParams()
    base = backtest_sessions(data, "random", EX, params)
    cd = backtest_sessions(data, "random", EX, params, BacktestFilters(cooldown_bars=7))
    t = cd.fills.filter(pl.col("kind") == "order")["time"].cast(pl.Int64).to_numpy() // 60_000_000
    assert len(t) > 5 and np.diff(t).min() >= 8
    assert cd.totals["fills"] < base.totals["fills"] and cd.totals["blocked_decisions"] > 0


def test_max_trades_per_day_caps() -> None:
    data = long_set(n=4 * DAY)
    res = backtest_sessions(data, "random", EX, EnvParams(), BacktestFilters(max_trades_per_day=3))
    per_day = (res.fills.filter(pl.col("kind") == "order")
               .group_by(pl.col("time").dt.truncate("1d")).len()["len"].to_numpy())
    assert len(per_day) == 4 and per_day.max() == 3


def test_stop_loss_and_take_profit_close() -> None:
    data = long_set(vol=0.004)
    sl, tp = 0.01, 0.015
    res = backtest_sessions(data, "buy_and_hold", EX, EnvParams(), BacktestFilters(stop_loss=sl, take_profit=tp))
    tr = res.trades
    reasons = set(tr["exit_reason"].drop_nulls().to_list())
    assert {"stop_loss", "take_profit"} <= reasons
    # the close was decided on the bar before the exit fill, when the move had crossed the threshold
    for row in tr.filter(pl.col("exit_reason").is_in(["stop_loss", "take_profit"])).iter_rows(named=True):
        i = int(np.searchsorted(data.time, int(np.datetime64(row["exit_time"].replace(tzinfo=None), "us")
                                                 .astype(np.int64))))
        move = data.close[i - 1] / row["entry_price"] - 1.0
        assert move <= -sl if row["exit_reason"] == "stop_loss" else move >= tp
    # without the filters buy & hold stays in until the end
    plain = backtest_sessions(data, "buy_and_hold", EX, EnvParams())
    assert plain.trades.height == 1 and plain.trades["exit_reason"][0] == "end_of_data"


def test_confidence_filter_on_model_scores() -> None:
    data = long_set(n=600)
    params = EnvParams()
    module = tiny_module(data, params.n_actions)
    loose = backtest_sessions(data, module, EX, params)
    strict = backtest_sessions(data, module, EX, params, BacktestFilters(confidence=0.999999))
    assert loose.totals["fills"] > strict.totals["fills"]
    assert strict.totals["blocked_decisions"] > 0


# --------------------------------------------------------------------------------------------------- causality


def test_no_look_ahead() -> None:
    data = long_set(n=1200, seed=4)
    params = EnvParams()
    cut = 700
    rng = np.random.default_rng(9)
    bumped = replace(data, features=data.features.copy(), close=data.close.copy(), open=data.open.copy(),
                     high=data.high.copy(), low=data.low.copy())
    bumped.features[cut:] = rng.normal(size=bumped.features[cut:].shape).astype(np.float32)
    for col in (bumped.open, bumped.high, bumped.low, bumped.close):
        col[cut:] *= 1.0 + rng.uniform(-0.05, 0.05, len(col) - cut)
    bumped.high[cut:] = np.maximum.reduce([bumped.high[cut:], bumped.open[cut:], bumped.close[cut:]])
    bumped.low[cut:] = np.minimum.reduce([bumped.low[cut:], bumped.open[cut:], bumped.close[cut:]])
    module = tiny_module(data, params.n_actions, seed=2)
    for policy in ("sma_cross", module):
        ra = backtest_sessions(data, policy, EX, params)
        rb = backtest_sessions(bumped, policy, EX, params)
        t_cut = pl.lit(int(data.time[cut])).cast(pl.Datetime("us", "UTC"))
        fa, fb = (r.fills.filter(pl.col("time") < t_cut) for r in (ra, rb))
        assert fa.height > 3 and fa.equals(fb)
        ea, eb = (r.for_symbol("SYM0USDT").filter(pl.col("time") <= t_cut) for r in (ra, rb))
        assert ea.equals(eb)


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_parameter(built: Settings) -> None:
    with pytest.raises(ConfigError, match=r"backtest\.policy: unknown policy 'nope'"):
        run_backtest(built, "nope")
    with pytest.raises(ConfigError, match=r"backtest\.split"):
        run_backtest(built, "flat", split="holdout")
    empty = built.model_copy(update={"sessions": built.sessions.model_copy(update={"splits": {
        **built.sessions.splits, "backtest": built.sessions.splits["backtest"].model_copy(
            update={"start": "2030-01-01", "end": "2030-02-01"})}})})
    with pytest.raises(DataError, match=r"sessions\.splits\.backtest: no gap-free stretch"):
        run_backtest(empty, "flat")
    with pytest.raises(ConfigError, match=r"backtest\.stop_loss"):
        BacktestFilters(stop_loss=1.5)
    with pytest.raises(ConfigError, match="lowrider"):
        backtest_sessions(long_set(n=200), "flat", replace(EX, market="spot"), EnvParams(mode="lowrider"),
                          BacktestFilters(stop_loss=0.01))


@pytest.mark.slow
def test_split_network_continuous_split(built: Settings) -> None:
    """The continuous run over real-shaped stretches (variable length, a gap) gives the generic path's result."""
    data = continuous_split(built, "backtest")
    execution, params = backtest_params(built)
    for name in NETS:
        module = small_net(name, data, params.n_actions, seed=3)
        assert_same_run(backtest_sessions(data, module, execution, params, chain=True),
                        backtest_sessions(data, module, execution, params, chain=True, fast=False))


def test_model_from_file(built: Settings, tmp_path: Path) -> None:
    data = continuous_split(built, "backtest")
    module = tiny_module(data, EnvParams().n_actions)
    path = tmp_path / "m.pt"
    torch.save(module, path)
    res = run_backtest(built, str(path))
    assert res.meta["policy"] == "tiny" and res.totals["bars"] == float((data.end - data.start).sum())
