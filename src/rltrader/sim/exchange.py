"""The replay exchange's matching side: accounts, market orders and their fills on the replay clock.

Why it exists: a live trader must be tested end to end (signing, order ids, retries after a lost answer,
positions, balances) against something that fills exactly as the backtest does, so that paper trading on a
replay can be compared with the backtest fill for fill. So fills are never computed here: every order goes
through :func:`kernel_fill`, the one call into :mod:`rltrader.execution` (``market_order``: the kernel's
caps, grid and fee; ``fill_price``: its price), with the backtest's conventions: an order that arrives while
bar ``t`` is in progress fills at bar ``t``'s open with bar ``t``'s volume as the impact denominator,
``market_order(acct, b, dq, open[t], volume[t], xp)`` as ``process_bar`` calls it in the envs and the
backtest. An order that arrives when no bar is in progress (before the data, or in a gap) stays ``NEW`` until
the next bar opens on the clock and fills at that open; until then it can be queried and cancelled.

Binance's exchange rules are checked before the kernel and answered with Binance's codes (LOT_SIZE,
NOTIONAL / MIN_NOTIONAL, reduce-only, client order ids); an order the kernel would not fill in full (the
spot cash cap, the futures leverage cap at the symbol's leverage) is refused as Binance refuses an
unaffordable one (``-2010`` insufficient balance, ``-2019`` margin is insufficient).

Accounting follows the kernel. Spot: the quote balance is the kernel's cash and the base balance its
quantity; commission is charged in the quote asset (the kernel's fee), whichever the side. USDⓈ-M: one
cross-margin wallet per margin asset (``walletBalance`` = deposits + realized PnL - fees, which is the
kernel's ``cash + qty * avg_entry``), a one-way position per symbol; the kernel's equity cap sees the whole
account (other positions marked at their last price). Funding and liquidation, which the backtest applies
bar by bar, are not applied here: the replay exchange settles orders, not bars.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import numpy as np

from rltrader.data.schema import Market
from rltrader.errors import ConfigError
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    FEES,
    N_FIELDS,
    QTY,
    REALIZED,
    XP_LEVERAGE,
    ExecutionParams,
    fill_price,
    market_order,
)
from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import ReplayData, SymbolData, split_symbol
from rltrader.sim.rest import MANDATORY, BinanceError

SPOT_CLIENT_ID = re.compile(r"^[a-zA-Z0-9-_]{1,36}$")
FUTURES_CLIENT_ID = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
MAX_LEVERAGE = 125


@dataclass(frozen=True)
class Fill:
    """One fill as the kernel booked it: signed quantity, price, fee (quote) and the reference price."""

    qty: float
    price: float
    fee: float
    ref: float


def kernel_fill(acct: np.ndarray, dq: float, ref: float, volume: float, xp: np.ndarray) -> Fill | None:
    """Fill signed ``dq`` on the one-account kernel state ``acct`` (``(N_FIELDS, 1)``) through the kernel.

    The single place the exchange touches :mod:`rltrader.execution`. ``acct`` changes only when the kernel
    fills the whole order; ``None`` (nothing booked) when it would cap, round or refuse it.
    """
    trial = acct.copy()
    fees0 = float(trial[FEES, 0])
    filled = market_order(trial, 0, dq, ref, volume, xp)
    if filled == 0.0 or abs(filled - dq) > 1e-9 * abs(dq):
        return None
    px = fill_price(ref, 1.0 if dq > 0.0 else -1.0, abs(filled), volume, xp)
    acct[:] = trial
    return Fill(float(filled), float(px), float(trial[FEES, 0]) - fees0, ref)


@dataclass
class Order:
    """A market order as the exchange keeps it (Binance's fields, as numbers)."""

    order_id: int
    client_order_id: str
    symbol: str
    side: str
    qty: float
    bar: int  # index of the fill bar in the symbol's data
    time_ms: int
    reduce_only: bool = False
    status: str = "NEW"
    executed_qty: float = 0.0
    price: float = 0.0  # average fill price
    commission: float = 0.0
    update_ms: int = 0
    visible_at: float = 0.0  # time.monotonic() from which queries see it (the invisibility fault)

    @property
    def quote_qty(self) -> float:
        return self.executed_qty * self.price


@dataclass
class Account:
    """One API key's account: balances (spot assets / futures wallets), per-symbol kernel state, orders."""

    key: str
    balances: dict[str, float]
    books: dict[str, np.ndarray] = field(default_factory=dict)
    leverage: dict[str, int] = field(default_factory=dict)
    orders: dict[int, Order] = field(default_factory=dict)
    client_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    update_ms: int = 0

    def book(self, symbol: str) -> np.ndarray:
        b = self.books.get(symbol)
        if b is None:
            b = self.books[symbol] = np.zeros((N_FIELDS, 1))
        return b

    def position(self, symbol: str) -> tuple[float, float]:
        """(signed quantity, average entry) of the symbol's position (futures) or holding (spot)."""
        b = self.books.get(symbol)
        return (0.0, 0.0) if b is None else (float(b[QTY, 0]), float(b[AVG_ENTRY, 0]))


def default_params(market: Market) -> ExecutionParams:
    """Binance's VIP0 taker fees per market; everything else as ``ExecutionParams``' defaults."""
    if market is Market.SPOT:
        return ExecutionParams(market="spot", taker_fee=0.001, maker_fee=0.001)
    return ExecutionParams()


class Exchange:
    """Accounts and market orders over a :class:`ReplayData`, timed by the replay clock.

    ``api_keys`` maps API key → secret (accounts are created on first use, each funded with
    ``initial_balances``, by default ``params.initial_cash`` of every quote asset served). Thread-safe: the
    server's loop and a test's thread may both call it.
    """

    def __init__(self, data: ReplayData, clock: ReplayClock, params: ExecutionParams | None = None,
                 api_keys: Mapping[str, str] | None = None, *,
                 initial_balances: Mapping[str, float] | None = None) -> None:
        self.data = data
        self.clock = clock
        self.spot = data.market is Market.SPOT
        self.params = params if params is not None else default_params(data.market)
        if (self.params.market == "spot") != self.spot:
            raise ConfigError(f"execution.market {self.params.market!r} does not match the replayed market "
                              f"{data.market.value!r}")
        self.xp = self.params.to_array()
        self.secrets: dict[str, str] = dict(api_keys or {})
        quotes = {split_symbol(s)[1] for s in data.symbols}
        self.initial = dict(initial_balances) if initial_balances is not None else {
            q: self.params.initial_cash for q in sorted(quotes)}
        self.accounts: dict[str, Account] = {}
        self._next_id = 1
        self.lock = threading.RLock()

    # -- look-ups ------------------------------------------------------------------------------------------
    def account(self, key: str) -> Account:
        acct = self.accounts.get(key)
        if acct is None:
            acct = self.accounts[key] = Account(key, dict(self.initial))
        return acct

    def symbol(self, symbol: str) -> SymbolData:
        if not symbol:
            raise BinanceError(-1102, MANDATORY.format("symbol"))
        sd = self.data.symbols.get(symbol.upper())
        if sd is None:
            raise BinanceError(-1121, "Invalid symbol.")
        return sd

    def leverage(self, acct: Account, symbol: str) -> int:
        return acct.leverage.get(symbol, max(1, round(self.params.leverage)))

    def last_price(self, sd: SymbolData, now_ms: int) -> float:
        """The price the replay shows at ``now_ms``: the candle in progress' close so far, else the last close."""
        i = bisect_right(sd.open_ms, now_ms) - 1
        if i < 0:
            return sd.o[0] if sd.o else sd.p[0]
        if sd.close_ms[i] < now_ms:
            return sd.c[i]
        return self.data.state_at(sd, i, now_ms).c

    def _fill_bar(self, sd: SymbolData, now_ms: int) -> int | None:
        """The bar an order arriving at ``now_ms`` fills in: the one in progress, else the next to open."""
        i = bisect_right(sd.open_ms, now_ms) - 1
        if i >= 0 and now_ms <= sd.close_ms[i]:
            return i
        j = bisect_left(sd.open_ms, now_ms)
        return j if j < len(sd.open_ms) else None

    # -- orders --------------------------------------------------------------------------------------------
    def _check_quantity(self, sd: SymbolData, text: str | None) -> float:
        """Binance's LOT_SIZE (spot: -1013) or quantity rules (futures: -1111 / -4003 / -4004 / -4005)."""
        if not text:
            raise BinanceError(-1102, MANDATORY.format("quantity"))
        try:
            qty = Decimal(text)
        except InvalidOperation as exc:
            raise BinanceError(-1100, "Illegal characters found in parameter 'quantity'; legal range is "
                                      "'^([0-9]{1,20})(\\.[0-9]{1,20})?$'.") from exc
        flt = self.data.filters(sd.symbol)
        step = Decimal(1).scaleb(-flt.qty_dec)
        off_grid = qty % step != 0
        if self.spot:
            if qty <= 0 or off_grid or qty < step or qty > Decimal(repr(flt.max_qty)):
                raise BinanceError(-1013, "Filter failure: LOT_SIZE")
        else:
            if qty <= 0:
                raise BinanceError(-4003, "Quantity less than or equal to zero.")
            if off_grid:
                raise BinanceError(-1111, "Precision is over the maximum defined for this asset.")
            if qty < step:
                raise BinanceError(-4004, "Quantity less than min quantity.")
            if qty > Decimal(repr(flt.market_max_qty)):
                raise BinanceError(-4005, "Quantity greater than max quantity.")
        return float(qty)

    def _client_id(self, acct: Account, symbol: str, cid: str | None) -> str:
        if cid is None or cid == "":
            return secrets.token_hex(11)
        if not (SPOT_CLIENT_ID if self.spot else FUTURES_CLIENT_ID).match(cid):
            if self.spot:
                raise BinanceError(-1100, "Illegal characters found in parameter 'newClientOrderId'; legal range "
                                          "is '^[a-zA-Z0-9-_]{1,36}$'.")
            raise BinanceError(-4015, "Client order id is not valid.")
        prior = acct.client_ids.get((symbol, cid))
        if prior is not None and acct.orders[prior].status == "NEW":
            if self.spot:
                raise BinanceError(-2010, "Duplicate order sent.")
            raise BinanceError(-4116, "ClientOrderId is duplicated.")
        return cid

    def place(self, key: str, symbol: str, side: str, order_type: str, quantity: str | None,
              client_order_id: str | None = None, *, reduce_only: bool = False,
              invisible_ms: float = 0.0) -> Order:
        """Validate and place a market order; it fills now when a bar is in progress (see the module doc)."""
        with self.lock:
            now = self.clock.now_ms()
            self.settle(now)
            sd = self.symbol(symbol)
            if side not in ("BUY", "SELL"):
                raise BinanceError(-1102, MANDATORY.format("side")) if not side else BinanceError(
                    -1117, "Invalid side.")
            if order_type != "MARKET":
                raise BinanceError(-1102, MANDATORY.format("type")) if not order_type else BinanceError(
                    -1116, "Invalid orderType.")
            acct = self.account(key)
            cid = self._client_id(acct, sd.symbol, client_order_id)
            qty = self._check_quantity(sd, quantity)
            bar = self._fill_bar(sd, now)
            if bar is None:
                raise BinanceError(-2010, "Market is closed.")
            q, _ = acct.position(sd.symbol)
            dq = qty if side == "BUY" else -qty
            if reduce_only and (q == 0.0 or (dq > 0.0) == (q > 0.0) or qty > abs(q) + 1e-12):
                raise BinanceError(-2022, "ReduceOnly Order is rejected.")
            min_notional = self.data.filters(sd.symbol).min_notional
            if qty * sd.o[bar] < min_notional and not reduce_only:
                if self.spot:
                    raise BinanceError(-1013, "Filter failure: NOTIONAL")
                raise BinanceError(-4164, f"Order's notional must be no smaller than {min_notional:g} (unless "
                                          "you choose reduce only)")
            order = Order(self._next_id, cid, sd.symbol, side, qty, bar, now, reduce_only, update_ms=now,
                          visible_at=time.monotonic() + invisible_ms / 1000.0)
            if sd.open_ms[bar] <= now and not self._execute(acct, order, now):
                raise self._unaffordable()
            self._next_id += 1
            acct.orders[order.order_id] = order
            acct.client_ids[(sd.symbol, cid)] = order.order_id
            acct.update_ms = now
            return order

    def _unaffordable(self) -> BinanceError:
        if self.spot:
            return BinanceError(-2010, "Account has insufficient balance for requested action.")
        return BinanceError(-2019, "Margin is insufficient.")

    def _execute(self, acct: Account, order: Order, at_ms: int) -> bool:
        """Fill ``order`` at its bar's open through the kernel; False (nothing booked) if it cannot fill."""
        sd = self.data.symbols[order.symbol]
        base, quote = split_symbol(order.symbol)
        book = acct.book(order.symbol)
        xp = self.xp
        if self.spot:
            book[CASH, 0] = acct.balances.get(quote, 0.0)
            book[QTY, 0] = acct.balances.get(base, 0.0)
        else:
            others = sum(b[QTY, 0] * (self.last_price(self.data.symbols[s], at_ms) - b[AVG_ENTRY, 0])
                         for s, b in acct.books.items() if s != order.symbol)
            book[CASH, 0] = acct.balances.get(quote, 0.0) + others - book[QTY, 0] * book[AVG_ENTRY, 0]
            xp = xp.copy()
            xp[XP_LEVERAGE] = self.leverage(acct, order.symbol)
        realized0, fees0 = float(book[REALIZED, 0]), float(book[FEES, 0])
        dq = order.qty if order.side == "BUY" else -order.qty
        fill = kernel_fill(book, dq, sd.o[order.bar], sd.v[order.bar], xp)
        if fill is None:
            return False
        if self.spot:
            acct.balances[quote] = float(book[CASH, 0])
            acct.balances[base] = float(book[QTY, 0])
        else:
            acct.balances[quote] = (acct.balances.get(quote, 0.0) + float(book[REALIZED, 0]) - realized0
                                    - (float(book[FEES, 0]) - fees0))
        order.status = "FILLED"
        order.executed_qty = abs(fill.qty)
        order.price = fill.price
        order.commission = fill.fee
        order.update_ms = at_ms
        acct.update_ms = at_ms
        return True

    def settle(self, now_ms: int | None = None) -> None:
        """Fill the pending orders whose bar has opened by ``now_ms``, in bar then order-id order.

        One the kernel cannot fill any more (the account changed meanwhile) expires, as Binance expires a
        market order it cannot fill.
        """
        with self.lock:
            now = self.clock.now_ms() if now_ms is None else now_ms
            for acct in self.accounts.values():
                due = [o for o in acct.orders.values()
                       if o.status == "NEW" and self.data.symbols[o.symbol].open_ms[o.bar] <= now]
                due.sort(key=lambda o: (self.data.symbols[o.symbol].open_ms[o.bar], o.order_id))
                for o in due:
                    if not self._execute(acct, o, self.data.symbols[o.symbol].open_ms[o.bar]):
                        o.status = "EXPIRED"
                        o.update_ms = self.data.symbols[o.symbol].open_ms[o.bar]

    def find(self, key: str, symbol: str, order_id: int | None, client_id: str | None) -> Order | None:
        """The order by id or client id, if it exists and is visible to queries yet."""
        with self.lock:
            self.settle()
            sd = self.symbol(symbol)
            acct = self.account(key)
            if order_id is None and not client_id:
                raise BinanceError(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were "
                                          "empty/null!")
            if order_id is None:
                order_id = acct.client_ids.get((sd.symbol, client_id or ""))
            order = acct.orders.get(order_id) if order_id is not None else None
            if order is None or order.symbol != sd.symbol or time.monotonic() < order.visible_at:
                return None
            if client_id and order.client_order_id != client_id:
                return None
            return order

    def cancel(self, key: str, symbol: str, order_id: int | None, client_id: str | None) -> Order:
        with self.lock:
            order = self.find(key, symbol, order_id, client_id)
            if order is None or order.status != "NEW":
                raise BinanceError(-2011, "Unknown order sent.")
            order.status = "CANCELED"
            order.update_ms = self.clock.now_ms()
            return order

    def open_orders(self, key: str, symbol: str | None) -> list[Order]:
        with self.lock:
            self.settle()
            wanted = self.symbol(symbol).symbol if symbol else None
            now = time.monotonic()
            return [o for o in self.account(key).orders.values()
                    if o.status == "NEW" and (wanted is None or o.symbol == wanted) and now >= o.visible_at]

    def set_leverage(self, key: str, symbol: str, leverage: int) -> int:
        with self.lock:
            sd = self.symbol(symbol)
            if not 1 <= leverage <= MAX_LEVERAGE:
                raise BinanceError(-4028, f"Leverage {leverage} is not valid")
            self.account(key).leverage[sd.symbol] = leverage
            return leverage


__all__ = ["Account", "Exchange", "Fill", "Order", "default_params", "kernel_fill"]
