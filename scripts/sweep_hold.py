"""Issue 14 part 3: a small sweep of the env's hold settings, chosen on val only.

Each configuration (``env.decision_every``, ``env.min_hold_bars``, ``sessions.length``) trains D3QN with a short
budget — an MLflow run named ``d3qn`` in the settings' tracking store, tagged ``rltrader.sweep=hold``, so the
backtest's deflated Sharpe counts it (``evaluate.stats.trials_run``) — and is then judged by the continuous
backtest over the **val** split (same stretches for every configuration, whatever its session length; flat and
buy & hold beside it). Test and backtest are never read. The table goes to ``reports/sweep_hold.json``.

    python scripts/sweep_hold.py [--steps 30000] [--features data/features] [--work data/sweep_hold]

Features come from the features stage (``--features``); sessions are built per session length under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
from rltrader.agents.packaging import load_policy_file
from rltrader.config import Settings, load_settings
from rltrader.dataset.build import run_sessions_stage
from rltrader.evaluate.backtest import continuous_split, run_backtest
from rltrader.evaluate.metrics import compute_metrics
from rltrader.train import run_train

CONFIGS: list[dict[str, int]] = [
    {"decision_every": 1, "min_hold_bars": 0, "length": 10},   # today's defaults (the seed's 10-bar sessions)
    {"decision_every": 5, "min_hold_bars": 0, "length": 60},
    {"decision_every": 1, "min_hold_bars": 10, "length": 60},
    {"decision_every": 5, "min_hold_bars": 10, "length": 60},
    {"decision_every": 15, "min_hold_bars": 0, "length": 240},
    {"decision_every": 15, "min_hold_bars": 10, "length": 240},
]


def configured(base: Settings, cfg: dict[str, int], work: Path, steps: int, seed: int) -> Settings:
    length = cfg["length"]
    d3qn = {**base.d3qn, "total_steps": steps, "learning_starts": max(1000, steps // 10),
            "eps_decay_steps": steps // 2, "buffer_size": max(steps, 20_000), "eval_every": steps // 3,
            "eval_sessions": 300, "checkpoint_every": 0}
    return base.model_copy(update={
        "sessions": base.sessions.model_copy(update={"length": length, "stride": length}),
        "env": replace(base.env, decision_every=cfg["decision_every"], min_hold_bars=cfg["min_hold_bars"]),
        "train": base.train.model_copy(update={"models_dir": work / "models", "checkpoint_dir": work / "ckpt",
                                               "val_sessions": 300, "seed": seed}),
        "d3qn": d3qn,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30_000)
    ap.add_argument("--features", type=Path, default=Path("data/features"))
    ap.add_argument("--work", type=Path, default=Path("data/sweep_hold"))
    ap.add_argument("--out", type=Path, default=Path("reports/sweep_hold.json"))
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run (default all)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of the runs (a second seed: robustness)")
    args = ap.parse_args()
    base = load_settings()
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    done = {(r["decision_every"], r["min_hold_bars"], r["length"], r.get("seed", 0)) for r in rows}
    val_data: dict[int, Any] = {}
    for i, cfg in enumerate(CONFIGS):
        key = (cfg["decision_every"], cfg["min_hold_bars"], cfg["length"], args.seed)
        if (args.only and i not in args.only) or key in done:
            continue
        t0 = time.perf_counter()
        sdir = args.work / f"sessions_len{cfg['length']}"
        settings = configured(base, cfg, args.work, args.steps, args.seed)
        if not (sdir / "val").exists():
            run_sessions_stage(settings, features_dir=args.features, out_dir=sdir)
        res = run_train(settings, "d3qn", progress=False, sessions_dir=sdir)
        with mlflow.start_run(run_id=res["run_id"]):
            mlflow.set_tags({"rltrader.sweep": "hold", "sweep.seed": str(args.seed),
                             **{f"sweep.{k}": str(v) for k, v in cfg.items()}})
        module = load_policy_file(settings.train.models_dir / "d3qn.pt", {"dvc_stage": "train@d3qn"})
        train_s = time.perf_counter() - t0
        if cfg["length"] not in val_data:
            val_data[cfg["length"]] = continuous_split(settings, "val", sessions_dir=sdir, features_dir=args.features)
        row: dict[str, Any] = {**cfg, "seed": args.seed, "run_id": res["run_id"], "train_seconds": round(train_s, 1)}
        for name, pol in (("agent", module), ("buy_and_hold", "buy_and_hold")):
            bt = run_backtest(settings, pol, split="val", data=val_data[cfg["length"]])
            m = compute_metrics(bt.equity, bt.trades, initial_cash=bt.initial_cash, bootstrap=0)
            row[f"{name}_return"] = m["total_return"]
            row[f"{name}_sharpe"] = m["sharpe_daily_annualized"]
            row[f"{name}_max_dd"] = m["max_drawdown"]
            row[f"{name}_trades_per_day"] = m["trades_per_day"]
        row["val_sessions_mean_return"] = res["val"].get("mean_return")
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"criterion": "val continuous backtest Sharpe (daily, annualised)",
                                        "steps": args.steps, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
