"""Where a study lives and how many workers share it without losing or over-running trials.

* Storage: sqlite under ``data/`` by default (one machine, a few processes); a PostgreSQL URL for workers on many
  machines. Both are Optuna ``RDBStorage`` with a heartbeat: a running trial whose worker stops beating for
  ``tune.grace_seconds`` (killed, machine lost) is marked failed and re-enqueued with the same parameters by
  ``RetryHeartbeatStaleTrialCallback`` (formerly ``RetryFailedTrialCallback``) — retried, not lost.
* Budget: ``--trials N`` means N finished trials in the study, however many workers join. Checking the count and
  asking for a trial happen under one lock shared by every worker of the study (a PostgreSQL advisory lock; a file
  lock beside a sqlite database), so two workers can never both take the N-th slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

try:  # Optuna ≥ 4.9 renamed it (the old name is deprecated)
    from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryStale
except ImportError:  # pragma: no cover - older Optuna
    from optuna.storages import RetryFailedTrialCallback as RetryStale
from optuna.trial import TrialState

from rltrader.data.pgbounds import KEEPALIVES, PgBounds
from rltrader.errors import ConfigError, DataError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL of the study storage: ``postgresql://…`` gets the psycopg 3 driver (the one installed);
    None → ``sqlite:///<data_dir>/tune/optuna.db`` (folder created)."""
    if url is None:
        path = Path(data_dir) / "tune" / "optuna.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if url.startswith(("postgresql+", "sqlite:///", "mysql")):
        return url
    raise ConfigError(f"tune.storage: {url!r} is not a database URL (sqlite:///path or postgresql://user@host/db)")


def open_storage(url: str, heartbeat_seconds: int, grace_seconds: int, max_retry: int) -> RDBStorage:
    """RDBStorage with heartbeats; a stale trial is failed and retried up to ``max_retry`` times (same params)."""
    if grace_seconds <= heartbeat_seconds:
        raise ConfigError(f"tune.grace_seconds ({grace_seconds}) must exceed tune.heartbeat_seconds "
                          f"({heartbeat_seconds}), or live trials would be failed between two heartbeats")
    # PostgreSQL: the connect bound and keepalives of the store (no statement/lock bound: Optuna's own row locks
    # and long transactions are its business); SQLite: a 60 s busy wait
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": PgBounds().connect_timeout, **KEEPALIVES}
    elif url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    with quiet():
        return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds,
                          grace_period=grace_seconds,
                          heartbeat_stale_trial_callback=RetryStale(max_retry=max_retry))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna calls heartbeats experimental and warns that they are meant for ``Study.optimize``; workers here ask
    under the budget lock and beat themselves (:class:`Heartbeat`), which is what ``optimize`` does inside."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def load_study(name: str, storage: RDBStorage, **kwargs: Any) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError as exc:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise DataError(f"tune --join: no study {name!r} in {safe_url(storage.url)} (studies there: "
                        f"{', '.join(known) or 'none'})") from exc


def safe_url(url: str) -> str:
    """A storage URL fit for logs: any password replaced by ``***``."""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        cred, _, host = tail.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{head}{sep}{user}{':***' if ':' in cred else ''}@{host}"
    return url


@contextlib.contextmanager
def budget_lock(url: str, study: str) -> Iterator[None]:
    """Exclusive across every worker of ``study``: a PostgreSQL session advisory lock keyed by the study name, or
    an ``flock`` on ``<sqlite db>.lock``. Other databases get no lock (the budget may then overshoot by the
    number of workers minus one; documented, not hidden)."""
    if url.startswith("postgresql"):
        import psycopg

        key = zlib.crc32(f"rltrader-tune:{study}".encode()) - 2**31
        conninfo = "postgresql://" + url.split("://", 1)[1]
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=PgBounds().connect_timeout,
                             **KEEPALIVES) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return
    if url.startswith("sqlite:///"):
        lock = Path(url.removeprefix("sqlite:///") + ".lock")
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    yield


class Heartbeat:
    """Beats for one asked trial while its objective runs (``study.optimize`` does this itself; workers here ask
    under the budget lock, then run the trial, so they beat themselves through the storage's public API)."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
