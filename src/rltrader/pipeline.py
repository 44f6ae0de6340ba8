"""The whole pipeline as plain function calls, in ``dvc.yaml``'s order: ingest → features → sessions → study →
train → backtest → promote. ``dvc repro`` is the usual way to run it (it skips what did not change); this is the same
chain for callers without a DVC repo around them — the Prefect ``nightly_retrain`` flow's fallback, and tests.
Each step is the very function its DVC stage's CLI command calls, writing the same files under ``reports_dir``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from rltrader.config import Settings

console = Console(stderr=True)
STAGES = ("ingest", "features", "sessions", "study", "train", "ensemble", "backtest", "promote")
"""The stages in order; ``dvc.yaml`` declares the same ones (``tests/test_structure.py`` checks both). ``train``
runs once per trained model (``backtest.models``, by default every algorithm of ``rltrader.agents.ALGORITHMS``, and
``backtest.lowrider_models``, by default the ``lowrider`` variant — as dvc.yaml's ``train`` foreach); ``ensemble``
builds the ``ensembles`` judged by the backtest (members retrained: a member file left from other params must never
be reused), as dvc.yaml's ``ensemble`` stage does for the default ``d3qn_ens``."""


def run_pipeline(settings: Settings, *, reports_dir: Path = Path("reports"), progress: bool = False,
                 on_stage: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run every stage; returns each stage's result and its wall time. ``on_stage(name, seconds)`` is called
    after each (the flow logs it)."""
    from rltrader.data.ingest import run_ingest_stage
    from rltrader.data.store import open_store
    from rltrader.dataset.build import run_features_stage, run_sessions_stage
    from rltrader.evaluate.stage import run_backtest_stage
    from rltrader.registry import promote
    from rltrader.study.stage import run_study_stage
    from rltrader.train import run_ensemble, run_train
    from rltrader.utils import write_json

    out: dict[str, Any] = {"seconds": {}}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
        console.print(f"pipeline: {name} done in {out['seconds'][name]:.1f} s")
        if on_stage is not None:
            on_stage(name, out["seconds"][name])
        return result

    store = open_store(settings.data.store_url, settings.data.dir, settings.postgres.bounds())
    try:
        out["ingest"] = timed("ingest", lambda: run_ingest_stage(settings, store, reports_dir / "ingest.json",
                                                                 progress=progress))
        features = timed("features", lambda: run_features_stage(settings, store))
    finally:
        store.close()
    write_json(reports_dir / "features.json", features)
    out["sessions"] = timed("sessions", lambda: run_sessions_stage(
        settings, metrics_path=reports_dir / "sessions.json", plot_path=reports_dir / "plots" / "sessions.png"))
    out["study"] = timed("study", lambda: run_study_stage(
        settings, out_dir=reports_dir / "study", metrics_path=reports_dir / "study.json")["verdicts"])
    out["train"] = {algo: timed(f"train@{algo}", lambda a=algo: run_train(   # type: ignore[misc]
        settings, a, progress=progress, metrics_path=reports_dir / f"train_{a}.json"))
        for algo in dict.fromkeys([*settings.backtest.models, *settings.backtest.lowrider_models])
        if algo not in settings.ensembles}
    out["ensemble"] = {name: timed(f"ensemble@{name}", lambda n=name: run_ensemble(  # type: ignore[misc]
        settings, n, progress=progress, retrain=True, metrics_path=reports_dir / f"train_{n}.json"))
        for name in settings.ensembles if name in settings.backtest.models}
    out["backtest"] = timed("backtest", lambda: run_backtest_stage(
        settings, out_dir=reports_dir / "backtest", metrics_path=reports_dir / "backtest.json",
        reports_dir=reports_dir))
    decision = timed("promote", lambda: promote(settings, summary_path=reports_dir / "backtest" / "summary.json",
                                                decision_path=reports_dir / "promotion.json"))
    console.print(decision.summary())
    out["promote"] = decision.as_dict()
    return out
