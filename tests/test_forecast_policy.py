"""The XGBoost threshold policy (``rltrader train xgb``) goes through the same path as every agent: trained by
``run_train`` (val only for its choices), saved with its integrity sidecar and its booster under the weights hash,
judged by the backtest stage on val and backtest with bootstrap CIs next to the baselines, registered and promoted
by ``registry.promote`` from ``promote.candidates``, and re-loaded from the MLflow registry as the champion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_sessions import training_settings

from rltrader import registry
from rltrader.agents.configs import XGBConfig
from rltrader.agents.forecast_policy import ForecastActions, XGBForecaster
from rltrader.agents.packaging import PolicyModule, check_weights, load_mlflow_policy, load_policy_file
from rltrader.config import Settings
from rltrader.env.core import N_STATE
from rltrader.env.modes import FuturesAction
from rltrader.errors import ConfigError, DataError
from rltrader.evaluate.backtest import backtest_params, backtest_sessions, continuous_split
from rltrader.evaluate.filters import BacktestFilters
from rltrader.evaluate.stage import run_backtest_stage
from rltrader.integrity import BACKTEST_PRODUCER, write_report
from rltrader.train import run_train

XGB_TINY = {"horizons": [5, 15], "thresholds": [0, 0.1], "rounds": 20, "min_trades": 5, "train_stride": 2,
            "vol_window": 4}  # the test features' only rv window is 4 bars; the synthetic costs are ~90 bps


@pytest.fixture(scope="module")
def trained_xgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    tmp = tmp_path_factory.mktemp("xgb")
    settings = training_settings(tmp, xgb=XGB_TINY,
                                 backtest={"models": ["xgb"], "lowrider_models": [], "bootstrap": 200},
                                 promote={"candidates": ["d3qn", "ppo", "xgb"]})
    reports = tmp / "reports"
    run_train(settings, "xgb", progress=False, metrics_path=reports / "train_xgb.json")
    run_backtest_stage(settings, out_dir=reports / "backtest", metrics_path=reports / "backtest.json",
                       reports_dir=reports)
    return settings, reports


@pytest.mark.slow
def test_xgb_is_trained_saved_and_judged_like_the_agents(trained_xgb: tuple[Settings, Path]) -> None:
    settings, reports = trained_xgb
    path = settings.train.models_dir / "xgb.pt"
    origin = json.loads(Path(f"{path}.integrity.json").read_text())
    assert origin["origin"]["dvc_stage"] == "train@xgb"
    module = load_policy_file(path)
    assert isinstance(module.net, ForecastActions) and module.kind == "classifier"
    chosen = module.meta["chosen"]
    assert chosen["horizon"] in XGB_TINY["horizons"] and chosen["k"] in XGB_TINY["thresholds"]
    assert chosen["val_trades"] >= XGB_TINY["min_trades"]
    rec = json.loads((reports / "train_xgb.json").read_text())
    assert rec["algo"] == "xgb" and rec["model_uri"] and rec["val"]["sessions"] > 0

    # the backtest stage lists it on val and backtest with bootstrap CIs, next to the baselines
    metrics = json.loads((reports / "backtest.json").read_text())
    for split in ("val", "backtest"):
        assert {"xgb", "flat", "buy_and_hold", "random", "sma_cross"} <= set(metrics[split])
        m = metrics[split]["xgb"]
        assert m["sharpe_ci_low"] is None or m["sharpe_ci_low"] <= m["sharpe_daily_annualized"] <= m["sharpe_ci_high"]
        assert "spa_pvalue_vs_flat" in m
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    assert any("xgb" in v for v in summary["verdicts"]["backtest"])
    assert (reports / "backtest" / "xgb" / "report.html").is_file()


@pytest.mark.slow
def test_xgb_split_backtest_equals_the_generic_path(trained_xgb: tuple[Settings, Path]) -> None:
    """The forecast precomputed in blocks + the classifier head in numba = the module's forward bar by bar."""
    settings, _ = trained_xgb
    module = load_policy_file(settings.train.models_dir / "xgb.pt")
    data = continuous_split(settings, "val")
    execution, env_params = backtest_params(settings)
    fast = backtest_sessions(data, module, execution, env_params, chain=True, filters=BacktestFilters())
    slow = backtest_sessions(data, module, execution, env_params, chain=True, filters=BacktestFilters(), fast=False)
    assert fast.meta["path"].startswith("split network") and slow.meta["path"].startswith("stepped")
    assert fast.totals == slow.totals
    assert fast.fills.equals(slow.fills)


@pytest.mark.slow
def test_xgb_is_promoted_through_the_registry(trained_xgb: tuple[Settings, Path]) -> None:
    """A challenger from ``promote.candidates``: registered, gated against the baselines, aliased champion, and the
    registry's model scores like the file (the trees travel inside the logged module)."""
    settings, reports = trained_xgb
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    for split in ("val", "backtest"):  # chosen numbers that pass every gate (the real ones are the stage's)
        summary["metrics"][split]["xgb"].update(sharpe_daily_annualized=9.0, total_return=0.5, max_drawdown=0.01)
    doctored = reports / "doctored.json"
    write_report(doctored, summary, BACKTEST_PRODUCER)  # re-signed: an edited summary is otherwise refused
    decision = registry.promote(settings, summary_path=doctored)
    assert decision.promoted and decision.challenger == "xgb" and all(g.passed for g in decision.gates)
    champion = load_mlflow_policy(f"models:/{settings.promote.model_name}@champion")
    local = load_policy_file(settings.train.models_dir / "xgb.pt")
    rng = np.random.default_rng(0)
    window = rng.standard_normal((64, local.context, local.n_features)).astype(np.float32)
    state = np.zeros((64, N_STATE), np.float32)
    assert np.array_equal(champion.scores(window, state), local.scores(window, state))
    refused = registry.promote(settings, summary_path=reports / "backtest" / "summary.json")
    assert refused.challenger == "xgb"  # the real numbers decide the same way: gates, not the model kind


@pytest.mark.slow
def test_the_weights_hash_covers_the_trees(trained_xgb: tuple[Settings, Path]) -> None:
    settings, _ = trained_xgb
    module = load_policy_file(settings.train.models_dir / "xgb.pt")
    module.net.forecaster.booster_raw[len(module.net.forecaster.booster_raw) // 2] ^= 1
    with pytest.raises(DataError, match="weights are corrupt"):
        check_weights(module, "xgb.pt")


def _module(k: float, mode: str = "futures_session") -> PolicyModule:
    """A real booster on a planted linear signal in feature 0; σ from feature 1."""
    import xgboost as xgb

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 3)).astype(np.float32)
    bst = xgb.train({"max_depth": 2, "eta": 0.5, "nthread": 1, "seed": 0}, xgb.DMatrix(x, label=x[:, 0]), 20)
    fc = XGBForecaster(bytes(bst.save_raw("ubj")), sigma_col=1, sigma_mean=0.01, sigma_std=0.001, horizon=4,
                       cost=0.02)
    n_actions = len(FuturesAction)
    return PolicyModule(ForecastActions(fc, k, mode), "classifier", 2, 3, N_STATE, n_actions, {"algo": "xgb"})


def test_threshold_rule_trades_only_past_k_times_cost_and_holds_until_it_flips() -> None:
    module = _module(k=1.0)
    fc = module.net.forecaster
    window = np.zeros((6, 2, 3), np.float32)
    window[:, -1, 0] = [-3, -0.05, 0.0, 0.05, 3, 3]  # the planted signal: forecast ≈ feature 0
    state = np.zeros((6, N_STATE), np.float32)
    state[5, 0] = 1.0  # already long
    p = fc.forecast(window[:, -1])
    f = fc.booster().inplace_predict(window[:, -1])
    np.testing.assert_allclose(p, f * 0.01 * 2 / 0.02, rtol=1e-5)  # f·σ·√h / cost
    acts = module.scores(window, state).argmax(axis=1)
    assert acts[0] == FuturesAction.SHORT and acts[4] == FuturesAction.LONG
    assert (acts[1:4] == FuturesAction.HOLD).all()  # |forecast| below k × cost: no order
    assert acts[5] == FuturesAction.HOLD  # long and the forecast still says long: hold
    with pytest.raises(ConfigError, match="futures_session or spot_cycle"):
        _module(k=1.0, mode="lowrider")


def test_xgb_config_refuses_choosing_on_the_train_split() -> None:
    with pytest.raises(ConfigError, match="select_split"):
        XGBConfig(select_split="train")
    with pytest.raises(ConfigError, match="thresholds"):
        XGBConfig(thresholds=[-1.0])


def test_pickled_module_round_trips_without_the_live_booster(tmp_path: Path) -> None:
    module = _module(k=0.5)
    window = np.random.default_rng(2).standard_normal((8, 2, 3)).astype(np.float32)
    state = np.zeros((8, N_STATE), np.float32)
    before = module.scores(window, state)  # builds the cached booster
    torch.save(module, tmp_path / "m.pt")
    loaded: Any = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.net.forecaster._booster is None
    assert np.array_equal(loaded.scores(window, state), before)


@pytest.mark.slow
def test_no_qualifying_threshold_on_val_gives_a_policy_that_never_trades(trained_xgb: tuple[Settings, Path]) -> None:
    """Nothing to claim on val: k = ∞ (flat), said so, instead of an edge picked anyway or a failed pipeline."""
    from rltrader.agents.forecast_policy import train_xgb
    from rltrader.dataset.split import load_split

    settings, _ = trained_xgb
    train = load_split(settings.data.dir / "sessions", "train")
    cfg = XGBConfig(**{**XGB_TINY, "thresholds": [1e6]})
    res = train_xgb(settings, train, cfg, "futures_session")
    assert res.chosen["k"] == float("inf") and res.chosen["val_trades"] == 0
    module = PolicyModule(res.net, "classifier", train.context, train.n_features, N_STATE, len(FuturesAction), {})
    data = continuous_split(settings, "val")
    execution, env_params = backtest_params(settings)
    out = backtest_sessions(data, module, execution, env_params, chain=True, filters=BacktestFilters())
    assert out.totals["fills"] == 0
