"""Bit-for-bit check of the ``features`` stage's output between two source trees, on the real shared data.

    git worktree add ../rltrader-before main   # the reference tree, e.g. the commit before the change
    python benchmarks/compare_features.py --before ../rltrader-before/src [--after src] [--archive-base PATH]

Why: a speed change to ``rltrader.dataset.features`` must not move a single feature value (the sessions, the
trained models and every reported figure depend on them). The script fills a ParquetStore from every shared
futures-um 1m kline zip, runs ``run_features_stage`` once with each tree's ``rltrader`` (a subprocess each, so
the two versions never share a process), and compares every per-symbol Parquet table: same schema, same rows,
and float columns equal as raw bits (nulls in the same places). Prints one JSON line and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent

_STAGE = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import bench_dataset as b
from rltrader.data.parquet_store import ParquetStore
from rltrader.dataset.build import run_features_stage
base = Path({base!r})
store = ParquetStore(Path({store!r}))
syms = list(b.discover(base))
if {fill!r}:
    for df in b.load_bars(base, b.discover(base)).values():
        store.write_klines(df)
run_features_stage(b.stage_settings(Path({data!r}), syms), store, Path({out!r}))
"""


def run_stage(src: Path, base: Path, store: Path, data: Path, out: Path, fill: bool) -> None:
    code = _STAGE.format(bench=str(REPO / "benchmarks"), base=str(base), store=str(store), data=str(data),
                         out=str(out), fill=fill)
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def bits(s: pl.Series) -> np.ndarray:
    """Raw bits of a float column (nulls as 0), so -0.0 ≠ 0.0 and NaN payloads count; other columns as-is."""
    if not s.dtype.is_float():
        return s.drop_nulls().to_numpy()
    arr = s.fill_null(0.0).to_numpy()
    return arr.view(np.int32 if arr.dtype == np.float32 else np.int64)


def compare(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    names = sorted(p.name for p in a.glob("*.parquet"))
    if names != sorted(p.name for p in b.glob("*.parquet")):
        return [f"different files: {names} vs {sorted(p.name for p in b.glob('*.parquet'))}"]
    for name in names:
        x, y = pl.read_parquet(a / name), pl.read_parquet(b / name)
        if x.schema != y.schema or x.height != y.height:
            diffs.append(f"{name}: schema/rows differ")
            continue
        for col in x.columns:
            sx, sy = x[col], y[col]
            same_nulls = bool((sx.is_null() == sy.is_null()).all())
            if not same_nulls or not np.array_equal(bits(sx), bits(sy)):
                diffs.append(f"{name}.{col}: values differ")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--before", required=True, help="src folder of the reference tree (e.g. ../rltrader-before/src)")
    ap.add_argument("--after", default=str(REPO / "src"), help="src folder of the tree under test")
    ap.add_argument("--archive-base", default=str(REPO.parent / "shared" / "data" / "binance"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmp-features-") as tmp_s:
        tmp = Path(tmp_s)
        store, data = tmp / "store", tmp / "data"
        run_stage(Path(args.before), Path(args.archive_base), store, data, tmp / "before", fill=True)
        run_stage(Path(args.after), Path(args.archive_base), store, data, tmp / "after", fill=False)
        diffs = compare(tmp / "before", tmp / "after")
        tables = len(list((tmp / "before").glob("*.parquet")))
        rows = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in (tmp / "before").glob("*.parquet"))
    print(json.dumps({"check": "features_stage_bit_identical", "tables": tables, "rows": rows,
                      "identical": not diffs, "differences": diffs[:20]}))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
