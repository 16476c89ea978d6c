"""The node's watch over itself, on the main thread: sensors and the governor, the lifecycle and the retained
status, telemetry, Home Assistant discovery, fleet membership, the systemd watchdog, journal pruning."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import edged
from edged import protocol
from edged.admission import in_fleet
from edged.config import Config
from edged.energy import EnergyMeter
from edged.governor import decide, limits
from edged.homeassistant import discovery
from edged.journal import Journal
from edged.lifecycle import Lifecycle
from edged.mqtt import Link, NotSent
from edged.outbox import Outbox
from edged.scheduler import Scheduler
from edged.sensors import PowerSnapshot, Sensors
from edged.systemd import IDLE_BEAT_S, notify

log = logging.getLogger("edged")
_PRUNE_INTERVAL_S = 600
_FLEET_SETTLE_S = 2.0  # how long a change of fleet membership waits for the broker's answer


class Monitor:
    """Owns the lifecycle, the governor's limits and everything the node publishes about itself."""

    def __init__(
        self,
        config: Config,
        sensors: Sensors,
        meter: EnergyMeter,
        journal: Journal,
        outbox: Outbox,
        heartbeats: Callable[[], list[float]],
    ) -> None:
        self.config = config
        self.sensors = sensors
        self._meter = meter
        self._journal = journal
        self._outbox = outbox
        self._heartbeats = heartbeats  # the inbox's and the worker's: the watchdog is fed while they move
        self.started = time.time()
        self.lifecycle = Lifecycle()
        self.limits = limits("normal", config.governor)
        self.snapshot: PowerSnapshot | None = None
        self.telemetry_payload: bytes | None = None
        self.scheduler: Scheduler | None = None
        self.link: Link | None = None
        self.fleet_link: Link | None = None
        prefix = config.topic_prefix
        self._fleet_topics = [f"$share/{prefix}/{prefix}/fleet/ask", f"$share/{prefix}/{prefix}/fleet/ask/+"]

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.limits = limits(self.lifecycle.governor, config.governor)

    # -- the main thread's loop ----------------------------------------------------------------------

    def run(self, stop: Callable[[float], bool], reload: Callable[[], None], watchdog_s: float | None) -> None:
        """Until ``stop(timeout)`` says so; ``reload`` is called when it returns with a SIGHUP pending."""
        tick = min(1.0, self.config.sensor_interval_s, watchdog_s / 4 if watchdog_s else 1.0)
        now = time.monotonic()
        next_sense, next_telemetry, next_prune, next_watchdog = now, now, now + _PRUNE_INTERVAL_S, now
        published_depth = -1
        while not stop(tick):
            reload()
            now = time.monotonic()
            config = self.config
            if watchdog_s and now >= next_watchdog:
                if all(now - beat < watchdog_s + IDLE_BEAT_S for beat in self._heartbeats()):
                    notify("WATCHDOG=1")  # a hung inbox or worker gets the service restarted
                next_watchdog = now + watchdog_s / 2
            if now >= next_sense:
                self.sense()
                next_sense = now + config.sensor_interval_s
            if now >= next_telemetry:
                self.publish_telemetry()
                next_telemetry = now + config.telemetry_interval_s
            depth = self.scheduler.depth if self.scheduler else 0
            self.fleet_membership(depth)
            if depth != published_depth:  # queue depth in the retained status, at most once a tick
                self.publish_status()
                published_depth = depth
            if now >= next_prune:
                self._journal.prune(config.journal_keep, config.journal_keep_s)
                next_prune = now + _PRUNE_INTERVAL_S

    # -- power and thermal ---------------------------------------------------------------------------

    def sense(self) -> None:
        snap = self.sensors.read()
        self._meter.sample(snap, self.sensors)
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
        self.fleet_membership(self.scheduler.depth if self.scheduler else 0)  # before the status says why
        self.publish_status()
        self.publish_telemetry()

    def fleet_membership(self, depth: int) -> None:
        """Leaves the fleet's shared subscriptions while hot, low on power or full; rejoins when healthy."""
        if self.fleet_link is None:
            return
        want = in_fleet(self.lifecycle.model_ready, self.limits, depth, self.config.queue_capacity)
        joined = self._fleet_topics[0] in self.fleet_link.subscriptions
        if want == joined:
            return
        if want:
            log.info("joining the fleet")
            for topic in self._fleet_topics:
                self.fleet_link.subscribe(topic)
        else:
            log.info("leaving the fleet (governor %s, queue %d)", self.lifecycle.governor, depth)
            for topic in self._fleet_topics:
                self.fleet_link.unsubscribe(topic)
        if self.fleet_link.connected.is_set():  # the broker has it before the status that follows says so
            self.fleet_link.settled.wait(_FLEET_SETTLE_S)

    # -- what the node publishes about itself --------------------------------------------------------

    def connected(self) -> None:
        """At every (re)connect: the retained status, telemetry and discovery again."""
        self.publish_status()
        self.publish_telemetry()
        self.announce()

    def publish_telemetry(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        self.telemetry_payload = protocol.telemetry(
            snap,
            governor=self.lifecycle.governor,
            queue=self.scheduler.depth if self.scheduler else 0,
            tokens_per_s=self._outbox.tokens_per_s,
            energy_j_total=self._meter.read(),
            power_w=snap.power_w,
            power_source=self._meter.source,
        )
        self._publish_own(self.config.topic("telemetry"), self.telemetry_payload, 0)

    def publish_status(self) -> None:
        notify(f"STATUS={self.status_line()}")
        self._publish_own(self.config.topic("status"), self.status_payload(), 1)

    def announce(self) -> None:
        """Home Assistant discovery (retained), at every connect and when Home Assistant comes online."""
        c = self.config
        if not c.homeassistant:
            return
        for topic, payload in discovery(c.homeassistant_prefix, c.node_id, c.topic_prefix, c.model):
            self._publish_own(topic, payload, 1)

    def _publish_own(self, topic: str, payload: bytes, qos: int) -> None:
        if self.link is None or not self.link.connected.is_set():
            return  # the next connect publishes it
        try:
            self.link.publish(topic, payload, qos, retain=True)
        except NotSent as exc:
            log.debug("could not publish %s: %s", topic, exc)

    def status_payload(self, state: str | None = None, reason: str | None = None) -> bytes:
        """The retained status; ``state``/``reason`` for the last will and the last words."""
        return protocol.status(
            state=state or self.lifecycle.state,
            reason=reason if state else self.lifecycle.reason,
            model=self.config.model,
            queue=self.scheduler.depth if self.scheduler else 0,
            capacity=self.config.queue_capacity,
            governor=self.lifecycle.governor,
            since=self.started,
            version=edged.__version__,
        )

    def status_line(self) -> str:
        """systemd's STATUS= line."""
        temp = self.snapshot.cpu_temp_c if self.snapshot else None
        depth = self.scheduler.depth if self.scheduler else 0
        line = f"{self.lifecycle.state}; governor {self.lifecycle.governor}; queue {depth}/{self.config.queue_capacity}"
        return line + (f"; {temp:.1f} C" if temp is not None else "")
