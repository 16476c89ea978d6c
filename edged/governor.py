"""The power and thermal governor: a pure function from a sensor snapshot to a state, and from state to limits."""

from __future__ import annotations

from dataclasses import dataclass

from edged.sensors import PowerSnapshot

STATES = ("normal", "warm", "hot", "critical", "low_power")


@dataclass(frozen=True)
class Thresholds:
    # The Pi firmware throttles the CPU from 80 C and hard-limits at 85 C (shared/FINDINGS.md).
    warm_c: float = 70.0
    hot_c: float = 80.0
    critical_c: float = 85.0
    hysteresis_c: float = 5.0  # a state is left only this far below its threshold
    battery_low_pct: float = 15.0
    battery_hysteresis_pct: float = 5.0
    low_power_action: str = "limit"  # "limit": tighter caps; "refuse": new requests get `power`
    warm_max_tokens: int = 128
    warm_pause_ms: float = 20.0  # duty cycling: a pause between tokens
    low_power_max_tokens: int = 64
    low_power_pause_ms: float = 50.0
    retry_after_s: float = 60.0


@dataclass(frozen=True)
class Limits:
    """What the scheduler applies in a state."""

    admit: bool  # new requests are accepted
    error_code: str | None  # the error of a refused request: thermal or power
    run_queued: bool  # the worker starts queued requests
    stop_running: bool  # the running answer is stopped (finish_reason = the state's code)
    max_tokens_cap: int | None
    pause_ms: float
    threads_delta: int  # added to the configured thread count (never below 1)
    in_fleet: bool  # stays in the fleet's shared subscription
    slots_cap: int | None = None  # at most this many answers decoded together


def decide(snap: PowerSnapshot, t: Thresholds, previous: str) -> str:
    """The governor state for ``snap``, with hysteresis against ``previous``."""
    temp = snap.cpu_temp_c
    thermal = "normal"
    if temp is not None:
        rank = STATES.index(previous) if previous in STATES[:4] else 0
        for level, threshold in ((3, t.critical_c), (2, t.hot_c), (1, t.warm_c)):
            if temp >= threshold or (rank >= level and temp > threshold - t.hysteresis_c):
                thermal = STATES[level]
                break
    if thermal in ("critical", "hot"):
        return thermal
    if _low_power(snap, t, previous == "low_power"):
        return "low_power"
    return thermal


def _low_power(snap: PowerSnapshot, t: Thresholds, was_low: bool) -> bool:
    if snap.under_voltage:
        return True
    battery = snap.battery
    if battery is None or battery.percent is None or battery.status in ("Charging", "Full"):
        return False
    limit = t.battery_low_pct + (t.battery_hysteresis_pct if was_low else 0.0)
    return battery.percent < limit


def limits(state: str, t: Thresholds) -> Limits:
    if state == "warm":
        return Limits(True, None, True, False, t.warm_max_tokens, t.warm_pause_ms, -1, True, slots_cap=2)
    if state == "hot":
        return Limits(False, "thermal", False, False, t.warm_max_tokens, t.warm_pause_ms, -1, False)
    if state == "critical":
        return Limits(False, "thermal", False, True, t.warm_max_tokens, t.warm_pause_ms, -1, False)
    if state == "low_power":
        refuse = t.low_power_action == "refuse"
        return Limits(
            not refuse,
            "power" if refuse else None,
            not refuse,
            False,
            t.low_power_max_tokens,
            t.low_power_pause_ms,
            -99,
            False,
            slots_cap=1,
        )
    return Limits(True, None, True, False, None, 0.0, 0, True)
