"""The ``train`` stages: one function trains an algorithm on the train split, selects on val, compares with the
baselines on val, and records everything in MLflow (params, dataset fingerprint, git commit, metrics, plots, the
model with a signature). The CLI (``rltrader train <algo>``), ``dvc.yaml`` and the Prefect flow call it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from rltrader.agents import ALGORITHMS, TRAINED, VARIANTS
from rltrader.agents.baselines import rule_baselines
from rltrader.agents.common import mlflow_run
from rltrader.agents.configs import config_from_params
from rltrader.agents.evaluate import EvalResult, evaluate
from rltrader.agents.packaging import PolicyModule, save_policy, stamp_weights
from rltrader.config import TRAIN_SECTIONS, Settings, params_hash
from rltrader.dataset.split import SessionSet, load_split
from rltrader.env import params_from_settings
from rltrader.env.core import N_STATE
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.execution import ExecutionParams
from rltrader.integrity import train_producer, write_report
from rltrader.utils import git_commit

console = Console(stderr=True)


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    d = asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else dict(obj)
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_on_split(agent_name: str, agent_policy: Callable[..., np.ndarray], data: SessionSet,
                     execution: ExecutionParams, env_params: EnvParams, *, max_sessions: int | None,
                     seed: int = 0) -> list[dict[str, Any]]:
    """The agent and every rule baseline on the same sessions, net of costs; sorted by mean session return."""
    rows: list[dict[str, Any]] = []
    policies: list[tuple[str, Callable[..., np.ndarray]]] = [(agent_name, agent_policy)]
    policies += [(str(getattr(p, "name", "baseline")), p) for p in rule_baselines(env_params.mode, seed)]
    for name, policy in policies:
        res: EvalResult = evaluate(policy, data, execution, env_params, max_sessions=max_sessions, num_envs=1024)
        rows.append({"policy": name, **res.summary()})
    return sorted(rows, key=lambda r: -r["mean_return"])


def print_table(title: str, rows: list[dict[str, Any]], agent: str) -> str:
    """Rich table to the terminal, and a plain verdict line (no claim beyond the numbers)."""
    table = Table(title=title)
    for col in ("policy", "mean return %", "win rate %", "session Sharpe", "trades/session", "sessions"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for r in rows:
        table.add_row(r["policy"], f"{100 * r['mean_return']:.4f}", f"{100 * r['win_rate']:.1f}",
                      f"{r['session_sharpe']:.3f}", f"{r['trades_per_session']:.2f}", f"{int(r['sessions'])}")
    console.print(table)
    ours = next(r for r in rows if r["policy"] == agent)
    beaten = [r["policy"] for r in rows if r["policy"] != agent and r["mean_return"] >= ours["mean_return"]]
    verdict = (f"{agent} beats every baseline on this split (mean session return, net of costs)" if not beaten
               else f"{agent} does NOT beat: {', '.join(beaten)} (mean session return, net of costs)")
    console.print(verdict)
    return verdict


def _train_algo(algo: str, settings: Settings, train: SessionSet, val: SessionSet, execution: ExecutionParams,
                env_params: EnvParams, run: Any, resume: bool, progress: bool,
                overrides: dict[str, Any]) -> tuple[PolicyModule, list[dict[str, float]], Any]:
    ckpt = settings.train.checkpoint_dir
    section = {**getattr(settings, algo), **overrides}
    section.setdefault("seed", settings.train.seed)
    section.setdefault("device", settings.train.device)
    meta: dict[str, Any] = {"algo": algo, "feature_names": list(train.feature_names), "mode": env_params.mode,
            "action_names": list(env_params.action_names)}
    n_actions = env_params.n_actions
    feats = train.n_features + (1 if env_params.leak else 0)
    if algo == "d3qn":
        from rltrader.agents.configs import D3QNConfig
        from rltrader.agents.d3qn import train_d3qn

        dcfg = config_from_params(D3QNConfig, "d3qn", section)
        dres = train_d3qn(train, val, dcfg, execution, env_params, run=run, checkpoint_dir=ckpt, resume=resume,
                          progress=progress)
        dres.net.load_state_dict(dres.best_state)  # model selection on val
        meta.update(best_step=dres.best_step, steps_per_second=dres.steps_per_second)
        module = PolicyModule(dres.net.cpu(), "q_values", train.context, feats, N_STATE, n_actions, meta)
        return module, dres.history, dcfg
    if algo == "ppo":
        from rltrader.agents.configs import PPOConfig
        from rltrader.agents.ppo import train_ppo

        pcfg = config_from_params(PPOConfig, "ppo", section)
        pres = train_ppo(train, val, pcfg, execution, env_params, run=run, checkpoint_dir=ckpt, resume=resume,
                         progress=progress)
        pres.net.load_state_dict(pres.best_state)  # model selection on val
        meta.update(steps_per_second=pres.steps_per_second)
        module = PolicyModule(pres.net.cpu(), "logits", train.context, feats, N_STATE, n_actions, meta)
        return module, pres.history, pcfg
    if algo == "cnn":
        from rltrader.agents.cnn_classifier import ClassifierActions, train_cnn
        from rltrader.agents.configs import CNNConfig

        ccfg = config_from_params(CNNConfig, "cnn", section)
        cres = train_cnn(train, val, ccfg, run=run, progress=progress)
        actions = ClassifierActions(cres.net, ccfg.threshold, env_params.mode)
        module = PolicyModule(actions, "classifier", train.context, train.n_features, N_STATE, n_actions, meta)
        return module, cres.history, ccfg
    if algo == "xgb":
        from rltrader.agents.configs import XGBConfig
        from rltrader.agents.forecast_policy import train_xgb

        xcfg = config_from_params(XGBConfig, "xgb", section)
        xres = train_xgb(settings, train, xcfg, env_params.mode, run=run)
        meta.update(chosen=xres.chosen)
        module = PolicyModule(xres.net, "classifier", train.context, train.n_features, N_STATE, n_actions, meta)
        return module, xres.history, xcfg
    raise ConfigError(f"train: unknown algorithm {algo!r} (one of {', '.join(ALGORITHMS)})")


def variant_settings(settings: Settings, name: str) -> Settings:
    """The settings a trained variant (``agents.VARIANTS``) runs in: ``lowrider`` is the Lowrider mode on spot
    (no leverage, long only — what the rule-based Lowrider trades), with the settings' other env keys (its lots,
    budget, profit target). Anything else: the settings unchanged."""
    if name == "lowrider":
        return settings.model_copy(update={
            "env": replace(settings.env, mode="lowrider"),
            "execution": replace(settings.execution, market="spot", leverage=1.0)})
    return settings


def run_train(settings: Settings, algo: str, *, resume: bool = False, progress: bool = True,
              sessions_dir: Path | None = None, metrics_path: Path | None = None,
              overrides: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    """Train ``algo`` on train, select on val, compare with baselines on val, log to MLflow, save the model.

    ``name``: the model's name (file ``<models_dir>/<name>.pt``, resume record, MLflow tag
    ``rltrader.model_name``); default the algorithm's. Ensemble members are ``<algo>_s<seed>`` (``run_ensemble``).
    ``algo`` may be a variant (``agents.VARIANTS``): its algorithm trains in the variant's settings with the
    variant's own params section, under the variant's name (MLflow run, model file, checkpoints)."""
    if algo not in TRAINED:
        raise ConfigError(f"train: unknown algorithm {algo!r} (one of {', '.join(TRAINED)})")
    # the run is named by the algorithm whatever the model's name: the deflated Sharpe counts training runs by
    # algorithm (evaluate.stats.trials_run), and every seed of an ensemble is a configuration tried. A variant's
    # run carries its own name: it answers another question (the Lowrider table) and is no promotion candidate.
    run_name = algo
    if algo in VARIANTS:
        name, algo = algo, VARIANTS[algo]
        run_name = name
        t0 = settings.train
        settings = variant_settings(settings, name).model_copy(update={
            algo: getattr(settings, name), "train": t0.model_copy(update={"checkpoint_dir": t0.checkpoint_dir / name})})
    import mlflow

    name = name or algo
    sdir = sessions_dir or settings.data.dir / "sessions"
    train, val = load_split(sdir, "train"), load_split(sdir, "val")
    execution, env_params = params_from_settings(settings)
    t = settings.train
    run_file = t.checkpoint_dir / f"{name}.run_id"
    run_id = run_file.read_text().strip() if resume and run_file.exists() else None
    Path("mlflow").mkdir(exist_ok=True)
    if t.threads > 0:
        # small nets on few cores: one thread is faster than contended intra-op threads (measured 8× on 2 cores)
        torch.set_num_threads(t.threads)
    with mlflow_run(t.tracking_uri, t.experiment, run_name, t.artifact_root, run_id=run_id) as run:
        t.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(run.info.run_id)
        if run_id is None:
            mlflow.log_params({**_flat("execution.", execution), **_flat("env.", env_params), "algo": algo,
                               "seed": t.seed, "train_sessions": train.n_sessions, "val_sessions": val.n_sessions})
            _log_tags(settings, train, algo)
            mlflow.set_tag("rltrader.model_name", name)
            if run_name != algo:
                mlflow.set_tag("rltrader.variant", name)
        module, history, cfg = _train_algo(algo, settings, train, val, execution, env_params, run, resume, progress,
                                           overrides or {})
        if run_id is None:
            mlflow.log_params({k: v for k, v in _flat(f"{algo}.", cfg).items()})
        return publish_model(settings, name, module, history, run, val, execution, env_params, metrics_path,
                             stage=f"train@{name}")


def _log_tags(settings: Settings, train: SessionSet, algo: str) -> None:
    import mlflow

    mlflow.set_tags({"git_commit": git_commit() or "unknown", "algo": algo,
                     "data_fingerprint": json.dumps(train.meta.get("input_sha256", {}), sort_keys=True),
                     "dataset_code": json.dumps(train.meta.get("code", {}), sort_keys=True),
                     "params_hash": params_hash(settings, (*TRAIN_SECTIONS, algo))})


def publish_model(settings: Settings, name: str, module: PolicyModule, history: list[dict[str, float]], run: Any,
                  val: SessionSet, execution: ExecutionParams, env_params: EnvParams, metrics_path: Path | None,
                  *, stage: str) -> dict[str, Any]:
    """What every trained model gets, inside its MLflow run: the weights hash, the val table against the
    baselines, the plots, the logged model (signature, metadata), ``<models_dir>/<name>.pt`` with its integrity
    sidecar, and the metrics file the backtest and promote stages read (run id, model URI)."""
    import mlflow

    t = settings.train
    module.eval()
    module.meta["mlflow_run_id"] = run.info.run_id
    stamp_weights(module)  # the weights' hash travels in the pickled module: checked wherever it is loaded
    rows = compare_on_split(name, module.policy(), val, execution, env_params,
                            max_sessions=t.val_sessions, seed=t.seed)
    verdict = print_table(f"val split: {name} vs baselines", rows, name)
    ours = next(r for r in rows if r["policy"] == name)
    mlflow.log_metrics({f"val_{k}": float(v) for k, v in ours.items() if k != "policy"})
    mlflow.log_dict({"rows": rows, "verdict": verdict}, "val_comparison.json")
    from rltrader.agents.plots import plot_action_scores, plot_learning_curve

    art = Path(t.artifact_root).parent / "tmp" / run.info.run_id
    art.mkdir(parents=True, exist_ok=True)
    plot_learning_curve(history, art / "learning_curve.png", name)
    plot_action_scores(module, val, execution, env_params, art / "action_scores.png")
    mlflow.log_artifacts(str(art), "plots")
    example = module.example_input()
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = module(torch.from_numpy(example)).numpy()
    # pickle (not pt2): the loaded module keeps its attributes (context, feature and action names, algo)
    # that the backtest and the trader need; the metadata repeats them for the registry UI
    info = mlflow.pytorch.log_model(
        module, name="model", input_example=example, signature=infer_signature(example, out),
        serialization_format="pickle", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata={"context": module.context, "n_features": module.n_features, "n_state": module.n_state,
                  "n_actions": module.n_actions, **{k: v for k, v in module.meta.items()
                                                   if k in ("algo", "mode", "action_names", "feature_names")}})
    t.models_dir.mkdir(parents=True, exist_ok=True)
    save_policy(module, t.models_dir / f"{name}.pt", {"mlflow_run": run.info.run_id, "dvc_stage": stage})
    algo = name if name in VARIANTS else module.meta.get("algo", name)  # a variant is judged by its name
    result = {"algo": algo, "run_id": run.info.run_id, "model_uri": info.model_uri,
              "val": {k: v for k, v in ours.items() if k != "policy"}, "val_table": rows, "verdict": verdict,
              "params": module.meta}
    if metrics_path is not None:
        # the DVC metrics file stays small (what `dvc metrics show` lists); the full val table is the run's
        # val_comparison.json artifact. run_id / model_uri tell the promote stage which MLflow model this is.
        slim = {k: result[k] for k in ("algo", "run_id", "model_uri", "val", "verdict")}
        write_report(metrics_path, slim, train_producer(name))
    return result


def run_ensemble(settings: Settings, name: str, *, progress: bool = True, sessions_dir: Path | None = None,
                 metrics_path: Path | None = None, retrain: bool = False) -> dict[str, Any]:
    """``ensembles.<name>``: train ``algo`` once per seed (``<models_dir>/<algo>_s<seed>.pt``, each its own MLflow
    run and trial; a member file already there is reused unless ``retrain``), then publish their average
    (``agents.ensemble``) as the model ``<name>`` exactly like a trained model, so ``backtest.models`` and
    ``promote.candidates`` take it by name."""
    from rltrader.agents.ensemble import ensemble_module

    spec = settings.ensembles.get(name)
    if spec is None:
        raise ConfigError(f"ensembles: no ensemble {name!r} (defined: {', '.join(settings.ensembles) or 'none'})")
    if name in ALGORITHMS:
        raise ConfigError(f"ensembles.{name}: the name of an algorithm; call the ensemble e.g. {name}_ens")
    import mlflow
    from rltrader.agents.packaging import load_policy_file

    members: list[PolicyModule] = []
    for seed in spec.seeds:
        member = f"{spec.algo}_s{seed}"
        path = settings.train.models_dir / f"{member}.pt"
        if retrain or not path.is_file():
            run_train(settings, spec.algo, progress=progress, sessions_dir=sessions_dir, name=member,
                      overrides={"seed": seed},
                      metrics_path=None if metrics_path is None else metrics_path.with_name(f"train_{member}.json"))
        members.append(load_policy_file(path, {"dvc_stage": f"ensemble@{name}"}))
    module = ensemble_module(members, name)
    sdir = sessions_dir or settings.data.dir / "sessions"
    train, val = load_split(sdir, "train"), load_split(sdir, "val")
    execution, env_params = params_from_settings(settings)
    t = settings.train
    with mlflow_run(t.tracking_uri, t.experiment, "ensemble", t.artifact_root) as run:  # a trial too (stats)
        mlflow.log_params({"algo": f"ensemble:{spec.algo}", "seeds": json.dumps(spec.seeds),
                           "members": json.dumps(module.meta["members"])})
        _log_tags(settings, train, spec.algo)
        mlflow.set_tag("rltrader.model_name", name)
        return publish_model(settings, name, module, [], run, val, execution, env_params, metrics_path,
                             stage=f"ensemble@{name}")
