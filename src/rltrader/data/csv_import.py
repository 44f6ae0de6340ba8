"""Generic OHLCV CSV import for dumps that are not archive format.

Such files come with datetime strings in some time zone and a handful of columns. Nothing is guessed: the
time column and the time zone must be stated, other columns are mapped explicitly (default: same names),
and the rows then pass the same validation as archive klines. Fields the file lacks (quote volume, trade
count, taker volumes) are stored as NULL, not made up; ``close_time`` follows from the interval.
"""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from rltrader.data.archive import Parsed, kline_checks, split_bad, to_kline_rows
from rltrader.data.schema import Market, interval_us
from rltrader.errors import DataError

REQUIRED = ["open", "high", "low", "close", "volume"]
OPTIONAL = ["quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume"]


def read_ohlcv_csv(
    path: Path,
    *,
    market: Market,
    symbol: str,
    interval: str,
    tz: str,
    time_col: str,
    time_format: str | None,
    columns: dict[str, str],
) -> Parsed:
    """Parse and validate; ``columns`` maps our field name → the file's header name."""
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise DataError(f"--tz {tz!r}: unknown time zone (e.g. UTC, Europe/Madrid)") from exc
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        df = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from exc
    mapping = {f: columns.get(f, f) for f in [*REQUIRED, *OPTIONAL]}
    missing = [f"{f} (column {mapping[f]!r})" for f in REQUIRED if mapping[f] not in df.columns]
    if time_col not in df.columns:
        missing.insert(0, f"time (column {time_col!r})")
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; header is {df.columns}; "
                        f"map columns with --column field=header")
    parsed_time = pl.col(time_col).str.strip_chars()
    ts = (parsed_time.str.strptime(pl.Datetime("us"), time_format, strict=False) if time_format
          else parsed_time.str.to_datetime(time_unit="us", strict=False))
    step = interval_us(interval)
    df = df.with_row_index("line", offset=2).with_columns(
        _raw=pl.concat_str([pl.col(c).fill_null("") for c in df.columns], separator=","),
        open_time=ts.dt.replace_time_zone(tz, ambiguous="null", non_existent="null")
        .dt.convert_time_zone("UTC").dt.epoch("us"),
        **{f: pl.col(mapping[f]).str.strip_chars().cast(pl.Float64, strict=False) for f in REQUIRED},
        **{f: (pl.col(mapping[f]).str.strip_chars().cast(pl.Int64 if f == "trades" else pl.Float64, strict=False)
               if mapping[f] in df.columns else pl.lit(None, pl.Int64 if f == "trades" else pl.Float64))
           for f in OPTIONAL},
    ).with_columns(close_time=pl.col("open_time") + step - 1000)
    checks = [(pl.col("open_time").is_null(), f"field {time_col!r} is not a time in format {time_format or 'ISO'}")]
    checks += [(pl.col(f).is_null(), f"field {mapping[f]!r} missing or not a number") for f in REQUIRED]
    checks += kline_checks(interval)
    good, bad = split_bad(df, checks, str(path))
    return Parsed(to_kline_rows(good, market, symbol.upper(), interval), bad)
