"""The train split's feature statistics: what the backtest and the live trader standardise their rows with.

The sessions stage fits mean / std on the train split and writes them (with the clip and the context) into the
train split's Parquet metadata (``<sessions>/train/rows.parquet``). Every reader of those statistics goes through
``Normalization.from_sessions``, so the path, the checks and the error messages are one copy: a backtest and a
live run standardise with the same numbers by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rltrader.dataset.split import read_metadata
from rltrader.errors import DataError


@dataclass(frozen=True)
class Normalization:
    """The train split's feature statistics (the sessions stage's metadata)."""

    names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    clip: float
    context: int
    table: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The metadata's ``normalization`` entry as written (feature name → [mean, std]), for result metadata."""

    @classmethod
    def from_sessions(cls, sessions_dir: Path | str) -> Normalization:
        """Read ``<sessions_dir>/train/rows.parquet``'s metadata; a missing file or field is one ``DataError``
        naming the file (and the field)."""
        path = Path(sessions_dir) / "train" / "rows.parquet"
        if not path.exists():
            raise DataError(f"{path}: the train split is needed for the feature standardisation "
                            "(run `rltrader dataset sessions`)")
        meta = read_metadata(path)
        hint = "re-run `rltrader dataset sessions`"
        try:
            names = tuple(meta["features"])
            norm = meta["normalization"]
            mean = np.array([norm[n][0] for n in names])
            std = np.array([norm[n][1] for n in names])
            clip = float(meta["params"]["sessions"]["clip"])
            context = int(meta["context"])
        except KeyError as exc:
            raise DataError(f"{path}: the train split's metadata has no {exc.args[0]!r} entry (features, "
                            f"normalization per feature, params.sessions.clip, context); {hint}") from exc
        except (TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{path}: malformed normalization metadata ({exc}); {hint}") from exc
        return cls(names, mean, std, clip, context, norm)
