"""``edged serve``: the composition root. Builds every part from the config, wires them, runs, stops."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import edged
from edged import protocol
from edged.broker import LocalBroker
from edged.config import Config
from edged.energy import BOARDS, EnergyMeter, PowerModel, detect_board
from edged.errors import EdgedError, InvalidRequest, ModelUnavailable, Power, RateLimited, Thermal
from edged.governor import decide, limits
from edged.homeassistant import discovery
from edged.journal import Deliveries, Journal
from edged.llm import Engine, Generation, GenerationRequest, Message
from edged.metrics import MetricsServer
from edged.mqtt import Inbound, Link
from edged.protocol import Defaults, Envelope, Request, Route, parse, route_of
from edged.scheduler import RateLimiter, Scheduler
from edged.sensors import PowerSnapshot, Sensors
from edged.systemd import notify, setup_logging

log = logging.getLogger("edged")
_PRUNE_INTERVAL_S = 600


class Daemon:
    """The running node: MQTT link, journal, scheduler and engine, with one stop path."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._env = dict(os.environ if env is None else env)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.state = "starting"
        self.reason: str | None = None
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.broker: LocalBroker | None = None
        self._accepting = threading.Event()
        self._recorded: dict[str, threading.Event] = {}  # admitted requests whose journal write is under way
        self.defaults = _defaults(config)
        self.limiter = RateLimiter(config.rate_limit_per_min, config.rate_limit_burst)
        root = Path(config.sysfs_root)
        self.sensors = Sensors(root)
        board = BOARDS[config.board or detect_board(root)]
        self.meter = EnergyMeter(PowerModel(config.idle_w or board.idle_w, config.busy_w or board.busy_w))
        self.governor = "normal"
        self.limits = limits("normal", config.governor)
        self.snapshot: PowerSnapshot | None = None
        self.tokens_per_s = 0.0
        self.telemetry_payload: bytes | None = None
        self.fleet_topic = f"$share/{config.topic_prefix}/{config.topic_prefix}/fleet/ask"
        self.metrics: MetricsServer | None = None
        self.journal = Journal(config.resolved_state_dir() / "journal.sqlite")
        self.deliveries = Deliveries(self.journal)
        broker_config = config.broker
        if not broker_config.url:
            self.broker = LocalBroker(config.resolved_state_dir(), broker_config.local_port)
        self.link: Link | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())
        try:
            self._start()
            self._watch()
        finally:
            self._shutdown()
        return 0

    def _watch(self) -> None:
        """The main thread's loop: sensors and governor, telemetry, status, fleet membership, pruning."""
        config = self.config
        watchdog_s = self._watchdog_s()
        tick = min(1.0, config.sensor_interval_s, watchdog_s / 4 if watchdog_s else 1.0)
        now = time.monotonic()
        next_sense, next_telemetry, next_prune, next_watchdog = now, now, now + _PRUNE_INTERVAL_S, now
        published_depth = -1
        while not self.stop_event.wait(tick):
            now = time.monotonic()
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
                config = self.config
            if watchdog_s and now >= next_watchdog:
                # Only while the worker's heartbeat moves: a hung worker gets the service restarted.
                if self.scheduler is None or now - self.scheduler.heartbeat < watchdog_s:
                    notify("WATCHDOG=1")
                next_watchdog = now + watchdog_s / 2
            if now >= next_sense:
                self._sense()
                next_sense = now + config.sensor_interval_s
            if now >= next_telemetry:
                self.publish_telemetry()
                next_telemetry = now + config.telemetry_interval_s
            depth = self.scheduler.depth if self.scheduler else 0
            if depth != published_depth:  # queue depth in the retained status, at most once a tick
                self.publish_status()
                published_depth = depth
            self._fleet_membership(depth)
            if now >= next_prune:
                self.journal.prune(config.journal_keep, config.journal_keep_s)
                next_prune = now + _PRUNE_INTERVAL_S

    def _watchdog_s(self) -> float | None:
        """systemd's watchdog interval when it asks this process for keep-alives."""
        usec, pid = self._env.get("WATCHDOG_USEC"), self._env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6

    def _reload(self) -> None:
        """SIGHUP: read the configuration again; a changed model is loaded beside the old one, then swapped."""
        if self._reload_config is None:
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        old = self.config
        try:
            new = self._reload_config()
            fixed = ("node_id", "topic_prefix", "state_dir", "sysfs_root", "metrics_port", "broker")
            ignored = [key for key in fixed if getattr(new, key) != getattr(old, key)]
            if ignored:
                log.warning("reload: %s change only with a restart; keeping the running values", ", ".join(ignored))
                new = replace(new, **{key: getattr(old, key) for key in ignored})
            model_dir = new.resolved_models_dir() / new.model
            if self.engine is None or model_dir.resolve() != self.engine.model_dir.resolve():
                engine = self._new_engine(new)
                if self.scheduler is None:
                    self._attach(engine, new, start=True)
                else:
                    self.scheduler.swap_engine(engine, engine.session.threads)
                self.engine = engine
                log.info("reload: model %s loaded and swapped in", new.model)
            self.config = new
            self.defaults = _defaults(new)
            self.limiter = RateLimiter(new.rate_limit_per_min, new.rate_limit_burst)
            self.limits = limits(self.governor, new.governor)
            if self.scheduler is not None:
                self.scheduler.capacity = new.queue_capacity
            self._update_state()
        except (EdgedError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        self.publish_status()
        notify("READY=1", f"STATUS={self._status_line()}")

    def _sense(self) -> None:
        snap = self.sensors.read()
        self.meter.sample(snap, self.sensors)
        self.snapshot = snap
        state = decide(snap, self.config.governor, self.governor)
        if state == self.governor:
            return
        log.warning(
            "governor: %s -> %s (cpu %s C, under-voltage %s, battery %s)",
            self.governor,
            state,
            snap.cpu_temp_c,
            snap.under_voltage,
            snap.battery.percent if snap.battery else None,
        )
        self.governor, self.limits = state, limits(state, self.config.governor)
        if self.scheduler is not None:
            self.scheduler.apply(self.limits, "power" if state == "low_power" else "thermal")
        self._update_state()
        self.publish_status()
        self.publish_telemetry()

    def _update_state(self) -> None:
        if self.engine is None:
            return  # degraded with the model's reason
        if self.governor in ("hot", "critical", "low_power"):
            temp = self.snapshot.cpu_temp_c if self.snapshot else None
            detail = f" at {temp:.1f} C" if temp is not None and self.governor != "low_power" else ""
            self.state, self.reason = "degraded", f"governor {self.governor}{detail}"
        else:
            self.state, self.reason = "online", None

    def _fleet_membership(self, depth: int) -> None:
        """Leaves the fleet's shared subscription while hot, low on power or full; rejoins when healthy."""
        if self.link is None:
            return
        want = self.engine is not None and self.limits.in_fleet and depth < self.config.queue_capacity
        if want and self.fleet_topic not in self.link.subscriptions:
            log.info("rejoining the fleet")
            self.link.subscribe(self.fleet_topic)
        elif not want and self.fleet_topic in self.link.subscriptions:
            log.info("leaving the fleet (governor %s, queue %d)", self.governor, depth)
            self.link.unsubscribe(self.fleet_topic)

    def publish_telemetry(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        self.telemetry_payload = protocol.telemetry(
            snap,
            governor=self.governor,
            queue=self.scheduler.depth if self.scheduler else 0,
            tokens_per_s=self.tokens_per_s,
            energy_j_total=self.meter.read(),
            power_w=snap.power_w,
            power_source=self.meter.source,
        )
        if self.link is not None and self.link.connected.is_set():
            self.link.publish(self.config.topic("telemetry"), self.telemetry_payload, 0, retain=True)

    def _announce(self) -> None:
        """Home Assistant discovery (retained), at every connect and when Home Assistant comes online."""
        if not self.config.homeassistant or self.link is None:
            return
        for topic, payload in discovery(
            self.config.homeassistant_prefix, self.config.node_id, self.config.topic_prefix, self.config.model
        ):
            self.link.publish(topic, payload, 1, retain=True)

    def _connected(self) -> None:
        self.publish_status()
        self.publish_telemetry()
        self._announce()

    def _start(self) -> None:
        config = self.config
        broker_config = config.broker
        if self.broker is not None:
            self.broker.start()
            broker_config = replace(broker_config, url=self.broker.url)
        self._load_engine()
        self.link = Link(
            broker_config,
            client_id=broker_config.client_id or f"edged-{config.node_id}",
            will=(config.topic("status"), self._status_payload("offline", "connection lost")),
            on_message=self._on_message,
            on_connect=self._connected,
        )
        self.link.subscribe(config.topic("ask"))
        self.link.subscribe(config.topic("cancel"))
        if config.homeassistant:
            self.link.subscribe(f"{config.homeassistant_prefix}/status")
        self._sense()  # the governor's first state before any work is taken
        # Mosquitto shares $share/ subscriptions among MQTT 3.1.1 clients too.
        self._fleet_membership(0)
        if config.metrics_port:
            self.metrics = MetricsServer(
                config.metrics_port, lambda: self.telemetry_payload, lambda: dict(self.counters)
            )
            self.metrics.start()
        log.info("sensors: %s", {k: v for k, v in self.sensors.found().items() if v})
        self._replay()
        self._accepting.set()
        self.link.start()
        if self.scheduler is not None:
            self.scheduler.start()
        self.journal.prune(config.journal_keep, config.journal_keep_s)
        notify("READY=1", f"STATUS={self._status_line()}")

    def _load_engine(self) -> None:
        try:
            engine = self._new_engine(self.config)
        except ModelUnavailable as exc:
            log.error("model unavailable: %s", exc.message)
            self.state, self.reason = "degraded", exc.message
            return
        self._attach(engine, self.config)

    @staticmethod
    def _new_engine(config: Config) -> Engine:
        """Loads the configured model and runs one warm-up generation (READY=1 comes only after it)."""
        model_dir = config.resolved_models_dir() / config.model
        engine = Engine(model_dir, threads=config.threads or None, context_tokens=config.context_tokens)
        engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=1))
        return engine

    def _attach(self, engine: Engine, config: Config, *, start: bool = False) -> None:
        self.engine = engine
        self.scheduler = Scheduler(
            engine,
            config.queue_capacity,
            _Replies(self),
            threads=engine.session.threads,
            limits=lambda: self.limits,
            energy_j=self.meter.read,
            fault=self._env.get("EDGED_FAULT"),
        )
        if start:
            self.scheduler.start()
        self.state, self.reason = "online", None
        log.info("model %s loaded (%d threads)", engine.name, engine.session.threads)

    def _shutdown(self) -> None:
        self.state, self.reason = "stopping", None
        notify("STOPPING=1")
        self._accepting.clear()  # new messages stay unacknowledged: the broker redelivers them later
        if self.scheduler is not None:
            self.scheduler.stop(self.config.stop_grace_s)
        self.deliveries.drain(5)
        if self.link is not None:
            self.link.stop(last_words=(self.config.topic("status"), self._status_payload("offline", "stopped")))
        if self.broker is not None:
            self.broker.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.journal.close()

    # -- status ------------------------------------------------------------------------------------

    def _status_payload(self, state: str, reason: str | None) -> bytes:
        return protocol.status(
            state=state,
            reason=reason,
            model=self.config.model,
            queue=self.scheduler.depth if self.scheduler else 0,
            capacity=self.config.queue_capacity,
            governor=self.governor,
            since=self.started,
            version=edged.__version__,
        )

    def _status_line(self) -> str:
        temp = self.snapshot.cpu_temp_c if self.snapshot else None
        depth = self.scheduler.depth if self.scheduler else 0
        line = f"{self.state}; governor {self.governor}; queue {depth}/{self.config.queue_capacity}"
        return line + (f"; {temp:.1f} C" if temp is not None else "")

    def publish_status(self) -> None:
        notify(f"STATUS={self._status_line()}")
        if self.link is not None and self.link.connected.is_set():
            self.link.publish(
                self.config.topic("status"), self._status_payload(self.state, self.reason), 1, retain=True
            )

    # -- requests ----------------------------------------------------------------------------------

    def _on_message(self, msg: Inbound) -> None:
        if not self._accepting.is_set():
            return
        assert self.link is not None
        if msg.topic == self.config.topic("cancel"):
            self._on_cancel(msg.envelope)
        elif msg.topic == f"{self.config.homeassistant_prefix}/status":
            if msg.envelope.payload == b"online":
                self._announce()
        else:
            self._admit(msg.envelope)
        self.link.ack(msg.mid, msg.envelope.qos)

    def _on_cancel(self, env: Envelope) -> None:
        try:
            body: Any = json.loads(env.payload)
            request_id = body["id"] if isinstance(body, dict) else None
        except (ValueError, KeyError, UnicodeDecodeError):
            request_id = None
        if not isinstance(request_id, str) or self.scheduler is None or not self.scheduler.cancel(request_id):
            self.counters["cancel_unmatched"] += 1

    def _admit(self, env: Envelope) -> None:
        self.counters["received"] += 1
        request_id, route, _ = route_of(env, self.defaults)
        try:
            request = parse(env, self.defaults)
            client = request.client or request.route.topic
            retry = self.limiter.admit(client)
            if retry is not None:
                raise RateLimited(f"client {client!r} is sending too fast; wait {retry} s", retry_after_s=retry)
            if self.engine is None or self.scheduler is None:
                raise ModelUnavailable(f"no model is loaded on this node: {self.reason}", retry_after_s=60)
            if not self.limits.admit:
                retry = self.config.governor.retry_after_s
                if self.limits.error_code == "power":
                    raise Power(f"this node is low on power ({self.governor}); try again later", retry_after_s=retry)
                raise Thermal(
                    f"this node is too hot to take work ({self.reason}); try again later", retry_after_s=retry
                )
            prompt_ids = self.engine.prompt_ids(request.generation)
        except EdgedError as exc:
            self._reject(request_id, route, exc)
            return
        if self.journal.known(request.id, self.config.dedupe_window_s):
            self.counters["duplicates"] += 1
            log.info("duplicate delivery of %s ignored", request.id, extra={"request_id": request.id})
            return
        # The worker may start while the journal write (an fsync) is under way; the broker gets its
        # acknowledgement only after it, and the final reply waits for it (see _finish).
        recorded = self._recorded[request.id] = threading.Event()
        try:
            self.scheduler.submit(request, prompt_ids)
        except EdgedError as exc:  # busy: refused, not journaled, so a retry with the same id is welcome
            del self._recorded[request.id]
            self._reject(request.id, request.route, exc)
            return
        self.journal.record(request.id, env, self.config.dedupe_window_s)
        recorded.set()

    def _reject(self, request_id: str, route: Route, exc: EdgedError) -> None:
        self.counters[f"error.{exc.code}"] += 1
        if isinstance(exc, InvalidRequest):
            self.counters["invalid"] += 1
        log.info(
            "request %s refused: %s: %s",
            request_id,
            exc.code,
            exc.message,
            extra={"request_id": request_id, "code": exc.code},
        )
        assert self.link is not None
        self.link.publish(
            route.topic,
            protocol.error(request_id, exc, node=self.config.node_id),
            route.qos,
            correlation=route.correlation,
        )

    def _finish(self, request: Request, payload: bytes) -> None:
        """Sends the one final reply of a journaled request; done once the broker has it."""
        assert self.link is not None
        recorded = self._recorded.pop(request.id, None)
        if recorded is not None:
            recorded.wait(10)
        self.journal.replied(request.id, request.route.topic, payload)
        info = self.link.publish(request.route.topic, payload, request.route.qos, correlation=request.route.correlation)
        self.deliveries.track(info, request.id)
        self.counters["answered"] += 1

    def _replay(self) -> None:
        """Finishes what a previous run accepted: re-sends stored replies, re-runs or expires the rest."""
        for item in self.journal.unfinished():
            env = item.envelope
            if item.reply is not None and item.reply_topic is not None:
                assert self.link is not None
                info = self.link.publish(item.reply_topic, item.reply, env.qos, correlation=env.correlation)
                self.deliveries.track(info, item.id)
                continue
            try:
                request = parse(env, self.defaults)
                if self.engine is None or self.scheduler is None:
                    raise ModelUnavailable(f"no model is loaded on this node: {self.reason}")
                if time.time() >= request.deadline_at:
                    self._finish(request, self._ended_payload(request, "deadline"))
                    continue
                self.scheduler.submit(request, self.engine.prompt_ids(request.generation), force=True)
            except EdgedError as exc:
                _, route, _ = route_of(env, self.defaults)
                self._finish(_replayed(item.id, route), protocol.error(item.id, exc, node=self.config.node_id))
            log.info("replaying journaled request %s", item.id, extra={"request_id": item.id})

    def _ended_payload(self, request: Request, reason: str) -> bytes:
        queue_ms = (time.time() - request.received_at) * 1000
        return protocol.unfinished(
            request.id, reason, model=self.config.model, node=self.config.node_id, queue_ms=queue_ms
        )


def _defaults(config: Config) -> Defaults:
    return Defaults(
        answer_prefix=config.topic("answer"),
        system_prompt=config.system_prompt,
        max_tokens=config.max_tokens,
        max_tokens_cap=config.max_tokens_cap,
        deadline_ms=config.deadline_ms,
        max_payload_bytes=config.max_payload_bytes,
    )


def _replayed(request_id: str, route: Route) -> Request:
    """A stand-in request carrying only the id and route, for replying to an unparseable journal entry."""
    return Request(request_id, route, GenerationRequest(messages=()), False, "normal", "", 0.0, 0.0)


class _Replies:
    """The scheduler's output, sent over MQTT."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def chunk(self, request: Request, seq: int, delta: str) -> None:
        assert self._d.link is not None
        self._d.link.publish(
            request.route.topic,
            protocol.chunk(request.id, seq, delta),
            request.route.qos,
            correlation=request.route.correlation,
        )

    def result(self, request: Request, generation: Generation, energy_j: float | None, model: str) -> None:
        assert generation.result is not None
        d = self._d
        r = generation.result
        if r.timings.tokens_per_s:
            d.tokens_per_s = r.timings.tokens_per_s
        final = protocol.final(request.id, generation.result, model=model, node=d.config.node_id, energy_j=energy_j)
        d._finish(request, final)
        log.info(
            "answered %s: %s, %d tokens, %.0f ms, %s J",
            request.id,
            r.finish_reason,
            r.usage.completion_tokens,
            r.timings.total_ms,
            energy_j,
            extra={"request_id": request.id},
        )

    def ended(self, request: Request, finish_reason: str) -> None:
        self._d._finish(request, self._d._ended_payload(request, finish_reason))

    def failed(self, request: Request, exc: EdgedError) -> None:
        self._d.counters[f"error.{exc.code}"] += 1
        self._d._finish(request, protocol.error(request.id, exc, node=self._d.config.node_id))


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    setup_logging(dict(os.environ), node=config.node_id)
    return Daemon(config, reload_config).run()
