"""paho-mqtt adapter: the persistent session, reconnects, manual acknowledgement, TCP_NODELAY."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config import BrokerConfig
from edged.protocol import Envelope

log = logging.getLogger(__name__)


def set_nodelay(client: paho.Client) -> None:
    """TCP_NODELAY on a connected client's socket; call after every (re)connect.

    Nagle plus delayed ACK costs ~40-90 ms per request/response on loopback (shared/FINDINGS.md).
    """
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Inbound:
    topic: str
    mid: int
    envelope: Envelope


class Link:
    """One MQTT connection. Callbacks run on paho's network thread; ``publish`` is safe from any thread."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        will: tuple[str, bytes],
        on_message: Callable[[Inbound], None],
        on_connect: Callable[[], None],
    ) -> None:
        self.v5 = config.protocol == "v5"
        self._config = config
        self._on_message = on_message
        self._on_connect = on_connect
        self.subscriptions: dict[str, int] = {}
        self.connected = threading.Event()
        self.reconnects = 0
        if self.v5:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=paho.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
        if config.username:
            client.username_pw_set(config.username, config.password or None)
        if config.tls:
            client.tls_set(
                ca_certs=config.ca_file or None, certfile=config.cert_file or None, keyfile=config.key_file or None
            )
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        self._client = client

    def start(self) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._config.session_expiry_s
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=False if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
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
            left = threading.Event()
            self._client.on_unsubscribe = lambda *_: left.set()
            self._client.unsubscribe(shared)
            left.wait(2)
        if last_words is not None and self.connected.is_set():
            info = self._client.publish(last_words[0], last_words[1], qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions[topic] = qos
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        if self.subscriptions.pop(topic, None) is not None and self.connected.is_set():
            self._client.unsubscribe(topic)

    def publish(
        self, topic: str, payload: bytes, qos: int, *, retain: bool = False, correlation: bytes | None = None
    ) -> paho.MQTTMessageInfo:
        props = None
        if correlation is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def ack(self, mid: int, qos: int) -> None:
        self._client.ack(mid, qos)

    def _connected(self, client: paho.Client, _u: object, flags: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection: %s", reason)
            return
        set_nodelay(client)
        for topic, qos in self.subscriptions.items():
            client.subscribe(topic, qos)
        self.connected.set()
        log.info("connected to %s:%s", self._config.host, self._config.port)
        self._on_connect()

    def _disconnected(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if self.connected.is_set():
            self.reconnects += 1
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        client_id = ""
        for key, value in getattr(props, "UserProperty", None) or []:
            if key == "client":
                client_id = value
        env = Envelope(
            payload=bytes(msg.payload),
            qos=msg.qos,
            client=client_id,
            response_topic=getattr(props, "ResponseTopic", None) or None,
            correlation=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            received_at=time.time(),
        )
        try:
            self._on_message(Inbound(msg.topic, msg.mid, env))
        except Exception:  # not acknowledged: the broker delivers it again after a reconnect
            log.exception("handling a message on %s failed", msg.topic)
