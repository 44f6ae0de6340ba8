"""Shared fixtures: the real shared Binance data, a throwaway PostgreSQL server, and both stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from rltrader.data.archive import ArchiveSource, load_file
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.postgres_store import PostgresStore
from rltrader.data.schema import Market
from rltrader.data.store import Store
from rltrader.testing import TempPostgres

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
