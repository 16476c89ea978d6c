"""Sensors on real file trees shaped like each board's sysfs: every reading, and None where there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.energy import detect_board
from edged.sensors import Battery, Sensors, ThrottleFlags, parse_pmic
from tests import sysfs


def test_pi4(tmp_path: Path) -> None:
    sysfs.pi4(tmp_path)
    s = Sensors(tmp_path).read()
    assert s.cpu_temp_c == pytest.approx(48.312)
    assert s.cpu_freq_mhz == pytest.approx(1500.0)
    assert s.throttled_now == ThrottleFlags(
        under_voltage=True, freq_capped=False, throttled=True, soft_temp_limit=False
    )
    assert s.throttled_since_boot == ThrottleFlags(True, False, True, False)
    assert s.under_voltage_alarm is False
    assert s.under_voltage is True  # the firmware's bit 0
    assert (s.power_w, s.voltage_v, s.current_a, s.battery) == (None, None, None, None)
    assert s.load1 == pytest.approx(0.52)
    assert s.mem_available_mb == pytest.approx(2592.0)
    assert detect_board(tmp_path) == "pi4"


def test_pi5_picks_the_cpu_zone_by_type_and_finds_rpi_volt_by_name(tmp_path: Path) -> None:
    sysfs.pi5(tmp_path)
    s = Sensors(tmp_path).read()
    assert s.cpu_temp_c == pytest.approx(61.85)
    assert s.cpu_freq_mhz == pytest.approx(2400.0)
    assert s.throttled_now == ThrottleFlags(False, False, False, False)
    assert s.under_voltage_alarm is True and s.under_voltage is True
    assert s.power_w is None and s.battery is None
    assert detect_board(tmp_path) == "pi5"


def test_ina219_and_battery(tmp_path: Path) -> None:
    sysfs.ina219_battery(tmp_path)
    s = Sensors(tmp_path).read()
    assert s.power_w == pytest.approx(4.2)
    assert s.voltage_v == pytest.approx(5.08)
    assert s.current_a == pytest.approx(0.826)
    assert s.battery == Battery(
        percent=76.0,
        status="Discharging",
        voltage_v=pytest.approx(7.4),  # type: ignore[arg-type]
        current_a=pytest.approx(-0.56),
    )  # type: ignore[arg-type]
    assert s.cpu_temp_c is None and s.cpu_freq_mhz is None
    assert s.throttled_now is None and s.throttled_since_boot is None and s.under_voltage_alarm is None
    assert detect_board(tmp_path) == "generic"


def test_a_board_with_nothing_reads_none_everywhere(tmp_path: Path) -> None:
    s = Sensors(tmp_path).read()
    readings = [
        s.cpu_temp_c,
        s.cpu_freq_mhz,
        s.throttled_now,
        s.throttled_since_boot,
        s.under_voltage_alarm,
        s.power_w,
        s.voltage_v,
        s.current_a,
        s.battery,
        s.load1,
        s.mem_available_mb,
    ]
    assert readings == [None] * len(readings)
    assert s.under_voltage is False
    assert set(Sensors(tmp_path).found().values()) == {None}


def test_unreadable_values_are_none_not_zero(tmp_path: Path) -> None:
    temp = sysfs.pi4(tmp_path)
    temp.write_text("garbage\n")
    (tmp_path / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("not hex\n")
    s = Sensors(tmp_path).read()
    assert s.cpu_temp_c is None and s.throttled_now is None


def test_power_from_voltage_and_current_when_the_monitor_has_no_power_file(tmp_path: Path) -> None:
    sysfs.ina219_battery(tmp_path)
    (tmp_path / "sys/class/hwmon/hwmon3/power1_input").unlink()
    assert Sensors(tmp_path).read().power_w == pytest.approx(5.08 * 0.826)


def test_pi5_pmic_rails_sum_to_watts() -> None:
    text = """
     3V7_WL_SW_A current(0)=0.10000000A
     3V3_SYS_A current(1)=0.20000000A
     VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
     3V3_SYS_V volt(9)=3.30000000V
     VDD_CORE_V volt(15)=0.80000000V
     EXT5V_V volt(24)=5.10000000V
    """
    assert parse_pmic(text) == pytest.approx(0.1 * 3.7 + 0.2 * 3.3 + 2.0 * 0.8)
    assert parse_pmic("") is None
