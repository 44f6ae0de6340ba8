"""Multi-seed ensembles (``agents.ensemble``, ``rltrader ensemble``): a one-member ensemble is the single model,
members must match, and an ensemble goes through the same train record, backtest stage and registry promotion
as any trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sessions import TINY_D3QN, make_settings, training_settings

from rltrader import registry
from rltrader.agents.configs import NetConfig
from rltrader.agents.ensemble import ensemble_module
from rltrader.agents.networks import ActorCritic, DuelingQNet
from rltrader.agents.packaging import PolicyModule, load_mlflow_policy, load_policy_file
from rltrader.config import Settings
from rltrader.env.core import N_STATE
from rltrader.errors import ConfigError
from rltrader.evaluate.backtest import backtest_params, backtest_sessions, continuous_split, masked_softmax
from rltrader.evaluate.filters import BacktestFilters
from rltrader.evaluate.stage import run_backtest_stage
from rltrader.integrity import BACKTEST_PRODUCER, write_report
from rltrader.train import run_ensemble

NET = NetConfig(encoder="cnn", channels=8, hidden=16)


def _random(kind: str, seed: int, context: int = 10, n_features: int = 6, n_actions: int = 4) -> PolicyModule:
    torch.manual_seed(seed)
    cls = DuelingQNet if kind == "q_values" else ActorCritic
    net = cls(n_features, context, N_STATE, n_actions, NET)
    return PolicyModule(net, kind, context, n_features, N_STATE, n_actions, {"algo": "x", "mode": "futures_session"})


@pytest.mark.parametrize("kind", ["q_values", "logits"])
def test_one_member_ensemble_scores_like_the_single_model(kind: str) -> None:
    single = _random(kind, 0).eval()
    ens = ensemble_module([single], "one").eval()
    rng = np.random.default_rng(0)
    window = rng.standard_normal((256, 10, 6)).astype(np.float32)
    state = rng.standard_normal((256, N_STATE)).astype(np.float32)
    mask = rng.random((256, 4)) < 0.7
    mask[:, 0] = True
    a, b = single.scores(window, state), ens.scores(window, state)
    if kind == "q_values":
        assert np.array_equal(a, b)
    pa, ga = masked_softmax(a, mask)
    pb, gb = masked_softmax(b, mask)
    assert np.array_equal(ga, gb)
    np.testing.assert_allclose(pa, pb, atol=1e-6)


def test_ensemble_averages_q_values_and_probabilities() -> None:
    rng = np.random.default_rng(1)
    window = rng.standard_normal((32, 10, 6)).astype(np.float32)
    state = rng.standard_normal((32, N_STATE)).astype(np.float32)
    q = [_random("q_values", s).eval() for s in (0, 1, 2)]
    np.testing.assert_allclose(ensemble_module(q, "q").scores(window, state),
                               np.mean([m.scores(window, state) for m in q], axis=0), rtol=1e-5, atol=1e-6)
    p = [_random("logits", s).eval() for s in (0, 1)]
    probs = np.mean([torch.softmax(torch.from_numpy(m.scores(window, state)), 1).numpy() for m in p], axis=0)
    np.testing.assert_allclose(np.exp(ensemble_module(p, "p").scores(window, state)), probs, rtol=1e-5)


def test_members_must_match() -> None:
    with pytest.raises(ConfigError, match="member 1 has kind"):
        ensemble_module([_random("q_values", 0), _random("logits", 1)], "mixed")
    with pytest.raises(ConfigError, match="member 1 has context"):
        ensemble_module([_random("q_values", 0), _random("q_values", 1, context=12)], "ctx")
    with pytest.raises(ConfigError, match="no members"):
        ensemble_module([], "none")


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    tmp = tmp_path_factory.mktemp("ens")
    settings = training_settings(
        tmp, d3qn=TINY_D3QN,
        ensembles={"d3qn_ens": {"algo": "d3qn", "seeds": [0, 1]}, "d3qn_one": {"algo": "d3qn", "seeds": [1]}},
        backtest={"models": ["d3qn_ens", "d3qn_one", "d3qn_s1"], "lowrider_models": [], "bootstrap": 200},
        promote={"candidates": ["d3qn_ens"]})
    reports = tmp / "reports"
    run_ensemble(settings, "d3qn_ens", progress=False, metrics_path=reports / "train_d3qn_ens.json")
    run_ensemble(settings, "d3qn_one", progress=False, metrics_path=reports / "train_d3qn_one.json")
    run_backtest_stage(settings, out_dir=reports / "backtest", metrics_path=reports / "backtest.json",
                       reports_dir=reports)
    return settings, reports


@pytest.mark.slow
def test_ensemble_is_published_judged_and_promoted_like_a_model(ensembled: tuple[Settings, Path]) -> None:
    settings, reports = ensembled
    models = settings.train.models_dir
    for name in ("d3qn_s0", "d3qn_s1", "d3qn_ens", "d3qn_one"):
        assert (models / f"{name}.pt").is_file() and (models / f"{name}.pt.integrity.json").is_file()
    ens = load_policy_file(models / "d3qn_ens.pt")
    assert ens.kind == "q_values" and len(ens.meta["members"]) == 2
    assert len({m["mlflow_run_id"] for m in ens.meta["members"]}) == 2  # two training runs, two trials
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    assert summary["trials_counted"]["mlflow_runs"] == 4  # d3qn_s0, d3qn_s1 and the two ensembles
    rec = json.loads((reports / "train_d3qn_ens.json").read_text())
    assert rec["run_id"] and rec["model_uri"]

    metrics = json.loads((reports / "backtest.json").read_text())
    for split in ("val", "backtest"):
        assert {"d3qn_ens", "flat", "buy_and_hold"} <= set(metrics[split])
        assert "sharpe_ci_low" in metrics[split]["d3qn_ens"] and "spa_pvalue_vs_flat" in metrics[split]["d3qn_ens"]
        # a one-member ensemble trades exactly like its member (the member file, run separately)
        for key in ("total_return", "n_trades", "max_drawdown"):
            assert metrics[split]["d3qn_one"][key] == metrics[split]["d3qn_s1"][key], (split, key)

    for split in ("val", "backtest"):
        summary["metrics"][split]["d3qn_ens"].update(sharpe_daily_annualized=9.0, total_return=0.5, max_drawdown=0.01)
    doctored = reports / "doctored.json"
    write_report(doctored, summary, BACKTEST_PRODUCER)  # re-signed: an edited summary is otherwise refused
    decision = registry.promote(settings, summary_path=doctored)
    assert decision.promoted and decision.challenger == "d3qn_ens"
    champion = load_mlflow_policy(f"models:/{settings.promote.model_name}@champion")
    rng = np.random.default_rng(0)
    window = rng.standard_normal((16, ens.context, ens.n_features)).astype(np.float32)
    state = np.zeros((16, N_STATE), np.float32)
    assert np.array_equal(champion.scores(window, state), ens.scores(window, state))


@pytest.mark.slow
def test_one_member_ensemble_backtests_like_its_member(ensembled: tuple[Settings, Path]) -> None:
    """Same fills on the generic path (the ensemble) as the member's split path."""
    settings, _ = ensembled
    one = load_policy_file(settings.train.models_dir / "d3qn_one.pt")
    member = load_policy_file(settings.train.models_dir / "d3qn_s1.pt")
    data = continuous_split(settings, "val")
    execution, env_params = backtest_params(settings)
    a = backtest_sessions(data, one, execution, env_params, chain=True, filters=BacktestFilters())
    b = backtest_sessions(data, member, execution, env_params, chain=True, filters=BacktestFilters())
    assert a.meta["path"].startswith("stepped") and b.meta["path"].startswith("split")
    assert a.totals == b.totals


def test_unknown_ensemble_and_algorithm_names(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(ConfigError, match="no ensemble 'nope'"):
        run_ensemble(settings, "nope")
    bad = Settings.model_validate({**settings.model_dump(mode="json"),
                                   "ensembles": {"d3qn": {"algo": "d3qn", "seeds": [0]}}})
    with pytest.raises(ConfigError, match="the name of an algorithm"):
        run_ensemble(bad, "d3qn")
