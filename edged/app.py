"""``edged serve``: the composition root. Builds every part from the config, starts them in order, runs the
housekeeping loop on the main thread, stops them in reverse order. Decisions live in the parts."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import edged
from edged import protocol
from edged.admission import NodeState, in_fleet
from edged.broker import LocalBroker
from edged.config import Config
from edged.energy import BOARDS, EnergyMeter, PowerModel, detect_board
from edged.errors import EdgedError, ModelUnavailable
from edged.governor import decide, limits
from edged.homeassistant import discovery
from edged.inbox import Inbox, Wiring
from edged.journal import Journal
from edged.lifecycle import Lifecycle
from edged.llm import Engine, GenerationRequest, Message
from edged.metrics import Counts, MetricsServer
from edged.mqtt import Link, NotSent
from edged.outbox import Outbox
from edged.protocol import Defaults
from edged.scheduler import RateLimiter, Scheduler
from edged.sensors import PowerSnapshot, Sensors
from edged.systemd import notify, setup_logging

log = logging.getLogger("edged")
_PRUNE_INTERVAL_S = 600
_INBOX_CAPACITY = 256
_FIRST_CONNECT_S = 5.0  # READY=1 waits this long for the broker, so "ready" means connected when it can
# Settings that only a restart changes; a reload keeps the running values.
_FIXED = ("node_id", "topic_prefix", "state_dir", "sysfs_root", "metrics_port", "broker", "homeassistant_prefix")


class App:
    """The running node: one stop event, one start order, one stop order."""

    def __init__(
        self, config: Config, reload_config: Callable[[], Config] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._env = dict(os.environ if env is None else env)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.started = time.time()
        self.counters = Counts()
        self.lifecycle = Lifecycle()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        root = Path(config.sysfs_root)
        self.sensors = Sensors(root)
        board = BOARDS[config.board or detect_board(root)]
        self.meter = EnergyMeter(PowerModel(config.idle_w or board.idle_w, config.busy_w or board.busy_w))
        self.limits = limits("normal", config.governor)
        self.snapshot: PowerSnapshot | None = None
        self.telemetry_payload: bytes | None = None
        self.fleet_topics = [
            f"$share/{config.topic_prefix}/{config.topic_prefix}/fleet/ask",
            f"$share/{config.topic_prefix}/{config.topic_prefix}/fleet/ask/+",
        ]
        self.metrics: MetricsServer | None = None
        self.broker = None if config.broker.url else LocalBroker(config.resolved_state_dir(), config.broker.local_port)
        self.journal = Journal(config.resolved_state_dir() / "journal.sqlite")
        broker_config = replace(config.broker, url=self.broker.url) if self.broker else config.broker
        self.link = Link(
            broker_config,
            client_id=broker_config.client_id or f"edged-{config.node_id}",
            will=(config.topic("status"), self._status_payload("offline", "connection lost")),
            on_message=lambda inbound: self.inbox.put(inbound),
            on_connect=self._connected,
            on_published=lambda mid, failure: self.outbox.published(mid, failure),
        )
        # The fleet's shared subscription on a connection of its own whose session ends with it: a node that
        # dies gives up its share at once instead of absorbing fleet work for its whole session expiry.
        self.fleet_link = Link(
            broker_config,
            client_id=f"{broker_config.client_id or f'edged-{config.node_id}'}-fleet",
            will=None,
            on_message=lambda inbound: self.inbox.put(inbound),
            persistent=False,
        )
        self.outbox = Outbox(
            self.journal,
            lambda topic, payload, qos, corr: self.link.publish(topic, payload, qos, correlation=corr),
            node=config.node_id,
            model=config.model,
            counters=self.counters,
        )
        self.inbox = Inbox(_INBOX_CAPACITY, self._wiring(config), self.journal, self.outbox, self.counters)

    # -- wiring --------------------------------------------------------------------------------------

    def _wiring(self, config: Config) -> Wiring:
        return Wiring(
            defaults=_defaults(config),
            dedupe_window_s=config.dedupe_window_s,
            limiter=RateLimiter(config.rate_limit_per_min, config.rate_limit_burst),
            scheduler=self.scheduler,
            prompt_ids=self.engine.prompt_ids if self.engine else None,
            node=self._node_state,
            on_ha_status=lambda payload: self._announce() if payload == b"online" else None,
        )

    def _node_state(self, priority_rank: int) -> NodeState:
        return NodeState(
            model_ready=self.lifecycle.model_ready and self.scheduler is not None,
            reason=self.lifecycle.reason,
            governor=self.lifecycle.governor,
            limits=self.limits,
            governor_retry_s=self.config.governor.retry_after_s,
            queue_room=self.scheduler.room_for(priority_rank) if self.scheduler else False,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

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

    def _start(self) -> None:
        config = self.config
        if self.broker is not None:
            self.broker.start()
        self._load_engine(config)
        self.outbox.start()
        for leaf in ("ask", "ask/+", "cancel", "cancel/+"):
            self.link.subscribe(config.topic(leaf))
        if config.homeassistant:
            self.link.subscribe(f"{config.homeassistant_prefix}/status")
        self._sense()  # the governor's first state before any work is taken
        self._fleet_membership(0)  # Mosquitto shares $share/ subscriptions among MQTT 3.1.1 clients too
        if config.metrics_port:
            self.metrics = MetricsServer(config.metrics_port, lambda: self.telemetry_payload, self.counters.snapshot)
            self.metrics.start()
        log.info("sensors: %s", {k: v for k, v in self.sensors.found().items() if v})
        self.link.start()
        self.fleet_link.start()
        if not self.link.connected.wait(_FIRST_CONNECT_S):
            log.warning("no broker connection within %.0f s; serving once it comes", _FIRST_CONNECT_S)
        self.inbox.replay(self.journal.unfinished())  # before new messages: their replies are owed first
        self.inbox.start()
        if self.scheduler is not None:
            self.scheduler.start()
        self.journal.prune(config.journal_keep, config.journal_keep_s)
        notify("READY=1", f"STATUS={self._status_line()}")

    def _watch(self) -> None:
        """The main thread's loop: watchdog, reload, sensors and governor, telemetry, status, fleet, pruning."""
        watchdog_s = self._watchdog_s()
        tick = min(1.0, self.config.sensor_interval_s, watchdog_s / 4 if watchdog_s else 1.0)
        now = time.monotonic()
        next_sense, next_telemetry, next_prune, next_watchdog = now, now, now + _PRUNE_INTERVAL_S, now
        published_depth = -1
        while not self.stop_event.wait(tick):
            now = time.monotonic()
            config = self.config
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
            if watchdog_s and now >= next_watchdog:
                # Only while the worker's and the inbox's heartbeats move: a hung node gets restarted.
                beats = [self.inbox.heartbeat] + ([self.scheduler.heartbeat] if self.scheduler else [])
                if all(now - beat < watchdog_s for beat in beats):
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

    def _shutdown(self) -> None:
        self.lifecycle = self.lifecycle.stopping()
        notify("STOPPING=1")
        self.fleet_link.stop()  # leave the fleet first: no more of its work comes
        self.inbox.stop()  # handles what it holds; later messages stay with the broker for the next run
        if self.scheduler is not None:
            self.scheduler.stop(self.config.stop_grace_s)  # queued requests stay journaled for the next run
        self.outbox.drain(5)
        self.link.stop(last_words=(self.config.topic("status"), self._status_payload("offline", "stopped")))
        if self.broker is not None:
            self.broker.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.journal.close()

    def _watchdog_s(self) -> float | None:
        """systemd's watchdog interval when it asks this process for keep-alives."""
        usec, pid = self._env.get("WATCHDOG_USEC"), self._env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6

    # -- the model -----------------------------------------------------------------------------------

    def _load_engine(self, config: Config) -> None:
        try:
            engine = _new_engine(config)
        except ModelUnavailable as exc:
            log.error("model unavailable: %s", exc.message)
            self.lifecycle = self.lifecycle.failed(exc.message)
            return
        self._attach(engine, config)

    def _attach(self, engine: Engine, config: Config) -> Scheduler:
        self.engine = engine
        scheduler = self.scheduler = Scheduler(
            engine,
            config.queue_capacity,
            self.outbox,
            threads=engine.session.threads,
            limits=lambda: self.limits,
            energy_j=self.meter.read,
            fault=self._env.get("EDGED_FAULT"),
        )
        self.lifecycle = self.lifecycle.loaded()
        self.inbox.wiring = replace(self.inbox.wiring, scheduler=self.scheduler, prompt_ids=engine.prompt_ids)
        log.info("model %s loaded (%d threads)", engine.name, engine.session.threads)
        return scheduler

    def _reload(self) -> None:
        """SIGHUP: read the configuration again; a changed model is loaded beside the old one, then swapped."""
        if self._reload_config is None:
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        old = self.config
        try:
            new = self._reload_config()
            ignored = [key for key in _FIXED if getattr(new, key) != getattr(old, key)]
            if ignored:
                log.warning("reload: %s change only with a restart; keeping the running values", ", ".join(ignored))
                new = replace(new, **{key: getattr(old, key) for key in ignored})
            model_dir = new.resolved_models_dir() / new.model
            if self.engine is None or model_dir.resolve() != self.engine.model_dir.resolve():
                engine = _new_engine(new)
                if self.scheduler is None:
                    self._attach(engine, new).start()
                else:
                    self.scheduler.swap_engine(engine, engine.session.threads)
                    self.engine = engine
                log.info("reload: model %s loaded and swapped in", new.model)
            self.config = new
            self.outbox.model = new.model
            self.limits = limits(self.lifecycle.governor, new.governor)
            if self.scheduler is not None:
                self.scheduler.capacity = new.queue_capacity
            self.inbox.wiring = self._wiring(new)
        except (EdgedError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        self.publish_status()
        notify("READY=1", f"STATUS={self._status_line()}")

    # -- power and thermal ---------------------------------------------------------------------------

    def _sense(self) -> None:
        snap = self.sensors.read()
        self.meter.sample(snap, self.sensors)
        self.snapshot = snap
        previous = self.lifecycle.governor
        state = decide(snap, self.config.governor, previous)
        self.lifecycle = self.lifecycle.sensed(state, snap.cpu_temp_c)
        if state == previous:
            return
        log.warning(
            "governor: %s -> %s (cpu %s C, under-voltage %s, battery %s)",
            previous,
            state,
            snap.cpu_temp_c,
            snap.under_voltage,
            snap.battery.percent if snap.battery else None,
        )
        self.limits = limits(state, self.config.governor)
        if self.scheduler is not None:
            self.scheduler.apply(self.limits, "power" if state == "low_power" else "thermal")
        self.publish_status()
        self.publish_telemetry()

    def _fleet_membership(self, depth: int) -> None:
        """Leaves the fleet's shared subscriptions while hot, low on power or full; rejoins when healthy."""
        want = in_fleet(self.lifecycle.model_ready, self.limits, depth, self.config.queue_capacity)
        joined = self.fleet_topics[0] in self.fleet_link.subscriptions
        if want and not joined:
            log.info("joining the fleet")
            for topic in self.fleet_topics:
                self.fleet_link.subscribe(topic)
        elif not want and joined:
            log.info("leaving the fleet (governor %s, queue %d)", self.lifecycle.governor, depth)
            for topic in self.fleet_topics:
                self.fleet_link.unsubscribe(topic)

    # -- what the node publishes about itself --------------------------------------------------------

    def publish_telemetry(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        self.telemetry_payload = protocol.telemetry(
            snap,
            governor=self.lifecycle.governor,
            queue=self.scheduler.depth if self.scheduler else 0,
            tokens_per_s=self.outbox.tokens_per_s,
            energy_j_total=self.meter.read(),
            power_w=snap.power_w,
            power_source=self.meter.source,
        )
        if self.link.connected.is_set():
            self._publish_own(self.config.topic("telemetry"), self.telemetry_payload, 0)

    def publish_status(self) -> None:
        notify(f"STATUS={self._status_line()}")
        if self.link.connected.is_set():
            payload = self._status_payload(self.lifecycle.state, self.lifecycle.reason)
            self._publish_own(self.config.topic("status"), payload, 1)

    def _announce(self) -> None:
        """Home Assistant discovery (retained), at every connect and when Home Assistant comes online."""
        if not self.config.homeassistant:
            return
        c = self.config
        for topic, payload in discovery(c.homeassistant_prefix, c.node_id, c.topic_prefix, c.model):
            self._publish_own(topic, payload, 1)

    def _publish_own(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            self.link.publish(topic, payload, qos, retain=True)
        except NotSent as exc:  # offline: the next connect publishes it again
            log.debug("could not publish %s: %s", topic, exc)

    def _connected(self) -> None:
        self.outbox.connected()
        self.publish_status()
        self.publish_telemetry()
        self._announce()

    def _status_payload(self, state: str, reason: str | None) -> bytes:
        return protocol.status(
            state=state,
            reason=reason,
            model=self.config.model,
            queue=self.scheduler.depth if self.scheduler else 0,
            capacity=self.config.queue_capacity,
            governor=self.lifecycle.governor,
            since=self.started,
            version=edged.__version__,
        )

    def _status_line(self) -> str:
        temp = self.snapshot.cpu_temp_c if self.snapshot else None
        depth = self.scheduler.depth if self.scheduler else 0
        line = f"{self.lifecycle.state}; governor {self.lifecycle.governor}; queue {depth}/{self.config.queue_capacity}"
        return line + (f"; {temp:.1f} C" if temp is not None else "")


def _new_engine(config: Config) -> Engine:
    """Loads the configured model and runs one warm-up generation (READY=1 comes only after it)."""
    engine = Engine(
        config.resolved_models_dir() / config.model,
        threads=config.threads or None,
        context_tokens=config.context_tokens,
    )
    engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=1))
    return engine


def _defaults(config: Config) -> Defaults:
    return Defaults(
        prefix=config.topic_prefix,
        node=config.node_id,
        system_prompt=config.system_prompt,
        max_tokens=config.max_tokens,
        max_tokens_cap=config.max_tokens_cap,
        deadline_ms=config.deadline_ms,
        max_payload_bytes=config.max_payload_bytes,
        reply_topics=config.reply_topics,
        v1_reply_topics=config.v1_reply_topics,
        homeassistant_prefix=config.homeassistant_prefix,
    )


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    setup_logging(dict(os.environ), node=config.node_id)
    return App(config, reload_config).run()
