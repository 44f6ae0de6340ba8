"""params.yaml + environment → typed settings; wrong keys and types are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from rltrader.config import load_settings
from rltrader.data.schema import Market
from rltrader.errors import ConfigError

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
