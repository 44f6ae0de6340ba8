"""``rltrader`` command line. Thin: parse options, call the plain stage functions, print results.

Every error that is the user's to fix (bad input, bad parameter) is one line on stderr naming the file, row,
field or parameter, with exit code 1; nothing is half-written (the stage functions guarantee that).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from rltrader.agents import ALGORITHMS, TRAINED
from rltrader.config import Settings, load_settings
from rltrader.data.ingest import (
    archive_source,
    backfill,
    fill_gaps_from_archive,
    fill_gaps_from_rest,
    find_gaps,
    import_csv,
    range_bounds,
    run_ingest_stage,
)
from rltrader.data.schema import Market
from rltrader.data.store import Store, open_store
from rltrader.errors import RLTraderError

app = typer.Typer(help="Binance market data → features → RL agents → backtest → trading.", no_args_is_help=True)
data_app = typer.Typer(help="Market data: archive backfill, CSV import, gaps, stats, live stream.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
dataset_app = typer.Typer(help="Session datasets: causal features and train/val/test/backtest sessions.",
                          no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
api_app = typer.Typer(help="HTTP control API: REST triggers for the Prefect deployments.", no_args_is_help=True)
app.add_typer(api_app, name="api")
from rltrader.live.cli import trade_app  # noqa: E402  (the trader's commands live with the trader)

app.add_typer(trade_app, name="trade")
out = Console()
err = Console(stderr=True)

StoreOpt = Annotated[str | None, typer.Option("--store", help="Store URL (postgresql://… or parquet[://dir]); "
                                              "default from params/RLTRADER_DB_URL")]
ArchiveOpt = Annotated[str | None, typer.Option("--archive-base", help="Archive base URL or folder; default "
                                                "from params/RLTRADER_ARCHIVE_BASE")]
MarketOpt = Annotated[Market, typer.Option("--market", help="spot or futures-um")]


_VERBOSE = False  # -v: an error also shows its traceback (for a bug report); otherwise one line


def _fail(msg: str) -> NoReturn:
    if _VERBOSE and sys.exc_info()[0] is not None:
        err.print_exception()
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _context(store_url: str | None) -> Iterator[tuple[Settings, Store]]:
    try:
        settings = load_settings()
        store = open_store(store_url or settings.data.store_url, settings.data.dir, settings.postgres.bounds())
    except (RLTraderError, ValueError) as exc:
        _fail(str(exc))
    try:
        yield settings, store
    except RLTraderError as exc:
        _fail(str(exc))
    finally:
        store.close()


def _symbols(text: str) -> list[str]:
    return [s.strip().upper() for s in text.split(",") if s.strip()]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    global _VERBOSE
    _VERBOSE = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@data_app.command("backfill")
def backfill_cmd(
    market: MarketOpt,
    symbols: Annotated[str, typer.Option(help="Comma-separated, e.g. BTCUSDT,ETHUSDT")],
    start: Annotated[str, typer.Option(help="YYYY-MM or YYYY-MM-DD (inclusive)")],
    end: Annotated[str, typer.Option(help="YYYY-MM or YYYY-MM-DD (inclusive)")],
    interval: str = "1m",
    kind: Annotated[str, typer.Option(help="klines or aggTrades")] = "klines",
    skip_bad_rows: bool = False,
    store: StoreOpt = None,
    archive_base: ArchiveOpt = None,
) -> None:
    """Load Binance archive files (monthly preferred, daily for the rest) into the store."""
    if kind not in ("klines", "aggTrades"):
        _fail(f"--kind {kind!r}: expected klines or aggTrades")
    with _context(store) as (settings, st):
        report = backfill(st, archive_source(settings, archive_base), market, _symbols(symbols), start, end,
                          interval=interval, kind=kind, skip_bad_rows=skip_bad_rows,  # type: ignore[arg-type]
                          progress=sys.stderr.isatty())
        out.print_json(json.dumps(report.as_dict()))


@data_app.command("ingest")
def ingest_stage_cmd(
    metrics: Annotated[Path, typer.Option(help="Where to write the stage's metrics JSON")] = Path(
        "reports/ingest.json"),
) -> None:
    """The DVC `ingest` stage: backfill what params.yaml's `ingest` section names."""
    with _context(None) as (settings, st):
        report = run_ingest_stage(settings, st, metrics, progress=sys.stderr.isatty())
        out.print_json(json.dumps({k: v for k, v in report.items() if k != "gaps"}))


@data_app.command("import-csv")
def import_csv_cmd(
    path: Path,
    symbol: Annotated[str, typer.Option()],
    market: MarketOpt,
    tz: Annotated[str, typer.Option(help="Time zone of the time column, stated explicitly (e.g. UTC)")],
    time_col: Annotated[str, typer.Option(help="Header of the candle open-time column")],
    interval: str = "1m",
    time_format: Annotated[str | None, typer.Option(help="strftime format, e.g. '%Y-%m-%d %H:%M:%S'")] = None,
    column: Annotated[list[str] | None, typer.Option(help="field=header mapping, repeatable "
                                                     "(fields: open high low close volume quote_volume trades "
                                                     "taker_buy_volume taker_buy_quote_volume)")] = None,
    skip_bad_rows: bool = False,
    store: StoreOpt = None,
) -> None:
    """Import an OHLCV CSV that is not archive format, with an explicit column mapping and time zone."""
    mapping: dict[str, str] = {}
    for item in column or []:
        if "=" not in item:
            _fail(f"--column {item!r}: expected field=header")
        k, v = item.split("=", 1)
        mapping[k.strip()] = v.strip()
    with _context(store) as (_, st):
        report = import_csv(st, path, market=market, symbol=symbol, interval=interval, tz=tz, time_col=time_col,
                            time_format=time_format, columns=mapping, skip_bad_rows=skip_bad_rows)
        out.print_json(json.dumps(report.as_dict()))


@data_app.command("gaps")
def gaps_cmd(
    market: MarketOpt,
    symbols: Annotated[str, typer.Option()],
    interval: str = "1m",
    start: Annotated[str | None, typer.Option(help="YYYY-MM[-DD]; default: first stored candle")] = None,
    end: Annotated[str | None, typer.Option(help="YYYY-MM[-DD] inclusive; default: last stored candle")] = None,
    fill: Annotated[bool, typer.Option("--fill", help="Fill gaps from the archive (or REST with --rest-base)")] = False,
    rest_base: Annotated[str | None, typer.Option(help="Fill through Binance REST at this base URL")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    store: StoreOpt = None,
    archive_base: ArchiveOpt = None,
) -> None:
    """List missing candles per symbol; never forward-fills, only re-fetches real data."""
    with _context(store) as (settings, st):
        lo: datetime | None = None
        hi: datetime | None = None
        if start or end:
            lo, hi = range_bounds(start or end or "", end or start or "")
            lo = lo if start else None
            hi = hi if end else None
        gaps = [g for sym in _symbols(symbols) for g in find_gaps(st, market.value, sym, interval, lo, hi)]
        if fill and gaps:
            if rest_base:
                gaps = fill_gaps_from_rest(st, rest_base, gaps).gaps
            else:
                gaps = fill_gaps_from_archive(st, archive_source(settings, archive_base), gaps).gaps
        if as_json:
            out.print_json(json.dumps([g.as_dict() for g in gaps]))
            return
        table = Table("market", "symbol", "interval", "gap start", "gap end", "missing")
        for g in gaps:
            table.add_row(g.market, g.symbol, g.interval, g.start.isoformat(), g.end.isoformat(), str(g.missing))
        out.print(table)
        out.print(f"{len(gaps)} gap(s), {sum(g.missing for g in gaps)} missing candle(s)")


@data_app.command("stats")
def stats_cmd(as_json: Annotated[bool, typer.Option("--json")] = False, store: StoreOpt = None) -> None:
    """Rows and first/last time per market/symbol/interval."""
    with _context(store) as (_, st):
        stats = [s.as_dict() for s in st.stats()]
        if as_json:
            out.print_json(json.dumps(stats))
            return
        table = Table("kind", "market", "symbol", "interval", "rows", "first", "last")
        for s in stats:
            table.add_row(*(str(s[k]) for k in ["kind", "market", "symbol", "interval", "rows", "first", "last"]))
        out.print(table)
        for s in stats:  # unreadable month files are left out of the counts above, and named here
            for path in s["broken"]:  # type: ignore[attr-defined]
                err.print(f"[red]broken:[/red] {path}: unreadable (not counted); `rltrader data verify "
                          "--archive --repair` reloads it from the archive", highlight=False, soft_wrap=True)


@data_app.command("verify")
def verify_cmd(
    market: Annotated[Market | None, typer.Option("--market", help="spot or futures-um (default: all)")] = None,
    symbols: Annotated[str | None, typer.Option(help="Comma-separated (default: all stored)")] = None,
    interval: Annotated[str | None, typer.Option(help="Kline interval / bar width (default: all)")] = None,
    kind: Annotated[str | None, typer.Option(help="Comma-separated: klines, agg_trades, bars (default: all)")
                    ] = None,
    start: Annotated[str | None, typer.Option(help="YYYY-MM[-DD]: first month checked")] = None,
    end: Annotated[str | None, typer.Option(help="YYYY-MM[-DD]: last month checked")] = None,
    archive: Annotated[bool, typer.Option("--archive", help="Compare each month with the CHECKSUM-verified "
                                          "archive files (row count + content fingerprint)")] = False,
    rest_base: Annotated[str | None, typer.Option(help="Also compare (and repair) the days the archive has not "
                                                  "published through Binance REST at this base URL")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild failing months from the archive (implies "
                                         "--archive) and REST (--rest-base); 5 s bars from the stored trades; "
                                         "stored rows the sources lack are kept")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    store: StoreOpt = None,
    archive_base: ArchiveOpt = None,
) -> None:
    """Check every stored month (klines, aggTrades, 5 s bars): readable, canonical schema, unique rows inside the
    month, the kind's invariants; optionally equal to the archive (and REST for recent days); --repair rebuilds
    the failing ones. Exit 1 if any fails."""
    from rltrader.data.verify import Scope, verify_store

    with _context(store) as (settings, st):
        scope = Scope.of(market.value if market else None, _symbols(symbols or ""), interval, start, end,
                         [k.strip() for k in (kind or "").split(",") if k.strip()])
        source = archive_source(settings, archive_base) if archive or repair else None
        report = verify_store(st, scope, source, repair=repair, rest_base=rest_base)
    if as_json:
        out.print_json(json.dumps(report.as_dict(), default=str))
    else:
        table = Table("kind", "market", "symbol", "interval", "month", "status", "rows", "source", "detail")
        for m in report.months:
            colour = "red" if m.failed else "green" if m.status == "ok" else "yellow"
            table.add_row(m.kind, m.market, m.symbol, m.interval, m.month, f"[{colour}]{m.status}[/{colour}]",
                          str(m.rows) if m.rows is not None else "-",
                          str(m.archive_rows) if m.archive_rows is not None else "-", m.detail)
        out.print(table)
        out.print(report.summary(), highlight=False)
    if report.failed:
        _fail(f"{len(report.failed)} stored month(s) are wrong: " + "; ".join(
            f"{m.label} {m.status}" + (f" ({m.path})" if m.status == "unreadable" else "")
            + (f" — {m.detail.split('; ')[-1]}" if repair and m.detail else "") for m in report.failed)
            + ("" if repair else " (`rltrader data verify --archive --repair` rebuilds them from the archive)"))


@data_app.command("quarantine")
def quarantine_cmd(limit: int = 50, store: StoreOpt = None) -> None:
    """Show rows that failed validation, with file, line and reason."""
    with _context(store) as (_, st):
        q = st.read_quarantine()
        out.print(q.tail(limit))
        out.print(f"{q.height} quarantined row(s)")


@data_app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="One SELECT (views: klines, agg_trades, bars; over Parquet also "
                                         "features, sessions_<split>); '-' reads it from stdin")],
    as_json: Annotated[bool, typer.Option("--json", help="Rows as a JSON list of objects on stdout")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write the rows to this CSV file")] = None,
    max_rows: Annotated[int, typer.Option(help="Rows shown in the table (JSON/CSV get all)")] = 100,
    store: StoreOpt = None,
) -> None:
    """Read-only SQL over the store: DuckDB over Parquet, or the PostgreSQL store itself (same views)."""
    from rltrader.data.sql import run_sql

    if query == "-":
        query = sys.stdin.read()
    try:
        settings = load_settings()
        result = run_sql(query, store or settings.data.store_url, settings.data.dir)
    except (RLTraderError, ValueError) as exc:
        _fail(str(exc))
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(result.to_csv())
    if as_json:
        print(result.to_json())
        return
    if csv_path is not None:
        err.print(f"{len(result.rows)} row(s) → {csv_path}")
        return
    table = Table(*result.columns)
    for row in result.rows[:max_rows]:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)
    more = f" (first {max_rows} shown)" if len(result.rows) > max_rows else ""
    out.print(f"{len(result.rows)} row(s){more} ({result.engine})")


@data_app.command("stream")
def stream_cmd(
    market: Annotated[Market | None, typer.Option("--market", help="spot or futures-um (default: params)")] = None,
    symbols: Annotated[str | None, typer.Option(help="Comma-separated, e.g. BTCUSDT,ETHUSDT")] = None,
    store: StoreOpt = None,
    rest_base: Annotated[str | None, typer.Option(help="REST host root (replay server, testnet)")] = None,
    ws_base: Annotated[str | None, typer.Option(help="Websocket root, e.g. ws://127.0.0.1:8765/")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after N seconds (default: until Ctrl-C)")] = None,
) -> None:
    """Stream aggTrades, closed 1m klines and 5 s bars into the store until Ctrl-C / SIGTERM (flushes all)."""
    from rltrader.data.stream import run_live

    logging.getLogger("rltrader.data.stream").setLevel(logging.INFO)  # the periodic metrics line is INFO
    logging.getLogger("binance.ws").setLevel(logging.CRITICAL)  # it logs ERROR for each deliberate close
    try:
        settings = load_settings()
        stats = run_live(settings, store_url=store, market=market, symbols=_symbols(symbols) if symbols else None,
                         rest_base=rest_base, ws_base=ws_base, max_seconds=duration)
    except (RLTraderError, ValueError) as exc:
        _fail(str(exc))
    out.print_json(json.dumps(stats, default=str))


@app.command("replay-server")
def replay_server_cmd(
    market: MarketOpt,
    symbols: Annotated[str, typer.Option(help="Comma-separated symbols to serve")],
    start: Annotated[str, typer.Option("--from", help="Replay start, ISO time (UTC) or epoch ms")],
    end: Annotated[str | None, typer.Option("--to", help="Replay end (default: --days after --from)")] = None,
    days: int = 1,
    speed: Annotated[float, typer.Option(help="Market seconds per wall second (60 = a minute per second; "
                                         "0 = as fast as possible)")] = 60.0,
    host: str = "127.0.0.1",
    port: int = 8765,
    drop_after: Annotated[int | None, typer.Option(help="Fault: drop each websocket after N messages")] = None,
    stall_after: Annotated[int | None, typer.Option(help="Fault: stall after N messages")] = None,
    stall_seconds: float = 5.0,
    malformed_every: Annotated[int | None, typer.Option(help="Fault: a malformed frame every N messages")] = None,
    archive_base: ArchiveOpt = None,
) -> None:
    """Serve recorded archive data through Binance's REST and websocket protocols on loopback."""
    from rltrader.sim import Faults, ReplayServer, default_params, serve_forever

    settings = load_settings()

    def ready(srv: ReplayServer) -> None:
        out.print(f"replay server ready: REST {srv.rest_base_url}  websocket {srv.ws_base_url}  "
                  f"(python-binance: API_URL={srv.rest_base_url}/api, STREAM_URL={srv.ws_base_url})")
        out.print("trading API: " + ("on for the key in BINANCE_API_KEY" if api_keys else
                                     "off (set BINANCE_API_KEY and BINANCE_API_SECRET to trade)"))

    faults = Faults(drop_after=drop_after, stall_after=stall_after, stall_seconds=stall_seconds,
                    malformed_every=malformed_every)
    # The fake exchange's account: the key pair the clients use (env only, never logged), and the project's
    # execution model where it is for this market (so paper fills equal the backtest's), else VIP0 fees.
    key, secret = os.environ.get("BINANCE_API_KEY"), os.environ.get("BINANCE_API_SECRET")
    api_keys = {key: secret} if key and secret else None
    execution = settings.execution
    if (execution.market == "spot") != (Market(market) is Market.SPOT):
        execution = default_params(Market(market))
    try:
        serve_forever(archive_base or settings.data.archive_base, market, _symbols(symbols), start, end,
                      speed=speed, host=host, port=port, days=days, faults=faults, api_keys=api_keys,
                      execution=execution, on_ready=ready)
    except RLTraderError as exc:
        _fail(str(exc))


@dataset_app.command("features")
def features_cmd(
    metrics: Annotated[Path, typer.Option(help="Where to write the stage's metrics JSON")] = Path(
        "reports/features.json"),
    store: StoreOpt = None,
) -> None:
    """The DVC `features` stage: per-symbol feature tables under <data.dir>/features."""
    from rltrader.dataset.build import run_features_stage
    from rltrader.utils import write_json

    with _context(store) as (settings, st):
        summary = run_features_stage(settings, st)
        write_json(metrics, summary)
        out.print(f"features: {len(summary['features'])} columns for {len(summary['symbols'])} symbols "
                  f"→ {settings.data.dir / 'features'}")


@dataset_app.command("sessions")
def sessions_cmd(
    metrics: Annotated[Path, typer.Option(help="Summary JSON (DVC metrics)")] = Path("reports/sessions.json"),
    plot: Annotated[Path, typer.Option(help="PNG of example sessions (DVC plots)")] = Path(
        "reports/plots/sessions.png"),
) -> None:
    """The DVC `sessions` stage: split by date, select sessions, standardise on train, write Parquet splits."""
    from rltrader.dataset.build import run_sessions_stage

    try:
        settings = load_settings()
        summary = run_sessions_stage(settings, metrics_path=metrics, plot_path=plot)
    except RLTraderError as exc:
        _fail(str(exc))
    table = Table("split", "sessions", "rows", "from (UTC)", "to (UTC)", "symbols")
    for name, sp in summary["splits"].items():
        table.add_row(name, str(sp["sessions"]), str(sp["rows"]), sp["start"][:16], sp["end"][:16],
                      str(len(sp["symbols"])))
    out.print(table)


@app.command("train")
def train_cmd(
    algo: Annotated[str, typer.Argument(help=f"{', '.join(TRAINED)} (cnn: the supervised baseline; lowrider: "
                                              "D3QN sizing the Lowrider's lots)")],
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint (same MLflow run)")] = False,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON (default reports/train_<algo>.json)")] = None,
) -> None:
    """Train on the train split, select on val, compare with the baselines on val; all logged to MLflow."""
    from rltrader.train import run_train

    try:
        settings = load_settings()
        result = run_train(settings, algo, resume=resume, progress=sys.stderr.isatty(),
                           metrics_path=metrics or Path(f"reports/train_{algo}.json"))
    except RLTraderError as exc:
        _fail(str(exc))
    out.print(f"{algo}: MLflow run {result['run_id']}, model {result['model_uri']}")


@app.command("ensemble")
def ensemble_cmd(
    name: Annotated[str, typer.Argument(help="An ensembles.<name> entry of params.yaml")],
    retrain: Annotated[bool, typer.Option(help="Retrain members whose model file exists")] = False,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON (default reports/train_<name>.json)")] = None,
) -> None:
    """Train the ensemble's members (one per seed) and publish their average as the model <name>."""
    from rltrader.train import run_ensemble

    try:
        settings = load_settings()
        result = run_ensemble(settings, name, progress=sys.stderr.isatty(), retrain=retrain,
                              metrics_path=metrics or Path(f"reports/train_{name}.json"))
    except RLTraderError as exc:
        _fail(str(exc))
    out.print(f"{name}: MLflow run {result['run_id']}, model {result['model_uri']}")


@app.command("backtest")
def backtest_cmd(
    model: Annotated[str | None, typer.Option(help="One policy: models:/rltrader@champion, an MLflow run id, a .pt "
                                              "file or a baseline name. Default: every backtest.models model "
                                              "(the DVC stage)")] = None,
    split: Annotated[str | None, typer.Option(help="sessions.splits range (default backtest.split)")] = None,
    out_dir: Annotated[Path, typer.Option(help="Reports folder")] = Path("reports/backtest"),
    metrics: Annotated[Path, typer.Option(help="DVC metrics JSON (stage mode)")] = Path("reports/backtest.json"),
) -> None:
    """Continuous backtest through the env's execution model, against every baseline, with an HTML report."""
    from rltrader.evaluate.stage import run_backtest_stage, run_one_backtest

    try:
        settings = load_settings()
        if model is not None:
            one = run_one_backtest(settings, model, split=split, out_dir=out_dir)
            m = one["metrics"]
            out.print(f"{one['policy']} over {one['split']}: return {100 * (m['total_return'] or 0):+.3f} %, Sharpe "
                      f"{m['sharpe_daily_annualized']}, max drawdown {100 * (m['max_drawdown'] or 0):.2f} % → "
                      f"{one['report']}")
            return
        if split is not None:
            _fail("--split needs --model (the stage runs backtest.eval_splits)")
        summary = run_backtest_stage(settings, out_dir=out_dir, metrics_path=metrics)
    except RLTraderError as exc:
        _fail(str(exc))
    primary = summary["primary_split"]
    table = Table("policy", "role", "return %", "Sharpe (daily, ann.)", "max DD %", "trades/day", title=primary)
    for r in summary["tables"][primary]:
        table.add_row(str(r["name"]), str(r["role"]), f"{100 * float(r['total_return']):+.3f}",
                      f"{float(r['sharpe_daily_annualized']):+.3f}", f"{100 * float(r['max_drawdown']):.2f}",
                      f"{float(r['trades_per_day']):.2f}")
    out.print(table)
    for line in summary["verdicts"][primary]:
        out.print(line)


@app.command("study")
def study_cmd(
    metrics: Annotated[Path, typer.Option(help="DVC metrics JSON")] = Path("reports/study.json"),
    out_dir: Annotated[Path, typer.Option(help="Report folder (HTML, PNGs, summary.json)")] = Path("reports/study"),
    mlflow: Annotated[bool, typer.Option(help="Log a `study` run to MLflow")] = True,
) -> None:
    """Signal study: ridge/XGBoost forecasts of forward returns per horizon, IC with CIs, costs, ablation."""
    from rltrader.study.stage import run_study_stage

    try:
        summary = run_study_stage(load_settings(), out_dir=out_dir, metrics_path=metrics, log_mlflow=mlflow)
    except RLTraderError as exc:
        _fail(str(exc))
    for line in summary["verdicts"]:
        out.print(line, soft_wrap=True)
    out.print(f"report: {out_dir / 'report.html'}")


@app.command("promote")
def promote_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the decision; change nothing")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="champion ← previous")] = False,
    summary: Annotated[Path, typer.Option(help="The backtest stage's summary")] = Path("reports/backtest/summary.json"),
) -> None:
    """Register the trained models; the challenger becomes MLflow alias `champion` only if every gate passes."""
    from rltrader import registry

    try:
        settings = load_settings()
        decision = (registry.rollback(settings, dry_run=dry_run) if rollback
                    else registry.promote(settings, dry_run=dry_run, summary_path=summary))
    except RLTraderError as exc:
        _fail(str(exc))
    out.print(decision.summary())


@app.command("walk-forward")
def walk_forward_cmd(
    algo: Annotated[str | None, typer.Option(help=f"{', '.join(ALGORITHMS)} (default walk_forward.algo)")] = None,
    max_folds: Annotated[int | None, typer.Option(help="Only the first N folds")] = None,
    out_dir: Annotated[Path, typer.Option(help="Reports folder")] = Path("reports/walk_forward"),
) -> None:
    """Rolling train/test windows: per fold rebuild sessions, train from scratch, backtest with the baselines."""
    from rltrader.evaluate.walk_forward import run_walk_forward

    try:
        result = run_walk_forward(load_settings(), algo=algo, out_dir=out_dir, max_folds=max_folds,
                                  progress=sys.stderr.isatty())
    except RLTraderError as exc:
        _fail(str(exc))
    for line in result["verdicts"]:
        out.print(line)
    out.print(f"report: {result['report']}")


@api_app.command("serve")
def api_serve_cmd(
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback only with RLTRADER_API_TOKEN set")] = (
        "127.0.0.1"),
    port: int = 8080,
) -> None:
    """Serve POST /data/collect, /data/backfill, /train/{algo}, /pipeline/run and GET /runs/{id}: each creates a
    run of the Prefect deployment (served by `python -m flows.deploy`); the trader's /status, /orders, /fills, /pnl,
    /metrics, POST /halt|/resume|/flatten|… (its records: trader.records_url) and its page at /live; bearer token
    from RLTRADER_API_TOKEN."""
    from rltrader.api.app import serve

    try:
        serve(host=host, port=port)
    except RLTraderError as exc:
        _fail(str(exc))


@app.command("tune")
def tune_cmd(
    kind: Annotated[str, typer.Argument(help="d3qn, ppo, xgb (the study's forecaster) or filters (the backtest "
                                        "filters of tune.model)")],
    trials: Annotated[int | None, typer.Option(help="Finished trials the study must hold (default tune.trials)")
                      ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine")] = 1,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: postgresql://user@host/db for workers on "
                                                "several machines (default tune.storage, else sqlite under "
                                                "data/tune)")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the kind)")] = None,
    join: Annotated[str | None, typer.Option(help="Add workers to this existing study (another machine); no "
                                             "report is written by joiners")] = None,
) -> None:
    """Optuna study scored on walk-forward folds inside train+val; best values → params.tuned.yaml."""
    from rltrader.tune import run_tune

    try:
        result = run_tune(load_settings(), kind, trials=trials, workers=workers, storage=storage, study=study,
                          join=join)
    except RLTraderError as exc:
        _fail(str(exc))
    if "report" in result:
        out.print(f"best {result['best_value']:.6g} with {result['best_params']}; deflated Sharpe "
                  f"{result['deflated_sharpe']:.3f} over {result['trials_counted']} trials counted, PBO "
                  f"{result['pbo']:.2f} → {result['report']} (best values in {result['tuned_params']})")
    else:
        out.print(f"study {result['study']}: {result['trials']} trials finished ({result['storage']})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
