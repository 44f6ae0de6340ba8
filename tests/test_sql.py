"""`rltrader data sql`: the same queries give the same answers over the Parquet store (DuckDB) and PostgreSQL for
the same real backfill, each checked against polars over the stores' own read API; writes are refused."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_sessions import fill_store as fill_synthetic_store
from test_sessions import make_settings
from typer.testing import CliRunner

from rltrader.cli import app
from rltrader.data.archive import ArchiveSource
from rltrader.data.ingest import backfill
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.postgres_store import PostgresStore
from rltrader.data.schema import Market
from rltrader.data.sql import (
    QueryResult,
    ReadOnlyError,
    SQLError,
    _execute_postgres,
    run_duckdb,
    run_postgres,
    run_sql,
)
from rltrader.data.store import Store
from rltrader.dataset import load_split
from rltrader.dataset.build import run_features_stage, run_sessions_stage
from rltrader.testing import TempPostgres

DAILY_OHLCV = """
    SELECT symbol, date_trunc('day', open_time) AS day,
           (array_agg(open ORDER BY open_time))[1] AS open, max(high) AS high, min(low) AS low,
           (array_agg(close ORDER BY open_time DESC))[1] AS close, sum(volume) AS volume, count(*) AS n
    FROM klines WHERE market = 'futures-um' AND interval = '1m'
    GROUP BY symbol, day ORDER BY symbol, day"""
VWAP_1M = """
    SELECT date_trunc('minute', transact_time) AS minute, sum(price * quantity) / sum(quantity) AS vwap,
           count(*) AS trades, sum(CASE WHEN is_buyer_maker THEN 0 ELSE quantity END) AS taker_buy
    FROM agg_trades WHERE symbol = 'BTCUSDT' GROUP BY 1 ORDER BY 1"""
COUNTS = """
    SELECT 'klines' AS kind, market, symbol, interval, count(*) AS n FROM klines GROUP BY 1, 2, 3, 4
    UNION ALL SELECT 'agg_trades', market, symbol, '', count(*) FROM agg_trades GROUP BY 1, 2, 3, 4
    UNION ALL SELECT 'bars', market, symbol, width, count(*) FROM bars GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4"""


@dataclass
class Loaded:
    parquet: ParquetStore
    pg_url: str
    data_dir: Path


def _load(store: Store, archive: Path) -> None:
    src = ArchiveSource(str(archive))
    backfill(store, src, Market.FUTURES_UM, ["FILUSDT", "NEARUSDT"], "2023-08", "2023-08", progress=False)
    backfill(store, src, Market.SPOT, ["BTCUSDT"], "2026-01-01", "2026-01-01", kind="aggTrades", progress=False)
    store.write_bars(store.trade_bars("spot", "BTCUSDT", "5s"), "5s")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, pg_server: TempPostgres, shared_archive: Path) -> Iterator[Loaded]:
    """One real backfill (two futures months of klines, a day of spot aggTrades, 5 s bars) into both stores."""
    tmp = tmp_path_factory.mktemp("sql")
    pq_store = ParquetStore(tmp / "data" / "store")
    _load(pq_store, shared_archive)
    url = pg_server.create_database("sql_contract")
    pg = PostgresStore(url)
    _load(pg, shared_archive)
    pg.close()
    yield Loaded(pq_store, url, tmp / "data")


def _both(loaded: Loaded, query: str) -> tuple[QueryResult, QueryResult]:
    duck = run_sql(query, f"parquet://{loaded.parquet.root}", loaded.data_dir)
    pg = run_sql(query, loaded.pg_url, loaded.data_dir)
    assert (duck.engine, pg.engine) == ("duckdb", "postgresql")
    assert duck.columns == pg.columns
    return duck, pg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def assert_rows_equal(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w) and all(_same(x, y) for x, y in zip(g, w, strict=True)), f"row {i}: {g} != {w}"


@pytest.mark.postgres
@pytest.mark.slow
def test_row_counts_agree_with_the_stores(loaded: Loaded) -> None:
    duck, pg = _both(loaded, COUNTS)
    assert_rows_equal(duck.rows, pg.rows)
    want = sorted((s.kind, s.market, s.symbol, s.interval, s.rows) for s in loaded.parquet.stats())
    assert duck.rows == want
    assert ("klines", "futures-um", "FILUSDT", "1m", 44640) in want
    assert ("agg_trades", "spot", "BTCUSDT", "", 5000) in want


@pytest.mark.postgres
@pytest.mark.slow
def test_daily_ohlcv_agrees_on_both_stores_and_with_polars(loaded: Loaded) -> None:
    duck, pg = _both(loaded, DAILY_OHLCV)
    assert duck.columns == ["symbol", "day", "open", "high", "low", "close", "volume", "n"]
    assert_rows_equal(duck.rows, pg.rows)
    frames = [loaded.parquet.read_klines("futures-um", s, "1m") for s in ("FILUSDT", "NEARUSDT")]
    want = (pl.concat(frames).sort("symbol", "open_time")
            .group_by("symbol", pl.col("open_time").dt.truncate("1d").alias("day"), maintain_order=True)
            .agg(pl.col("open").first(), pl.col("high").max(), pl.col("low").min(), pl.col("close").last(),
                 pl.col("volume").sum(), pl.len().cast(pl.Int64).alias("n")))
    assert len(duck.rows) == 2 * 31
    assert_rows_equal(duck.rows, want.rows())
    assert duck.rows[0][1] == datetime(2023, 8, 1, tzinfo=UTC)  # UTC days on both engines


@pytest.mark.postgres
@pytest.mark.slow
def test_vwap_from_agg_trades_agrees_on_both_stores_and_with_polars(loaded: Loaded) -> None:
    duck, pg = _both(loaded, VWAP_1M)
    assert_rows_equal(duck.rows, pg.rows)
    t = loaded.parquet.read_agg_trades("spot", "BTCUSDT")
    want = (t.group_by(pl.col("transact_time").dt.truncate("1m").alias("minute"))
            .agg((pl.col("price") * pl.col("quantity")).sum() / pl.col("quantity").sum(), pl.len().cast(pl.Int64),
                 pl.col("quantity").filter(~pl.col("is_buyer_maker")).sum())
            .sort("minute"))
    assert len(duck.rows) == 13
    assert_rows_equal(duck.rows, want.rows())


@pytest.mark.postgres
@pytest.mark.slow
def test_bars_view_has_the_width_and_the_stored_bars(loaded: Loaded) -> None:
    q = "SELECT width, symbol, bucket, open, close, trades FROM bars ORDER BY bucket"
    duck, pg = _both(loaded, q)
    assert_rows_equal(duck.rows, pg.rows)
    bars = loaded.parquet.read_bars("spot", "BTCUSDT", "5s")
    assert duck.rows == [("5s", *r) for r in bars.select("symbol", "bucket", "open", "close", "trades").rows()]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


WRITES = [
    "DROP VIEW klines",
    "DELETE FROM klines",
    "INSERT INTO klines SELECT * FROM klines",
    "CREATE TABLE copy AS SELECT * FROM klines",
    "COPY (SELECT * FROM klines) TO '/tmp/rltrader-sql-test.csv'",
    "SELECT 1; DROP VIEW klines",
    "ATTACH 'x.duckdb' AS x",
    "SET threads = 1",
]


@pytest.mark.postgres
@pytest.mark.slow
def test_writes_are_refused_and_nothing_changes(loaded: Loaded) -> None:
    before_files = _tree(loaded.parquet.root)
    before_counts = _both(loaded, COUNTS)[1].rows
    for q in WRITES:
        for url in (f"parquet://{loaded.parquet.root}", loaded.pg_url):
            with pytest.raises(ReadOnlyError, match=r"refused|one SELECT at a time"):
                run_sql(q, url, loaded.data_dir)
    seq = "SELECT last_value, is_called FROM series_id_seq"
    seq_before = run_postgres(seq, loaded.pg_url).rows
    # statements that parse as reads but write: PostgreSQL's READ ONLY transaction refuses them
    for q in ["SELECT nextval('series_id_seq')",
              "WITH d AS (DELETE FROM kline_data RETURNING 1) SELECT count(*) FROM d",
              "SELECT * FROM klines FOR UPDATE"]:
        with pytest.raises(SQLError, match=r"read-only transaction|refused"):
            run_postgres(q, loaded.pg_url)
    # switching read-only off for "later" gains nothing: the transaction is rolled back, the connection closed
    run_postgres("SELECT set_config('default_transaction_read_only', 'off', false)", loaded.pg_url)
    with pytest.raises(SQLError, match="read-only transaction"):
        run_postgres("SELECT nextval('series_id_seq')", loaded.pg_url)
    assert not Path("/tmp/rltrader-sql-test.csv").exists()
    assert _tree(loaded.parquet.root) == before_files
    duck, pg = _both(loaded, COUNTS)
    assert duck.rows == pg.rows == before_counts
    assert run_postgres(seq, loaded.pg_url).rows == seq_before  # sequences are not rolled back: nextval never ran


def test_duckdb_reads_only_the_store_folders(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path / "store")
    secret = tmp_path / "elsewhere.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(SQLError, match="file system operations are disabled by configuration"):
        run_duckdb(f"SELECT * FROM read_csv('{secret}')", store.root)
    with pytest.raises(SQLError, match="SET statement refused"):
        run_duckdb("SET enable_external_access = true", store.root)
    # an empty store still has typed views
    res = run_duckdb("SELECT count(*) AS n, max(open_time) AS t FROM klines", store.root)
    assert res.rows == [(0, None)]


def test_features_and_sessions_views(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    run_features_stage(settings, fill_synthetic_store(tmp_path))
    run_sessions_stage(settings)
    res = run_sql("SELECT symbol, count(*) AS n, sum(CASE WHEN valid THEN 1 ELSE 0 END) AS v FROM features "
                  "GROUP BY 1 ORDER BY 1", None, settings.data.dir)
    want = [(s, *pl.read_parquet(settings.data.dir / "features" / f"{s}.parquet")
             .select(pl.len(), pl.col("valid").sum()).row(0)) for s in ("AAAUSDT", "BBBUSDT")]
    assert res.rows == want
    for split in ("train", "val", "test", "backtest"):
        ds = load_split(settings.data.dir / "sessions", split)
        got = run_sql(f"SELECT (SELECT count(*) FROM sessions_{split}), (SELECT count(*) FROM sessions_{split}_index)",
                      None, settings.data.dir).rows
        assert got == [(len(ds.features), ds.n_sessions)]


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(app, ["data", "sql", *args])


def test_cli_output_formats_and_errors(tmp_path: Path, shared_archive: Path) -> None:
    store = ParquetStore(tmp_path / "store")
    backfill(store, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2020-01-01", "2020-01-02",
             progress=False)
    url = f"parquet://{store.root}"
    q = "SELECT date_trunc('day', open_time) AS day, count(*) AS n FROM klines GROUP BY 1 ORDER BY 1"
    res = _cli([q, "--store", url, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"day": "2020-01-01T00:00:00+00:00", "n": 1440},
                                      {"day": "2020-01-02T00:00:00+00:00", "n": 1440}]
    csv_file = tmp_path / "out" / "days.csv"
    res = _cli([q, "--store", url, "--csv", str(csv_file)])
    assert res.exit_code == 0, res.output
    assert csv_file.read_text().splitlines() == ["day,n", "2020-01-01T00:00:00+00:00,1440",
                                                 "2020-01-02T00:00:00+00:00,1440"]
    res = _cli([q, "--store", url])
    assert res.exit_code == 0 and "2 row(s)" in res.stdout and "2020-01-02" in res.stdout
    bad = _cli(["SELEC count(*) FROM klines", "--store", url])
    assert bad.exit_code == 1 and 'syntax error at or near "SELEC"' in bad.output
    unknown = _cli(["SELECT nope FROM klines", "--store", url])
    assert unknown.exit_code == 1 and 'Referenced column "nope" not found' in unknown.output
    before = _tree(store.root)
    refused = _cli(["DELETE FROM klines", "--store", url])
    assert refused.exit_code == 1 and "DELETE statement refused" in refused.output
    assert _tree(store.root) == before


@pytest.mark.postgres
def test_cli_on_postgres_gives_postgres_message(pg_url: str, shared_archive: Path) -> None:
    st = PostgresStore(pg_url)
    backfill(st, ArchiveSource(str(shared_archive)), Market.SPOT, ["BTCUSDT"], "2020-01-01", "2020-01-01",
             progress=False)
    st.close()
    ok = _cli(["SELECT count(*) AS n, min(open_time) AS t FROM klines", "--store", pg_url, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == [{"n": 1440, "t": datetime(2020, 1, 1, tzinfo=UTC).isoformat()}]
    bad = _cli(["SELECT nope FROM klines", "--store", pg_url])
    assert bad.exit_code == 1 and 'column "nope" does not exist' in bad.output
    with pytest.raises(ReadOnlyError, match="one SELECT at a time"):
        run_postgres("SELECT 1; COMMIT; DROP TABLE kline_data", pg_url)
    # past the parser check (text DuckDB cannot parse goes straight to PostgreSQL), the extended query protocol
    # still refuses a second statement
    with pytest.raises(SQLError, match="cannot insert multiple commands"):
        _execute_postgres("SELECT 1; COMMIT; DROP TABLE kline_data", pg_url)
    assert run_postgres("SELECT count(*) FROM kline_data", pg_url).rows == [(1440,)]
