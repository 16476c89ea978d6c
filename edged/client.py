"""A small MQTT client for kiosk code: send a question, get the answer (streamed or whole)."""

from __future__ import annotations

import contextlib
import json
import queue
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.errors import EdgedError
from edged.mqtt import set_nodelay


class ReplyError(EdgedError):
    """The node answered with an error reply; ``code`` is the contract's error code."""

    def __init__(self, code: str, message: str, retry_after_s: float | None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.code = code


class AskClient:
    """Asks one node (``node``) or any node of the fleet (``node=None``) over MQTT v5."""

    def __init__(self, broker_url: str, node: str | None, *, prefix: str = "edged", password: str = "") -> None:
        parts = urlsplit(broker_url)
        self._prefix = prefix
        self._node = node
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edged-ask-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        if parts.username:
            self._client.username_pw_set(parts.username, password or None)
        if parts.scheme == "mqtts":
            self._client.tls_set()
        self._client.on_message = self._message
        self._client.on_connect = lambda client, *_: set_nodelay(client)
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self._client.loop_start()

    def close(self) -> None:
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
        """The final reply (a dict as the contract shows it); raises ReplyError on an error reply."""
        request_id = fields.pop("id", None) or uuid.uuid4().hex[:16]
        body = {"id": request_id, **({"prompt": prompt} if prompt is not None else {}), **fields}
        if on_delta is not None:
            body["stream"] = True
        where = self._node or "fleet"
        reply_topic = f"{self._prefix}/{where}/answer/{request_id}"
        self._subscribed(reply_topic)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = request_id.encode()
        props.ContentType = "application/json"
        topic = f"{self._prefix}/{self._node}/ask" if self._node else f"{self._prefix}/fleet/ask"
        self._client.publish(topic, json.dumps(body), qos=1, properties=props)
        try:
            while True:
                reply = self._replies.get(timeout=timeout_s)
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
            self._client.unsubscribe(reply_topic)

    def _subscribed(self, topic: str) -> None:
        """Subscribes and waits for the broker's SUBACK, so no reply can arrive before we listen."""
        done = queue.Queue[int]()
        self._client.on_subscribe = lambda _c, _u, mid, *_: done.put(mid)
        _, mid = self._client.subscribe(topic, 1)
        while done.get(timeout=10) != mid:
            pass

    def _message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            self._replies.put(json.loads(msg.payload))
