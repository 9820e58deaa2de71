"""Energy meters on real sysfs-format files the tests write: RAPL counters (package domains only, with
wrap-around), a Jetson's INA3221 rails in both driver layouts, energy per inference over the timed window of
a real onnxruntime measurement with idle power subtracted, and the errors for a device without a meter and
for NVML without pynvml."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from raynas.errors import UserError
from raynas.hw.devices import LOCAL_CPU, EnergySpec, MeasurementProtocol
from raynas.hw.energy import Ina3221Meter, NvmlMeter, RaplMeter, meter_for, require_energy
from raynas.hw.measure import REFERENCE_SHAPE, identity_onnx, measure_onnx, reference_onnx

FAST = MeasurementProtocol(warmup_s=0.02, min_warmup_runs=2, runs=50, repeats=1, reference_runs=0)


def write(path: Path, value) -> None:
    """Replace a sysfs-like file atomically, as the kernel's files never read half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def rapl_domain(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    domain = root / name
    write(domain / "name", label)
    write(domain / "energy_uj", energy_uj)
    write(domain / "max_energy_range_uj", max_uj)
    return domain


def rapl_tree(root: Path, max_uj: int = 1_000_000) -> dict[str, Path]:
    """/sys/class/powercap as Linux lays it out: packages, their subzones both nested and listed at the
    top level, and a psys (platform) domain that contains the packages."""
    domains = {
        "pkg0": rapl_domain(root, "intel-rapl:0", "package-0", 990_000, max_uj),
        "pkg1": rapl_domain(root, "intel-rapl:1", "package-1", 10_000, max_uj),
        "core": rapl_domain(root, "intel-rapl:0:0", "core", 0, max_uj),
        "dram": rapl_domain(root / "intel-rapl:0", "intel-rapl:0:1", "dram", 0, max_uj),
        "psys": rapl_domain(root, "intel-rapl:2", "psys", 0, max_uj),
    }
    write(root / "intel-rapl" / "enabled", 1)  # the control type's own directory, no counter
    return domains


def test_rapl_sums_packages_once_and_handles_wrap_around(tmp_path):
    d = rapl_tree(tmp_path)
    meter = RaplMeter("box", EnergySpec("rapl", path=str(tmp_path)))
    assert [p.name for p in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]
    meter.start()
    write(d["pkg0"] / "energy_uj", 40_000)    # wrapped: 990_000 -> 1_000_000 (max) -> 0 -> 40_000 = 50_001 uJ
    write(d["pkg1"] / "energy_uj", 30_000)    # 20_000 uJ
    for sub in ("core", "dram", "psys"):      # inside the packages: counting them would double the figure
        write(d[sub] / "energy_uj", 500_000)
    assert meter.stop() == pytest.approx(70.001)  # mJ

    # A path naming one domain reads that domain alone (here the psys one).
    psys = RaplMeter("box", EnergySpec("rapl", path=str(d["psys"])))
    psys.start()
    write(d["psys"] / "energy_uj", 512_345)
    assert psys.stop() == pytest.approx(12.345)


def test_rapl_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match=r"^devices\.box\.energy\.path: no RAPL package domain .* under "
                                        + str(tmp_path) + "; allowed: "):
        RaplMeter("box", EnergySpec("rapl", path=str(tmp_path)))
    rapl_domain(tmp_path, "intel-rapl:0", "package-0", 12, 100)
    write(tmp_path / "intel-rapl:0" / "energy_uj", "garbage")
    with pytest.raises(UserError, match=r"^devices\.box\.energy\.path: cannot read a number from .*energy_uj"):
        RaplMeter("box", EnergySpec("rapl", path=str(tmp_path)))


class RaplCounter:
    """A thread that advances package-0's energy_uj at `rate_w` (and a subzone at 100 W, which must not
    count), wrapping at max_energy_range_uj as the hardware does."""

    def __init__(self, root: Path, max_uj: int, start_uj: int):
        self.pkg = rapl_domain(root, "intel-rapl:0", "package-0", start_uj, max_uj) / "energy_uj"
        self.core = rapl_domain(root, "intel-rapl:0:0", "core", 0, max_uj) / "energy_uj"
        self.max_uj, self.uj, self.core_uj = max_uj, float(start_uj), 0.0
        self.rate_w = 0.0
        self.wraps = 0
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        last = time.perf_counter()
        while not self.halt.wait(0.001):
            now = time.perf_counter()
            self.uj += self.rate_w * (now - last) * 1e6
            self.core_uj += 100.0 * (now - last) * 1e6
            last = now
            if self.uj > self.max_uj:
                self.uj -= self.max_uj + 1
                self.wraps += 1
            write(self.pkg, int(self.uj))
            write(self.core, int(self.core_uj) % (self.max_uj + 1))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.thread.join()


def test_energy_per_inference_over_the_timed_window(tmp_path):
    """A real model timed on a device whose RAPL root is written by a thread drawing 4 W at rest and 12 W
    while the model runs: energy per call = (12 - 4) W x window / calls, through a wrap of the counter.

    The tolerances allow for the writer thread falling behind on a loaded host (a 2-core VM at load 10 stalls
    it for tens of ms): the 2 s window keeps such a lag to a few % of the figure. Forgetting the idle power
    would read 50% high, a missed wrap 100 J high."""
    idle_w, busy_w = 4.0, 12.0
    device = replace(LOCAL_CPU, name="rapl-box", protocol=replace(FAST, min_run_s=2.0),
                     energy=EnergySpec("rapl", path=str(tmp_path), idle_s=1.0))
    # A 30 J range: one timed window (~24 J) fits, and the counter (starting at 20 J) wraps inside it.
    with RaplCounter(tmp_path, max_uj=30_000_000, start_uj=20_000_000) as counter:
        meter = meter_for(device)  # the device's meter in this process, which measure_onnx uses too
        counter.rate_w = idle_w
        assert meter.idle_w() == pytest.approx(idle_w, rel=0.1)
        counter.rate_w = busy_w
        timing = measure_onnx(reference_onnx(), REFERENCE_SHAPE, device)
    assert counter.wraps == 1
    assert timing.idle_w == meter.idle_w()  # measured once, before the device was busy
    assert timing.energy_window_s >= 2.0  # the protocol's min_run_s: the window the latency was timed over
    expected_mj = (busy_w - timing.idle_w) * timing.energy_window_s * 1000.0 / timing.runs
    assert timing.energy_mj == pytest.approx(expected_mj, rel=0.15)
    # The same device without a meter measures latency alone, as before.
    plain = measure_onnx(identity_onnx((1, 4, 8, 8)), (1, 4, 8, 8), replace(device, energy=None))
    assert (plain.energy_mj, plain.idle_w, plain.energy_window_s) == (None, None, None)


def _window(meter, step=None) -> tuple[float, float]:
    """The Window (energy, length) of a 0.6 s window; `step` = (file, value) written halfway, returning also
    the time of the write."""
    with meter.window() as w:
        time.sleep(0.3)
        t_step = time.perf_counter()
        if step is not None:
            write(*step)
        time.sleep(0.3)
    return w, t_step


def test_ina3221_l4t_r32_rail_integrated(tmp_path):
    """L4T r32's ina3221x IIO layout: in_power<N>_input in mW; a constant power, then a step."""
    iio = tmp_path / "6-0040" / "iio:device0"
    for n, (rail, mw) in enumerate([("POM_5V_IN", 5000), ("POM_5V_GPU", 1500), ("POM_5V_CPU", 900)]):
        write(iio / f"rail_name_{n}", rail)
        write(iio / f"in_power{n}_input", mw)
    meter = Ina3221Meter("nano", EnergySpec("ina3221", path=str(iio)))
    assert meter.rail == "POM_5V_IN"
    w, _ = _window(meter)
    assert w.mj == pytest.approx(5.0 * w.seconds * 1000.0, rel=0.01)
    t0 = time.perf_counter()
    w, t_step = _window(meter, (iio / "in_power0_input", 2000))  # 5 W, then 2 W
    before = t_step - t0
    assert w.mj == pytest.approx((5.0 * before + 2.0 * (w.seconds - before)) * 1000.0, rel=0.1)
    # The GPU rail on its own.
    gpu = Ina3221Meter("nano", EnergySpec("ina3221", path=str(iio), index=1))
    w, _ = _window(gpu)
    assert (gpu.rail, w.mj) == ("POM_5V_GPU", pytest.approx(1.5 * w.seconds * 1000.0, rel=0.01))


def test_ina3221_hwmon_rail_is_volts_times_amps(tmp_path):
    """The mainline hwmon layout (L4T r34+): in<N>_input mV times curr<N>_input mA, channels from 1."""
    hwmon = tmp_path / "1-0040" / "hwmon" / "hwmon3"
    write(hwmon / "in1_label", "VDD_IN")
    write(hwmon / "in1_input", 5000)
    write(hwmon / "curr1_input", 1200)
    meter = Ina3221Meter("orin", EnergySpec("ina3221", path=str(hwmon)))
    assert meter.rail == "VDD_IN" and meter.power_w() == pytest.approx(6.0)
    t0 = time.perf_counter()
    w, t_step = _window(meter, (hwmon / "curr1_input", 400))  # 6 W, then 2 W
    before = t_step - t0
    assert w.mj == pytest.approx((6.0 * before + 2.0 * (w.seconds - before)) * 1000.0, rel=0.1)
    with pytest.raises(UserError, match=r"^devices\.orin\.energy\.path: .* has no INA3221 rail 1 \(neither "
                                        r"in_power1_input nor in2_input with curr2_input\); allowed: "):
        Ina3221Meter("orin", EnergySpec("ina3221", path=str(hwmon), index=1))


def test_energy_on_a_device_without_meter_is_one_line():
    with pytest.raises(UserError) as checked:
        require_energy(LOCAL_CPU)
    with pytest.raises(UserError) as err:
        meter_for(LOCAL_CPU)
    assert str(err.value) == str(checked.value) == (
        "devices.local-cpu.energy: device 'local-cpu' has no energy meter, so its energy cannot be measured; "
        "allowed: declare one in devices.yaml, `energy: {meter: M}` with M one of rapl, ina3221, nvml "
        "(Linux RAPL, a Jetson's INA3221 rails, an NVIDIA GPU through NVML)")


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_nvml_without_pynvml_says_what_to_install():
    with pytest.raises(UserError) as err:
        NvmlMeter("gpu", EnergySpec("nvml"))
    assert str(err.value) == (
        "devices.gpu.energy.meter: 'nvml' reads the GPU through the pynvml module, which is not installed on this "
        "node; allowed: `pip install nvidia-ml-py` on the device node, or another meter (rapl, ina3221)")
