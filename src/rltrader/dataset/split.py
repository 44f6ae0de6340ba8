"""One split of the session dataset, as the envs, agents and backtest consume it.

On disk a split is two Parquet files under ``<sessions dir>/<split>/``:

- ``rows.parquet``: the bars the split's sessions cover, symbol by symbol in time order, with the raw OHLCV
  the execution model fills against and the feature columns (float32). Consecutive sessions share rows, so a
  row is stored once however many sessions use it.
- ``index.parquet``: one row per session with row offsets into ``rows.parquet``.

In memory it is one ``SessionSet``: a ``(N, F)`` float32 feature matrix, price/volume vectors and three offset
vectors — no per-session Python objects, so an env gathers B observation windows with one fancy index.

Timing contract (shared by the envs, the backtest and the trader): session ``i`` trades the bars
``[start[i], end[i])``; its context is the ``context`` bars before ``start[i]``. The decision for bar ``t``
sees features of bars ``[t - context, t)`` only (all closed) and fills at bar ``t``'s open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rltrader.errors import DataError
from rltrader.integrity import read_parquet, reading

PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
META_KEY = b"rltrader"


@dataclass(frozen=True)
class SessionSet:
    """A split's sessions: arrays only (see the module docstring for the timing contract)."""

    features: np.ndarray
    """(N, F) float32, C-contiguous."""
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    """(N,) float64 each: raw prices/volume in quote/base units, for fills and marking."""
    time: np.ndarray
    """(N,) int64 bar open time, µs since the epoch (UTC)."""
    symbol_id: np.ndarray
    """(N,) int16 index into ``symbols``."""
    ctx_start: np.ndarray
    start: np.ndarray
    end: np.ndarray
    """(S,) int64 row offsets: context ``[ctx_start, start)``, traded bars ``[start, end)``."""
    symbols: tuple[str, ...]
    feature_names: tuple[str, ...]
    context: int
    length: int
    """Traded bars per session; 0 = variable-length sessions (the backtest's continuous gap-free stretches)."""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.features.ndim != 2 or self.features.shape[1] != len(self.feature_names):
            raise DataError(f"features: shape {self.features.shape} does not match {len(self.feature_names)} names")
        for name in (*PRICE_COLUMNS, "time", "symbol_id"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{name}: {len(getattr(self, name))} rows, features have {n}")
        if not (len(self.ctx_start) == len(self.start) == len(self.end)):
            raise DataError("session index: ctx_start/start/end lengths differ")
        if len(self.start) and (np.any(self.start - self.ctx_start != self.context)
                                or (np.any(self.end - self.start != self.length) if self.length > 0
                                    else np.any(self.end <= self.start))
                                or self.ctx_start.min() < 0 or self.end.max() > n):
            raise DataError("session index: offsets do not match context/length or fall outside the rows")

    @property
    def n_sessions(self) -> int:
        return len(self.start)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def session_symbol(self, i: int) -> str:
        return self.symbols[int(self.symbol_id[self.start[i]])]

    def window_index(self, rows: np.ndarray) -> np.ndarray:
        """Row indices of the observation windows ending just before each of ``rows``: shape (len(rows), context)."""
        return np.asarray(rows)[:, None] - self.context + np.arange(self.context)


def write_split(set_: SessionSet, directory: Path, split: str, metadata: dict[str, Any]) -> None:
    """Write ``rows.parquet`` and ``index.parquet`` for one split (into ``directory``, which the caller renames)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {META_KEY: json.dumps({**metadata, "split": split, "context": set_.context, "length": set_.length,
                                  "symbols": list(set_.symbols), "features": list(set_.feature_names)}).encode()}
    cols: dict[str, Any] = {
        "symbol": pa.DictionaryArray.from_arrays(pa.array(set_.symbol_id.astype(np.int16)),
                                                 pa.array(list(set_.symbols), pa.string())),
        "time": pa.array(set_.time.astype(np.int64)).cast(pa.timestamp("us", "UTC")),
    }
    for name in PRICE_COLUMNS:
        cols[name] = pa.array(getattr(set_, name).astype(np.float64))
    for j, name in enumerate(set_.feature_names):
        cols[name] = pa.array(np.ascontiguousarray(set_.features[:, j]), pa.float32())
    rows = pa.table(cols).replace_schema_metadata(meta)
    # uncompressed, no dictionary for floats: reading back is a straight copy into the feature matrix
    pq.write_table(rows, directory / "rows.parquet", compression="none", use_dictionary=["symbol"],
                   row_group_size=1 << 20, write_page_checksum=True)  # a CRC per page: flipped bytes are refused
    index = pa.table({
        "session": pa.array(np.arange(set_.n_sessions, dtype=np.int64)),
        "symbol": pa.array([set_.symbols[int(set_.symbol_id[s])] for s in set_.start], pa.string()),
        "ctx_start": pa.array(set_.ctx_start.astype(np.int64)),
        "start": pa.array(set_.start.astype(np.int64)),
        "end": pa.array(set_.end.astype(np.int64)),
        "time_start": pa.array(set_.time[set_.start].astype(np.int64)).cast(pa.timestamp("us", "UTC")),
    }).replace_schema_metadata(meta)
    pq.write_table(index, directory / "index.parquet", write_page_checksum=True)


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``rltrader`` metadata (params, input fingerprint, feature list, code version) of a dataset file."""
    with reading(path, "dataset file", "re-run the stage that wrote it (`dvc repro`)"):
        raw = pq.read_schema(path).metadata or {}
        if META_KEY not in raw:
            raise DataError(f"{path}: no rltrader metadata (not written by the sessions stage)")
        meta: dict[str, Any] = json.loads(raw[META_KEY])
    return meta


def load_split(sessions_dir: Path | str, split: str) -> SessionSet:
    """Load one split written by the sessions stage (memory-mapped read of the uncompressed Parquet)."""
    d = Path(sessions_dir) / split
    rows_path, index_path = d / "rows.parquet", d / "index.parquet"
    if not rows_path.exists() or not index_path.exists():
        raise DataError(f"{d}: split {split!r} not built (run `dvc repro sessions` or `rltrader dataset sessions`)")
    meta = read_metadata(rows_path)
    hint = "re-run `rltrader dataset sessions` (`dvc repro sessions`)"
    with reading(rows_path, "sessions file", hint):
        names: list[str] = meta["features"]
        rows = pq.read_table(rows_path, memory_map=True, page_checksum_verification=True)
        features = np.empty((rows.num_rows, len(names)), dtype=np.float32)
        for j, name in enumerate(names):
            features[:, j] = rows.column(name).to_numpy()
        sym = rows.column("symbol").combine_chunks()
        symbols = tuple(meta["symbols"])
        dictionary = sym.dictionary.to_pylist()
        remap = np.array([symbols.index(s) for s in dictionary], dtype=np.int16)
    index = read_parquet(index_path, "sessions index file", hint)
    return SessionSet(
        features=features,
        **{c: rows.column(c).to_numpy().astype(np.float64) for c in PRICE_COLUMNS},
        time=rows.column("time").cast(pa.int64()).to_numpy(),
        symbol_id=remap[sym.indices.to_numpy()],
        ctx_start=index["ctx_start"].to_numpy(), start=index["start"].to_numpy(), end=index["end"].to_numpy(),
        symbols=symbols, feature_names=tuple(names), context=int(meta["context"]), length=int(meta["length"]),
        meta=meta,
    )
