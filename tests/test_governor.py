"""The governor as a pure function: states with hysteresis, and the limits each state imposes."""

from __future__ import annotations

import time

import pytest

from edged.energy import EnergyMeter, PowerModel
from edged.governor import Thresholds, decide, limits
from edged.sensors import Battery, PowerSnapshot, Sensors, ThrottleFlags

T = Thresholds()


def snap(temp: float | None = 50.0, battery: Battery | None = None, throttle: int | None = None) -> PowerSnapshot:
    flags = ThrottleFlags.from_bits(throttle) if throttle is not None else None
    return PowerSnapshot(time.time(), temp, None, flags, None, None, None, None, None, battery, None, None)


@pytest.mark.parametrize(
    ("temp", "previous", "expected"),
    [
        (50.0, "normal", "normal"),
        (70.0, "normal", "warm"),
        (67.0, "warm", "warm"),  # hysteresis: warm is left only below 65
        (64.9, "warm", "normal"),
        (80.0, "warm", "hot"),
        (76.0, "hot", "hot"),
        (74.0, "hot", "warm"),
        (85.0, "hot", "critical"),
        (81.0, "critical", "critical"),
        (79.0, "critical", "hot"),  # cools one step at a time
        (66.0, "normal", "normal"),
        (None, "hot", "normal"),  # no thermal sensor: no thermal state
    ],
)
def test_thermal_states_with_hysteresis(temp: float | None, previous: str, expected: str) -> None:
    assert decide(snap(temp), T, previous) == expected


@pytest.mark.parametrize(
    ("battery", "throttle", "previous", "expected"),
    [
        (Battery(14.0, "Discharging", None, None), None, "normal", "low_power"),
        (Battery(14.0, "Charging", None, None), None, "normal", "normal"),
        (Battery(18.0, "Discharging", None, None), None, "low_power", "low_power"),  # leaves above 20 %
        (Battery(21.0, "Discharging", None, None), None, "low_power", "normal"),
        (None, 0x1, "normal", "low_power"),  # under-voltage now
        (None, 0x10000, "normal", "normal"),  # under-voltage only since boot
    ],
)
def test_low_power(battery: Battery | None, throttle: int | None, previous: str, expected: str) -> None:
    assert decide(snap(50.0, battery, throttle), T, previous) == expected


def test_heat_outranks_low_power() -> None:
    assert decide(snap(82.0, Battery(5.0, "Discharging", None, None)), T, "low_power") == "hot"


def test_limits_per_state() -> None:
    normal, warm, hot, critical = (limits(s, T) for s in ("normal", "warm", "hot", "critical"))
    assert normal.admit and normal.run_queued and normal.in_fleet and normal.pause_ms == 0
    assert warm.admit and warm.max_tokens_cap == 128 and warm.pause_ms > 0 and warm.threads_delta < 0
    assert not hot.admit and hot.error_code == "thermal" and not hot.run_queued and not hot.stop_running
    assert critical.stop_running and not critical.in_fleet
    assert limits("low_power", T).admit and limits("low_power", T).max_tokens_cap == 64
    refuse = limits("low_power", Thresholds(low_power_action="refuse"))
    assert not refuse.admit and refuse.error_code == "power"


def test_energy_meter_integrates_the_last_power(tmp_path: object) -> None:
    now = [100.0]
    meter = EnergyMeter(PowerModel(idle_w=2.0, busy_w=6.0), clock=lambda: now[0])
    sensors = Sensors(tmp_path)  # type: ignore[arg-type]  # an empty tree: no /proc/stat, no power sensor
    assert meter.sample(snap(), sensors) == 2.0 and meter.source == "model"
    now[0] = 110.0
    assert meter.read() == pytest.approx(20.0)
    with_sensor = PowerSnapshot(time.time(), None, None, None, None, None, 5.0, None, None, None, None, None)
    meter.sample(with_sensor, sensors)
    now[0] = 112.0
    assert meter.read() == pytest.approx(30.0) and meter.source == "sensor"
