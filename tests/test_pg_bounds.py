"""Every PostgreSQL wait is bounded: connect, pool, lock and statement, for the market data store and the trader's
journal; a tripped bound is one StoreError naming operation, table/series and bound, with nothing partial stored.

Real components: the suite's PostgreSQL server, a second session holding real locks (``LOCK TABLE``, the store's
advisory series lock), a real trigger that makes the store's COPY slow, a real listening socket that never answers.
Each blocking call runs under a deadline (``within``), so a regression fails instead of hanging the suite; the
deadlines are generous (the point is ending, not speed).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import psycopg
import pytest
from conftest import archive_rows
from polars.testing import assert_frame_equal
from test_stream_bounds import FAST, RawServer, bounded, kline_message, read_handshake, replay, ws_frame

from rltrader.config import load_settings
from rltrader.data import postgres_store
from rltrader.data.pgbounds import PgBounds, table_of
from rltrader.data.postgres_store import PostgresStore
from rltrader.data.schema import Market
from rltrader.data.stream import run_stream
from rltrader.errors import ConfigError, StoreError
from rltrader.live.records import Records
from rltrader.testing import TempPostgres

REPO = Path(__file__).resolve().parents[1]
DAY = date(2020, 1, 1)  # spot BTCUSDT / ETHUSDT 1m klines in the shared archive
T = TypeVar("T")


def within(seconds: float, fn: Callable[[], T]) -> tuple[T | BaseException, float]:
    """Run ``fn`` in a thread; its result (or exception) and seconds taken; fail if it outlives ``seconds``."""
    pool = ThreadPoolExecutor(1)
    started = time.monotonic()
    fut = pool.submit(fn)
    try:
        exc = fut.exception(timeout=seconds)
    except TimeoutError:
        pytest.fail(f"the call did not end within {seconds} s: an unbounded wait")
    finally:
        pool.shutdown(wait=False)
    return (exc if exc is not None else fut.result()), time.monotonic() - started


@contextmanager
def holding(url: str, *statements: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session that runs ``statements`` in an open transaction (its locks held) until the block ends."""
    with psycopg.connect(url) as other:
        for stmt in statements:
            other.execute(stmt.encode())
        try:
            yield other
        finally:
            other.rollback()


def klines(symbol: str = "BTCUSDT", n: int = 120) -> pl.DataFrame:
    """Real spot 1m klines of the shared archive."""
    return archive_rows(Market.SPOT, "klines", DAY, DAY, symbol).head(n)


def count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return int(row[0])


# -- the store ---------------------------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.usefixtures("shared_archive")
def test_locked_klines_table_fails_within_the_lock_bound_then_the_same_write_is_clean(
        pg_server: TempPostgres, pg_url: str) -> None:
    rows = klines()
    st = PostgresStore(pg_url, bounds=PgBounds(lock_timeout=0.3))
    try:
        with holding(pg_url, "LOCK TABLE kline_data IN ACCESS EXCLUSIVE MODE"):
            got, took = within(30, lambda: st.write_klines(rows))
        assert isinstance(got, StoreError), got
        assert str(got) == ("write_klines into kline_data (spot BTCUSDT 1m): lock_timeout 0.3 s exceeded "
                            "(another session holds a lock); rolled back, nothing stored")
        assert isinstance(got.__cause__, psycopg.errors.LockNotAvailable)
        assert took < 15, took
        # nothing partial: not even the series row the failed transaction had created
        assert count(pg_url, "SELECT count(*) FROM kline_data") == 0
        assert count(pg_url, "SELECT count(*) FROM series") == 0
        # the lock released, the same write succeeds and reads back exactly as a write into a clean database
        assert st.write_klines(rows).inserted == rows.height
        after = st.read_klines("spot", "BTCUSDT", "1m")
    finally:
        st.close()
    clean = PostgresStore(pg_server.create_database("t_pgbounds_clean"))
    try:
        clean.write_klines(rows)
        assert_frame_equal(after, clean.read_klines("spot", "BTCUSDT", "1m"))
    finally:
        clean.close()
    assert_frame_equal(after, rows.select(after.columns).cast(after.schema))  # type: ignore[arg-type]


@pytest.mark.postgres
@pytest.mark.usefixtures("shared_archive")
def test_a_series_held_by_another_writer_rolls_back_the_whole_batch(pg_url: str) -> None:
    """BTCUSDT's rows are COPYed in the batch's transaction before ETHUSDT waits for its writer lock: when that
    wait trips (bounded by the statement bound: the holder is a writer, maybe mid-COPY), BTCUSDT's rows go too."""
    btc = klines("BTCUSDT", 60)
    eth = btc.with_columns(symbol=pl.lit("ETHUSDT"))  # a second series (the archive has no ETHUSDT that day)
    st = PostgresStore(pg_url, bounds=PgBounds(statement_timeout=0.5, lock_timeout=0.1))
    try:
        st.write_klines(eth.head(1))  # ETHUSDT's series exists: another writer can hold its advisory lock
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT id FROM series WHERE symbol = 'ETHUSDT'").fetchone()
        assert row is not None
        with holding(pg_url, f"SELECT pg_advisory_xact_lock(1, {int(row[0])})"):  # 1 = kline_data's lock space
            got, _ = within(30, lambda: st.write_klines(pl.concat([btc, eth])))
        assert isinstance(got, StoreError), got
        assert str(got) == ("write_klines into kline_data (spot ETHUSDT 1m): waited statement_timeout 0.5 s for "
                            "another writer of this series (its advisory lock); rolled back, nothing stored")
        assert st.read_klines("spot", "BTCUSDT", "1m").height == 0
        assert st.read_klines("spot", "ETHUSDT", "1m").height == 1
        # after the wait the connection's own lock bound is back in force (SET LOCAL ended with the transaction)
        with st.pool.connection() as conn:
            assert conn.execute("SHOW lock_timeout").fetchone() == ("100ms",)
        assert st.write_klines(pl.concat([btc, eth])).inserted == 119
    finally:
        st.close()


@pytest.mark.postgres
@pytest.mark.usefixtures("shared_archive")
def test_statement_bound_trips_inside_the_copy(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that stalls the write (a trigger that sleeps once the table has rows, i.e. at the write's second
    COPY statement: a big write is split into several): the statement bound ends it, named, and the whole write is
    rolled back, the first statement's rows included; without the stall the same write stores every row."""
    monkeypatch.setattr(postgres_store, "COPY_STATEMENT_ROWS", 50)
    rows = klines()
    st = PostgresStore(pg_url, bounds=PgBounds(statement_timeout=0.4))
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN IF EXISTS (SELECT 1 FROM kline_data) THEN PERFORM pg_sleep(30); END IF; "
                         "RETURN NULL; END $$")
            conn.execute("CREATE TRIGGER stall BEFORE INSERT ON kline_data FOR EACH STATEMENT "
                         "EXECUTE FUNCTION stall()")
        got, took = within(30, lambda: st.write_klines(rows))
        assert isinstance(got, StoreError), got
        assert str(got) == ("write_klines into kline_data (spot BTCUSDT 1m): statement_timeout 0.4 s exceeded; "
                            "rolled back, nothing stored")
        assert isinstance(got.__cause__, psycopg.errors.QueryCanceled)
        assert took < 25, took
        assert count(pg_url, "SELECT count(*) FROM kline_data") == 0
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER stall ON kline_data")
        assert st.write_klines(rows).inserted == rows.height  # 3 COPY statements of <= 50 rows
        stored = st.read_klines("spot", "BTCUSDT", "1m")
        assert_frame_equal(stored, rows.select(stored.columns).cast(stored.schema))  # type: ignore[arg-type]
        # a read is bounded the same way (and not said to have rolled anything back): waiting on the lock, the
        # statement bound (0.4 s) trips before the lock bound (30 s)
        with holding(pg_url, "LOCK TABLE kline_data IN ACCESS EXCLUSIVE MODE"):
            got, _ = within(30, lambda: st.read_klines("spot", "BTCUSDT", "1m"))
        assert isinstance(got, StoreError)
        assert str(got) == "read_klines from kline_data (spot BTCUSDT 1m): statement_timeout 0.4 s exceeded"
    finally:
        st.close()


@pytest.mark.postgres
def test_pool_wait_is_bounded(pg_url: str) -> None:
    st = PostgresStore(pg_url, max_size=1, bounds=PgBounds(pool_timeout=0.5))
    try:
        with st.pool.connection():  # the only connection is busy
            got, _ = within(30, lambda: st.read_klines("spot", "BTCUSDT", "1m"))
        assert isinstance(got, StoreError)
        assert str(got) == ("read_klines from kline_data (spot BTCUSDT 1m): no connection from the pool within "
                            "pool_timeout 0.5 s (server unreachable, or every pooled connection busy)")
        assert st.read_klines("spot", "BTCUSDT", "1m").height == 0
    finally:
        st.close()


@pytest.mark.postgres
def test_bounds_reach_the_server_and_keep_the_urls_own_options(pg_url: str) -> None:
    url = pg_url + "?options=-c%20search_path%3Dpublic%20-c%20application_name%3Drlt"
    st = PostgresStore(url, bounds=PgBounds(statement_timeout=12, lock_timeout=0))
    try:
        with st.pool.connection() as conn:
            shown = [conn.execute(f"SHOW {k}".encode()).fetchone()
                     for k in ("statement_timeout", "lock_timeout", "application_name")]
        assert shown == [("12s",), ("0",), ("rlt",)]
        # the client side: libpq's connect bound and keepalives on the pooled connection
        params = {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}
        assert {k: params[k] for k in ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                                       "keepalives_count")} == {"connect_timeout": "10", "keepalives": "1",
                                                                "keepalives_idle": "30", "keepalives_interval": "10",
                                                                "keepalives_count": "3"}
    finally:
        st.close()


# -- the stream ingester on a locked store -----------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.usefixtures("shared_archive")
@pytest.mark.timeout(120)
def test_stream_on_a_locked_store_retries_then_ends_with_the_named_error(pg_url: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Locked before the start: the start's cursor query ends at the lock bound, named. Locked once the last bar
    arrived: each of the writer thread's retries ends at the lock bound, then the run ends (for the supervisor)
    with the StoreError, not a hang; nothing is stored."""
    st = PostgresStore(pg_url, bounds=PgBounds(lock_timeout=0.2))
    open_ms = int((datetime(2020, 1, 1, tzinfo=UTC) + timedelta(minutes=5)).timestamp() * 1000)

    async def last_bar_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await read_handshake(reader) + ws_frame(0x1, kline_message("BTCUSDT", open_ms))
                     + ws_frame(0x8, (1001).to_bytes(2, "big")))
        while await reader.read(65536):
            pass

    async def main(on_last_bar: Callable[[], object]) -> None:
        stop = asyncio.Event()

        def last_bar(row: Any) -> None:
            on_last_bar()
            stop.set()

        async with replay() as srv, RawServer(last_bar_then_close) as ws:
            await bounded(run_stream(st, "spot", ["BTCUSDT"], rest_base=srv.rest_base_url, ws_base=ws.ws_base,
                                     stop_event=stop, backoff=FAST, on_kline=last_bar), 60)

    lock = "LOCK TABLE kline_data IN ACCESS EXCLUSIVE MODE"
    try:
        with holding(pg_url, lock), pytest.raises(StoreError, match=r"^stats of the data tables: lock_timeout 0.2 s"):
            asyncio.run(main(lambda: None))
        with psycopg.connect(pg_url) as other:
            named = r"^write_klines into kline_data \(spot BTCUSDT 1m\): lock_timeout 0.2 s exceeded"
            with pytest.raises(StoreError, match=named):
                asyncio.run(main(lambda: other.execute(lock)))
            other.rollback()
        retries = [r.getMessage() for r in caplog.records if "store_write_retry" in r.getMessage()]
        assert len(retries) == 4 and all("lock_timeout 0.2 s exceeded" in m for m in retries), retries
        assert st.read_klines("spot", "BTCUSDT", "1m").height == 0
    finally:
        st.close()


# -- the journal ------------------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_journal_locked_table_is_a_named_error_and_its_transaction_rolls_back(pg_url: str) -> None:
    rec = Records(pg_url, bounds=PgBounds(lock_timeout=0.3))
    try:
        def order_with_session() -> None:
            with rec.transaction():
                rec.start_session("s1", mode="paper", model="flat", model_version=None, symbols=["AAA"], params={})
                rec.record_order("s1", "AAA", 0, "oid-1", 1.0, 10.0, "signal")

        with holding(pg_url, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"):
            got, took = within(30, order_with_session)
        assert isinstance(got, StoreError), got
        assert str(got) == ("trader journal INSERT on orders: lock_timeout 0.3 s exceeded (another session holds "
                            "a lock); rolled back, nothing stored")
        assert took < 15, took
        assert count(pg_url, "SELECT count(*) FROM trade_sessions") == 0  # the transaction's first write too
        order_with_session()  # the lock released: the same writes go through on the same connection
        assert count(pg_url, "SELECT count(*) FROM orders") == 1
        with holding(pg_url, "LOCK TABLE fills IN ACCESS EXCLUSIVE MODE"):  # a read is bounded too
            got, _ = within(30, lambda: rec.fills("s1"))
        assert isinstance(got, StoreError)
        assert str(got) == ("trader journal SELECT on fills: lock_timeout 0.3 s exceeded (another session holds a "
                            "lock)")
    finally:
        rec.close()


def test_table_of_names_the_statements_table() -> None:
    assert table_of("CREATE TABLE IF NOT EXISTS marks (a int)") == "marks"
    assert table_of("CREATE INDEX IF NOT EXISTS fills_session ON fills (session_id)") == "fills"
    assert table_of("INSERT INTO orders (a) VALUES (1) ON CONFLICT (a) DO NOTHING") == "orders"
    assert table_of("UPDATE orders SET a = 1") == "orders"


# -- connect ------------------------------------------------------------------------------------------------------
@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback TCP port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        yield srv.getsockname()[1]


@pytest.mark.parametrize("component", ["store", "journal"])
def test_connect_to_a_silent_server_fails_within_the_connect_bound(silent_port: int, component: str) -> None:
    url = f"postgresql://alice:s3cr3t-pw@127.0.0.1:{silent_port}/market"
    bounds = PgBounds(connect_timeout=2)
    got, took = within(60, lambda: PostgresStore(url, bounds=bounds) if component == "store"
                       else Records(url, bounds=bounds))
    assert isinstance(got, StoreError), got
    name = "PostgreSQL store" if component == "store" else "trader journal"
    assert str(got) == (f"{name}: cannot connect to PostgreSQL at 127.0.0.1:{silent_port}/market: "
                        "connect_timeout 2 s exceeded (no answer from the server)")
    assert "s3cr3t" not in str(got) and "alice" not in str(got)
    assert took < 30, took


@pytest.mark.slow  # the default 10 s connect bound (the tune storage has no setting of its own)
def test_tune_storage_connect_is_bounded(silent_port: int, tmp_path: Path) -> None:
    """Optuna's study storage and the tune budget lock on PostgreSQL: a silent server fails at the 10 s connect
    bound (psycopg's own default would wait 130 s)."""
    from rltrader.tune.storage import budget_lock, open_storage, storage_url

    url = storage_url(f"postgresql://u@127.0.0.1:{silent_port}/studies", tmp_path)
    got, took = within(60, lambda: open_storage(url, 30, 120, 1))
    assert isinstance(got, Exception) and "timeout expired" in str(got), got
    assert took < 40, took

    def lock() -> None:
        with budget_lock(url, "s"):
            pass

    got, took = within(60, lock)
    assert isinstance(got, psycopg.errors.ConnectionTimeout), got
    assert took < 40, took


def test_refused_connect_names_the_place_not_the_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        named = rf"^PostgreSQL store: cannot connect to PostgreSQL at 127.0.0.1:{port}/db: .*Connection refused"
        with pytest.raises(StoreError, match=named) as exc:
            PostgresStore(f"postgresql://u:hunter2@127.0.0.1:{port}/db")
    assert "hunter2" not in str(exc.value)


def test_cli_reports_the_configured_connect_bound_as_one_line(silent_port: int, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``postgres.connect_timeout_seconds`` reaches the store through the CLI, and the user sees one clear line."""
    from typer.testing import CliRunner

    from rltrader.cli import app

    monkeypatch.setenv("RLTRADER_PARAMS", str(REPO / "params.yaml"))
    monkeypatch.setenv("RLTRADER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RLTRADER_POSTGRES__CONNECT_TIMEOUT_SECONDS", "3")
    res = CliRunner().invoke(app, ["data", "stats", "--store", f"postgresql://bob:pw9@127.0.0.1:{silent_port}/m"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert (f"error: PostgreSQL store: cannot connect to PostgreSQL at 127.0.0.1:{silent_port}/m: connect_timeout 3 s "
            "exceeded (no answer from the server)") in text
    assert "pw9" not in res.output


# -- config --------------------------------------------------------------------------------------------------------
def test_repo_params_give_the_default_bounds() -> None:
    s = load_settings(REPO / "params.yaml", env={})
    assert s.postgres.bounds() == PgBounds(10, 300.0, 30.0, 30.0)
    assert PgBounds().connect_kwargs("postgresql://u@h/db") == {
        "connect_timeout": 10, "options": "-c statement_timeout=300000 -c lock_timeout=30000",
        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("CONNECT_TIMEOUT_SECONDS", "1", r"postgres\.connect_timeout_seconds: Input should be greater than or equal to 2"),
    ("CONNECT_TIMEOUT_SECONDS", "0", r"postgres\.connect_timeout_seconds: Input should be greater than or equal to 2"),
    ("CONNECT_TIMEOUT_SECONDS", "2.5", r"postgres\.connect_timeout_seconds: Input should be a valid integer"),
    ("STATEMENT_TIMEOUT_SECONDS", "-1", r"postgres\.statement_timeout_seconds: Input should be greater than or equal"),
    ("LOCK_TIMEOUT_SECONDS", "0.0001", r"postgres\.lock_timeout_seconds: .*0 \(off\) or at least 0.001"),
    ("POOL_TIMEOUT_SECONDS", "0", r"postgres\.pool_timeout_seconds: Input should be greater than 0"),
    ("LOCK_TIMEOUT_SECONDS", "soon", r"postgres\.lock_timeout_seconds: Input should be a valid number"),
])
def test_bad_bounds_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(REPO / "params.yaml", env={f"RLTRADER_POSTGRES__{key}": value})


def test_zero_statement_and_lock_bounds_mean_off_as_in_postgresql() -> None:
    s = load_settings(REPO / "params.yaml", env={"RLTRADER_POSTGRES__STATEMENT_TIMEOUT_SECONDS": "0",
                                                 "RLTRADER_POSTGRES__LOCK_TIMEOUT_SECONDS": "0.25"})
    assert s.postgres.bounds().connect_kwargs("postgresql://u@h/db")["options"] == (
        "-c statement_timeout=0 -c lock_timeout=250")
