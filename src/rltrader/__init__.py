"""rltrader: Binance market data → features → RL agents → backtest → promotion → trading."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _numba_cache_dir() -> Path:
    """Where numba's ``cache=True`` kernels are kept: a folder keyed by a hash of this package's source.

    Why: numba invalidates a cached kernel only when the file that defines it changes, not when a function it
    inlines from another module does (the env kernel inlines ``execution``'s fill code; the backtest loops inline
    the env's). After an update that touched only the callee, the stale machine code would silently keep the old
    arithmetic. Keying the folder by every source file makes any change start from a fresh cache; hashing ~1 MB
    of source costs a few milliseconds per process."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rltrader" / "numba"
    return base / h.hexdigest()[:16]


if not os.environ.get("NUMBA_CACHE_DIR"):  # a folder the user chose wins
    os.environ["NUMBA_CACHE_DIR"] = str(_numba_cache_dir())
    if "numba" in sys.modules:  # numba read its config already: tell it too
        from numba.core import config as _numba_config

        setattr(_numba_config, "CACHE_DIR", os.environ["NUMBA_CACHE_DIR"])  # noqa: B010 (typed stubs lack it)
