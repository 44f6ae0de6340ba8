"""Faults on demand for the replay server, the request-weight limit, and the counters showing what happened.

Faults (dropped connections, stalls, malformed frames) and an optional request-weight limit that answers
HTTP 429 make the failure paths testable; they can be changed at runtime through
:meth:`rltrader.sim.ReplayServer.set_faults` or ``POST /_replay/faults``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

MalformedKind = Literal["not_json", "bad_shape"]


@dataclass(frozen=True)
class Faults:
    """Network misbehaviour applied to every websocket connection, counted per connection.

    ``drop_after``: after this many data messages, abruptly close the TCP connection (no close frame, like a
    network failure; a reconnecting client is dropped again after as many). The break replaces the next
    message: it happens when that message comes due on the replay clock, not in the same instant as the last
    write, so a client that keeps up with market time reads exactly ``drop_after`` messages before it sees the
    break (python-binance discards frames it has received but not yet read once it notices a closed
    connection). With no further event the connection is not dropped. ``stall_after``/``stall_seconds``:
    once per connection, after that many messages, send nothing for that long while keeping the socket open;
    the events that came due meanwhile follow in a burst, as after a real network stall. ``malformed_every``:
    after every N-th data message insert one extra broken frame (``not_json`` text, or ``bad_shape`` JSON
    whose payload misses the fields a consumer needs); no real message is lost to it.
    """

    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    malformed_every: int | None = None
    malformed_kind: MalformedKind = "not_json"

    def __post_init__(self) -> None:
        for name in ("drop_after", "stall_after", "malformed_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"fault {name} must be a positive integer or null, not {v!r}")
        if self.stall_seconds < 0:
            raise ValueError(f"fault stall_seconds must be >= 0, not {self.stall_seconds!r}")
        if self.malformed_kind not in ("not_json", "bad_shape"):
            raise ValueError(f"fault malformed_kind must be 'not_json' or 'bad_shape', "
                             f"not {self.malformed_kind!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Faults:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OrderFaults:
    """Trading-API misbehaviour, for testing how a trader copes with not knowing whether an order went in.

    Counters apply to the next that many order placements (``POST …/order``) and count down:
    ``drop_response``: the order is applied, then the connection is closed without an answer.
    ``server_error``: HTTP 503 with Binance's "Unknown error, please check your request or try again later."
    ``timeout``: HTTP 408 with ``-1007`` "Timeout waiting for response from backend server. Send status
    unknown; execution status unknown." For these two, ``applied`` says whether the order went in anyway
    (Binance: the execution status is unknown and could have been a success).
    ``rate_limited``: HTTP 429, ``-1015`` too many new orders, with ``Retry-After: retry_after_s``; not applied.
    ``invisible_ms``: every new order stays invisible to order queries and cancels (``-2013`` Order does not
    exist / ``-2011`` Unknown order sent.) for this many wall-clock ms after it is placed, as a lagging
    query replica would leave it.
    """

    drop_response: int = 0
    server_error: int = 0
    timeout: int = 0
    applied: bool = True
    rate_limited: int = 0
    retry_after_s: int = 1
    invisible_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop_response", "server_error", "timeout", "rate_limited", "retry_after_s"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"order fault {name} must be an integer >= 0, not {v!r}")
        if not isinstance(self.applied, bool):
            raise ValueError(f"order fault applied must be true or false, not {self.applied!r}")
        if not self.invisible_ms >= 0:
            raise ValueError(f"order fault invisible_ms must be >= 0, not {self.invisible_ms!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> OrderFaults:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown order fault setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RateLimit:
    """Request-weight budget per window; exceeding it answers HTTP 429 with Binance's -1003 error.

    The window is wall-clock time (Binance limits real requests, not market time); tests shorten it.
    """

    weight: int
    window_s: float = 60.0



@dataclass
class ServerStats:
    """Counters tests and operators read to see what the server did."""

    connections: int = 0
    active_connections: int = 0
    messages_sent: int = 0
    malformed_sent: int = 0
    drops: int = 0
    stalls: int = 0
    requests: int = 0
    rate_limited: int = 0
    orders_filled: int = 0
    orders_rejected: int = 0
    order_faults: int = 0

