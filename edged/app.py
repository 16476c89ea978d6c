"""``edged serve``: the composition root. Builds every part from the config, wires them, starts them in
order, hands the main thread to the monitor, stops them in reverse order; reloads on SIGHUP."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edged.admission import NodeState
from edged.broker import LocalBroker
from edged.config import Config
from edged.energy import BOARDS, EnergyMeter, PowerModel, detect_board
from edged.errors import EdgedError, ModelUnavailable
from edged.inbox import Inbox, Wiring
from edged.journal import Journal
from edged.llm import Engine, GenerationRequest, LogitsHook, Message
from edged.metrics import Counts, MetricsServer
from edged.monitor import Monitor
from edged.mqtt import Link
from edged.outbox import Outbox
from edged.profiles import Catalog
from edged.protocol import Defaults
from edged.scheduler import RateLimiter, Scheduler, default_slots
from edged.sensors import Sensors
from edged.systemd import notify, setup_logging

if TYPE_CHECKING:  # imported where they are used: a node without HTTP, structured answers or knowledge
    # bases does not load aiohttp, llguidance and bm25s (about 30 MB resident between them)
    from edged.knowledge import KnowledgeBase
    from edged.web import FrontDoor

log = logging.getLogger("edged")
_INBOX_CAPACITY = 256
_FIRST_CONNECT_S = 5.0  # READY=1 waits this long for the broker, so "ready" means connected when it can
# Settings that only a restart changes; a reload keeps the running values.
_FIXED = (
    "node_id",
    "topic_prefix",
    "state_dir",
    "sysfs_root",
    "metrics_port",
    "broker",
    "http",
    "homeassistant_prefix",
)


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
        self._announced = threading.Event()  # the first connect has published the status: READY=1 may follow
        self.counters = Counts()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.metrics: MetricsServer | None = None
        root = Path(config.sysfs_root)
        board = BOARDS[config.board or detect_board(root)]
        self.meter = EnergyMeter(PowerModel(config.idle_w or board.idle_w, config.busy_w or board.busy_w))
        self.broker = None
        if not config.broker.url:
            b = config.broker
            self.broker = LocalBroker(config.resolved_state_dir(), b.local_port, ws_port=b.local_ws_port)
        self.journal = Journal(config.resolved_state_dir() / "journal.sqlite")
        broker_config = replace(config.broker, url=self.broker.url) if self.broker else config.broker
        client_id = broker_config.client_id or f"edged-{config.node_id}"
        self.outbox = Outbox(
            self.journal,
            lambda topic, payload, qos, corr: self.link.publish(topic, payload, qos, correlation=corr),
            node=config.node_id,
            model=config.model,
            counters=self.counters,
        )
        self.monitor = Monitor(config, Sensors(root), self.meter, self.journal, self.outbox, self._heartbeats)
        self.link = Link(
            broker_config,
            client_id=client_id,
            will=(config.topic("status"), self.monitor.status_payload("offline", "connection lost")),
            on_message=lambda inbound: self.inbox.put(inbound),
            on_connect=self._connected,
            on_published=self.outbox.published,
        )
        # The fleet's shared subscription on a connection of its own whose session ends with it: a node that
        # dies gives up its share at once instead of absorbing fleet work for its whole session expiry.
        self.fleet_link = Link(
            broker_config,
            client_id=f"{client_id}-fleet",
            will=None,
            on_message=lambda inbound: self.inbox.put(inbound),
            persistent=False,
        )
        self.monitor.link, self.monitor.fleet_link = self.link, self.fleet_link
        self.inbox = Inbox(_INBOX_CAPACITY, self._wiring(config), self.journal, self.outbox, self.counters)
        self.front_door: FrontDoor | None = None
        if config.http.enabled:
            from edged.web import FrontDoor, Served

            served = Served(wiring=lambda: self.inbox.wiring, engine=lambda: self.engine)
            self.front_door = FrontDoor(config.http, served, self.counters)

    def _wiring(self, config: Config) -> Wiring:
        return Wiring(
            defaults=_defaults(config),
            dedupe_window_s=config.dedupe_window_s,
            limiter=RateLimiter(config.rate_limit_per_min, config.rate_limit_burst),
            scheduler=self.scheduler,
            prompt_ids=self.engine.prompt_ids if self.engine else None,
            compile_format=_format_compiler(self.engine) if self.engine else None,
            knowledge=_knowledge_bases(config),
            context_tokens=self.engine.context_tokens if self.engine else config.context_tokens,
            node=self._node_state,
            on_ha_status=lambda payload: self.monitor.announce() if payload == b"online" else None,
        )

    def _node_state(self, priority_rank: int) -> NodeState:
        life = self.monitor.lifecycle
        return NodeState(
            model_ready=life.model_ready and self.scheduler is not None,
            reason=life.reason,
            governor=life.governor,
            limits=self.monitor.limits,
            governor_retry_s=self.config.governor.retry_after_s,
            queue_room=self.scheduler.room_for(priority_rank) if self.scheduler else False,
        )

    def _heartbeats(self) -> list[float]:
        return [self.inbox.heartbeat] + ([self.scheduler.heartbeat] if self.scheduler else [])

    def _connected(self) -> None:
        self.outbox.connected()
        self.monitor.connected()
        self._announced.set()

    # -- start, run, stop ------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())
        try:
            self._start()
            self.monitor.run(self.stop_event.wait, self._reload_if_asked, self._watchdog_s())
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
        log.info("sensors: %s", {k: v for k, v in self.monitor.sensors.found().items() if v})
        self.monitor.sense()  # the governor's first state before any work is taken
        self.monitor.fleet_membership(0)
        if config.metrics_port:
            self.metrics = MetricsServer(
                config.metrics_port, lambda: self.monitor.telemetry_payload, self.counters.snapshot
            )
            self.metrics.start()
        # The fleet link first: by the time the node's own link says online, the broker holds its fleet share.
        deadline = time.monotonic() + _FIRST_CONNECT_S
        self.fleet_link.start()
        self.fleet_link.settled.wait(_FIRST_CONNECT_S)
        self.link.start()
        if not self._announced.wait(max(0.0, deadline - time.monotonic())):  # online said before READY=1
            log.warning("no broker connection within %.0f s; serving once it comes", _FIRST_CONNECT_S)
        self.inbox.replay(self.journal.unfinished())  # before new messages: their replies are owed first
        self.inbox.start()
        if self.scheduler is not None:
            self.scheduler.start()
        if self.front_door is not None:
            self.front_door.start()
        self.journal.prune(config.journal_keep, config.journal_keep_s)
        notify("READY=1", f"STATUS={self.monitor.status_line()}")

    def _shutdown(self) -> None:
        self.monitor.lifecycle = self.monitor.lifecycle.stopping()
        notify("STOPPING=1")
        self.fleet_link.stop()  # leave the fleet first: no more of its work comes
        if self.front_door is not None:
            self.front_door.stop()  # its requests are not journaled: they are cancelled and answered
        self.inbox.stop()  # handles what it holds; later messages stay with the broker for the next run
        if self.scheduler is not None:
            self.scheduler.stop(self.config.stop_grace_s)  # queued requests stay journaled for the next run
        self.outbox.drain(5)
        self.link.stop(last_words=(self.config.topic("status"), self.monitor.status_payload("offline", "stopped")))
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

    # -- the model and reloads -----------------------------------------------------------------------

    def _load_engine(self, config: Config) -> None:
        try:
            engine = _new_engine(config)
        except ModelUnavailable as exc:
            log.error("model unavailable: %s", exc.message)
            self.monitor.lifecycle = self.monitor.lifecycle.failed(exc.message)
            return
        self._attach(engine, config)

    def _attach(self, engine: Engine, config: Config) -> Scheduler:
        self.engine = engine
        scheduler = self.scheduler = self.monitor.scheduler = Scheduler(
            engine,
            config.queue_capacity,
            self.outbox,
            threads=engine.session.threads,
            slots=config.slots or default_slots(len(os.sched_getaffinity(0))),
            limits=lambda: self.monitor.limits,
            energy_j=self.meter.read,
            fault=self._env.get("EDGED_FAULT"),
        )
        self.monitor.lifecycle = self.monitor.lifecycle.loaded()
        self.inbox.wiring = replace(
            self.inbox.wiring,
            scheduler=scheduler,
            prompt_ids=engine.prompt_ids,
            compile_format=_format_compiler(engine),
            context_tokens=engine.context_tokens,
        )
        log.info("model %s loaded (%d threads)", engine.name, engine.session.threads)
        return scheduler

    def _reload_if_asked(self) -> None:
        if self.reload_event.is_set():
            self.reload_event.clear()
            self._reload()

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
            self.monitor.reconfigure(new)
            if self.scheduler is not None:
                self.scheduler.capacity = new.queue_capacity
            self.inbox.wiring = self._wiring(new)
        except (EdgedError, ValueError, OSError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        self.monitor.publish_status()
        notify("READY=1", f"STATUS={self.monitor.status_line()}")


def _new_engine(config: Config) -> Engine:
    """Loads the configured model and runs one warm-up generation (READY=1 comes only after it)."""
    engine = Engine(
        config.resolved_models_dir() / config.model,
        threads=config.threads or None,
        context_tokens=config.context_tokens,
        prefix_cache_mb=config.prefix_cache_mb,
        prepared_dir=config.resolved_state_dir() / "prepared",
    )
    engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=1))
    return engine


def _knowledge_bases(config: Config) -> dict[str, KnowledgeBase]:
    """The knowledge bases the profiles name, read from disk (at start and on reload); one that cannot be read
    is logged, and its profile's requests are refused until it is built."""
    from edged.knowledge import KnowledgeBase

    bases = {}
    for name in sorted({p.knowledge for p in config.profiles.values() if p.knowledge}):
        try:
            bases[name] = KnowledgeBase.load(config.resolved_knowledge_dir() / name)
        except (OSError, ValueError) as exc:
            log.error("knowledge base %s: %s; run `edged kb build DIR -o %s`", name, exc, name)
    return bases


def _format_compiler(engine: Engine) -> Callable[[object, int], Callable[[], LogitsHook]]:
    """The contract's ``format`` (and the answer's token budget) compiled against this engine's tokenizer."""

    def compile_with(answer_format: object, max_tokens: int) -> Callable[[], LogitsHook]:
        from edged.structured import compile_format  # llguidance loads with the first structured answer

        return compile_format(answer_format, engine.tokenizer, max_tokens)

    return compile_with


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
        profiles=Catalog(config.profiles, config.profile),
        model=config.model,
    )


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    setup_logging(dict(os.environ), node=config.node_id)
    return App(config, reload_config).run()
