"""Typed settings: ``params.yaml`` is the one source of parameters (DVC reads the same file).

Environment variables override it: ``RLTRADER_<SECTION>__<KEY>`` for any parameter (values parsed as YAML,
so ``RLTRADER_INGEST__SYMBOLS='[BTCUSDT, ETHUSDT]'`` works), plus the short aliases users expect:
``RLTRADER_DB_URL`` (store URL), ``RLTRADER_ARCHIVE_BASE`` and ``RLTRADER_DATA_DIR``. An unknown key or a
wrong type fails with a message naming the key, in the file or the variable it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from rltrader.agents import ALGORITHMS, VARIANTS
from rltrader.agents.configs import CONFIGS, config_from_params
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError
from rltrader.evaluate.filters import BacktestFilters
from rltrader.execution import ExecutionParams
from rltrader.market import Market

if TYPE_CHECKING:  # psycopg is imported only where PostgreSQL is used
    from rltrader.data.pgbounds import PgBounds

ENV_PREFIX = "RLTRADER_"
ALIASES = {
    "RLTRADER_DB_URL": ("data", "store_url"),
    "RLTRADER_ARCHIVE_BASE": ("data", "archive_base"),
    "RLTRADER_DATA_DIR": ("data", "dir"),
}
# Variables with the prefix that are not parameters (read elsewhere, e.g. by the test harness).
NOT_PARAMS = {"RLTRADER_PG_BIN", "RLTRADER_PARAMS", "RLTRADER_BINANCE_API_KEY", "RLTRADER_BINANCE_API_SECRET",
              # secrets and endpoints of the API and the notifier (read where used, never settings)
              "RLTRADER_API_TOKEN", "RLTRADER_NOTIFY_WEBHOOK", "RLTRADER_TELEGRAM_BOT_TOKEN",
              "RLTRADER_TELEGRAM_CHAT_ID", "RLTRADER_TELEGRAM_API"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Strict):
    dir: Path = Path("data")
    """Working data folder: the Parquet store, download cache and reports live under it."""
    store_url: str | None = None
    """None → embedded Parquet store under ``<dir>/store``; ``postgresql://…`` → PostgreSQL/TimescaleDB."""
    archive_base: str = "https://data.binance.vision/data"
    """Binance archive: the https base, a ``file://`` URL or a local folder with the same layout."""


class IngestSettings(_Strict):
    market: Market = Market.FUTURES_UM
    symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT"])
    interval: str = "1m"
    start: str = "2024-01"
    end: str = "2024-01"
    skip_bad_rows: bool = False
    """False: a file with an invalid row is not loaded (rows quarantined, error). True: load the valid rows."""

    @field_validator("symbols", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip().upper() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("start", "end", mode="before")
    @classmethod
    def _str_date(cls, v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else v


class StreamSettings(_Strict):
    market: Market = Market.SPOT
    symbols: list[str] = Field(default_factory=lambda: ["BTCUSDT"])
    rest_base: str | None = None
    """None → Binance itself; e.g. ``http://127.0.0.1:8765`` for the replay server or a testnet URL."""
    ws_base: str | None = None
    flush_seconds: float = 2.0
    stale_seconds: float = 30.0
    metrics_seconds: float = 10.0
    bar_width: str = "5s"
    rest_timeout_seconds: float = Field(default=10.0, gt=0)
    """Bound on one REST request of the ingester (repair, the client's ping); past it: retry, then reconnect."""
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    """Bound on the websocket's TCP connect + handshake."""
    stop_grace_seconds: float = Field(default=2.0, ge=0)
    """After the stop event or ``max_seconds``, how long a connection attempt may take to end by itself before it
    is cancelled (so a stop never waits on the network)."""

    @field_validator("symbols", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip().upper() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


class FeatureSettings(_Strict):
    """Indicator periods (in bars). Feature names follow from them, see ``rltrader.dataset.features``."""

    return_horizons: list[int] = Field(default_factory=lambda: [1, 5, 15, 60])
    rsi: int = 14
    ema: list[int] = Field(default_factory=lambda: [9, 21, 50])
    macd: tuple[int, int, int] = (12, 26, 9)
    bollinger: int = 20
    bollinger_dev: float = 2.0
    atr: int = 14
    volatility: list[int] = Field(default_factory=lambda: [15, 60])
    zscore_window: int = 240
    """Trailing window of the volume and trade-count z-scores."""
    market: bool = False
    """Market-wide features (``rltrader.dataset.market_features``): the equal-weighted return of all
    ``ingest.symbols`` (a market factor), each symbol's return residual to it and the market's volatility."""
    market_min_symbols: int = Field(default=2, ge=1)
    """The market factor is defined at a bar only when at least this many symbols have that bar."""
    timeframes: list[str] = Field(default_factory=list)
    """Higher timeframes (e.g. ``[15m, 1h, 4h]``) whose CLOSED bars give extra features; empty = none."""
    tf_lookback: int = Field(default=24, ge=2)
    """Higher-timeframe bars in the multi-bar return, volatility and rolling high/low features (24 × 4h = 4 days)."""
    forecast: list[int] = Field(default_factory=list)
    """Horizons (bars) of forecast columns ``fc_<h>``: the study's XGBoost (``study`` params) refitted
    walk-forward inside the train split, frozen after it (``dataset.forecast_features``); empty = off."""
    forecast_refit_days: int = Field(default=30, ge=1)
    """Days between the walk-forward refits of the forecast columns' model inside the train split."""

    @field_validator("return_horizons", "ema", "volatility")
    @classmethod
    def _positive_list(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("must be a non-empty list of positive bar counts")
        return v

    @field_validator("rsi", "bollinger", "atr", "zscore_window")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be at least 2 bars")
        return v


class SplitRange(_Strict):
    start: str
    end: str
    """Half-open ``[start, end)``, ISO dates (UTC)."""

    @field_validator("start", "end", mode="before")
    @classmethod
    def _str_date(cls, v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else v


class SessionSettings(_Strict):
    """Trading sessions: ``context`` bars of features, then ``length`` bars to trade (the D3QN reference
    design's demo: 30/10)."""

    context: int = 30
    length: int = 10
    stride: int = 10
    """Bars between candidate session starts."""
    volatility_percentile: float = 0.0
    """Keep sessions whose context volatility is at least this percentile of the train split's (0 = all)."""
    min_abs_move: float = 0.0
    """Keep sessions whose context moved at least this much, |log(close_last / close_first)|."""
    embargo: int = 60
    """Bars after each split boundary that no session (context included) may use; must be ≥ context."""
    clip: float = 10.0
    """Standardised features (train-split mean/std) are clipped to ±clip."""
    example_plots: int = 6
    splits: dict[str, SplitRange] = Field(default_factory=lambda: {
        "train": SplitRange(start="2023-02-01", end="2024-09-01"),
        "val": SplitRange(start="2024-09-01", end="2025-01-01"),
        "test": SplitRange(start="2025-01-01", end="2025-09-01"),
        "backtest": SplitRange(start="2025-09-01", end="2025-12-01"),
    })

    @field_validator("context", "length", "stride")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 bar")
        return v

    @field_validator("volatility_percentile")
    @classmethod
    def _pct(cls, v: float) -> float:
        if not 0 <= v < 100:
            raise ValueError("must be in [0, 100)")
        return v


class TrainSettings(_Strict):
    """What every training run shares (``rltrader train <algo>``); algorithm knobs live in their own sections."""

    seed: int = 0
    device: str = "auto"
    """``auto`` = CUDA when present, else CPU."""
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    """MLflow tracking: embedded sqlite by default; ``http://host:5000`` or ``postgresql://…`` for a server."""
    artifact_root: Path = Path("mlflow/artifacts")
    experiment: str = "rltrader"
    checkpoint_dir: Path = Path("data/checkpoints")
    models_dir: Path = Path("data/models")
    """Where the DVC train stages put each trained model (also logged to MLflow)."""
    val_sessions: int = 2000
    """Val sessions in the final agents-vs-baselines table (evenly spread); the full split when it has fewer."""
    threads: int = 1
    """torch intra-op threads on CPU (0 = torch's default). Small nets on 2 cores run several times faster on 1."""


@dataclass(frozen=True)
class BacktestSettings(BacktestFilters):
    """``params.yaml: backtest``: the continuous backtest's filters (``BacktestFilters``, the fields the backtest
    kernel reads, each turning a decision into *hold*; 0 / null switches it off) plus what the backtest stage
    runs them over."""

    split: str = "backtest"
    """Which ``sessions.splits`` date range to run over, continuously (not only inside sessions)."""
    trade_size_quote: Annotated[float, Field(gt=0)] | None = None
    """Trade size in quote currency (the D3QN reference design's sizing); null = ``env.position_size`` (see the
    backtest module docstring for how it maps onto the env's sizing)."""
    seed: int = 0
    """Seed of the ``random`` baseline."""
    models: list[str] = field(default_factory=lambda: list(ALGORITHMS))
    """Trained models (``<train.models_dir>/<name>.pt``) the ``backtest`` stage judges against the baselines."""
    lowrider_models: list[str] = field(default_factory=lambda: ["lowrider"])
    """Trained lowrider-mode models the ``backtest`` stage judges in its Lowrider table against the rule-based
    Lowrider (by market regime); [] = the rule alone."""
    regime_threshold: Annotated[float, Field(gt=0)] = 0.05
    """A (symbol, UTC month) is *up* when its buy & hold return is above this, *down* below minus this, else
    *sideways* (the Lowrider table's regimes)."""
    eval_splits: list[str] = field(default_factory=lambda: ["val", "backtest"])
    """Splits the ``backtest`` stage runs every policy over, continuously; promotion gates read val and backtest."""
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    """Block-bootstrap resamples (over days) for the Sharpe and return confidence intervals; 0 = off."""


class StudySettings(_Strict):
    """``rltrader study`` (``rltrader.study``): supervised forecasters of volatility-normalised forward returns,
    fitted on one split and judged on others, to measure where (if anywhere) a signal beats the costs."""

    symbols: list[str] | None = None
    """None = ``ingest.symbols``; the forecasters are fitted on all of them pooled and judged per symbol too."""
    horizons: list[int] = Field(default_factory=lambda: [1, 5, 15, 60, 240])
    """Forward horizons in bars (fill to fill: entry at the open after the decision, exit ``h`` bars later)."""
    models: list[Literal["ridge", "xgboost"]] = Field(
        default_factory=lambda: ["ridge", "xgboost"], min_length=1)  # type: ignore[arg-type]
    train_split: str = "train"
    eval_splits: list[str] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    select_split: str = "val"
    """Where the threshold of the threshold strategy and the best model are chosen (never test/backtest)."""
    train_stride: int = Field(default=20, ge=1)
    """Fit on every k-th train bar: neighbouring bars' targets overlap, so little information is lost."""
    eval_stride: int = Field(default=1, ge=1)
    vol_window: int = Field(default=60, ge=2)
    """Bars of the trailing volatility the targets are normalised by."""
    target_clip: float = Field(default=5.0, gt=0)
    """Training targets are clipped to ±this many volatilities (evaluation uses the unclipped ones)."""
    ridge_alpha: float = Field(default=0.1, ge=0)
    """Penalty on the mean squared error of standardised features (1 would halve a lone unit-variance weight)."""
    xgb_rounds: int = Field(default=100, ge=1)
    xgb_depth: int = Field(default=4, ge=1)
    xgb_eta: float = Field(default=0.05, gt=0)
    xgb_threads: int = Field(default=1, ge=1)
    ablation: bool = True
    """Refit without each feature group and report the change of the select split's IC."""
    ablation_model: Literal["ridge", "xgboost"] = "xgboost"
    thresholds: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0], min_length=1)
    """Threshold strategy: trade when |forecast| > k × round-trip cost, for each k."""
    min_trades: int = Field(default=30, ge=1)
    """A threshold with fewer trades on the select split is not chosen."""
    bootstrap: int = Field(default=500, ge=0)
    """Block-bootstrap resamples (blocks of days) for the IC confidence intervals; 0 = off."""
    seed: int = 0


class WalkForwardSettings(_Strict):
    """``rltrader walk-forward``: rolling train/test windows, each fold trained and backtested from scratch."""

    start: str = "2023-02-01"
    end: str = "2025-12-01"
    train_days: int = Field(default=365, gt=0)
    val_days: int = Field(default=30, gt=0)
    """The last ``val_days`` of each fold's training window are its val split (model selection), embargoed."""
    test_days: int = Field(default=90, gt=0)
    step_days: int = Field(default=90, gt=0)
    expanding: bool = False
    algo: str = "d3qn"

    @field_validator("start", "end", mode="before")
    @classmethod
    def _str_date(cls, v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else v


class TuneSettings(_Strict):
    """``rltrader tune``: Optuna studies scored on walk-forward folds inside train+val (``rltrader.tune``)."""

    storage: str | None = None
    """Optuna storage: None = ``sqlite:///<data.dir>/tune/optuna.db`` (one machine); ``postgresql://…`` for many."""
    trials: int = Field(default=20, gt=0)
    pruner: Literal["median", "hyperband", "none"] = "median"
    metric: str = "sharpe_daily_annualized"
    """The fold score (a ``compute_metrics`` key, net of costs); the objective is its mean over the folds."""
    folds: int = Field(default=3, gt=0)
    fold_days: int = Field(default=30, gt=0)
    """Length of each fold's validation window; d3qn/ppo folds end at the val split's end, filters folds tile val."""
    val_days: int = Field(default=14, gt=0)
    """d3qn/ppo: the last days of each fold's training window select the model (like walk_forward.val_days)."""
    model: str = "d3qn"
    """``tune filters``: the trained model (``<train.models_dir>/<model>.pt``) or baseline whose filters are tuned."""
    heartbeat_seconds: int = Field(default=30, gt=0)
    grace_seconds: int = Field(default=120, gt=0)
    """A running trial without a heartbeat for this long is failed and retried (its worker died)."""
    max_retry: int = Field(default=2, ge=0)
    seed: int = 0
    out_dir: Path = Path("reports/tune")


class EnsembleSpec(_Strict):
    """One ``ensembles.<name>`` entry (``rltrader ensemble <name>``): ``algo`` trained once per seed, averaged."""

    algo: Literal["d3qn", "ppo", "cnn"]
    seeds: list[int] = Field(min_length=1)
    """Members ``<algo>_s<seed>``; one seed gives a one-member ensemble (the single model's decisions)."""


class PromoteSettings(_Strict):
    """Gates of ``rltrader promote`` (MLflow registry): the challenger becomes ``champion`` only if all pass."""

    model_name: str = "rltrader"
    """Registered model name; aliases ``champion`` and ``previous``."""
    candidates: list[str] = Field(default_factory=lambda: ["d3qn", "ppo", "xgb"])
    """Trained models that may be promoted; the challenger is the one with the best val ``metric``."""
    metric: str = "sharpe_daily_annualized"
    margin: float = Field(default=0.1, ge=0)
    """The challenger's ``metric`` must exceed the champion's by this much on val AND on backtest."""
    max_drawdown: float = Field(default=0.25, gt=0, le=1)
    """Largest max drawdown (fraction of peak equity) allowed on val and on backtest."""
    baselines: list[str] = Field(default_factory=lambda: ["flat", "buy_and_hold"])
    """Must be beaten on ``metric`` and on total return, net of fees, on val and on backtest."""
    decision_path: Path = Path("reports/promotion.json")


class PostgresSettings(_Strict):
    """Bounds on every PostgreSQL wait of the market data store and the trader's journal (``rltrader.data.pgbounds``
    explains the defaults). A tripped bound is one ``StoreError`` naming operation, table/series and bound."""

    connect_timeout_seconds: int = Field(default=10, ge=2)
    """libpq ``connect_timeout``: whole seconds, at least 2 (libpq's minimum; it has no usable "off")."""
    statement_timeout_seconds: float = Field(default=300.0, ge=0)
    """Server-side ``statement_timeout`` per statement (bulk COPYs included); 0 = off (PostgreSQL's convention)."""
    lock_timeout_seconds: float = Field(default=30.0, ge=0)
    """Server-side ``lock_timeout`` on a table/row lock held by another session; 0 = off (PostgreSQL's
    convention). The store's wait for another writer of the same series is bounded by the statement bound."""
    pool_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long a store call waits for a free pooled connection (no "off": not a PostgreSQL setting)."""

    @field_validator("statement_timeout_seconds", "lock_timeout_seconds")
    @classmethod
    def _ms(cls, v: float) -> float:
        if 0 < v < 0.001:
            raise ValueError("0 (off) or at least 0.001 (PostgreSQL counts whole milliseconds)")
        return v

    def bounds(self) -> PgBounds:
        from rltrader.data.pgbounds import PgBounds

        return PgBounds(self.connect_timeout_seconds, self.statement_timeout_seconds, self.lock_timeout_seconds,
                        self.pool_timeout_seconds)


class TraderSettings(_Strict):
    """``rltrader trade`` (``rltrader.live``): execution, env, sizing and filters are the backtest's sections."""

    mode: Literal["paper", "testnet", "live"] = "paper"
    market: Market = Market.FUTURES_UM
    """Market data and orders: futures-um (USDⓈ-M) or spot; must match ``execution.market``."""
    symbols: list[str] = Field(default_factory=lambda: ["NEARUSDT"])
    model: str = "models:/rltrader@champion"
    """Registry alias (pinned to its version at start), MLflow run id / URI, ``.pt`` file or baseline name."""
    follow_champion: bool = False
    """Reload (between bars, recorded) when the alias moves; false: only an explicit restart changes the model."""
    records_url: str | None = None
    """null → ``<data.dir>/trader.db`` (SQLite, WAL); ``postgresql://…`` for PostgreSQL."""
    rest_base: str | None = None
    """null → Binance (testnet: python-binance's testnet URLs); ``http://127.0.0.1:PORT`` for the replay server."""
    ws_base: str | None = None
    history_bars: int = Field(default=2880, ge=0)
    """Stored bars before the start that warm the incremental features up (EWMs converge in a few hundred)."""
    flatten_on_stop: bool = False
    """Close every position when the run ends (a replay to a known end does, as the backtest's last bar)."""
    realtime_priority: int = Field(default=0, ge=0, le=99)
    """> 0: each closed bar's critical section (features → policy → order) runs under ``SCHED_FIFO`` at this
    priority (Linux; needs CAP_SYS_NICE), so other processes cannot preempt it; 0 = the normal scheduler. On a
    busy machine the per-bar latency's tail is the time spent waiting for a CPU, not our code."""

    @field_validator("symbols", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip().upper() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


class RiskSettings(_Strict):
    """``rltrader.live.risk``: limits every order of the trader passes (a pre-send hook of the order gateway).
    0 switches a limit off; quote amounts are in the quote currency (USDT)."""

    max_order_notional: float = Field(default=0.0, ge=0)
    """Largest |qty| × price of one order; a larger order is reduced to it (a close to flat is never reduced)."""
    max_symbol_notional: float = Field(default=0.0, ge=0)
    """Largest |position| × price per symbol after the order; an order that would exceed it is reduced."""
    max_total_notional: float = Field(default=0.0, ge=0)
    """Largest sum over symbols of |position| × price after the order."""
    max_leverage: float = Field(default=0.0, ge=0)
    """Largest total notional / total equity after the order."""
    max_orders_per_minute: int = Field(default=0, ge=0)
    """Orders sent in the last 60 s (wall clock) beyond which new ones are refused (closes still pass)."""
    max_daily_loss: float = Field(default=0.0, ge=0)
    """Equity below the UTC day's first equity by this fraction → HALTED (until ``rltrader trade resume``)."""
    max_drawdown: float = Field(default=0.0, ge=0, lt=1)
    """Equity below the session's peak by this fraction → REDUCING (only orders that shrink a position)."""
    stale_after_s: float = Field(default=150.0, ge=0)
    """No closed bar of a symbol for this many seconds → no new risk for it (0 = off)."""
    position_tolerance: float = Field(default=1e-9, ge=0)
    """Reconciliation: |journal − exchange| position beyond this (in base units) keeps the trader HALTED."""
    leverage: int = Field(default=1, ge=1)
    """Futures, testnet/live: the symbol leverage the account must have at start (checked, never changed)."""
    margin_type: Literal["cross", "isolated"] = "cross"
    """Futures, testnet/live: the margin type the account must have at start (one-way position mode too)."""


class Settings(_Strict):
    data: DataSettings = Field(default_factory=DataSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    execution: ExecutionParams = Field(default_factory=ExecutionParams)
    env: EnvParams = Field(default_factory=EnvParams)
    train: TrainSettings = Field(default_factory=TrainSettings)
    backtest: BacktestSettings = Field(default_factory=BacktestSettings)
    walk_forward: WalkForwardSettings = Field(default_factory=WalkForwardSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    promote: PromoteSettings = Field(default_factory=PromoteSettings)
    ensembles: dict[str, EnsembleSpec] = Field(default_factory=dict)
    """Multi-seed ensembles by name (``agents.ensemble``); judged and promoted like a trained model when listed
    in ``backtest.models`` / ``promote.candidates``."""
    tune: TuneSettings = Field(default_factory=TuneSettings)
    trader: TraderSettings = Field(default_factory=TraderSettings)
    risk: RiskSettings = Field(default_factory=RiskSettings)
    d3qn: dict[str, Any] = Field(default_factory=dict)
    """Validated by ``rltrader.agents.configs.D3QNConfig``. The algorithm sections stay the mappings as written:
    the train stage fills ``seed`` and ``device`` from ``train`` where they are absent, and ``params_hash``
    covers what was written."""
    ppo: dict[str, Any] = Field(default_factory=dict)
    """Validated by ``rltrader.agents.configs.PPOConfig``."""
    cnn: dict[str, Any] = Field(default_factory=dict)
    """Validated by ``rltrader.agents.configs.CNNConfig``."""
    xgb: dict[str, Any] = Field(default_factory=dict)
    """Validated by ``rltrader.agents.configs.XGBConfig``."""
    lowrider: dict[str, Any] = Field(default_factory=dict)
    """The ``lowrider`` variant's D3QN knobs (``agents.VARIANTS``): validated by ``D3QNConfig`` like ``d3qn``."""

    @field_validator("lowrider", mode="after")
    @classmethod
    def _variant_section(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        assert info.field_name is not None
        config_from_params(CONFIGS[VARIANTS[info.field_name]], info.field_name, v)
        return v

    @field_validator(*CONFIGS, mode="after")
    @classmethod
    def _algo_section(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        assert info.field_name is not None
        config_from_params(CONFIGS[info.field_name], info.field_name, v)  # raises ConfigError naming the key
        return v


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _env_overrides(env: dict[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    out: list[tuple[str, tuple[str, ...], Any]] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_PARAMS:
            continue
        path: tuple[str, ...]
        if name in ALIASES:
            path = ALIASES[name]
        elif "__" in name:
            path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        else:
            raise ConfigError(f"environment variable {name}: not a parameter (use RLTRADER_<SECTION>__<KEY> or "
                              f"one of {', '.join(sorted(ALIASES))})")
        out.append((name, path, yaml.safe_load(raw) if raw != "" else None))
    return out


def _format(exc: ValidationError, origin: dict[tuple[str, ...], str], file: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        where = origin.get(loc[:2], origin.get(loc[:1], file))
        msg = "unknown key" if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") else err["msg"]
        lines.append(f"{where}: {key}: {msg}")
    return "; ".join(lines)


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load ``params.yaml`` (``RLTRADER_PARAMS`` or the working directory's), overlay ``params.tuned.yaml`` from the
    same folder when present (:func:`overlay_tuned`), and apply env overrides."""
    env = dict(os.environ if env is None else env)
    p = Path(path or env.get("RLTRADER_PARAMS", "params.yaml"))
    tree: dict[str, Any] = {}
    if p.exists():
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded
    tree = overlay_tuned(tree, p.with_name(TUNED_PARAMS))
    known = {k: v for k, v in tree.items() if k in Settings.model_fields}
    unknown_sections = [k for k in tree if k not in Settings.model_fields]
    if unknown_sections:
        raise ConfigError(f"{p}: {unknown_sections[0]}: unknown section")
    origin: dict[tuple[str, ...], str] = {}
    for name, key_path, value in _env_overrides(env):
        _set_path(known, key_path, value)
        origin[key_path] = f"environment variable {name}"
    try:
        return Settings.model_validate(known)
    except ValidationError as exc:
        raise ConfigError(_format(exc, origin, str(p))) from exc
    except ConfigError as exc:  # a section's own checks name the key ("execution.leverage: …"); add where from
        msg = str(exc).removeprefix("params.yaml: ")
        key = tuple(msg.split(":", 1)[0].split("."))
        raise ConfigError(f"{origin.get(key[:2], origin.get(key[:1], str(p)))}: {msg}") from exc


TUNED_PARAMS = "params.tuned.yaml"
"""Written by ``rltrader tune`` beside params.yaml: the best trial's values, overlaid on params.yaml."""


def overlay_tuned(tree: dict[str, Any], tuned: Path) -> dict[str, Any]:
    """``params.yaml`` with the tuned values on top, key by key (so ``dvc repro`` after tuning trains the winner and
    everything the tuning did not touch stays as written). No file or an empty one changes nothing."""
    if not tuned.is_file():
        return tree
    try:
        extra = yaml.safe_load(tuned.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{tuned}: not valid YAML ({exc})") from exc
    if not isinstance(extra, dict):
        raise ConfigError(f"{tuned}: top level must be a mapping of sections")

    def merge(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in top.items()}}
        return top

    return dict(merge(tree, extra))


def params_hash(settings: Settings, sections: tuple[str, ...]) -> str:
    """Short sha256 of the named params sections: two models with the same hash were built with the same knobs
    (registry tag ``params_hash``). Paths and URLs are included as written; they do not change results."""
    import hashlib
    import json

    tree = settings.model_dump(mode="json")
    blob = json.dumps({k: tree.get(k) for k in sections}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TRAIN_SECTIONS = ("ingest", "features", "sessions", "execution", "env", "train")
"""Params that shape a trained model besides its own algorithm section."""
