"""Whether the node takes a request now, and who gives way in a full queue. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from edged.errors import Busy, EdgedError, ModelUnavailable, Power, RateLimited, Thermal
from edged.governor import Limits

K = TypeVar("K")


@dataclass(frozen=True)
class NodeState:
    """What admission looks at, as one snapshot."""

    model_ready: bool
    reason: str | None  # why the node is degraded, as the status says
    governor: str
    limits: Limits
    governor_retry_s: float
    queue_room: bool  # the scheduler would queue a request of this priority now


def refusal(identity: str, rate_retry_s: float | None, node: NodeState) -> EdgedError | None:
    """The error a well-formed request is refused with, or None when it is taken. In order: the asker's
    rate, the model, the governor, the queue."""
    if rate_retry_s is not None:
        return RateLimited(f"{identity!r} is sending too fast; wait {rate_retry_s:g} s", retry_after_s=rate_retry_s)
    if not node.model_ready:
        return ModelUnavailable(f"no model is loaded on this node: {node.reason}", retry_after_s=60)
    if not node.limits.admit:
        retry = node.governor_retry_s
        if node.limits.error_code == "power":
            return Power(f"this node is low on power ({node.governor}); try again later", retry_after_s=retry)
        return Thermal(f"this node is too hot to take work ({node.reason}); try again later", retry_after_s=retry)
    if not node.queue_room:
        return Busy("the queue is full; try again shortly", retry_after_s=2)
    return None


def displaced(rank: int, queued: Sequence[tuple[int, int, K]]) -> K | None:
    """Which queued request (rank, arrival seq, key) an incoming one of ``rank`` displaces from a full queue.

    Only an alert (rank 0) displaces: the newest background request, else the newest normal one.
    """
    if rank != 0:
        return None
    for victim_rank in (2, 1):
        candidates = [(seq, key) for r, seq, key in queued if r == victim_rank]
        if candidates:
            return max(candidates, key=lambda c: c[0])[1]
    return None


def in_fleet(model_ready: bool, limits: Limits, depth: int, capacity: int) -> bool:
    """Whether the node belongs in the fleet's shared subscription: loaded, healthy and not full."""
    return model_ready and limits.in_fleet and depth < capacity
