"""The trader's records: every decision (with the action scores), order, fill and equity mark, queryable.

Why a database and not log lines: ``rltrader trade status`` / ``orders`` and the daily PnL are queries, and the
next trader issue turns this into the write-ahead journal a crash-only trader recovers from. The schema is
designed for that already:

- rows are written *before* the action they describe takes effect (a decision before its order is sent, an
  order as ``new`` before the request leaves, then ``sent``/``filled``/``rejected``), each in its own committed
  transaction;
- a decision is unique per (session, symbol, bar) and an order's ``client_order_id`` is derived from the same
  key (``order_id_for``), so re-running a bar's decision finds the order already recorded and sends nothing;
- times are integer microseconds UTC (bar open times) plus the wall clock of the write.

Backends: SQLite (default ``<data.dir>/trader.db``, WAL journal, ``synchronous=FULL``: each commit is fsynced
before the call returns, so an order's intent is on disk before its request leaves — the write-ahead journal a
SIGKILL or a power cut cannot outrun; ``durable=False`` gives ``NORMAL``, a WAL append without the fsync, for
throwaway runs) or PostgreSQL
(``trader.records_url: postgresql://…``, e.g. the same server as the market data store). Same SQL, only the
parameter style and the auto-increment type differ. PostgreSQL waits are bounded (``postgres:`` in params.yaml,
:mod:`rltrader.data.pgbounds`): the connect, and every statement's lock wait and run time, server side; a tripped
bound is one ``StoreError`` naming the statement's table and the bound, the statement (or the enclosing
``transaction``) rolled back.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltrader.errors import ConfigError

if TYPE_CHECKING:
    from rltrader.data.pgbounds import PgBounds

DAY_US = 86_400_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trade_sessions (
    session_id TEXT PRIMARY KEY, mode TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT,
    symbols TEXT NOT NULL, params TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION, summary TEXT);
CREATE TABLE IF NOT EXISTS decisions (
    id {serial}, session_id TEXT NOT NULL, symbol TEXT NOT NULL, bar_time BIGINT NOT NULL,
    action INTEGER NOT NULL, action_name TEXT NOT NULL, scores TEXT, target DOUBLE PRECISION,
    position DOUBLE PRECISION, reason TEXT NOT NULL, model_version TEXT, written_at DOUBLE PRECISION NOT NULL,
    UNIQUE (session_id, symbol, bar_time));
CREATE TABLE IF NOT EXISTS orders (
    id {serial}, session_id TEXT NOT NULL, symbol TEXT NOT NULL, bar_time BIGINT NOT NULL,
    client_order_id TEXT NOT NULL UNIQUE, qty DOUBLE PRECISION NOT NULL, ref_price DOUBLE PRECISION,
    status TEXT NOT NULL, reason TEXT NOT NULL, exchange_order_id TEXT, detail TEXT,
    written_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS fills (
    id {serial}, session_id TEXT NOT NULL, symbol TEXT NOT NULL, client_order_id TEXT, time BIGINT NOT NULL,
    kind TEXT NOT NULL, qty DOUBLE PRECISION NOT NULL, price DOUBLE PRECISION NOT NULL,
    fee DOUBLE PRECISION NOT NULL, slippage DOUBLE PRECISION NOT NULL, realized DOUBLE PRECISION NOT NULL,
    position_after DOUBLE PRECISION NOT NULL, written_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS marks (
    session_id TEXT NOT NULL, symbol TEXT NOT NULL, bar_time BIGINT NOT NULL, equity DOUBLE PRECISION NOT NULL,
    position DOUBLE PRECISION NOT NULL, price DOUBLE PRECISION NOT NULL, PRIMARY KEY (session_id, symbol, bar_time));
CREATE TABLE IF NOT EXISTS risk_kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS risk_events (
    id {serial}, at DOUBLE PRECISION NOT NULL, state_from TEXT NOT NULL, state_to TEXT NOT NULL,
    reason TEXT NOT NULL, numbers TEXT);
CREATE TABLE IF NOT EXISTS commands (
    id {serial}, command TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL, taken_at DOUBLE PRECISION,
    result TEXT);
CREATE INDEX IF NOT EXISTS orders_session ON orders (session_id, symbol, bar_time);
CREATE INDEX IF NOT EXISTS fills_session ON fills (session_id, symbol, time);
"""


def order_id_for(session_id: str, symbol: str, bar_time_us: int, seq: int = 0) -> str:
    """The client order id of a bar's order: deterministic, so a recomputed decision maps to the same order
    (Binance accepts ``[.A-Z:/a-z0-9_-]{1,36}``).

    The session is named by a 10-hex-digit digest of its WHOLE id, not by a prefix: session ids start with their
    start time (``YYYYmmddHHMMSS`` + random), so a prefix made two sessions started in the same hour on one
    exchange account derive the same id for the same bar, and Binance would refuse the second session's order as
    a duplicate (or recovery would adopt the other session's order as its own)."""
    tag = hashlib.blake2b(session_id.encode(), digest_size=5).hexdigest()
    return f"rl{tag}-{symbol[:10]}-{bar_time_us // 60_000_000}-{seq}"[:36]


class Records:
    """Writes and queries of one records database (thread-safe: one connection behind a lock)."""

    def __init__(self, url: str | Path, *, durable: bool = True, bounds: PgBounds | None = None) -> None:
        text = str(url)
        self.url = text
        self.postgres = text.startswith(("postgresql://", "postgres://"))
        self._lock = threading.RLock()  # re-entrant: writes inside ``transaction``
        self._depth = 0
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        """Deferred writes (``defer``): committed by the next ``flush`` or with the next immediate write."""
        self.conn: Any
        if self.postgres:
            from rltrader.data import pgbounds

            self.bounds = bounds or pgbounds.PgBounds()
            self.conn = pgbounds.connect(text, self.bounds, "trader journal", autocommit=True)
            serial = "BIGSERIAL PRIMARY KEY"
        else:
            path = Path(text.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.conn.execute("PRAGMA busy_timeout=5000")
            serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
        for stmt in _SCHEMA.format(serial=serial).split(";"):
            if stmt.strip():
                self._run(stmt)

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """Execute one statement; on PostgreSQL a tripped bound becomes a StoreError naming the table."""
        if not self.postgres:
            return self.conn.execute(sql, args)
        import psycopg

        try:
            return self.conn.execute(sql, args)
        except psycopg.Error as exc:
            from rltrader.data.pgbounds import bound_error, table_of

            verb = sql.split(None, 1)[0].upper()
            err = bound_error(exc, self.bounds, f"trader journal {verb} on {table_of(sql)}",
                              write=verb != "SELECT")
            if err is None:
                raise
            raise err from exc

    # -- plumbing -----------------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> None:
        self._write(sql, args)

    def _write(self, sql: str, args: Sequence[Any] = ()) -> int:
        """An immediate write (committed when the call returns, or with the enclosing ``transaction``); deferred
        rows still waiting are committed with it, before it, in one transaction — the journal's order on disk is
        the order of the calls. Returns the row count."""
        with self._lock:
            if self._pending and not self._depth:
                with self.transaction():
                    return int(self._run(self._sql(sql), tuple(args)).rowcount)
            return int(self._run(self._sql(sql), tuple(args)).rowcount)

    def defer(self, sql: str, args: Sequence[Any]) -> None:
        """A write that need not be on disk before anything happens (a decision row, an equity mark): kept in
        memory and committed by ``flush`` (the trader calls it between bars) or together with the next
        immediate write (an order's intent), whichever comes first. A crash loses at most the rows since the
        last commit, which a restarted trader recomputes."""
        with self._lock:
            self._pending.append((self._sql(sql), tuple(args)))

    def flush(self) -> None:
        """Commit the deferred writes (one transaction)."""
        with self._lock:
            if self._pending and not self._depth:
                with self.transaction():
                    pass

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for sql, args in pending:
            self._run(sql, args)

    def checkpoint(self) -> None:
        """SQLite: copy the WAL back into the database now (a passive checkpoint, between bars), instead of
        inside whichever commit crosses the auto-checkpoint size (``hold_checkpoints``)."""
        if not self.postgres:
            with self._lock:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def hold_checkpoints(self) -> None:
        """No automatic WAL checkpoint inside this connection's commits (the trader checkpoints between bars);
        a checkpoint with its fsync inside an order's intent commit would be the per-bar latency's tail."""
        if not self.postgres:
            with self._lock:
                self.conn.execute("PRAGMA wal_autocheckpoint=0")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.flush()  # this connection reads what it wrote
        with self._lock:
            cur = self._run(self._sql(sql), tuple(args))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Several writes committed together (a fill and its order's status change); nested uses join the
        outermost transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                if self.postgres:
                    with self.conn.transaction():
                        self._drain()
                        yield
                else:
                    self.conn.execute("BEGIN IMMEDIATE")
                    try:
                        self._drain()
                        yield
                    except BaseException:
                        self.conn.execute("ROLLBACK")
                        raise
                    self.conn.execute("COMMIT")
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock:
            self.flush()
            self.conn.close()

    # -- writes -------------------------------------------------------------------------------------------
    def start_session(self, session_id: str, *, mode: str, model: str, model_version: str | None,
                      symbols: Sequence[str], params: dict[str, Any]) -> None:
        self._exec("INSERT INTO trade_sessions (session_id, mode, model, model_version, symbols, params, started_at)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO NOTHING",
                   (session_id, mode, model, model_version, ",".join(symbols), json.dumps(params, default=str),
                    time.time()))

    def end_session(self, session_id: str, summary: dict[str, Any]) -> None:
        self._exec("UPDATE trade_sessions SET ended_at = ?, summary = ? WHERE session_id = ?",
                   (time.time(), json.dumps(summary, default=str), session_id))

    def set_model_version(self, session_id: str, version: str | None, model: str) -> None:
        """A reload pinned another model version (recorded; decisions carry their version too)."""
        self._exec("UPDATE trade_sessions SET model = ?, model_version = ? WHERE session_id = ?",
                   (model, version, session_id))

    def record_decision(self, session_id: str, symbol: str, bar_time: int, action: int, action_name: str,
                        scores: Sequence[float] | None, target: float | None, position: float, reason: str,
                        model_version: str | None = None, *, deferred: bool = False) -> bool:
        """Insert a bar's decision; False when that bar was already decided (nothing is overwritten).
        ``deferred``: committed later (``defer``; the result is then always True)."""
        sql = ("INSERT INTO decisions (session_id, symbol, bar_time, action, action_name, scores, target, position,"
               " reason, model_version, written_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
               " ON CONFLICT (session_id, symbol, bar_time) DO NOTHING")
        args = (session_id, symbol, int(bar_time), int(action), action_name,
                None if scores is None else json.dumps([float(x) for x in scores]),
                None if target is None else float(target), float(position), reason, model_version, time.time())
        if deferred:
            self.defer(sql, args)
            return True
        return bool(self._write(sql, args))

    def record_order(self, session_id: str, symbol: str, bar_time: int, client_order_id: str, qty: float,
                     ref_price: float, reason: str, status: str = "new") -> bool:
        """Record an order before it is sent; False if that client order id exists already (a replayed bar)."""
        now = time.time()
        sql = ("INSERT INTO orders (session_id, symbol, bar_time, client_order_id, qty, ref_price, status, reason,"
               " written_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
               " ON CONFLICT (client_order_id) DO NOTHING")
        return bool(self._write(sql, (session_id, symbol, int(bar_time), client_order_id, float(qty),
                                      float(ref_price), status, reason, now, now)))

    def update_order(self, client_order_id: str, status: str, *, exchange_order_id: str | None = None,
                     detail: str | None = None, qty: float | None = None) -> None:
        self._exec("UPDATE orders SET status = ?, exchange_order_id = COALESCE(?, exchange_order_id),"
                   " detail = COALESCE(?, detail), qty = COALESCE(?, qty), updated_at = ? WHERE client_order_id = ?",
                   (status, exchange_order_id, detail, None if qty is None else float(qty), time.time(),
                    client_order_id))

    # -- the risk engine's persisted state and the operator's commands --------------------------------------
    def kv_get(self, key: str) -> Any:
        entry = self.kv_entry(key)
        return None if entry is None else entry[0]

    def kv_entry(self, key: str) -> tuple[Any, float] | None:
        """(value, when it was written) of a key; None when never written."""
        rows = self._query("SELECT value, updated_at FROM risk_kv WHERE key = ?", (key,))
        return (json.loads(rows[0]["value"]), float(rows[0]["updated_at"])) if rows else None

    def kv_set(self, key: str, value: Any) -> None:
        self._exec("INSERT INTO risk_kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                   " value = excluded.value, updated_at = excluded.updated_at",
                   (key, json.dumps(value, default=str), time.time()))

    def record_risk_event(self, state_from: str, state_to: str, reason: str, numbers: dict[str, Any]) -> None:
        self._exec("INSERT INTO risk_events (at, state_from, state_to, reason, numbers) VALUES (?, ?, ?, ?, ?)",
                   (time.time(), state_from, state_to, reason, json.dumps(numbers, default=str)))

    def risk_events(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM risk_events ORDER BY id")
        for r in rows:
            r["numbers"] = json.loads(r["numbers"]) if r["numbers"] else {}
        return rows

    def open_orders(self, modes: Sequence[str] = ("testnet", "live")) -> list[dict[str, Any]]:
        """Every journaled order (of sessions in ``modes``) whose outcome is not known: ``new`` (intent written,
        maybe sent), ``unknown`` (sent, no answer), ``sent`` (accepted, no fill yet). Recovery resolves each
        against the exchange before trading."""
        marks = ", ".join("?" for _ in modes)
        return self._query("SELECT o.* FROM orders o JOIN trade_sessions s ON o.session_id = s.session_id"
                           f" WHERE o.status IN ('new', 'unknown', 'sent') AND s.mode IN ({marks}) ORDER BY o.id",
                           tuple(modes))

    def order(self, client_order_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM orders WHERE client_order_id = ?", (client_order_id,))
        return rows[0] if rows else None

    def journal_positions(self, modes: Sequence[str] = ("testnet", "live")) -> dict[str, float]:
        """Per symbol, the position the journal's fills add up to over every session in ``modes`` (the exchange
        account's position, when this trader is the account's only user)."""
        marks = ", ".join("?" for _ in modes)
        rows = self._query("SELECT f.symbol, SUM(f.qty) AS q FROM fills f JOIN trade_sessions s ON"
                           f" f.session_id = s.session_id WHERE s.mode IN ({marks}) AND f.kind <> 'seed'"
                           " GROUP BY f.symbol",
                           tuple(modes))
        return {r["symbol"]: float(r["q"] or 0.0) for r in rows}

    def record_fill(self, session_id: str, symbol: str, client_order_id: str | None, time_us: int, kind: str,
                    qty: float, price: float, fee: float, slippage: float, realized: float,
                    position_after: float) -> None:
        self._exec("INSERT INTO fills (session_id, symbol, client_order_id, time, kind, qty, price, fee, slippage,"
                   " realized, position_after, written_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (session_id, symbol, client_order_id, int(time_us), kind, float(qty), float(price), float(fee),
                    float(slippage), float(realized), float(position_after), time.time()))

    def record_mark(self, session_id: str, symbol: str, bar_time: int, equity: float, position: float,
                    price: float, *, deferred: bool = False) -> None:
        sql = ("INSERT INTO marks (session_id, symbol, bar_time, equity, position, price) VALUES (?, ?, ?, ?, ?, ?)"
               " ON CONFLICT (session_id, symbol, bar_time) DO UPDATE SET equity = excluded.equity,"
               " position = excluded.position, price = excluded.price")
        args = (session_id, symbol, int(bar_time), float(equity), float(position), float(price))
        if deferred:
            self.defer(sql, args)
        else:
            self._exec(sql, args)

    # -- queries ------------------------------------------------------------------------------------------
    def unfinished_session(self, mode: str, symbols: Sequence[str]) -> str | None:
        """The latest session of ``mode`` on these symbols that never ended (its trader was killed): a restart
        resumes it, so its bars keep their client order ids and a recomputed bar sends nothing new."""
        rows = self._query("SELECT session_id FROM trade_sessions WHERE mode = ? AND symbols = ? AND ended_at IS NULL"
                           " ORDER BY started_at DESC LIMIT 1", (mode, ",".join(symbols)))
        return str(rows[0]["session_id"]) if rows else None

    def latest_session(self) -> str | None:
        rows = self._query("SELECT session_id FROM trade_sessions ORDER BY started_at DESC LIMIT 1")
        return str(rows[0]["session_id"]) if rows else None

    def _session(self, session_id: str | None) -> str:
        sid = session_id or self.latest_session()
        if sid is None:
            raise ConfigError(f"{self.url}: no trading session recorded yet (run `rltrader trade` first)")
        return sid

    def sessions(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM trade_sessions ORDER BY started_at")

    def decisions(self, session_id: str | None = None, symbol: str | None = None) -> list[dict[str, Any]]:
        sid = self._session(session_id)
        rows = self._query("SELECT * FROM decisions WHERE session_id = ? AND (CAST(? AS TEXT) IS NULL OR symbol = ?)"
                           " ORDER BY symbol, bar_time", (sid, symbol, symbol))
        for r in rows:
            r["scores"] = None if r["scores"] is None else json.loads(r["scores"])
        return rows

    def orders(self, session_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sid = self._session(session_id)
        sql = "SELECT * FROM orders WHERE session_id = ? ORDER BY bar_time, symbol"
        rows = self._query(sql, (sid,))
        return rows[-limit:] if limit else rows

    def fills(self, session_id: str | None = None) -> list[dict[str, Any]]:
        sid = self._session(session_id)
        return self._query("SELECT * FROM fills WHERE session_id = ? ORDER BY symbol, time, id", (sid,))

    def order_fills(self, session_id: str, client_order_id: str) -> list[dict[str, Any]]:
        """The journaled fills of one order (a resumed session books an order that filled before the restart)."""
        return self._query("SELECT * FROM fills WHERE session_id = ? AND client_order_id = ? ORDER BY id",
                           (session_id, client_order_id))

    def decision_outcomes(self, session_id: str, symbol: str, through: int | None = None) -> list[dict[str, Any]]:
        """bar_time, action, target and reason of a symbol's decisions (up to bar ``through``), in bar order,
        without the scores: what a resumed trader rebuilds the backtest filters' state from."""
        return self._query("SELECT bar_time, action, target, reason FROM decisions WHERE session_id = ? AND symbol = ?"
                           " AND bar_time <= ? ORDER BY bar_time",
                           (session_id, symbol, (1 << 62) if through is None else int(through)))

    def marks(self, session_id: str | None = None, symbol: str | None = None) -> list[dict[str, Any]]:
        """Every bar's equity mark of a session (of one ``symbol`` when given), by symbol and bar time."""
        sid = self._session(session_id)
        if symbol is not None:
            return self._query("SELECT * FROM marks WHERE session_id = ? AND symbol = ? ORDER BY bar_time",
                               (sid, symbol))
        return self._query("SELECT * FROM marks WHERE session_id = ? ORDER BY symbol, bar_time", (sid,))

    def daily_pnl(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Per symbol and UTC day (of the bar's open time): the last equity mark of the day, its change over the
        previous day's last mark (the session's starting equity on its first day), fills and fees."""
        sid = self._session(session_id)
        start = self._query("SELECT params FROM trade_sessions WHERE session_id = ?", (sid,))
        cash0 = float(json.loads(start[0]["params"]).get("initial_cash", 0.0)) if start else 0.0
        per_day = f"bar_time / {DAY_US}"  # a literal: PostgreSQL matches GROUP BY expressions textually
        rows = self._query(
            f"SELECT m.symbol, m.{per_day} AS day, m.equity FROM marks m JOIN ("
            f"  SELECT symbol, {per_day} AS day, MAX(bar_time) AS last FROM marks WHERE session_id = ?"
            f"  GROUP BY symbol, {per_day}) d ON m.symbol = d.symbol AND m.bar_time = d.last"
            " WHERE m.session_id = ? ORDER BY m.symbol, day", (sid, sid))
        fees = self._query(f"SELECT symbol, time / {DAY_US} AS day, COUNT(*) AS fills, SUM(fee) AS fees FROM fills"
                           f" WHERE session_id = ? GROUP BY symbol, time / {DAY_US}", (sid,))
        by_key = {(f["symbol"], int(f["day"])): f for f in fees}
        out: list[dict[str, Any]] = []
        prev: dict[str, float] = {}
        for r in rows:
            sym, day, eq = r["symbol"], int(r["day"]), float(r["equity"])
            f = by_key.get((sym, day), {})
            out.append({"symbol": sym, "day": time.strftime("%Y-%m-%d", time.gmtime(day * 86_400)), "equity": eq,
                        "pnl": eq - prev.get(sym, cash0), "fills": int(f.get("fills") or 0),
                        "fees": float(f.get("fees") or 0.0)})
            prev[sym] = eq
        return out

    def status(self, session_id: str | None = None) -> dict[str, Any]:
        """The session, and per symbol its last mark, decision and counts."""
        sid = self._session(session_id)
        sess = self._query("SELECT * FROM trade_sessions WHERE session_id = ?", (sid,))[0]
        per: dict[str, dict[str, Any]] = {}
        for m in self._query("SELECT m.* FROM marks m JOIN (SELECT symbol, MAX(bar_time) AS last FROM marks"
                             " WHERE session_id = ? GROUP BY symbol) d ON m.symbol = d.symbol AND m.bar_time = d.last"
                             " WHERE m.session_id = ?", (sid, sid)):
            per[m["symbol"]] = {"equity": m["equity"], "position": m["position"], "price": m["price"],
                                "bar_time": m["bar_time"]}
        for c in self._query("SELECT symbol, COUNT(*) AS n FROM orders WHERE session_id = ? GROUP BY symbol", (sid,)):
            per.setdefault(c["symbol"], {})["orders"] = c["n"]
        for c in self._query("SELECT symbol, COUNT(*) AS n, SUM(fee) AS fees FROM fills WHERE session_id = ?"
                             " GROUP BY symbol", (sid,)):
            per.setdefault(c["symbol"], {}).update(fills=c["n"], fees=c["fees"])
        sess["params"] = json.loads(sess["params"])
        sess["summary"] = None if sess["summary"] is None else json.loads(sess["summary"])
        return {"session": sess, "symbols": per}


def open_records(url: str | Path | None, data_dir: Path, *, durable: bool = True,
                 bounds: PgBounds | None = None) -> Records:
    """``trader.records_url`` (null → ``<data.dir>/trader.db``); ``durable``: fsync every commit (the exchange
    modes' write-ahead journal; paper fills nothing outside the process and may skip the fsync); ``bounds``: the
    PostgreSQL journal's bounds (``settings.postgres.bounds()``; None → the defaults)."""
    return Records(url if url else data_dir / "trader.db", durable=durable, bounds=bounds)
