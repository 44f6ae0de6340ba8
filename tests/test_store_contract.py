"""One contract, two stores: every test here runs against the Parquet store and a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from conftest import copy_archive_file
from test_archive import FIL_AUG, FIL_SEP, reference_rows, split_month_into_days

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.ingest import backfill, find_gaps
from rltrader.data.schema import Market
from rltrader.data.store import Store, trade_bars_frame
from rltrader.errors import DataError

FUT = Market.FUTURES_UM


def test_backfill_gives_exactly_the_rows_in_the_files(store: Store, shared_archive: Path) -> None:
    src = ArchiveSource(str(shared_archive))
    report = backfill(store, src, FUT, ["FILUSDT"], "2023-08", "2023-09", progress=False)
    want = reference_rows(shared_archive / FIL_AUG) + reference_rows(shared_archive / FIL_SEP)
    got = store.read_klines("futures-um", "FILUSDT", "1m")
    assert report.inserted == got.height == len(want) == 44640 + 43200
    assert got.select(pl.col("open_time").dt.epoch("ms"), "open", "high", "low", "close", "volume",
                      "quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume").rows() == [
        (int(r[0]), *map(float, r[1:6]), float(r[7]), int(r[8]), float(r[9]), float(r[10])) for r in want]
    assert report.gaps == []


def test_backfill_twice_changes_nothing(store: Store, shared_archive: Path) -> None:
    src = ArchiveSource(str(shared_archive))
    backfill(store, src, FUT, ["NEARUSDT", "FILUSDT"], "2023-08", "2023-10", progress=False)
    before = {s: store.read_klines("futures-um", s, "1m") for s in ("NEARUSDT", "FILUSDT")}
    again = backfill(store, src, FUT, ["NEARUSDT", "FILUSDT"], "2023-08", "2023-10", progress=False)
    assert again.inserted == 0 and again.skipped == sum(df.height for df in before.values())
    for s, df in before.items():
        assert store.read_klines("futures-um", s, "1m").equals(df)


def test_range_spanning_months_and_days_is_contiguous(store: Store, shared_archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    copy_archive_file(shared_archive, root, FIL_AUG)
    split_month_into_days(shared_archive, root, FIL_SEP, 3)
    report = backfill(store, ArchiveSource(str(root)), FUT, ["FILUSDT"], "2023-08", "2023-09-03", progress=False)
    got = store.read_klines("futures-um", "FILUSDT", "1m")
    assert report.files == 4 and got.height == 44640 + 3 * 1440
    steps = got.get_column("open_time").diff().drop_nulls().unique().to_list()
    assert steps == [timedelta(minutes=1)]
    assert got["open_time"][0] == datetime(2023, 8, 1, tzinfo=UTC)
    assert got["open_time"][-1] == datetime(2023, 9, 3, 23, 59, tzinfo=UTC)


def test_read_range_is_half_open(store: Store, shared_archive: Path) -> None:
    backfill(store, ArchiveSource(str(shared_archive)), FUT, ["FILUSDT"], "2023-08", "2023-09", progress=False)
    lo, hi = datetime(2023, 8, 31, 23, 0, tzinfo=UTC), datetime(2023, 9, 1, 1, 0, tzinfo=UTC)
    got = store.read_klines("futures-um", "FILUSDT", "1m", lo, hi)
    assert got.height == 120 and got["open_time"][0] == lo and got["open_time"][-1] == hi - timedelta(minutes=1)
    assert store.read_klines("futures-um", "NOPE", "1m").is_empty()


def test_partial_overlap_inserts_only_new_rows(store: Store, shared_archive: Path) -> None:
    f = ArchiveFile(FUT, "klines", "FILUSDT", "1m", "monthly", "2023-08")
    rows = load_file(ArchiveSource(str(shared_archive)), f).rows
    assert store.write_klines(rows.slice(0, 1000)).inserted == 1000
    r = store.write_klines(rows.slice(500, 1000))
    assert (r.inserted, r.skipped) == (500, 500)
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows.slice(0, 1500))


def test_gaps_are_found_not_filled(store: Store, shared_archive: Path) -> None:
    f = ArchiveFile(FUT, "klines", "FILUSDT", "1m", "monthly", "2023-08")
    rows = load_file(ArchiveSource(str(shared_archive)), f).rows
    holed = rows.filter(~pl.col("open_time").is_between(datetime(2023, 8, 2, 3, tzinfo=UTC),
                                                        datetime(2023, 8, 2, 3, 9, tzinfo=UTC)))
    store.write_klines(holed)
    gaps = find_gaps(store, "futures-um", "FILUSDT", "1m")
    assert [(g.start, g.end, g.missing) for g in gaps] == [
        (datetime(2023, 8, 2, 3, tzinfo=UTC), datetime(2023, 8, 2, 3, 10, tzinfo=UTC), 10)]
    lo, hi = datetime(2023, 7, 31, 23, tzinfo=UTC), datetime(2023, 9, 1, tzinfo=UTC)
    edges = find_gaps(store, "futures-um", "FILUSDT", "1m", lo, hi)
    assert edges[0].start == lo and edges[0].missing == 60 and len(edges) == 2
    assert store.read_klines("futures-um", "FILUSDT", "1m").height == holed.height  # nothing invented


def test_agg_trades_and_trade_bars(store: Store, shared_archive: Path) -> None:
    report = backfill(store, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2026-01-01",
                      "2026-01-01", kind="aggTrades", progress=False)
    trades = store.read_agg_trades("spot", "BTCUSDT")
    assert report.inserted == trades.height == 5000
    assert backfill(store, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2026-01-01",
                    "2026-01-01", kind="aggTrades", progress=False).inserted == 0
    for width in ("5s", "1m"):
        got = store.trade_bars("spot", "BTCUSDT", width)
        want = trade_bars_frame(trades, width)
        assert got.drop("volume", "quote_volume", "taker_buy_volume").equals(
            want.drop("volume", "quote_volume", "taker_buy_volume"))
        for c in ("volume", "quote_volume", "taker_buy_volume"):  # float sums: summation order may differ
            assert (got[c] - want[c]).abs().max() < 1e-6  # type: ignore[operator]
    assert store.trade_bars("spot", "BTCUSDT", "1m").height == 13


def test_bars_with_empty_windows_roundtrip(store: Store) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    bars = pl.DataFrame({
        "market": ["spot"] * 3, "symbol": ["BTCUSDT"] * 3,
        "bucket": [t0, t0 + timedelta(seconds=5), t0 + timedelta(seconds=10)],
        "open": [1.0, None, 2.0], "high": [1.5, None, 2.0], "low": [0.5, None, 2.0], "close": [1.2, None, 2.0],
        "volume": [3.0, 0.0, 1.0], "quote_volume": [3.3, 0.0, 2.0], "trades": [4, 0, 1],
        "taker_buy_volume": [1.0, 0.0, 0.0]})
    assert store.write_bars(bars, "5s").inserted == 3
    assert store.write_bars(bars, "5s").inserted == 0
    got = store.read_bars("spot", "BTCUSDT", "5s")
    assert got.select(bars.columns).equals(bars.cast(got.schema))  # type: ignore[arg-type]


def test_stats(store: Store, shared_archive: Path) -> None:
    backfill(store, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2020-01-01", "2020-01-03",
             progress=False)
    [s] = [s for s in store.stats() if s.kind == "klines"]
    assert (s.market, s.symbol, s.interval, s.rows) == ("spot", "BTCUSDT", "1m", 3 * 1440)
    assert s.first == datetime(2020, 1, 1, tzinfo=UTC) and s.last == datetime(2020, 1, 3, 23, 59, tzinfo=UTC)


def test_write_is_atomic(store: Store, shared_archive: Path) -> None:
    """A batch that cannot be stored leaves the store exactly as it was."""
    f = ArchiveFile(FUT, "klines", "FILUSDT", "1m", "monthly", "2023-08")
    rows = load_file(ArchiveSource(str(shared_archive)), f).rows
    store.write_klines(rows.slice(0, 100))
    broken = pl.concat([rows.slice(100, 100), rows.slice(200, 1).with_columns(pl.lit(None, pl.Float64).alias("open"))])
    with pytest.raises(DataError, match="NULL in required column"):
        store.write_klines(broken)
    assert store.read_klines("futures-um", "FILUSDT", "1m").equals(rows.slice(0, 100))
