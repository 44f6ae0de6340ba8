"""Byte-for-byte check of the ``sessions`` stage's outputs between two source trees, on the real shared data.

    git archive <ref> src | tar -x -C /tmp/before    # the reference tree, e.g. the commit before the change
    python benchmarks/compare_sessions.py --before /tmp/before/src [--after src] [--variants default,gappy,dense]

Why: a memory change to the sessions stage (``rltrader.dataset.build`` / ``split``) must not move a byte of
what it writes — the trained models, the backtest and every reported figure read these files. The script fills
a ParquetStore from every shared futures-um 1m kline zip, runs ``run_features_stage`` once per variant, then
``run_sessions_stage`` once with each tree's ``rltrader`` (a subprocess each, so the two versions never share a
process) over the same features, and compares every file the stage writes (each split's ``rows.parquet`` and
``index.parquet``, ``summary.json``, the metrics JSON and the example plot PNG) as raw bytes. The code version
in the metadata (git commit, a hash of the dataset code) is pinned to one value in both runs: it is meant to
differ between two trees, and it is the only thing that may. Where bytes differ, the decoded tables are
compared too, to tell a layout difference from a value difference.

Variants: ``default`` (params.yaml's sessions over the real bars), ``gappy`` (every 997th bar dropped from the
store, so every symbol has many gap-free segments), ``dense`` (no volatility filter, stride 5, context 20,
length 5, min_abs_move 5e-4: more rows per split, so train spans two row groups of ``rows.parquet``). Prints one
JSON line and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "gappy": {},
    "dense": {"volatility_percentile": 0, "stride": 5, "context": 20, "length": 5, "min_abs_move": 5e-4},
}

_SETTINGS = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import bench_dataset as b
from rltrader.config import Settings
base = Path({base!r})
syms = list(b.discover(base))
dump = b.stage_settings(Path({data!r}), syms).model_dump(mode="json")
settings = Settings.model_validate({{**dump, "sessions": {{**dump["sessions"], **{sessions!r}}}}})
"""

_FEATURES = _SETTINGS + """
import polars as pl
from rltrader.data.parquet_store import ParquetStore
from rltrader.dataset.build import run_features_stage
store = ParquetStore(Path({store!r}))
for df in b.load_bars(base, b.discover(base)).values():
    if {gappy!r}:
        df = df.filter(pl.int_range(pl.len()) % 997 != 996)
    store.write_klines(df)
run_features_stage(settings, store, Path({features!r}))
"""

_SESSIONS = _SETTINGS + """
import rltrader.dataset.build as build
build.code_version = lambda: {{"pinned": "compare_sessions"}}  # the one field meant to differ between trees
out = Path({out!r})
build.run_sessions_stage(settings, Path({features!r}), out / "sessions", out / "metrics.json", out / "plot.png")
"""


def run(src: Path, template: str, **kw: object) -> None:
    code = template.format(bench=str(REPO / "benchmarks"), **kw)
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> tuple[list[str], int]:
    """Differences between two output folders, and the number of files compared."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if files != other:
        return [f"different files: {files} vs {other}"], 0
    diffs = []
    for rel in files:
        if sha(a / rel) == sha(b / rel):
            continue
        what = "bytes differ"
        if rel.endswith(".parquet"):
            ta, tb = pq.read_table(a / rel), pq.read_table(b / rel)
            what += ("; decoded tables equal (layout only)" if ta.equals(tb, check_metadata=True)
                     else "; decoded tables differ")
        diffs.append(f"{rel}: {what}")
    return diffs, len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--before", required=True, help="src folder of the reference tree (e.g. /tmp/before/src)")
    ap.add_argument("--after", default=str(REPO / "src"), help="src folder of the tree under test")
    ap.add_argument("--archive-base", default=str(REPO.parent / "shared" / "data" / "binance"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    results = {}
    all_diffs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cmp-sessions-") as tmp_s:
        tmp = Path(tmp_s)
        for variant in args.variants.split(","):
            d = tmp / variant
            kw = {"base": args.archive_base, "data": str(d / "data"), "sessions": VARIANTS[variant],
                  "features": str(d / "features")}
            run(Path(args.after), _FEATURES, store=str(d / "store"), gappy=variant == "gappy", **kw)
            for tree, src in (("before", args.before), ("after", args.after)):
                run(Path(src), _SESSIONS, out=str(d / tree), **kw)
            diffs, n_files = compare(d / "before", d / "after")
            summary = json.loads((d / "before" / "sessions" / "summary.json").read_text())
            results[variant] = {"files": n_files, "identical": not diffs,
                                "rows": {k: v["rows"] for k, v in summary["splits"].items()},
                                "sessions": {k: v["sessions"] for k, v in summary["splits"].items()},
                                "row_groups": {k: pq.ParquetFile(d / "before" / "sessions" / k / "rows.parquet")
                                               .metadata.num_row_groups for k in summary["splits"]}}
            all_diffs += [f"{variant}/{x}" for x in diffs]
    print(json.dumps({"check": "sessions_stage_byte_identical", "identical": not all_diffs, "variants": results,
                      "differences": all_diffs[:20]}))
    sys.exit(1 if all_diffs else 0)


if __name__ == "__main__":
    main()
