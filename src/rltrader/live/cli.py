"""``rltrader trade …``: run the trader, and query its records (``status``, ``orders``, ``decisions``, ``pnl``)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from rltrader.config import load_settings
from rltrader.errors import RLTraderError

trade_app = typer.Typer(help="The live trader: paper (kernel fills) or testnet (exchange fills); its records.")
out = Console()
err = Console(stderr=True)
RecordsOpt = Annotated[str | None, typer.Option("--records", help="Records DB (default trader.records_url or "
                                                "<data.dir>/trader.db)")]
SessionOpt = Annotated[str | None, typer.Option("--session", help="Session id (default: the latest)")]


def _fail(msg: str) -> NoReturn:
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _records(url: str | None) -> Any:
    from rltrader.live.records import open_records

    settings = load_settings()
    return open_records(url or settings.trader.records_url, settings.data.dir, bounds=settings.postgres.bounds())


@trade_app.callback(invoke_without_command=True)
def trade_cmd(
    ctx: typer.Context,
    mode: Annotated[str | None, typer.Option(help="paper | testnet | live (default trader.mode)")] = None,
    symbols: Annotated[str | None, typer.Option(help="Comma-separated, e.g. NEARUSDT,FILUSDT")] = None,
    model: Annotated[str | None, typer.Option(help="models:/rltrader@champion (default), a run id, a .pt file or a "
                                              "baseline name (sma_cross, …)")] = None,
    rest_base: Annotated[str | None, typer.Option(help="REST root of a Binance-compatible server (replay)")] = None,
    ws_base: Annotated[str | None, typer.Option(help="Websocket root of the same")] = None,
    until: Annotated[str | None, typer.Option(help="Stop at this bar open time (ISO, UTC), flat, as a backtest's "
                                              "range end")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after N seconds")] = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Skip the MLflow session summary")] = False,
    real_money: Annotated[bool, typer.Option("--i-understand-this-trades-real-money",
                                             help="Needed (with the keys in the env) by --mode live")] = False,
    api_port: Annotated[int | None, typer.Option(help="Serve the status/control API and the live page (/live) on "
                                                 "this port, in a thread beside the trader")] = None,
    api_host: Annotated[str, typer.Option(help="Address for --api-port; beyond loopback only with "
                                          "RLTRADER_API_TOKEN set")] = "127.0.0.1",
) -> None:
    """Trade the model on closed 1m bars (no subcommand), or query the records (subcommands)."""
    if ctx.invoked_subcommand is not None:
        return
    from rltrader.live.runner import run_trader

    logging.getLogger("rltrader").setLevel(logging.INFO)
    logging.getLogger("binance.ws").setLevel(logging.CRITICAL)
    try:
        settings = load_settings()
        end = datetime.fromisoformat(until.replace("Z", "+00:00")) if until else None
        summary = run_trader(settings, mode=mode, symbols=symbols.split(",") if symbols else None, model=model,
                             rest_base=rest_base, ws_base=ws_base, until=end, max_seconds=duration,
                             mlflow_summary=not no_mlflow, api_port=api_port, api_host=api_host,
                             confirm_live=real_money)
    except (RLTraderError, ValueError) as exc:
        _fail(str(exc))
    out.print_json(json.dumps(summary, default=str))


@trade_app.command("status")
def status_cmd(records: RecordsOpt = None, session: SessionOpt = None,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The session (model, version, mode) and per symbol its equity, position, orders and fills."""
    try:
        st = _records(records).status(session)
    except RLTraderError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(st, default=str))
        return
    from rltrader.live.control import state_of

    s = st["session"]
    state = state_of(_records(records))
    out.print(f"session {s['session_id']} ({s['mode']}) model {s['model']} version {s['model_version']}")
    out.print(f"state {state['state']} ({state['reason']})", highlight=False)
    table = Table("symbol", "equity", "position", "orders", "fills", "fees")
    for sym, v in sorted(st["symbols"].items()):
        table.add_row(sym, f"{v.get('equity', 0):.4f}", f"{v.get('position', 0):g}", str(v.get("orders", 0)),
                      str(v.get("fills", 0)), f"{v.get('fees') or 0:.4f}")
    out.print(table)


@trade_app.command("orders")
def orders_cmd(records: RecordsOpt = None, session: SessionOpt = None, limit: int = 50,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The session's orders (newest last), with their status."""
    try:
        rows = _records(records).orders(session, limit=limit)
    except RLTraderError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("bar", "symbol", "qty", "ref price", "status", "reason", "client order id")
    for r in rows:
        table.add_row(datetime.fromtimestamp(r["bar_time"] / 1e6, UTC).isoformat(), r["symbol"], f"{r['qty']:g}",
                      f"{r['ref_price']:g}", r["status"], r["reason"], r["client_order_id"])
    out.print(table)


@trade_app.command("pnl")
def pnl_cmd(records: RecordsOpt = None, session: SessionOpt = None,
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Daily PnL per symbol (UTC days)."""
    try:
        rows = _records(records).daily_pnl(session)
    except RLTraderError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("day", "symbol", "equity", "pnl", "fills", "fees")
    for r in rows:
        table.add_row(r["day"], r["symbol"], f"{r['equity']:.4f}", f"{r['pnl']:+.4f}", str(r["fills"]),
                      f"{r['fees']:.4f}")
    out.print(table)



def _control(command: str, reason: str, records: str | None) -> None:
    from rltrader.live import control

    try:
        row = control.issue(_records(records), command, reason)
    except RLTraderError as exc:
        _fail(str(exc))
    out.print(f"{command} (#{row['id']}): {row['result']}", highlight=False)


ReasonOpt = Annotated[str, typer.Option(help="Why (recorded with the command)")]


@trade_app.command("halt")
def halt_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """HALTED: send nothing until `resume`."""
    _control("halt", reason, records)


@trade_app.command("resume")
def resume_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """ACTIVE again after halt/stop/reduce/flatten."""
    _control("resume", reason, records)


@trade_app.command("flatten")
def flatten_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """Queued: the running trader closes every position at its next bar, then REDUCING until `resume`."""
    _control("flatten", reason, records)


@trade_app.command("stop")
def stop_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """No new entries (REDUCING): only orders that bring a position closer to flat are sent."""
    _control("stop", reason, records)


@trade_app.command("start")
def start_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """ACTIVE: new entries allowed."""
    _control("start", reason, records)


@trade_app.command("reduce")
def reduce_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """REDUCING: only position-reducing orders are sent."""
    _control("reduce", reason, records)


@trade_app.command("reload")
def reload_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """Queued: the running trader re-resolves its model (the `champion` alias) between bars."""
    _control("reload", reason, records)


@trade_app.command("reconcile")
def reconcile_cmd(reason: ReasonOpt = "", records: RecordsOpt = None) -> None:
    """Queued: the running trader compares its positions with its recorded fills (result in the command's row)."""
    _control("reconcile", reason, records)
