"""Test and benchmark helpers: a throwaway PostgreSQL server and synthetic klines.

``TempPostgres``: real server, loopback, free port, deleted on stop.

Tests exercise the real database rather than a mock, and CI machines have the server binaries but no running
server. As root, ``initdb`` refuses to run, so the server runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import numpy as np
import polars as pl

PG_BIN_CANDIDATES = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]


def find_pg_bin() -> Path:
    """Folder with initdb/pg_ctl: ``RLTRADER_PG_BIN``, Debian's layout, or ``PATH``."""
    env = os.environ.get("RLTRADER_PG_BIN")
    for cand in ([Path(env)] if env else []) + PG_BIN_CANDIDATES:
        if (cand / "initdb").exists():
            return cand
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql, or set RLTRADER_PG_BIN)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TempPostgres:
    """``with TempPostgres() as pg: pg.url`` → a fresh cluster with database ``postgres``, trust auth."""

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rltrader-pg-"))
        self.data = self.dir / "data"
        self.as_root = os.geteuid() == 0
        self.user = "postgres"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> TempPostgres:
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        else:
            import getpass

            self.user = getpass.getuser()
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", self.user,
                  "--encoding=UTF8", "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                  "-w", "start")
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not start; see {self.dir / 'log'}")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def synthetic_klines(symbol: str, start: str, minutes: int, *, seed: int = 0, price: float = 100.0,
                     missing: tuple[tuple[int, int], ...] = (), market: str = "futures-um") -> pl.DataFrame:
    """1m klines of a geometric random walk in the store's schema, for tests that need exact control of
    the data (cut points, gaps). ``missing`` = (first, last) minute offsets to leave out (a gap)."""
    from datetime import UTC, datetime, timedelta

    from rltrader.data.schema import KLINE_SCHEMA

    rng = np.random.default_rng(seed)
    t0 = datetime.fromisoformat(start).replace(tzinfo=UTC)
    logp = np.log(price) + np.cumsum(rng.normal(0, 0.001, minutes + 1))
    close = np.round(np.exp(logp[1:]), 4)
    open_ = np.round(np.exp(logp[:-1]), 4)
    wiggle = np.abs(rng.normal(0, 0.0005, (2, minutes)))
    high = np.round(np.maximum(open_, close) * (1 + wiggle[0]), 4)
    low = np.round(np.minimum(open_, close) * (1 - wiggle[1]), 4)
    volume = np.round(rng.gamma(2.0, 50.0, minutes), 3)
    keep = np.ones(minutes, dtype=bool)
    for a, b in missing:
        keep[a:b + 1] = False
    times = [t0 + timedelta(minutes=i) for i in range(minutes)]
    df = pl.DataFrame({
        "market": market, "symbol": symbol, "interval": "1m",
        "open_time": times, "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "close_time": [t + timedelta(seconds=59, milliseconds=999) for t in times],
        "quote_volume": volume * close, "trades": rng.integers(1, 500, minutes),
        "taker_buy_volume": np.round(volume * rng.uniform(0.2, 0.8, minutes), 3),
        "taker_buy_quote_volume": np.round(volume * close * 0.5, 3),
    }).filter(pl.Series(keep))
    return df.cast(KLINE_SCHEMA).select(list(KLINE_SCHEMA))  # type: ignore[arg-type]
