"""``Trader.restore_from_journal`` rebuilds the whole per-symbol state a decision depends on, not only the account:
after any bar of a recorded session, a new trader restored from the journal alone holds the running trader's
account, the env's fields (the Lowrider cycle's buy count, the bars a position has been open) and the fees of
finished cycles — in Lowrider mode, where the take-profit prices the current cycle's fees and the rule's DCA
step reads the cycle's buys, and in futures mode with ``min_hold_bars``.

The session is a paper one (fills from the kernel) driven bar by bar on real NEARUSDT bars; the restored trader
is built as ``rltrader trade`` builds one for a session that starts on new bars (``rehandle=None``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import build_near_april

from rltrader.config import Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.env.modes import E_HELD, E_N_BUYS
from rltrader.execution import SLIPPAGE, mark_to_market
from rltrader.live.gateway import Bar, OrderRequest, PaperBroker
from rltrader.live.records import Records
from rltrader.live.trader import Trader, bars_from_frame, build_trader
from rltrader.train import variant_settings

SYM = "NEARUSDT"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)


@pytest.fixture(scope="module")
def built(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[Bar]]:
    """A Lowrider that cycles often on the day (0.3 % profit target, 200-quote lots, as test_lowrider's)."""
    settings = build_near_april(shared_archive, tmp_path_factory.mktemp("restore"),
                                env={"base_lot": 200.0, "profit_target": 0.003, "rule_drop_step": 0.004})
    store = ParquetStore(settings.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", SYM, "1m"))
    store.close()
    return settings, bars


def _state(trader: Trader) -> tuple[list[float], float, float, float]:
    """Account (without the slippage total: a journaled fill books none, as an exchange fill books none), the
    cycle's buys, the bars held, the fees of finished cycles."""
    book = trader.books[SYM]
    acct = [float(v) for i, v in enumerate(book.acct[:, 0]) if i != SLIPPAGE]
    return acct, float(book.env[E_N_BUYS, 0]), float(book.env[E_HELD, 0]), book.fees_carry


def _restored_along(settings: Settings, model: str, bars: list[Bar], tmp: Path,
                    want: int) -> list[tuple[int, tuple[list[float], float, float, float]]]:
    """Run a paper session bar by bar; after each bar where the cycle state moved (and, with ``want``, every 7th
    bar of an open position's hold count), restore a fresh trader from the journal, assert it equals the running
    one, and return the (bar, state) pairs checked."""
    records = Records(tmp / "trader.db", durable=False)
    trader = build_trader(settings, mode="paper", symbols=[SYM], model=model, records=records,
                          broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
    t0 = int(DAY0.timestamp() * 1e6)
    trader.warm_up(SYM, (b for b in bars if b.time < t0))
    checked: list[tuple[int, tuple[list[float], float, float, float]]] = []
    last_carry, last_buys = 0.0, 0.0
    for b in bars:
        if not t0 <= b.time < int(DAY1.timestamp() * 1e6) - 60_000_000:
            continue
        trader.on_bar(SYM, b)
        trader.between_bars()
        state = _state(trader)
        # the interesting bars: a cycle just closed (fees carried), or the cycle's buy count / hold count moved
        moved = state[3] != last_carry or state[1] != last_buys
        last_carry, last_buys = state[3], state[1]
        if not (moved or (want and state[2] > 1 and state[2] % 7 == 0)):
            continue
        records.flush()
        late = build_trader(settings, mode="paper", symbols=[SYM], model=model, records=records,
                            broker=PaperBroker(np.zeros(0)), session_id=trader.session_id)
        late.restore_from_journal(SYM)
        mark_to_market(late.books[SYM].acct, 0, b.close)  # the next settle marks it; the running one is marked
        checked.append((b.time, state))
        assert _state(late) == state, (b.time, _state(late), state)
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("latency", [0, 1])
def test_a_restored_lowrider_trader_has_the_cycle_state_of_the_running_one(
        built: tuple[Settings, list[Bar]], tmp_path: Path, latency: int) -> None:
    """With ``latency_bars`` a cycle that closes flat while a buy is still queued does not restart (the
    backtest's rule): the restore replays the cycle bookkeeping with the queue as it was at each bar."""
    settings, bars = built
    settings = settings.model_copy(update={"execution": replace(settings.execution, latency_bars=latency)})
    lowrider = variant_settings(settings, "lowrider")
    checked = _restored_along(lowrider, "lowrider_rule", bars, tmp_path, want=0)
    # the day had closed cycles (fees carried) and DCA cycles of more than one buy, each checked after its bar
    assert any(state[3] > 0 for _, state in checked)
    assert max(state[1] for _, state in checked) >= 2
    assert any(state[1] == 0 and state[3] > 0 for _, state in checked)  # right after a cycle closed


@pytest.mark.slow
def test_a_restored_futures_trader_keeps_the_min_hold_count(built: tuple[Settings, list[Bar]], tmp_path: Path) -> None:
    settings, bars = built
    held = settings.model_copy(update={"env": replace(settings.env, min_hold_bars=30)})
    checked = _restored_along(held, "sma_cross", bars, tmp_path, want=1)
    assert any(state[2] > 1 for _, state in checked)


@pytest.mark.slow
@pytest.mark.parametrize("latency", [1, 2])
def test_a_restored_trader_has_the_pending_queue_of_the_running_one(
        built: tuple[Settings, list[Bar]], tmp_path: Path, latency: int) -> None:
    """``execution.latency_bars``: after any bar, a trader restored from the journal alone holds the orders the
    running one decided and has not sent yet (same quantity, reason and client order id), the committed slots
    its next order is sized against, and the decision count that says when each goes out."""
    base, bars = built
    settings = base.model_copy(update={"execution": replace(base.execution, latency_bars=latency)})
    records = Records(tmp_path / "trader.db", durable=False)
    trader = build_trader(settings, mode="paper", symbols=[SYM], model="sma_cross", records=records,
                          broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
    t0, t1 = int(DAY0.timestamp() * 1e6), int(DAY1.timestamp() * 1e6) - 60_000_000
    trader.warm_up(SYM, (b for b in bars if b.time < t0))

    def queue(t: Trader) -> tuple[int, list[float], list[tuple[int, OrderRequest]]]:
        book = t.books[SYM]
        return book.k, book.pending[0].tolist(), sorted((k, r) for (s, k), r in t.queued.items() if s == SYM)

    checked = 0
    for b in bars:
        if not t0 <= b.time < t1:
            continue
        trader.on_bar(SYM, b)
        trader.between_bars()
        now = queue(trader)
        if not now[2] and b.time % (97 * 60_000_000):
            continue  # orders held, and every 97th bar (an empty queue restores empty)
        late = build_trader(settings, mode="paper", symbols=[SYM], model="sma_cross", records=records,
                            broker=PaperBroker(np.zeros(0)), session_id=trader.session_id)
        late.restore_from_journal(SYM)
        assert queue(late) == now, b.time
        mark_to_market(late.books[SYM].acct, 0, b.close)
        assert _state(late) == _state(trader), b.time
        checked += bool(now[2])
    assert checked >= 20 and trader.books[SYM].k > 600
