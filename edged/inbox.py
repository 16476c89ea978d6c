"""The way in: a bounded hand-off from paho's network thread, and one thread that handles each message.

``put`` runs on the network thread and only enqueues. The inbox thread parses, confines the reply route,
deduplicates, admits, tokenizes, journals (fsync) and queues the request, and then acknowledges the
message to the broker: exactly once, whatever the message holds or raises.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from edged import knowledge, protocol
from edged.admission import NodeState, refusal
from edged.errors import EdgedError, Internal, InvalidRequest, ModelUnavailable, TooLong
from edged.journal import Journal, Unfinished
from edged.knowledge import KnowledgeBase
from edged.llm import GenerationRequest, LogitsHook
from edged.metrics import Counts
from edged.mqtt import Inbound
from edged.outbox import Outbox
from edged.protocol import Defaults, Envelope, Identity, Refusal, Request, Route, Source
from edged.scheduler import RateLimiter, Scheduler
from edged.systemd import IDLE_BEAT_S

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # starts of the daemon a journaled request may take part in before it is answered `internal`


@dataclass(frozen=True)
class Wiring:
    """What the inbox thread works with; the composition root builds it and swaps it on reload."""

    defaults: Defaults
    dedupe_window_s: float
    limiter: RateLimiter
    scheduler: Scheduler | None  # None while no model is loaded
    prompt_ids: Callable[[GenerationRequest], list[int]] | None
    compile_format: Callable[[object, int], Callable[[], LogitsHook]] | None  # format, max_tokens (edged.structured)
    knowledge: Mapping[str, KnowledgeBase]  # the profiles' knowledge bases that could be loaded, by name
    context_tokens: int  # the loaded model's context budget: passages found give way to the answer's tokens
    node: Callable[[int], NodeState]  # admission's view of the node, for a request of this priority rank
    on_ha_status: Callable[[bytes], None]


class Inbox:
    def __init__(
        self,
        capacity: int,
        wiring: Wiring,
        journal: Journal,
        outbox: Outbox,
        counters: Counts,
    ) -> None:
        self.wiring = wiring
        self._queue: queue.Queue[Inbound | None] = queue.Queue(capacity)
        self._journal = journal
        self._outbox = outbox
        self._counters = counters
        self._thread = threading.Thread(target=self._run, name="edged-inbox", daemon=True)
        self._stopping = threading.Event()
        self.heartbeat = time.monotonic()

    # -- network thread ------------------------------------------------------------------------------

    def put(self, inbound: Inbound) -> None:
        """Never raises and never does work. A full inbox drops QoS 0 messages (counted); QoS 1 and 2 wait
        (the broker's in-flight window bounds how many of those can come unacknowledged)."""
        if self._stopping.is_set():
            return  # not acknowledged: the broker delivers it again to the next run (persistent session)
        try:
            if inbound.envelope.qos == 0:
                self._queue.put_nowait(inbound)
            else:
                self._queue.put(inbound, timeout=30)
        except queue.Full:
            self._counters.add("inbox_full_dropped")

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops taking messages and handles those already handed over (a message of the fleet link, whose
        session ends with it, would otherwise be lost); later ones stay unacknowledged with the broker."""
        self._stopping.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()  # moves while idle too: the watchdog sees a live inbox
            try:
                inbound = self._queue.get(timeout=IDLE_BEAT_S)
            except queue.Empty:
                continue
            if inbound is None:
                break
            env = inbound.envelope
            try:
                self._handle(env)
            except Exception:  # a bug must cost one message, never the node
                log.exception("handling a message on %r failed", env.topic[:200])
                self._counters.add("inbox_errors")
            finally:
                inbound.ack()

    # -- one message ---------------------------------------------------------------------------------

    def _handle(self, env: Envelope) -> None:
        w = self.wiring
        d = w.defaults
        if env.topic == f"{d.homeassistant_prefix}/status":
            w.on_ha_status(env.payload)
            return
        if env.retained:  # a retained question would be asked again at every restart
            self._counters.add("retained_ignored")
            log.warning("ignored a retained message on %s (clear it with an empty retained publish)", env.topic)
            return
        if env.topic == d.topic("cancel") or env.topic.startswith(d.topic("cancel") + "/"):
            self._cancel(env)
            return
        self._counters.add("received")
        parsed = protocol.parse(env, d)
        seen = self._journal.seen(parsed.identity.key, parsed.id, w.dedupe_window_s)
        if seen is not None and env.redelivered:  # the same message again: it was answered or refused already
            self._counters.add("redeliveries")
            log.info("redelivery of %s (%s) ignored", parsed.id, seen.state, extra={"request_id": parsed.id})
            return
        if isinstance(parsed, Refusal):
            self._refuse(env, parsed.id, parsed.identity, parsed.route, parsed.error)
            return
        request = parsed
        if seen is not None and seen.state != "refused":
            self._counters.add("duplicates")
            if seen.reply is not None:  # a retry, answered before: the same final reply, on this request's route
                self._counters.add("replies_resent")
                self._outbox.send(request.route, seen.reply)
            log.info("repeated id %s (%s)", request.id, seen.state, extra={"request_id": request.id})
            return
        try:
            request, prompt_ids = admit(w, request)
        except EdgedError as exc:
            self._refuse(env, request.id, request.identity, request.route, exc)
            return
        # The worker may start on it while the journal's fsync is under way (the prefill hides the fsync);
        # the broker's acknowledgement comes only after the record, and the final reply waits for it.
        key = request.identity.key
        self._journal.expect(key, request.id)
        assert w.scheduler is not None  # admit refuses a request while no model is loaded
        try:
            w.scheduler.submit(request, prompt_ids)
        except EdgedError as exc:  # shutting down: refused, not journaled
            self._journal.unexpect(key, request.id)
            self._refuse(env, request.id, request.identity, request.route, exc)
            return
        self._journal.record(key, request.id, env)

    def _cancel(self, env: Envelope) -> None:
        w = self.wiring
        try:
            identity, request_id = protocol.parse_cancel(env, w.defaults)
        except InvalidRequest as exc:
            self._counters.add("cancel_invalid")
            log.info("cancel on %s refused: %s", env.topic[:200], exc.message)
            return
        if w.scheduler is None or not w.scheduler.cancel(identity, request_id):
            self._counters.add("cancel_unmatched")

    def _refuse(self, env: Envelope, request_id: str, identity: Identity, route: Route, exc: EdgedError) -> None:
        self._counters.add(f"error.{exc.code}")
        if isinstance(exc, InvalidRequest):
            self._counters.add("invalid")
        log.info(
            "request %s from %r refused: %s: %s",
            request_id,
            identity.name[:200],
            exc.code,
            exc.message,
            extra={"request_id": request_id, "code": exc.code},
        )
        payload = protocol.error(request_id, exc, node=self.wiring.defaults.node)
        self._journal.refused(identity.key, request_id, env, payload)
        self._outbox.send(route, payload)

    # -- the journal of an earlier run ---------------------------------------------------------------

    def replay(self, rows: list[Unfinished]) -> None:
        """Finishes what an earlier run accepted: re-sends stored replies, re-runs or expires the rest.

        A request that was already taken up by MAX_ATTEMPTS starts is answered ``internal``: whatever it does
        to the node, it cannot crash it in a loop.
        """
        w = self.wiring
        for row in rows:
            route = Route(row.reply_topic or "", row.envelope.qos, row.envelope.correlation)
            if row.reply is not None and row.reply_topic is not None:
                self._outbox.restore(row.key, row.id, route, row.reply)
                continue
            self._journal.attempt(row.key, row.id)
            parsed = protocol.parse(row.envelope, w.defaults)
            identity = Identity(row.key[1:], row.key.startswith("@"))
            stand_in = _stand_in(row.id, identity, parsed.route)
            log.info("replaying journaled request %s", row.id, extra={"request_id": row.id})
            try:
                if row.attempts >= MAX_ATTEMPTS:
                    raise Internal(f"this request was interrupted {row.attempts} times; it is not tried again")
                if isinstance(parsed, Refusal):
                    raise parsed.error
                request = replace(parsed, id=row.id, identity=identity)
                if time.time() >= request.deadline_at:
                    self._outbox.ended(request, "deadline")
                    continue
                request, prompt_ids = prepared(w, request)
                assert w.scheduler is not None
                w.scheduler.submit(request, prompt_ids, force=True)
            except EdgedError as exc:
                self._outbox.failed(stand_in, exc)


def admit(wiring: Wiring, request: Request) -> tuple[Request, list[int]]:
    """What every way in (MQTT, HTTP) does before queueing a well-formed request: the asker's rate, the
    model, the governor and the queue (admission.py), then ``prepared``. Raises the refusal (an EdgedError
    with its wire code)."""
    rate_retry_s = wiring.limiter.admit(request.identity.key)
    error = refusal(request.identity.name, rate_retry_s, wiring.node(request.priority_rank))
    if error is not None:
        raise error
    return prepared(wiring, request)


def prepared(wiring: Wiring, request: Request) -> tuple[Request, list[int]]:
    """The request as the engine runs it (its format compiled into a logits hook, its profile's knowledge in
    the prompt) and its prompt's token ids; InvalidRequest or TooLong before anything is queued."""
    w = wiring
    if w.scheduler is None or w.prompt_ids is None or w.compile_format is None:
        raise ModelUnavailable("no model is loaded on this node", retry_after_s=60)
    generation = request.generation
    if request.format is not None:
        generation = replace(generation, logits_hook=w.compile_format(request.format, generation.max_tokens))
    request = replace(request, generation=generation)
    if request.knowledge:
        return _grounded(w, request)
    return request, w.prompt_ids(generation)


def _grounded(w: Wiring, request: Request) -> tuple[Request, list[int]]:
    """The request with the best passages of its profile's knowledge base in the prompt, as many as fit
    the context beside the answer's max_tokens, and the sources they came from."""
    base = w.knowledge.get(request.knowledge)
    if base is None:
        raise ModelUnavailable(
            f"the knowledge base {request.knowledge!r} of profile {request.profile!r} is not built on this node: "
            f"run `edged kb build DIR -o {request.knowledge}`, then reload"
        )
    assert w.prompt_ids is not None
    asked = request.generation
    found = [f.passage for f in base.search(knowledge.question(asked.messages))]
    while True:
        generation = replace(asked, messages=knowledge.with_notes(asked.messages, found))
        try:
            ids = w.prompt_ids(generation)
            if not found or len(ids) + asked.max_tokens <= w.context_tokens:
                break
        except TooLong:
            if not found:
                raise
        found.pop()  # the weakest passage gives way to the answer
    sources = tuple(dict.fromkeys(Source(p.file, p.heading) for p in found))
    return replace(request, generation=generation, sources=sources), ids


def _stand_in(request_id: str, identity: Identity, route: Route) -> Request:
    """A request carrying only its id, identity and route, for answering one that cannot run."""
    return Request(request_id, identity, route, GenerationRequest(messages=()), False, "normal", 0.0, 0.0)
