"""``rltrader data verify`` beyond klines, on both stores with real data: aggTrades months are checked and
repaired from the archive (stream-only trades kept), 5 s bar months are checked and rebuilt from the stored
trades (or moved to the quarantine, named as lost, when nothing can rebuild them), and the days the archive
has not published are checked and reloaded through REST (the loopback replay server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from conftest import copy_archive_file
from test_verify import _cli

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.bars import build_bars
from rltrader.data.ingest import backfill
from rltrader.data.parquet_store import ParquetStore, write_month_file
from rltrader.data.schema import Market
from rltrader.data.store import Store, open_store
from rltrader.data.verify import Scope, verify_store
from rltrader.sim import ReplayServer, run_in_thread

AGG = "spot/daily/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-01-01.zip"
KL = "spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2020-01-0{}.zip"


def month_file(root: Path, kind: str, month: str, **parts: str) -> Path:
    d = root / kind
    for k, v in parts.items():
        d = d / f"{k}={v}"
    return d / f"month={month}" / "data.parquet"


def trades_file(root: Path) -> Path:
    return month_file(root, "agg_trades", "2026-01", market="spot", symbol="BTCUSDT")


def bars_file(root: Path) -> Path:
    return month_file(root, "bars", "2026-01", width="5s", market="spot", symbol="BTCUSDT")


def stream_trades(trades: pl.DataFrame) -> pl.DataFrame:
    """Three trades after the archive's last one, as the live stream would have stored them (not archived yet)."""
    last = trades.row(-1, named=True)
    return pl.DataFrame([{**last, "agg_trade_id": last["agg_trade_id"] + i,
                          "first_trade_id": last["last_trade_id"] + 10 * i - 9,
                          "last_trade_id": last["last_trade_id"] + 10 * i,
                          "transact_time": last["transact_time"] + timedelta(minutes=5 * i)} for i in (1, 2, 3)],
                        schema=trades.schema)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def pg_exec(store: Store, sql: str, *params: object) -> None:
    with store.pool.connection() as conn:  # type: ignore[attr-defined]
        conn.execute(sql.encode(), params)


def test_agg_trades_verified_and_repaired_from_the_archive(store: Store, shared_archive: Path) -> None:
    src = ArchiveSource(str(shared_archive))
    backfill(store, src, Market.SPOT, ["BTCUSDT"], "2026-01-01", "2026-01-01", kind="aggTrades", progress=False)
    archived = store.read_agg_trades("spot", "BTCUSDT")
    live = stream_trades(archived)
    store.write_agg_trades(live)
    want = pl.concat([archived, live])

    [m] = verify_store(store, Scope(), src).months
    assert (m.kind, m.label, m.status, m.rows, m.archive_rows, m.extra) == (
        "agg_trades", "spot BTCUSDT aggTrades 2026-01", "extra rows", 5003, 5000, 3)

    t0 = archived["transact_time"][1000]
    if isinstance(store, ParquetStore):  # the same damage, written as a valid file
        f = trades_file(store.root)
        write_month_file(pl.read_parquet(f).slice(100).with_columns(
            price=pl.when(pl.col("transact_time") == t0).then(pl.col("price") * 1.01).otherwise("price")), f)
    else:
        pg_exec(store, "DELETE FROM agg_trade_data WHERE agg_trade_id IN "
                "(SELECT agg_trade_id FROM agg_trade_data ORDER BY agg_trade_id LIMIT 100)")
        pg_exec(store, "UPDATE agg_trade_data SET price = price * 1.01 WHERE transact_time = %s", t0)
    [m] = verify_store(store, Scope(), src).months
    assert (m.status, m.missing, m.extra) == ("differs", 100, 3) and m.differing >= 1
    assert "2026-01-02..2026-01-31 not in the archive" in m.detail  # the sample archive has one day

    [m] = verify_store(store, Scope(), src, repair=True).months
    assert (m.status, m.repaired) == ("extra rows", True), m.detail
    assert store.read_agg_trades("spot", "BTCUSDT").equals(want)  # the archive's rows and the stream's kept
    [again] = verify_store(store, Scope(), src, repair=True).months  # idempotent
    assert (again.status, again.repaired) == ("extra rows", False)

    if isinstance(store, ParquetStore):  # truncated: what only the file held (the stream's trades) is gone
        truncate(f)
        [m] = verify_store(store, Scope(), src).months
        assert m.status == "unreadable" and m.path == str(f)
        [m] = verify_store(store, Scope(), src, repair=True).months
        assert (m.status, m.repaired) == ("ok", True), m.detail
        assert store.read_agg_trades("spot", "BTCUSDT").equals(archived)


def test_agg_trades_invariants(store: Store, shared_archive: Path) -> None:
    """Price, quantity, id ranges and time order are checked (polars on Parquet, SQL on PostgreSQL)."""
    src = ArchiveSource(str(shared_archive))
    backfill(store, src, Market.SPOT, ["BTCUSDT"], "2026-01-01", "2026-01-01", kind="aggTrades", progress=False)
    assert not verify_store(store, Scope()).failed
    trades = store.read_agg_trades("spot", "BTCUSDT")
    nxt = stream_trades(trades)
    bad = pl.concat([
        nxt.slice(0, 1).with_columns(price=pl.lit(0.0)),
        nxt.slice(1, 1).with_columns(quantity=pl.lit(0.0)),
        # back in time, and its trade ids overlap the previous aggregate trade's
        nxt.slice(2, 1).with_columns(transact_time=pl.col("transact_time") - timedelta(minutes=8),
                                     first_trade_id=pl.col("first_trade_id") - 15),
    ])
    store.write_agg_trades(bad)
    [m] = verify_store(store, Scope()).months
    assert m.status == "invalid"
    for why in ("price <= 0", "quantity <= 0", "transact_time goes back", "trade ids overlap"):
        assert why in m.detail, m.detail
    if isinstance(store, ParquetStore):  # a duplicate id can only exist in a file (PostgreSQL: primary key)
        f = trades_file(store.root)
        write_month_file(pl.concat([pl.read_parquet(f), trades.slice(7, 1)]), f)
        assert "duplicate agg_trade_id" in verify_store(store, Scope()).months[0].detail


@pytest.fixture
def trades_and_bars(store: Store, shared_archive: Path) -> tuple[Store, pl.DataFrame]:
    """Real trades, and the 5 s bars the stream's builder makes of them; BTCUSDT trades in every 5 s, so 10 s
    of trades are left out to have the empty windows a quiet market has."""
    quiet = (datetime(2026, 1, 1, 0, 5, tzinfo=UTC), datetime(2026, 1, 1, 0, 5, 10, tzinfo=UTC))
    store.write_agg_trades(load_file(ArchiveSource(str(shared_archive)), ArchiveFile(
        Market.SPOT, "aggTrades", "BTCUSDT", None, "daily", "2026-01-01")).rows.filter(
        ~pl.col("transact_time").is_between(*quiet, closed="left")))
    bars, late = build_bars(store.read_agg_trades("spot", "BTCUSDT"), "5s")
    assert late == 0 and bars.filter(pl.col("trades") == 0).height == 2
    store.write_bars(bars, "5s")
    return store, store.read_bars("spot", "BTCUSDT", "5s")


def test_bars_verified_and_rebuilt_from_stored_trades(trades_and_bars: tuple[Store, pl.DataFrame]) -> None:
    store, bars = trades_and_bars
    scope = Scope.of(kinds=["bars"])
    [m] = verify_store(store, scope).months
    assert (m.kind, m.label, m.status, m.rows) == ("bars", "spot BTCUSDT bars 5s 2026-01", "ok", bars.height)
    swapped = bars.filter(pl.col("trades") > 1).head(3)["bucket"]
    if isinstance(store, ParquetStore):
        truncate(bars_file(store.root))
    else:
        pg_exec(store, "UPDATE bar_data SET high = low, low = high WHERE bucket = ANY(%s)", swapped.to_list())
        pg_exec(store, "UPDATE bar_data SET volume = 1 WHERE trades = 0 AND bucket = "
                "(SELECT min(bucket) FROM bar_data WHERE trades = 0)")
    [m] = verify_store(store, scope).months
    if isinstance(store, ParquetStore):
        assert m.status == "unreadable"
    else:
        assert m.status == "invalid" and "3 row(s): high < low" in m.detail
        assert "empty window with prices or volume" in m.detail
    [m] = verify_store(store, scope, repair=True).months  # no archive needed: bars come from the stored trades
    assert (m.status, m.repaired) == ("ok", True), m.detail
    assert "stored trade(s)" in m.detail
    assert store.read_bars("spot", "BTCUSDT", "5s").equals(bars)
    assert not verify_store(store, scope, repair=True).months[0].repaired  # idempotent


@pytest.mark.slow  # two CLI runs
def test_bars_without_trades_are_quarantined_and_named(tmp_path: Path, shared_archive: Path) -> None:
    """No source and no stored trades: the broken file leaves the store (which reads again), reported as lost."""
    url = f"parquet://{tmp_path / 'store'}"
    st = open_store(url, tmp_path)
    trades = load_file(ArchiveSource(str(shared_archive)),
                       ArchiveFile(Market.SPOT, "aggTrades", "BTCUSDT", None, "daily", "2026-01-01")).rows
    st.write_bars(build_bars(trades, "5s")[0], "5s")  # bars stored, their trades never were
    f = bars_file(tmp_path / "store")
    truncate(f)
    broken = f.read_bytes()
    r = _cli(["data", "verify", "--repair"], url, shared_archive, tmp_path)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 stored month(s) are wrong: spot BTCUSDT bars 5s 2026-01 unreadable "
                           f"({f}) — moved to "), line
    assert "cannot be re-fetched" in line
    assert not f.exists() and st.read_bars("spot", "BTCUSDT", "5s").is_empty()
    [aside] = (tmp_path / "store" / "quarantine" / "months").rglob("data.parquet")
    assert aside.read_bytes() == broken
    assert _cli(["data", "verify"], url, shared_archive, tmp_path).returncode == 0


@pytest.fixture
def three_days(shared_archive: Path) -> pl.DataFrame:
    src = ArchiveSource(str(shared_archive))
    return pl.concat([load_file(src, ArchiveFile(Market.SPOT, "klines", "BTCUSDT", "1m", "daily", f"2020-01-0{d}"))
                      .rows for d in (1, 2, 3)])


@pytest.mark.slow  # a replay server and a CLI run
def test_recent_days_not_in_the_archive_are_checked_and_reloaded_through_rest(
        store: Store, shared_archive: Path, three_days: pl.DataFrame, tmp_path: Path) -> None:
    """The archive has published Jan 1 and 2 only; Jan 3 is served by REST (the replay server)."""
    archive = tmp_path / "archive"
    for d in (1, 2):
        copy_archive_file(shared_archive, archive, KL.format(d))
    src = ArchiveSource(str(archive))
    store.write_klines(three_days)
    day3 = three_days.filter(pl.col("open_time") >= datetime(2020, 1, 3, tzinfo=UTC))["open_time"]
    if isinstance(store, ParquetStore):
        truncate(month_file(store.root, "klines", "2020-01", market="spot", symbol="BTCUSDT", interval="1m"))
    else:  # day 3 altered and holed: the archive cannot see it
        pg_exec(store, "UPDATE kline_data SET volume = volume + 1 WHERE open_time = ANY(%s)", day3[100:103].to_list())
        pg_exec(store, "DELETE FROM kline_data WHERE open_time = ANY(%s)", day3[500:510].to_list())
        [m] = verify_store(store, Scope(), src).months
        assert (m.status, m.extra) == ("extra rows", 1430) and "2020-01-03..2020-01-31 not in the archive" in m.detail

    server = ReplayServer.from_archive(str(shared_archive), Market.SPOT, ["BTCUSDT"],
                                       datetime(2020, 1, 1, tzinfo=UTC), days=3, speed=0, agg_trades=False)
    server.clock.advance_to(datetime(2020, 1, 4, tzinfo=UTC))
    server.clock.pause()
    with run_in_thread(server) as srv:
        url = f"parquet://{store.root}" if isinstance(store, ParquetStore) else store.url
        r = _cli(["data", "verify", "--archive", "--rest-base", srv.rest_base_url], url, archive, tmp_path)
        assert r.returncode == 1 and "error: 1 stored month(s) are wrong: spot BTCUSDT 1m 2020-01" in r.stderr
        [m] = verify_store(store, Scope(), src, rest_base=srv.rest_base_url).months
        if isinstance(store, ParquetStore):
            assert m.status == "unreadable"
        else:
            assert (m.status, m.differing, m.missing, m.extra) == ("differs", 3, 10, 0), m.detail
            assert "REST for 2020-01-03..2020-01-31" in m.detail
        [m] = verify_store(store, Scope(), src, rest_base=srv.rest_base_url, repair=True).months
        assert (m.status, m.repaired, m.archive_rows) == ("ok", True, 3 * 1440), m.detail
    assert store.read_klines("spot", "BTCUSDT", "1m").equals(three_days)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "step"), [
    ("parquet", "aside"), pytest.param("postgres", "deleted", marks=pytest.mark.postgres),
])
def test_trades_repair_killed_midway_leaves_a_readable_store(kind: str, step: str, shared_archive: Path,
                                                             tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"parquet://{tmp_path / 'store'}" if kind == "parquet" else str(request.getfixturevalue("pg_url"))
    st = open_store(url, tmp_path)
    try:
        backfill(st, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2026-01-01", "2026-01-01",
                 kind="aggTrades", progress=False)
        want = st.read_agg_trades("spot", "BTCUSDT")
        if isinstance(st, ParquetStore):
            truncate(trades_file(st.root))
        else:
            pg_exec(st, "UPDATE agg_trade_data SET quantity = 0 WHERE agg_trade_id %% 100 = 0")
    finally:
        st.close()
    from rltrader.data.verify import FAULT_ENV

    r = _cli(["data", "verify", "--repair", "--kind", "agg_trades"], url, shared_archive, tmp_path,
             **{FAULT_ENV: step})
    assert r.returncode == -9, (r.returncode, r.stderr)
    st = open_store(url, tmp_path)
    try:
        [m] = verify_store(st, Scope()).months  # readable, and as before (still broken) — never half repaired
        assert m.status in ("unreadable", "invalid"), m
        st.close()
        r = _cli(["data", "verify", "--repair", "--kind", "agg_trades"], url, shared_archive, tmp_path)
        assert r.returncode == 0, r.stderr
        st = open_store(url, tmp_path)
        assert st.read_agg_trades("spot", "BTCUSDT").equals(want)
    finally:
        st.close()
