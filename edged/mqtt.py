"""paho-mqtt adapter: the persistent session, reconnects, manual acknowledgement, TCP_NODELAY.

paho's types stop here: callbacks hand edged's own ``Inbound`` and publish completions over, paho's
return codes and exceptions are mapped once (``publish`` returns a message id or raises ``NotSent``).
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged.config import BrokerConfig
from edged.protocol import Envelope

log = logging.getLogger(__name__)
_REPEAT_LOG_S = 60.0  # a connection failure with the same reason is logged again at most this often


def set_nodelay(client: paho.Client) -> None:
    """TCP_NODELAY on a connected client's socket; call after every (re)connect.

    Nagle plus delayed ACK costs ~40-90 ms per request/response on loopback (shared/FINDINGS.md).
    """
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Inbound:
    """A received message and how to acknowledge it to the broker (once, after it is handled)."""

    envelope: Envelope
    ack: Callable[[], None]


class NotSent(Exception):
    """A publish paho did not take. ``retry``: it may succeed once connected (QoS 0 while offline)."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


class _Client(paho.Client):
    """paho's client, telling why a (re)connect failed: paho itself only retries and logs at debug level."""

    on_connect_error: Callable[[OSError], None] | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            if self.on_connect_error is not None:
                self.on_connect_error(exc)
            raise


class Link:
    """One MQTT connection. Callbacks run on paho's network thread and only hand over; ``publish`` and
    ``ack`` are safe from any thread.

    ``persistent``: the broker keeps the session (subscriptions, unacknowledged and queued messages) while
    the node is away. A session that is not persistent ends with the connection: the node's fleet link, so
    that a dead node's share of the fleet's shared subscription goes to the live ones at once.
    """

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        will: tuple[str, bytes] | None,
        on_message: Callable[[Inbound], None],
        on_connect: Callable[[], None] = lambda: None,
        on_published: Callable[[int, str | None], None] = lambda _mid, _failure: None,
        *,
        persistent: bool = True,
    ) -> None:
        self.v5 = config.protocol == "v5"
        self.persistent = persistent
        self._config = config
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_published = on_published
        self.subscriptions: dict[str, int] = {}
        # (UN)SUBSCRIBE packets the broker has not answered yet: message id -> topic
        self._unanswered: dict[int, str] = {}
        self._unanswered_lock = threading.Lock()
        self.connected = threading.Event()
        self.settled = threading.Event()  # connected, and every SUBSCRIBE and UNSUBSCRIBE sent is answered
        self.reconnects = 0
        self._last_failure: tuple[str, float] = ("", 0.0)
        if self.v5:
            client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True)
        else:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=paho.MQTTv311,
                clean_session=not persistent,
                manual_ack=True,
            )
        if config.username:
            client.username_pw_set(config.username, config.password or None)
        if config.tls:
            client.tls_set(
                ca_certs=config.ca_file or None, certfile=config.cert_file or None, keyfile=config.key_file or None
            )
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_publish = self._published
        client.on_subscribe = self._granted
        client.on_unsubscribe = self._left
        client.on_connect_error = self._connect_failed
        self._client = client

    def start(self) -> None:
        props = None
        if self.v5 and self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._config.session_expiry_s
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=not self.persistent if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._client.loop_start()

    def stop(self, last_words: tuple[str, bytes] | None = None) -> None:
        """Leaves shared subscriptions, publishes ``last_words`` (the offline status), disconnects.

        A persistent session keeps its share of a shared subscription while offline, so a node that
        stops must leave the fleet group first or the broker keeps queueing fleet work for it.
        """
        shared = [t for t in self.subscriptions if t.startswith("$share/")]
        if shared and self.connected.is_set():
            for topic in shared:
                self.unsubscribe(topic)
            self.settled.wait(2)
        if last_words is not None and self.connected.is_set():
            info = self._client.publish(last_words[0], last_words[1], qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions[topic] = qos
        if self.connected.is_set():
            self._subscribe(self._client, topic, qos)

    def _subscribe(self, client: paho.Client, topic: str, qos: int) -> None:
        """v5 asks for Retain As Published: else the broker clears the retain flag of a retained message
        published while we are subscribed, and a retained question could not be told apart."""
        with self._unanswered_lock:  # the answer may come before paho returns its message id
            if self.v5:
                _rc, mid = client.subscribe(topic, options=SubscribeOptions(qos=qos, retainAsPublished=True))
            else:
                _rc, mid = client.subscribe(topic, qos)
            self._sent(mid, topic)

    def unsubscribe(self, topic: str) -> None:
        if self.subscriptions.pop(topic, None) is not None and self.connected.is_set():
            with self._unanswered_lock:
                _rc, mid = self._client.unsubscribe(topic)
                self._sent(mid, topic)

    def _sent(self, mid: int | None, topic: str) -> None:
        if mid is not None:
            self.settled.clear()
            self._unanswered[mid] = topic

    def _answered(self, mid: int) -> str:
        """The topic of the (UN)SUBSCRIBE the broker has answered; settled once none is left."""
        with self._unanswered_lock:
            topic = self._unanswered.pop(mid, "?")
            if not self._unanswered and self.connected.is_set():
                self.settled.set()
        return topic

    def publish(
        self, topic: str, payload: bytes, qos: int, *, retain: bool = False, correlation: bytes | None = None
    ) -> int:
        """Hands a message to paho; its message id, whose completion comes to ``on_published``.

        QoS 1 and 2 messages published while the broker is away are kept by paho and sent on reconnect.
        """
        props = None
        if correlation is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as exc:  # a topic or payload paho refuses outright
            raise NotSent(str(exc), retry=False) from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise NotSent("not connected to the broker", retry=True)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise NotSent(paho.error_string(info.rc), retry=False)
        return int(info.mid)

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)

    # -- paho's callbacks (network thread) ---------------------------------------------------------

    def _connected(self, client: paho.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            self._failed(f"the broker refused the connection: {reason}")
            return
        set_nodelay(client)
        for topic, qos in list(self.subscriptions.items()):
            self._subscribe(client, topic, qos)
        self.connected.set()
        with self._unanswered_lock:
            if not self._unanswered:
                self.settled.set()
        self._last_failure = ("", 0.0)
        log.info("connected to %s:%s", self._config.host, self._config.port)
        self._on_connect()

    def _connect_failed(self, exc: OSError) -> None:
        self._failed(f"cannot connect to {self._config.host}:{self._config.port}: {exc}")

    def _failed(self, reason: str) -> None:
        last, when = self._last_failure
        now = time.monotonic()
        if reason != last or now - when >= _REPEAT_LOG_S:
            log.warning("%s; retrying", reason)
            self._last_failure = (reason, now)

    def _disconnected(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if self.connected.is_set():
            self.reconnects += 1
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()
        with self._unanswered_lock:
            self.settled.clear()
            self._unanswered.clear()

    def _granted(self, _c: paho.Client, _u: object, mid: int, reasons: list[Any], _p: object) -> None:
        """The broker's SUBACK: a subscription it refuses (an ACL without read access) is said in the log."""
        topic = self._answered(mid)
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            log.error("the broker refused the subscription to %s: %s", topic, ", ".join(refused))
        else:
            log.debug("subscribed to %s", topic)

    def _left(self, _c: paho.Client, _u: object, mid: int, _reasons: object, _p: object) -> None:
        log.debug("unsubscribed from %s", self._answered(mid))

    def _published(self, _c: paho.Client, _u: object, mid: int, reason: Any, _p: object) -> None:
        failure = str(reason) if getattr(reason, "is_failure", False) else None
        self._on_published(mid, failure)

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            props = getattr(msg, "properties", None)
            env = Envelope(
                topic=msg._topic.decode("utf-8", "replace"),
                payload=bytes(msg.payload),
                qos=msg.qos,
                retained=bool(msg.retain),
                redelivered=bool(msg.dup),
                response_topic=getattr(props, "ResponseTopic", None) or None,
                correlation=getattr(props, "CorrelationData", None),
                content_type=getattr(props, "ContentType", None),
                received_at=time.time(),
            )
        except Exception:  # never leave a message unacknowledged: it would hold the broker's window
            log.exception("a message on %r could not be read; acknowledged and dropped", msg._topic[:100])
            self.ack(msg.mid, msg.qos)
            return
        self._on_message(Inbound(env, functools.partial(self.ack, msg.mid, msg.qos)))
