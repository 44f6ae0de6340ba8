"""The Parquet store's append-then-compact layout: base + delta files, compaction, crash safety, every reader.

The store contract (``test_store_contract``) runs here a second time against a Parquet store that never
compacts on its own, so every write after a month's first is a delta file and every contract read merges
base + deltas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_store_contract import (  # noqa: F401  (collected here again, against the fixture below)
    test_agg_trades_and_trade_bars,
    test_backfill_gives_exactly_the_rows_in_the_files,
    test_backfill_twice_changes_nothing,
    test_bars_with_empty_windows_roundtrip,
    test_gaps_are_found_not_filled,
    test_partial_overlap_inserts_only_new_rows,
    test_range_spanning_months_and_days_is_contiguous,
    test_read_range_is_half_open,
    test_stats,
    test_write_is_atomic,
)

from rltrader.data import parquet_store
from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.parquet_store import BASE_NAME, ParquetStore, base_through, list_month, month_files
from rltrader.data.schema import Market
from rltrader.data.sql import run_duckdb
from rltrader.data.verify import Scope, verify_store
from rltrader.errors import DataError

FUT = Market.FUTURES_UM
AUG = ArchiveFile(FUT, "klines", "FILUSDT", "1m", "monthly", "2023-08")
NEVER = 10**9  # thresholds no test reaches: compaction only when asked


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ParquetStore]:
    """Overrides conftest's: the contract tests imported above run against deltas."""
    st = ParquetStore(tmp_path / "store", max_deltas=NEVER, max_delta_rows=NEVER)
    yield st
    st.close()


@pytest.fixture
def aug(shared_archive: Path) -> pl.DataFrame:
    return load_file(ArchiveSource(str(shared_archive)), AUG).rows


def month_dir(root: Path, month: str = "2023-08") -> Path:
    return root / "klines" / "market=futures-um" / "symbol=FILUSDT" / "interval=1m" / f"month={month}"


def stream_in(st: ParquetStore, rows: pl.DataFrame, chunk: int, overlap: int = 0) -> int:
    """Write ``rows`` as a live stream would: small commits, each re-offering the last ``overlap`` rows."""
    inserted = 0
    for i in range(0, rows.height, chunk):
        inserted += st.write_klines(rows.slice(max(0, i - overlap), chunk + overlap)).inserted
    return inserted


def files_on_disk(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def test_commits_become_deltas_and_every_reader_sees_them(store: ParquetStore, aug: pl.DataFrame,
                                                          shared_archive: Path) -> None:
    rows = aug.slice(0, 3000)
    assert stream_in(store, rows, 200, overlap=30) == 3000
    d = month_dir(store.root)
    names = files_on_disk(d)
    assert names[0] == BASE_NAME and len(names) == 15 and names[-1] == "delta-0000000014.parquet"
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows)
    [s] = store.stats()
    assert s.rows == 3000 and s.last == rows["open_time"][-1]
    assert run_duckdb("SELECT count(*), count(DISTINCT open_time) FROM klines", store.root).rows == [(3000, 3000)]
    report = verify_store(store, Scope(), ArchiveSource(str(shared_archive)))
    [m] = report.months
    assert (m.status, m.rows) == ("missing rows", 3000)  # the month's other rows were never written
    # the whole month again (a re-run backfill): only what was missing goes in, into the base (a big batch)
    big = ParquetStore(store.root, max_deltas=NEVER, max_delta_rows=10_000)
    assert big.write_klines(aug).inserted == aug.height - 3000
    assert files_on_disk(d) == [BASE_NAME]
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(aug)
    assert [m.status for m in verify_store(store, Scope(), ArchiveSource(str(shared_archive))).months] == ["ok"]


def test_first_stored_row_wins_over_base_and_deltas(store: ParquetStore, aug: pl.DataFrame) -> None:
    rows = aug.slice(0, 20)
    store.write_klines(rows.slice(0, 10))  # base
    store.write_klines(rows.slice(10, 5))  # delta 1
    changed = rows.with_columns(pl.col("close") * 2, pl.col("volume") + 1)
    res = store.write_klines(pl.concat([changed.slice(5, 10), rows.slice(15, 5)]))  # 5 in base, 5 in delta
    assert (res.inserted, res.skipped) == (5, 10)
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows)
    assert store.compact() == 1 and store.compact() == 0
    assert files_on_disk(month_dir(store.root)) == [BASE_NAME]
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows)


def test_thresholds_bound_the_deltas(tmp_path: Path, aug: pl.DataFrame) -> None:
    st = ParquetStore(tmp_path / "s", max_deltas=3, max_delta_rows=250)
    d = month_dir(st.root)
    most = last = 0
    for i in range(0, 2000, 50):
        st.write_klines(aug.slice(i, 50))
        live = list_month(d)
        most, last = max(most, len(live.deltas)), max(last, live.last_seq)
        assert sum(pl.read_parquet(p).height for _, p in live.deltas) <= 250
    assert most == 3
    assert st.read_klines("futures-um", "FILUSDT", "1m").equals(aug.slice(0, 2000))
    st.close()  # compacts what this store wrote as deltas
    assert files_on_disk(d) == [BASE_NAME] and base_through(d / BASE_NAME) == last == 30


def test_compaction_crash_before_the_rename_keeps_the_old_state(store: ParquetStore, aug: pl.DataFrame,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rows = aug.slice(0, 500)
    stream_in(store, rows, 100)
    d = month_dir(store.root)
    before = files_on_disk(d)
    real = os.replace

    def crash(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(dst).name == BASE_NAME:
            raise OSError("simulated crash before the base rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.compact()
    monkeypatch.undo()
    assert files_on_disk(d) == before and not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    again = ParquetStore(store.root)  # reopened: a fresh process's view
    assert again.read_klines("futures-um", "FILUSDT", "1m").equals(rows)
    assert again.compact() == 1 and again.read_klines("futures-um", "FILUSDT", "1m").equals(rows)


def test_compaction_crash_after_the_rename_never_counts_twice(store: ParquetStore, aug: pl.DataFrame,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              shared_archive: Path) -> None:
    rows = aug.slice(0, 500)
    stream_in(store, rows, 100)
    d = month_dir(store.root)

    def crash(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith("delta-"):
            raise OSError("simulated crash before the deltas are unlinked")

    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.compact()
    monkeypatch.undo()
    listing = list_month(d)
    assert len(listing.stale) == 4 and not listing.deltas  # left behind, superseded by the new base
    again = ParquetStore(store.root)
    assert again.read_klines("futures-um", "FILUSDT", "1m").equals(rows)
    assert again.stats()[0].rows == 500
    assert run_duckdb("SELECT count(*) FROM klines", again.root).rows == [(500,)]
    [m] = verify_store(again, Scope()).months
    assert (m.status, m.rows) == ("ok", 500)
    # the next writer removes them, and its own delta continues the numbering
    assert again.write_klines(aug.slice(450, 100)).inserted == 50
    assert files_on_disk(d) == [BASE_NAME, "delta-0000000005.parquet"]
    assert again.read_klines("futures-um", "FILUSDT", "1m").equals(aug.slice(0, 550))


def test_a_failed_commit_leaves_no_delta(store: ParquetStore, aug: pl.DataFrame,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store.write_klines(aug.slice(0, 100))
    from rltrader.integrity import write_parquet as real

    def full_disk(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise OSError("no space left on device")

    monkeypatch.setattr("rltrader.data.parquet_store.write_parquet", full_disk)
    with pytest.raises(OSError, match="no space"):
        store.write_klines(aug.slice(100, 100))
    monkeypatch.undo()
    assert os.listdir(month_dir(store.root)) == [BASE_NAME]
    assert store.write_klines(aug.slice(100, 100)).inserted == 100  # and the re-run stores it


def test_reader_racing_a_compaction_reads_one_state(store: ParquetStore, aug: pl.DataFrame,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock-free read that lists base + deltas, then reads the new base of a compaction that ran in between
    (its deltas not unlinked yet): the reader sees the base changed and reads again — no row twice."""
    rows = aug.slice(0, 400)
    stream_in(store, rows, 100)
    d = month_dir(store.root)
    other = ParquetStore(store.root)
    real_list = parquet_store.list_month
    calls: list[int] = []

    def list_then_compact(path: Path, strict: bool = True, for_writer: bool = False) -> parquet_store.MonthListing:
        out = real_list(path, strict, for_writer)
        if not calls and path == d and not for_writer:
            calls.append(1)
            with monkeypatch.context() as m:
                m.setattr(Path, "unlink", lambda self, missing_ok=False: None)
                other.compact()
        return out

    monkeypatch.setattr(parquet_store, "list_month", list_then_compact)
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows)
    assert calls == [1]


def test_bad_delta_is_named_and_repaired(store: ParquetStore, aug: pl.DataFrame, shared_archive: Path) -> None:
    stream_in(store, aug, 10_000)
    d = month_dir(store.root)
    bad = d / "delta-0000000002.parquet"
    bad.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(DataError, match=r"delta-0000000002\.parquet: unreadable store month file"):
        store.read_klines("futures-um", "FILUSDT", "1m")
    with pytest.raises(DataError, match=r"delta-0000000002\.parquet"):
        store.write_klines(aug.slice(25_000, 10))  # a commit whose keys fall in its range must read it
    [m] = verify_store(store, Scope()).months
    assert m.status == "unreadable" and m.path == str(bad)
    [m] = verify_store(store, Scope(), ArchiveSource(str(shared_archive)), repair=True).months
    assert m.repaired and m.status == "ok", m
    assert files_on_disk(d) == [BASE_NAME]
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(aug)
    aside = sorted(p.name for p in (store.root / "quarantine" / "months").rglob("*.parquet"))
    assert aside == [BASE_NAME, *(f"delta-{i:010d}.parquet" for i in range(1, 5))]


def test_bad_base_footer_is_named(tmp_path: Path, aug: pl.DataFrame) -> None:
    store = ParquetStore(tmp_path / "store", max_deltas=NEVER, max_delta_rows=NEVER)
    stream_in(store, aug.slice(0, 300), 100)
    base = month_dir(store.root) / BASE_NAME
    base.write_bytes(base.read_bytes()[:-20] + b"\0" * 12 + b"PAR1")
    with pytest.raises(DataError, match=f"{base}: unreadable store month file"):
        ParquetStore(store.root).read_klines("futures-um", "FILUSDT", "1m")
    assert month_files(base.parent, strict=False)[0] == base  # verify still lists the month, then reports it
    [m] = verify_store(store, Scope()).months
    assert m.status == "unreadable" and m.path == str(base)
    with pytest.raises(DataError, match=f"{base}: unreadable store month file"):
        store.close()  # its compaction cannot read the base: named, and nothing is changed
    assert len(month_files(base.parent, strict=False)) == 3


def test_one_call_compacts_one_month_until_twice_the_threshold(tmp_path: Path, shared_archive: Path) -> None:
    """Symbols streamed in step reach the threshold in the same commit: they compact one per commit."""
    src = ArchiveSource(str(shared_archive))
    syms = ["ALGOUSDT", "AVAXUSDT", "FILUSDT"]
    data = [load_file(src, ArchiveFile(FUT, "klines", s, "1m", "monthly", "2023-02")).rows for s in syms]
    st = ParquetStore(tmp_path / "s", max_deltas=2, max_delta_rows=NEVER)
    dirs = [month_dir(st.root, "2023-02").parent.parent.parent / f"symbol={s}" / "interval=1m" / "month=2023-02"
            for s in syms]
    counts = []
    for i in range(0, 1200, 100):
        st.write_klines(pl.concat([df.slice(i, 100) for df in data]))
        counts.append([len(list_month(d).deltas) for d in dirs])
    assert counts[:6] == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 3, 3], [1, 0, 4], [2, 1, 0]]
    assert max(max(c) for c in counts) == 4  # never past twice the threshold
    for s, df in zip(syms, data, strict=True):
        assert st.read_klines("futures-um", s, "1m").equals(df.slice(0, 1200))
