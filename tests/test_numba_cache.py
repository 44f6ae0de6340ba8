"""numba's on-disk kernel cache lives in a folder keyed by the package's source (``rltrader._numba_cache_dir``), so a
change to a function another module's kernel inlines cannot leave stale machine code behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_are_cached_under_a_folder_keyed_by_the_source(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    code = ("import os, numpy as np, rltrader; from rltrader.env.core import gather_windows; "
            "gather_windows(np.ones((5, 2), np.float32), np.array([3]), np.zeros((1, 2, 2), np.float32)); "
            "print(os.environ['NUMBA_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cache = Path(out.stdout.strip())
    assert cache.parent == tmp_path / "rltrader" / "numba" and len(cache.name) == 16
    assert any(cache.rglob("*.nbi")), "no kernel was cached in the keyed folder"
    # a source change moves the key: the same hash over a copy of the package with one byte changed differs
    import rltrader

    src = Path(rltrader.__file__).parent
    copy = tmp_path / "pkg" / "rltrader"
    for p in src.rglob("*.py"):
        (copy / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        (copy / p.relative_to(src)).write_bytes(p.read_bytes())
    key = subprocess.run([sys.executable, "-c", "import rltrader; print(rltrader._numba_cache_dir().name)"],
                         env=env | {"PYTHONPATH": str(copy.parent)}, capture_output=True, text=True, check=True)
    assert key.stdout.strip() == cache.name
    (copy / "execution.py").write_text((copy / "execution.py").read_text() + "\n# changed\n")
    key2 = subprocess.run([sys.executable, "-c", "import rltrader; print(rltrader._numba_cache_dir().name)"],
                          env=env | {"PYTHONPATH": str(copy.parent)}, capture_output=True, text=True, check=True)
    assert key2.stdout.strip() != cache.name
