"""Stream ingester throughput and lag, ours against a naive peer, both fed by the replay server.

Run: ``.venv/bin/python benchmarks/bench_stream.py [--quick]``. Prints one JSON line per figure:
``{"metric", "value", "unit", "peer", "peer_value", "ratio"}`` (ratio > 1 means ours is better).

* Data: futures-um 1m klines of 5 symbols (2023-02, the month the local archive has for all of them) replayed
  over one combined connection (aggTrade + kline_1m streams per symbol, as the ingester subscribes).
* The replay server runs in its own process, so it does not share the ingester's GIL.
* Throughput: the replay runs as fast as it can; msgs/s = messages / (replay clock started → last row committed).
  On a 2-core machine the replay server's send rate can be the ceiling for both contenders, so the CPU cost
  per message of the ingesting process is reported too (``*_capacity``: messages per CPU-second).
* Lag: the replay runs at a fixed speed, and an event at exchange time E is due at wall time
  ``wall0 + (E - market0) / speed``; lag = commit wall time - that (p50/p99 over closed candles and trades).
* Peer ``naive-executemany``: python-binance ``recv()`` per message, psycopg ``executemany`` INSERT … ON
  CONFLICT DO NOTHING per batch of 1000 messages (or 1 s), synchronously on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np
import psycopg
import requests

from rltrader.data.rest import make_async_client, make_socket_manager
from rltrader.data.store import Store, open_store
from rltrader.data.stream import StreamStats, run_stream
from rltrader.testing import TempPostgres, free_port

ARCHIVE = os.environ.get("RLTRADER_TEST_ARCHIVE", str(Path(__file__).resolve().parents[2] / "shared/data/binance"))
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "FILUSDT", "LINKUSDT", "NEARUSDT"]
PEER = "naive-executemany"

_SERVER = """
import asyncio, sys
from datetime import datetime, UTC
from rltrader.sim import ReplayServer, ReplayClock
start = datetime(2023, 2, 1, tzinfo=UTC)
srv = ReplayServer.from_archive(sys.argv[1], "futures-um", sys.argv[2].split(","), start,
                                datetime(2023, 2, 28, tzinfo=UTC), agg_trades=False,
                                clock=ReplayClock(start, float(sys.argv[4]), paused=True), heartbeat_s=None,
                                port=int(sys.argv[3]))
async def main():
    async with srv:
        print("ready", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


class Replay:
    """The replay server in a child process; its clock starts paused and is resumed when a client is ready."""

    def __init__(self, speed: float) -> None:
        self.port = free_port()
        self.speed = speed
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, ARCHIVE, ",".join(SYMBOLS), str(self.port),
                                      str(speed)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("replay server did not start")
        self.rest = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/"

    def resume(self) -> Callable[[float], float]:
        """Start the clock; returns the map exchange time (s) → local wall time (s) for lag."""
        before = time.time()
        status = requests.post(f"{self.rest}/_replay/clock", json={"paused": False}, timeout=10).json()
        wall0 = (before + time.time()) / 2
        market0 = status["now"] / 1000
        speed = self.speed if self.speed > 0 else float("inf")
        return lambda e: wall0 + (e - market0) / speed

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- ours ------------------------------------------------------------------------------------------------------
def run_ours(store: Store, replay: Replay, n_messages: int) -> dict[str, float]:
    stats = StreamStats()
    stop = threading.Event()
    clock: list[Callable[[float], float]] = []
    started: list[float] = []

    async def main() -> None:
        async def watch() -> None:
            while stats.connections == 0:
                await asyncio.sleep(0.01)
            started.append(time.perf_counter())
            clock.append(replay.resume())
            while stats.messages < n_messages:
                await asyncio.sleep(0.005)
            stop.set()

        task = asyncio.create_task(watch())
        await run_stream(store, "futures-um", SYMBOLS, rest_base=replay.rest, ws_base=replay.ws, flush_seconds=1.0,
                         stale_seconds=30, metrics_seconds=60, stop_event=stop, stats=stats,
                         event_clock=lambda e: clock[0](e) if clock else e)
        await task

    cpu0 = time.process_time()
    asyncio.run(main())
    elapsed, cpu = time.perf_counter() - started[0], time.process_time() - cpu0
    p50, p99 = stats.lag_quantiles(0.5, 0.99)
    return {"msgs": stats.messages, "elapsed": elapsed, "cpu": cpu, "p50": p50 or 0.0, "p99": p99 or 0.0,
            "rows": stats.rows_committed}


# -- the naive peer ----------------------------------------------------------------------------------------------
PEER_DDL = """
CREATE TABLE IF NOT EXISTS peer_klines (symbol text, open_time bigint, open float8, high float8, low float8,
  close float8, volume float8, close_time bigint, quote_volume float8, trades bigint, taker_buy_volume float8,
  taker_buy_quote_volume float8, PRIMARY KEY (symbol, open_time));
CREATE TABLE IF NOT EXISTS peer_trades (symbol text, agg_trade_id bigint, price float8, quantity float8,
  transact_time bigint, is_buyer_maker bool, PRIMARY KEY (symbol, agg_trade_id));
"""


def run_peer(url: str, replay: Replay, n_messages: int) -> dict[str, float]:
    conn = psycopg.connect(url, autocommit=False)
    conn.execute(PEER_DDL)
    conn.commit()
    lags: list[float] = []
    started: list[float] = []

    async def main() -> int:
        client = await make_async_client("futures-um", replay.rest)
        bm = make_socket_manager(client, replay.ws, max_queue_size=1_000_000)
        sock = bm.futures_multiplex_socket([f"{s.lower()}@{k}" for s in SYMBOLS for k in ("aggTrade", "kline_1m")])
        n = 0
        klines: list[tuple[Any, ...]] = []
        trades: list[tuple[Any, ...]] = []
        events: list[float] = []
        last = time.monotonic()
        async with sock:
            started.append(time.perf_counter())
            clock = replay.resume()
            while n < n_messages:
                msg = await sock.recv()
                n += 1
                d = msg.get("data", {})
                if d.get("e") == "kline" and d["k"]["x"]:
                    k = d["k"]
                    klines.append((d["s"], k["t"], float(k["o"]), float(k["h"]), float(k["l"]), float(k["c"]),
                                   float(k["v"]), k["T"], float(k["q"]), k["n"], float(k["V"]), float(k["Q"])))
                    events.append(d["E"] / 1000)
                elif d.get("e") == "aggTrade":
                    trades.append((d["s"], d["a"], float(d["p"]), float(d["q"]), d["T"], d["m"]))
                    events.append(d["E"] / 1000)
                if len(klines) + len(trades) >= 1000 or time.monotonic() - last >= 1.0 or n >= n_messages:
                    with conn.cursor() as cur:
                        if klines:
                            cur.executemany("INSERT INTO peer_klines VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                                            "ON CONFLICT DO NOTHING", klines)
                        if trades:
                            cur.executemany("INSERT INTO peer_trades VALUES (%s,%s,%s,%s,%s,%s) "
                                            "ON CONFLICT DO NOTHING", trades)
                    conn.commit()
                    now = time.time()
                    lags.extend(now - clock(e) for e in events)
                    klines, trades, events = [], [], []
                    last = time.monotonic()
        await client.close_connection()
        return n

    cpu0 = time.process_time()
    n = asyncio.run(main())
    elapsed, cpu = time.perf_counter() - started[0], time.process_time() - cpu0
    conn.close()
    arr = np.asarray(lags) if lags else np.zeros(1)
    return {"msgs": n, "elapsed": elapsed, "cpu": cpu, "p50": float(np.quantile(arr, 0.5)),
            "p99": float(np.quantile(arr, 0.99))}


# -- driver ------------------------------------------------------------------------------------------------------
def emit(metric: str, value: float, unit: str, peer_value: float, higher_is_better: bool = True) -> None:
    h.emit(h.line(metric, value, unit, PEER, peer_value, digits=4,
                  ratio_value=h.ratio(value, peer_value, higher_is_better=higher_is_better, digits=3)))


def main() -> None:
    ap = h.parser(__doc__, "small runs, under a minute in all")
    args = ap.parse_args()
    n_fast = 30_000 if args.quick else 200_000
    n_lag = 10_000 if args.quick else 60_000
    lag_speed = 12_000.0  # 5 symbols x ~3 events per candle: ~3k msgs/s

    with TempPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        def fresh(kind: str, name: str) -> Store:
            if kind == "postgres":
                return open_store(pg.create_database(name), Path(tmp))
            return open_store(f"parquet://{tmp}/{name}", Path(tmp))

        results: dict[str, dict[str, float]] = {}
        for label, kind, n, speed in [("pg_fast", "postgres", n_fast, 0.0), ("parquet_fast", "parquet", n_fast, 0.0),
                                      ("pg_lag", "postgres", n_lag, lag_speed)]:
            replay = Replay(speed)
            store = fresh(kind, label)
            try:
                results[label] = run_ours(store, replay, n)
            finally:
                store.close()
                replay.close()
        for label, n, speed in [("peer_fast", n_fast, 0.0), ("peer_lag", n_lag, lag_speed)]:
            replay = Replay(speed)
            try:
                results[label] = run_peer(pg.create_database(label), replay, n)
            finally:
                replay.close()

    def rate(r: dict[str, float]) -> float:
        return r["msgs"] / r["elapsed"]

    def capacity(r: dict[str, float]) -> float:
        return r["msgs"] / r["cpu"] if r["cpu"] else 0.0

    peer_fast, peer_lag = results["peer_fast"], results["peer_lag"]
    emit("stream_postgres_msgs_per_s", rate(results["pg_fast"]), "msgs/s", rate(peer_fast))
    emit("stream_parquet_msgs_per_s", rate(results["parquet_fast"]), "msgs/s", rate(peer_fast))
    emit("stream_postgres_capacity", capacity(results["pg_fast"]), "msgs/cpu-s", capacity(peer_fast))
    emit("stream_parquet_capacity", capacity(results["parquet_fast"]), "msgs/cpu-s", capacity(peer_fast))
    emit("stream_postgres_lag_p50", results["pg_lag"]["p50"], "s", peer_lag["p50"], higher_is_better=False)
    emit("stream_postgres_lag_p99", results["pg_lag"]["p99"], "s", peer_lag["p99"], higher_is_better=False)


if __name__ == "__main__":
    main()
