"""The node's lifecycle: loading -> ready -> stopping, and what the status says in each. Pure."""

from __future__ import annotations

from dataclasses import dataclass, replace

_UNWELL = ("hot", "critical", "low_power")


@dataclass(frozen=True)
class Lifecycle:
    """Where the node is. Ready with a model error or an unwell governor is ``degraded``."""

    phase: str = "loading"  # loading, ready, stopping
    model_error: str | None = None
    governor: str = "normal"
    temp_c: float | None = None

    def loaded(self) -> Lifecycle:
        return replace(self, phase="ready" if self.phase != "stopping" else self.phase, model_error=None)

    def failed(self, error: str) -> Lifecycle:
        """The model could not be loaded: the node still answers (``model_unavailable``) and says why."""
        return replace(self, phase="ready" if self.phase != "stopping" else self.phase, model_error=error)

    def sensed(self, governor: str, temp_c: float | None) -> Lifecycle:
        return replace(self, governor=governor, temp_c=temp_c)

    def stopping(self) -> Lifecycle:
        return replace(self, phase="stopping")

    @property
    def model_ready(self) -> bool:
        return self.phase == "ready" and self.model_error is None

    @property
    def state(self) -> str:
        """The status's ``state``: online, degraded or offline."""
        if self.phase != "ready":
            return "offline"
        return "degraded" if self.model_error is not None or self.governor in _UNWELL else "online"

    @property
    def reason(self) -> str | None:
        if self.phase == "loading":
            return "starting"
        if self.phase == "stopping":
            return "stopping"
        if self.model_error is not None:
            return self.model_error
        if self.governor in _UNWELL:
            at = f" at {self.temp_c:.1f} C" if self.temp_c is not None and self.governor != "low_power" else ""
            return f"governor {self.governor}{at}"
        return None
