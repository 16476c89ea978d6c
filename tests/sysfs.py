"""Real file trees shaped like a board's /sys and /proc, for the sensor and governor tests."""

from __future__ import annotations

from pathlib import Path


def put(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def common(root: Path) -> None:
    put(root, "proc/loadavg", "0.52 0.41 0.30 1/123 4567")
    put(root, "proc/meminfo", "MemTotal:        3884432 kB\nMemFree:          912340 kB\nMemAvailable:    2654208 kB")
    put(root, "proc/stat", "cpu  1000 0 500 8000 100 0 0 0 0 0\ncpu0 250 0 125 2000 25 0 0 0 0 0")


def pi4(root: Path, temp_mc: int = 48_312, throttled: str = "0x50005") -> Path:
    """A Raspberry Pi 4 B: cpu-thermal zone, cpufreq, firmware throttle mask, rpi_volt hwmon."""
    common(root)
    put(root, "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\0")
    put(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    put(root, "sys/class/thermal/thermal_zone0/temp", str(temp_mc))
    put(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "1500000")
    put(root, "sys/devices/platform/soc/soc:firmware/get_throttled", throttled)
    put(root, "sys/class/hwmon/hwmon0/name", "rpi_volt")
    put(root, "sys/class/hwmon/hwmon0/in0_lcrit_alarm", "0")
    return root / "sys/class/thermal/thermal_zone0/temp"


def pi5(root: Path) -> None:
    """A Raspberry Pi 5: the fan's and the RP1 ADC's hwmons come first; the CPU zone is not zone0."""
    common(root)
    put(root, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\0")
    put(root, "sys/class/thermal/thermal_zone0/type", "rp1_adc")
    put(root, "sys/class/thermal/thermal_zone0/temp", "39000")
    put(root, "sys/class/thermal/thermal_zone1/type", "cpu-thermal")
    put(root, "sys/class/thermal/thermal_zone1/temp", "61850")
    put(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "2400000")
    put(root, "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled", "0x0")
    put(root, "sys/class/hwmon/hwmon0/name", "rp1_adc")
    put(root, "sys/class/hwmon/hwmon1/name", "pwmfan")
    put(root, "sys/class/hwmon/hwmon2/name", "rpi_volt")
    put(root, "sys/class/hwmon/hwmon2/in0_lcrit_alarm", "1")


def ina219_battery(root: Path, power_uw: int = 4_200_000, capacity: int = 76, status: str = "Discharging") -> None:
    """A board with an INA219 power monitor (hwmon3, not hwmon0) and a battery; no thermal zones."""
    common(root)
    put(root, "sys/class/hwmon/hwmon1/name", "acpitz")
    put(root, "sys/class/hwmon/hwmon3/name", "ina219")
    put(root, "sys/class/hwmon/hwmon3/in1_input", "5080")
    put(root, "sys/class/hwmon/hwmon3/curr1_input", "826")
    put(root, "sys/class/hwmon/hwmon3/power1_input", str(power_uw))
    put(root, "sys/class/power_supply/AC/type", "Mains")
    put(root, "sys/class/power_supply/BAT0/type", "Battery")
    put(root, "sys/class/power_supply/BAT0/capacity", str(capacity))
    put(root, "sys/class/power_supply/BAT0/status", status)
    put(root, "sys/class/power_supply/BAT0/voltage_now", "7400000")
    put(root, "sys/class/power_supply/BAT0/current_now", "-560000")
