"""A small MQTT client for kiosk code: send a question, get the answer (streamed or whole).

It speaks the contract's client-scoped topics (v1.1): questions go to ``<prefix>/<node>/ask/<client>``, so a
broker ACL with ``%u`` decides who may ask as whom, and answers come back on a topic only ``<client>`` may read.
"""

from __future__ import annotations

import json
import queue
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.errors import EdgedError
from edged.mqtt import set_nodelay

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ReplyError(EdgedError):
    """The node answered with an error reply; ``code`` is the contract's error code."""

    def __init__(self, code: str, message: str, retry_after_s: float | None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.code = code


class BrokerError(ConnectionError):
    """The broker cannot be reached, refused the login, or refused a subscription or a question (its ACL)."""


def _properties(packet: int, **values: Any) -> Properties:
    props = Properties(packet)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


class AskClient:
    """Asks one node (``node``) or any node of the fleet (``node=None``) over MQTT v5.

    ``client`` is the identity the node and the broker's ACL see: default the URL's user name, else a random
    ``ask-<hex>``. With ``persistent`` (the default) the broker keeps the session (the reply subscriptions, QoS 1
    answers queued for us) for ``session_expiry_s`` while the connection is down, so an answer sent while the
    broker restarts still arrives. The MQTT client id is unique per AskClient, so several may share an identity.
    """

    def __init__(
        self,
        broker_url: str,
        node: str | None,
        *,
        prefix: str = "edged",
        password: str = "",
        client: str | None = None,
        persistent: bool = True,
        session_expiry_s: int = 600,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        connect_timeout_s: float = 10.0,
    ) -> None:
        parts = urlsplit(broker_url)
        username = unquote(parts.username) if parts.username else None
        identity = client or username or f"ask-{uuid.uuid4().hex[:12]}"
        if not CLIENT_ID_RE.fullmatch(identity):
            raise ValueError(
                f"client identity {identity!r} must be 1-64 of A-Z a-z 0-9 _ - (one topic level); "
                "pass client=... (edged ask --client NAME)"
            )
        self.client = identity
        self._prefix = prefix
        self._node = node
        self._persistent = persistent
        self._where = f"{parts.hostname or '127.0.0.1'}:{parts.port or (8883 if parts.scheme == 'mqtts' else 1883)}"
        self._user = username or "(anonymous)"
        # State shared with paho's network thread; _lock guards the sets and dicts, _changed wakes waiters.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._online = False
        self._topics: set[str] = set()  # reply topics of the asks in flight: re-subscribed when a session is lost
        self._waiting: dict[str, queue.Queue[dict[str, Any] | str]] = {}  # reply topic -> its ask's replies
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._ignored_subacks: set[int] = set()
        self._refused: dict[int, str] = {}  # mid of a question the broker refused -> the reason
        self._published: dict[int, str] = {}  # mid of a question in flight -> its reply topic
        self._connack: ReasonCode | None = None

        client_id = f"edged-ask-{identity}-{uuid.uuid4().hex[:8]}"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username:
            self._client.username_pw_set(username, password or (unquote(parts.password) if parts.password else None))
        if parts.scheme == "mqtts":
            self._client.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None)
        # paho's default backoff grows to 120 s; an ask waits for its answer far less than that.
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_subscribe = self._subscribed
        self._client.on_publish = self._acknowledged
        self._client.on_message = self._message
        expiry = session_expiry_s if persistent else 0
        try:
            self._client.connect(
                parts.hostname or "127.0.0.1",
                parts.port or (8883 if parts.scheme == "mqtts" else 1883),
                keepalive=30,
                clean_start=not persistent,
                properties=_properties(PacketTypes.CONNECT, SessionExpiryInterval=expiry),
            )
        except ssl.SSLError as exc:
            raise BrokerError(
                f"TLS with the broker at {self._where} failed ({exc}); "
                "check ca_file: it must be the CA that signed the broker's certificate"
            ) from exc
        except OSError as exc:
            raise BrokerError(f"cannot reach the broker at {self._where}: {exc.strerror or exc}") from exc
        self._client.loop_start()
        with self._changed:
            self._changed.wait_for(lambda: self._connack is not None, timeout=connect_timeout_s)
            connack = self._connack
        if connack is None or connack.is_failure:
            self._client.loop_stop()
            self._client.disconnect()
            if connack is None:
                raise BrokerError(f"the broker at {self._where} did not answer the login in {connect_timeout_s:g} s")
            raise BrokerError(f"the broker at {self._where} refused the login of {self._user}: {connack}")

    @property
    def ask_topic(self) -> str:
        return f"{self._prefix}/{self._node or 'fleet'}/ask/{self.client}"

    def reply_topic(self, request_id: str) -> str:
        """Where the answer to ``request_id`` comes back: a fleet node is not known in advance, so kiosk/..."""
        if self._node is None:
            return f"kiosk/{self.client}/answer/{request_id}"
        return f"{self._prefix}/{self._node}/answer/{self.client}/{request_id}"

    def close(self) -> None:
        """Disconnects; a persistent session is ended too (Session Expiry 0), nothing is left queued for us."""
        if self._persistent:
            self._client.disconnect(properties=_properties(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
        else:
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> AskClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def ask(
        self,
        prompt: str | None = None,
        *,
        timeout_s: float = 120.0,
        on_delta: Callable[[str], None] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The final reply (a dict as the contract shows it); raises ReplyError on an error reply.

        Waits across reconnects: paho reconnects by itself, and a lost session's reply subscription is renewed.
        TimeoutError when no final reply came within ``timeout_s``; BrokerError when the broker refused.
        """
        request_id = str(fields.pop("id", None) or uuid.uuid4().hex[:16])
        body = {"id": request_id, **({"prompt": prompt} if prompt is not None else {}), **fields}
        if on_delta is not None:
            body["stream"] = True
        where = self._node or "fleet"
        reply_topic = self.reply_topic(request_id)
        deadline = time.monotonic() + timeout_s
        replies: queue.Queue[dict[str, Any] | str] = queue.Queue()
        with self._lock:
            self._topics.add(reply_topic)
            self._waiting[reply_topic] = replies
        mid: int | None = None
        try:
            self._subscribe(reply_topic, deadline)
            props = _properties(
                PacketTypes.PUBLISH,
                ResponseTopic=reply_topic,
                CorrelationData=request_id.encode(),
                ContentType="application/json",
            )
            # QoS 1: paho keeps it and sends it again after a reconnect until the broker acknowledged it.
            info = self._client.publish(self.ask_topic, json.dumps(body), qos=1, properties=props)
            mid = info.mid
            with self._lock:
                self._published[mid] = reply_topic
                refused = self._refused.pop(mid, None)
            if refused is not None:
                replies.put(refused)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                reply = replies.get(timeout=left)
                if isinstance(reply, str):
                    raise BrokerError(
                        f"the broker refused the question on {self.ask_topic} ({reply}): its ACL must let "
                        f"{self._user} write {self._prefix}/+/ask/{self.client}"
                    )
                if reply.get("id") != request_id:
                    continue
                if not reply.get("done"):
                    if on_delta is not None:
                        on_delta(str(reply.get("delta", "")))
                    continue
                if reply.get("status") == "error":
                    err = reply.get("error") or {}
                    raise ReplyError(str(err.get("code")), str(err.get("message")), err.get("retry_after_s"))
                return reply
        except queue.Empty:
            raise TimeoutError(f"no answer from {where} within {timeout_s:g} s") from None
        finally:
            with self._lock:
                self._topics.discard(reply_topic)
                self._waiting.pop(reply_topic, None)
                if mid is not None:
                    self._published.pop(mid, None)
                    self._refused.pop(mid, None)
                online = self._online
            if online:
                self._client.unsubscribe(reply_topic)

    def cancel(self, request_id: str, node: str | None = None) -> None:
        """Asks the node to stop ``request_id`` (one of ours); a fleet request on the node that answers it."""
        target = node or self._node
        if target is None:
            raise ValueError("a fleet request is cancelled on the node that took it: pass node=<its reply's node>")
        info = self._client.publish(
            f"{self._prefix}/{target}/cancel/{self.client}", json.dumps({"id": request_id}), qos=1
        )
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: queued until reconnected
            raise BrokerError(f"cannot send the cancel to the broker at {self._where}: {paho.error_string(info.rc)}")

    def _subscribe(self, topic: str, deadline: float) -> None:
        """Subscribes and waits for the broker's SUBACK, so no reply can arrive before we listen."""
        while True:
            with self._changed:
                if not self._changed.wait_for(lambda: self._online, timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"not connected to the broker at {self._where}")
            rc, mid = self._client.subscribe(topic, 1)
            if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                time.sleep(0.05)  # the connection dropped just now; wait for the reconnect
                continue
            codes = self._suback(mid, deadline)
            if codes is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the broker at {self._where} did not acknowledge the subscription to {topic}")
                continue  # disconnected before the SUBACK: subscribe again once reconnected
            if codes and codes[0].is_failure:
                raise BrokerError(
                    f"the broker refused the subscription to {topic} ({codes[0]}): its ACL must let {self._user} "
                    "read it"
                )
            return

    def _suback(self, mid: int, deadline: float) -> list[ReasonCode] | None:
        """The SUBACK's reason codes for ``mid``; None when the connection dropped first or time ran out."""
        with self._changed:
            self._changed.wait_for(
                lambda: mid in self._subacks or not self._online, timeout=max(0.0, deadline - time.monotonic())
            )
            return self._subacks.pop(mid, None)

    def _connected(
        self, client: paho.Client, _u: object, flags: paho.ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        if reason.is_failure:
            with self._changed:
                self._connack = reason
                self._changed.notify_all()
            return
        set_nodelay(client)
        with self._changed:
            self._connack = reason
            self._online = True
            topics = sorted(self._topics)
            self._changed.notify_all()
        if topics and not flags.session_present:
            # The broker forgot us (no persistent session, or it restarted without its database): subscribe
            # again. This runs on the network thread, so the SUBACK cannot come before the mid is noted.
            _, mid = client.subscribe([(t, 1) for t in topics])
            if mid is not None:
                with self._lock:
                    self._ignored_subacks.add(mid)

    def _disconnected(self, _c: paho.Client, _u: object, _f: object, _r: object, _p: object) -> None:
        with self._changed:
            self._online = False
            self._changed.notify_all()

    def _subscribed(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        with self._changed:
            if mid in self._ignored_subacks:
                self._ignored_subacks.discard(mid)
                return
            self._subacks[mid] = codes
            self._changed.notify_all()

    def _acknowledged(self, _c: paho.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        if not reason.is_failure:
            return
        with self._lock:
            topic = self._published.get(mid)
            waiting = self._waiting.get(topic) if topic else None
            if waiting is None:
                self._refused[mid] = str(reason)  # PUBACK before ask() noted the mid
        if waiting is not None:
            waiting.put(str(reason))

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            waiting = self._waiting.get(msg.topic)
        if waiting is None:
            return  # an answer to an ask that gave up, or a persistent session's leftovers
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(reply, dict):
            waiting.put(reply)
