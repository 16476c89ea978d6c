"""Admission and the one generation worker: a bounded priority queue in front of a batch of running
sequences (continuous batching: a request joins between decode steps, leaves the moment it ends)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from edged.admission import displaced
from edged.errors import Busy, EdgedError, Internal
from edged.governor import Limits
from edged.llm import Engine
from edged.llm.engine import Batch, Sequence
from edged.protocol import PRIORITIES, Identity, Request
from edged.systemd import IDLE_BEAT_S

log = logging.getLogger(__name__)
ALERT = PRIORITIES.index("alert")  # a job's rank: lower runs first


class Replies(Protocol):
    """Where the worker sends what it produces (the MQTT link, in the daemon)."""

    def chunk(self, request: Request, seq: int, delta: str) -> None: ...

    def result(self, request: Request, generation: Sequence, energy_j: float | None, model: str) -> None: ...

    def ended(self, request: Request, finish_reason: str) -> None:
        """A request that ended without compute: ``deadline`` or ``cancelled`` while queued."""

    def failed(self, request: Request, exc: EdgedError) -> None: ...


class RateLimiter:
    """Token bucket per client: ``per_min`` requests a minute on average, bursts of ``burst``.

    At most ``max_clients`` buckets are kept: past that, full buckets (clients idle long enough to have
    refilled, the same as unknown ones) are forgotten first, then the longest idle. Thread-safe: the inbox and
    the HTTP front door admit through the same limiter.
    """

    def __init__(
        self, per_min: float, burst: int, clock: Callable[[], float] = time.monotonic, max_clients: int = 4096
    ) -> None:
        self._rate_s = per_min / 60
        self._burst = float(burst)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, updated), oldest update first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, client: str) -> float | None:
        """None when admitted, else seconds until a request from ``client`` would be."""
        if self._rate_s <= 0:
            return None
        with self._lock:
            now = self._clock()
            tokens, updated = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - updated) * self._rate_s)
            admitted = tokens >= 1
            self._buckets[client] = (tokens - 1 if admitted else tokens, now)
            if len(self._buckets) > self._max_clients:
                self._forget(now)
        return None if admitted else round((1 - tokens) / self._rate_s, 1)

    def _forget(self, now: float) -> None:
        refill_s = self._burst / self._rate_s
        self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < refill_s}
        while len(self._buckets) > self._max_clients:
            del self._buckets[next(iter(self._buckets))]


@dataclass(order=True)
class _Job:
    rank: int
    seq: int
    request: Request
    prompt_ids: list[int] | None  # None after a model swap: tokenized again by the new model
    replies: Replies  # where this request's answer goes (MQTT by default, an HTTP response)


def _key(job: _Job) -> tuple[str, str]:
    return job.request.identity.key, job.request.id


@dataclass
class _Running:
    job: _Job
    seq: Sequence
    engine: str  # the model's name, for the reply
    chunks: int = 0
    energy_j: float | None = None  # this sequence's share of the energy spent while it ran


def default_slots(cores: int) -> int:
    """Sequences decoded together by default: 4 on boards with 4 or more cores, 2 on smaller ones."""
    return 4 if cores >= 4 else 2


class Scheduler:
    """Queued requests ordered alert > normal > background, FIFO within a level; one worker owns the engine."""

    def __init__(
        self,
        engine: Engine,
        capacity: int,
        replies: Replies,
        *,
        threads: int,
        slots: int = 1,
        limits: Callable[[], Limits],
        energy_j: Callable[[], float] | None = None,
        fault: str | None = None,
    ) -> None:
        self._engine = engine
        self._threads = threads  # configured; the governor may lower it
        self._slots = slots  # configured (an optimum export runs one); the governor may lower it
        self._limits = limits
        self._energy_j = energy_j
        self._fault = fault  # fault injection for the reliability tests: "freeze-worker"
        self.capacity = capacity
        self._replies = replies
        self._heap: list[_Job] = []
        self._queued: dict[tuple[str, str], _Job] = {}  # (identity key, id) -> job
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running: dict[tuple[str, str], _Running] = {}  # (identity key, id) -> running sequence
        # Taken from the queue, not yet running (its prompt being tokenized): a cancel then is kept for _join.
        self._starting: dict[tuple[str, str], _Job] = {}
        self._cancelled_starting: set[tuple[str, str]] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="edged-worker", daemon=True)
        self.heartbeat = time.monotonic()  # moves while the worker is alive and not stuck

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queued)

    def start(self) -> None:
        self._thread.start()

    def room_for(self, priority_rank: int) -> bool:
        """Whether a request of this priority would be queued now (a full queue still takes an alert that
        can displace lower-priority work)."""
        with self._cond:
            if len(self._queued) < self.capacity:
                return True
            return displaced(priority_rank, [(j.rank, j.seq, k) for k, j in self._queued.items()]) is not None

    def submit(
        self, request: Request, prompt_ids: list[int], *, replies: Replies | None = None, force: bool = False
    ) -> None:
        """Queues ``request``; raises Busy at once when the queue is full (``force``: journal replay).

        Its chunks and final answer go to ``replies``, by default the scheduler's own (MQTT).

        When full, an alert displaces the newest background request, else the newest normal one
        (CONTRACT.md v1.1); the displaced request is answered ``busy``.
        """
        victim: _Job | None = None
        with self._cond:
            if self._stopping:
                raise Busy("this node is shutting down; send the request again shortly", retry_after_s=5)
            if len(self._queued) >= self.capacity and not force:
                key = displaced(request.priority_rank, [(j.rank, j.seq, k) for k, j in self._queued.items()])
                if key is None:
                    raise Busy(
                        f"the queue is full ({self.capacity} requests waiting); try again shortly",
                        retry_after_s=2,
                    )
                victim = self._queued.pop(key)
            job = _Job(request.priority_rank, next(self._seq), request, prompt_ids, replies or self._replies)
            heapq.heappush(self._heap, job)
            self._queued[(request.identity.key, request.id)] = job
            self._cond.notify()
        if victim is not None:
            busy = Busy("an alert took this request's place in the full queue; send it again shortly", retry_after_s=2)
            victim.replies.failed(victim.request, busy)

    def cancel(self, identity: Identity | None, request_id: str) -> bool:
        """Cancels a queued or running request of ``identity`` (None: any v1 asker's); the running one stops
        before its next token."""

        def mine(request: Request) -> bool:
            if request.id != request_id:
                return False
            return request.identity == identity if identity is not None else not request.identity.scoped

        with self._cond:
            key = next((k for k, j in self._queued.items() if mine(j.request)), None)
            job = self._queued.pop(key) if key is not None else None
            running = next((r for r in self._running.values() if mine(r.job.request)), None)
            starting = next((k for k, j in self._starting.items() if mine(j.request)), None)
            if starting is not None:  # taken from the queue, not yet running: _start ends it before compute
                self._cancelled_starting.add(starting)
                return True
        if job is not None:
            job.replies.ended(job.request, "cancelled")
            return True
        if running is not None:
            running.seq.cancel("cancelled")
            return True
        return False

    def swap_engine(self, engine: Engine, threads: int) -> None:
        """Takes effect once the running answers have ended; queued requests stay queued and are tokenized
        again by the new engine."""
        with self._cond:
            self._engine, self._threads = engine, threads
            for job in self._queued.values():
                job.prompt_ids = None

    def apply(self, limits: Limits, reason: str) -> None:
        """A governor change: stop the running answers if it says so, wake the worker (pauses, slots and
        threads are read at every step)."""
        with self._cond:
            running = list(self._running.values())
            self._cond.notify_all()
        if limits.stop_running:
            for r in running:
                r.seq.cancel(reason)

    def stop(self, timeout_s: float) -> None:
        """Stops taking work; the running answer may finish within ``timeout_s``, queued ones stay journaled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            running = list(self._running.values())
        for r in running:
            r.seq.cancel("cancelled")
        if running:
            self._thread.join(5)

    def _take(self, wait: bool, alerts_only: bool = False) -> _Job | None:
        """The next queued job the governor lets run (waiting for one if ``wait``; only an alert if
        ``alerts_only``), answering those that expired while held back; None when there is none or the
        scheduler stops."""
        while True:
            expired: list[_Job] = []
            with self._cond:
                if self._stopping:
                    return None
                while self._heap and self._queued.get(_key(self._heap[0])) is not self._heap[0]:
                    heapq.heappop(self._heap)  # cancelled, displaced or expired while queued
                if self._heap and self._limits().run_queued and not (alerts_only and self._heap[0].rank > ALERT):
                    job = heapq.heappop(self._heap)
                    del self._queued[_key(job)]
                    self._starting[_key(job)] = job
                    return job
                if self._heap:  # held back by the governor: queued work waits, or expires by its deadline
                    now = time.time()
                    expired = [j for j in self._queued.values() if j.request.deadline_at <= now]
                    for j in expired:
                        del self._queued[_key(j)]
                self.heartbeat = time.monotonic()
                if not expired and not wait:
                    return None
                if not expired:
                    self._cond.wait(0.5 if self._heap else IDLE_BEAT_S)
            for j in expired:
                j.replies.ended(j.request, "deadline")

    def _work(self) -> None:
        batch: Batch | None = None
        while True:
            with self._cond:
                engine, stopping = self._engine, self._stopping
            limits = self._limits()
            running = batch.running if batch is not None else []
            if stopping and not running:
                return
            if batch is None or (batch.engine is not engine and not running):
                # First, or a swapped model. One slot beyond ``slots`` is kept for alerts: an alert never waits
                # for an answer under way (its keys and values are resident only while it runs).
                batch = Batch(engine, self._slots + 1 if engine.session.batches else 1)
                continue
            # The governor's thread count: a session reload between two steps (the keys and values are ours).
            batch.engine.set_threads(max(1, self._threads + limits.threads_delta))
            limit = min(limits.slots_cap or self._slots, self._slots)
            if batch.engine is engine and not stopping and batch.free > 0 and len(running) <= limit:
                # With every ordinary slot busy, only an alert may join, into the slot kept for it.
                job = self._take(wait=not running, alerts_only=len(running) >= limit)
                if job is not None:
                    self._join(batch, job, self._limits())  # now: the wait for a job may have been long
                    continue
                if not running:
                    continue
            if not running:  # a swap pending, or the governor holding slots back
                with self._cond:
                    self._cond.wait(0.5)
                continue
            if limits.pause_ms > 0:
                time.sleep(limits.pause_ms / 1000)  # duty cycling: a pause before each decode step
            self._step(batch)

    def _join(self, batch: Batch, job: _Job, limits: Limits) -> None:
        """Starts ``job`` in a free slot of ``batch``: its prefill and its first token."""
        try:
            self._start(batch, job, limits)
        finally:
            with self._cond:
                self._starting.pop(_key(job), None)
                self._cancelled_starting.discard(_key(job))

    def _start(self, batch: Batch, job: _Job, limits: Limits) -> None:
        request = job.request
        now_wall, now = time.time(), time.monotonic()
        if now_wall >= request.deadline_at:  # expired while queued: no compute at all
            job.replies.ended(request, "deadline")
            return
        if self._fault == "freeze-worker":
            threading.Event().wait()  # a hung worker, as the watchdog must notice
        engine = batch.engine
        try:
            prompt_ids = job.prompt_ids if job.prompt_ids is not None else engine.prompt_ids(request.generation)
        except EdgedError as exc:
            job.replies.failed(request, exc)
            return
        max_tokens = request.generation.max_tokens
        if limits.max_tokens_cap is not None:
            max_tokens = min(max_tokens, limits.max_tokens_cap)
        generation = replace(
            request.generation,
            max_tokens=max_tokens,
            arrived_s=now - (now_wall - request.received_at),
            deadline_s=now + (request.deadline_at - now_wall),
        )
        seq = engine.sequence(generation, prompt_ids)
        run = _Running(job, seq, engine.name)
        with self._cond:  # from starting to running in one step, so a cancel finds it in one or the other
            del self._starting[_key(job)]
            cancelled = _key(job) in self._cancelled_starting
            if not cancelled:
                self._running[_key(job)] = run
        if cancelled:  # while its prompt was being tokenized: no compute
            job.replies.ended(request, "cancelled")
            return
        energy = self._energy_j() if self._energy_j else None
        try:
            text = batch.add(seq)
        except Exception as exc:
            self._fail(run, exc)
            return
        self._share_energy([run], energy)
        self._emit(run, text)

    def _step(self, batch: Batch) -> None:
        with self._cond:
            runs = {id(r.seq): r for r in self._running.values()}
        energy = self._energy_j() if self._energy_j else None
        try:
            out = batch.step()
        except Exception as exc:  # the worker must survive anything a step does: its answers fail, not the node
            for seq, _ in batch.end_all("internal"):
                self._fail(runs[id(seq)], exc)
            return
        self._share_energy([runs[id(seq)] for seq, _ in out], energy)
        for seq, text in out:
            self._emit(runs[id(seq)], text)
        self.heartbeat = time.monotonic()

    def _share_energy(self, runs: list[_Running], before: float | None) -> None:
        """Splits the energy spent since ``before`` evenly over the sequences that shared the run."""
        if self._energy_j is None or before is None or not runs:
            return
        share = (self._energy_j() - before) / len(runs)
        for r in runs:
            r.energy_j = (r.energy_j or 0.0) + share

    def _emit(self, run: _Running, text: str) -> None:
        request, seq = run.job.request, run.seq
        if text and request.stream:
            run.job.replies.chunk(request, run.chunks, text)
            run.chunks += 1
        if seq.finished:
            with self._cond:
                self._running.pop(_key(run.job), None)
            energy = round(run.energy_j, 3) if run.energy_j is not None else None
            run.job.replies.result(request, seq, energy, run.engine)

    def _fail(self, run: _Running, exc: Exception) -> None:
        with self._cond:
            self._running.pop(_key(run.job), None)
        if isinstance(exc, EdgedError):
            run.job.replies.failed(run.job.request, exc)
        else:
            log.error("request %s failed", run.job.request.id, exc_info=exc)
            run.job.replies.failed(run.job.request, Internal(f"generation failed: {type(exc).__name__}"))
