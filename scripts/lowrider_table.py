"""Issue 14 part 4: train the ``lowrider`` variant on already-built sessions and write the Lowrider table (val and
backtest) — the backtest stage's Lowrider section without the other models.

    python scripts/lowrider_table.py --features data/features --sessions data/sessions --out reports/lowrider_hold.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rltrader.agents.packaging import load_policy_file
from rltrader.config import load_settings
from rltrader.evaluate.backtest import continuous_split
from rltrader.evaluate.lowrider import run_lowrider_tables
from rltrader.train import run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=Path("data/features"))
    ap.add_argument("--sessions", type=Path, default=Path("data/sessions"))
    ap.add_argument("--work", type=Path, default=Path("data/lowrider_run"))
    ap.add_argument("--out", type=Path, default=Path("reports/lowrider_hold.json"))
    args = ap.parse_args()
    s = load_settings()
    work = args.work
    s = s.model_copy(update={"train": s.train.model_copy(update={
        "models_dir": work / "models", "checkpoint_dir": work / "ckpt", "val_sessions": 300})})
    t0 = time.perf_counter()
    res = run_train(s, "lowrider", progress=False, sessions_dir=args.sessions,
                    metrics_path=work / "train_lowrider.json")
    train_s = time.perf_counter() - t0
    splits = ["val", "backtest"]
    datas = {sp: continuous_split(s, sp, sessions_dir=args.sessions, features_dir=args.features) for sp in splits}
    out = run_lowrider_tables(
        s, splits, ["lowrider"],
        lambda n: load_policy_file(work / "models" / f"{n}.pt", {"dvc_stage": "train@lowrider"}), datas,
        work / "report")
    out["how"] = f"scripts/lowrider_table.py; train@lowrider run {res['run_id']} ({train_s:.0f} s)"
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    for split in splits:
        for line in out["verdicts"][split]:
            print(line)


if __name__ == "__main__":
    main()
