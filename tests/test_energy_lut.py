"""Energy beside latency: LUT rows, calibration and validation records, the energy model, and `energy_mj` as a
search objective and constraint. A small MobileNetV3 space (64 px) on a real local Ray whose profiler actor reads
a RAPL tree the test writes: package-0's `energy_uj` counts as a CPU package would, IDLE_W all the time plus
BUSY_W for every second of CPU the actor's process runs (its threads' run time from /proc/<pid>/task/*/schedstat,
in ns), computed when read (see WRITER). Energy above idle is then BUSY_W x the CPU time of the calls, which on the
thread clock of local-cpu is what latency measures: energy per inference = BUSY_W x latency."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_energy import rapl_domain
from test_hw import TINY_SPACE
from test_hw_precision import QUICK

from raynas.errors import UserError
from raynas.hw.devices import get_device
from raynas.hw.energy_model import load_energy_model
from raynas.hw.latency import LutLatencyModel, calibration_path, load_calibration, save_calibration
from raynas.hw.lut import (
    META_KEY,
    TABLE_COLUMNS,
    TableKey,
    build_lut,
    collect_block_configs,
    read_lut,
    subnet_onnx,
    write_lut,
)
from raynas.hw.profiling import calibrate, validate
from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
from raynas.search.config import validate_search_config
from raynas.search.driver import estimate_fn, run_search
from raynas.search.pareto import pareto_front
from raynas.search.results import ResultStore
from raynas.space import Arch, load_space
from raynas.supernets import build_supernet

IDLE_W, BUSY_W = 1.0, 10.0
# TINY_SPACE with wider blocks (tens of µs each rather than a few): a block's energy then stands well above what
# the counter's 2 ms steps leave unresolved over a window
SPACE = {**TINY_SPACE, "name": "tiny-mbv3-wide", "resolution": 64, "resolution_choices": [64],
         "stem": {**TINY_SPACE["stem"], "channels": 16}, "first_block": {**TINY_SPACE["first_block"], "channels": 16},
         "stages": [{**TINY_SPACE["stages"][0], "channels": 48}]}
PROTOCOL = replace(QUICK, min_run_s=0.3)  # windows of 0.3 s at least


# package-0's energy_uj is a named pipe, computed when read as sysfs files are: the writer, a process of its own,
# blocks until the meter opens the file and then answers with the energy drawn up to that moment. The meter's
# process is waiting on the read meanwhile, so the CPU time the answer counts is exactly the process's at the
# read, however late the writer is scheduled on a busy host (a file rewritten every few ms instead would be
# stale by the writer's lag, tens of ms at times, which is a large part of a block's energy).
WRITER = """
import glob, os, signal, sys, time
counter, pid, idle_w, busy_w = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
signal.alarm(600)  # never outlives a test run that died without killing it (it waits in open() otherwise)

def cpu_s():
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(open(path).read().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            pass
    return total / 1e9

counter = os.path.realpath(counter)
os.remove(counter)
os.mkfifo(counter)
uj, last, last_cpu = 0.0, time.perf_counter(), cpu_s()
while True:
    f = open(counter, "w")  # returns once the meter opens the file to read it
    # The next read finds a fresh pipe: reopened, this one would hand the reader still on it the next value too.
    os.mkfifo(counter + ".next")
    os.replace(counter + ".next", counter)
    now, cpu = time.perf_counter(), cpu_s()
    # a thread that ended takes its run time out of the sum: nothing is drawn backwards
    uj += (idle_w * (now - last) + busy_w * max(cpu - last_cpu, 0.0)) * 1e6
    last, last_cpu = now, cpu
    try:
        f.write(f"{int(uj)}\\n")
        f.close()
    except BrokenPipeError:
        pass
"""


class CpuPoweredRapl:
    """package-0 of a RAPL tree under `root`, drawing IDLE_W plus BUSY_W per CPU-second of process `pid`."""

    def __init__(self, root: Path, pid: int):
        self.counter = rapl_domain(root, "intel-rapl:0", "package-0", 0, 2**40) / "energy_uj"
        self.args = [sys.executable, "-c", WRITER, str(self.counter), str(pid), str(IDLE_W), str(BUSY_W)]

    def __enter__(self):
        self.writer = subprocess.Popen(self.args)
        deadline = time.monotonic() + 30
        while not self.counter.is_fifo() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.writer.kill()
        self.writer.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tiny space, and devices: `local-cpu` with a RAPL meter on the tree below, `plain` without one."""
    folder = tmp_path_factory.mktemp("energy")
    paths = {"space": folder / "tiny-mbv3.yaml", "devices": folder / "devices.yaml", "rapl": folder / "powercap"}
    paths["space"].write_text(yaml.safe_dump(SPACE))
    paths["devices"].write_text(yaml.safe_dump({"devices": {
        "local-cpu": {"protocol": asdict(PROTOCOL), "energy": {"meter": "rapl", "path": str(paths["rapl"]),
                                                            "idle_s": 0.05}},
        "plain": {"protocol": asdict(PROTOCOL)}}}))
    rapl_domain(paths["rapl"], "intel-rapl:0", "package-0", 0, 2**40)  # readable before the actor starts
    return paths


@pytest.fixture(scope="module")
def tiny(files):
    return build_supernet(load_space(files["space"])).eval()


@pytest.fixture(scope="module")
def measured(files, tiny, tmp_path_factory):
    """A LUT of the tiny space built on local-cpu with its meter, calibrated on 3 subnets and validated on 3;
    one subnet profiled per block; and the LUT built in context. All measured while the counter runs."""
    from conftest import start_local_ray

    from raynas.hw.remote import start_profiler

    start_local_ray()
    lut = str(tmp_path_factory.mktemp("lut") / "tiny.lut.parquet")
    device = get_device("local-cpu", files["devices"])
    profiler = start_profiler(device)
    try:
        with CpuPoweredRapl(files["rapl"], profiler.node["pid"]):
            rows, meta = build_lut(tiny, [profiler], patience=30, show_progress=False, out=lut)
            calibration = calibrate(tiny, rows, profiler, n=3, show_progress=False)
            save_calibration(calibration_path(lut), TableKey.of(tiny, device), calibration)
            summary, validation = validate(tiny, rows, calibration, profiler, n=3, show_progress=False,
                                           recheck=False)
            model, shape = subnet_onnx(tiny, tiny.space.max_arch())
            [profiled] = profiler.measure([("max", model, shape)], per_block=True)
            in_context, _ = build_lut(tiny, [profiler], patience=30, show_progress=False, method="context")
    finally:
        profiler.stop()
    return {"lut": lut, "rows": rows, "meta": meta, "calibration": calibration, "summary": summary,
            "validation": validation, "profiled": profiled, "in_context": in_context}


def test_lut_rows_carry_energy_proportional_to_latency(measured, tiny):
    """Each block's energy is BUSY_W x its CPU time less the call's fixed cost, as its latency is: energy
    follows latency block by block (tolerance for mean vs median of thousands of calls on a busy host)."""
    rows, meta = measured["rows"], measured["meta"]
    assert len(rows) == len(collect_block_configs(tiny, patience=30, show_progress=False).blocks)
    assert meta[TableKey.of(tiny, get_device("local-cpu")).id]["energy_meter"] == "rapl"
    # idle: IDLE_W and what the actor's process does at rest (Ray's own threads), a few % of a core
    assert rows["idle_w"].nunique() == 1 and IDLE_W * 0.95 < rows["idle_w"].iloc[0] < IDLE_W + 0.1 * BUSY_W
    assert (rows["overhead_mj"] > 0).all() and (rows["energy_mj"] > 0).all()
    expected = BUSY_W * rows["latency_raw_ms"].astype(float)  # W x ms = mJ
    ratio = rows["energy_mj"] / expected
    assert ratio.median() == pytest.approx(1.0, abs=0.2), ratio.tolist()
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio.tolist()
    # the call's fixed cost was measured too, and taken off: identity calls cost BUSY_W x their CPU time
    assert rows["overhead_mj"].iloc[0] == pytest.approx(BUSY_W * rows["overhead_ms"].iloc[0], rel=0.5)
    # stored and read back
    table, _ = read_lut(measured["lut"])
    assert table["energy_mj"].tolist() == pytest.approx(rows["energy_mj"].tolist())


def test_calibration_validation_and_energy_model(measured, tiny, files):
    """The calibration subnets' measured energy calibrates kappa_E * sum(LUT energy) + epsilon_E; the model
    loaded for search predicts exactly that; the held-out subnets carry their measured energy."""
    cal = measured["calibration"]
    assert len(cal["measured_energy_mj"]) == 3 and all(e > 0 for e in cal["measured_energy_mj"])
    # end to end, each subnet's energy is BUSY_W x its CPU time per call
    assert np.divide(cal["measured_energy_mj"], cal["measured_raw_ms"]) == pytest.approx([BUSY_W] * 3, rel=0.3)
    stored = load_calibration(calibration_path(measured["lut"]), TableKey.of(tiny, get_device("local-cpu")))
    kappa, epsilon = (stored["energy"]["calibration"][k] for k in ("slope", "intercept"))
    assert 0.5 < kappa < 2.0 and epsilon >= 0

    model = load_energy_model(measured["lut"], tiny, "local-cpu", files["devices"])
    on_lut = dict(zip(measured["rows"]["key"], measured["rows"]["energy_mj"]))
    for arch in (tiny.space.min_arch(), tiny.space.max_arch()):
        raw = sum(on_lut[b.key] for b in tiny.blocks(arch))
        assert model.raw(arch) == pytest.approx(raw) and model.predict(arch) == pytest.approx(kappa * raw + epsilon)

    validation, summary = measured["validation"], measured["summary"]
    assert (validation["measured_energy_mj"] > 0).all() and validation["energy_mj"].notna().all()
    assert summary["energy"]["mape"] is not None and summary["energy"]["measured_mj"]["min"] > 0
    assert (np.abs(validation["energy_mj"] / validation["measured_energy_mj"] - 1) < 0.5).all()


def test_block_energy_in_context_is_the_time_share_of_the_subnet(measured):
    """Profiled per block, each block is charged the subnet's power above idle times its own time; a LUT built
    in context holds those shares."""
    r = measured["profiled"]
    watts = r["energy_mj"] * r["runs"] / (r["energy_window_s"] * 1000.0)
    assert set(r["block_mj"]) == set(r["block_ms"])
    assert [r["block_mj"][b] for b in r["block_ms"]] == pytest.approx([watts * ms for ms in r["block_ms"].values()])
    # the nodes hold most of a call, never more than the call
    assert 0.3 * r["energy_mj"] < sum(r["block_mj"].values()) <= r["energy_mj"] * 1.05
    assert 0.3 * BUSY_W < watts < 1.2 * BUSY_W
    # a LUT built in context: every block's energy is its median share over the subnets it was timed in
    rows = measured["in_context"]
    assert (rows["clock"] == "profile").all() and (rows["energy_mj"] > 0).all() and (rows["overhead_mj"] == 0).all()
    power = rows["energy_mj"] / rows["latency_raw_ms"]
    assert ((power > 0.3 * BUSY_W) & (power < 1.2 * BUSY_W)).all(), power.tolist()


def test_search_with_energy_objective_and_constraint(measured, tiny, files, tmp_path):
    """NSGA-II over (accuracy, latency, energy) with max_energy_mj: every record carries the energy model's
    prediction, feasibility follows the bound, and the front keeps to it."""
    energy = load_energy_model(measured["lut"], tiny, "local-cpu", files["devices"])
    latency = LutLatencyModel(tiny, measured["rows"])
    samples = [energy.predict(tiny.space.sample(np.random.default_rng(i))) for i in range(30)]
    bound = float(np.median(samples))
    ctx = SearchContext(space=tiny.space, estimate=estimate_fn(tiny, latency, energy),
                        constraints=Constraints(max_energy_mj=bound),
                        objectives=("accuracy", "latency_ms", "energy_mj"))

    def evaluate(arch_jsons):
        for a in arch_jsons:
            yield a, {"accuracy": (zlib.crc32(a.encode()) % 1000) / 1000}

    records = run_search(build_algorithm("nsga2", ctx, budget=16, population=8), evaluate,
                         ResultStore(tmp_path / "ev"), progress=lambda m: None)
    assert records
    for r in records:
        assert r["energy_mj"] == pytest.approx(energy.predict(Arch.from_json(r["arch"])))
        assert r["feasible"] == (r["energy_mj"] <= bound)
    front = pareto_front([r for r in records if r["feasible"]], ctx.objectives)
    assert front and all(r["energy_mj"] <= bound for r in front)


def test_constraints_on_energy():
    c = Constraints(max_energy_mj=2.0)
    assert c.violations({"energy_mj": 3.0}) == [pytest.approx(0.5)]
    assert c.feasible({"energy_mj": 1.5}) and not c.feasible({"energy_mj": 2.5})
    assert c.feasible({"energy_mj": math.nan})  # not known yet violates nothing, as with latency
    assert Constraints(max_latency_ms=1.0).violations({"latency_ms": 0.5}) == [-0.5]  # energy not asked: no key


def _search_cfg(files, device: str, **extra) -> dict:
    return {"checkpoint": None, "latency": {"device": device, "devices_file": str(files["devices"]), "lut": "x.parquet",
                                            **extra.pop("latency", {})},
            "search": {"objectives": ["accuracy", "latency_ms", "energy_mj"]}, **extra}


def test_search_config_asks_energy_only_of_a_device_with_a_meter(files, tmp_path):
    with pytest.raises(UserError) as err:
        validate_search_config(_search_cfg(files, "plain"))
    assert str(err.value) == (
        "devices.plain.energy: device 'plain' has no energy meter, so its energy cannot be measured; allowed: "
        "declare one in devices.yaml, `energy: {meter: M}` with M one of rapl, ina3221, nvml (Linux RAPL, a "
        "Jetson's INA3221 rails, an NVIDIA GPU through NVML)")
    constrained = {**_search_cfg(files, "plain"), "search": {}, "constraints": {"max_energy_mj": 5.0}}
    with pytest.raises(UserError, match=r"^devices\.plain\.energy: device 'plain' has no energy meter"):
        validate_search_config(constrained)
    assert validate_search_config({**_search_cfg(files, "plain"), "search": {}})["constraints"]["max_energy_mj"] is None
    ok = validate_search_config(_search_cfg(files, "local-cpu", constraints={"max_energy_mj": 5.0}))
    assert ok["search"]["objectives"][-1] == "energy_mj" and ok["constraints"]["max_energy_mj"] == 5.0
    with pytest.raises(UserError, match=r"^latency\.lut: energy_mj is predicted from a LUT's energy column"):
        validate_search_config(_search_cfg(files, "local-cpu", latency={"model": "live", "lut": None}))
    with pytest.raises(UserError, match=r"^constraints\.max_energy_mj: "):
        validate_search_config(_search_cfg(files, "local-cpu", constraints={"max_energy_mj": 0}))


def test_lut_without_energy_still_loads_and_is_refused_for_energy(tiny, files, tmp_path):
    """A LUT written before energy existed reads with NaN energy; its latency model works, an energy model
    is one line saying how to measure the group again."""
    old_columns = [c for c in TABLE_COLUMNS if c not in ("energy_mj", "overhead_mj", "idle_w")]
    key = TableKey.of(tiny, get_device("local-cpu", files["devices"]))
    keys = list(collect_block_configs(tiny, patience=30, show_progress=False).blocks)
    frame = pd.DataFrame([{**dict.fromkeys(old_columns, 1.0), **asdict(key), "key": k, "in_shape": "[]",
                           "clock": "thread", "node_id": "n", "hostname": "h"} for k in keys])[old_columns]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    path = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: json_meta(key)}), path)
    rows, meta = read_lut(path)
    assert list(rows.columns) == TABLE_COLUMNS and rows["energy_mj"].isna().all() and key.id in meta
    write_lut(path, rows, meta)  # written again, it keeps the (empty) energy columns
    assert read_lut(path)[0]["energy_mj"].isna().all()
    with pytest.raises(UserError) as err:
        load_energy_model(path, tiny, "local-cpu", files["devices"])
    assert str(err.value) == (
        f"--lut: {path} holds no energy for {key.id} (its blocks were measured while device 'local-cpu' declared "
        f"no meter); allowed: the group measured again with the meter, `raynas profile lut --space tiny-mbv3-wide "
        f"--device local-cpu --out {path}`")
    with pytest.raises(UserError, match=r"^devices\.plain\.energy: device 'plain' has no energy meter"):
        load_energy_model(path, tiny, "plain", files["devices"])


def json_meta(key: TableKey) -> bytes:
    import json

    return json.dumps({key.id: {"blocks": 1}}).encode()
