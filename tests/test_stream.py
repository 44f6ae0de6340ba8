"""End to end: replay server (real archive data, real python-binance clients) → stream ingester → real stores.

Faults are injected by the replay server: dropped connections at random points, malformed frames, stalls.
Afterwards the store must hold exactly what the archive holds: every closed candle once, every trade once, and
5 s bars that roll up to the 1 m bars computed from the stored trades.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import REPO, SHARED_ARCHIVE, archive_rows
from polars.testing import assert_frame_equal

from rltrader.config import StreamSettings
from rltrader.data.schema import Market
from rltrader.data.store import Store, open_store
from rltrader.data.stream import Backoff, StreamStats, stream
from rltrader.sim import ReplayClock, ReplayServer, run_in_thread
from rltrader.testing import TempPostgres

pytestmark = pytest.mark.usefixtures("shared_archive")  # reads the real shared data

ARCHIVE = SHARED_ARCHIVE  # missing data fails these tests (shared_archive fixture), it is never silently skipped

D0 = datetime(2020, 1, 1, tzinfo=UTC)  # spot BTCUSDT 1m klines (1440), no trades
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # spot BTCUSDT aggTrades: 5000 trades, 00:00-00:12


@pytest.fixture
def pg(pg_server: TempPostgres, shared_archive: Path) -> TempPostgres:
    return pg_server


def make_store(kind: str, pg: Any, tmp_path: Path, name: str) -> Store:
    if kind == "postgres":
        return open_store(pg.create_database(name), tmp_path)
    return open_store(f"parquet://{tmp_path / 'store'}", tmp_path)


def run_until(srv: ReplayServer, store: Store, done: Callable[[StreamStats], bool], *, timeout: float = 60.0,
              on_tick: Callable[[], None] | None = None, **settings: Any) -> StreamStats:
    """Stream in a background thread until ``done(stats)``, then stop cleanly (which flushes)."""
    cfg = StreamSettings(market=Market.SPOT, symbols=["BTCUSDT"], rest_base=srv.rest_base_url,
                         ws_base=srv.ws_base_url, flush_seconds=0.5, metrics_seconds=5.0,
                         **{k: v for k, v in settings.items() if k in StreamSettings.model_fields})
    options = {k: v for k, v in settings.items() if k not in StreamSettings.model_fields}
    stats = StreamStats()
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            stream(cfg, store, stop_event=stop, stats=stats, handle_signals=False,
                   backoff=Backoff(base_s=0.05, max_s=0.5), **options)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done(stats) and thread.is_alive() and time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        time.sleep(0.002)
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), "stream did not stop"
    if failure:
        raise failure[0]
    assert done(stats), f"timed out: {stats.as_dict()}"
    return stats


def random_drops(srv: ReplayServer, rng: random.Random, n: int, lo: int, hi: int) -> Callable[[], None]:
    """Drop the connection after a random number of messages, ``n`` times, then stop dropping; stall once."""
    srv.set_faults(drop_after=rng.randint(lo, hi))
    seen = [0]

    def tick() -> None:
        if srv.stats.stalls and srv.faults.stall_after is not None:
            srv.set_faults(stall_after=None)
        if srv.stats.drops != seen[0]:
            seen[0] = srv.stats.drops
            srv.set_faults(drop_after=rng.randint(lo, hi) if seen[0] < n else None)

    return tick


@pytest.mark.postgres
def test_klines_day_exact_after_startup_repair_and_three_drops(pg: Any, tmp_path: Path) -> None:
    """The store already holds 00:00-01:39; the stream starts at 06:00 (start-up REST repair fills 01:40-05:59),
    is dropped 3 times at random points, and afterwards holds the archive day exactly: 1440, none twice."""
    expected = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())
    store = make_store("postgres", pg, tmp_path, "klines_day")
    try:
        store.write_klines(expected.head(100))
        srv = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], D0, D0, agg_trades=False,
                                        clock=ReplayClock(D0 + timedelta(hours=6), 0.0), heartbeat_s=None)
        with run_in_thread(srv):
            tick = random_drops(srv, random.Random(7), 3, 200, 1500)
            stats = run_until(srv, store, lambda s: s.klines_received + s.repaired_candles >= 1340,
                              on_tick=tick, stale_seconds=5.0)
            assert srv.stats.drops == 3
        got = store.read_klines("spot", "BTCUSDT", "1m")
        assert_frame_equal(got, expected, check_exact=True)
        assert stats.reconnects == 3
        assert stats.repaired_candles >= 260  # at least the start-up hole 01:40-05:59
        assert stats.klines_stored + 100 == 1440
        assert stats.malformed == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("kind", "faults"),
    [
        pytest.param("postgres", {"malformed_every": 400, "malformed_kind": "not_json"}, marks=pytest.mark.postgres),
        ("parquet", {"malformed_every": 700, "malformed_kind": "bad_shape", "stall_after": 300,
                     "stall_seconds": 2.0}),
    ],
)
def test_trades_and_bars_exact_with_faults(kind: str, faults: dict[str, Any], request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    expected = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())
    pg = request.getfixturevalue("pg") if kind == "postgres" else None  # the parquet case needs no server
    store = make_store(kind, pg, tmp_path, f"trades_{kind}")
    try:
        srv = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], T0, T0,
                                        clock=ReplayClock(T0, 0.0), heartbeat_s=None)
        srv.set_faults(**faults)
        with run_in_thread(srv):
            tick = random_drops(srv, random.Random(11), 2, 500, 2000)
            stats = run_until(srv, store, lambda s: s.trades_received + s.repaired_trades >= expected.height,
                              on_tick=tick, stale_seconds=1.0)
            malformed_sent = srv.stats.malformed_sent
        # every trade exactly once, nothing corrupted by the malformed frames
        assert_frame_equal(store.read_agg_trades("spot", "BTCUSDT"), expected, check_exact=True)
        assert malformed_sent > 0 and stats.malformed == malformed_sent
        assert stats.reconnects >= 2
        if "stall_after" in faults:
            assert stats.stale_reconnects >= 1

        bars = store.read_bars("spot", "BTCUSDT", "5s")
        assert bars.height > 140
        steps = bars.get_column("bucket").diff().drop_nulls().dt.total_seconds().unique().to_list()
        assert steps == [5]  # contiguous: empty windows are rows, not holes
        empty = bars.filter(pl.col("trades") == 0)
        assert empty.select(pl.col("open").null_count()).item() == empty.height
        lo, hi = bars.get_column("bucket").min(), bars.get_column("bucket").max() + timedelta(seconds=5)  # type: ignore[operator]
        # 5 s bars = the store's own aggregation of the stored trades
        ref5 = store.trade_bars("spot", "BTCUSDT", "5s", lo, hi)
        assert_frame_equal(bars.filter(pl.col("trades") > 0), ref5, rel_tol=1e-9, abs_tol=1e-9)
        # rolled up to 1 m they equal the 1 m bars from trades, for the minutes the 5 s bars cover completely
        rolled = (
            bars.sort("bucket").group_by_dynamic("bucket", every="1m").agg(
                pl.len().alias("windows"),
                pl.col("open").drop_nulls().first(), pl.col("high").max(), pl.col("low").min(),
                pl.col("close").drop_nulls().last(), pl.col("volume").sum(), pl.col("quote_volume").sum(),
                pl.col("trades").sum(), pl.col("taker_buy_volume").sum())
            .filter(pl.col("windows") == 12).drop("windows")
        )
        assert rolled.height >= 11
        ref1 = store.trade_bars("spot", "BTCUSDT", "1m").join(rolled.select("bucket"), on="bucket")
        assert_frame_equal(rolled, ref1.drop("market", "symbol"), rel_tol=1e-9, abs_tol=1e-9)
        # …and the replayed closed 1 m klines (derived from the same trades) where trades cover the minute
        klines = store.read_klines("spot", "BTCUSDT", "1m").rename({"open_time": "bucket"})
        assert klines.height == 12 and stats.klines_stored + stats.repaired_candles >= 12
        both = rolled.join(klines, on="bucket", suffix="_k")
        assert both.height >= 11
        for col in ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume"):
            diff = both.select(((pl.col(col) - pl.col(f"{col}_k")).abs() / pl.col(col).abs()).max()).item()
            assert diff < 1e-9, col
        assert stats.late_trades == 0
    finally:
        store.close()


@pytest.mark.slow
def test_sigterm_flushes_everything(tmp_path: Path) -> None:
    """`rltrader data stream` stopped by SIGTERM writes what it buffered (flush interval set far away)."""
    import json
    import signal
    import subprocess
    import sys

    server = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], T0, speed=30.0)
    store_url = f"parquet://{tmp_path / 'store'}"
    with run_in_thread(server) as srv:
        env = {**os.environ, "RLTRADER_DB_URL": store_url, "RLTRADER_DATA_DIR": str(tmp_path),
               "RLTRADER_STREAM__FLUSH_SECONDS": "600", "RLTRADER_STREAM__METRICS_SECONDS": "600"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "rltrader.cli", "data", "stream", "--market", "spot", "--symbols", "BTCUSDT",
             "--rest-base", srv.rest_base_url, "--ws-base", srv.ws_base_url],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(6)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stats = json.loads(out)
    store = open_store(store_url, tmp_path)
    stored = store.read_agg_trades("spot", "BTCUSDT")
    assert stats["trades_received"] > 100
    assert stored.height == stats["trades_stored"] == stats["trades_received"] - stats["duplicates"]
    ids = stored.get_column("agg_trade_id")
    assert ids.is_sorted() and ids.diff().drop_nulls().eq(1).all()  # contiguous: nothing lost at the stop


def test_heartbeat_pings_answered_on_one_connection(tmp_path: Path) -> None:
    """The replay server pings every 0.2 s and drops a connection whose pong does not come within 0.1 s (aiohttp's
    heartbeat): our own websocket client must answer every ping, so one connection carries the whole run."""
    store = make_store("parquet", None, tmp_path, "heartbeat")
    try:
        srv = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], D0, D0, agg_trades=False,
                                        clock=ReplayClock(D0 + timedelta(hours=1), 600.0), heartbeat_s=0.2)
        with run_in_thread(srv):
            started = time.monotonic()
            stats = run_until(srv, store, lambda s: s.klines_received >= 15, stale_seconds=5.0)
            assert time.monotonic() - started > 1.0  # long enough for several pings
        assert stats.connections == 1 and stats.reconnects == 0 and stats.stale_reconnects == 0
        assert stats.malformed == 0 and stats.klines_stored >= 15
    finally:
        store.close()
