"""Energy meters of devices, and energy per inference over a timed window.

A device declares its meter in devices.yaml (`energy: {meter, path, index, idle_s}`, raynas.hw.devices.EnergySpec);
the profiler on the device's node reads it around the very calls whose latency it times
(raynas.hw.measure.time_session), so latency and energy describe the same window:

    energy per inference (mJ) = (energy over the window - idle power x window length) / calls

Idle power is the device at rest, sampled for `idle_s` before the first measurement (and again when the
value is older than IDLE_MAX_AGE_S), so what is left is what the inferences cost above idle. The result is
reported as measured, not clamped at 0: a model much cheaper than the meter's noise can read slightly
negative, which says "not resolvable on this meter" more honestly than a 0 would.

Meters:

* rapl: Linux RAPL counters, `<path>/intel-rapl:N/energy_uj` (default path /sys/class/powercap). Only the
  top-level `package-N` domains are summed: their subzones (core, uncore, dram: `intel-rapl:N:M`, which
  /sys/class/powercap also lists at its top level) and a `psys` domain (the platform, which contains the
  packages) would count the same joules twice. `path` naming one domain's directory reads that domain
  alone. A counter wraps at `max_energy_range_uj`; a window sees at most one wrap per domain (hundreds of
  kJ, minutes at full load), which adds max_energy_range_uj + 1. Since Linux 5.10 energy_uj is readable by
  root only (CVE-2020-8694): run the device node as root, or make the files readable. A package's counter
  holds everything the package ran, other processes' work too: measure energy on a quiet host.
* ina3221: a Jetson's INA3221 power monitor in sysfs; `path` is the directory of the rail files, `index`
  the rail (channel, counted from 0). Two layouts, the one found in `path` is used:
  L4T r32 and older (NVIDIA's ina3221x IIO driver, e.g. /sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0):
  `in_power<index>_input` in mW, named by `rail_name_<index>`;
  L4T r34 and newer (the mainline hwmon driver, e.g. /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1):
  bus voltage `in<index+1>_input` (mV) times current `curr<index+1>_input` (mA), named by `in<index+1>_label`.
  Default path: the first such directory found. Channel 0 is the module's input (VDD_IN, POM_5V_IN) on
  Nano, TX1, Xavier NX and TX2 NX; other channels are parts of it, so one rail is read, never a sum.
  The rail is sampled every SAMPLE_PERIOD_S by a background thread during the window and integrated with
  the trapezoid rule.
* nvml: an NVIDIA GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ, Volta and newer)
  of GPU `index`, through pynvml (`pip install nvidia-ml-py` on the device node).

Each meter has a shortest useful window (`min_window_s`: its counters move in steps, RAPL's about every
millisecond, NVML's far more slowly); a measurement with a meter times at least that long.

This module needs neither torch nor onnxruntime: it runs on the device node.
"""

from __future__ import annotations

import glob
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raynas import config as c
from raynas.hw.devices import ENERGY_METERS, DeviceSpec, EnergySpec

RAPL_ROOT = "/sys/class/powercap"
RAPL_DOMAIN = re.compile(r"intel-rapl:\d+")  # top-level domains only; subzones are intel-rapl:N:M
# Where the INA3221 rails are, by driver: L4T r32 (ina3221x, IIO) and L4T r34+ (mainline ina3221, hwmon).
INA3221_DIRS = ("/sys/bus/i2c/drivers/ina3221x/*/iio:device*", "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")
SAMPLE_PERIOD_S = 0.005  # how often a power meter's rail is read during a window
IDLE_MAX_AGE_S = 300.0  # idle power older than this is measured again (the board warms up, its fans change)


@dataclass
class Window:
    """The energy (mJ) a meter counted over a window of `seconds`; filled when the window closes."""

    mj: float = math.nan
    seconds: float = math.nan

    def per_call(self, calls: int, idle_w: float) -> float:
        """Energy per call above idle (mJ): (window energy - idle power x window length) / calls."""
        return (self.mj - idle_w * self.seconds * 1000.0) / calls


class EnergyMeter(ABC):
    """One device's meter: `start()` opens a window, `stop()` returns the energy (mJ) counted since."""

    min_window_s: float = 0.0  # the shortest window whose energy the meter resolves

    def __init__(self, device: str, spec: EnergySpec):
        self.device = device
        self.spec = spec
        self.where = f"devices.{device}.energy"
        self._idle: tuple[float, float] | None = None  # (when, watts)

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> float: ...

    @contextmanager
    def window(self) -> Iterator[Window]:
        """`with meter.window() as w: ...`; afterwards `w.mj` and `w.seconds` hold what was measured."""
        measured = Window()
        # The clock starts before the meter's first reading and stops after its last, so the window's length
        # spans what was counted (a power meter's first sample is taken before its sampler thread starts).
        t0 = time.perf_counter()
        self.start()
        try:
            yield measured
        finally:
            mj = self.stop()
            measured.seconds = time.perf_counter() - t0
            measured.mj = mj

    def measure_idle(self) -> float:
        """The device's power at rest (W), over `idle_s` of doing nothing (at least `min_window_s`); 0 when
        idle_s is 0 (no idle subtraction)."""
        if self.spec.idle_s == 0:
            return 0.0
        with self.window() as idle:
            time.sleep(max(self.spec.idle_s, self.min_window_s))
        return idle.mj / idle.seconds / 1000.0

    def idle_w(self) -> float:
        """Idle power (W): measured on first use, and again once older than IDLE_MAX_AGE_S."""
        if self._idle is None or time.monotonic() - self._idle[0] > IDLE_MAX_AGE_S:
            self._idle = (time.monotonic(), self.measure_idle())
        return self._idle[1]


class CounterMeter(EnergyMeter):
    """A meter whose hardware keeps cumulative energy counters: a window is the difference of two reads."""

    unit_mj: float = 1.0  # mJ per counter unit

    def __init__(self, device: str, spec: EnergySpec):
        super().__init__(device, spec)
        self._start: list[int] | None = None

    @abstractmethod
    def counters(self) -> list[int]:
        """Every counter's value now, in the meter's unit."""

    @abstractmethod
    def wraps(self) -> list[int | None]:
        """Per counter, the value at which it wraps to 0 (its maximum + 1); None for one that never wraps."""

    def start(self) -> None:
        self._start = self.counters()

    def stop(self) -> float:
        end = self.counters()
        total = 0
        for before, after, wrap in zip(self._start, end, self.wraps()):
            delta = after - before
            if delta < 0 and wrap is not None:  # wrapped once meanwhile
                delta += wrap
            total += delta
        self._start = None
        return total * self.unit_mj


class PowerMeter(EnergyMeter):
    """A meter that reads instantaneous power: a background thread samples it during the window and the
    samples are integrated (trapezoid rule)."""

    def __init__(self, device: str, spec: EnergySpec):
        super().__init__(device, spec)
        self._samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def power_w(self) -> float:
        """The power now (W)."""

    def _sample(self) -> None:
        self._samples.append((time.perf_counter(), self.power_w()))

    def _run(self) -> None:
        while not self._halt.wait(SAMPLE_PERIOD_S):
            self._sample()

    def start(self) -> None:
        self._samples = []
        self._halt.clear()
        self._sample()  # the window's first instant
        self._thread = threading.Thread(target=self._run, name=f"energy-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._halt.set()
        self._thread.join()
        self._thread = None
        self._sample()  # the window's last instant
        t, w = np.array(self._samples).T
        return float(np.trapezoid(w, t)) * 1000.0


def _read_int(path: Path, where: str) -> int:
    """An integer sysfs file, or one line saying why it cannot be read."""
    try:
        return int(path.read_text().strip())
    except PermissionError:
        c.fail(f"{where}.path", f"{path} is not readable by this process (permission denied)",
               "a readable file: run the device node as root, or `sudo chmod a+r` it (RAPL's energy_uj is "
               "root-only since Linux 5.10)")
    except (OSError, ValueError) as exc:
        c.fail(f"{where}.path", f"cannot read a number from {path} ({type(exc).__name__}: {exc})",
               "the sysfs file of the declared meter")


class RaplMeter(CounterMeter):
    """Linux RAPL package counters (see the module docstring)."""

    unit_mj = 1e-3  # energy_uj counts microjoules
    min_window_s = 0.1  # the counters advance about every millisecond

    def __init__(self, device: str, spec: EnergySpec):
        super().__init__(device, spec)
        root = Path(spec.path or RAPL_ROOT)
        if (root / "energy_uj").is_file():
            self.domains = [root]
        else:
            self.domains = sorted((d for d in root.glob("intel-rapl:*") if RAPL_DOMAIN.fullmatch(d.name)
                                   and (d / "name").is_file()
                                   and (d / "name").read_text().strip().startswith("package")),
                                  key=lambda d: int(d.name.split(":")[1]))
        if not self.domains:
            c.fail(f"{self.where}.path", f"no RAPL package domain (intel-rapl:N named package-N, with energy_uj) "
                   f"under {root}", f"the powercap root of a Linux host with RAPL ({RAPL_ROOT}; Intel, or AMD "
                   "Zen on Linux >= 5.8), or one domain's directory")
        self._wraps: list[int | None] = [_read_int(d / "max_energy_range_uj", self.where) + 1 for d in self.domains]
        self.counters()  # unreadable counters fail here, not in the middle of a measurement

    def counters(self) -> list[int]:
        return [_read_int(d / "energy_uj", self.where) for d in self.domains]

    def wraps(self) -> list[int | None]:
        return self._wraps


class Ina3221Meter(PowerMeter):
    """One INA3221 rail of a Jetson, sampled (see the module docstring for the two sysfs layouts)."""

    min_window_s = 0.2  # tens of samples at SAMPLE_PERIOD_S, several conversions of the monitor

    def __init__(self, device: str, spec: EnergySpec):
        super().__init__(device, spec)
        found = [p for pattern in INA3221_DIRS for p in sorted(glob.glob(pattern))]
        if not spec.path and not found:
            c.fail(f"{self.where}.path", "no INA3221 power monitor found on this node "
                   f"(looked for {' and '.join(INA3221_DIRS)})", "the directory of the rail files")
        directory = Path(spec.path or found[0])
        channel = spec.index
        iio = directory / f"in_power{channel}_input"
        hwmon = [directory / f"in{channel + 1}_input", directory / f"curr{channel + 1}_input"]
        if iio.is_file():  # L4T r32 ina3221x: power in mW
            self.files, self.scale, label = [iio], 1e-3, directory / f"rail_name_{channel}"
        elif all(f.is_file() for f in hwmon):  # mainline hwmon: mV x mA
            self.files, self.scale, label = hwmon, 1e-6, directory / f"in{channel + 1}_label"
        else:
            c.fail(f"{self.where}.path", f"{directory} has no INA3221 rail {channel} (neither {iio.name} nor "
                   f"{hwmon[0].name} with {hwmon[1].name})", "the iio:deviceN directory of L4T r32's ina3221x "
                   "driver or the hwmon directory of the ina3221 driver, and `index` a rail there (from 0)")
        self.rail = label.read_text().strip() if label.is_file() else f"channel {channel}"
        self.power_w()

    def power_w(self) -> float:
        return math.prod(_read_int(f, self.where) for f in self.files) * self.scale


class NvmlMeter(CounterMeter):
    """An NVIDIA GPU's total-energy counter (mJ since the driver loaded) through NVML."""

    unit_mj = 1.0
    # The GPU updates the counter far less often than RAPL (tens of milliseconds apart, by its power
    # sampling): a window of a second holds enough updates for a per-call figure.
    min_window_s = 1.0

    def __init__(self, device: str, spec: EnergySpec):
        super().__init__(device, spec)
        try:
            import pynvml
        except ImportError:
            c.fail(f"{self.where}.meter", "'nvml' reads the GPU through the pynvml module, which is not installed "
                   "on this node", "`pip install nvidia-ml-py` on the device node, or another meter "
                   f"({', '.join(m for m in ENERGY_METERS if m != 'nvml')})")
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if spec.index >= count:
                c.fail(f"{self.where}.index", f"GPU {spec.index} does not exist on this node",
                       f"0..{count - 1}")
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(spec.index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            self.counters()
        except pynvml.NVMLError as exc:
            c.fail(f"{self.where}.meter", f"NVML cannot read GPU {spec.index}'s total energy ({exc})",
                   "an NVIDIA driver on this node and a GPU of the Volta generation or newer")

    def counters(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))]

    def wraps(self) -> list[int | None]:
        return [None]  # 64 bits of millijoules


METERS: dict[str, type[EnergyMeter]] = {"rapl": RaplMeter, "ina3221": Ina3221Meter, "nvml": NvmlMeter}
# One meter per device per process: the profiler actor keeps its idle power (and NVML its handle).
_METERS: dict[tuple[str, EnergySpec], EnergyMeter] = {}


def require_energy(device: DeviceSpec) -> EnergySpec:
    """The meter the device declares; one line naming the device and the meters raynas knows when it declares
    none. Reads nothing: a driver checks a search's energy objective with it before any board is reached."""
    if device.energy is None:
        c.fail(f"devices.{device.name}.energy", f"device '{device.name}' has no energy meter, so its energy "
               "cannot be measured", f"declare one in devices.yaml, `energy: {{meter: M}}` with M one of "
               f"{', '.join(ENERGY_METERS)} (Linux RAPL, a Jetson's INA3221 rails, an NVIDIA GPU through NVML)")
    return device.energy


def meter_for(device: DeviceSpec) -> EnergyMeter:
    """The energy meter the device declares, created once per process on the node that measures (it reads
    that node's sysfs or GPU); the `require_energy` error when it declares none."""
    spec = require_energy(device)
    key = (device.name, spec)
    if key not in _METERS:
        _METERS[key] = METERS[spec.meter](device.name, spec)
    return _METERS[key]


def energy_meter(device: DeviceSpec) -> EnergyMeter | None:
    """The device's meter, or None when it declares none (energy is then not measured)."""
    return meter_for(device) if device.energy is not None else None
