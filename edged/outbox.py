"""Every reply goes out through here; one thread owns each final reply's state.

A final reply of a journaled request moves stored -> published -> acknowledged -> done: it is stored in the
journal before it is published, and marked done when the broker's acknowledgement comes (``on_published``),
never by polling. While the broker is away paho keeps QoS 1 replies and sends them on reconnect; QoS 0
replies wait here for the next connection. After a crash the journal still holds the stored ones and
``restore`` sends them again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edged import protocol
from edged.errors import EdgedError
from edged.journal import Journal
from edged.llm.engine import Sequence
from edged.metrics import Counts
from edged.mqtt import NotSent
from edged.protocol import Request, Route

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int, bytes | None], int]  # topic, payload, qos, correlation -> message id


@dataclass(frozen=True)
class _Send:
    route: Route
    payload: bytes
    final: tuple[str, str] | None = None  # (identity key, id) of a journaled final reply
    store: bool = True  # False when the journal already holds it (restored after a restart)


@dataclass(frozen=True)
class _Acked:
    mid: int
    failure: str | None


class Outbox:
    """The scheduler's and the inbox's way out. Methods only enqueue; the outbox thread publishes."""

    def __init__(self, journal: Journal, publish: Publish, *, node: str, model: str, counters: Counts) -> None:
        self._journal = journal
        self._publish = publish
        self._node = node
        self.model = model  # named in replies that ran no model (deadline or cancel while queued)
        self._counters = counters
        self._events: queue.Queue[_Send | _Acked | str | None] = queue.Queue()
        self._pending: dict[int, tuple[str, str]] = {}  # message id -> (key, id) awaiting the broker's ack
        self._offline: list[_Send] = []  # QoS 0 messages that found no connection
        self._idle = threading.Condition()
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="edged-outbox", daemon=True)
        self.tokens_per_s = 0.0  # of the last answer, for telemetry

    def start(self) -> None:
        self._thread.start()

    # -- what the scheduler produces (scheduler.Replies) --------------------------------------------

    def chunk(self, request: Request, seq: int, delta: str) -> None:
        self._put(_Send(request.route, protocol.chunk(request.id, seq, delta)))

    def result(self, request: Request, generation: Sequence, energy_j: float | None, model: str) -> None:
        r = generation.result
        assert r is not None
        if r.timings.tokens_per_s:
            self.tokens_per_s = r.timings.tokens_per_s
        log.info(
            "answered %s: %s, %d tokens, %.0f ms, %s J",
            request.id,
            r.finish_reason,
            r.usage.completion_tokens,
            r.timings.total_ms,
            energy_j,
            extra={"request_id": request.id},
        )
        sources = request.sources if request.knowledge else None
        payload = protocol.final(request.id, r, model=model, node=self._node, energy_j=energy_j, sources=sources)
        self.final(request, payload)

    def ended(self, request: Request, finish_reason: str) -> None:
        queue_ms = (time.time() - request.received_at) * 1000
        payload = protocol.unfinished(request.id, finish_reason, model=self.model, node=self._node, queue_ms=queue_ms)
        self.final(request, payload)

    def failed(self, request: Request, exc: EdgedError) -> None:
        self._counters.add(f"error.{exc.code}")
        self.final(request, protocol.error(request.id, exc, node=self._node))

    # -- the inbox's --------------------------------------------------------------------------------

    def final(self, request: Request, payload: bytes) -> None:
        """The one final reply of a journaled request."""
        self._counters.add("answered")
        self._put(_Send(request.route, payload, final=(request.identity.key, request.id)))

    def restore(self, key: str, request_id: str, route: Route, payload: bytes) -> None:
        """A final reply stored by an earlier run but not acknowledged: sent again."""
        self._put(_Send(route, payload, final=(key, request_id), store=False))

    def send(self, route: Route, payload: bytes) -> None:
        """A reply outside the journal: a refusal, or a stored reply sent again to a retried id."""
        self._put(_Send(route, payload))

    # -- the link's (network thread) ----------------------------------------------------------------

    def published(self, mid: int, failure: str | None) -> None:
        self._put(_Acked(mid, failure))

    def connected(self) -> None:
        self._put("connected")

    def drain(self, timeout_s: float) -> bool:
        """Waits until everything handed over is published and every final reply acknowledged; then stops."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while (self._busy or self._pending) and time.monotonic() < deadline:
                self._idle.wait(0.05)
            drained = not self._busy and not self._pending
        self._events.put(None)
        self._thread.join(2)
        return drained

    # -- the outbox thread --------------------------------------------------------------------------

    def _put(self, event: _Send | _Acked | str) -> None:
        with self._idle:
            self._busy += 1
        self._events.put(event)

    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                if isinstance(event, _Send):
                    self._send(event)
                elif isinstance(event, _Acked):
                    self._acked(event)
                else:
                    offline, self._offline = self._offline, []
                    for send in offline:
                        self._send(send)
            except Exception:  # the outbox must outlive anything one reply does
                log.exception("the outbox failed on %r", event)
                self._counters.add("outbox_errors")
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _send(self, send: _Send) -> None:
        route = send.route
        if send.final is not None and send.store:
            self._journal.replied(*send.final, route.topic, send.payload)
        try:
            mid = self._publish(route.topic, send.payload, route.qos, route.correlation)
        except NotSent as exc:
            if exc.retry:
                self._offline.append(send)
                return
            self._counters.add("replies_not_sent")
            log.error("a reply for %s on %r was not sent: %s", send.final, route.topic, exc)
            if send.final is not None:
                self._journal.done(*send.final)
            return
        if send.final is not None:
            if route.qos == 0:
                self._journal.done(*send.final)  # at most once: nothing will acknowledge it
            else:
                with self._idle:
                    self._pending[mid] = send.final

    def _acked(self, acked: _Acked) -> None:
        with self._idle:
            final = self._pending.pop(acked.mid, None)
        if final is None:
            return
        if acked.failure is not None:  # e.g. the broker's ACL: the kiosk will not get it, retrying cannot help
            self._counters.add("replies_refused_by_broker")
            log.warning("the broker refused the reply to %s: %s", final[1], acked.failure)
        self._journal.done(*final)
