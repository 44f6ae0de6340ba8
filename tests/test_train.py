"""Train stage: MLflow run with params, fingerprint, commit, metrics, plots and a loadable model; the val table
compares with every baseline; baselines themselves are causal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_sessions import fill_store, make_settings

import mlflow
from rltrader.agents.baselines import SMACross, rule_baselines
from rltrader.agents.evaluate import evaluate
from rltrader.config import Settings
from rltrader.dataset.build import run_features_stage, run_sessions_stage
from rltrader.env.modes import EnvParams
from rltrader.env.synthetic import synthetic_sessions
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams
from rltrader.train import run_train

pytestmark = pytest.mark.slow  # training / DVC / Prefect / MLflow server: tens of seconds each


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("train")
    base = make_settings(tmp)
    run_features_stage(base, fill_store(tmp))
    run_sessions_stage(base)
    d = base.model_dump(mode="json")
    d["train"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_root": str(tmp / "artifacts"),
                  "checkpoint_dir": str(tmp / "ckpt"), "models_dir": str(tmp / "models"), "val_sessions": 200}
    d["cnn"] = {"epochs": 1, "max_samples": 3000, "net": {"channels": 8, "hidden": 16}}
    d["d3qn"] = {"total_steps": 1200, "num_envs": 16, "learning_starts": 200, "batch_size": 32, "buffer_size": 5000,
                 "eval_every": 600, "eval_sessions": 50, "checkpoint_every": 600,
                 "net": {"channels": 8, "hidden": 16}}
    d["ppo"] = {"total_steps": 1024, "num_envs": 16, "rollout_steps": 16, "eval_every": 512, "eval_max_sessions": 50,
                "checkpoint_every": 512, "net": {"channels": 8, "hidden": 16, "tcn_levels": 2}}
    return Settings.model_validate(d)


@pytest.mark.parametrize("algo", ["cnn", "d3qn", "ppo"])
def test_train_logs_a_complete_mlflow_run(settings: Settings, algo: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the stage creates ./mlflow for the embedded default; keep it out of the repo
    result = run_train(settings, algo, progress=False, metrics_path=tmp_path / "m.json")
    assert (tmp_path / "m.json").exists()
    policies = {r["policy"] for r in result["val_table"]}
    assert policies == {algo, "flat", "buy_and_hold", "random", "sma_cross"}
    # the verdict follows the table: "beats every baseline" exactly when no baseline's mean return is as high
    ours = next(r["mean_return"] for r in result["val_table"] if r["policy"] == algo)
    beaten_by = sorted(r["policy"] for r in result["val_table"]
                       if r["policy"] != algo and r["mean_return"] >= ours)
    if beaten_by:
        assert result["verdict"].startswith(f"{algo} does NOT beat: ")
        assert all(p in result["verdict"] for p in beaten_by)
    else:
        assert result["verdict"].startswith(f"{algo} beats every baseline")

    client = mlflow.MlflowClient(settings.train.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["algo"] == algo and run.data.tags["git_commit"]
    assert "AAAUSDT" in run.data.tags["data_fingerprint"]
    assert "val_mean_return" in run.data.metrics and "execution.taker_fee" in run.data.params
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "plots")}
    assert artifacts == {"plots/learning_curve.png", "plots/action_scores.png"}

    model = mlflow.pytorch.load_model(result["model_uri"])
    saved = torch.load(settings.train.models_dir / f"{algo}.pt", weights_only=False)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, model.context * model.n_features + model.n_state))
                         .astype(np.float32))
    with torch.no_grad():
        assert torch.equal(model(x), saved(x))
    assert model(x).shape == (5, 4)


def test_lowrider_variant_trains_d3qn_in_lowrider_mode(settings: Settings, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``rltrader train lowrider`` (train@lowrider): D3QN with the ``lowrider`` section, in Lowrider mode on spot,
    under its own name (MLflow run, model file, checkpoints) — the d3qn model is left alone."""
    monkeypatch.chdir(tmp_path)
    s = settings.model_copy(update={"lowrider": {**settings.d3qn, "total_steps": 800}})
    result = run_train(s, "lowrider", progress=False, metrics_path=tmp_path / "train_lowrider.json")
    assert json.loads((tmp_path / "train_lowrider.json").read_text())["algo"] == "lowrider"
    assert {r["policy"] for r in result["val_table"]} >= {"lowrider", "flat", "lowrider_rule"}
    run = mlflow.MlflowClient(settings.train.tracking_uri).get_run(result["run_id"])
    assert run.info.run_name == "lowrider" and run.data.tags["rltrader.variant"] == "lowrider"
    assert run.data.params["env.mode"] == "lowrider" and run.data.params["execution.market"] == "spot"
    assert run.data.params["d3qn.total_steps"] == "800"
    saved = torch.load(settings.train.models_dir / "lowrider.pt", weights_only=False)
    assert saved.meta["mode"] == "lowrider" and saved.n_actions == len(settings.env.lot_multipliers)
    assert (settings.train.checkpoint_dir / "lowrider" / "lowrider.run_id").is_file()


def test_unknown_algorithm_is_named(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="unknown algorithm 'sac'"):
        run_train(settings, "sac", progress=False)


def test_bad_algorithm_config_names_the_key(settings: Settings, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"cnn\.threshold"):
        run_train(settings, "cnn", progress=False, overrides={"threshold": 0.2})


def test_baselines_on_the_same_evaluation() -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=300, n_features=4, seed=3)
    ex, ep = ExecutionParams(), EnvParams()
    results: dict[str, Any] = {p.name: evaluate(p, data, ex, ep) for p in rule_baselines(ep.mode)}
    assert results["flat"].mean_return == 0.0 and results["flat"].trades.sum() == 0
    # buy & hold: one entry and the forced close per session, always net of the fees paid
    assert (results["buy_and_hold"].trades == 2).all()
    assert results["random"].trades.mean() > results["sma_cross"].trades.mean()


def test_sma_cross_reads_only_closed_bars() -> None:
    """Changing bars at or after each decision row leaves the SMA decisions unchanged."""
    data = synthetic_sessions(n_symbols=1, bars_per_symbol=300, n_features=4, seed=4)
    ex, ep = ExecutionParams(), EnvParams()
    from rltrader.env.batch import BatchSessionEnv

    env = BatchSessionEnv(data, ex, ep, num_envs=data.n_sessions,
                          session_schedule=np.arange(data.n_sessions)[:, None])
    window, state, mask = env.reset(seed=0)
    sma = SMACross(ep.mode)
    sma.bind(env)
    before = sma(window, state, mask)
    t = env.core.ptr[0].copy()
    original = env.core.bars.copy()
    for b in range(env.num_envs):
        env.core.bars[3, t[b]:] *= 1.5  # account b's future (its decision row and later)
        sma.bind(env)
        assert sma(window, state, mask)[b] == before[b]
        env.core.bars[...] = original
    # the newest closed bar does matter: ×3 lifts the fast SMA above the slow one, ×0.1 sinks it below
    for factor, up in ((3.0, True), (0.1, False)):
        env.core.bars[3, t[0] - 1] *= factor
        sma.bind(env)
        assert sma.up[t[0]] == up
        env.core.bars[...] = original
