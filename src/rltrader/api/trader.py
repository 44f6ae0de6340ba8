"""The trader's status and control endpoints, its Prometheus metrics and its live page.

Everything is read from (and every command written to) the trader's records DB, never from the trader object:
the same endpoints work in the trader's own process (``rltrader trade --api-port``) and in ``rltrader api serve``
on another host pointed at the same records (``trader.records_url``). A POST writes the same command row as
``rltrader trade halt|…`` (:mod:`rltrader.live.control`); the running trader applies it between bars and the
state shows in ``/status``.

Auth is the app's bearer token (:mod:`rltrader.api.auth`) on every endpoint but ``/health`` (a liveness probe
for compose/Kubernetes) and the page itself (a static document that asks for the token and sends it with each
request; it holds no data).
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from rltrader.api.auth import require_token
from rltrader.live import control
from rltrader.live.records import Records

public = APIRouter(tags=["trader"])
router = APIRouter(tags=["trader"], dependencies=[Depends(require_token)])
_open_lock = threading.Lock()


def records_of(request: Request) -> Records:
    """The app's records DB, opened on first use (``app.state.trader_records_url``)."""
    state = request.app.state
    with _open_lock:
        rec: Records | None = getattr(state, "trader_records", None)
        if rec is None:
            url = getattr(state, "trader_records_url", None)
            if url is None:
                from rltrader.config import load_settings
                from rltrader.live.records import open_records

                settings = load_settings()
                rec = open_records(settings.trader.records_url, settings.data.dir, bounds=settings.postgres.bounds())
            else:
                rec = Records(url)
            state.trader_records = rec
        return rec


RecordsDep = Annotated[Records, Depends(records_of)]


class Health(BaseModel):
    status: str
    time: float


class SymbolStatus(BaseModel):
    position: float | None = None
    equity: float | None = None
    price: float | None = None
    last_bar: int | None = Field(default=None, description="open time of the last handled bar, µs UTC")
    data_lag_s: float | None = Field(default=None, description="now − that bar's close")
    orders: int = 0
    fills: int = 0
    fees: float = 0.0


class Status(BaseModel):
    state: str = Field(description="ACTIVE | REDUCING | HALTED")
    state_reason: str
    session_id: str | None
    mode: str | None
    model: str | None
    model_version: str | None
    running: bool = Field(description="a session is open (started, not ended)")
    symbols: dict[str, SymbolStatus]
    data_lag_s: float | None
    pending_intents: list[dict[str, Any]] = Field(description="orders recorded but not yet filled/refused")
    pending_commands: list[dict[str, Any]]


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


class CommandOut(BaseModel):
    id: int
    command: str
    issued_at: float
    taken_at: float | None = Field(description="state changes: at once; flatten/reload/reconcile: by the running "
                                               "trader between bars (null until then)")
    result: str | None
    state: str = Field(description="the state after the command was written")


class Pnl(BaseModel):
    daily: list[dict[str, Any]]
    per_symbol: dict[str, dict[str, float]]
    total: dict[str, float]


def _session(rec: Records) -> str | None:
    return rec.latest_session()


def _status(rec: Records) -> Status:
    st = control.state_of(rec)
    sid = _session(rec)
    base = {"state": st["state"], "state_reason": st["reason"], "pending_commands": control.pending(rec)}
    if sid is None:
        return Status(session_id=None, mode=None, model=None, model_version=None, running=False, symbols={},
                      data_lag_s=None, pending_intents=[], **base)
    s = rec.status(sid)
    sess, now = s["session"], time.time()
    syms: dict[str, SymbolStatus] = {}
    for sym in str(sess["symbols"]).split(","):
        v = s["symbols"].get(sym, {})
        bt = v.get("bar_time")
        syms[sym] = SymbolStatus(position=v.get("position"), equity=v.get("equity"), price=v.get("price"),
                                 last_bar=bt, data_lag_s=None if bt is None else now - (bt / 1e6 + 60.0),
                                 orders=int(v.get("orders") or 0), fills=int(v.get("fills") or 0),
                                 fees=float(v.get("fees") or 0.0))
    lags = [v.data_lag_s for v in syms.values() if v.data_lag_s is not None]
    intents = [o for o in rec.orders(sid) if o["status"] in ("new", "sent")]
    return Status(session_id=sid, mode=sess["mode"], model=sess["model"], model_version=sess["model_version"],
                  running=sess["ended_at"] is None, symbols=syms, data_lag_s=max(lags) if lags else None,
                  pending_intents=intents, **base)


@public.get("/health", response_model=Health)
def health() -> Health:
    """Liveness (no token): the API answers."""
    return Health(status="ok", time=time.time())


@router.get("/status", response_model=Status)
def status_(rec: RecordsDep) -> Status:
    """State, model version, positions, last bar and data lag per symbol, pending intents and commands."""
    return _status(rec)


@router.get("/orders", response_model=list[dict[str, Any]])
def orders(rec: RecordsDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 500) -> list[dict[str, Any]]:
    """The latest session's orders (newest last), with status and reason."""
    sid = _session(rec)
    return [] if sid is None else rec.orders(sid, limit=limit)


@router.get("/fills", response_model=list[dict[str, Any]])
def fills(rec: RecordsDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 500) -> list[dict[str, Any]]:
    """The latest session's fills (by symbol, then time)."""
    sid = _session(rec)
    return [] if sid is None else rec.fills(sid)[-limit:]


@router.get("/equity", response_model=list[dict[str, Any]])
def equity(rec: RecordsDep, symbol: Annotated[str | None, Query(max_length=30)] = None,
           limit: Annotated[int, Query(ge=1, le=100_000)] = 5000) -> list[dict[str, Any]]:
    """Equity marks per bar (the page's equity, drawdown and price chart)."""
    sid = _session(rec)
    if sid is None:
        return []
    rows = rec.marks(sid, symbol)
    return rows[-limit:]


@router.get("/pnl", response_model=Pnl)
def pnl(rec: RecordsDep) -> Pnl:
    """Daily PnL per symbol, and totals (per symbol and overall) since the session started."""
    sid = _session(rec)
    if sid is None:
        return Pnl(daily=[], per_symbol={}, total={"pnl": 0.0, "fees": 0.0, "fills": 0.0})
    daily = rec.daily_pnl(sid)
    per: dict[str, dict[str, float]] = {}
    for d in daily:
        p = per.setdefault(d["symbol"], {"pnl": 0.0, "fees": 0.0, "fills": 0.0, "equity": 0.0})
        p["pnl"] += d["pnl"]
        p["fees"] += d["fees"]
        p["fills"] += d["fills"]
        p["equity"] = d["equity"]
    total = {k: float(sum(p[k] for p in per.values())) for k in ("pnl", "fees", "fills")}
    return Pnl(daily=daily, per_symbol=per, total=total)


def _command(name: str) -> Any:
    def handler(rec: RecordsDep, body: Annotated[CommandIn | None, Body()] = None) -> CommandOut:
        row = control.issue(rec, name, body.reason if body is not None else "")
        return CommandOut(id=int(row["id"]), command=row["command"], issued_at=float(row["issued_at"]),
                          taken_at=row["taken_at"], result=row["result"], state=control.state_of(rec)["state"])

    handler.__name__ = f"{name}_command"
    handler.__doc__ = (f"`{name}`, the same as `rltrader trade {name}`: "
                       + ("queued, taken by the running trader between bars." if name in control.QUEUED else
                          "the state changes at once (checked before every order)."))
    return handler


for _name in control.COMMANDS:
    router.add_api_route(f"/{_name}", _command(_name), methods=["POST"], response_model=CommandOut,
                         status_code=status.HTTP_202_ACCEPTED, summary=f"{_name}")


# -- metrics ---------------------------------------------------------------------------------------------
def metrics_text(rec: Records) -> bytes:
    """Prometheus exposition of the latest session, read from the records (so any API process can serve it)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self) -> Any:
            st = control.state_of(rec)
            g = GaugeMetricFamily("rltrader_state", "1 for the trader's current state", labels=["state"])
            for s in control.STATES:
                g.add_metric([s], 1.0 if st["state"] == s else 0.0)
            yield g
            sid = _session(rec)
            dec = CounterMetricFamily("rltrader_decisions", "decisions recorded this session")
            orders = CounterMetricFamily("rltrader_orders", "orders this session by result", labels=["status"])
            rejects = CounterMetricFamily("rltrader_order_rejects", "orders blocked or rejected, by reason",
                                          labels=["reason"])
            eq = GaugeMetricFamily("rltrader_equity", "equity at the last mark", labels=["symbol"])
            pos = GaugeMetricFamily("rltrader_position", "position at the last mark", labels=["symbol"])
            lag = GaugeMetricFamily("rltrader_data_lag_seconds", "now minus the last handled bar's close",
                                    labels=["symbol"])
            if sid is not None:
                n = rec._query("SELECT COUNT(*) AS n FROM decisions WHERE session_id = ?", (sid,))
                dec.add_metric([], float(n[0]["n"]))
                counts: dict[str, int] = {}
                reasons: dict[str, int] = {}
                for o in rec.orders(sid):
                    counts[o["status"]] = counts.get(o["status"], 0) + 1
                    if o["status"] in ("blocked", "rejected"):
                        why = str(o["detail"] or o["status"]).split(":")[0][:60]
                        reasons[why] = reasons.get(why, 0) + 1
                for k, v in sorted(counts.items()):
                    orders.add_metric([k], float(v))
                for k, v in sorted(reasons.items()):
                    rejects.add_metric([k], float(v))
                now = time.time()
                for sym, v in rec.status(sid)["symbols"].items():
                    if v.get("bar_time") is not None:
                        eq.add_metric([sym], float(v["equity"]))
                        pos.add_metric([sym], float(v["position"]))
                        lag.add_metric([sym], now - (v["bar_time"] / 1e6 + 60.0))
            yield from (dec, orders, rejects, eq, pos, lag)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(reg)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(rec: RecordsDep) -> Response:
    """Prometheus text format: decisions, orders by result, rejects by reason, data lag, equity, state."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(metrics_text(rec), media_type=CONTENT_TYPE_LATEST)


# -- the page --------------------------------------------------------------------------------------------
@public.get("/live", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
def live_page() -> HTMLResponse:
    """The live page (no external resources; asks for the token, polls the endpoints above)."""
    html = resources.files("rltrader.api").joinpath("static/trader.html").read_text(encoding="utf-8")
    return HTMLResponse(html)

