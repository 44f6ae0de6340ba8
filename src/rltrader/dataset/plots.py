"""Pictures of the session dataset (PNG, so DVC's image plots and MLflow show them offline)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rltrader.dataset.split import SessionSet


def plot_example_sessions(sets: dict[str, SessionSet], path: Path, count: int, seed: int = 0) -> None:
    """A grid of example sessions: close price over the context (shaded) and the traded bars, one split each
    in turn, chosen with a fixed seed so the picture only changes when the data does."""
    rng = np.random.default_rng(seed)
    picks: list[tuple[str, SessionSet, int]] = []
    names = [n for n, s in sets.items() if s.n_sessions]
    while len(picks) < count and names:
        name = names[len(picks) % len(names)]
        s = sets[name]
        picks.append((name, s, int(rng.integers(s.n_sessions))))
    cols = min(3, max(1, len(picks)))
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    for ax, (name, s, i) in zip(axes.flat, picks, strict=False):
        lo, st, en = int(s.ctx_start[i]), int(s.start[i]), int(s.end[i])
        x = np.arange(lo - st, en - st)
        ax.plot(x, s.close[lo:en], color="tab:blue", lw=1.2)
        ax.fill_between(x, s.low[lo:en], s.high[lo:en], color="tab:blue", alpha=0.15, lw=0)
        ax.axvspan(x[0], -0.5, color="grey", alpha=0.12, label="context")
        ax.axvline(-0.5, color="grey", lw=0.8)
        when = datetime.fromtimestamp(s.time[st] / 1e6, UTC).strftime("%Y-%m-%d %H:%M")
        ax.set_title(f"{name}: {s.session_symbol(i)} {when} UTC", fontsize=9)
        ax.set_xlabel("bars from session start", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Example sessions (shaded: context the agent sees; then the traded bars)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
