"""Pictures of the session dataset (PNG, so DVC's image plots and MLflow show them offline)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ExampleSession:
    """The bars of one session to draw: the sessions stage keeps only these of a split it streams to disk."""

    split: str
    symbol: str
    close: np.ndarray
    low: np.ndarray
    high: np.ndarray
    """(context + length,) each, from the first context bar to the last traded bar."""
    start_us: int
    """Open time of the first traded bar, µs since the epoch (UTC)."""
    context: int


def pick_examples(n_sessions: dict[str, int], count: int, seed: int = 0) -> list[tuple[str, int]]:
    """``count`` (split, session number) pairs, one split each in turn (in ``n_sessions``' order, skipping empty
    ones), chosen with a fixed seed so the picture only changes when the data does."""
    rng = np.random.default_rng(seed)
    picks: list[tuple[str, int]] = []
    names = [n for n, k in n_sessions.items() if k]
    while len(picks) < count and names:
        name = names[len(picks) % len(names)]
        picks.append((name, int(rng.integers(n_sessions[name]))))
    return picks


def plot_examples(examples: list[ExampleSession], path: Path) -> None:
    """A grid of example sessions: close price over the context (shaded) and the traded bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(examples)))
    rows = max(1, -(-len(examples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(examples):]:
        ax.axis("off")
    for ax, e in zip(axes.flat, examples, strict=False):
        x = np.arange(-e.context, len(e.close) - e.context)
        ax.plot(x, e.close, color="tab:blue", lw=1.2)
        ax.fill_between(x, e.low, e.high, color="tab:blue", alpha=0.15, lw=0)
        ax.axvspan(x[0], -0.5, color="grey", alpha=0.12, label="context")
        ax.axvline(-0.5, color="grey", lw=0.8)
        when = datetime.fromtimestamp(e.start_us / 1e6, UTC).strftime("%Y-%m-%d %H:%M")
        ax.set_title(f"{e.split}: {e.symbol} {when} UTC", fontsize=9)
        ax.set_xlabel("bars from session start", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Example sessions (shaded: context the agent sees; then the traded bars)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
