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


ROW_GROUP_ROWS = 1 << 20
"""Rows per row group of ``rows.parquet``."""


class SplitWriter:
    """Writes one split's ``rows.parquet`` and ``index.parquet`` from pieces (a symbol's rows at a time), so the
    sessions stage never holds a whole split: memory is one row group's buffer, whatever the data's size.

    The files are byte-identical to writing the assembled split in one ``pq.write_table`` call: row groups are
    cut at the same ``ROW_GROUP_ROWS`` boundaries, and each is written from one contiguous buffer. (pyarrow
    cuts data pages at write-batch boundaries counted from the start of each array it is handed, so a row group
    passed as several chunks could page differently.) ``n_rows`` is the split's total, known up front, so the
    buffer is no larger than the split.
    """

    def __init__(self, directory: Path, split: str, metadata: dict[str, Any], symbols: tuple[str, ...],
                 feature_names: tuple[str, ...], context: int, length: int, n_rows: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.symbols, self.n_rows = directory, symbols, n_rows
        self.meta = {META_KEY: json.dumps({**metadata, "split": split, "context": context, "length": length,
                                           "symbols": list(symbols), "features": list(feature_names)}).encode()}
        fields = [pa.field("symbol", pa.dictionary(pa.int16(), pa.string())),
                  pa.field("time", pa.timestamp("us", "UTC")),
                  *(pa.field(n, pa.float64()) for n in PRICE_COLUMNS),
                  *(pa.field(n, pa.float32()) for n in feature_names)]
        self.schema = pa.schema(fields).with_metadata(self.meta)
        self._dictionary = pa.array(list(symbols), pa.string())
        cap = min(ROW_GROUP_ROWS, n_rows)
        self._feat = np.empty((len(feature_names), cap), dtype=np.float32)  # one contiguous row per column
        self._price = np.empty((len(PRICE_COLUMNS), cap), dtype=np.float64)
        self._time = np.empty(cap, dtype=np.int64)
        self._sym = np.empty(cap, dtype=np.int16)
        self._fill = 0  # rows in the buffer
        self._written = 0  # rows already in row groups
        self._index: list[tuple[np.ndarray, ...]] = []
        # uncompressed, no dictionary for floats: reading back is a straight copy into the feature matrix;
        # a CRC per page: flipped bytes are refused
        self._writer = pq.ParquetWriter(directory / "rows.parquet", self.schema, compression="none",
                                        use_dictionary=["symbol"], write_page_checksum=True)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's temporary folder is discarded; just release the file
            self._writer.close()

    @property
    def rows(self) -> int:
        """Rows appended so far (the next piece's first row offset)."""
        return self._written + self._fill

    def add_sessions(self, ctx_start: np.ndarray, start: np.ndarray, end: np.ndarray, time_start: np.ndarray,
                     symbol_id: np.ndarray) -> None:
        """Sessions, in order: row offsets into the whole split, their first traded bar's time and symbol."""
        self._index.append((ctx_start.astype(np.int64), start.astype(np.int64), end.astype(np.int64),
                            time_start.astype(np.int64), symbol_id.astype(np.int16)))

    def append(self, features: np.ndarray, prices: dict[str, np.ndarray], time: np.ndarray,
               symbol_id: np.ndarray) -> None:
        """Append rows (the next ``len(features)`` row offsets, from ``rows``)."""
        n = len(features)
        if self.rows + n > self.n_rows:
            raise DataError(f"{self.directory}: more rows than the {self.n_rows} announced")
        sym = symbol_id.astype(np.int16)
        done = 0
        while done < n:
            take = min(n - done, len(self._time) - self._fill)
            dst, src = slice(self._fill, self._fill + take), slice(done, done + take)
            self._feat[:, dst] = features[src].T
            for k, name in enumerate(PRICE_COLUMNS):
                self._price[k, dst] = prices[name][src]
            self._time[dst] = time[src]
            self._sym[dst] = sym[src]
            self._fill += take
            done += take
            if self._fill == len(self._time):
                self._flush()

    def _flush(self) -> None:
        m = self._fill
        cols: list[Any] = [pa.DictionaryArray.from_arrays(pa.array(self._sym[:m]), self._dictionary),
                           pa.array(self._time[:m]).cast(pa.timestamp("us", "UTC"))]
        cols += [pa.array(self._price[k, :m]) for k in range(len(PRICE_COLUMNS))]
        cols += [pa.array(self._feat[j, :m], pa.float32()) for j in range(len(self._feat))]
        self._writer.write_table(pa.Table.from_arrays(cols, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
        self._written += m
        self._fill = 0

    def close(self) -> None:
        """Write the last row group and ``index.parquet``."""
        if self.rows != self.n_rows:
            raise DataError(f"{self.directory}: {self.rows} rows written, {self.n_rows} announced")
        if self._fill or not self._written:  # an empty split still gets its (empty) row group
            self._flush()
        self._writer.close()
        parts = list(zip(*self._index, strict=True)) if self._index else [[np.empty(0, np.int64)]] * 4 + [
            [np.empty(0, np.int16)]]
        ctx, st, en, t0, sid = (np.concatenate(p) for p in parts)
        index = pa.table({
            "session": pa.array(np.arange(len(st), dtype=np.int64)),
            "symbol": pa.DictionaryArray.from_arrays(pa.array(sid), self._dictionary).dictionary_decode(),
            "ctx_start": pa.array(ctx.astype(np.int64)),
            "start": pa.array(st.astype(np.int64)),
            "end": pa.array(en.astype(np.int64)),
            "time_start": pa.array(t0).cast(pa.timestamp("us", "UTC")),
        }).replace_schema_metadata(self.meta)
        pq.write_table(index, self.directory / "index.parquet", write_page_checksum=True)


def write_split(set_: SessionSet, directory: Path, split: str, metadata: dict[str, Any]) -> None:
    """Write ``rows.parquet`` and ``index.parquet`` for one split held in memory (into ``directory``, which the
    caller renames)."""
    with SplitWriter(directory, split, metadata, set_.symbols, set_.feature_names, set_.context, set_.length,
                     len(set_.features)) as w:
        w.append(set_.features, {n: getattr(set_, n).astype(np.float64) for n in PRICE_COLUMNS},
                 set_.time.astype(np.int64), set_.symbol_id)
        w.add_sessions(set_.ctx_start, set_.start, set_.end, set_.time[set_.start], set_.symbol_id[set_.start])


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
        # the price columns as the rows of one (5, N) block, which every env over this set reads as is
        # (``env.core.bars_block``) instead of stacking its own copy (85 MB for the default train split, per env)
        bars = np.empty((len(PRICE_COLUMNS), rows.num_rows))
        for i, c in enumerate(PRICE_COLUMNS):
            bars[i] = rows.column(c).to_numpy()
    index = read_parquet(index_path, "sessions index file", hint)
    return SessionSet(
        features=features,
        **{c: bars[i] for i, c in enumerate(PRICE_COLUMNS)},
        time=rows.column("time").cast(pa.int64()).to_numpy(),
        symbol_id=remap[sym.indices.to_numpy()],
        ctx_start=index["ctx_start"].to_numpy(), start=index["start"].to_numpy(), end=index["end"].to_numpy(),
        symbols=symbols, feature_names=tuple(names), context=int(meta["context"]), length=int(meta["length"]),
        meta=meta,
    )
