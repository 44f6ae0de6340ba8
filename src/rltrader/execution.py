"""The execution and cost model: the one place fills, fees, slippage, funding and liquidation are computed.

The envs, the backtest and the live trader all call these functions, so a policy sees identical fills in
training, backtest and paper trading. They are numba kernels over plain numpy arrays because the same code
has to serve a single live order, B env accounts per step and a continuous million-bar backtest loop.

Portfolio state is struct-of-arrays: one ``(N_FIELDS, B)`` float64 array, row ``f`` holding field ``f``
(``CASH``, ``QTY``, …) of all B accounts (see ``Accounts``). The scalar helpers take ``(acct, b, …)`` and
touch account ``b`` only, so a kernel over B accounts or over time can call them inline.

Accounting (spot and linear USDⓈ-M futures alike): ``equity = cash + qty * mark``. A buy of ``dq`` at ``p``
moves ``dq * p + fee`` out of cash; a short is ``qty < 0`` and selling adds the proceeds to cash. Average-cost
bookkeeping keeps ``equity - initial_cash == realized + qty * (mark - avg_entry) - fees - funding + insurance``.

Orders are market orders paying the taker fee; limit (maker) orders are not modelled — ``maker_fee`` is carried
so that a later limit-order model and the live trader read the fee schedule from one place.

Fill price: the reference price (the fill bar's open) moved against the order by half the spread plus an impact
term ``impact * sqrt(qty / bar volume)`` (the square-root law: slippage grows with the order's share of the bar),
then rounded to the tick grid against the order (buys up, sells down) as a book on that grid would fill.
Exchange filters as Binance applies them to a client that rounds: quantities are floored to ``step_size``; an
order whose notional is below ``min_notional`` is rejected, except one that closes the position to flat
(futures reduce-only orders are exempt; in spot the residual would be unsellable dust).

Liquidation (futures): after the fill, the bar's adverse extreme (low for longs, high for shorts) is checked;
if equity there is at most ``maintenance_margin * |qty| * price`` the position is closed at the liquidation
price — where equity equals the maintenance margin — clipped into the bar's range, as a taker. A loss beyond
the account's equity (a gap through the bankruptcy price) is covered by the insurance fund: cash is floored at
0 and the amount is booked in ``INSURANCE``.

Events: every kernel below that changes an account (a fill, a liquidation, a forced close, a funding payment)
also writes what it booked into an optional ``EventLog`` (``log=None``: nothing recorded, and numba compiles the
recording away). An event is a column of a preallocated ``(N_EV, capacity)`` float64 array: the caller's stamp
(bar time, row, a tag such as the backtest's stretch id), the account, kind and reason, and the amounts exactly as
booked (signed qty, price, fee, slippage, realized PnL, funding, insurance cover). Consumers (the backtest's fills
and round trips, a live trader's journal) read the events; they never re-derive a fill. Summing an account's
events in order reproduces its ``FEES`` / ``REALIZED`` / ``FUNDING`` / ``SLIPPAGE`` / ``INSURANCE`` totals bit for
bit, because the totals are those same additions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from numba import njit
from pydantic import ConfigDict

from rltrader.errors import ConfigError

# --- account fields: rows of the (N_FIELDS, B) state array ---------------------------------------------------
CASH, QTY, AVG_ENTRY, REALIZED, FEES, FUNDING, SLIPPAGE, INSURANCE, EQUITY, N_FILLS, N_LIQUIDATIONS = range(11)
N_FIELDS = 11
FIELD_NAMES = ("cash", "qty", "avg_entry", "realized_pnl", "fees_paid", "funding_paid", "slippage_paid",
               "insurance", "equity", "n_fills", "n_liquidations")

# --- execution parameters packed for the kernels: indices into a float64 vector ------------------------------
(XP_SPOT, XP_TAKER, XP_MAKER, XP_HALF_SPREAD, XP_IMPACT, XP_LATENCY, XP_LEVERAGE, XP_MMR, XP_FUNDING,
 XP_TICK, XP_STEP, XP_MIN_NOTIONAL, XP_CASH) = range(13)
N_XP = 13

FUNDING_PERIOD_US = 8 * 3600 * 1_000_000
"""Binance USDⓈ-M funding settles every 8 h (00:00, 08:00, 16:00 UTC)."""

# --- events: rows of an EventLog's (N_EV, capacity) float64 array ---------------------------------------------
(EV_TIME, EV_ROW, EV_TAG, EV_ACCT, EV_KIND, EV_REASON, EV_QTY, EV_PX, EV_FEE, EV_SLIP, EV_REALIZED, EV_FUNDING,
 EV_INSURANCE, EV_Q_AFTER, EV_FUND_CUM) = range(15)
N_EV = 15
EV_NAMES = ("time", "row", "tag", "account", "kind", "reason", "qty", "price", "fee", "slippage", "realized",
            "funding", "insurance", "qty_after", "funding_cum")
KIND_ORDER, KIND_LIQUIDATION, KIND_FORCED, KIND_FUNDING = range(4)
KIND_NAMES = ("order", "liquidation", "forced_close", "funding")
REASON_SIGNAL, REASON_SL, REASON_TP, REASON_LIQ, REASON_END, REASON_FUNDING = range(6)
REASON_NAMES = ("signal", "stop_loss", "take_profit", "liquidation", "end_of_data", "funding")
# --- an EventLog's int64 cursor: the count and the caller's stamp for the events it writes next ----------------
CUR_N, CUR_TIME, CUR_ROW, CUR_TAG, CUR_EXIT_REASON = range(5)
N_CUR = 5
MAX_EVENTS_PER_BAR = 4
"""Funding, the order's fill, a liquidation and a forced close: what one account's bar can write at most."""


class EventLog(NamedTuple):
    """Where the kernels record what they book (module docstring). numba takes it as one argument.

    ``cursor[CUR_N]`` counts the events written (also past the capacity: those are dropped, and a count above
    the capacity tells the caller it must grow the buffer before the next bar); ``CUR_TIME`` / ``CUR_ROW`` /
    ``CUR_TAG`` are stamped on every event; ``CUR_EXIT_REASON`` (``REASON_SL`` / ``REASON_TP``, set by the caller
    when it sends a protective exit) labels the next order fill that closes or flips the position, then resets.
    """

    data: np.ndarray
    cursor: np.ndarray

    @classmethod
    def empty(cls, capacity: int) -> EventLog:
        return cls(np.zeros((N_EV, capacity)), np.zeros(N_CUR, np.int64))

    @property
    def n_events(self) -> int:
        return int(self.cursor[CUR_N])

    def free(self) -> int:
        return int(self.data.shape[1] - self.cursor[CUR_N])

    def grown(self, min_free: int) -> EventLog:
        """A log with the same events and at least ``min_free`` free slots (the buffer doubles)."""
        if self.free() >= min_free:
            return self
        cap = max(2 * self.data.shape[1], self.n_events + min_free)
        data = np.zeros((N_EV, cap))
        data[:, :self.n_events] = self.data[:, :self.n_events]
        return EventLog(data, self.cursor)

    def events(self) -> np.ndarray:
        """The written events, ``(N_EV, count)``."""
        return np.asarray(self.data[:, :self.n_events])


@dataclass(frozen=True)
class ExecutionParams:
    """Market, fees, costs and exchange filters (``params.yaml: execution``). Defaults: Binance USDⓈ-M futures."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # params.yaml validation: unknown keys are errors

    market: Literal["spot", "futures"] = "futures"
    taker_fee: float = 0.0005
    maker_fee: float = 0.0002
    """Not used by market orders; kept so every consumer reads one fee schedule."""
    half_spread_bps: float = 1.0
    impact: float = 0.001
    """Square-root impact: slippage fraction ``impact * sqrt(order qty / bar volume)`` (0.1 % for a whole bar)."""
    latency_bars: int = 0
    """Extra bars between a decision and its fill: decided for bar t, filled at bar t+latency's open."""
    leverage: float = 1.0
    maintenance_margin: float = 0.005
    funding_rate_8h: float = 0.0
    """Funding paid by longs (received by shorts) each 8 h, as a fraction of the notional; 0 = off."""
    tick_size: float = 0.0
    step_size: float = 0.0
    min_notional: float = 0.0
    """0 disables the respective filter (synthetic data without an exchange grid)."""
    initial_cash: float = 10_000.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"execution.{name}: {why} (got {getattr(self, name)!r})")

        if self.market not in ("spot", "futures"):
            raise bad("market", "must be 'spot' or 'futures'")
        for name in ("taker_fee", "maker_fee", "half_spread_bps", "impact", "funding_rate_8h"):
            v = getattr(self, name)
            if not math.isfinite(v) or (name != "funding_rate_8h" and v < 0):
                raise bad(name, "must be a finite number ≥ 0" if name != "funding_rate_8h" else "must be finite")
        if self.taker_fee >= 0.1 or self.maker_fee >= 0.1:
            raise bad("taker_fee" if self.taker_fee >= 0.1 else "maker_fee", "must be a fraction below 0.1")
        if not self.leverage > 0 or not math.isfinite(self.leverage):
            raise bad("leverage", "must be > 0")
        if self.market == "spot" and self.leverage != 1:
            raise bad("leverage", "spot trades without leverage: must be 1")
        if not 0 <= self.maintenance_margin < 1:
            raise bad("maintenance_margin", "must be in [0, 1)")
        if self.latency_bars < 0 or int(self.latency_bars) != self.latency_bars:
            raise bad("latency_bars", "must be an integer ≥ 0")
        for name in ("tick_size", "step_size", "min_notional"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be ≥ 0")
        if not self.initial_cash > 0:
            raise bad("initial_cash", "must be > 0")

    def to_array(self) -> np.ndarray:
        xp = np.zeros(N_XP)
        xp[XP_SPOT] = 1.0 if self.market == "spot" else 0.0
        xp[XP_TAKER], xp[XP_MAKER] = self.taker_fee, self.maker_fee
        xp[XP_HALF_SPREAD] = self.half_spread_bps * 1e-4
        xp[XP_IMPACT], xp[XP_LATENCY], xp[XP_LEVERAGE] = self.impact, self.latency_bars, self.leverage
        xp[XP_MMR], xp[XP_FUNDING] = self.maintenance_margin, self.funding_rate_8h
        xp[XP_TICK], xp[XP_STEP], xp[XP_MIN_NOTIONAL] = self.tick_size, self.step_size, self.min_notional
        xp[XP_CASH] = self.initial_cash
        return xp

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Accounts:
    """B accounts' state as one ``(N_FIELDS, B)`` float64 array, with named row views for readers."""

    def __init__(self, n: int, initial_cash: float) -> None:
        self.state = np.zeros((N_FIELDS, n))
        self.initial_cash = initial_cash
        reset_accounts(self.state, np.arange(n), initial_cash)

    def __len__(self) -> int:
        return int(self.state.shape[1])

    @property
    def cash(self) -> np.ndarray:
        return np.asarray(self.state[CASH])

    @property
    def qty(self) -> np.ndarray:
        return np.asarray(self.state[QTY])

    @property
    def avg_entry(self) -> np.ndarray:
        return np.asarray(self.state[AVG_ENTRY])

    @property
    def equity(self) -> np.ndarray:
        return np.asarray(self.state[EQUITY])

    @property
    def fees_paid(self) -> np.ndarray:
        return np.asarray(self.state[FEES])

    @property
    def realized_pnl(self) -> np.ndarray:
        return np.asarray(self.state[REALIZED])

    def unrealized_pnl(self, mark: np.ndarray) -> np.ndarray:
        return np.asarray(self.state[QTY] * (mark - self.state[AVG_ENTRY]))


# --- scalar helpers (inline-able into any kernel) -------------------------------------------------------------

@njit(cache=True)
def round_qty(q: float, step: float) -> float:
    """Floor ``|q|`` to the step grid (keeping the sign), as a client must before Binance accepts the order."""
    if step <= 0.0:
        return q
    n = math.floor(abs(q) / step + 1e-9)
    return math.copysign(n * step, q) if n > 0 else 0.0


@njit(cache=True)
def fill_price(ref: float, side: float, qty_abs: float, volume: float, xp: np.ndarray) -> float:
    """Reference price moved against ``side`` by half spread + square-root impact, rounded to tick adversely."""
    participation = qty_abs / volume if volume > 0.0 else 1.0
    slip = xp[XP_HALF_SPREAD] + xp[XP_IMPACT] * math.sqrt(participation)
    px = ref * (1.0 + side * slip)
    tick = xp[XP_TICK]
    if tick > 0.0:
        px = math.ceil(px / tick - 1e-9) * tick if side > 0 else max(math.floor(px / tick + 1e-9) * tick, tick)
    return float(px)


@njit(cache=True)
def record(log: EventLog, acct: np.ndarray, b: int, kind: int, reason: int, dq: float, px: float, fee: float,
           slip: float, realized: float, funding: float) -> None:
    """Write one event (stamped with the cursor's time, row and tag) if the log has room; count it anyway."""
    i = log.cursor[CUR_N]
    if i < log.data.shape[1]:
        ev = log.data
        ev[EV_TIME, i], ev[EV_ROW, i], ev[EV_TAG, i] = log.cursor[CUR_TIME], log.cursor[CUR_ROW], log.cursor[CUR_TAG]
        ev[EV_ACCT, i], ev[EV_KIND, i], ev[EV_REASON, i] = b, kind, reason
        ev[EV_QTY, i], ev[EV_PX, i], ev[EV_FEE, i], ev[EV_SLIP, i] = dq, px, fee, slip
        ev[EV_REALIZED, i], ev[EV_FUNDING, i], ev[EV_INSURANCE, i] = realized, funding, 0.0
        ev[EV_Q_AFTER, i], ev[EV_FUND_CUM, i] = acct[QTY, b], acct[FUNDING, b]
    log.cursor[CUR_N] = i + 1


@njit(cache=True)
def ends_position(q: float, new_q: float) -> bool:
    """A fill from ``q`` to ``new_q`` closes the position or flips it (what an exit reason labels)."""
    return new_q == 0.0 or (q != 0.0 and (new_q > 0.0) != (q > 0.0))


@njit(cache=True)
def apply_fill(acct: np.ndarray, b: int, dq: float, px: float, fee_rate: float, ref: float,
               log: EventLog | None = None, kind: int = KIND_ORDER) -> None:
    """Book a fill of signed ``dq`` at ``px``: cash, average-cost position, realized PnL, fees, slippage; and
    record it as a ``kind`` event in ``log`` (reason: ``kind``'s own, or for an order the cursor's exit reason
    if the fill ends the position, else signal)."""
    q = acct[QTY, b]
    new_q = q + dq
    if abs(new_q) < 1e-12 * max(abs(q), abs(dq)):  # a full close: no float residue left as a dust position
        new_q = 0.0
    fee = abs(dq) * px * fee_rate
    acct[CASH, b] -= dq * px + fee
    realized = 0.0
    if q != 0.0 and (dq > 0.0) != (q > 0.0):  # reduces (or flips) the position: realize the closed part
        closed = min(abs(dq), abs(q))
        realized = closed * (px - acct[AVG_ENTRY, b]) * (1.0 if q > 0.0 else -1.0)
        acct[REALIZED, b] += realized
    if new_q == 0.0:
        acct[AVG_ENTRY, b] = 0.0
    elif q == 0.0 or (new_q > 0.0) != (q > 0.0):  # opened from flat or flipped: the rest is entered at px
        acct[AVG_ENTRY, b] = px
    elif abs(new_q) > abs(q):
        acct[AVG_ENTRY, b] = (acct[AVG_ENTRY, b] * abs(q) + px * abs(dq)) / abs(new_q)
    acct[QTY, b] = new_q
    acct[FEES, b] += fee
    slip = abs(dq) * abs(px - ref)
    acct[SLIPPAGE, b] += slip
    acct[N_FILLS, b] += 1.0
    if log is not None:
        reason = REASON_SIGNAL
        if kind == KIND_LIQUIDATION:
            reason = REASON_LIQ
        elif kind == KIND_FORCED:
            reason = REASON_END
        elif log.cursor[CUR_EXIT_REASON] != REASON_SIGNAL and ends_position(q, new_q):
            reason = int(log.cursor[CUR_EXIT_REASON])
            log.cursor[CUR_EXIT_REASON] = REASON_SIGNAL
        record(log, acct, b, kind, reason, dq, px, fee, slip, realized, 0.0)


@njit(cache=True)
def max_position(equity: float, px: float, xp: np.ndarray) -> float:
    """Largest |qty| the leverage cap allows at ``px`` once the taker fee of opening it is paid."""
    if equity <= 0.0 or px <= 0.0:
        return 0.0
    lev = xp[XP_LEVERAGE]
    return float(lev * equity / (px * (1.0 + lev * xp[XP_TAKER])))


@njit(cache=True)
def market_order(acct: np.ndarray, b: int, dq: float, ref: float, volume: float, xp: np.ndarray,
                 log: EventLog | None = None) -> float:
    """Fill a market order of signed ``dq`` for account ``b`` at reference price ``ref`` (the fill bar's open).

    The order is first limited to what the account may hold (spot: no shorts, cash ≥ 0; futures: the leverage
    cap on the position after the fill), floored to the step grid and checked against min notional. Returns the
    filled signed quantity (0 when rejected).
    """
    q = acct[QTY, b]
    if xp[XP_SPOT] > 0.0 and dq < -q:
        dq = -q
    if dq == 0.0 or ref <= 0.0:
        return 0.0
    side = 1.0 if dq > 0.0 else -1.0
    px = fill_price(ref, side, abs(dq), volume, xp)
    new_q = q + dq
    if new_q != 0.0 and (q == 0.0 or (new_q > 0.0) != (q > 0.0) or abs(new_q) > abs(q)):  # adds exposure
        if xp[XP_SPOT] > 0.0:
            cap_dq = acct[CASH, b] / (px * (1.0 + xp[XP_TAKER]))
            if dq > cap_dq:
                dq = max(cap_dq, 0.0)
        else:
            cap = max_position(acct[CASH, b] + q * px, px, xp)
            if abs(new_q) > cap:  # exposure is added in the order's direction: clamp the new position to ±cap
                dq = side * cap - q
                if dq * side < 0.0:  # already beyond the cap (the price moved): nothing more is allowed
                    dq = 0.0
    if dq != -q:  # closing to flat keeps the exact position size; anything else goes on the step grid
        dq = round_qty(dq, xp[XP_STEP])
    if dq == 0.0:
        return 0.0
    px = fill_price(ref, side, abs(dq), volume, xp)
    if abs(dq) * px < xp[XP_MIN_NOTIONAL] and q + dq != 0.0:
        return 0.0
    apply_fill(acct, b, dq, px, xp[XP_TAKER], ref, log, KIND_ORDER)
    return dq


@njit(cache=True)
def close_position(acct: np.ndarray, b: int, ref: float, volume: float, xp: np.ndarray,
                   log: EventLog | None = None) -> float:
    """Market-close the whole position (forced close at a session's end or a data gap): taker fee and slippage
    as any order; recorded as a ``KIND_FORCED`` event."""
    q = acct[QTY, b]
    if q == 0.0:
        return 0.0
    px = fill_price(ref, -1.0 if q > 0.0 else 1.0, abs(q), volume, xp)
    apply_fill(acct, b, -q, px, xp[XP_TAKER], ref, log, KIND_FORCED)
    return float(-q)


@njit(cache=True)
def apply_funding(acct: np.ndarray, b: int, bar_time: int, mark: float, xp: np.ndarray,
                  log: EventLog | None = None) -> None:
    """Settle funding on the position held into a bar that opens at a funding timestamp (longs pay if rate > 0);
    recorded as a ``KIND_FUNDING`` event (qty: the position, price: the mark)."""
    if xp[XP_FUNDING] == 0.0 or xp[XP_SPOT] > 0.0 or acct[QTY, b] == 0.0 or bar_time % FUNDING_PERIOD_US != 0:
        return
    pay = acct[QTY, b] * mark * xp[XP_FUNDING]
    acct[CASH, b] -= pay
    acct[FUNDING, b] += pay
    if log is not None:
        record(log, acct, b, KIND_FUNDING, REASON_FUNDING, acct[QTY, b], mark, 0.0, 0.0, 0.0, pay)


@njit(cache=True)
def check_liquidation(acct: np.ndarray, b: int, low: float, high: float, xp: np.ndarray,
                      log: EventLog | None = None) -> bool:
    """Force-close a futures position whose equity at the bar's adverse extreme hits the maintenance margin."""
    q = acct[QTY, b]
    if q == 0.0 or xp[XP_SPOT] > 0.0:
        return False
    mmr = xp[XP_MMR]
    adverse = low if q > 0.0 else high
    cash = acct[CASH, b]
    if cash + q * adverse > mmr * abs(q) * adverse:
        return False
    p_liq = -cash / (q * (1.0 - mmr)) if q > 0.0 else -cash / (q * (1.0 + mmr))
    px = min(max(p_liq, low), high)
    apply_fill(acct, b, -q, px, xp[XP_TAKER], px, log, KIND_LIQUIDATION)
    if acct[CASH, b] < 0.0:
        cover = -acct[CASH, b]
        acct[INSURANCE, b] -= acct[CASH, b]
        acct[CASH, b] = 0.0
        if log is not None:  # the insurance fund's cover belongs to the liquidation just recorded
            i = log.cursor[CUR_N] - 1
            if i < log.data.shape[1]:
                log.data[EV_INSURANCE, i] = cover
    acct[N_LIQUIDATIONS, b] += 1.0
    return True


@njit(cache=True)
def mark_to_market(acct: np.ndarray, b: int, mark: float) -> float:
    eq = acct[CASH, b] + acct[QTY, b] * mark
    acct[EQUITY, b] = eq
    return float(eq)


@njit(cache=True)
def process_bar(acct: np.ndarray, b: int, dq: float, bar_time: int, o: float, h: float, lo: float, c: float,
                v: float, xp: np.ndarray, log: EventLog | None = None) -> float:
    """One bar for one account, in the contract's order: funding at the open, the order's fill at the open,
    the liquidation check over the bar's range, then marking at the close. Returns the filled quantity.
    ``log``: its cursor's time/row/tag are the caller's to set (the bar's)."""
    apply_funding(acct, b, bar_time, o, xp, log)
    filled = market_order(acct, b, dq, o, v, xp, log) if dq != 0.0 else 0.0
    check_liquidation(acct, b, lo, h, xp, log)
    mark_to_market(acct, b, c)
    return filled


# --- batch kernels ---------------------------------------------------------------------------------------------

@njit(cache=True)
def reset_account(acct: np.ndarray, b: int, initial_cash: float) -> None:
    for f in range(N_FIELDS):
        acct[f, b] = 0.0
    acct[CASH, b] = initial_cash
    acct[EQUITY, b] = initial_cash


@njit(cache=True)
def reset_accounts(acct: np.ndarray, idx: np.ndarray, initial_cash: float) -> None:
    for j in range(idx.shape[0]):
        reset_account(acct, idx[j], initial_cash)
