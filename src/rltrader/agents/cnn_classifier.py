"""Seed 002's "honest baseline": the same CNN trunk trained supervised to predict the direction of the bar an
order would fill in, trading on its prediction. If the RL agents cannot beat this, their RL adds nothing.

Samples are every decision of every train session (window = the ``context`` closed bars before the decision,
label = 1 when the fill bar closes above its open). The policy goes long when P(up) ≥ ``threshold``, short when
P(up) ≤ 1 - ``threshold`` (futures), and otherwise holds what it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch.nn import functional as F

from rltrader.agents.common import check_finite, pick_device, seed_everything
from rltrader.agents.configs import CNNConfig as CNNConfig  # re-exported
from rltrader.agents.networks import Classifier
from rltrader.dataset.split import SessionSet
from rltrader.env.core import N_STATE
from rltrader.env.modes import FuturesAction, SpotAction


def decision_samples(data: SessionSet) -> tuple[np.ndarray, np.ndarray]:
    """Decision rows of every session and their labels (fill bar up = 1)."""
    rows = (data.start[:, None] + np.arange(data.length)[None, :]).ravel()
    labels = (data.close[rows] > data.open[rows]).astype(np.int64)
    return rows, labels


@dataclass
class CNNResult:
    net: Classifier
    history: list[dict[str, float]]
    val_accuracy: float | None
    config: CNNConfig


def _windows(features: torch.Tensor, rows: np.ndarray, context: int) -> torch.Tensor:
    r = torch.as_tensor(rows, device=features.device)
    return features[r[:, None] + torch.arange(-context, 0, device=features.device)]


def train_cnn(train: SessionSet, val: SessionSet | None, cfg: CNNConfig, *, run: Any = None,
              progress: bool = True) -> CNNResult:
    rng = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    net = Classifier(train.n_features, train.context, N_STATE, 2, cfg.net).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    feats = torch.from_numpy(train.features).to(device)
    rows, labels = decision_samples(train)
    history: list[dict[str, float]] = []
    val_acc: float | None = None
    step = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("cnn classifier", total=cfg.epochs)
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(rows))[: cfg.max_samples]
            net.train()
            losses = []
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i: i + cfg.batch_size]
                x = _windows(feats, rows[idx], train.context)
                y = torch.as_tensor(labels[idx], device=device)
                logits = net(x, torch.zeros(len(idx), N_STATE, device=device))
                loss = F.cross_entropy(logits, y)
                check_finite(step, loss=loss)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                losses.append(loss.item())
                step += 1
            rec = {"epoch": float(epoch), "loss": float(np.mean(losses))}
            if val is not None:
                val_acc = accuracy(net, val)
                rec["val_accuracy"] = val_acc
            history.append(rec)
            if run is not None:
                import mlflow

                mlflow.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=epoch)
            bar.advance(task)
    return CNNResult(net, history, val_acc, cfg)


@torch.no_grad()
def predict_up(net: Classifier, windows: torch.Tensor) -> torch.Tensor:
    net.eval()
    logits = net(windows, torch.zeros(len(windows), N_STATE, device=windows.device))
    return torch.softmax(logits, dim=1)[:, 1]


def accuracy(net: Classifier, data: SessionSet, max_samples: int = 200_000) -> float:
    device = next(net.parameters()).device
    rows, labels = decision_samples(data)
    rows, labels = rows[:max_samples], labels[:max_samples]
    feats = torch.from_numpy(data.features).to(device)
    hits = 0
    for i in range(0, len(rows), 4096):
        p = predict_up(net, _windows(feats, rows[i: i + 4096], data.context)).cpu().numpy()
        hits += int(((p >= 0.5).astype(np.int64) == labels[i: i + 4096]).sum())
    return hits / max(len(rows), 1)


def threshold_scores(p: torch.Tensor, side: torch.Tensor, up_at: float, down_at: float,
                     futures: bool) -> torch.Tensor:
    """The classifier's trading rule as action scores — the one copy that ``ClassifierActions`` and the XGB
    forecast policy (``ForecastActions``) share (``packaging.head_scores`` is its numba twin for the backtest):
    1 for the trade a signal calls for (``p >= up_at``: long/buy, ``p <= down_at``: short/sell) when the
    position side allows it, 0 for hold, -1 otherwise, so the masked argmax trades the signal and holds
    otherwise."""
    up, down = p >= up_at, p <= down_at
    n_actions = len(FuturesAction) if futures else len(SpotAction)
    scores = torch.full((len(p), n_actions), -1.0, device=p.device)
    scores[:, FuturesAction.HOLD] = 0.0
    if futures:
        scores[:, FuturesAction.LONG] = torch.where(up & (side <= 0), 1.0, -1.0)
        scores[:, FuturesAction.SHORT] = torch.where(down & (side >= 0), 1.0, -1.0)
    else:
        scores[:, SpotAction.BUY] = torch.where(up & (side == 0), 1.0, -1.0)
        scores[:, SpotAction.SELL] = torch.where(down & (side > 0), 1.0, -1.0)
    return scores


class ClassifierActions(torch.nn.Module):
    """The classifier as an action-scoring module (what gets packaged and registered like the RL agents):
    ``threshold_scores`` on P(up) against the threshold (futures: long/short; spot: buy/sell)."""

    def __init__(self, net: Classifier, threshold: float, mode: str = "futures_session") -> None:
        super().__init__()
        self.net, self.threshold, self.mode = net, threshold, mode

    def head_params(self) -> np.ndarray:
        """(up, down, futures) for ``packaging.head_scores``: the thresholds as float32, as torch compares a
        float32 probability with them."""
        t = self.threshold
        return np.array([np.float32(t), np.float32(1 - t), float(self.mode == "futures_session")])

    def forward(self, windows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.net(windows, torch.zeros_like(state)), dim=1)[:, 1]
        return threshold_scores(p, state[:, 0], self.threshold, 1 - self.threshold,
                                self.mode == "futures_session")
