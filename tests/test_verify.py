"""``rltrader data verify [--archive] [--repair]`` on both stores with real archive months: damage is reported
for exactly the damaged months, a repair makes them equal to a fresh backfill while stream-only rows stay, and a
repair killed between its steps leaves a readable store that a re-run repairs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from conftest import copy_archive_file, write_archive_zip
from test_archive import reference_rows

from rltrader.data.archive import ArchiveSource
from rltrader.data.ingest import backfill
from rltrader.data.parquet_store import ParquetStore, write_month_file
from rltrader.data.schema import Market
from rltrader.data.store import Store, open_store
from rltrader.data.verify import FAULT_ENV, Scope, verify_store

FUT = Market.FUTURES_UM
FEB = "futures/um/monthly/klines/AVAXUSDT/1m/AVAXUSDT-1m-2023-02.zip"
SEP = "futures/um/monthly/klines/AVAXUSDT/1m/AVAXUSDT-1m-2023-09.zip"
SEP_LAST_DAY = datetime(2023, 9, 30, tzinfo=UTC)
ALTERED = [datetime(2023, 9, 5, 10, m, tzinfo=UTC) for m in (1, 2, 3)]


def month_file(root: Path, month: str) -> Path:
    return root / "klines" / "market=futures-um" / "symbol=AVAXUSDT" / "interval=1m" / f"month={month}" / "data.parquet"


@pytest.fixture
def archive(shared_archive: Path, tmp_path: Path) -> Path:
    """Feb as published; Sep without its last day (the store has it: "from the live stream", not archived yet)."""
    root = tmp_path / "archive"
    copy_archive_file(shared_archive, root, FEB)
    cut = int(SEP_LAST_DAY.timestamp() * 1000)
    rows = [r for r in reference_rows(shared_archive / SEP) if int(r[0]) < cut]
    write_archive_zip(root, SEP, ("\n".join(",".join(r) for r in rows) + "\n").encode())
    return root


def load_two_months(store: Store, shared_archive: Path) -> None:
    backfill(store, ArchiveSource(str(shared_archive)), FUT, ["AVAXUSDT"], "2023-02", "2023-02", progress=False)
    backfill(store, ArchiveSource(str(shared_archive)), FUT, ["AVAXUSDT"], "2023-09", "2023-09", progress=False)


def damage(store: Store) -> None:
    """Feb: Parquet truncated / PostgreSQL 100 rows deleted and 5 altered. Sep: 3 rows' volume altered."""
    if isinstance(store, ParquetStore):
        f = month_file(store.root, "2023-02")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        s = month_file(store.root, "2023-09")
        df = pl.read_parquet(s)
        write_month_file(df.with_columns(pl.when(pl.col("open_time").is_in(ALTERED)).then(pl.col("volume") + 1)
                                         .otherwise(pl.col("volume")).alias("volume")), s)
        return
    with store.pool.connection() as conn:  # type: ignore[attr-defined]
        sid = conn.execute("SELECT id FROM series WHERE kind = 'klines' AND symbol = 'AVAXUSDT'").fetchone()[0]
        conn.execute("DELETE FROM kline_data WHERE series_id = %s AND open_time >= %s AND open_time < %s",
                     (sid, datetime(2023, 2, 3, tzinfo=UTC), datetime(2023, 2, 3, 1, 40, tzinfo=UTC)))
        conn.execute("UPDATE kline_data SET volume = volume * 2 + 1 WHERE series_id = %s AND open_time >= %s "
                     "AND open_time < %s",
                     (sid, datetime(2023, 2, 10, tzinfo=UTC), datetime(2023, 2, 10, 0, 5, tzinfo=UTC)))
        conn.execute("UPDATE kline_data SET volume = volume + 1 WHERE series_id = %s AND open_time = ANY(%s)",
                     (sid, ALTERED))


def fresh(shared_archive: Path, tmp_path: Path) -> ParquetStore:
    st = ParquetStore(tmp_path / "fresh")
    load_two_months(st, shared_archive)
    return st


def test_verify_reports_the_damaged_months_and_repair_restores_them(store: Store, shared_archive: Path,
                                                                     archive: Path, tmp_path: Path) -> None:
    load_two_months(store, shared_archive)
    src = ArchiveSource(str(archive))
    report = verify_store(store, Scope(), src)
    assert [(m.month, m.status) for m in report.months] == [("2023-02", "ok"), ("2023-09", "extra rows")]
    assert report.months[1].extra == 1440 and not report.failed  # stream-only rows are not a failure

    damage(store)
    report = verify_store(store, Scope(), src)
    by_month = {m.month: m for m in report.months}
    assert [m.month for m in report.failed] == ["2023-02", "2023-09"]
    if isinstance(store, ParquetStore):
        assert by_month["2023-02"].status == "unreadable"
        assert by_month["2023-02"].path == str(month_file(store.root, "2023-02"))
    else:
        assert (by_month["2023-02"].status, by_month["2023-02"].missing, by_month["2023-02"].differing) == (
            "differs", 100, 5)
    sep = by_month["2023-09"]
    assert (sep.status, sep.differing, sep.extra, sep.missing) == ("differs", 3, 1440, 0)
    # scope: only what is asked for
    assert [m.month for m in verify_store(store, Scope.of(start="2023-09"), src).months] == ["2023-09"]

    repaired = verify_store(store, Scope(), src, repair=True)
    assert [(m.month, m.status, m.repaired) for m in repaired.months] == [
        ("2023-02", "ok", True), ("2023-09", "extra rows", True)]
    ref = fresh(shared_archive, tmp_path)  # the full September, last day included: stream-only rows were kept
    assert store.read_klines("futures-um", "AVAXUSDT", "1m").equals(ref.read_klines("futures-um", "AVAXUSDT", "1m"))
    if isinstance(store, ParquetStore):
        assert month_file(store.root, "2023-02").read_bytes() == month_file(ref.root, "2023-02").read_bytes()
        aside = list((store.root / "quarantine" / "months").rglob("data.parquet"))
        assert len(aside) == 2  # the damaged files were moved aside, not deleted
    # idempotent: a second repair finds nothing to do
    again = verify_store(store, Scope(), src, repair=True)
    assert not again.failed and not any(m.repaired for m in again.months)


def test_invariants_without_archive(shared_archive: Path, tmp_path: Path) -> None:
    """Rows that break the rules (duplicate, off-grid, outside the month, high < low) make the month invalid."""
    st = ParquetStore(tmp_path / "s")
    load_two_months(st, shared_archive)
    f = month_file(st.root, "2023-02")
    df = pl.read_parquet(f)
    bad = pl.concat([
        df.slice(8, 1),  # duplicate of a kept row
        df.slice(5, 1).with_columns(pl.col("open_time") + timedelta(seconds=7)),  # off the 1m grid
        df.slice(6, 1).with_columns(pl.col("open_time") - timedelta(days=40), pl.col("close_time")
                                    - timedelta(days=40)),  # inside January
        df.slice(7, 1).with_columns(pl.col("high").alias("low"), pl.col("low").alias("high")),  # high < low
    ])
    write_month_file(pl.concat([df.slice(8), bad]).sort("open_time"), f)
    [feb, sep] = verify_store(st, Scope()).months
    assert feb.status == "invalid" and sep.status == "ok"
    for why in ("duplicate open_time", "not aligned to 1m", "outside the file's period", "high < low"):
        assert why in feb.detail, feb.detail


def test_verify_cli_exit_codes(shared_archive: Path, archive: Path, tmp_path: Path) -> None:
    url = f"parquet://{tmp_path / 'store'}"
    st = open_store(url, tmp_path)
    load_two_months(st, shared_archive)
    damage(st)
    r = _cli(["data", "verify", "--archive", "--json"], url, archive, tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 stored month(s) are wrong: futures-um AVAXUSDT "
                                                        "1m 2023-02 unreadable")
    r = _cli(["data", "verify", "--repair"], url, archive, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 repaired, 0 with problems" in r.stdout


def _cli(args: list[str], url: str, archive: Path, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RLTRADER_DB_URL": url, "RLTRADER_ARCHIVE_BASE": str(archive),
           "RLTRADER_DATA_DIR": str(cwd / "data"), "COLUMNS": "300", **extra}
    return subprocess.run([sys.executable, "-m", "rltrader.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "step"), [
    ("parquet", "staged"), ("parquet", "aside"),
    pytest.param("postgres", "deleted", marks=pytest.mark.postgres),
    pytest.param("postgres", "loaded", marks=pytest.mark.postgres),
])
def test_repair_killed_midway_leaves_a_readable_store(kind: str, step: str, shared_archive: Path, archive: Path,
                                                      tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"parquet://{tmp_path / 'store'}" if kind == "parquet" else str(request.getfixturevalue("pg_url"))
    st = open_store(url, tmp_path)
    try:
        load_two_months(st, shared_archive)
        damage(st)
        before = verify_store(st, Scope(), ArchiveSource(str(archive)))
    finally:
        st.close()
    r = _cli(["data", "verify", "--repair"], url, archive, tmp_path, **{FAULT_ENV: step})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    st = open_store(url, tmp_path)
    try:
        mid = verify_store(st, Scope(), ArchiveSource(str(archive)))  # readable: no exception
        for b, m in zip(before.months, mid.months, strict=True):  # each month as before or repaired
            assert (m.status, m.rows) in ((b.status, b.rows), ("ok", 28 * 1440), ("extra rows", 30 * 1440))
    finally:
        st.close()
    r = _cli(["data", "verify", "--repair"], url, archive, tmp_path)
    assert r.returncode == 0, r.stderr
    st = open_store(url, tmp_path)
    try:
        ref = fresh(shared_archive, tmp_path)
        assert st.read_klines("futures-um", "AVAXUSDT", "1m").equals(ref.read_klines("futures-um", "AVAXUSDT", "1m"))
        assert not verify_store(st, Scope(), ArchiveSource(str(archive))).failed
    finally:
        st.close()
