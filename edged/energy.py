"""Energy accounting: joules integrated from a power sensor, else from a board power model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edged.sensors import PowerSnapshot, Sensors


@dataclass(frozen=True)
class PowerModel:
    """Board power when no sensor reads it: idle watts plus CPU use times the busy-over-idle watts."""

    idle_w: float
    busy_w: float

    def watts(self, busy_fraction: float) -> float:
        return self.idle_w + (self.busy_w - self.idle_w) * busy_fraction


# Whole-board figures from published measurements (Raspberry Pi 4 B: ~2.7 W idle, ~6.4 W all cores busy;
# Raspberry Pi 5: ~2.7 W idle, ~7.2 W all cores busy; both with no USB load).
BOARDS = {
    "pi4": PowerModel(idle_w=2.7, busy_w=6.4),
    "pi5": PowerModel(idle_w=2.7, busy_w=7.2),
    "generic": PowerModel(idle_w=3.0, busy_w=7.0),
}


def detect_board(root: Path) -> str:
    """pi4 / pi5 from the device tree's model string, else generic."""
    try:
        model = (root / "proc/device-tree/model").read_text(errors="replace")
    except OSError:
        return "generic"
    if "Raspberry Pi 5" in model:
        return "pi5"
    if "Raspberry Pi 4" in model:
        return "pi4"
    return "generic"


class EnergyMeter:
    """A running total of joules; ``read()`` between two samples extrapolates with the last power."""

    def __init__(self, model: PowerModel, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._clock = clock
        self._lock = threading.Lock()
        self._total_j = 0.0
        self._power_w = model.idle_w
        self._at = clock()
        self.source = "model"
        self._cpu: tuple[float, float] | None = None

    def sample(self, snap: PowerSnapshot, sensors: Sensors) -> float:
        """Accounts the time since the last sample at the last power, then takes the new power."""
        busy, self._cpu = sensors.cpu_busy_fraction(self._cpu)
        if snap.power_w is not None:
            power, source = snap.power_w, "sensor"
        else:
            power, source = self._model.watts(busy if busy is not None else 0.0), "model"
        with self._lock:
            now = self._clock()
            self._total_j += self._power_w * (now - self._at)
            self._power_w, self._at, self.source = power, now, source
        return power

    def read(self) -> float:
        with self._lock:
            return self._total_j + self._power_w * (self._clock() - self._at)

    @property
    def power_w(self) -> float:
        return self._power_w
