"""Forecast-then-trade: the signal study's XGBoost forecaster as a threshold policy (``rltrader train xgb``).

Why a baseline of its own: the study (``rltrader.study``) measures whether a supervised forecast clears the costs
in a fixed-horizon trade on its own rows; this turns the same forecaster into a policy that the backtest, the
registry and the trader judge exactly like the RL agents (same continuous run, same execution kernel, same gates).
If the RL agents cannot beat it, their RL adds nothing over "forecast, then trade when it pays".

- Fit: the study's ``XGB`` (``study.models``) on every ``train_stride``-th bar of the train split of the
  ``features`` stage output (``study.data.load_rows``: volatility-normalised forward returns, no train target
  crosses into val), with the features standardised and clipped exactly as the sessions stage does (train
  mean/std), so the model's inputs are the last row of the observation window the envs hand any policy.
- Choice on val, never test/backtest: for each horizon in ``xgb.horizons`` and each ``k`` in ``xgb.thresholds``
  the study's threshold table (trade in the forecast's direction when ``|forecast| > k × cost``, held ``h``
  bars) on the val rows; the (h, k) with the largest total net result among those with ``min_trades`` trades is
  kept (``study.signal.choose_threshold``). When none qualifies, ``k = ∞``: the policy never trades (flat),
  and says so, rather than claiming an edge or failing the pipeline.
- Act: the forecast in cost units ``p = f · σ · √h / cost`` (``σ``: the window's last ``rv_<vol_window>``
  feature, de-standardised; ``cost``: the train split's mean round-trip cost through the execution kernel's
  ``fill_price``). The rule is the CNN classifier's (``ClassifierActions``) with ``p`` in place of ``P(up)``:
  long (buy) when ``p ≥ k``, short (sell) when ``p ≤ -k``, otherwise hold what it has — a position is held
  until the forecast flips past the threshold. (A fixed ``h``-bar holding time would need the bars-in-position
  in the env's state vector, which it does not carry.)

The booster lives in the module as a ``uint8`` buffer (its UBJSON bytes), so the weights hash that every load
checks (``packaging.weights_sha256``) covers the trees too, and the module pickles into ``.pt`` files and
MLflow models like the networks. ``PolicyModule.split`` cuts it like the classifier: the forecast is computed
for all decision rows in batches, the rule runs in the backtest's numba loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from rltrader.agents.cnn_classifier import threshold_scores
from rltrader.agents.configs import XGBConfig
from rltrader.dataset.build import standardize
from rltrader.dataset.split import SessionSet
from rltrader.errors import ConfigError, DataError

console = Console(stderr=True)


class XGBForecaster(torch.nn.Module):
    """Windows (B, context, F) → the forecast in round-trip-cost units ``p`` (B, 1) float32, from the last row."""

    booster_raw: torch.Tensor
    scale: torch.Tensor

    def __init__(self, booster_raw: bytes, sigma_col: int, sigma_mean: float, sigma_std: float, horizon: int,
                 cost: float) -> None:
        super().__init__()
        self.register_buffer("booster_raw", torch.frombuffer(bytearray(booster_raw), dtype=torch.uint8).clone())
        # σ = z·std + mean of the rv feature; p = f·σ·√h / cost (float64: the hash covers them)
        self.register_buffer("scale", torch.tensor([sigma_col, sigma_mean, sigma_std, math.sqrt(horizon), cost],
                                                   dtype=torch.float64))
        self.horizon = horizon
        self._booster: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_booster"] = None  # rebuilt from the buffer: the pickled form is the hashed bytes only
        return state

    def booster(self) -> Any:
        if self._booster is None:
            import xgboost as xgb

            bst = xgb.Booster()
            bst.load_model(bytearray(self.booster_raw.cpu().numpy().tobytes()))
            bst.set_param({"nthread": 1})
            self._booster = bst
        return self._booster

    def forecast(self, last: np.ndarray) -> np.ndarray:
        """(B, F) standardised features of the last closed bar → ``p`` (B,) float32."""
        col, mean, std, sqrt_h, cost = (float(v) for v in self.scale.cpu().numpy())
        x = np.ascontiguousarray(last, dtype=np.float32)
        if len(x) == 0:
            return np.zeros(0, np.float32)
        f = np.asarray(self.booster().inplace_predict(x), dtype=np.float64)
        sigma = np.maximum(x[:, int(col)].astype(np.float64) * std + mean, 0.0)
        out: np.ndarray = (f * sigma * sqrt_h / cost).astype(np.float32)
        return out

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        p = self.forecast(windows[:, -1, :].detach().float().cpu().numpy())
        return torch.from_numpy(p).to(windows.device)[:, None]


class ForecastActions(torch.nn.Module):
    """The threshold rule as an action-scoring module (what gets packaged and registered like the agents): score
    1 for the trade the forecast calls for, 0 for hold, -1 otherwise (``ClassifierActions``' scores, with the
    forecast in cost units against ``±k`` in place of P(up) against the threshold)."""

    def __init__(self, forecaster: XGBForecaster, k: float, mode: str = "futures_session") -> None:
        super().__init__()
        if mode not in ("futures_session", "spot_cycle"):
            raise ConfigError(f"xgb: the threshold policy trades futures_session or spot_cycle (env.mode is {mode})")
        self.forecaster, self.k, self.mode = forecaster, float(k), mode

    def head_params(self) -> np.ndarray:
        """The classifier head's (up, down, futures) thresholds: float32 values, as the forward compares them."""
        return np.array([np.float32(self.k), np.float32(-self.k), float(self.mode == "futures_session")])

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        hp = self.head_params()
        return threshold_scores(self.forecaster(windows)[:, 0], state[:, 0], float(hp[0]), float(hp[1]),
                                self.mode == "futures_session")


@dataclass
class XGBResult:
    net: ForecastActions
    history: list[dict[str, float]]
    chosen: dict[str, float]
    config: XGBConfig


def _normalization(train: SessionSet) -> tuple[np.ndarray, np.ndarray, float]:
    norm = train.meta["normalization"]
    mean = np.array([norm[n][0] for n in train.feature_names], dtype=np.float64)
    std = np.array([norm[n][1] for n in train.feature_names], dtype=np.float64)
    return mean, std, float(train.meta["params"]["sessions"]["clip"])


def train_xgb(settings: Any, train: SessionSet, cfg: XGBConfig, mode: str, *, features_dir: Path | None = None,
              run: Any = None) -> XGBResult:
    """Fit per horizon on train, choose (horizon, k) on val (module docstring); the model of the chosen horizon."""
    from rltrader.study.data import load_rows
    from rltrader.study.models import XGB
    from rltrader.study.signal import choose_threshold, threshold_table

    sigma_name = f"rv_{cfg.vol_window}"
    names = tuple(train.feature_names)
    if sigma_name not in names:
        raise ConfigError(f"xgb.vol_window: the policy reads σ from the feature {sigma_name!r}, which the features "
                          f"do not have (features.volatility lists the rv windows)")
    fdir = Path(features_dir or settings.data.dir / "features")
    rows = load_rows(settings, fdir, list(train.symbols), [cfg.train_split, cfg.select_split],
                     train_split=cfg.train_split, train_stride=cfg.train_stride, eval_stride=cfg.eval_stride,
                     horizons=list(cfg.horizons), vol_window=cfg.vol_window)
    if rows.names != names:
        raise DataError(f"{fdir}: feature columns differ from the sessions' ({len(rows.names)} vs {len(names)}): "
                        "re-run `rltrader dataset sessions` after `rltrader dataset features`")
    mean, std, clip = _normalization(train)
    x = standardize(rows.x, mean, std, clip)  # exactly the sessions stage's / continuous backtest's inputs
    costs = [c for c in rows.cost.get(cfg.train_split, {}).values() if math.isfinite(c)]
    if not costs:
        raise DataError(f"xgb: no train rows to price the round trip (sessions.splits.{cfg.train_split})")
    cost = float(np.mean(costs))
    tr_id, va_id = rows.splits.index(cfg.train_split), rows.splits.index(cfg.select_split)
    col = names.index(sigma_name)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, float], Any] | None = None
    last_model: dict[int, Any] = {}
    for h in cfg.horizons:
        y = rows.target(h)
        tr = (rows.split_id == tr_id) & np.isfinite(y)
        va = (rows.split_id == va_id) & np.isfinite(y)
        if tr.sum() < 100 or va.sum() < cfg.min_trades:
            raise DataError(f"xgb: {int(tr.sum())} train / {int(va.sum())} val rows at horizon {h} (need ≥ 100 / "
                            f"≥ xgb.min_trades): is there data in sessions.splits {cfg.train_split} and "
                            f"{cfg.select_split}?")
        model = XGB(rounds=cfg.rounds, depth=cfg.depth, eta=cfg.eta, threads=cfg.threads, seed=cfg.seed)
        model.fit(x[tr], np.clip(y[tr], -cfg.target_clip, cfg.target_clip))
        last_model[h] = model
        # σ as the policy will see it: the standardised, clipped rv feature, de-standardised
        sigma = np.maximum(x[va, col].astype(np.float64) * std[col] + mean[col], 0.0)
        f_ret = model.predict(x[va]) * sigma * math.sqrt(h)
        table = threshold_table(f_ret, rows.fwd[h][va], np.full(int(va.sum()), cost), rows.day[va],
                                cfg.thresholds)
        for r in table:
            rec = {"horizon": float(h), "k": r["k"], "val_trades": float(r["trades"]),
                   "val_gross_bps": 1e4 * r["gross"],
                   "val_net_bps": 1e4 * r["net"], "val_total_net": r["trades"] * r["net"] if r["trades"] else 0.0}
            history.append(rec)
            if run is not None:
                import mlflow

                mlflow.log_metrics({f"val_h{h}_k{r['k']:g}_{k}": v for k, v in rec.items()
                                    if k not in ("horizon", "k") and math.isfinite(v)})
        ch = choose_threshold(table, cfg.min_trades)
        console.print(f"xgb h={h}: " + "  ".join(
            f"k={r['k']:g} {r['trades']} trades net {1e4 * r['net']:+.2f} bps" for r in table), soft_wrap=True)
        if ch is not None:
            total = ch["trades"] * ch["net"]
            if best is None or total > best[0]:
                best = (total, h, ch, model)
    if best is None:  # nothing to claim: a policy that never trades (k = ∞), judged like the others
        console.print(f"xgb: no (horizon, k) has ≥ {cfg.min_trades} trades on {cfg.select_split}: the policy never "
                      "trades (lower xgb.thresholds or xgb.min_trades to let it)", soft_wrap=True)
        h = int(cfg.horizons[0])
        best = (0.0, h, {"k": math.inf, "trades": 0.0, "net": math.nan}, last_model[h])
    total, h, ch, model = best
    chosen = {"horizon": float(h), "k": float(ch["k"]), "cost": cost, "val_trades": float(ch["trades"]),
              "val_net_bps": 1e4 * float(ch["net"]), "val_total_net": float(total)}
    console.print(f"xgb: chosen on {cfg.select_split}: horizon {h}, k={ch['k']:g} × cost ({1e4 * cost:.2f} bps)",
                  soft_wrap=True)
    forecaster = XGBForecaster(bytes(model.booster.save_raw("ubj")), col, float(mean[col]), float(std[col]), h, cost)
    return XGBResult(ForecastActions(forecaster, ch["k"], mode), history, chosen, cfg)
