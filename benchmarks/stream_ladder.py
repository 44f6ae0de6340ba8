"""The stream's paced ladder into PostgreSQL and Parquet only (no naive peer), with bench_stream's own pieces.

Run: ``.venv/bin/python benchmarks/stream_ladder.py [RATES [STEP_S [N_FAST]]]``, e.g.
``40000,50000,60000,70000,80000,100000 5 200000``. Same sender, replay REST, ingester and pass rule as
``bench_stream.py`` (p99 lag < 1 s and the last commit within 1 s of the last frame); prints one JSON object:
the ceiling per store, the load average at start and end, every run's figures. For comparing two versions of
the stores on a shared machine (run them back to back with different ``PYTHONPATH``): the full bench_stream's
naive peer hung at 10 k msgs/s in one run on the 2-core box and takes minutes per rung.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import _harness as h
import bench_stream as b

from rltrader.data.store import Store, open_store
from rltrader.testing import TempPostgres

log = h.logger("stream_ladder")


def main() -> None:
    ladder = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "40000,50000,60000,80000").split(",")]
    step_s = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    n_fast = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    load0 = os.getloadavg()[0]
    sender = b.Sender(max(n_fast, int(ladder[-1] * step_s)))
    replay = b.Replay(0.0)
    runs: dict[str, dict[str, Any]] = {}
    try:
        with TempPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
            def ours(kind: str, label: str, r: float, n: int) -> dict[str, Any]:
                store: Store = (open_store(pg.create_database(label), Path(tmp)) if kind == "pg"
                                else open_store(f"parquet://{tmp}/{label}", Path(tmp)))
                try:
                    out: dict[str, Any] = dict(b.run_ours(store, replay, sender, r, n))
                finally:
                    store.close()
                out["rate"], out["capacity"] = b.rate(out), b.capacity(out)
                log(f"{label}: {out['rate']:,.0f} msgs/s, {out['capacity']:,.0f} msgs/cpu-s, p99 {out['p99']:.3f} s")
                runs[label] = out
                return out

            for who in ("pg", "parquet"):
                ours(who, f"{who}_fast", 0, n_fast)
            ceilings, alive = {"pg": 0, "parquet": 0}, {"pg": True, "parquet": True}
            for r in ladder:
                n = int(r * step_s)
                for who in ("pg", "parquet"):
                    if alive[who]:
                        out = ours(who, f"{who}_ladder_{r}", r, n)
                        if b.kept_up(out, n, r):
                            ceilings[who] = r
                        else:
                            alive[who] = False
            print(json.dumps({"ceilings": ceilings, "load": [load0, os.getloadavg()[0]], "runs": runs}))
    finally:
        sender.close()
        replay.close()


if __name__ == "__main__":
    main()
