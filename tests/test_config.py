"""params.yaml + environment → typed settings; wrong keys and types are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rltrader.agents.configs import CONFIGS, config_from_params
from rltrader.config import Settings, load_settings
from rltrader.data.schema import Market
from rltrader.env import params_from_settings
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.evaluate.filters import BacktestFilters
from rltrader.execution import ExecutionParams

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load() -> None:
    s = load_settings(REPO / "params.yaml", env={})
    assert s.ingest.market is Market.FUTURES_UM and "FILUSDT" in s.ingest.symbols


def test_env_overrides(tmp_path: Path) -> None:
    env = {"RLTRADER_DB_URL": "postgresql://u@h/db", "RLTRADER_INGEST__SYMBOLS": "btcusdt, ethusdt",
           "RLTRADER_STREAM__FLUSH_SECONDS": "0.5", "RLTRADER_INGEST__START": "2024-02-03"}
    s = load_settings(REPO / "params.yaml", env=env)
    assert s.data.store_url == "postgresql://u@h/db"
    assert s.ingest.symbols == ["BTCUSDT", "ETHUSDT"] and s.stream.flush_seconds == 0.5
    assert s.ingest.start == "2024-02-03"


@pytest.mark.parametrize(("yaml_text", "env", "message"), [
    ("ingest:\n  symbolz: [A]\n", {}, r"params.yaml: ingest.symbolz: unknown key"),
    ("execution:\n  fee: 0.001\n", {}, r"params.yaml: execution.fee: unknown key"),
    ("execution:\n  taker_fee: cheap\n", {}, r"params.yaml: execution.taker_fee: Input should be a valid number"),
    ("execution:\n  market: spot\n  leverage: 3\n", {}, r"params.yaml: execution.leverage: spot trades without"),
    ("env:\n  mode: moon\n", {}, r"params.yaml: env.mode: Input should be 'futures_session'"),
    ("env:\n  lot_multipliers: [1, 2]\n", {}, r"params.yaml: env.lot_multipliers: must be \[0"),
    ("env:\n  rewards: pnl\n", {}, r"params.yaml: env.rewards: unknown key"),
    ("backtest:\n  stop_loss: 1.5\n", {}, r"params.yaml: backtest.stop_loss: must be a fraction below 1"),
    ("backtest:\n  bootstrap: -1\n", {}, r"params.yaml: backtest.bootstrap: Input should be greater than or equal"),
    ("backtest:\n  cooldown: 3\n", {}, r"params.yaml: backtest.cooldown: unknown key"),
    ("d3qn:\n  lr: fast\n", {}, r"params.yaml: d3qn.lr: expected a number"),
    ("ppo:\n  rollout: 3\n", {}, r"params.yaml: ppo.rollout: unknown key"),
    ("cnn:\n  threshold: 0.2\n", {}, r"params.yaml: cnn.threshold: must be in"),
    ("d3qn:\n  net: {encoder: lstm}\n", {}, r"params.yaml: d3qn.net.encoder: unknown encoder"),
    ("", {"RLTRADER_EXECUTION__INITIAL_CASH": "0"}, r"environment variable RLTRADER_EXECUTION__INITIAL_CASH: "
                                                     r"execution.initial_cash: must be > 0"),
    ("ingest:\n  market: moon\n", {}, r"ingest.market: Input should be 'spot' or 'futures-um'"),
    ("stream:\n  flush_seconds: soon\n", {}, r"stream.flush_seconds: Input should be a valid number"),
    ("ingets:\n  market: spot\n", {}, r"ingets: unknown section"),
    ("", {"RLTRADER_STREAM__FLUSH_SECONDS": "x"}, r"environment variable RLTRADER_STREAM__FLUSH_SECONDS: "
                                                  r"stream.flush_seconds"),
    ("", {"RLTRADER_SYMBOLS": "x"}, r"environment variable RLTRADER_SYMBOLS: not a parameter"),
])
def test_errors_name_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str], message: str) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_settings(p, env=env)


# --- one schema per section: params.yaml, the settings and the code cannot drift ----------------------------------

SECTION_CLASSES = {"execution": ExecutionParams, "env": EnvParams, "backtest": BacktestFilters}


def test_sections_are_the_classes_the_code_uses() -> None:
    """The settings hold the very dataclasses the kernels, envs and backtest take, not a mirror of their fields."""
    s = load_settings(REPO / "params.yaml", env={})
    for name, cls in SECTION_CLASSES.items():
        assert isinstance(getattr(s, name), cls), name
    execution, env_params = params_from_settings(s)
    assert execution is s.execution and env_params is s.env
    assert BacktestFilters.from_settings(s.backtest).repeat_cycles is s.backtest.repeat_cycles is True


def test_defaults_are_the_code_defaults() -> None:
    """A params.yaml without a section gets exactly the defaults the code constructs."""
    s = Settings()
    assert s.execution == ExecutionParams() and s.env == EnvParams()
    flt = BacktestFilters()
    assert all(getattr(s.backtest, f.name) == getattr(flt, f.name) for f in dataclasses.fields(BacktestFilters))


def test_repo_params_list_every_key_of_the_typed_sections() -> None:
    """params.yaml documents every knob of these sections; a field added or renamed in code shows up here."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    s = Settings()
    for name in ("execution", "env", "backtest"):
        assert set(tree[name]) == {f.name for f in dataclasses.fields(getattr(s, name))}, name


def test_repo_algorithm_sections_build_their_configs() -> None:
    """The agent sections of params.yaml validate into the configs the training code builds (seed/device come
    from ``train`` at train time)."""
    s = load_settings(REPO / "params.yaml", env={})
    for name, cls in CONFIGS.items():
        cfg = config_from_params(cls, name, getattr(s, name))
        assert isinstance(cfg, cls)
        assert all(getattr(cfg, k) == v for k, v in getattr(s, name).items() if k != "net"), name
