"""Devices that profiling targets: the declaration file, and how they appear in a Ray cluster.

A device is a node of the Ray cluster labelled `device=<name>` (`ray start --labels device=NAME`,
`ray.init(labels={"device": NAME})`); profiler actors are placed on it with a label selector. Boards
that joined before labels existed advertise the custom resource `device:<name>` instead, and still work:
when no node has the label but one has the resource, the actor asks for the resource.
`cluster/devices.yaml` says how to measure on each device: onnxruntime execution provider, intra-op
threads, batch size and the timing protocol. The built-in `local-cpu` device is this machine with
onnxruntime's CPU provider; `init_local_ray` labels the local node with it when raynas starts Ray itself.

This module imports neither torch nor the supernets: an edge board only needs ray, onnxruntime and yaml.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from raynas import config as c
from raynas.errors import UserError
from raynas.hw.precision import PRECISIONS, RUNTIME_PRECISIONS

LABEL_KEY = "device"  # the node label naming the device a node is: device=<name>
RESOURCE_PREFIX = "device:"  # the custom resource of boards that joined before labels: device:<name>
DEFAULT_DEVICE = "local-cpu"
# The name is the value of the node label device=<name>: Ray (like Kubernetes) allows these.
DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
MIN_RUNS = 50  # the measurement protocol of the project: never fewer timed runs than this
CLOCKS = ("wall", "thread")
# How a LUT's blocks are timed (raynas.hw.lut.build_lut): each in its own session, or inside whole subnets.
LUT_METHODS = ("isolated", "context")

# Energy meters raynas reads (raynas.hw.energy): Linux RAPL counters under /sys/class/powercap, a Jetson's
# INA3221 power rails in sysfs, an NVIDIA GPU's total-energy counter through NVML.
ENERGY_METERS = ("rapl", "ina3221", "nvml")

# runtime name in devices.yaml -> onnxruntime execution providers, preferred first. The first one must be
# available on the device node: silently falling back to CPU would measure the wrong hardware.
RUNTIME_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
}


class DeviceNotPresent(UserError):
    """No node of the Ray cluster is the requested device (no label device=<name>, no resource device:<name>)."""


@dataclass(frozen=True)
class MeasurementProtocol:
    """How one model is timed: time-based warm-up, then at least `runs` timed calls lasting together at
    least `min_run_s` (so a 50 µs block gets thousands of calls, not 2.5 ms of timing); median and IQR kept.

    A series whose IQR/median exceeds `max_rel_iqr` (a noisy moment on the machine) is measured again,
    up to `repeats` series in total, and the steadiest series (lowest IQR/median) is the result.

    `clock`: "wall" (elapsed time, what a dedicated device shows) or "thread" (CPU time of the calling
    thread). With onnxruntime's CPU provider and one intra-op thread the whole inference runs on the
    calling thread, so its CPU time is the latency the model would have on this CPU alone, without the
    time other processes of a shared host steal (a 2-core host at load 14 inflates wall medians 3-4x
    and their IQR to ~100%, while thread time stays within a few %). Only valid for that setting.

    `reference_runs`: drift-proofing (raynas.hw.measure.ReferenceClock). Around every model, this many
    timed calls of a fixed reference model measure how fast the device is at that moment (DVFS, thermal
    throttling, a neighbour on the shared cache), so each latency can be stated at one fixed reference
    speed; 0 turns it off (latencies are then taken as measured).
    """

    warmup_s: float = 0.2
    min_warmup_runs: int = 3
    runs: int = 50
    min_run_s: float = 0.0
    repeats: int = 3
    max_rel_iqr: float = 0.1
    clock: str = "wall"
    reference_runs: int = 20

    def validate(self, where: str = "protocol") -> MeasurementProtocol:
        c.number(self.warmup_s, f"{where}.warmup_s", 0, 60)
        c.integer(self.min_warmup_runs, f"{where}.min_warmup_runs", 0)
        c.integer(self.runs, f"{where}.runs", MIN_RUNS)
        c.number(self.min_run_s, f"{where}.min_run_s", 0, 600)
        c.integer(self.repeats, f"{where}.repeats", 1, 10)
        c.number(self.max_rel_iqr, f"{where}.max_rel_iqr", 0, low_open=True)
        c.choice(self.clock, f"{where}.clock", CLOCKS)
        c.integer(self.reference_runs, f"{where}.reference_runs", 0, 10_000)
        return self


@dataclass(frozen=True)
class EnergySpec:
    """How a device's energy is read: `meter` (one of ENERGY_METERS); `path` the sysfs root or file it reads
    ("" = the meter's standard place: /sys/class/powercap for rapl, the first INA3221 rail directory found
    for ina3221); `index` the INA3221 rail (from 0) or the NVML GPU; `idle_s` how long idle power is sampled
    before measuring, to subtract it (raynas.hw.energy)."""

    meter: str
    path: str = ""
    index: int = 0
    idle_s: float = 0.5

    def validate(self, where: str = "energy") -> EnergySpec:
        c.choice(self.meter, f"{where}.meter", ENERGY_METERS)
        if self.path:
            c.string(self.path, f"{where}.path")
        c.integer(self.index, f"{where}.index", 0)
        c.number(self.idle_s, f"{where}.idle_s", 0, 60)
        return self


ENERGY_KEYS = tuple(EnergySpec.__dataclass_fields__)


@dataclass(frozen=True)
class DeviceSpec:
    """One declared device. `label` is the node label of its node; `resource` the custom resource of
    boards that advertise the device the older way."""

    name: str
    runtime: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    description: str = ""
    protocol: MeasurementProtocol = field(default_factory=MeasurementProtocol)
    # The precisions the device runs (raynas.hw.precision); () = what its runtime runs natively.
    precisions: tuple[str, ...] = ()
    energy: EnergySpec | None = None  # None: the device has no energy meter

    @property
    def runs_precisions(self) -> tuple[str, ...]:
        return self.precisions or RUNTIME_PRECISIONS[self.runtime]

    def check_precision(self, precision: str, where: str = "precision") -> str:
        """`precision` if this device runs it; else one line naming the device and what it runs."""
        c.choice(precision, where, PRECISIONS)
        if precision not in self.runs_precisions:
            c.fail(where, f"device '{self.name}' does not run {precision!r}", list(self.runs_precisions))
        return precision

    @property
    def resource(self) -> str:
        return device_resource(self.name)

    @property
    def label(self) -> str:
        return f"{LABEL_KEY}={self.name}"

    @property
    def providers(self) -> list[str]:
        return list(RUNTIME_PROVIDERS[self.runtime])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        d["resource"] = self.resource
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceSpec:
        d = {k: v for k, v in d.items() if k not in ("label", "resource")}
        protocol = MeasurementProtocol(**d.pop("protocol", {}))
        energy = d.pop("energy", None)
        return cls(**{**d, "precisions": tuple(d.get("precisions", ()))}, protocol=protocol,
                   energy=EnergySpec(**energy) if energy else None)


# As declared in cluster/devices.yaml (see there why the thread clock allows this short protocol).
LOCAL_CPU = DeviceSpec(DEFAULT_DEVICE, description="this machine, onnxruntime CPU execution provider",
                       protocol=MeasurementProtocol(clock="thread", warmup_s=0.05, min_run_s=0.05))

DEVICE_KEYS = ("resource", "runtime", "threads", "batch_size", "description", "protocol", "precisions", "energy")
PROTOCOL_KEYS = tuple(MeasurementProtocol.__dataclass_fields__)


def device_resource(name: str) -> str:
    return f"{RESOURCE_PREFIX}{name}"


def device_label_selector(name: str) -> dict[str, str]:
    return {LABEL_KEY: name}


def default_devices_file() -> Path | None:
    """`$RAYNAS_DEVICES`, else `cluster/devices.yaml` of the checkout (or of the working directory)."""
    env = os.environ.get("RAYNAS_DEVICES")
    if env:
        return Path(env)
    for candidate in (Path.cwd() / "cluster" / "devices.yaml",
                      Path(__file__).resolve().parents[2] / "cluster" / "devices.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _protocol(cfg: Any, base: MeasurementProtocol, where: str) -> MeasurementProtocol:
    if cfg is None:
        return base
    cfg = c.mapping(cfg, where)
    c.check_known(cfg, PROTOCOL_KEYS, where)
    return replace(base, **cfg).validate(where)


def _energy(cfg: Any, where: str) -> EnergySpec | None:
    if cfg is None:
        return None
    cfg = c.mapping(cfg, where)
    c.check_known(cfg, ENERGY_KEYS, where)
    if "meter" not in cfg:
        c.fail(f"{where}.meter", "missing", list(ENERGY_METERS))
    return EnergySpec(**cfg).validate(where)


def _device(name: Any, spec: Any, base: MeasurementProtocol, where: str) -> DeviceSpec:
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        c.fail(where, f"got the name {name!r}", "a node label value: 1-63 letters, digits, '.', '_' or '-', "
               "starting and ending with a letter or digit")
    spec = c.mapping(spec or {}, where)
    c.check_known(spec, DEVICE_KEYS, where)
    if "resource" in spec:
        c.choice(spec["resource"], f"{where}.resource", [device_resource(name)])
    runtime = c.choice(spec.get("runtime", "cpu"), f"{where}.runtime", RUNTIME_PROVIDERS)
    device = DeviceSpec(
        name=name, runtime=runtime,
        threads=c.integer(spec.get("threads", 1), f"{where}.threads", 1),
        batch_size=c.integer(spec.get("batch_size", 1), f"{where}.batch_size", 1),
        description=c.string(spec["description"], f"{where}.description") if "description" in spec else "",
        protocol=_protocol(spec.get("protocol"), base, f"{where}.protocol"),
        precisions=c.names(spec["precisions"], f"{where}.precisions", RUNTIME_PRECISIONS[runtime])
        if "precisions" in spec else (),
        energy=_energy(spec.get("energy"), f"{where}.energy"),
    )
    if device.protocol.clock == "thread" and (device.runtime != "cpu" or device.threads != 1):
        c.fail(f"{where}.protocol.clock", f"'thread' with runtime {device.runtime!r} and threads {device.threads}",
               "'wall'; 'thread' measures only runtime 'cpu' with threads 1")
    return device


def parse_devices(cfg: Any, source: str = "devices.yaml") -> dict[str, DeviceSpec]:
    """Validate a parsed devices file: `{protocol: {...defaults}, devices: {name: {...}}}`; errors name
    the file and the field (`cluster/devices.yaml: devices.x.threads: ...`)."""
    cfg = c.mapping(cfg, source)
    for key in cfg:
        if key not in ("protocol", "devices"):
            c.fail(f"{source}: {key}", "unknown field", ["devices", "protocol"])
    base = _protocol(cfg.get("protocol"), MeasurementProtocol(), f"{source}: protocol")
    declared = cfg.get("devices")
    if not isinstance(declared, Mapping) or not declared:
        c.fail(f"{source}: devices", f"got {declared!r}", "a non-empty mapping of device name -> settings")
    return {name: _device(name, spec, base, f"{source}: devices.{name}") for name, spec in declared.items()}


def load_devices(path: str | Path | None = None) -> dict[str, DeviceSpec]:
    """The declared devices (from a local path or a URI); `local-cpu` is always there (declared or built in)."""
    path = path or default_devices_file()
    devices: dict[str, DeviceSpec] = {}
    if path is not None:
        devices = parse_devices(c.read_yaml(str(path), "devices file"), str(path))
    devices.setdefault(DEFAULT_DEVICE, LOCAL_CPU)
    return devices


def get_device(name: str, path: str | Path | None = None, where: str = "--device") -> DeviceSpec:
    """A declared device; `where` names the option or field that gave `name`."""
    devices = load_devices(path)
    if name not in devices:
        c.fail(where, f"unknown device {name!r}", f"a declared device: {sorted(devices)}")
    return devices[name]


# ---- Ray ------------------------------------------------------------------------------------------
def device_nodes() -> dict[str, dict[str, float]]:
    """Devices of the alive nodes of the connected Ray cluster: name -> {"label": nodes labelled
    device=<name>, "resource": units of the resource device:<name>} (absent keys are 0)."""
    import ray

    found: dict[str, dict[str, float]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        name = (node.get("Labels") or {}).get(LABEL_KEY)
        if name:
            entry = found.setdefault(name, {"label": 0, "resource": 0.0})
            entry["label"] += 1
        for key, units in (node.get("Resources") or {}).items():
            if key.startswith(RESOURCE_PREFIX) and units > 0:
                entry = found.setdefault(key[len(RESOURCE_PREFIX):], {"label": 0, "resource": 0.0})
                entry["resource"] += units
    return dict(sorted(found.items()))


def labelled_nodes(name: str) -> list[str]:
    """Ids of the alive nodes labelled device=<name> (the boards of that kind), sorted."""
    import ray

    return sorted(node["NodeID"] for node in ray.nodes()
                  if node.get("Alive") and (node.get("Labels") or {}).get(LABEL_KEY) == name)


def devices_present() -> dict[str, float]:
    """Devices of the connected Ray cluster, by label or by resource: name -> labelled nodes + resource units."""
    return {name: entry["label"] + entry["resource"] for name, entry in device_nodes().items()}


def placement_options(name: str, nodes: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Ray `.options(...)` that place an actor on the device's node: the label selector when some node has
    the label, else the resource (a board that advertises only `device:<name>`); {} when neither exists."""
    entry = (device_nodes() if nodes is None else nodes).get(name)
    if not entry:
        return {}
    if entry["label"]:
        return {"label_selector": device_label_selector(name)}
    return {"resources": {device_resource(name): 1}}


def ensure_device_present(name: str, wait_s: float = 2.0) -> dict[str, Any]:
    """The placement options of device `name` (see `placement_options`); fails fast, never hangs on an
    unschedulable actor, when no node is that device.

    Waits up to `wait_s` because a node that has just joined takes a moment to show its labels and resources.
    """
    deadline = time.monotonic() + wait_s
    while True:
        nodes = device_nodes()
        options = placement_options(name, nodes)
        if options:
            return options
        if time.monotonic() >= deadline:
            raise DeviceNotPresent(
                f"device '{name}': no node of the Ray cluster is labelled {LABEL_KEY}={name} (or advertises "
                f"resource '{device_resource(name)}'); devices present: {sorted(nodes) or 'none'} (join one with "
                f"cluster/join_edge_worker.sh HEAD_ADDRESS {name}, i.e. `ray start --labels {LABEL_KEY}={name}`)")
        time.sleep(0.2)


def init_local_ray(devices: Iterable[str] = (DEFAULT_DEVICE,), address: str | None = None,
                   num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Connect to the Ray cluster raynas should use; returns True when this call started Ray.

    * already initialised: left alone.
    * `address` given or `RAY_ADDRESS` set (e.g. under `ray job submit`): connect; the nodes already say
      which device they are (`ray start --labels device=NAME`).
    * otherwise: start a fresh local Ray (address="local", never some other session's cluster) whose node
      is labelled `device=<first of devices>` (normally `local-cpu`). A node has one value per label, so
      further names are advertised as `device:<name>` resources, the form older boards use.
    """
    import ray

    if ray.is_initialized():
        return False
    # The dashboard serves the State API, through which Ray Train watches its controller; without it
    # Train's placement-group cleaner logs a warning every second of a training run.
    kwargs.setdefault("include_dashboard", True)
    kwargs.setdefault("log_to_driver", False)
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise UserError(
                f"--address {address or os.environ['RAY_ADDRESS']}: cannot connect to the Ray cluster ({exc}); "
                "is it running? With token authentication set RAY_AUTH_MODE=token and the head's token "
                "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
        return True
    names = list(dict.fromkeys(devices))
    labels = {**kwargs.pop("labels", {}), **({LABEL_KEY: names[0]} if names else {})}
    resources = {**kwargs.pop("resources", {}), **{device_resource(d): 1 for d in names[1:]}}
    ray.init(address="local", num_cpus=num_cpus, labels=labels, resources=resources or None, **kwargs)
    return True
