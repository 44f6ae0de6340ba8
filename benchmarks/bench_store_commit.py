"""CPU cost of one Parquet store commit as a month fills, as the live stream commits: ours against a rewrite peer.

Run: ``.venv/bin/python benchmarks/bench_store_commit.py [--quick]``. Prints one JSON line per figure:
``{"metric", "value", "unit", "peer", "peer_value", "ratio"}`` (ratio > 1 means ours is better).

* Data: futures-um 1m klines of 5 symbols for 2023-02 (the month the local archive has for all of them), read
  before any timer. Committed in order, ``rows`` rows per symbol per commit (one ``write_klines`` call with all
  5 symbols, as the stream's flush does), into an empty store, until the month is full (40,320 rows a symbol).
* Ours: :class:`rltrader.data.parquet_store.ParquetStore` (append-then-compact: a commit writes a delta file of
  its new rows; compaction into the month file when the deltas pass the store's thresholds), then ``close()``
  (which compacts what is left), timed on its own.
* Peer ``rewrite-month-file``: what the store did before the delta layout — per commit and month, read the month
  file, anti-join the keys, concat, sort, write the whole file (same zstd/CRC writer) and rename it over the old.
* Figures (``time.process_time`` of this process, ms per commit): mean over the first and the last tenth of the
  commits (does the cost grow with the file?), p99 and max (a compaction is a spike), and the total CPU seconds
  of the whole fill. The machine is shared: ours and the peer run alternately, best of N per commit index.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import _harness as h
import numpy as np
import polars as pl

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.parquet_store import ParquetStore, write_month_file
from rltrader.data.schema import KLINE_SCHEMA, Market
from rltrader.integrity import read_parquet

ARCHIVE = os.environ.get("RLTRADER_TEST_ARCHIVE", str(Path(__file__).resolve().parents[2] / "shared/data/binance"))
SYMBOLS = ["ALGOUSDT", "AVAXUSDT", "FILUSDT", "LINKUSDT", "NEARUSDT"]
PEER = "rewrite-month-file (read, anti-join, concat, sort, write the whole month per commit: the store before)"
log = h.logger("bench_store_commit")


def month_rows() -> dict[str, pl.DataFrame]:
    src = ArchiveSource(ARCHIVE)
    return {s: load_file(src, ArchiveFile(Market.FUTURES_UM, "klines", s, "1m", "monthly", "2023-02")).rows
            for s in SYMBOLS}


def commits(data: dict[str, pl.DataFrame], rows: int) -> list[pl.DataFrame]:
    n = max(df.height for df in data.values())
    return [pl.concat([df.slice(i, rows) for df in data.values()]) for i in range(0, n, rows)]


def peer_write(root: Path, df: pl.DataFrame) -> None:
    """The pre-delta store's commit: one whole-month rewrite per (symbol, month) touched."""
    df = df.select(list(KLINE_SCHEMA)).cast(KLINE_SCHEMA)  # type: ignore[arg-type]
    for (symbol,), part in df.group_by(["symbol"], maintain_order=True):
        target = root / f"symbol={symbol}" / "month=2023-02" / "data.parquet"
        new = part
        if target.exists():
            old = read_parquet(target).cast(KLINE_SCHEMA)  # type: ignore[arg-type]
            new = new.join(old.select("open_time"), on="open_time", how="anti")
            merged = pl.concat([old, new]).sort("open_time")
        else:
            merged = new.sort("open_time")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        write_month_file(merged, tmp)
        os.replace(tmp, target)


def fill(write: Callable[[pl.DataFrame], object], batches: list[pl.DataFrame]) -> list[float]:
    out = []
    for b in batches:
        c0 = time.process_time()
        write(b)
        out.append(time.process_time() - c0)
    return out


def main() -> None:
    ap = h.parser(__doc__, "one run of 1,000-row commits (40 commits), under a minute")
    ap.add_argument("--rows", type=int, default=None, help="rows per symbol per commit (default 1000 quick, 300)")
    args = ap.parse_args()
    rows = args.rows or (1000 if args.quick else 300)
    repeats = 1 if args.quick else 3
    load0 = os.getloadavg()[0]
    data = month_rows()
    batches = commits(data, rows)
    ours_runs, peer_runs, close_s = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            store = ParquetStore(Path(tmp) / "ours")
            ours_runs.append(fill(store.write_klines, batches))
            c0 = time.process_time()
            store.close()
            close_s.append(time.process_time() - c0)
            got = sum(store.read_klines("futures-um", s, "1m").height for s in SYMBOLS)
            assert got == sum(df.height for df in data.values()), got
            peer_runs.append(fill(lambda b, r=Path(tmp) / "peer": peer_write(r, b), batches))
    ours, peer = np.min(ours_runs, axis=0) * 1e3, np.min(peer_runs, axis=0) * 1e3  # ms, best of N per commit
    tenth = max(1, len(batches) // 10)
    desc = f"{len(batches)} commits of {rows} rows x {len(SYMBOLS)} symbols into one month (2023-02, 1m)"

    def fig(metric: str, o: float, p: float, unit: str = "ms", digits: int = 2) -> None:
        h.emit(h.line(metric, o, unit, PEER, p, digits=digits, ratio_value=h.ratio(o, p, higher_is_better=False),
                      data=desc))

    fig("parquet_commit_cpu_ms_first_tenth", float(ours[:tenth].mean()), float(peer[:tenth].mean()))
    fig("parquet_commit_cpu_ms_last_tenth", float(ours[-tenth:].mean()), float(peer[-tenth:].mean()))
    fig("parquet_commit_cpu_ms_p99", float(np.percentile(ours, 99)), float(np.percentile(peer, 99)))
    fig("parquet_commit_cpu_ms_max", float(ours.max()), float(peer.max()))
    fig("parquet_fill_cpu_s", float(ours.sum() / 1e3 + min(close_s)), float(peer.sum() / 1e3), "s", 3)
    log(f"ours: close() (final compaction) {min(close_s) * 1e3:.1f} ms CPU, included in parquet_fill_cpu_s")
    log(f"load average (1 min) {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
