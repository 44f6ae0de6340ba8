"""Trader latency: closed-candle event → order request ready (incremental features + policy + order sizing +
record write), per bar over a replayed day of real bars, against the loop a newcomer would write.

Ours: ``Trader.on_bar`` in paper mode (``rltrader.live``): the incremental feature update (numba), the
standardised window, the env's observation, the D3QN network's forward pass (params.yaml's seed 002 net: CNN
encoder, 64 channels, 256 hidden; untrained weights, so it trades), the target → order delta through the
gateway, the paper fill of the previous order in the execution kernel, and the SQLite (WAL) writes of the
decision, the order, the fills and the equity mark. The peer: every bar, the last ``window`` bars in a pandas
frame, every indicator recomputed with ``ta`` plus pandas rolling statistics, the last ``context`` rows
standardised, then the same torch forward and a masked argmax (no records written: favours the peer).

The ceiling: the bare forward pass of the same network on a fixed one-row input (``PolicyModule.bound_scores``),
as many times as there are bars — no trader can have a shorter tail than its own forward pass on the same box.
``--realtime N``: ours, the ceiling and the peer each run their per-bar section under ``SCHED_FIFO`` priority N
(``trader.realtime_priority``; Linux, CAP_SYS_NICE): on a busy machine the tail is the wait for a CPU.

Prints one JSON line per figure: ``{"metric", "value", "unit", "peer", "peer_value", "ratio"}`` (latencies: ratio
= peer / ours, > 1 means we are faster). ``--quick``: the first 300 bars of the day.
Data: NEARUSDT USDⓈ-M 1m bars 2023-04-09 (warm-up) and 2023-04-10 (the replayed day) from the shared archive.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

NEAR = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"
ARCHIVE = Path(os.environ.get("RLTRADER_SHARED_ARCHIVE", Path(__file__).resolve().parents[2] / "shared" / "data"
                              / "binance"))


def emit(metric: str, value: float, unit: str, peer: str | None, peer_value: float | None,
         lower_is_better: bool = True) -> None:
    ratio = None
    if peer_value:
        ratio = peer_value / value if lower_is_better else value / peer_value
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "peer": peer,
                      "peer_value": None if peer_value is None else round(peer_value, 4),
                      "ratio": None if ratio is None else round(ratio, 1)}), flush=True)


def load_day() -> pl.DataFrame:
    from rltrader.data.archive import parse_klines, read_zip_member
    from rltrader.data.schema import Market

    rows = parse_klines(read_zip_member(ARCHIVE / NEAR), source=NEAR, market=Market.FUTURES_UM, symbol="NEARUSDT",
                        interval="1m").rows
    lo = pl.datetime(2023, 4, 9, time_zone="UTC")
    return rows.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < lo + pl.duration(days=2)))


def make_module(n_features: int, context: int, n_actions: int) -> Any:
    import torch

    from rltrader.agents.networks import DuelingQNet, NetConfig
    from rltrader.agents.packaging import PolicyModule
    from rltrader.env.core import N_STATE

    torch.manual_seed(0)
    net = DuelingQNet(n_features, context, N_STATE, n_actions, NetConfig(encoder="cnn", channels=64, hidden=256))
    for p in net.advantage.parameters():
        torch.nn.init.normal_(p, std=0.3)  # decisive action scores: an untrained net must trade to be measured
    return PolicyModule(net.eval(), "q_values", context, n_features, N_STATE, n_actions, {"algo": "d3qn"})


class Sched:
    """The per-bar section under SCHED_FIFO (``--realtime``) or the normal scheduler, as the trader does it."""

    def __init__(self, priority: int) -> None:
        self.on = priority > 0
        self.fifo, self.normal = os.sched_param(priority), os.sched_param(0)

    def __enter__(self) -> None:
        if self.on:
            os.sched_setscheduler(0, os.SCHED_FIFO, self.fifo)

    def __exit__(self, *exc: object) -> None:
        if self.on:
            os.sched_setscheduler(0, os.SCHED_OTHER, self.normal)


def ceiling(module: Any, n: int, context: int, priority: int) -> np.ndarray:
    """The bare forward pass of the same net (``bound_scores``) on a fixed one-row input, ``n`` times."""
    from rltrader.env.core import N_STATE

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, context, module.n_features)).astype(np.float32)
    s = np.zeros((1, N_STATE), np.float32)
    f = module.bound_scores(w, s)
    for _ in range(50):
        f()
    lat = np.empty(n)
    sched = Sched(priority)
    for i in range(n):
        with sched:
            t0 = time.perf_counter()
            f()
            lat[i] = time.perf_counter() - t0
    return lat


def ours(bars: list[Any], warm: list[Any], module: Any, settings: Any, tmp: Path, priority: int = 0) -> np.ndarray:
    from rltrader.env import params_from_settings
    from rltrader.live.features import IncrementalFeatures
    from rltrader.live.gateway import OrderGateway, PaperBroker
    from rltrader.live.records import Records
    from rltrader.live.trader import Normalization, Trader

    execution, env_params = params_from_settings(settings)
    fe = IncrementalFeatures(settings.features)
    rows, valid = fe.run(*(np.array([getattr(b, k) for b in warm]) for k in (
        "time", "open", "high", "low", "close", "volume", "trades", "taker_buy_volume")))
    norm = Normalization(fe.names, np.nanmean(rows[valid], axis=0), np.nanstd(rows[valid], axis=0) + 1e-9,
                         settings.sessions.clip, settings.sessions.context)
    records = Records(tmp / "bench.db", durable=False)  # paper: no fsync per commit
    records.start_session("bench", mode="paper", model="d3qn", model_version=None, symbols=["NEARUSDT"],
                          params={"initial_cash": execution.initial_cash})
    xp = execution.to_array()
    trader = Trader(policy=module, policy_name="d3qn", model_version=None, execution=execution,
                    env_params=env_params, norm=norm, feature_settings=settings.features, symbols=["NEARUSDT"],
                    gateway=OrderGateway(PaperBroker(xp), records, "bench", xp), records=records,
                    session_id="bench", realtime_priority=priority)
    trader.warm_up("NEARUSDT", warm)
    after = np.empty(len(bars))
    for i, b in enumerate(bars):
        trader.on_bar("NEARUSDT", b)  # records its own latency: entry → order ready (before leaving SCHED_FIFO)
        t1 = time.perf_counter()
        trader.between_bars()  # after the order is out: the deferred rows' commit, WAL checkpoint, gc
        after[i] = time.perf_counter() - t1
    lat = np.asarray(trader.latencies)
    assert len(lat) == len(bars)
    print(json.dumps({"info": "ours", "fills": trader.summary()["symbols"]["NEARUSDT"]["fills"],
                      "decisions": trader.decisions,
                      "between_bars_ms_p50": round(float(np.quantile(after[1:], 0.5)) * 1e3, 4) if len(bars) > 1
                      else None,
                      "between_bars_ms_p99": round(float(np.quantile(after[1:], 0.99)) * 1e3, 4) if len(bars) > 1
                      else None}), flush=True)
    return lat


def naive(bars: list[Any], warm: list[Any], module: Any, settings: Any, window: int, priority: int = 0) -> np.ndarray:
    """What a newcomer writes: pandas + ta over the trailing window every bar, then the forward pass."""
    import pandas as pd
    import ta
    import torch

    p = settings.features
    context = settings.sessions.context
    hist = pd.DataFrame([b.__dict__ for b in warm])
    lat = np.empty(len(bars))
    state = torch.zeros((1, 8))
    sched = Sched(priority)
    for i, b in enumerate(bars):
        sched.__enter__()
        t0 = time.perf_counter()
        hist = pd.concat([hist, pd.DataFrame([b.__dict__])], ignore_index=True).iloc[-window:]
        c, h, lo, v = hist["close"], hist["high"], hist["low"], hist["volume"]
        f = pd.DataFrame(index=hist.index)
        lc = np.log(c)
        for hz in p.return_horizons:
            f[f"ret_{hz}"] = lc - lc.shift(hz)
        f["rsi"] = (ta.momentum.RSIIndicator(c, window=p.rsi).rsi() - 50) / 50
        for n in p.ema:
            f[f"ema_{n}"] = c / ta.trend.EMAIndicator(c, window=n).ema_indicator() - 1
        macd = ta.trend.MACD(c, window_slow=p.macd[1], window_fast=p.macd[0], window_sign=p.macd[2])
        f["macd"], f["macd_signal"], f["macd_hist"] = macd.macd() / c, macd.macd_signal() / c, macd.macd_diff() / c
        bb = ta.volatility.BollingerBands(c, window=p.bollinger, window_dev=p.bollinger_dev)
        f["bb_pctb"], f["bb_width"] = bb.bollinger_pband(), bb.bollinger_wband() / 100
        f["atr"] = ta.volatility.AverageTrueRange(h, lo, c, window=p.atr).average_true_range() / c
        r1 = lc.diff()
        for w in p.volatility:
            f[f"rv_{w}"] = r1.rolling(w).std()
        for name, x in (("volume_z", np.log1p(v)), ("trades_z", np.log1p(hist["trades"]))):
            m, s = x.rolling(p.zscore_window).mean(), x.rolling(p.zscore_window).std()
            f[name] = (x - m) / s
        f["taker_buy"] = hist["taker_buy_volume"] / v
        when = pd.to_datetime(hist["time"], unit="us")
        minute = when.dt.hour * 60 + when.dt.minute
        for k, fn in (("tod_sin", np.sin), ("tod_cos", np.cos), ("dow_sin", np.sin), ("dow_cos", np.cos)):
            f[k] = fn(minute * 2 * np.pi / 1440)
        x = f.iloc[-context:].to_numpy(np.float32)
        x = np.clip(np.nan_to_num((x - x.mean(0)) / (x.std(0) + 1e-9)), -10, 10)
        with torch.no_grad():
            q = module.net(torch.from_numpy(x[None]), state)[0].numpy()
        a = int(np.argmax(q))
        _order = a  # the action → order sizing is a few float operations; not the cost here
        lat[i] = time.perf_counter() - t0
        sched.__exit__()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first 300 bars of the day (< 1 min)")
    ap.add_argument("--realtime", type=int, default=0, metavar="N",
                    help="run every per-bar section (ours, the ceiling, the peer) under SCHED_FIFO priority N")
    args = ap.parse_args()
    import torch

    from rltrader.config import Settings
    from rltrader.live.trader import bars_from_frame

    torch.set_num_threads(1)
    settings = Settings()
    bars = bars_from_frame(load_day())
    warm, day = bars[:1440], bars[1440:]
    if args.quick:
        day = day[:300]
    from rltrader.live.features import IncrementalFeatures

    n_features = IncrementalFeatures(settings.features).n_features
    module = make_module(n_features, settings.sessions.context, 4)
    rt = args.realtime
    with tempfile.TemporaryDirectory() as tmp:  # numba compilation, torch warm-up: past the first decisions
        ours(day[:settings.sessions.context + 50], warm, module, settings, Path(tmp), rt)
    with tempfile.TemporaryDirectory() as tmp:
        a = ours(day, warm, module, settings, Path(tmp), rt) * 1e3
    c = ceiling(module, len(day), settings.sessions.context, rt) * 1e3
    window = IncrementalFeatures(settings.features).warmup + settings.sessions.context
    b = naive(day, warm, module, settings, window, rt) * 1e3
    sfx = f"_fifo{rt}" if rt else ""
    peer = f"pandas+ta over the last {window} bars each bar, then torch"
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        emit(f"trader_bar_to_order_{name}{sfx}", float(np.quantile(a, q)), "ms", peer, float(np.quantile(b, q)))
    emit(f"trader_bar_to_order_mean{sfx}", float(a.mean()), "ms", peer, float(b.mean()))
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        emit(f"trader_forward_only_{name}{sfx}", float(np.quantile(c, q)), "ms", "ours (whole bar)",
             float(np.quantile(a, q)))
    print(json.dumps({"info": "bars", "value": len(day), "scheduler": f"SCHED_FIFO {rt}" if rt else "normal",
                      "loadavg": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
