"""Admission and the one generation worker: a bounded priority queue in front of the engine."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from edged.errors import Busy, EdgedError, Internal
from edged.llm import Engine, Generation
from edged.protocol import Request

log = logging.getLogger(__name__)


class Replies(Protocol):
    """Where the worker sends what it produces (the MQTT link, in the daemon)."""

    def chunk(self, request: Request, seq: int, delta: str) -> None: ...

    def result(self, request: Request, generation: Generation) -> None: ...

    def ended(self, request: Request, finish_reason: str) -> None:
        """A request that ended without compute: ``deadline`` or ``cancelled`` while queued."""

    def failed(self, request: Request, exc: EdgedError) -> None: ...


class RateLimiter:
    """Token bucket per client: ``per_min`` requests a minute on average, bursts of ``burst``."""

    def __init__(self, per_min: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate_s = per_min / 60
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, updated)

    def admit(self, client: str) -> float | None:
        """None when admitted, else seconds until a request from ``client`` would be."""
        if self._rate_s <= 0:
            return None
        now = self._clock()
        tokens, updated = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - updated) * self._rate_s)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            return None
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > 10_000:  # forget idle clients rather than grow without bound
            self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < 3600}
        return round((1 - tokens) / self._rate_s, 1)


@dataclass(order=True)
class _Job:
    rank: int
    seq: int
    request: Request
    prompt_ids: list[int]


class Scheduler:
    """Queued requests ordered alert > normal > background, FIFO within a level; one worker owns the engine."""

    def __init__(self, engine: Engine, capacity: int, replies: Replies) -> None:
        self._engine = engine
        self.capacity = capacity
        self._replies = replies
        self._heap: list[_Job] = []
        self._queued: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running: tuple[Request, Generation] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="edged-worker", daemon=True)
        self.heartbeat = time.monotonic()  # moves while the worker is alive and not stuck

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queued)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, prompt_ids: list[int], *, force: bool = False) -> None:
        """Queues ``request``; raises Busy at once when the queue is full (``force``: journal replay)."""
        with self._cond:
            if self._stopping:
                raise Busy("this node is shutting down; send the request again shortly", retry_after_s=5)
            if len(self._queued) >= self.capacity and not force:
                raise Busy(
                    f"the queue is full ({self.capacity} requests waiting); try again shortly",
                    retry_after_s=2,
                )
            job = _Job(request.priority_rank, next(self._seq), request, prompt_ids)
            heapq.heappush(self._heap, job)
            self._queued[request.id] = job
            self._cond.notify()

    def cancel(self, request_id: str) -> bool:
        """Cancels a queued or running request; the running one stops before its next token."""
        with self._cond:
            job = self._queued.pop(request_id, None)
            running = self._running
        if job is not None:
            self._replies.ended(job.request, "cancelled")
            return True
        if running is not None and running[0].id == request_id:
            running[1].cancel("cancelled")
            return True
        return False

    def stop_running(self, reason: str) -> None:
        with self._cond:
            running = self._running
        if running is not None:
            running[1].cancel(reason)

    def stop(self, timeout_s: float) -> None:
        """Stops taking work; the running answer may finish within ``timeout_s``, queued ones stay journaled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.stop_running("cancelled")
            self._thread.join(5)

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._stopping:
                while self._heap and self._heap[0].request.id not in self._queued:
                    heapq.heappop(self._heap)  # cancelled while queued
                if self._heap:
                    job = heapq.heappop(self._heap)
                    del self._queued[job.request.id]
                    return job
                self.heartbeat = time.monotonic()
                self._cond.wait(1.0)
            return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except EdgedError as exc:
                self._replies.failed(job.request, exc)
            except Exception as exc:  # the worker must survive anything one request does
                log.exception("request %s failed", job.request.id)
                self._replies.failed(job.request, Internal(f"generation failed: {type(exc).__name__}"))
            finally:
                with self._cond:
                    self._running = None
                self.heartbeat = time.monotonic()

    def _run(self, job: _Job) -> None:
        request = job.request
        now_wall, now = time.time(), time.monotonic()
        if now_wall >= request.deadline_at:  # expired while queued: no compute at all
            self._replies.ended(request, "deadline")
            return
        generation = self._engine.generate(
            replace(
                request.generation,
                arrived_s=now - (now_wall - request.received_at),
                deadline_s=now + (request.deadline_at - now_wall),
            ),
            job.prompt_ids,
        )
        with self._cond:
            self._running = (request, generation)
        for seq, delta in enumerate(generation):
            self.heartbeat = time.monotonic()
            if request.stream:
                self._replies.chunk(request, seq, delta)
        self._replies.result(request, generation)
