"""Embedded Parquet store: the default, needs no server, and is what DVC stages read.

Layout (hive-style, one file per month so a re-load rewrites at most the months it touches)::

    <root>/klines/market=futures-um/symbol=FILUSDT/interval=1m/month=2023-08/data.parquet
    <root>/agg_trades/market=spot/symbol=BTCUSDT/month=2026-01/data.parquet
    <root>/bars/width=5s/market=spot/symbol=BTCUSDT/month=2026-01/data.parquet
    <root>/quarantine/<utc-time>-<n>.parquet

Every write prepares all new month files under temporary names and only then renames them into place, so a
crash leaves either the old or the new file, never a torn one. Writers hold an exclusive ``flock`` on the
store so two processes cannot interleave read-merge-write cycles.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from rltrader.data.schema import (
    AGG_TRADE_KEY,
    AGG_TRADE_SCHEMA,
    BAR_SCHEMA,
    KLINE_KEY,
    KLINE_SCHEMA,
    QUARANTINE_SCHEMA,
)
from rltrader.data.store import NULLABLE, NULLABLE_BARS, SeriesStats, WriteResult, check_required, trade_bars_frame
from rltrader.integrity import STORE_REPAIR_HINT, aggregate_files, read_parquet, scan_or_name, write_parquet


def _month_key(ts: datetime) -> str:
    return f"{ts.year:04d}-{ts.month:02d}"


def write_month_file(df: pl.DataFrame, path: Path) -> None:
    """How a month file is written (by every write and by ``rltrader data verify --repair``, byte for byte):
    zstd, statistics, and a CRC per page so a flipped byte is caught by a checked read (``verify``, merges)."""
    write_parquet(df, path)


class ParquetStore:
    """Store backed by Parquet files under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"parquet://{self.root}"

    # -- plumbing --------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _series_dir(self, table: str, **parts: str) -> Path:
        d = self.root / table
        for k, v in parts.items():
            d = d / f"{k}={v}"
        return d

    def _upsert(
        self,
        df: pl.DataFrame,
        table: str,
        schema: dict[str, pl.DataType],
        partition_cols: Sequence[str],
        time_col: str,
        key: Sequence[str],
        sort_col: str,
        extra_parts: dict[str, str] | None = None,
    ) -> WriteResult:
        """Merge rows into month files, keeping stored rows on key conflicts; all-or-nothing per call."""
        if df.is_empty():
            return WriteResult(0, 0)
        df = df.select(list(schema)).cast(schema)  # type: ignore[arg-type]
        check_required(df, NULLABLE_BARS if table == "bars" else NULLABLE, table)
        df = df.unique(subset=list(key), keep="first", maintain_order=True)
        offered = df.height
        df = df.with_columns(_month=pl.col(time_col).dt.strftime("%Y-%m"))
        staged: list[tuple[Path, Path]] = []
        inserted = 0
        with self._lock():
            try:
                for group_key, part in df.group_by([*partition_cols, "_month"], maintain_order=True):
                    values = dict(zip([*partition_cols, "_month"], group_key, strict=True))
                    parts = dict(extra_parts or {})
                    parts.update({c: str(values[c]) for c in partition_cols})
                    target = self._series_dir(table, **parts) / f"month={values['_month']}" / "data.parquet"
                    new = part.drop("_month")
                    if target.exists():
                        old = read_parquet(target, "store month file", STORE_REPAIR_HINT).cast(schema)  # type: ignore[arg-type]
                        new = new.join(old.select(list(key)), on=list(key), how="anti")
                        if new.is_empty():
                            continue
                        merged = pl.concat([old, new]).sort(sort_col)
                    else:
                        merged = new.sort(sort_col)
                    inserted += new.height
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                    write_month_file(merged, tmp)
                    staged.append((tmp, target))
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            for tmp, target in staged:
                os.replace(tmp, target)
        return WriteResult(inserted, offered - inserted)

    def _scan(
        self,
        series_dir: Path,
        schema: dict[str, pl.DataType],
        time_col: str,
        start: datetime | None,
        end: datetime | None,
        sort_col: str,
    ) -> pl.DataFrame:
        if not series_dir.is_dir():
            return pl.DataFrame(schema=schema)
        lo = _month_key(start) if start else ""
        hi = _month_key(end) if end else "9999-99"
        files = sorted(
            p / "data.parquet"
            for p in series_dir.iterdir()
            if p.name.startswith("month=") and lo <= p.name[6:] <= hi and (p / "data.parquet").exists()
        )
        if not files:
            return pl.DataFrame(schema=schema)

        def collect(fs: Sequence[Path]) -> pl.DataFrame:
            lf = pl.scan_parquet(list(fs))
            if start is not None:
                lf = lf.filter(pl.col(time_col) >= start)
            if end is not None:
                lf = lf.filter(pl.col(time_col) < end)
            return lf.sort(sort_col).collect().cast(schema)  # type: ignore[arg-type]

        return scan_or_name(files, collect, "store month file", STORE_REPAIR_HINT)

    # -- klines ----------------------------------------------------------------------------------------
    def write_klines(self, df: pl.DataFrame) -> WriteResult:
        return self._upsert(df, "klines", KLINE_SCHEMA, ["market", "symbol", "interval"], "open_time",
                            KLINE_KEY, "open_time")

    def read_klines(
        self, market: str, symbol: str, interval: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("klines", market=market, symbol=symbol, interval=interval)
        return self._scan(d, KLINE_SCHEMA, "open_time", start, end, "open_time")

    # -- trades ----------------------------------------------------------------------------------------
    def write_agg_trades(self, df: pl.DataFrame) -> WriteResult:
        return self._upsert(df, "agg_trades", AGG_TRADE_SCHEMA, ["market", "symbol"], "transact_time",
                            AGG_TRADE_KEY, "agg_trade_id")

    def read_agg_trades(
        self, market: str, symbol: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("agg_trades", market=market, symbol=symbol)
        return self._scan(d, AGG_TRADE_SCHEMA, "transact_time", start, end, "agg_trade_id")

    # -- bars ------------------------------------------------------------------------------------------
    def write_bars(self, df: pl.DataFrame, width: str) -> WriteResult:
        return self._upsert(df, "bars", BAR_SCHEMA, ["market", "symbol"], "bucket",
                            ("market", "symbol", "bucket"), "bucket", extra_parts={"width": width})

    def read_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        d = self._series_dir("bars", width=width, market=market, symbol=symbol)
        return self._scan(d, BAR_SCHEMA, "bucket", start, end, "bucket")

    def trade_bars(
        self, market: str, symbol: str, width: str, start: datetime | None = None, end: datetime | None = None
    ) -> pl.DataFrame:
        return trade_bars_frame(self.read_agg_trades(market, symbol, start, end), width)

    # -- quarantine & stats ----------------------------------------------------------------------------
    def quarantine(self, bad: pl.DataFrame) -> int:
        if bad.is_empty():
            return 0
        out = bad.with_columns(quarantined_at=pl.lit(datetime.now(UTC))).select(list(QUARANTINE_SCHEMA))
        d = self.root / "quarantine"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = d / f".{name}.tmp"
        out.cast(QUARANTINE_SCHEMA).write_parquet(tmp)  # type: ignore[arg-type]
        os.replace(tmp, d / name)
        return out.height

    def read_quarantine(self) -> pl.DataFrame:
        d = self.root / "quarantine"
        files = sorted(d.glob("*.parquet")) if d.is_dir() else []
        if not files:
            return pl.DataFrame(schema=QUARANTINE_SCHEMA)
        return scan_or_name(files, lambda fs: pl.read_parquet(list(fs)).cast(QUARANTINE_SCHEMA),  # type: ignore[arg-type]
                            "quarantine file", "move it out of the quarantine folder")

    def stats(self) -> list[SeriesStats]:
        out: list[SeriesStats] = []
        specs = [
            ("klines", "klines", ["market", "symbol", "interval"], "open_time"),
            ("agg_trades", "agg_trades", ["market", "symbol"], "transact_time"),
            ("bars", "bars", ["width", "market", "symbol"], "bucket"),
        ]
        for kind, table, levels, time_col in specs:
            base = self.root / table
            for series in sorted(base.glob("/".join(["*"] * len(levels)))) if base.is_dir() else []:
                files = sorted(series.glob("month=*/data.parquet"))
                if not files:
                    continue
                parts = dict(p.split("=", 1) for p in series.relative_to(base).parts)
                n, lo, hi, broken = aggregate_files(files, time_col)  # a broken month is listed, not fatal
                out.append(SeriesStats(kind, parts["market"], parts["symbol"],
                                       parts.get("interval", parts.get("width", "")), n, lo, hi,
                                       tuple(str(f) for f in broken)))
        return out

    def close(self) -> None:
        """Nothing to release; present for interface parity with server-backed stores."""
