"""Bounds on every PostgreSQL wait (market data store and trading journal), and the one error when one trips.

Without them a write could wait forever: libpq's connect has no timeout by default (psycopg then caps it at
130 s), a statement waits on a lock as long as the other session holds it (``LOCK TABLE``, a migration, a
``VACUUM FULL``), and a stalled server keeps a statement running. The stream ingester's writer thread retries a
failed write and then ends the run for the supervisor; a wait that never ends defeats that.

The bounds are set per connection, server side, through libpq's ``options`` (``-c statement_timeout=…
-c lock_timeout=…``): no extra round trip per connection, and they hold for every statement of the pool's and the
journal's connections, whatever code path issues it. The connect bound is libpq's ``connect_timeout``
(integer seconds, at least 2: libpq raises smaller values to 2, so we refuse them instead of silently
waiting longer than configured). Waiting for a connection from the store's pool is bounded by the pool's
``timeout``.

Defaults (``params.yaml`` ``postgres:``):

- ``connect_timeout_seconds: 10`` — a healthy server answers a connect in milliseconds, even across a region;
  10 s rides out a busy server without letting a dead or black-holed host stall a start for minutes.
- ``statement_timeout_seconds: 300`` — the longest statements are the store's bulk binary COPYs, split at
  ``COPY_STATEMENT_ROWS`` (4 M rows, ~2-4 s at the measured 1-2 M rows/s) so even a ~100 M-row month of aggTrades
  is many short statements, and the key scan before them (one index range scan per series and write, seconds for
  a month). 300 s is ~100x the nominal statement and still ends a wedged one within minutes.
- ``lock_timeout_seconds: 30`` — table locks are normally held for milliseconds; longer means another session
  holds ``ACCESS EXCLUSIVE`` (DDL, ``LOCK TABLE``, ``VACUUM FULL``, a migration). 30 s absorbs a quick migration,
  then the write fails (rolled back) and the caller's retry takes over. The store's per-series advisory lock is
  different: it waits for another *writer* of the same series, whose write may legitimately run a long COPY, so
  that one wait is bounded by ``statement_timeout_seconds`` instead.
- ``pool_timeout_seconds: 30`` — how long a store call waits for a free pooled connection (all busy, or the
  server unreachable and the pool reconnecting).

``0`` turns ``statement_timeout`` / ``lock_timeout`` off: PostgreSQL's own convention for these two settings,
kept for one-off operations (a huge backfill) that must not be cut. The connect and pool bounds have no "off".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from rltrader.errors import StoreError


@dataclass(frozen=True)
class PgBounds:
    """The bounds of one component's PostgreSQL connections (seconds; see the module docstring for defaults)."""

    connect_timeout: int = 10
    statement_timeout: float = 300.0
    lock_timeout: float = 30.0
    pool_timeout: float = 30.0

    def __post_init__(self) -> None:
        # The config validates these with the key names; this guards direct construction (tests, library use).
        if self.connect_timeout < 2 or int(self.connect_timeout) != self.connect_timeout:
            raise ValueError(f"connect_timeout {self.connect_timeout!r}: whole seconds >= 2 (libpq's minimum)")
        for name in ("statement_timeout", "lock_timeout"):
            v = getattr(self, name)
            if not (v == 0 or v >= 0.001) or not math.isfinite(v):
                raise ValueError(f"{name} {v!r}: 0 (off) or >= 0.001 s")
        if not self.pool_timeout > 0 or not math.isfinite(self.pool_timeout):
            raise ValueError(f"pool_timeout {self.pool_timeout!r}: > 0")

    def connect_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect(url, **kw)`` / the pool's ``kwargs``: the connect bound and the
        server-side statement/lock bounds, appended to any ``options`` the URL already carries (a keyword
        argument would replace it)."""
        own = f"-c statement_timeout={ms(self.statement_timeout)} -c lock_timeout={ms(self.lock_timeout)}"
        given = conninfo_to_dict(url).get("options")
        return {"connect_timeout": int(self.connect_timeout), "options": f"{given} {own}" if given else own,
                **KEEPALIVES}


KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
"""TCP keepalives on every connection: the server-side bounds cannot fire when the server's host is gone or the
network partitioned while we wait for a reply; the kernel's defaults notice that after 2 h, these after ~60 s of
silence. Probes go only while the connection is idle at the TCP level, and a busy server's kernel answers them,
so a long legitimate statement is never cut by them (a bound on sends, ``tcp_user_timeout``, is deliberately
not set: a server slow to drain a COPY would trip it)."""


def ms(seconds: float) -> int:
    """Seconds → PostgreSQL's integer milliseconds (a non-zero bound never rounds down to 0, which means off)."""
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


def fmt_s(seconds: float) -> str:
    return f"{seconds:g} s" if seconds else "off"


def where(url: str) -> str:
    """``host:port/dbname`` of a URL/conninfo, never its password or user (for error messages and logs)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "<unparsable PostgreSQL URL>"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def connect(url: str, bounds: PgBounds, what: str, **kw: Any) -> psycopg.Connection[Any]:
    """``psycopg.connect`` under ``bounds``; a refused, failed or timed-out connect becomes one StoreError naming
    ``what`` (the component), host, port and database, and the connect bound (never the password)."""
    try:
        return psycopg.connect(url, **bounds.connect_kwargs(url), **kw)
    except psycopg.OperationalError as exc:
        raise connect_error(url, bounds, what, exc) from None


def connect_error(url: str, bounds: PgBounds, what: str, exc: BaseException) -> StoreError:
    reason = _clean(str(exc), url)
    if isinstance(exc, psycopg.errors.ConnectionTimeout) or "timeout expired" in reason:
        reason = f"connect_timeout {fmt_s(bounds.connect_timeout)} exceeded (no answer from the server)"
    return StoreError(f"{what}: cannot connect to PostgreSQL at {where(url)}: {reason}")


def _clean(text: str, url: str) -> str:
    """One line of a driver message, with the password (if any) masked: libpq does not echo it, but be sure."""
    line = " ".join(text.split())
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    return line.replace(str(password), "***") if password else line


_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM|TABLE(?:\s+IF\s+NOT\s+EXISTS)?|ON)\s+\"?(\w+)", re.IGNORECASE)


def table_of(statement: str) -> str:
    """The first table a SQL statement names (for the journal's errors)."""
    m = _TABLE.search(statement)
    return m.group(1) if m else "?"


def bound_error(exc: BaseException, bounds: PgBounds, what: str, *, lock_wait: str = "",
                write: bool = True) -> StoreError | None:
    """The StoreError for ``exc`` when it is a tripped bound, else None (the caller re-raises ``exc``).

    ``what`` names the operation, table and series (``write_klines into kline_data (futures-um BTCUSDT 1m)``);
    ``lock_wait`` overrides the lock wording when the wait was for the series' advisory lock (bounded by the
    statement bound)."""
    if lock_wait and isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        bound = lock_wait  # the statement bound ended the wait (as statement or as lock timeout: both are set)
    elif isinstance(exc, psycopg.errors.LockNotAvailable):
        bound = f"lock_timeout {fmt_s(bounds.lock_timeout)} exceeded (another session holds a lock)"
    elif isinstance(exc, psycopg.errors.QueryCanceled):
        if "statement timeout" in str(exc):
            bound = f"statement_timeout {fmt_s(bounds.statement_timeout)} exceeded"
        else:
            bound = "statement cancelled by the server (" + " ".join(str(exc).split()) + ")"
    elif isinstance(exc, PoolTimeout):
        bound = (f"no connection from the pool within pool_timeout {fmt_s(bounds.pool_timeout)} "
                 "(server unreachable, or every pooled connection busy)")
    else:
        return None
    return StoreError(f"{what}: {bound}" + ("; rolled back, nothing stored" if write else ""))


@dataclass
class Site:
    """What a bounded block is doing, updated as it goes (the series being written, the lock being awaited)."""

    what: str
    write: bool = True
    lock_wait: str = ""


@contextmanager
def bounded(bounds: PgBounds, what: str, *, write: bool = True) -> Iterator[Site]:
    """Turn a tripped bound raised inside into :func:`bound_error`'s StoreError (other errors pass unchanged).
    Use it outside the transaction block, so the rollback has happened when the error is raised."""
    site = Site(what, write)
    try:
        yield site
    except (psycopg.Error, PoolTimeout) as exc:
        err = bound_error(exc, bounds, site.what, lock_wait=site.lock_wait, write=site.write)
        if err is None:
            raise
        raise err from exc
