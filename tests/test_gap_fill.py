"""`gaps --fill`: holes are re-fetched from the archive or from REST (the replay server), never invented."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.ingest import fill_gaps_from_archive, fill_gaps_from_rest, find_gaps
from rltrader.data.schema import Market
from rltrader.data.store import Store
from rltrader.sim import ReplayServer, run_in_thread

HOLE = (datetime(2020, 1, 2, 5, tzinfo=UTC), datetime(2020, 1, 2, 7, 30, tzinfo=UTC))


@pytest.fixture
def full(shared_archive: Path) -> pl.DataFrame:
    src = ArchiveSource(str(shared_archive))
    days = [ArchiveFile(Market.SPOT, "klines", "BTCUSDT", "1m", "daily", f"2020-01-0{d}") for d in (1, 2, 3)]
    return pl.concat([load_file(src, f).rows for f in days])


@pytest.fixture
def holed_store(store: Store, full: pl.DataFrame) -> Store:
    store.write_klines(full.filter(~pl.col("open_time").is_between(*HOLE, closed="left")))
    gaps = find_gaps(store, "spot", "BTCUSDT", "1m")
    assert [(g.start, g.end, g.missing) for g in gaps] == [(*HOLE, 150)]
    return store


def test_fill_from_archive(holed_store: Store, full: pl.DataFrame, shared_archive: Path) -> None:
    gaps = find_gaps(holed_store, "spot", "BTCUSDT", "1m")
    report = fill_gaps_from_archive(holed_store, ArchiveSource(str(shared_archive)), gaps)
    assert report.inserted == 150 and report.gaps == []
    assert holed_store.read_klines("spot", "BTCUSDT", "1m").equals(full)


def test_fill_from_rest_replay_server(holed_store: Store, full: pl.DataFrame, shared_archive: Path) -> None:
    server = ReplayServer.from_archive(str(shared_archive), Market.SPOT, ["BTCUSDT"],
                                       datetime(2020, 1, 1, tzinfo=UTC), days=3, speed=0, agg_trades=False)
    server.clock.advance_to(datetime(2020, 1, 3, 12, tzinfo=UTC))
    server.clock.pause()
    with run_in_thread(server) as srv:
        report = fill_gaps_from_rest(holed_store, srv.rest_base_url, find_gaps(holed_store, "spot", "BTCUSDT", "1m"))
    assert report.inserted == 150 and report.gaps == []
    assert holed_store.read_klines("spot", "BTCUSDT", "1m").equals(full)
