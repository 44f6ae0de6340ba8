"""Shared fixtures: the real shared Binance data, a throwaway PostgreSQL server, and both stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest

from rltrader.data.archive import ArchiveSource, load_file
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.postgres_store import PostgresStore
from rltrader.data.schema import Market
from rltrader.data.store import Store
from rltrader.testing import TempPostgres

if TYPE_CHECKING:
    from rltrader.config import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("RLTRADER_SHARED_ARCHIVE", REPO.parent / "shared" / "data" / "binance"))
API_DUMPS = SHARED_ARCHIVE.parent / "api-dumps"

# Tests must not pick up a developer's own overrides.
for _name in [n for n in os.environ if n.startswith("RLTRADER_") and n not in ("RLTRADER_PG_BIN",
                                                                               "RLTRADER_SHARED_ARCHIVE")]:
    del os.environ[_name]
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    """The real shared Binance data. Only tests that read it request it (modules reading ``SHARED_ARCHIVE``
    directly do so with ``pytestmark = pytest.mark.usefixtures("shared_archive")``): without the data they fail
    here with the reason, while the pure kernel, env and agent tests still run."""
    if not (SHARED_ARCHIVE / "futures").is_dir():
        pytest.fail(f"shared real data not found at {SHARED_ARCHIVE} (set RLTRADER_SHARED_ARCHIVE)")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TempPostgres]:
    with TempPostgres() as pg:
        yield pg


@pytest.fixture
def pg_url(pg_server: TempPostgres) -> str:
    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["parquet", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each test using this runs against both stores: one contract, two backends."""
    st: Store
    if request.param == "parquet":
        st = ParquetStore(tmp_path / "store")
    else:
        st = PostgresStore(request.getfixturevalue("pg_url"))
    yield st
    st.close()


def archive_rows(market: Market, kind: str, start: date, end: date, symbol: str = "BTCUSDT") -> pl.DataFrame:
    """The rows of the shared archive's ``kind`` files (``klines`` are 1m) for ``symbol`` over ``start..end``
    (inclusive days), parsed by the archive loader: what a store, stream or replay must reproduce exactly."""
    src = ArchiveSource(str(SHARED_ARCHIVE))
    files = src.plan(market, kind, symbol, "1m" if kind == "klines" else None, start, end)  # type: ignore[arg-type]
    return pl.concat([load_file(src, f).rows for f in files])


def write_archive_zip(root: Path, relpath: str, csv_bytes: bytes, *, member: str | None = None) -> Path:
    """Put a zip + CHECKSUM into an archive-layout folder, the way data.binance.vision publishes them."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member or path.name.replace(".zip", ".csv"), csv_bytes)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".CHECKSUM")).write_text(f"{digest}  {path.name}\n")
    return path


def copy_archive_file(src_root: Path, dst_root: Path, relpath: str) -> Path:
    dst = dst_root / relpath
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_root / relpath, dst)
    shutil.copy2(src_root / (relpath + ".CHECKSUM"), dst_root / (relpath + ".CHECKSUM"))
    return dst


# --- the trader tests' replayed market: real NEARUSDT bars of April 2023 ---------------------------------------
NEAR_APRIL = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"
NEAR_DAY1 = datetime(2023, 4, 11, tzinfo=UTC)
"""The end of the stored history: the backtest split (and the replayed trading day) is 2023-04-10."""


def build_near_april(shared_archive: Path, tmp: Path, **sections: dict[str, Any]) -> Settings:
    """Real NEARUSDT bars (April 2023, up to 2023-04-11) through the features and sessions stages: train 04-01..07,
    val 04-07, test 04-08..09, backtest = the one day 2023-04-10. ``sections`` add or override settings sections
    (e.g. ``execution={"step_size": 1.0}``). Shared by the trader, risk and operations tests."""
    from rltrader.config import Settings
    from rltrader.data.archive import parse_klines, read_zip_member
    from rltrader.dataset.build import run_features_stage, run_sessions_stage

    tree: dict[str, Any] = {
        "data": {"dir": str(tmp / "data")},
        "ingest": {"market": "futures-um", "symbols": ["NEARUSDT"], "interval": "1m"},
        "sessions": {"context": 30, "length": 10, "stride": 10, "embargo": 60, "volatility_percentile": 0,
                     "splits": {"train": {"start": "2023-04-01", "end": "2023-04-07"},
                                "val": {"start": "2023-04-07", "end": "2023-04-08"},
                                "test": {"start": "2023-04-08", "end": "2023-04-10"},
                                "backtest": {"start": "2023-04-10", "end": "2023-04-11"}}},
        "backtest": {"bootstrap": 0},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    settings = Settings.model_validate(tree)
    store = ParquetStore(tmp / "data" / "store")
    rows = parse_klines(read_zip_member(shared_archive / NEAR_APRIL), source=NEAR_APRIL, market=Market.FUTURES_UM,
                        symbol="NEARUSDT", interval="1m").rows
    store.write_klines(rows.filter(pl.col("open_time") < NEAR_DAY1))
    run_features_stage(settings, store)
    run_sessions_stage(settings)
    store.close()
    return settings
