#!/usr/bin/env bash
# ONE command for the main job on a fresh machine: set up, then `dvc repro` on the default params.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
dvc repro "$@"
# The headline numbers (`dvc metrics show` lists every metric of every stage, one wide row per file).
python - <<'PY'
import json, pathlib
num = lambda v: float("nan") if v is None else v  # JSON null = undefined metric
bt = json.loads(pathlib.Path("reports/backtest.json").read_text())
for split, policies in bt.items():
    print(f"\n{split}: continuous run, net of costs")
    print(f"  {'policy':<14}{'return %':>10}{'Sharpe':>9}{'max DD %':>10}{'trades':>8}")
    for name, m in sorted(policies.items(), key=lambda kv: -num(kv[1]["sharpe_daily_annualized"]) if kv[1]["sharpe_daily_annualized"] is not None else 1e9):
        print(f"  {name:<14}{100 * (m['total_return'] or 0):>10.2f}{num(m['sharpe_daily_annualized']):>9.2f}"
              f"{100 * (m['max_drawdown'] or 0):>10.2f}{int(m['n_trades'] or 0):>8}")
d = json.loads(pathlib.Path("reports/promotion.json").read_text())
print(f"\npromotion: {d['action']} {d['challenger']} v{d['challenger_version']}")
for g in d["gates"]:
    print(f"  [{'pass' if g['passed'] else 'FAIL'}] {g['name']}: {g['detail']}")
print("\nreports: reports/backtest/<model>/report.html · dvc metrics show · dvc plots show · mlflow/README.md")
PY
