"""Stream ingester throughput, CPU cost, ceiling and lag, ours against a naive peer, from a sender that is not the cap.

Run: ``.venv/bin/python benchmarks/bench_stream.py [--quick]``. Prints one JSON line per figure:
``{"metric", "value", "unit", "peer", "peer_value", "ratio", "ceiling"}`` (ratio > 1 means ours is better;
``ceiling``: what the machine allows, see below).

* Data: futures-um 1m klines of 5 symbols (2023-02, the month the local archive has for all of them), as the
  replay server sends them on one combined connection (aggTrade + kline_1m streams per symbol, as the ingester
  subscribes; the archive has no aggTrades, so the messages are kline updates and closed candles).
* Sender (``benchmarks/ws_sender.py``, its own process): the replay server's messages, encoded once into raw
  websocket frames before the clock starts and written in large chunks over loopback, as fast as the socket
  drains or paced on exchange time. The replay server itself (aiohttp, one send per message) caps any consumer
  near 10 k msgs/s on this machine; it now only answers the REST calls (paused clock).
* Throughput (``*_msgs_per_s``): unpaced; msgs / (sender's first write → last commit), for both sides.
* CPU cost (``*_capacity``): messages per CPU-second of the ingesting process (``time.process_time``: user +
  system of all its threads, the store's writer thread and the PostgreSQL client included; the PostgreSQL
  server's own CPU is not counted, for either side).
* Ceiling (``*_ceiling_msgs_per_s``): the highest paced rate of a ladder at which p99 lag stays < 1 s and the
  last commit lands within 1 s of the sender's last frame. Lag = commit wall time - the wall time the sender
  wrote the event.
* Lag (``*_lag_p50/p99``): paced at ~3 k msgs/s (a busy real connection), as before.
* Machine ceiling (``ceiling`` field): a bare ``websockets`` client receiving the same frames and decoding each
  with orjson, nothing stored: the most a Python consumer built on that library gets on this machine. Ours does
  not use it (its own frame parser, :mod:`rltrader.data.ws_reader`), so it can pass this figure.
* Peer ``naive-executemany``: python-binance ``recv()`` per message, psycopg ``executemany`` INSERT … ON
  CONFLICT DO NOTHING per batch of 1000 messages (or 1 s), synchronously on the event loop.

The machine is shared: absolute rates move between runs; ours and the peer run interleaved in the same run.
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
import orjson
import psycopg
import requests
import websockets

from rltrader.data.rest import make_async_client, make_socket_manager
from rltrader.data.store import Store, open_store
from rltrader.data.stream import StreamStats, run_stream
from rltrader.testing import TempPostgres, free_port

ARCHIVE = os.environ.get("RLTRADER_TEST_ARCHIVE", str(Path(__file__).resolve().parents[2] / "shared/data/binance"))
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "FILUSDT", "LINKUSDT", "NEARUSDT"]
PEER = "naive-executemany"
PEER_SILENCE_S = 10.0
"""The naive peer gives up after this long without a message (the sender is done and it lost some)."""
SENDER = Path(__file__).resolve().with_name("ws_sender.py")

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


class Sender:
    """``ws_sender.py`` in a child process: frames pre-encoded, one connection at a time."""

    def __init__(self, n_max: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SENDER), ARCHIVE, ",".join(SYMBOLS), str(n_max)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        word, port, e0, rate = self.proc.stdout.readline().split()
        if word != "ready":
            raise RuntimeError("sender did not start")
        self.port, self.e0, self.rate = int(port), int(e0) / 1000, float(rate)
        self.speed = 0.0

    def url(self, msgs_per_s: float, n: int) -> str:
        """Base URL of one connection: ``msgs_per_s`` 0 = unpaced."""
        self.speed = msgs_per_s / self.rate
        return f"ws://127.0.0.1:{self.port}/{self.speed!r}/{n}/"

    def started(self) -> Callable[[float], float]:
        """Blocks until the sender's first write; returns exchange time (s) → the wall time it was written."""
        assert self.proc.stdout is not None
        t0 = float(self.proc.stdout.readline().split()[1])
        self.t0 = t0
        speed = self.speed if self.speed > 0 else float("inf")
        return lambda e: t0 + (e - self.e0) / speed

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Timed:
    """The store, recording when its last write returned (the ingester writes klines last in a flush)."""

    def __init__(self, store: Store) -> None:
        self.store, self.last = store, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def write_klines(self, *args: Any, **kwargs: Any) -> Any:
        out = self.store.write_klines(*args, **kwargs)
        self.last = time.time()
        return out


# -- ours ------------------------------------------------------------------------------------------------------
def run_ours(store: Store, replay: Replay, sender: Sender, rate: float, n_messages: int) -> dict[str, float]:
    stats = StreamStats()
    timed = Timed(store)
    stop = threading.Event()
    clock: list[Callable[[float], float]] = []

    async def main() -> None:
        async def watch() -> None:
            while stats.connections == 0:
                await asyncio.sleep(0.01)
            clock.append(await asyncio.to_thread(sender.started))
            while stats.messages < n_messages:
                await asyncio.sleep(0.005)
            stop.set()

        task = asyncio.create_task(watch())
        await run_stream(timed, "futures-um", SYMBOLS, rest_base=replay.rest, ws_base=sender.url(rate, n_messages),
                         flush_seconds=1.0,
                         stale_seconds=30, metrics_seconds=60, stop_event=stop, stats=stats,
                         event_clock=lambda e: clock[0](e) if clock else e)
        await task

    cpu0 = time.process_time()
    asyncio.run(main())
    elapsed, cpu = timed.last - sender.t0, time.process_time() - cpu0
    p50, p99 = stats.lag_quantiles(0.5, 0.99)
    return {"msgs": stats.messages, "elapsed": elapsed, "cpu": cpu, "p50": p50 or 0.0, "p99": p99 or 0.0,
            "rows": stats.rows_committed}


def kept_up(out: dict[str, float], n: int, r: float) -> bool:
    """A ladder rung passes when every message arrived, p99 lag < 1 s, and the last commit came within 1 s of
    the last send."""
    return out["msgs"] >= n and out["p99"] < 1.0 and out["elapsed"] <= n / r + 1.0


# -- the naive peer ----------------------------------------------------------------------------------------------
PEER_DDL = """
CREATE TABLE IF NOT EXISTS peer_klines (symbol text, open_time bigint, open float8, high float8, low float8,
  close float8, volume float8, close_time bigint, quote_volume float8, trades bigint, taker_buy_volume float8,
  taker_buy_quote_volume float8, PRIMARY KEY (symbol, open_time));
CREATE TABLE IF NOT EXISTS peer_trades (symbol text, agg_trade_id bigint, price float8, quantity float8,
  transact_time bigint, is_buyer_maker bool, PRIMARY KEY (symbol, agg_trade_id));
"""


def run_peer(url: str, replay: Replay, sender: Sender, rate: float, n_messages: int) -> dict[str, float]:
    conn = psycopg.connect(url, autocommit=False)
    conn.execute(PEER_DDL)
    conn.commit()
    lags: list[float] = []
    last_commit: list[float] = []

    async def main() -> int:
        client = await make_async_client("futures-um", replay.rest)
        bm = make_socket_manager(client, sender.url(rate, n_messages), max_queue_size=1_000_000)
        sock = bm.futures_multiplex_socket([f"{s.lower()}@{k}" for s in SYMBOLS for k in ("aggTrade", "kline_1m")])
        n = 0
        klines: list[tuple[Any, ...]] = []
        trades: list[tuple[Any, ...]] = []
        events: list[float] = []
        last = time.monotonic()
        async with sock:
            clock = await asyncio.to_thread(sender.started)
            while n < n_messages:
                try:  # bounded: python-binance's recv() loops for ever once a message is lost (queue overflow,
                    # its silent reconnect); the rung then fails on its message count instead of hanging the run
                    msg = await asyncio.wait_for(sock.recv(), PEER_SILENCE_S)
                except TimeoutError:
                    break
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
                    last_commit.append(now)
                    lags.extend(now - clock(e) for e in events)
                    klines, trades, events = [], [], []
                    last = time.monotonic()
            if sock.ws is not None:
                await sock.ws.close()  # else python-binance's exit waits out its 10 s recv timeout
        await client.close_connection()
        return n

    cpu0 = time.process_time()
    n = asyncio.run(main())
    elapsed, cpu = (last_commit[-1] if last_commit else time.time()) - sender.t0, time.process_time() - cpu0
    conn.close()
    arr = np.asarray(lags) if lags else np.zeros(1)
    return {"msgs": n, "elapsed": elapsed, "cpu": cpu, "p50": float(np.quantile(arr, 0.5)),
            "p99": float(np.quantile(arr, 0.99))}


# -- the machine's ceiling ---------------------------------------------------------------------------------------
def run_bare(sender: Sender, n_messages: int) -> dict[str, float]:
    """A bare websockets client: receive and orjson-decode ``n_messages`` frames, store nothing."""
    async def main() -> int:
        n = 0
        async with websockets.connect(sender.url(0, n_messages) + "stream", max_size=None) as ws:
            await asyncio.to_thread(sender.started)
            loads = orjson.loads
            while n < n_messages:
                loads(await ws.recv(decode=False))
                n += 1
        return n

    cpu0 = time.process_time()
    n = asyncio.run(main())
    return {"msgs": n, "elapsed": time.time() - sender.t0, "cpu": time.process_time() - cpu0}


# -- driver ------------------------------------------------------------------------------------------------------
def emit(metric: str, value: float, unit: str, peer_value: float, higher_is_better: bool = True,
         ceiling: float | None = None, **extra: Any) -> None:
    if ceiling is not None:
        extra = {"ceiling": round(ceiling, 1), **extra}
    h.emit(h.line(metric, value, unit, PEER, peer_value, digits=4,
                  ratio_value=h.ratio(value, peer_value, higher_is_better=higher_is_better, digits=3), **extra))


def rate(r: dict[str, float]) -> float:
    return r["msgs"] / r["elapsed"]


def capacity(r: dict[str, float]) -> float:
    return r["msgs"] / r["cpu"] if r["cpu"] else 0.0


log = h.logger("bench_stream")


def main() -> None:
    ap = h.parser(__doc__, "small runs, under a minute in all")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    n_fast = 20_000 if args.quick else 200_000
    ladder_s = 2.0 if args.quick else 5.0  # seconds of messages per ladder step
    ladder = ([5_000, 15_000, 40_000] if args.quick
              else [5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000])
    lag_rate, n_lag = 3_000.0, (6_000 if args.quick else 30_000)
    n_max = max(n_fast, int(ladder[-1] * ladder_s), n_lag)

    sender = Sender(n_max)
    replay = Replay(0.0)  # REST only (the ping at start); the clock stays paused
    with TempPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        def fresh(kind: str, name: str) -> Store:
            if kind == "postgres":
                return open_store(pg.create_database(name), Path(tmp))
            return open_store(f"parquet://{tmp}/{name}", Path(tmp))

        def ours(kind: str, label: str, r: float, n: int) -> dict[str, float]:
            store = fresh(kind, label)
            try:
                out = run_ours(store, replay, sender, r, n)
            finally:
                store.close()
            log(f"{label}: {rate(out):,.0f} msgs/s, {capacity(out):,.0f} msgs/cpu-s, p99 lag {out['p99']:.3f} s")
            return out

        def peer(label: str, r: float, n: int) -> dict[str, float]:
            out = run_peer(pg.create_database(label), replay, sender, r, n)
            log(f"{label}: {rate(out):,.0f} msgs/s, {capacity(out):,.0f} msgs/cpu-s, p99 lag {out['p99']:.3f} s")
            return out

        try:
            res: dict[str, dict[str, float]] = {}
            # interleaved: bare, ours pg, peer, ours parquet (the machine is shared; neighbours move the numbers)
            res["bare"] = run_bare(sender, n_fast)
            log(f"bare client: {rate(res['bare']):,.0f} msgs/s, {capacity(res['bare']):,.0f} msgs/cpu-s")
            res["pg_fast"] = ours("postgres", "pg_fast", 0, n_fast)
            res["peer_fast"] = peer("peer_fast", 0, n_fast)
            res["parquet_fast"] = ours("parquet", "parquet_fast", 0, n_fast)
            ceilings: dict[str, float] = {"pg": 0.0, "parquet": 0.0, "peer": 0.0}
            alive = dict.fromkeys(ceilings, True)
            for r in ladder:
                n = int(r * ladder_s)
                for who in ("pg", "peer", "parquet"):
                    if not alive[who]:
                        continue
                    label = f"{who}_ladder_{r}"
                    out = (peer(label, r, n) if who == "peer"
                           else ours("postgres" if who == "pg" else "parquet", label, r, n))
                    if kept_up(out, n, r):
                        ceilings[who] = float(r)
                    else:
                        alive[who] = False
            res["pg_lag"] = ours("postgres", "pg_lag", lag_rate, n_lag)
            res["peer_lag"] = peer("peer_lag", lag_rate, n_lag)
        finally:
            sender.close()
            replay.close()

    bare, peer_fast, peer_lag = res["bare"], res["peer_fast"], res["peer_lag"]
    top = f"ladder {ladder[0]:,}…{ladder[-1]:,} msgs/s"
    emit("stream_postgres_msgs_per_s", rate(res["pg_fast"]), "msgs/s", rate(peer_fast), ceiling=rate(bare))
    emit("stream_parquet_msgs_per_s", rate(res["parquet_fast"]), "msgs/s", rate(peer_fast), ceiling=rate(bare))
    emit("stream_postgres_capacity", capacity(res["pg_fast"]), "msgs/cpu-s", capacity(peer_fast),
         ceiling=capacity(bare), cpu_us_per_msg=round(1e6 / capacity(res["pg_fast"]), 2))
    emit("stream_parquet_capacity", capacity(res["parquet_fast"]), "msgs/cpu-s", capacity(peer_fast),
         ceiling=capacity(bare), cpu_us_per_msg=round(1e6 / capacity(res["parquet_fast"]), 2))
    emit("stream_postgres_ceiling_msgs_per_s", ceilings["pg"], "msgs/s", ceilings["peer"], ceiling=rate(bare),
         note=f"highest paced rate with p99 lag < 1 s, {top}")
    emit("stream_parquet_ceiling_msgs_per_s", ceilings["parquet"], "msgs/s", ceilings["peer"], ceiling=rate(bare),
         note=f"highest paced rate with p99 lag < 1 s, {top}")
    emit("stream_postgres_lag_p50", res["pg_lag"]["p50"], "s", peer_lag["p50"], higher_is_better=False)
    emit("stream_postgres_lag_p99", res["pg_lag"]["p99"], "s", peer_lag["p99"], higher_is_better=False)
    log(f"load average (1 min) {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
