"""The trader as a killable process for the crash test (``test_live_crash.py``): one exchange-mode (testnet)
session against the replay exchange, fed the stored bars of a window in lock-step with the replay clock.

Each start is a restart: recovery (account settings, open intents, positions), the resumed session's account
restored from the journal, the bars it had handled put back into its window, then it re-handles the last bar
it marked (the journal dedupes that bar's order by its client id) and goes on. ``RLTRADER_KILL_AT`` (see
``live.gateway.crash_point``) kills it at an injected point; the test also SIGKILLs it at random moments.

Usage: python live_crash_driver.py SETTINGS_JSON RECORDS_DB REST_BASE START_ISO END_ISO
Exit codes: 0 done (the window's end reached, flat), 3 recovery left the trader HALTED.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import requests

from rltrader.config import Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.rest import make_client
from rltrader.data.schema import Market
from rltrader.live.gateway import BinanceBroker
from rltrader.live.records import Records
from rltrader.live.risk import state_of
from rltrader.live.runner import start_exchange_trader
from rltrader.live.trader import bars_from_frame, build_trader

SYM = "NEARUSDT"


def main(settings_path: str, db: str, rest: str, start_iso: str, end_iso: str) -> int:
    settings = Settings.model_validate_json(Path(settings_path).read_text())
    start = int(datetime.fromisoformat(start_iso).timestamp() * 1e6)
    end = int(datetime.fromisoformat(end_iso).timestamp() * 1e6)
    bar_sleep = float(os.environ.get("CRASH_DRIVER_BAR_SLEEP", "0"))
    records = Records(db)
    if any(s["ended_at"] is not None for s in records.sessions()):
        return 0  # the window was finished (a kill that landed after the end changes nothing)
    broker = BinanceBroker(make_client(Market.FUTURES_UM, rest), "futures", np.zeros(0), grace_s=0.4)
    sid = records.unfinished_session("testnet", [SYM])
    trader = build_trader(settings, mode="testnet", symbols=[SYM], model="sma_cross", records=records,
                          broker=broker, until_us=end, session_id=sid)
    store = ParquetStore(settings.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", SYM, "1m"))
    store.close()
    marked = [m["bar_time"] for m in records.marks(trader.session_id)] if sid else []
    resume_at = max(marked) if marked else start
    history = [b for b in bars if b.time < start][-settings.trader.history_bars:]
    trader.warm_up(SYM, history)
    trader.warm_up_book(SYM, (b for b in bars if start <= b.time < resume_at))
    start_exchange_trader(settings, trader, broker, [SYM], rehandle={SYM: resume_at} if sid else None)
    if state_of(records)["state"] == "HALTED":
        print(json.dumps({"halted": state_of(records)}), flush=True)
        return 3
    for b in bars:
        if b.time < resume_at or b.time >= end:
            continue
        # lock-step: the bar has closed on the exchange's clock, the next one is in progress at its open
        requests.post(f"{rest}/_replay/clock", json={"advance_to": str((b.time + 60_000_000) // 1000)},
                      timeout=30).raise_for_status()
        trader.on_bar(SYM, b)
        time.sleep(bar_sleep)  # spreads the bars over a few seconds, so random kills land among them
    records.end_session(trader.session_id, trader.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
