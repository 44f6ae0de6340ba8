"""Lists that live in more than one place cannot drift: the algorithms (``rltrader.agents.ALGORITHMS``), the
stage chain (``rltrader.pipeline.STAGES``) and dvc.yaml, which cannot import Python and repeats them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rltrader.agents import ALGORITHMS, TRAINED, VARIANTS
from rltrader.agents.configs import CONFIGS
from rltrader.config import Settings
from rltrader.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]


def _dvc() -> dict[str, Any]:
    tree: dict[str, Any] = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return tree


def test_dvc_stages_are_the_pipeline_chain() -> None:
    assert tuple(_dvc()["stages"]) == STAGES


def test_dvc_train_foreach_is_the_algorithm_registry() -> None:
    stages = _dvc()["stages"]
    assert tuple(stages["train"]["foreach"]) == TRAINED
    deps = stages["backtest"]["deps"]
    ensembles = yaml.safe_load((REPO / "params.yaml").read_text())["ensembles"]
    assert {d for d in deps if str(d).startswith("reports/train_")} == {f"reports/train_{a}.json"
                                                                       for a in (*TRAINED, *ensembles)}


def test_dvc_ensemble_stage_builds_the_default_ensembles() -> None:
    """dvc.yaml's ``ensemble`` stage builds every ensemble params.yaml defines, with each member as an out (a
    member file left from other params is never reused: the stage retrains)."""
    stage = _dvc()["stages"]["ensemble"]
    ensembles = yaml.safe_load((REPO / "params.yaml").read_text())["ensembles"]
    assert "--retrain" in stage["cmd"]
    expected = {f"data/models/{n}.pt" for n in ensembles} | {f"data/models/{e['algo']}_s{s}.pt"
                                                             for e in ensembles.values() for s in e["seeds"]}
    assert set(stage["outs"]) == expected
    assert all(f"rltrader ensemble {n} " in stage["cmd"] for n in ensembles)


def test_every_algorithm_has_a_config_and_a_params_section() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(CONFIGS) == set(ALGORITHMS)
    assert all(a in params and a in Settings.model_fields for a in TRAINED)
    assert set(VARIANTS.values()) <= set(ALGORITHMS)


def test_backtest_models_default_to_every_algorithm() -> None:
    """The pipeline trains ``backtest.models``: by default (and in params.yaml) every registered algorithm, as
    dvc.yaml's foreach does."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert tuple(Settings().backtest.models) == ALGORITHMS
    assert tuple(params["backtest"]["models"]) == (*ALGORITHMS, *params["ensembles"])  # and the default ensembles
    assert tuple(Settings().backtest.lowrider_models) == tuple(VARIANTS) == tuple(params["backtest"]["lowrider_models"])


def test_filters_close_action_matches_the_env_modes() -> None:
    """evaluate.filters keeps the close action per mode without importing the env; it must equal the enums."""
    from rltrader.env.modes import EnvParams, FuturesAction, SpotAction
    from rltrader.evaluate.filters import CLOSE_ACTION

    assert {"futures_session": int(FuturesAction.CLOSE), "spot_cycle": int(SpotAction.SELL)} == CLOSE_ACTION
    for mode in ("futures_session", "spot_cycle", "lowrider"):
        assert CLOSE_ACTION.get(mode, -1) == EnvParams(mode=mode).close_action  # type: ignore[arg-type]
