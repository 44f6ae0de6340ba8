"""The Binance public data archive (data.binance.vision) as a source: plan, fetch, verify, parse.

The archive serves ``<market>/<monthly|daily>/<klines|aggTrades>/<SYMBOL>/[<interval>/]<file>.zip``, each with
a ``.zip.CHECKSUM`` sidecar (``<sha256>  <name>``). The same layout on a local folder (or ``file://`` URL) is
read in place, so tests and offline users point ``archive_base`` at a mirror such as ``../shared/data/binance``.

Monthly files are preferred: one request instead of ~30, and they are what Binance keeps forever. The part of
a range not covered by a published monthly file is filled with daily files.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import polars as pl

from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, TS, US_THRESHOLD, Market, interval_us
from rltrader.errors import ChecksumError, DataError, NotInArchiveError

DEFAULT_ARCHIVE_BASE = "https://data.binance.vision/data"

Kind = Literal["klines", "aggTrades"]
Freq = Literal["monthly", "daily"]

KLINE_CSV_COLUMNS = [
    "open_time", "open", "high", "low", "close", "volume", "close_time",
    "quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume", "ignore",
]  # fmt: skip
AGG_TRADE_CSV_COLUMNS = [
    "agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id",
    "transact_time", "is_buyer_maker", "is_best_match",
]  # fmt: skip



@dataclass(frozen=True)
class ArchiveFile:
    """One zip of the archive, identified the way Binance names it."""

    market: Market
    kind: Kind
    symbol: str
    interval: str | None  # None for aggTrades
    freq: Freq
    period: str  # YYYY-MM (monthly) or YYYY-MM-DD (daily)

    @property
    def name(self) -> str:
        middle = self.interval if self.kind == "klines" else "aggTrades"
        return f"{self.symbol}-{middle}-{self.period}.zip"

    @property
    def relpath(self) -> str:
        parts = [self.market.archive_prefix, self.freq, self.kind, self.symbol]
        if self.kind == "klines":
            assert self.interval is not None
            parts.append(self.interval)
        return "/".join([*parts, self.name])

    @property
    def period_bounds(self) -> tuple[datetime, datetime]:
        """[start, end) of the time this file covers, in UTC."""
        if self.freq == "monthly":
            y, m = (int(x) for x in self.period.split("-"))
            start = datetime(y, m, 1, tzinfo=UTC)
            end = start + timedelta(days=calendar.monthrange(y, m)[1])
        else:
            start = datetime.fromisoformat(self.period).replace(tzinfo=UTC)
            end = start + timedelta(days=1)
        return start, end


def parse_period(text: str, *, end: bool = False) -> date:
    """``YYYY-MM`` or ``YYYY-MM-DD`` → a date; a month given as an end means its last day (inclusive ranges)."""
    try:
        if len(text) == 7:
            y, m = (int(x) for x in text.split("-"))
            return date(y, m, calendar.monthrange(y, m)[1] if end else 1)
        return date.fromisoformat(text)
    except ValueError as exc:
        raise DataError(f"date {text!r} is not YYYY-MM or YYYY-MM-DD") from exc


def _months(start: date, end: date) -> Iterable[tuple[int, int]]:
    y, m = start.year, start.month
    while (y, m) <= (end.year, end.month):
        yield y, m
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)


class ArchiveSource:
    """Reads the archive from an https base, a ``file://`` URL or a local folder with the same layout."""

    def __init__(self, base: str, cache_dir: Path | None = None, *, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        parsed = urlparse(self.base)
        self.remote = parsed.scheme in ("http", "https")
        self.local_root: Path | None = None
        if not self.remote:
            self.local_root = Path(parsed.path if parsed.scheme == "file" else self.base).expanduser()
            if not self.local_root.is_dir():
                raise DataError(f"archive base {base!r} is not a folder or an http(s)/file:// URL")
        self.cache_dir = cache_dir
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ArchiveSource({self.base!r})"

    # -- discovery -------------------------------------------------------------------------------------
    def exists(self, f: ArchiveFile) -> bool:
        if self.local_root is not None:
            return (self.local_root / f.relpath).is_file()
        req = urllib.request.Request(f"{self.base}/{f.relpath}", method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise DataError(f"{self.base}/{f.relpath}: HTTP {exc.code}") from exc

    def plan(
        self,
        market: Market,
        kind: Kind,
        symbol: str,
        interval: str | None,
        start: date,
        end: date,
    ) -> list[ArchiveFile]:
        """Files covering the inclusive date range: monthly where published and fully inside, else daily.

        A month only partly inside the range is read from its daily files when every day the range needs is
        published (less to download than the month); when some are missing but the monthly file exists, that
        file is used instead (archives and mirrors often hold only the monthly files). Either way the caller
        cuts the rows outside the range. Missing daily files are not an error here: gaps are reported later.
        Raises NotInArchiveError when nothing at all exists (typically an unknown symbol).
        """
        if end < start:
            raise DataError(f"range end {end} is before start {start}")
        files: list[ArchiveFile] = []
        for y, m in _months(start, end):
            first, last = date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])
            whole = start <= first and last <= end
            monthly = ArchiveFile(market, kind, symbol, interval, "monthly", f"{y:04d}-{m:02d}")
            if whole and self.exists(monthly):
                files.append(monthly)
                continue
            days: list[ArchiveFile] = []
            complete = True
            d = max(first, start)
            while d <= min(last, end):
                daily = ArchiveFile(market, kind, symbol, interval, "daily", d.isoformat())
                if self.exists(daily):
                    days.append(daily)
                else:
                    complete = False
                d += timedelta(days=1)
            if not whole and not complete and self.exists(monthly):
                files.append(monthly)
            else:
                files += days
        if not files:
            what = f"{kind} {interval or ''}".strip()
            raise NotInArchiveError(
                f"{self.base}/{market.archive_prefix}/…/{kind}/{symbol}: no {what} files between {start} and "
                f"{end} (unknown symbol {symbol!r} on {market.value}, or not published yet)"
            )
        return files

    # -- fetching --------------------------------------------------------------------------------------
    def fetch(self, f: ArchiveFile) -> Path:
        """Local path of the verified zip: in place for a local archive, else downloaded into the cache."""
        if self.local_root is not None:
            path = self.local_root / f.relpath
            if not path.is_file():
                raise NotInArchiveError(f"{path}: not in the archive")
            verify_checksum(path, _read_local_checksum(path))
            return path
        if self.cache_dir is None:
            raise DataError("a remote archive needs a cache_dir to download into")
        path = self.cache_dir / f.relpath
        url = f"{self.base}/{f.relpath}"
        expected = self._get(url + ".CHECKSUM").decode().split()[0]
        if path.is_file() and _sha256(path) == expected:
            return path  # cached and still matches what the archive publishes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._download(url, path)
        try:
            verify_checksum(path, expected)
        except ChecksumError:
            path.unlink(missing_ok=True)  # never leave a bad file where the next run would trust it
            raise
        return path

    def _get(self, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotInArchiveError(f"{url}: not in the archive (HTTP 404)") from exc
            raise DataError(f"{url}: HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise DataError(f"{url}: {exc.reason}") from exc

    def _download(self, url: str, path: Path) -> None:
        """Download to ``<path>.part``, resuming a previous partial download with an HTTP Range request."""
        part = path.with_name(path.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                mode = "ab" if have and resp.status == 206 else "wb"
                with open(part, mode) as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # the part file is already complete
                pass
            elif exc.code == 404:
                raise NotInArchiveError(f"{url}: not in the archive (HTTP 404)") from exc
            else:
                raise DataError(f"{url}: HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise DataError(f"{url}: {exc.reason} (partial download kept for resume)") from exc
        os.replace(part, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_local_checksum(zip_path: Path) -> str:
    sidecar = zip_path.with_name(zip_path.name + ".CHECKSUM")
    if not sidecar.is_file():
        raise ChecksumError(f"{sidecar}: CHECKSUM sidecar missing; refusing an unverifiable file")
    text = sidecar.read_text().split()
    if not text or len(text[0]) != 64:
        raise ChecksumError(f"{sidecar}: not a '<sha256>  <name>' CHECKSUM file")
    return text[0].lower()


def verify_checksum(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: sha256 {actual} does not match its CHECKSUM {expected}")


# -- parsing -------------------------------------------------------------------------------------------
def read_zip_member(path: Path) -> bytes:
    """The single CSV inside an archive zip, CRC-checked (a corrupted or truncated zip fails here)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise DataError(f"{path}: expected one CSV member, found {len(names)}")
            return zf.read(names[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated zip ({exc})") from exc


@dataclass
class Parsed:
    """Rows that passed validation, and the ones that did not (for the quarantine)."""

    rows: pl.DataFrame
    bad: pl.DataFrame  # QUARANTINE_SCHEMA without quarantined_at: source, line, reason, raw


def _read_csv_strings(data: bytes, columns: Sequence[str], source: str) -> tuple[pl.DataFrame, int]:
    """All fields as strings plus the 1-based file line of each row; header detected by a non-digit start."""
    first = data.lstrip()[:1]
    has_header = bool(first) and not (first.isdigit() or first == b"-")
    try:
        df = pl.read_csv(
            io.BytesIO(data),
            has_header=has_header,
            new_columns=list(columns),
            infer_schema=False,
            truncate_ragged_lines=True,
        )
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as exc:
        raise DataError(f"{source}: unreadable CSV ({exc})") from exc
    if df.width < len(columns):
        raise DataError(f"{source}: expected {len(columns)} columns, found {df.width}")
    df = df.select(columns)
    offset = 2 if has_header else 1
    return df.with_row_index("line", offset=offset), offset


def _raw_line(columns: Sequence[str]) -> pl.Expr:
    return pl.concat_str([pl.col(c).fill_null("") for c in columns], separator=",")


def _epoch_to_us(col: str) -> pl.Expr:
    v = pl.col(col)
    return pl.when(v >= US_THRESHOLD).then(v).otherwise(v * 1000)


def split_bad(df: pl.DataFrame, checks: list[tuple[pl.Expr, str]], source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply (is_bad, reason) checks in order; the first failing check is the row's reason."""
    reason = pl.lit(None, dtype=pl.String)
    for bad_expr, why in reversed(checks):
        reason = pl.when(bad_expr.fill_null(True)).then(pl.lit(why)).otherwise(reason)
    df = df.with_columns(_reason=reason)
    bad = df.filter(pl.col("_reason").is_not_null()).select(
        pl.lit(source).alias("source"),
        pl.col("line").cast(pl.Int64),
        pl.col("_reason").alias("reason"),
        pl.col("_raw").alias("raw"),
    )
    good = df.filter(pl.col("_reason").is_null()).drop("_reason", "_raw", "line")
    return good, bad


def kline_checks(interval: str, period: tuple[datetime, datetime] | None = None) -> list[tuple[pl.Expr, str]]:
    """Row rules every kline source must pass, as (is_bad, reason); epochs are microseconds here.

    Optional fields (quote volume, trade count, taker volumes: absent from plain OHLCV dumps) may be null.
    """
    step = interval_us(interval)
    optional = ["quote_volume", "taker_buy_volume", "taker_buy_quote_volume"]
    checks: list[tuple[pl.Expr, str]] = [
        (~pl.all_horizontal([pl.col(c).is_finite() for c in ["open", "high", "low", "close", "volume"]]),
         "non-finite number"),
        (~pl.all_horizontal([pl.col(c).is_finite().fill_null(True) for c in optional]), "non-finite number"),
        (pl.col("open_time") % step != 0, f"open_time not aligned to {interval}"),
        ((pl.col("close_time") <= pl.col("open_time")) | (pl.col("close_time") >= pl.col("open_time") + step),
         f"close_time not inside the {interval} candle"),
        (pl.col("high") < pl.col("low"), "high < low"),
        (pl.col("low") > pl.min_horizontal("open", "close"), "low above open/close"),
        (pl.col("high") < pl.max_horizontal("open", "close"), "high below open/close"),
        (pl.col("volume") < 0, "negative volume"),
        (pl.min_horizontal(optional).fill_null(0) < 0, "negative volume"),
        (pl.col("trades").fill_null(0) < 0, "negative trade count"),
        (pl.col("open_time").is_duplicated(), "duplicate open_time in file"),
    ]
    if period is not None:
        lo, hi = (int(p.timestamp() * 1_000_000) for p in period)
        checks.append(((pl.col("open_time") < lo) | (pl.col("open_time") >= hi), "open_time outside the file's period"))
    return checks


def to_kline_rows(good: pl.DataFrame, market: Market, symbol: str, interval: str) -> pl.DataFrame:
    """Validated columns (epochs in µs) → the canonical KLINE_SCHEMA frame, sorted by open_time."""
    rows = good.select(
        pl.lit(market.value).alias("market"),
        pl.lit(symbol).alias("symbol"),
        pl.lit(interval).alias("interval"),
        pl.col("open_time").cast(TS),
        *[pl.col(c) for c in ["open", "high", "low", "close", "volume"]],
        # ms resolution like REST and websocket candles (spot files since 2025 write ...59.999999)
        pl.col("close_time").cast(TS).dt.truncate("1ms"),
        *[pl.col(c) for c in ["quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume"]],
    ).cast(KLINE_SCHEMA)  # type: ignore[arg-type]
    return rows.sort("open_time")


def parse_klines(data: bytes, *, source: str, market: Market, symbol: str, interval: str,
                 period: tuple[datetime, datetime] | None = None) -> Parsed:
    """Parse and validate archive kline CSV bytes (with or without header, ms or µs epochs)."""
    df, _ = _read_csv_strings(data, KLINE_CSV_COLUMNS, source)
    df = df.with_columns(_raw=_raw_line(KLINE_CSV_COLUMNS))
    ints = ["open_time", "close_time", "trades"]
    floats = ["open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume"]
    df = df.with_columns(
        *[pl.col(c).str.strip_chars().cast(pl.Int64, strict=False) for c in ints],
        *[pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in floats],
    ).with_columns(_epoch_to_us("open_time"), _epoch_to_us("close_time"))
    checks: list[tuple[pl.Expr, str]] = [
        (pl.col(c).is_null(), f"field {c!r} missing or not a number") for c in [*ints, *floats]
    ]
    checks += kline_checks(interval, period)
    good, bad = split_bad(df, checks, source)
    return Parsed(to_kline_rows(good, market, symbol, interval), bad)


def agg_trade_checks(period: tuple[datetime, datetime] | None = None) -> list[tuple[pl.Expr, str]]:
    """Row rules every aggTrades source must pass, as (is_bad, reason); ``transact_time`` in microseconds.

    Quantity must be > 0: an aggregate trade is at least one fill (a zero is a damaged row, not a trade).
    """
    checks: list[tuple[pl.Expr, str]] = [
        (~(pl.col("price").is_finite() & pl.col("quantity").is_finite()), "non-finite number"),
        (pl.col("price") <= 0, "price <= 0"),
        (pl.col("quantity") <= 0, "quantity <= 0"),
        (pl.col("first_trade_id") > pl.col("last_trade_id"), "first_trade_id > last_trade_id"),
        (pl.col("agg_trade_id").is_duplicated(), "duplicate agg_trade_id in file"),
    ]
    if period is not None:
        lo, hi = (int(p.timestamp() * 1_000_000) for p in period)
        checks.append(((pl.col("transact_time") < lo) | (pl.col("transact_time") >= hi),
                       "transact_time outside the file's period"))
    return checks


def parse_agg_trades(data: bytes, *, source: str, market: Market, symbol: str,
                     period: tuple[datetime, datetime] | None = None) -> Parsed:
    """Parse and validate archive aggTrades CSV bytes (booleans as True/False or true/false)."""
    df, _ = _read_csv_strings(data, AGG_TRADE_CSV_COLUMNS, source)
    df = df.with_columns(_raw=_raw_line(AGG_TRADE_CSV_COLUMNS))
    ints = ["agg_trade_id", "first_trade_id", "last_trade_id", "transact_time"]
    floats = ["price", "quantity"]
    bools = ["is_buyer_maker", "is_best_match"]
    df = df.with_columns(
        *[pl.col(c).str.strip_chars().cast(pl.Int64, strict=False) for c in ints],
        *[pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in floats],
        *[pl.col(c).str.strip_chars().str.to_lowercase().replace_strict(
            {"true": True, "false": False}, default=None, return_dtype=pl.Boolean) for c in bools],
    ).with_columns(_epoch_to_us("transact_time"))
    checks: list[tuple[pl.Expr, str]] = [
        (pl.col(c).is_null(), f"field {c!r} missing or invalid") for c in [*ints, *floats, *bools]
    ]
    checks += agg_trade_checks(period)
    good, bad = split_bad(df, checks, source)
    rows = good.select(
        pl.lit(market.value).alias("market"),
        pl.lit(symbol).alias("symbol"),
        pl.col("agg_trade_id"),
        pl.col("price"),
        pl.col("quantity"),
        pl.col("first_trade_id"),
        pl.col("last_trade_id"),
        pl.col("transact_time").cast(TS),
        pl.col("is_buyer_maker"),
        pl.col("is_best_match"),
    ).cast(AGG_TRADE_SCHEMA)  # type: ignore[arg-type]
    return Parsed(rows.sort("agg_trade_id"), bad)


def load_file(source: ArchiveSource, f: ArchiveFile) -> Parsed:
    """Fetch, verify and parse one archive file."""
    path = source.fetch(f)
    data = read_zip_member(path)
    if f.kind == "klines":
        assert f.interval is not None
        return parse_klines(data, source=str(path), market=f.market, symbol=f.symbol, interval=f.interval,
                            period=f.period_bounds)
    return parse_agg_trades(data, source=str(path), market=f.market, symbol=f.symbol, period=f.period_bounds)
