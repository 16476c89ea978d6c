"""Board sensors read from sysfs and procfs under a configurable root. A missing reading is None, never 0.

Units and sources (shared/FINDINGS.md): thermal_zone*/temp in millidegrees C; cpufreq scaling_cur_freq in
kHz; the Raspberry Pi firmware's get_throttled hex mask (bit 0 under-voltage now, 1 frequency capped,
2 throttled, 3 soft temperature limit; bits 16-19 the same since boot); hwmon rpi_volt in0_lcrit_alarm;
ina2xx hwmon in1_input mV, curr1_input mA, power1_input uW; power_supply capacity %, voltage_now uV,
current_now uA.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Thermal zone types that are the CPU, most specific first (Pi 4/5: cpu-thermal; x86: x86_pkg_temp).
_CPU_ZONES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "soc_thermal", "soc-thermal", "cpu")
_POWER_MONITORS = ("ina219", "ina226", "ina230", "ina231", "ina260", "ina209")


@dataclass(frozen=True)
class ThrottleFlags:
    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool

    @classmethod
    def from_bits(cls, bits: int) -> ThrottleFlags:
        return cls(bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8))

    def as_dict(self) -> dict[str, bool]:
        return {
            "under_voltage": self.under_voltage,
            "freq_capped": self.freq_capped,
            "throttled": self.throttled,
            "soft_temp_limit": self.soft_temp_limit,
        }


@dataclass(frozen=True)
class Battery:
    percent: float | None
    status: str | None  # Charging, Discharging, Full, Not charging, Unknown
    voltage_v: float | None
    current_a: float | None


@dataclass(frozen=True)
class PowerSnapshot:
    """One reading of everything the board tells about heat and power."""

    ts: float
    cpu_temp_c: float | None
    cpu_freq_mhz: float | None
    throttled_now: ThrottleFlags | None
    throttled_since_boot: ThrottleFlags | None
    under_voltage_alarm: bool | None  # hwmon rpi_volt
    power_w: float | None  # a power monitor (ina2xx) or the Pi 5 PMIC rails
    voltage_v: float | None
    current_a: float | None
    battery: Battery | None
    load1: float | None
    mem_available_mb: float | None

    @property
    def under_voltage(self) -> bool:
        return bool((self.throttled_now and self.throttled_now.under_voltage) or self.under_voltage_alarm)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path, scale: float = 1.0) -> float | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return float(text) * scale
    except ValueError:
        return None


class Sensors:
    """Finds the board's sensors by name once, then reads them on demand."""

    def __init__(self, root: Path, use_vcgencmd: bool = True) -> None:
        self.root = root
        sys_class = root / "sys" / "class"
        self._temp = self._cpu_zone(sys_class / "thermal")
        self._freq = root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"
        # Pi 4: soc/soc:firmware; Pi 5: soc@107c000000/soc@107c000000:firmware (no recursive glob: sysfs loops)
        firmware = sorted((root / "sys/devices/platform").glob("*/*:firmware/get_throttled"))
        self._throttle = firmware[0] if firmware else None
        hwmon = {(_read(d / "name") or ""): d for d in sorted((sys_class / "hwmon").glob("hwmon*"))}
        self._rpi_volt = hwmon.get("rpi_volt")
        self._monitor = next((hwmon[n] for n in _POWER_MONITORS if n in hwmon), None)
        supplies = sorted((sys_class / "power_supply").glob("*"))
        self._battery = next((s for s in supplies if _read(s / "type") == "Battery"), None)
        self._vcgencmd = shutil.which("vcgencmd") if use_vcgencmd and root == Path("/") else None

    @staticmethod
    def _cpu_zone(thermal: Path) -> Path | None:
        zones = {(_read(z / "type") or ""): z for z in sorted(thermal.glob("thermal_zone*"))}
        for kind in _CPU_ZONES:
            if kind in zones:
                return zones[kind] / "temp"
        if not zones:
            return None
        return next(iter(zones.values())) / "temp"

    def found(self) -> dict[str, str | None]:
        """What was discovered, for `edged doctor` and the start-up log."""
        return {
            "cpu_temp": str(self._temp) if self._temp else None,
            "throttle": str(self._throttle) if self._throttle else None,
            "rpi_volt": str(self._rpi_volt) if self._rpi_volt else None,
            "power_monitor": str(self._monitor) if self._monitor else None,
            "battery": str(self._battery) if self._battery else None,
            "vcgencmd": self._vcgencmd,
        }

    def read(self) -> PowerSnapshot:
        now_bits = boot_bits = None
        text = _read(self._throttle) if self._throttle else None
        if text is not None:
            try:
                bits = int(text, 16)
                now_bits, boot_bits = ThrottleFlags.from_bits(bits), ThrottleFlags.from_bits(bits >> 16)
            except ValueError:
                pass
        alarm = _number(self._rpi_volt / "in0_lcrit_alarm") if self._rpi_volt else None
        power_w = voltage_v = current_a = None
        if self._monitor is not None:
            voltage_v = _number(self._monitor / "in1_input", 1e-3)
            current_a = _number(self._monitor / "curr1_input", 1e-3)
            power_w = _number(self._monitor / "power1_input", 1e-6)
            if power_w is None and voltage_v is not None and current_a is not None:
                power_w = voltage_v * current_a
        elif self._vcgencmd is not None:
            power_w = pmic_power_w(self._vcgencmd)
        return PowerSnapshot(
            ts=time.time(),
            cpu_temp_c=_number(self._temp, 1e-3) if self._temp else None,
            cpu_freq_mhz=_number(self._freq, 1e-3),
            throttled_now=now_bits,
            throttled_since_boot=boot_bits,
            under_voltage_alarm=None if alarm is None else alarm >= 1,
            power_w=power_w,
            voltage_v=voltage_v,
            current_a=current_a,
            battery=self._read_battery(),
            load1=self._load1(),
            mem_available_mb=self._mem_available_mb(),
        )

    def _read_battery(self) -> Battery | None:
        if self._battery is None:
            return None
        b = self._battery
        return Battery(
            percent=_number(b / "capacity"),
            status=_read(b / "status"),
            voltage_v=_number(b / "voltage_now", 1e-6),
            current_a=_number(b / "current_now", 1e-6),
        )

    def _load1(self) -> float | None:
        text = _read(self.root / "proc/loadavg")
        try:
            return float(text.split()[0]) if text else None
        except (ValueError, IndexError):
            return None

    def _mem_available_mb(self) -> float | None:
        text = _read(self.root / "proc/meminfo")
        match = re.search(r"^MemAvailable:\s+(\d+) kB", text or "", re.M)
        return round(int(match.group(1)) / 1024, 1) if match else None

    def cpu_busy_fraction(
        self, previous: tuple[float, float] | None
    ) -> tuple[float | None, tuple[float, float] | None]:
        """Share of CPU time spent busy since ``previous`` (from /proc/stat), and the new counters."""
        text = _read(self.root / "proc/stat")
        if not text or not text.startswith("cpu "):
            return None, None
        values = [float(v) for v in text.splitlines()[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        counters = (sum(values), idle)
        if previous is None or counters[0] <= previous[0]:
            return None, counters
        total, idle_delta = counters[0] - previous[0], counters[1] - previous[1]
        return max(0.0, min(1.0, 1 - idle_delta / total)), counters


def pmic_power_w(binary: str) -> float | None:
    """Raspberry Pi 5: the sum of volts x amps over the PMIC rails `vcgencmd pmic_read_adc` reports."""
    try:
        out = subprocess.run([binary, "pmic_read_adc"], capture_output=True, text=True, timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_pmic(out)


def parse_pmic(text: str) -> float | None:
    currents = dict(re.findall(r"^\s*(\S+)_A current\(\d+\)=([0-9.]+)A", text, re.M))
    volts = dict(re.findall(r"^\s*(\S+)_V volt\(\d+\)=([0-9.]+)V", text, re.M))
    rails = currents.keys() & volts.keys()
    return round(sum(float(currents[r]) * float(volts[r]) for r in rails), 3) if rails else None
