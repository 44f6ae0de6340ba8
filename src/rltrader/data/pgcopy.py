"""Vectorised encoder/decoder for PostgreSQL's binary COPY format.

psycopg's ``Copy.write_row`` converts one Python value at a time (~1–2 M rows/s at best). Market data is
columnar and null-free, so every row has the same byte layout: a numpy structured dtype describes one row
and ``tobytes``/``frombuffer`` convert whole columns at once (tens of millions of fields per second).

Format (PostgreSQL docs, "COPY … BINARY"): an 11-byte signature, int32 flags, int32 extension length; per
row an int16 field count and, per field, an int32 byte length followed by the value in network byte order;
an int16 -1 trailer. ``timestamptz`` is int64 microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import polars as pl

PgType = Literal["text", "float8", "int8", "int4", "timestamptz", "bool"]

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)
PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds

_FIXED: dict[str, tuple[str, int]] = {"float8": (">f8", 8), "int8": (">i8", 8), "int4": (">i4", 4),
                                      "timestamptz": (">i8", 8), "bool": ("u1", 1)}


def _row_dtype(types: Sequence[PgType], text_lengths: dict[int, int]) -> np.dtype[np.void]:
    fields: list[tuple[str, str]] = [("n", ">i2")]
    for i, t in enumerate(types):
        fields.append((f"l{i}", ">i4"))
        fields.append((f"v{i}", f"S{text_lengths[i]}" if t == "text" else _FIXED[t][0]))
    return np.dtype(fields)


def encode(df: pl.DataFrame, columns: Sequence[tuple[str, PgType]], *, header: bool = True,
           trailer: bool = True) -> bytes:
    """Binary COPY payload for ``df``. Text columns must hold one value per frame.

    ``header``/``trailer`` let a caller stream one COPY as several encoded chunks.

    Raises ValueError on nulls: a null needs a length of -1 and no bytes, which breaks the fixed row layout.
    """
    names = [c for c, _ in columns]
    types = [t for _, t in columns]
    if df.select(pl.any_horizontal(pl.col(names).is_null()).any()).item():
        raise ValueError("binary COPY encoder needs null-free columns")
    text_values: dict[int, bytes] = {}
    for i, (name, t) in enumerate(columns):
        if t == "text":
            uniq = df.get_column(name).unique()
            if uniq.len() != 1:
                raise ValueError(f"text column {name!r} must be constant within one COPY batch")
            text_values[i] = str(uniq.item()).encode()
    dtype = _row_dtype(types, {i: len(v) for i, v in text_values.items()})
    arr = np.empty(df.height, dtype=dtype)
    arr["n"] = len(columns)
    for i, (name, t) in enumerate(columns):
        if t == "text":
            arr[f"l{i}"] = len(text_values[i])
            arr[f"v{i}"] = text_values[i]
            continue
        arr[f"l{i}"] = _FIXED[t][1]
        s = df.get_column(name)
        if t == "timestamptz":
            arr[f"v{i}"] = s.dt.epoch("us").to_numpy() - PG_EPOCH_US
        elif t == "bool":
            arr[f"v{i}"] = s.cast(pl.UInt8).to_numpy()
        else:
            arr[f"v{i}"] = s.to_numpy()
    return (HEADER if header else b"") + arr.tobytes() + (TRAILER if trailer else b"")


def decode(buf: bytes, columns: Sequence[tuple[str, PgType]]) -> pl.DataFrame:
    """Parse a binary COPY TO STDOUT payload of null-free fixed-width columns into a polars frame."""
    if not buf.startswith(SIGNATURE):
        raise ValueError("not a PostgreSQL binary COPY stream")
    ext = int.from_bytes(buf[15:19], "big")
    body = memoryview(buf)[19 + ext : len(buf) - 2]
    types = [t for _, t in columns]
    if any(t == "text" for t in types):
        raise ValueError("decode handles fixed-width columns only")
    dtype = _row_dtype(types, {})
    if len(body) % dtype.itemsize:
        raise ValueError("binary COPY stream has nulls or unexpected field widths")
    arr = np.frombuffer(body, dtype=dtype)
    out: dict[str, pl.Series] = {}
    for i, (name, t) in enumerate(columns):
        v = arr[f"v{i}"]
        if t == "timestamptz":
            out[name] = pl.Series(name, v.astype(np.int64) + PG_EPOCH_US).cast(pl.Datetime("us", "UTC"))
        elif t == "bool":
            out[name] = pl.Series(name, v.astype(bool))
        elif t == "float8":
            out[name] = pl.Series(name, v.astype(np.float64))
        elif t == "int4":
            out[name] = pl.Series(name, v.astype(np.int32))
        else:
            out[name] = pl.Series(name, v.astype(np.int64))
    return pl.DataFrame(out)
