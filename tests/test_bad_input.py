"""Bad input through the CLI: one clear error line naming the file, exit code != 0, stored data intact."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import copy_archive_file, write_archive_zip
from test_archive import FIL_AUG, FIL_SEP, reference_rows

from rltrader.data.store import Store, open_store

SEP_ZIP = "FILUSDT-1m-2023-09.zip"


def rltrader(*args: str, store_url: str, archive: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RLTRADER_DB_URL": store_url, "RLTRADER_ARCHIVE_BASE": str(archive),
           "RLTRADER_DATA_DIR": str(cwd / "data"), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "rltrader.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(params=["parquet", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "parquet":
        return f"parquet://{tmp_path / 'store'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def loaded(store_url: str, shared_archive: Path, tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    """An archive copy with Aug (already loaded into the store) and Sep (the file the tests break)."""
    root = tmp_path / "archive"
    copy_archive_file(shared_archive, root, FIL_AUG)
    copy_archive_file(shared_archive, root, FIL_SEP)
    r = rltrader("data", "backfill", "--market", "futures-um", "--symbols", "FILUSDT", "--start", "2023-08",
                 "--end", "2023-08", store_url=store_url, archive=root, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return root, _snapshot(store_url, tmp_path)


def _snapshot(store_url: str, tmp_path: Path) -> pl.DataFrame:
    st: Store = open_store(store_url, tmp_path / "data")
    try:
        return st.read_klines("futures-um", "FILUSDT", "1m")
    finally:
        st.close()


def _backfill_sep(root: Path, store_url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return rltrader("data", "backfill", "--market", "futures-um", "--symbols", "FILUSDT", "--start", "2023-08",
                    "--end", "2023-09", *extra, store_url=store_url, archive=root, cwd=tmp_path)


def _assert_one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]


def test_corrupted_zip(loaded: tuple[Path, pl.DataFrame], store_url: str, tmp_path: Path) -> None:
    root, before = loaded
    z = root / FIL_SEP
    data = bytearray(z.read_bytes())
    data[2000:2100] = bytes(b ^ 0xFF for b in data[2000:2100])
    z.write_bytes(bytes(data))
    r = _backfill_sep(root, store_url, tmp_path)
    _assert_one_error_line(r, SEP_ZIP)  # the checksum catches it first: the sidecar no longer matches
    assert _snapshot(store_url, tmp_path).equals(before)


def test_flipped_checksum(loaded: tuple[Path, pl.DataFrame], store_url: str, tmp_path: Path) -> None:
    root, before = loaded
    sidecar = root / (FIL_SEP + ".CHECKSUM")
    digest, name = sidecar.read_text().split()
    sidecar.write_text(("f" if digest[0] != "f" else "e") + digest[1:] + "  " + name + "\n")
    r = _backfill_sep(root, store_url, tmp_path)
    _assert_one_error_line(r, SEP_ZIP, "does not match its CHECKSUM")
    assert _snapshot(store_url, tmp_path).equals(before)


def test_truncated_zip(loaded: tuple[Path, pl.DataFrame], store_url: str, tmp_path: Path) -> None:
    """A zip cut short whose CHECKSUM was made from the cut bytes: only the zip reader can tell."""
    root, before = loaded
    z = root / FIL_SEP
    cut = z.read_bytes()[: z.stat().st_size // 2]
    z.write_bytes(cut)
    (root / (FIL_SEP + ".CHECKSUM")).write_text(f"{hashlib.sha256(cut).hexdigest()}  {SEP_ZIP}\n")
    r = _backfill_sep(root, store_url, tmp_path)
    _assert_one_error_line(r, SEP_ZIP, "corrupt or truncated zip")
    assert _snapshot(store_url, tmp_path).equals(before)


@pytest.mark.slow
def test_high_below_low_row(loaded: tuple[Path, pl.DataFrame], store_url: str, tmp_path: Path,
                            shared_archive: Path) -> None:
    root, before = loaded
    rows = reference_rows(shared_archive / FIL_SEP)
    rows[99][2] = str(float(rows[99][3]) / 2)  # high < low on CSV line 101 (header is line 1)
    header = "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,tbqv,ignore\n"
    write_archive_zip(root, FIL_SEP, (header + "\n".join(",".join(r) for r in rows) + "\n").encode())
    r = _backfill_sep(root, store_url, tmp_path)
    _assert_one_error_line(r, SEP_ZIP, "line 101", "high < low")
    assert _snapshot(store_url, tmp_path).equals(before)  # the whole backfill stored nothing
    st = open_store(store_url, tmp_path / "data")
    try:
        q = st.read_quarantine()
    finally:
        st.close()
    assert q.height == 1 and q["line"][0] == 101 and q["reason"][0] == "high < low" and SEP_ZIP in q["source"][0]
    # opting in loads the valid rows; the bad one stays quarantined
    r = _backfill_sep(root, store_url, tmp_path, "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    assert _snapshot(store_url, tmp_path).height == before.height + 43200 - 1


def test_unknown_symbol(loaded: tuple[Path, pl.DataFrame], store_url: str, tmp_path: Path) -> None:
    root, before = loaded
    r = rltrader("data", "backfill", "--market", "futures-um", "--symbols", "FILUSDT,NOPEUSDT", "--start",
                 "2023-08", "--end", "2023-09", store_url=store_url, archive=root, cwd=tmp_path)
    _assert_one_error_line(r, "NOPEUSDT")
    assert _snapshot(store_url, tmp_path).equals(before)


def test_bad_parameter_names_the_key(tmp_path: Path, shared_archive: Path) -> None:
    (tmp_path / "params.yaml").write_text("ingest:\n  symbolz: [BTCUSDT]\n")
    r = rltrader("data", "stats", store_url=f"parquet://{tmp_path / 's'}", archive=shared_archive, cwd=tmp_path)
    _assert_one_error_line(r, "ingest.symbolz", "unknown key")


def test_cli_outputs(tmp_path: Path, shared_archive: Path) -> None:
    import json

    url = f"parquet://{tmp_path / 's'}"
    r = rltrader("data", "backfill", "--market", "spot", "--symbols", "BTCUSDT", "--start", "2020-01-01", "--end",
                 "2020-01-04", store_url=url, archive=shared_archive, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["inserted"] == 3 * 1440 and report["files"] == 3
    assert [g["missing"] for g in report["gaps"]] == [1440]  # 2020-01-04 is not in the shared archive
    r = rltrader("data", "stats", "--json", store_url=url, archive=shared_archive, cwd=tmp_path)
    assert json.loads(r.stdout)[0]["rows"] == 3 * 1440
    r = rltrader("data", "gaps", "--market", "spot", "--symbols", "BTCUSDT", "--json", store_url=url,
                 archive=shared_archive, cwd=tmp_path)
    assert json.loads(r.stdout) == []
