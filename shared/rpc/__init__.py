"""Correlated request/response over MQTT v5: the one implementation cellwatch uses,
both halves of it.

The responder half is the edge (`edge`: routes, `Inbound` values with `ack()` and
`reply()`, reply policies; see its docstring): every message a node, the hub or a
client receives comes through it. The requester half follows.

A request is published (QoS 1) with a Response Topic and fresh Correlation Data
(16 random bytes); the peer answers on the Response Topic with the Correlation
Data echoed. `Rpc` matches answers to requests and adds, for every caller:

- a per-request deadline (`RequestPolicy.timeout_s`), after which the request fails with
  RequestTimeout;
- retry: without an answer after `retry_after_s` the same payload is published
  again with new Correlation Data and the user property `attempt=N` (N >= 2), up to
  `max_attempts`; every attempt's Correlation Data completes the same request, so
  a late answer to attempt 1 still counts;
- Message Expiry Interval set to the time left on every publish, so a copy the
  broker still holds after the deadline expires there instead of being answered
  late;
- the first answer wins; later ones are counted as duplicates and dropped, and
  answers whose Correlation Data this Rpc never sent are counted and dropped;
- a bounded window of requests in flight (`submit` blocks for a free slot);
- a broker that refuses a publish (PUBACK reason >= 0x80, e.g. not authorized)
  fails the request with PublishRefused.

Threads: paho's network thread calls `on_message`, which parses the payload (the
caller's `parse`), looks the request up and hands the outcome over; it never blocks
and never runs user code besides `parse`. One dispatcher thread per Rpc completes
the futures (so done-callbacks never run on the network thread) and runs every
retry and deadline timer from one heap. Batch callers (`send`) get each outcome
put into their queue directly, without the hop through the dispatcher. While the
connection is down, retries wait: paho resends the queued publish itself after
reconnecting.

Modules: `edge` (the responder half), `core` (Rpc), `errors`, `values` (RequestPolicy,
Reply, RpcStats), `transfer` (the one chunk wire format, its windowed download and
upload on top of Rpc).
"""

from cellwatch.shared.rpc.core import Rpc, Ticket
from cellwatch.shared.rpc.edge import (
    NOWHERE,
    Acks,
    Delivery,
    Edge,
    Inbound,
    Problem,
    Publisher,
    Rejected,
    ReplyPolicy,
    ReplyTo,
    Route,
    deliver,
    no_reply,
    raw,
    response_topic,
)
from cellwatch.shared.rpc.errors import (
    PacketTooLarge,
    PublishRefused,
    RemoteError,
    RequestTimeout,
    RpcClosed,
    RpcError,
)
from cellwatch.shared.rpc.values import (
    ATTEMPT_PROPERTY,
    Outcome,
    Parse,
    Reply,
    RequestPolicy,
    RpcStats,
    Sink,
)

__all__ = [
    "ATTEMPT_PROPERTY",
    "NOWHERE",
    "Acks",
    "Delivery",
    "Edge",
    "Inbound",
    "Outcome",
    "PacketTooLarge",
    "Parse",
    "Problem",
    "PublishRefused",
    "Publisher",
    "Rejected",
    "RemoteError",
    "Reply",
    "ReplyPolicy",
    "ReplyTo",
    "RequestPolicy",
    "RequestTimeout",
    "Route",
    "Rpc",
    "RpcClosed",
    "RpcError",
    "RpcStats",
    "Sink",
    "Ticket",
    "deliver",
    "no_reply",
    "raw",
    "response_topic",
]
