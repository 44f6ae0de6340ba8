"""The study's forecasters: ridge regression (closed form) and XGBoost, both fitted on the train split only.

Ridge is the linear yardstick: if a tree ensemble cannot beat it out of sample the extra capacity is fitting noise.
XGBoost is kept small and heavily regularised on purpose (shallow trees, large leaves, row/column subsampling): at
1-minute bars the signal-to-noise ratio is tiny, and a flexible model memorises the train split's noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Forecaster(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> Forecaster: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class Ridge:
    """``min mean((y - b - z·w)²) + alpha·|w|²`` on features standardised with the fit data's mean and std."""

    alpha: float = 0.1
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.ones(0))
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))
    intercept: float = 0.0

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ridge:
        x64 = x.astype(np.float64)
        self.mean = x64.mean(axis=0)
        sd = x64.std(axis=0)
        self.std = np.where(sd > 1e-12, sd, 1.0)
        z = (x64 - self.mean) / self.std
        n = len(y)
        self.intercept = float(y.mean())
        a = z.T @ z / n + self.alpha * np.eye(z.shape[1])
        self.coef = np.linalg.solve(a, z.T @ (y - self.intercept) / n)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((x.astype(np.float64) - self.mean) / self.std) @ self.coef + self.intercept
        return out


@dataclass
class XGB:
    """``xgboost.train`` with squared error on the (clipped) normalised target; ``threads`` CPU threads."""

    rounds: int = 100
    depth: int = 4
    eta: float = 0.05
    threads: int = 1
    seed: int = 0
    booster: Any = None

    def params(self) -> dict[str, Any]:
        return {"objective": "reg:squarederror", "tree_method": "hist", "max_depth": self.depth, "eta": self.eta,
                "subsample": 0.7, "colsample_bytree": 0.7, "min_child_weight": 200.0, "lambda": 10.0,
                "nthread": self.threads, "seed": self.seed, "verbosity": 0}

    def fit(self, x: np.ndarray, y: np.ndarray) -> XGB:
        import xgboost as xgb  # only when used: the import costs a second

        self.booster = xgb.train(self.params(), xgb.DMatrix(x, label=y, nthread=self.threads),
                                 num_boost_round=self.rounds)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        out: np.ndarray = self.booster.predict(xgb.DMatrix(x, nthread=self.threads)).astype(np.float64)
        return out


def make_model(kind: str, study: Any) -> Forecaster:
    """A fresh forecaster from ``params.yaml: study``."""
    if kind == "ridge":
        return Ridge(alpha=study.ridge_alpha)
    if kind == "xgboost":
        return XGB(rounds=study.xgb_rounds, depth=study.xgb_depth, eta=study.xgb_eta, threads=study.xgb_threads,
                   seed=study.seed)
    raise ValueError(f"study.models: unknown model {kind!r} (ridge or xgboost)")


FEATURE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("market", ("mkt_", "resid_")),
    ("tf15m", ("tf15m_",)),
    ("tf1h", ("tf1h_",)),
    ("tf4h", ("tf4h_",)),
    ("returns", ("ret_",)),
    ("trend", ("ema_dist_", "macd")),
    ("oscillators", ("rsi", "bb_pctb")),
    ("volatility", ("rv_", "atr", "bb_width")),
    ("volume", ("volume_z", "trades_z", "taker_buy")),
    ("calendar", ("tod_", "dow_")),
)
"""Ablation groups by name prefix, first match wins (``tf4h_rsi`` is tf4h, not oscillators)."""


def feature_group(name: str) -> str:
    for group, prefixes in FEATURE_GROUPS:
        if name.startswith(prefixes):
            return group
    if name.startswith("tf"):
        return name.split("_", 1)[0]
    return "other"
