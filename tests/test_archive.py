"""Archive source: planning (monthly preferred, daily fill), checksums, CSV dialects, bad files."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from conftest import copy_archive_file, write_archive_zip

from rltrader.data.archive import (
    ArchiveFile,
    ArchiveSource,
    load_file,
    parse_agg_trades,
    parse_klines,
    parse_period,
    read_zip_member,
)
from rltrader.data.schema import Market
from rltrader.errors import ChecksumError, DataError, NotInArchiveError

FIL_AUG = "futures/um/monthly/klines/FILUSDT/1m/FILUSDT-1m-2023-08.zip"
FIL_SEP = "futures/um/monthly/klines/FILUSDT/1m/FILUSDT-1m-2023-09.zip"
SPOT_DAY = "spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2020-01-01.zip"
AGG = "spot/daily/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-01-01.zip"


def reference_rows(zip_path: Path) -> list[list[str]]:
    """Rows of an archive zip read with the csv module: an independent reading to compare against."""
    with zipfile.ZipFile(zip_path) as zf:
        text = zf.read(zf.namelist()[0]).decode()
    rows = list(csv.reader(io.StringIO(text)))
    return rows[1:] if not rows[0][0].isdigit() else rows


def split_month_into_days(shared: Path, root: Path, relpath: str, days: int) -> None:
    """Publish the first ``days`` days of a real monthly file as daily files (with CHECKSUMs)."""
    rows = reference_rows(shared / relpath)
    sym, month = "FILUSDT", relpath.rsplit("-", 2)[-2] + "-" + relpath.rsplit("-", 1)[-1][:2]
    for d in range(1, days + 1):
        day = f"{month}-{d:02d}"
        start = int(pl.Series([f"{day}T00:00:00"]).str.to_datetime(time_zone="UTC").dt.epoch("ms")[0])
        chunk = [r for r in rows if start <= int(r[0]) < start + 86_400_000]
        body = "\n".join(",".join(r) for r in chunk) + "\n"
        write_archive_zip(root, f"futures/um/daily/klines/{sym}/1m/{sym}-1m-{day}.zip", body.encode())


def test_plan_prefers_monthly_and_fills_with_daily(shared_archive: Path, tmp_path: Path) -> None:
    copy_archive_file(shared_archive, tmp_path, FIL_AUG)
    split_month_into_days(shared_archive, tmp_path, FIL_SEP, 3)
    src = ArchiveSource(str(tmp_path))
    plan = src.plan(Market.FUTURES_UM, "klines", "FILUSDT", "1m", date(2023, 8, 1), date(2023, 9, 3))
    assert [(f.freq, f.period) for f in plan] == [
        ("monthly", "2023-08"), ("daily", "2023-09-01"), ("daily", "2023-09-02"), ("daily", "2023-09-03")]
    # a month only partly inside the range is taken from daily files even when a monthly one exists
    copy_archive_file(shared_archive, tmp_path, FIL_SEP)
    plan = src.plan(Market.FUTURES_UM, "klines", "FILUSDT", "1m", date(2023, 9, 1), date(2023, 9, 2))
    assert [f.freq for f in plan] == ["daily", "daily"]
    # …but when a day the range needs has no daily file, the monthly one covers the partial month
    plan = src.plan(Market.FUTURES_UM, "klines", "FILUSDT", "1m", date(2023, 9, 2), date(2023, 9, 4))
    assert [(f.freq, f.period) for f in plan] == [("monthly", "2023-09")]


def test_plan_partial_month_from_monthly_only(shared_archive: Path) -> None:
    """A mirror holding only the monthly file still serves a single day of that month."""
    src = ArchiveSource(str(shared_archive))
    plan = src.plan(Market.FUTURES_UM, "klines", "NEARUSDT", "1m", date(2025, 4, 10), date(2025, 4, 11))
    assert [(f.freq, f.period) for f in plan] == [("monthly", "2025-04")]


def test_file_url_and_folder_are_the_same_archive(shared_archive: Path) -> None:
    f = ArchiveFile(Market.SPOT, "klines", "BTCUSDT", "1m", "daily", "2020-01-01")
    a = load_file(ArchiveSource(str(shared_archive)), f).rows
    b = load_file(ArchiveSource(shared_archive.as_uri()), f).rows
    assert a.equals(b) and a.height == 1440


@pytest.mark.parametrize("relpath", [FIL_AUG, SPOT_DAY, "futures/um/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2022-09-05.zip"])
def test_parsed_klines_equal_the_file(shared_archive: Path, relpath: str) -> None:
    """Header and headerless files parse to exactly the file's values."""
    parts = relpath.split("/")
    market = Market.SPOT if parts[0] == "spot" else Market.FUTURES_UM
    freq = parts[-5]
    period = parts[-1].split("-1m-")[1].removesuffix(".zip")
    f = ArchiveFile(market, "klines", parts[-3], "1m", freq, period)  # type: ignore[arg-type]
    parsed = load_file(ArchiveSource(str(shared_archive)), f)
    ref = reference_rows(shared_archive / relpath)
    assert parsed.bad.is_empty()
    assert parsed.rows.height == len(ref)
    got = parsed.rows.select(pl.col("open_time").dt.epoch("ms"), "open", "high", "low", "close", "volume",
                             pl.col("close_time").dt.epoch("ms"), "trades").rows()
    want = [(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]), int(r[6]), int(r[8]))
            for r in ref]
    assert got == want


def test_microsecond_and_millisecond_files_agree(shared_archive: Path) -> None:
    """Spot files switched to µs epochs in 2025: the same candles in either unit parse identically."""
    rows = reference_rows(shared_archive / SPOT_DAY)
    ms = "\n".join(",".join(r) for r in rows).encode()
    us = "\n".join(",".join([str(int(r[0]) * 1000), *r[1:6], str(int(r[6]) * 1000 + 999), *r[7:]]) for r in rows)
    kw = {"source": "x", "market": Market.SPOT, "symbol": "BTCUSDT", "interval": "1m"}
    a = parse_klines(ms, **kw).rows  # type: ignore[arg-type]
    b = parse_klines(us.encode(), **kw).rows  # type: ignore[arg-type]
    assert a.drop("close_time").equals(b.drop("close_time")) and a.height == 1440


def test_agg_trades_microseconds(shared_archive: Path) -> None:
    f = ArchiveFile(Market.SPOT, "aggTrades", "BTCUSDT", None, "daily", "2026-01-01")
    parsed = load_file(ArchiveSource(str(shared_archive)), f)
    ref = reference_rows(shared_archive / AGG)
    assert parsed.rows.height == len(ref) == 5000 and parsed.bad.is_empty()
    first = parsed.rows.row(0, named=True)
    assert first["agg_trade_id"] == int(ref[0][0])
    assert first["transact_time"].isoformat() == "2026-01-01T00:00:00.039409+00:00"  # µs kept exactly
    assert parsed.rows.get_column("is_buyer_maker").to_list() == [r[6] == "True" for r in ref]


def test_checksum_mismatch_is_refused(shared_archive: Path, tmp_path: Path) -> None:
    copy_archive_file(shared_archive, tmp_path, FIL_AUG)
    sidecar = tmp_path / (FIL_AUG + ".CHECKSUM")
    digest, name = sidecar.read_text().split()
    sidecar.write_text(f"{digest[:-1]}{'0' if digest[-1] != '0' else '1'}  {name}\n")
    f = ArchiveFile(Market.FUTURES_UM, "klines", "FILUSDT", "1m", "monthly", "2023-08")
    with pytest.raises(ChecksumError, match=r"FILUSDT-1m-2023-08\.zip.*does not match"):
        ArchiveSource(str(tmp_path)).fetch(f)


def test_missing_checksum_is_refused(shared_archive: Path, tmp_path: Path) -> None:
    copy_archive_file(shared_archive, tmp_path, FIL_AUG)
    (tmp_path / (FIL_AUG + ".CHECKSUM")).unlink()
    f = ArchiveFile(Market.FUTURES_UM, "klines", "FILUSDT", "1m", "monthly", "2023-08")
    with pytest.raises(ChecksumError, match="CHECKSUM sidecar missing"):
        ArchiveSource(str(tmp_path)).fetch(f)


def test_corrupt_and_truncated_zips(shared_archive: Path, tmp_path: Path) -> None:
    good = (shared_archive / FIL_AUG).read_bytes()
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(good[:1000] + bytes(b ^ 0xFF for b in good[1000:1100]) + good[1100:])
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good[: len(good) // 2])
    for p in (corrupt, truncated):
        with pytest.raises(DataError, match=f"{p.name}: corrupt or truncated zip"):
            read_zip_member(p)


def test_truncated_csv_row_is_reported_with_its_line(shared_archive: Path) -> None:
    rows = reference_rows(shared_archive / SPOT_DAY)
    text = "\n".join(",".join(r) for r in rows[:10]) + "\n" + ",".join(rows[10][:4])  # cut mid-row
    parsed = parse_klines(text.encode(), source="cut.csv", market=Market.SPOT, symbol="BTCUSDT", interval="1m")
    assert parsed.rows.height == 10
    bad = parsed.bad.row(0, named=True)
    assert (bad["source"], bad["line"]) == ("cut.csv", 11) and "missing" in bad["reason"]


def test_invalid_rows_are_named(shared_archive: Path) -> None:
    rows = reference_rows(shared_archive / SPOT_DAY)
    rows[5][2] = str(float(rows[5][3]) - 1)  # high below low
    rows[7][5] = "-1"  # negative volume
    rows[9][0] = str(int(rows[9][0]) + 1)  # open_time off the minute grid
    rows[11] = rows[12]  # duplicate candle
    body = "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,tbq,ignore\n"
    body += "\n".join(",".join(r) for r in rows)
    parsed = parse_klines(body.encode(), source="f.csv", market=Market.SPOT, symbol="BTCUSDT", interval="1m")
    reasons = dict(zip(parsed.bad.get_column("line").to_list(), parsed.bad.get_column("reason").to_list(),
                       strict=True))
    assert reasons[7] == "high < low"
    assert reasons[9] == "negative volume"
    assert reasons[11] == "open_time not aligned to 1m"
    assert reasons[13] == reasons[14] == "duplicate open_time in file"
    assert parsed.rows.height == 1440 - 5


def test_unknown_symbol(shared_archive: Path) -> None:
    with pytest.raises(NotInArchiveError, match="unknown symbol 'NOPEUSDT'"):
        ArchiveSource(str(shared_archive)).plan(Market.FUTURES_UM, "klines", "NOPEUSDT", "1m",
                                                parse_period("2023-02"), parse_period("2023-02", end=True))


def test_agg_trade_validation() -> None:
    body = b"1,100.5,0.1,1,1,1767225600039409,True,True\n2,-3,0.1,2,2,1767225600039410,False,True\n"
    parsed = parse_agg_trades(body, source="a.csv", market=Market.SPOT, symbol="BTCUSDT")
    assert parsed.rows.height == 1 and parsed.bad.row(0, named=True)["reason"] == "price <= 0"
