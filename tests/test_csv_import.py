"""Generic CSV import on the real REST dumps (6 columns, datetime strings, real gaps)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import API_DUMPS

from rltrader.data.ingest import find_gaps, import_csv
from rltrader.data.schema import Market
from rltrader.data.store import Store
from rltrader.errors import DataError, ValidationError

pytestmark = pytest.mark.usefixtures("shared_archive")  # reads the real shared data

BTC_2021 = API_DUMPS / "spot/BTCUSDT/1m/2021__BTCUSDT_1m.csv"
KW = {"market": Market.SPOT, "symbol": "BTCUSDT", "interval": "1m", "time_col": "timestamp",
      "time_format": "%Y-%m-%d %H:%M:%S"}


def test_import_real_dump_finds_its_gaps(store: Store) -> None:
    report = import_csv(store, BTC_2021, tz="UTC", **KW)  # type: ignore[arg-type]
    assert report.inserted == 50000 and report.quarantined == 0
    # MANIFEST: 434 missing minutes in 2 gaps: 2021-04-20 01:59->04:30, 2021-04-25 04:00->08:45
    assert [(g.start, g.missing) for g in report.gaps] == [
        (datetime(2021, 4, 20, 2, 0, tzinfo=UTC), 150), (datetime(2021, 4, 25, 4, 1, tzinfo=UTC), 284)]
    assert sum(g.missing for g in find_gaps(store, "spot", "BTCUSDT", "1m")) == 434
    k = store.read_klines("spot", "BTCUSDT", "1m")
    first = k.row(0, named=True)
    assert first["open_time"] == datetime(2021, 3, 26, 3, tzinfo=UTC)
    assert (first["open"], first["high"], first["low"], first["close"], first["volume"]) == (
        51696.7, 51926.17, 51696.7, 51827.72, 73.9024)
    assert first["trades"] is None and first["quote_volume"] is None  # absent in the file: not invented
    assert import_csv(store, BTC_2021, tz="UTC", **KW).inserted == 0  # type: ignore[arg-type]


def test_time_zone_is_applied(store: Store) -> None:
    import_csv(store, BTC_2021, tz="America/Sao_Paulo", **KW)  # type: ignore[arg-type]
    assert store.read_klines("spot", "BTCUSDT", "1m")["open_time"][0] == datetime(2021, 3, 26, 6, tzinfo=UTC)


def test_unknown_time_zone_and_missing_columns(tmp_path: Path, store: Store) -> None:
    with pytest.raises(DataError, match="unknown time zone"):
        import_csv(store, BTC_2021, tz="Mars/Olympus", **KW)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"missing time \(column 'ts'\).*header is"):
        import_csv(store, BTC_2021, tz="UTC", **{**KW, "time_col": "ts"})  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"close \(column 'c'\)"):
        import_csv(store, BTC_2021, tz="UTC", columns={"close": "c"}, **KW)  # type: ignore[arg-type]


def test_mapping_and_bad_rows(tmp_path: Path, store: Store) -> None:
    lines = BTC_2021.read_text().splitlines()[:20]
    lines[0] = "t,o,h,l,c,v"
    f = lines[6].split(",")
    f[2] = str(float(f[3]) - 1)  # high < low on file line 7
    lines[6] = ",".join(f)
    p = tmp_path / "dump.csv"
    p.write_text("\n".join(lines) + "\n")
    cols = {"open": "o", "high": "h", "low": "l", "close": "c", "volume": "v"}
    kw = {**KW, "time_col": "t"}
    with pytest.raises(ValidationError, match=r"dump\.csv: line 7: high < low"):
        import_csv(store, p, tz="UTC", columns=cols, **kw)  # type: ignore[arg-type]
    assert store.read_klines("spot", "BTCUSDT", "1m").is_empty()
    report = import_csv(store, p, tz="UTC", columns=cols, skip_bad_rows=True, **kw)  # type: ignore[arg-type]
    assert report.inserted == 18
    assert store.read_quarantine()["line"].to_list() == [7, 7]  # quarantined by both attempts
