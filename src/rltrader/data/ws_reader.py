"""The lean websocket side of the live ingester: frame decoding, the read loop, closing a socket.

These replace parts of python-binance's ``ReconnectingWebsocket`` on the socket the ingester opens
(:meth:`rltrader.data.stream.StreamIngester._session`): a malformed frame is skipped instead of ending the read
loop, and frames are read without python-binance's per-message overhead. Split out of
:mod:`rltrader.data.stream` (no behaviour change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from rltrader.data.stream_common import event

if TYPE_CHECKING:
    from rltrader.data.stream import StreamStats

READ_BURST = 2000
"""Frames read back to back before the read loop yields a turn to the consumer and the writer."""


def decoder(sock: Any, stats: StreamStats) -> Callable[[Any], Any]:
    """python-binance's JSON decoding, but a frame that is not JSON is counted, logged and dropped (None)."""
    loads = sock.json_loads

    def decode(raw: Any) -> Any:
        try:
            return loads(raw)
        except ValueError:
            stats.malformed += 1
            event(logging.WARNING, "malformed_frame", reason="not json", frame=str(raw)[:200])
            return None

    return decode



def read_loop(sock: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    """A lean replacement for python-binance's read loop (same queue, same in-band error message).

    Why: python-binance wraps every ``ws.recv()`` in ``asyncio.wait_for`` (a Task and a timer per message)
    and formats a debug f-string of the whole message even when debug logging is off: most of the CPU a
    message cost. Here frames already buffered are taken without suspending, so the consumer gets them in
    batches (a turn is yielded every ``READ_BURST`` frames so a flood cannot starve the consumer and the
    writer). Staleness is ``StreamIngester._consume``'s job (its own timeout), and reconnects are ours, so the
    loop only has to report the end of the connection, as python-binance does: ``{"e": "error", ...}``.
    """

    async def loop() -> None:
        queue, decode, ws = sock._queue, sock._handle_message, sock.ws
        n = 0
        try:
            while True:
                n += 1
                if n % READ_BURST == 0:
                    await asyncio.sleep(0)
                msg = decode(await ws.recv())
                if msg is not None:
                    if queue.qsize() >= sock.max_queue_size:
                        raise OverflowError(f"message queue size {queue.qsize()} exceeded its maximum")
                    queue.put_nowait(msg)
        except asyncio.CancelledError as exc:
            queue.put_nowait({"e": "error", "type": type(exc).__name__, "m": str(exc)})
        except Exception as exc:  # closed, reset, overflow: the consumer reconnects
            queue.put_nowait({"e": "error", "type": type(exc).__name__, "m": str(exc)})
        finally:
            sock._handle_read_loop = None  # python-binance's recv() then raises ReadLoopClosed

    return loop


async def close_socket(sock: Any) -> None:
    """Close the websocket first: that wakes python-binance's read loop at once (it would otherwise sit in a
    10 s recv timeout before noticing it should exit)."""
    ws = getattr(sock, "ws", None)
    if ws is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sock.__aexit__(None, None, None), 5)
