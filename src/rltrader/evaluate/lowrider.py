"""The Lowrider question (issue 14, part 4): does RL lot sizing make the Lowrider pay in up- *and* down-trends
without running out of funds? The rule-based Lowrider and the trained lowrider-mode models, each run continuously
over a split (``run_backtest``), compared per market regime.

Everything is read from the backtest's own records — the execution kernel's ``EventLog`` (``BacktestResult.events``:
every fill as booked) and the accounts' marked equity curve — never from recomputed fills:

- a **cycle** is an account's position from the fill that leaves flat to the fill that returns to flat. It is
  *completed* when an order (the Lowrider's automatic take-profit sell) closes it, *force-closed* when the stretch
  ends under it (a data gap, or the end of the split: then it is still open at the end — stuck capital);
- **capital committed**: the cycle's buys at their fill prices plus their fees, at its largest;
- **unrealised drawdown**: the position marked at each bar's close minus what it cost, at its worst, in quote and
  as a fraction of the capital committed then;
- **regime** of a (symbol, UTC month): *up* when the month's buy & hold return (last close / first open of the
  traded bars) exceeds ``backtest.regime_threshold``, *down* below minus it, else *sideways*. A cycle belongs to
  the regime of the month it opened in; the return of a regime is the mean monthly return of the symbol accounts'
  marked equity over its (symbol, month)s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from rltrader.dataset.split import SessionSet
from rltrader.evaluate.backtest.frames import BacktestResult
from rltrader.execution import (
    EV_ACCT,
    EV_FEE,
    EV_KIND,
    EV_PX,
    EV_Q_AFTER,
    EV_QTY,
    EV_ROW,
    EV_TAG,
    EV_TIME,
    KIND_FUNDING,
    KIND_ORDER,
)

if TYPE_CHECKING:  # typing only
    from rltrader.config import Settings

REGIMES = ("up", "down", "sideways")
TABLE_KEYS = ("return", "cycles_completed", "profit_per_cycle", "max_capital_committed", "longest_cycle_bars",
              "open_at_end", "stuck_capital", "force_closed", "worst_unrealised", "worst_unrealised_pct")


def _month(time_us: np.ndarray) -> np.ndarray:
    """UTC calendar month index (year * 12 + month - 1) of microsecond timestamps."""
    m = np.asarray(time_us, dtype="datetime64[us]").astype("datetime64[M]").astype(np.int64)
    return m


def month_regimes(data: SessionSet, threshold: float) -> pl.DataFrame:
    """(symbol, month) → buy & hold return of the traded bars (rows inside the stretches) and its regime."""
    rows = np.concatenate([np.arange(a, b) for a, b in zip(data.start, data.end, strict=True)]) if data.n_sessions \
        else np.zeros(0, np.int64)
    frame = pl.DataFrame({"symbol_id": data.symbol_id[rows].astype(np.int64), "month": _month(data.time[rows]),
                          "row": rows, "open": data.open[rows], "close": data.close[rows]})
    out = (frame.sort("row").group_by("symbol_id", "month", maintain_order=True)
           .agg(pl.col("open").first(), pl.col("close").last(), pl.len().alias("bars"))
           .with_columns((pl.col("close") / pl.col("open") - 1.0).alias("buy_hold")))
    return out.with_columns(pl.when(pl.col("buy_hold") > threshold).then(pl.lit("up"))
                            .when(pl.col("buy_hold") < -threshold).then(pl.lit("down"))
                            .otherwise(pl.lit("sideways")).alias("regime"))


def lowrider_cycles(result: BacktestResult, data: SessionSet) -> pl.DataFrame:
    """One row per cycle, from the event log (module docstring): symbol, month opened, rows, buys, capital
    committed, PnL (proceeds − cost, fees included), how it ended, and its worst unrealised drawdown."""
    ev = result.events
    ev = ev[:, ev[EV_KIND] != KIND_FUNDING] if ev.size else ev
    # an account's last stretch: the one it played last (accounts chain their symbol's stretches in time order)
    sym_of = data.symbol_id[data.start].astype(np.int64)
    last_of_symbol = {int(s): int(np.flatnonzero(sym_of == s)[np.argmax(data.start[sym_of == s])])
                      for s in np.unique(sym_of)}
    recs: list[dict[str, Any]] = []
    open_: dict[int, dict[str, Any]] = {}
    close = data.close
    for i in range(ev.shape[1]):
        acct, tag, row = int(ev[EV_ACCT, i]), int(ev[EV_TAG, i]), int(ev[EV_ROW, i])
        dq, px, fee, q_after = ev[EV_QTY, i], ev[EV_PX, i], ev[EV_FEE, i], ev[EV_Q_AFTER, i]
        cyc = open_.get(acct)
        if cyc is None:
            if q_after == 0.0:
                continue
            cyc = open_[acct] = {"account": acct, "symbol_id": int(data.symbol_id[row]), "stretch": tag,
                                 "month": int(_month(np.array([ev[EV_TIME, i]], np.int64))[0]), "open_row": row,
                                 "buys": 0, "cost": 0.0, "max_cost": 0.0, "proceeds": 0.0, "worst": 0.0,
                                 "worst_pct": 0.0, "q": 0.0, "seg_row": row}
        else:  # mark the bars since the previous event at their closes (the position was constant over them)
            lo, hi = cyc["seg_row"], row
            if hi > lo and cyc["q"] > 0.0:
                u = cyc["q"] * close[lo:hi] - cyc["cost"]
                k = int(np.argmin(u))
                if u[k] < cyc["worst"]:
                    cyc["worst"], cyc["worst_pct"] = float(u[k]), float(u[k] / cyc["cost"])
        if dq > 0.0:
            cyc["buys"] += 1
            cyc["cost"] += dq * px + fee
            cyc["max_cost"] = max(cyc["max_cost"], cyc["cost"])
        else:
            cyc["proceeds"] += -dq * px - fee
        cyc["q"], cyc["seg_row"] = q_after, row
        if q_after > 0.0:  # marked at this bar's close too
            u0 = q_after * close[row] - cyc["cost"]
            if u0 < cyc["worst"]:
                cyc["worst"], cyc["worst_pct"] = float(u0), float(u0 / cyc["cost"])
            cyc["seg_row"] = row + 1
        if q_after == 0.0:
            kind = int(ev[EV_KIND, i])
            end_of_split = kind != KIND_ORDER and tag == last_of_symbol.get(cyc["symbol_id"], -1) \
                and row == int(data.end[tag]) - 1
            recs.append({**{k: cyc[k] for k in ("account", "symbol_id", "stretch", "month", "open_row", "buys",
                                                "max_cost", "worst", "worst_pct")},
                         "close_row": row, "bars": row - cyc["open_row"] + 1, "pnl": cyc["proceeds"] - cyc["cost"],
                         "completed": kind == KIND_ORDER, "open_at_end": end_of_split,
                         "stuck_capital": cyc["cost"] if end_of_split else 0.0})
            del open_[acct]
    schema = {"account": pl.Int64, "symbol_id": pl.Int64, "stretch": pl.Int64, "month": pl.Int64,
              "open_row": pl.Int64, "buys": pl.Int64, "max_cost": pl.Float64, "worst": pl.Float64,
              "worst_pct": pl.Float64, "close_row": pl.Int64, "bars": pl.Int64, "pnl": pl.Float64,
              "completed": pl.Boolean, "open_at_end": pl.Boolean, "stuck_capital": pl.Float64}
    return pl.DataFrame(recs, schema=schema)


def monthly_returns(result: BacktestResult, data: SessionSet) -> pl.DataFrame:
    """(symbol, month) → the symbol account's marked-equity return over the month (from its previous month's
    last equity, or the account's initial cash)."""
    per = result.equity.filter(pl.col("symbol") != "ALL")
    sym_ids = {s: i for i, s in enumerate(data.symbols)}
    cash0 = result.initial_cash / max(1, per["symbol"].n_unique())
    per = per.with_columns(pl.col("symbol").replace_strict(sym_ids, return_dtype=pl.Int64).alias("symbol_id"),
                           # the bar's open time decides its month (the curve is stamped at bar closes)
                           pl.Series("month", _month(per["time"].dt.epoch("us").to_numpy() - 1)))
    m = (per.sort("time").group_by("symbol_id", "month", maintain_order=True).agg(pl.col("equity").last())
         .sort("symbol_id", "month")
         .with_columns(pl.col("equity").shift(1).over("symbol_id").fill_null(cash0).alias("prev")))
    return m.with_columns((pl.col("equity") / pl.col("prev") - 1.0).alias("ret")).select("symbol_id", "month", "ret")


def lowrider_table(results: Mapping[str, BacktestResult], data: SessionSet, threshold: float) -> list[dict[str, Any]]:
    """Rows (policy, regime ∈ up/down/sideways/all) with ``TABLE_KEYS`` and the (symbol, month)s counted."""
    regimes = month_regimes(data, threshold)
    rows: list[dict[str, Any]] = []
    for name, res in results.items():
        cycles = lowrider_cycles(res, data).join(regimes.select("symbol_id", "month", "regime"),
                                                 on=["symbol_id", "month"], how="left")
        rets = monthly_returns(res, data).join(regimes.select("symbol_id", "month", "regime", "buy_hold"),
                                               on=["symbol_id", "month"], how="inner")
        for regime in (*REGIMES, "all"):
            c = cycles if regime == "all" else cycles.filter(pl.col("regime") == regime)
            r = rets if regime == "all" else rets.filter(pl.col("regime") == regime)
            done = c.filter(pl.col("completed"))
            pnl, bh, ret = done["pnl"].to_numpy(), r["buy_hold"].to_numpy(), r["ret"].to_numpy()
            cost, bars, worst, worst_pct = (c[k].to_numpy() for k in ("max_cost", "bars", "worst", "worst_pct"))
            rows.append({
                "policy": name, "regime": regime, "months": r.height,
                "buy_hold": float(bh.mean()) if bh.size else float("nan"),
                "return": float(ret.mean()) if ret.size else float("nan"),
                "cycles_completed": done.height,
                "profit_per_cycle": float(pnl.mean()) if pnl.size else float("nan"),
                "max_capital_committed": float(cost.max()) if cost.size else 0.0,
                "longest_cycle_bars": int(bars.max()) if bars.size else 0,
                "open_at_end": int(c["open_at_end"].sum()),
                "stuck_capital": float(c["stuck_capital"].sum()),
                "force_closed": int((~c["completed"]).sum()),
                "worst_unrealised": float(worst.min()) if worst.size else 0.0,
                "worst_unrealised_pct": float(worst_pct.min()) if worst_pct.size else 0.0,
            })
    return rows


def lowrider_verdicts(rows: Sequence[Mapping[str, Any]], split: str, rule: str = "lowrider_rule") -> list[str]:
    """One plain line per RL model: does it earn in up AND down months, beat the rule there, and end the split
    without stuck capital?"""
    by = {(r["policy"], r["regime"]): r for r in rows}
    out = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        if name == rule:
            continue
        up, down, total = by.get((name, "up")), by.get((name, "down")), by[(name, "all")]
        rule_all = by[(rule, "all")]

        def pays(r: Mapping[str, Any] | None) -> bool:
            return r is not None and r["months"] > 0 and r["return"] > 0

        both = pays(up) and pays(down)
        beats = total["return"] > rule_all["return"]
        stuck = total["open_at_end"] > 0
        months = f"{(up or {}).get('months', 0)} up / {(down or {}).get('months', 0)} down (symbol-)months"
        out.append(f"[{split}] {name}: {'pays' if both else 'does NOT pay'} in both up and down months ({months}); "
                   f"mean monthly return {100 * total['return']:+.2f} % vs the rule's "
                   f"{100 * rule_all['return']:+.2f} % "
                   f"({'beats' if beats else 'does NOT beat'} the rule); "
                   + (f"{total['open_at_end']} cycle(s) still open at the end, {total['stuck_capital']:.0f} quote stuck"
                      if stuck else "no cycle left open at the end"))
    return out


def run_lowrider_tables(settings: Settings, splits: Sequence[str], models: Sequence[str],
                        load_model: Callable[[str], Any], data_by_split: Mapping[str, SessionSet],
                        out_dir: Path | None = None) -> dict[str, Any]:
    """The backtest stage's Lowrider section: the rule-based Lowrider and each ``models`` (trained lowrider-mode
    models) continuously over each split in the Lowrider settings (``train.variant_settings``), the table by
    regime (``lowrider_table``) and the verdicts; with ``out_dir``, ``lowrider.json`` and ``report.html`` there."""
    from rltrader.evaluate.backtest import run_backtest
    from rltrader.evaluate.report import write_html_report
    from rltrader.train import variant_settings

    lr_settings = variant_settings(settings, "lowrider")
    thr = settings.backtest.regime_threshold
    policies: dict[str, Any] = {"lowrider_rule": "lowrider_rule", **{m: load_model(m) for m in models}}
    tables: dict[str, list[dict[str, Any]]] = {}
    verdicts: dict[str, list[str]] = {}
    for split in splits:
        results = {name: run_backtest(lr_settings, pol, split=split, data=data_by_split[split])
                   for name, pol in policies.items()}
        tables[split] = lowrider_table(results, data_by_split[split], thr)
        verdicts[split] = lowrider_verdicts(tables[split], split)
    note = (f"Regimes: a (symbol, UTC month) is up when its buy & hold return is above +{100 * thr:g} %, down below "
            f"-{100 * thr:g} %, else sideways; a cycle counts in the month it opened. Return: mean monthly return "
            "of the symbol accounts' marked equity. Capital committed and unrealised drawdown are in quote (each "
            f"symbol account starts with {lr_settings.execution.initial_cash:g}); cycles are read from the "
            "execution kernel's event log. Lowrider settings: spot, "
            f"lots {list(lr_settings.env.lot_multipliers)} × {lr_settings.env.base_lot:g} quote, budget 1/"
            f"{lr_settings.env.reluctance:g} of the cash, profit target {100 * lr_settings.env.profit_target:g} %.")
    out: dict[str, Any] = {"threshold": thr, "tables": tables, "verdicts": verdicts, "note": note}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lowrider.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        first = splits[-1]
        write_html_report(out_dir / "report.html", "Lowrider: rule vs RL lot sizing, by market regime", {},
                          [r for r in tables[first] if r["regime"] == "all"],
                          [v for s in splits for v in verdicts[s]], {}, [note],
                          tables={f"{s} split: by regime": tables[s] for s in splits})
    return out
