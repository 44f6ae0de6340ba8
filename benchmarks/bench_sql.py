"""SQL benchmark: roll-ups over a year of real 1m futures bars, `rltrader data sql` (DuckDB over the Parquet store)
against pandas over the same files, in the same run.

    python benchmarks/bench_sql.py [--quick] [--archive-base PATH] [--repeats N] [--months N]

The data: the futures-um symbol with the most monthly 1m kline zips under ``<archive-base>`` (FILUSDT in the
shared mirror), its first ``--months`` months (default 12: a year of bars; the shared mirror's months are not
contiguous — 2023-02 … 2024-10 with holes — which changes nothing for a roll-up's cost), parsed and written into
a temporary ``ParquetStore`` (one zstd file per month, the store's own layout) outside every timer. If fewer
months exist, all are used and the ``peer`` field says how many. One JSON line per figure on stdout::

    {"metric": ..., "value": ..., "unit": ..., "peer": ..., "peer_value": ..., "ratio": ...}

``ratio`` = ours / peer in input rows per second (> 1: ours is faster). A human-readable table goes to stderr.

Figures (best of ``--repeats``, each repetition reading the files again; the page cache is warm for both)
  1. ``sql_daily_ohlcv_rows_per_s``: daily OHLCV per symbol (open = first, close = last by open_time, max high,
     min low, summed volume, bar count). Ours: ``rltrader.data.sql.run_duckdb`` — exactly what
     ``rltrader data sql`` runs (parser check, views over the store, query, rows fetched into Python tuples).
     Peer: ``pandas.read_parquet`` of every month file (only the needed columns), ``concat``, ``groupby`` on
     the UTC day with ``first/max/min/last/sum/size`` — the pandas user's way (input already sorted, no sort
     charged to the peer).
  2. ``sql_vwap_5m_rows_per_s``: 5-minute roll-up with VWAP = Σ quote_volume / Σ volume (exact from klines),
     OHLC, volume, trades and taker-buy share per bucket. Same two sides.

Outside the timers both sides' results are checked to be the same (row count, keys, values within 1e-9
relative). ``--quick`` (< 1 min): 3 months, one repetition.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
try:
    import rltrader  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file  # noqa: E402
from rltrader.data.parquet_store import ParquetStore, live_files  # noqa: E402
from rltrader.data.schema import Market  # noqa: E402
from rltrader.data.sql import run_duckdb  # noqa: E402

DEFAULT_ARCHIVE_BASE = REPO.parent / "shared" / "data" / "binance"
MARKET = Market.FUTURES_UM

DAILY_SQL = """
    SELECT symbol, date_trunc('day', open_time) AS day,
           arg_min(open, open_time) AS open, max(high) AS high, min(low) AS low, arg_max(close, open_time) AS close,
           sum(volume) AS volume, count(*) AS bars
    FROM klines WHERE market = 'futures-um' AND interval = '1m'
    GROUP BY ALL ORDER BY symbol, day"""
VWAP_SQL = """
    SELECT symbol, time_bucket(INTERVAL '5 minutes', open_time) AS bucket,
           arg_min(open, open_time) AS open, max(high) AS high, min(low) AS low, arg_max(close, open_time) AS close,
           sum(volume) AS volume, sum(quote_volume) / sum(volume) AS vwap, sum(trades) AS trades,
           sum(taker_buy_volume) / sum(volume) AS taker_buy_share
    FROM klines WHERE market = 'futures-um' AND interval = '1m'
    GROUP BY ALL ORDER BY symbol, bucket"""
PEER = "pandas {pd} (read_parquet per month file, concat, groupby)"


def log(msg: str) -> None:
    print(f"[bench_sql] {msg}", file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------------------------
def pick_months(base: Path, months: int) -> tuple[str, list[ArchiveFile]]:
    """The futures-um symbol with the most monthly 1m zips, and its first ``months`` of them."""
    found: dict[str, list[str]] = {}
    for path in sorted((base / "futures" / "um" / "monthly" / "klines").glob("*/1m/*-1m-*.zip")):
        found.setdefault(path.parent.parent.name, []).append(path.stem.split("-1m-", 1)[1])
    if not found:
        raise SystemExit(f"no futures/um monthly 1m kline zips under {base}")
    symbol = max(sorted(found), key=lambda s: len(found[s]))
    periods = sorted(found[symbol])[:months]
    return symbol, [ArchiveFile(MARKET, "klines", symbol, "1m", "monthly", p) for p in periods]


def fill_store(base: Path, files: list[ArchiveFile], root: Path) -> tuple[ParquetStore, int]:
    store = ParquetStore(root)
    src = ArchiveSource(str(base))
    rows = 0
    for f in files:
        parsed = load_file(src, f)
        if not parsed.bad.is_empty():
            raise SystemExit(f"{f.relpath}: {parsed.bad.height} invalid rows; the benchmark needs clean files")
        rows += store.write_klines(parsed.rows).inserted
    return store, rows


# -- the peer ----------------------------------------------------------------------------------------------
def _read(files: list[Path], cols: list[str]) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f, columns=cols) for f in files], ignore_index=True)


def pandas_daily(files: list[Path]) -> pd.DataFrame:
    df = _read(files, ["symbol", "open_time", "open", "high", "low", "close", "volume"])
    day = df["open_time"].dt.floor("D").rename("day")
    return (df.groupby(["symbol", day], sort=True)
            .agg(open=("open", "first"), high=("high", "max"), low=("low", "min"), close=("close", "last"),
                 volume=("volume", "sum"), bars=("open", "size"))
            .reset_index())


def pandas_vwap(files: list[Path]) -> pd.DataFrame:
    df = _read(files, ["symbol", "open_time", "open", "high", "low", "close", "volume", "quote_volume", "trades",
                       "taker_buy_volume"])
    bucket = df["open_time"].dt.floor("5min").rename("bucket")
    g = (df.groupby(["symbol", bucket], sort=True)
         .agg(open=("open", "first"), high=("high", "max"), low=("low", "min"), close=("close", "last"),
              volume=("volume", "sum"), quote_volume=("quote_volume", "sum"), trades=("trades", "sum"),
              taker=("taker_buy_volume", "sum"))
         .reset_index())
    g["vwap"] = g["quote_volume"] / g["volume"]
    g["taker_buy_share"] = g["taker"] / g["volume"]
    return g[["symbol", "bucket", "open", "high", "low", "close", "volume", "vwap", "trades", "taker_buy_share"]]


def _same(x: Any, y: Any) -> bool:
    """Equal within 1e-9 relative; missing (NULL / NaN: 0/0 in a bucket without volume) equals missing."""
    fx = math.nan if x is None else float(x)
    fy = math.nan if y is None else float(y)
    return (math.isnan(fx) and math.isnan(fy)) or math.isclose(fx, fy, rel_tol=1e-9, abs_tol=1e-12)


def check_same(name: str, ours: list[tuple[Any, ...]], peer: pd.DataFrame) -> None:
    """Same keys and values (1e-9 relative) on both sides, or the benchmark stops: a fast wrong answer is no figure."""
    if len(ours) != len(peer):
        raise SystemExit(f"{name}: ours has {len(ours)} rows, the peer {len(peer)}")
    for i, (a, b) in enumerate(zip(ours, peer.itertuples(index=False, name=None), strict=True)):
        keys_ok = a[0] == b[0] and pd.Timestamp(a[1]) == pd.Timestamp(b[1])
        vals_ok = all(_same(x, y) for x, y in zip(a[2:], b[2:], strict=True))
        if not (keys_ok and vals_ok):
            raise SystemExit(f"{name}: row {i} differs: ours {a}, peer {b}")


def engine_only(query: str, paths: list[Path]) -> Any:
    """For the stderr notes: the same query straight on the files into Arrow, without the command's plumbing."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW klines AS SELECT * FROM read_parquet({[str(p) for p in paths]!r})")
        return con.sql(query).to_arrow_table()
    finally:
        con.close()


# -- figures -----------------------------------------------------------------------------------------------
@dataclass
class Figure:
    metric: str
    value: float
    unit: str
    peer: str
    peer_value: float

    @property
    def ratio(self) -> float:
        return round(self.value / self.peer_value, 2)

    def line(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": round(self.value), "unit": self.unit, "peer": self.peer,
                "peer_value": round(self.peer_value), "ratio": self.ratio}


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls after one untimed warm-up call (imports, first-use caches)."""
    best, out = math.inf, fn()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def summary(figures: Sequence[Figure], extra: Sequence[str]) -> None:
    head = f"{'metric':30} {'ours':>12} {'peer':>12} {'unit':>7} {'ratio':>6}"
    out = ["", head, "-" * len(head)]
    out += [f"{f.metric:30} {f.value:12,.0f} {f.peer_value:12,.0f} {f.unit:>7} {f.ratio:6.2f}" for f in figures]
    out += ["", *(f"peer of {f.metric}: {f.peer}" for f in figures), "", *extra]
    print("\n".join(out), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    load0 = os.getloadavg()[0]
    base = Path(args.archive_base).resolve()
    want = args.months or (3 if args.quick else 12)
    repeats = args.repeats or (1 if args.quick else 5)
    symbol, files = pick_months(base, want)
    tmp = Path(tempfile.mkdtemp(prefix="rltrader-bench-sql-"))
    try:
        t0 = time.perf_counter()
        store, rows = fill_store(base, files, tmp / "store")
        paths = live_files(tmp / "store", "klines", 3)  # base + live deltas per month (the store's listing)
        months = ", ".join(f.period for f in files)
        data = (f"{symbol} futures-um 1m, {len(files)} monthly files ({months})"
                + ("" if len(files) >= want else f"; only {len(files)} of the {want} months wanted exist")
                + f", {rows:,} rows")
        log(f"{data}; parsed and stored in {time.perf_counter() - t0:.1f} s")
        peer = PEER.format(pd=pd.__version__)
        figures: list[Figure] = []
        for metric, query, peer_fn in (("sql_daily_ohlcv_rows_per_s", DAILY_SQL, pandas_daily),
                                       ("sql_vwap_5m_rows_per_s", VWAP_SQL, pandas_vwap)):
            ours_s, ours = best_of(lambda q=query: run_duckdb(q, store.root), repeats)  # type: ignore[misc]
            peer_s, theirs = best_of(lambda fn=peer_fn: fn(paths), repeats)  # type: ignore[misc]
            check_same(metric, ours.rows, theirs)
            engine_s, _ = best_of(lambda q=query: engine_only(q, paths), repeats)  # type: ignore[misc]
            log(f"{metric}: ours {ours_s * 1000:.1f} ms, pandas {peer_s * 1000:.1f} ms, {len(ours.rows):,} result "
                f"rows (identical on both sides); DuckDB alone into Arrow (no view set-up, no Python rows) "
                f"{engine_s * 1000:.1f} ms")
            fig = Figure(metric, rows / ours_s, "rows/s", f"{peer} over the same {len(paths)} files", rows / peer_s)
            figures.append(fig)
            print(json.dumps(fig.line()), flush=True)
        summary(figures, [f"data: {data}; best of {repeats}",
                          f"load average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f} on "
                          f"{os.cpu_count()} CPUs: other processes share this machine, so rates vary between runs"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally: the temp dir is removed


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="3 months, one repetition (< 1 min)")
    ap.add_argument("--archive-base", default=str(DEFAULT_ARCHIVE_BASE),
                    help="folder mirroring data.binance.vision's data/ (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=0, help="best of N (default 5, 1 with --quick)")
    ap.add_argument("--months", type=int, default=0, help="monthly files to use (default 12, 3 with --quick)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    run(args)


if __name__ == "__main__":
    main()
