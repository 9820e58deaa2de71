"""Hardware profiling: devices on a real two-node Ray cluster, onnxruntime measurement, LUTs, calibration,
the latency models and the `raynas profile` CLI. A tiny MobileNetV3 space (10 distinct blocks, 32 px)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from raynas.errors import ConfigError
from raynas.hw.devices import (
    LOCAL_CPU,
    DeviceNotPresent,
    DeviceSpec,
    MeasurementProtocol,
    load_devices,
    parse_devices,
)
from raynas.hw.features import FEATURES
from raynas.hw.latency import (
    Affine,
    BlockLinearModel,
    LinearLatencyModel,
    LutLatencyModel,
    ProxyLatencyModel,
    load_latency_model,
    save_calibration,
)
from raynas.hw.lut import (
    TableKey,
    build_lut,
    collect_block_configs,
    onnx_bytes,
    read_lut,
    subnet_onnx,
    write_lut,
)
from raynas.hw.measure import ReferenceClock, block_times, identity_onnx, measure_onnx, node_times
from raynas.space import load_space
from raynas.supernets import build_supernet

REPO = Path(__file__).resolve().parents[1]
FAST = MeasurementProtocol(warmup_s=0.02, min_warmup_runs=2, runs=50, repeats=1)

TINY_SPACE = {
    "name": "tiny-mbv3", "family": "mbv3", "resolution": 32, "num_classes": 10,
    "resolution_choices": [32], "width_choices": [1.0], "depth_choices": [1, 2], "kernel_choices": [3, 5],
    "expand_choices": [2, 4], "channel_divisor": 8, "se_reduction": 4,
    "stem": {"channels": 8, "kernel": 3, "stride": 2, "act": "hswish"},
    "first_block": {"channels": 8, "kernel": 3, "expand": 1, "act": "relu", "se": False},
    "stages": [{"channels": 16, "stride": 2, "act": "relu", "se": False}],
    "head": {"expand": 32, "features": 64, "act": "hswish", "dropout": 0.0},
}


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny-mbv3.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_yaml):
    return build_supernet(load_space(tiny_yaml)).eval()


@pytest.fixture(scope="module")
def devices_yaml(tmp_path_factory) -> Path:
    """Devices a and b (on the two nodes), c (declared but on no node); a fast protocol for tests."""
    path = tmp_path_factory.mktemp("devices") / "devices.yaml"
    fast = {"warmup_s": FAST.warmup_s, "min_warmup_runs": FAST.min_warmup_runs, "runs": FAST.runs,
            "repeats": FAST.repeats}
    path.write_text(yaml.safe_dump({"protocol": fast, "devices": {
        name: {"runtime": "cpu", "threads": 1, "batch_size": 1} for name in ("a", "b", "c")}}))
    return path


@pytest.fixture(scope="module")
def two_nodes():
    """A real two-node local Ray cluster: the head is labelled device=a, the worker device=b."""
    import ray
    from ray.cluster_utils import Cluster

    # Another test module may hold the session's local Ray (conftest's `ray_local`): step aside; the next
    # `ray_local` user starts a fresh one.
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "labels": {"device": "a"}, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, labels={"device": "b"})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield {"address": cluster.address, "head": cluster.head_node.node_id, "worker": worker.node_id}
    ray.shutdown()
    cluster.shutdown()


def _device(name: str) -> DeviceSpec:
    return replace(LOCAL_CPU, name=name, protocol=FAST)


# ---- devices file ---------------------------------------------------------------------------------------
def test_shipped_devices_file_declares_local_cpu():
    devices = load_devices(REPO / "cluster" / "devices.yaml")
    local = devices["local-cpu"]
    assert local.label == "device=local-cpu" and local.resource == "device:local-cpu"
    assert local.runtime == "cpu" and local.batch_size == 1
    assert local.protocol.runs >= 50
    assert all(d.protocol.runs >= 50 for d in devices.values())


@pytest.mark.parametrize("cfg, field", [
    ({"devices": {"x": {"runtime": "tpu"}}}, "devices.x.runtime"),
    ({"devices": {"x": {"threads": 0}}}, "devices.x.threads"),
    ({"devices": {"x": {"resource": "device:y"}}}, "devices.x.resource"),
    ({"devices": {"x": {"protocol": {"runs": 10}}}}, "devices.x.protocol.runs"),
    ({"devices": {"x": {"colour": 1}}}, "devices.x.colour: unknown field"),
    ({"protocol": {"warmup_s": -1}, "devices": {"x": {}}}, "protocol.warmup_s"),
    ({"devices": {"x": {"protocol": {"clock": "sundial"}}}}, "devices.x.protocol.clock"),
    ({"devices": {"x": {"protocol": {"min_run_s": -1}}}}, "devices.x.protocol.min_run_s"),
    ({"devices": {"x": {"threads": 2, "protocol": {"clock": "thread"}}}}, "devices.x.protocol.clock"),
])
def test_devices_file_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_devices(cfg)


# ---- measurement --------------------------------------------------------------------------------------
def test_measurement_follows_the_protocol():
    timing = measure_onnx(identity_onnx((1, 4, 8, 8)), (1, 4, 8, 8), _device("x"))
    assert timing.runs == 50 and timing.series == 1 and timing.warmup_runs >= FAST.min_warmup_runs
    assert 0 < timing.median_ms < 50 and timing.iqr_ms >= 0 and timing.clock == "wall"
    assert timing.median_ms == pytest.approx(timing.wall_median_ms)

    # A tiny model keeps being timed until `min_run_s` has passed, far beyond the 50 runs. (Not checked
    # through runs x median: the series' elapsed time also holds the timing loop's own per-call cost, which
    # on a busy host exceeds the few microseconds of this model.)
    longer = replace(_device("x"), protocol=replace(FAST, min_run_s=0.05))
    timing = measure_onnx(identity_onnx((1, 4, 8, 8)), (1, 4, 8, 8), longer)
    assert timing.runs > 200

    # The thread clock counts the CPU time of the inference thread only: not more than the elapsed time.
    import torch

    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    on_cpu = replace(_device("x"), protocol=replace(FAST, clock="thread"))
    timing = measure_onnx(onnx_bytes(conv, (1, 16, 32, 32)), (1, 16, 32, 32), on_cpu)
    assert timing.clock == "thread" and 0 < timing.median_ms <= timing.wall_median_ms * 1.1


def test_reference_clock_and_per_block_profile_of_a_real_subnet(tiny):
    """The reference model times like any model; a subnet profiled per node credits every node to a block,
    named ones by their `/i/` scope and onnxruntime's renamed ones to the block running before them."""
    clock = ReferenceClock(_device("x"))
    series = clock.sample()
    assert len(series) == FAST.reference_runs and (series > 0).all()

    arch = tiny.space.max_arch()
    model, shape = subnet_onnx(tiny, arch)
    timing, per_run = node_times(model, shape, _device("x"))
    assert len(per_run) == timing.runs and all(per_run)
    per_block = block_times(per_run)
    assert sorted(per_block) == list(range(len(tiny.blocks(arch))))  # every block got its nodes
    assert all(ms > 0 for ms in per_block.values())
    # The blocks' medians add up to about the median run's node total (medians of sums vs sum of medians)
    total = float(np.median([sum(nodes.values()) for nodes in per_run]))
    assert sum(per_block.values()) == pytest.approx(total, rel=0.25)

    # Crediting rule, on a profile shaped like onnxruntime's: unnamed nodes go to the last named block.
    runs = [{"ReorderInput": 1.0, "/0/conv/Conv": 2.0, "Gelu_token_3": 4.0, "/1/fc/MatMul": 8.0,
             "ReorderOutput_token_9": 16.0}] * 3
    assert block_times(runs) == {0: 7.0, 1: 24.0}


def test_latency_is_stated_at_one_reference_speed(tiny):
    """Drift-proofing: the same subnets measured on a device running at half speed (every time, the
    reference's too, doubled) give the same calibration and the same held-out figures; without the
    reference the calibration absorbs the drift and every prediction is off by 2x."""
    from raynas.hw.lut import lut_baseline_ms
    from raynas.hw.profiling import fit_calibration, summarize_validation

    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    rng = np.random.default_rng(0)
    raw = {k: float(rng.uniform(0.05, 0.5)) for k in catalogue.blocks}
    table = pd.DataFrame({"key": list(raw), "latency_raw_ms": list(raw.values()), "reference_ms": 0.2,
                          **{f"f_{n}": 1.0 for n in FEATURES}})
    table["latency_ms"] = table["latency_raw_ms"]
    assert lut_baseline_ms(table) == pytest.approx(0.2)
    archs = [tiny.space.min_arch(), tiny.space.max_arch()] + [tiny.space.sample(rng) for _ in range(8)]
    truth = [0.1 + sum(raw[b.key] for b in tiny.blocks(a)) for a in archs]

    def records(scale: float, reference: float | None) -> list[dict]:
        return [{"median_ms": scale * t, "iqr_ms": 0.0, "reference_ms": reference, "node_id": "n",
                 "hostname": "h"} for t in truth]

    steady = fit_calibration(tiny, table, archs[:6], records(1.0, 0.2)[:6])
    slowed = fit_calibration(tiny, table, archs[:6], records(2.0, 0.4)[:6])
    assert slowed["models"]["lut"]["calibration"] == pytest.approx(steady["models"]["lut"]["calibration"])
    assert slowed["measured_raw_ms"] == pytest.approx([2 * m for m in steady["measured_raw_ms"]])
    assert slowed["baseline_ms"] == pytest.approx(0.2)

    summary, rows = summarize_validation(tiny, table, steady, _device("x"), archs[6:], records(2.0, 0.4)[6:],
                                         again=records(2.0, 0.4)[6:])
    assert summary["within10"] == 1.0 and summary["self_agreement"] == 1.0
    assert rows["measured_ms"].to_numpy() == pytest.approx(truth[6:])
    unreferenced = fit_calibration(tiny, table, archs[:6], records(2.0, None)[:6])
    assert unreferenced["models"]["lut"]["calibration"]["slope"] == pytest.approx(
        2 * steady["models"]["lut"]["calibration"]["slope"])


# ---- fitting ----------------------------------------------------------------------------------------------
def test_calibration_fit_recovers_a_known_linear_relation(tiny):
    """measured = 0.6 * sum(LUT) + 0.25 exactly: calibrating the LUT model must find kappa=0.6, epsilon=0.25."""
    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"key": list(catalogue.blocks), "latency_ms": rng.uniform(0.1, 2.0, len(catalogue.blocks))})
    for name in FEATURES:
        table[f"f_{name}"] = rng.uniform(0, 1, len(table))
    lut = dict(zip(table["key"], table["latency_ms"]))
    archs = [tiny.space.sample(rng) for _ in range(10)]
    measured = [0.6 * sum(lut[b.key] for b in tiny.blocks(a)) + 0.25 for a in archs]

    model = LutLatencyModel(tiny, table)
    fitted = model.calibrate(archs, measured)
    assert fitted.slope == pytest.approx(0.6, rel=1e-9) and fitted.intercept == pytest.approx(0.25, abs=1e-9)
    assert model.predict(archs[3]) == pytest.approx(measured[3], rel=1e-9)
    assert not model.missing_keys

    noisy = Affine.fit([1, 2, 3, 4, 5, 6], [2.9, 5.1, 7.0, 9.05, 10.9, 13.1])  # y = 2x + 1 with noise
    assert noisy.slope == pytest.approx(2.0, abs=0.05) and noisy.intercept == pytest.approx(1.0, abs=0.2)

    # Relative errors count, not absolute ones: one large subnet must not decide the line for small ones.
    x = np.array([0.1, 0.2, 0.4, 0.8, 20.0])
    fit = Affine.fit(x, 1.5 * x * np.array([1.0, 1.05, 0.95, 1.0, 1.2]))
    assert all(abs(fit(a) / (1.5 * a) - 1) < 0.1 for a in x[:4])

    # A line that would cross zero (negative epsilon) becomes a ratio through the origin: never a negative latency.
    steep = Affine.fit([0.02, 0.1, 0.5, 1.0], [0.03, 0.16, 0.95, 2.0])
    assert steep.intercept == 0.0 and steep.slope > 0 and steep(0.001) > 0


def test_block_linear_model_recovers_operator_costs():
    """Seed 001 eq. 6: latency = sum of non-negative per-operator coefficients times operator costs."""
    rng = np.random.default_rng(1)
    feats = pd.DataFrame(rng.uniform(0, 1e6, (200, len(FEATURES))), columns=list(FEATURES))
    true = {"conv_macs": 2e-6, "dwconv_macs": 5e-6, "act_elems": 1e-6, "n_ops": 3e-3}
    y = sum(feats[k] * v for k, v in true.items()) + 0.01
    model = BlockLinearModel.fit(feats, y)
    for name in FEATURES:
        assert model.coef[name] == pytest.approx(true.get(name, 0.0), abs=1e-9)
    assert model.intercept == pytest.approx(0.01, abs=1e-6)


def test_family_enumerator_is_verified_then_trusted(tiny):
    """`block_variants(resolution)` lists the blocks; a few sampled subnets check it, sampling covers gaps."""
    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    everything = list(catalogue.blocks.values())

    class Enumerating(type(tiny)):
        share = 1.0

        def block_variants(self, resolution=None):
            return everything[:int(len(everything) * self.share)]

    net = Enumerating(tiny.space).eval()
    complete = collect_block_configs(net, patience=30, verify=5, show_progress=False)
    assert set(complete.blocks) == set(catalogue.blocks) and complete.from_hook == len(everything)
    assert complete.archs_scanned == 5  # verified, then trusted

    net.share = 0.5
    partial = collect_block_configs(net, patience=30, verify=5, show_progress=False)
    assert set(partial.blocks) == set(catalogue.blocks) and partial.archs_scanned > 30  # fell back to sampling


# ---- Ray: pinning, missing device, LUT ------------------------------------------------------------------
def test_profiler_for_device_b_runs_on_b_node(two_nodes):
    from raynas.hw.remote import start_profiler

    for name, node in (("b", two_nodes["worker"]), ("a", two_nodes["head"])):
        profiler = start_profiler(_device(name))
        try:
            assert profiler.node["node_id"] == node
            record = profiler.actor.measure.remote([("id", identity_onnx((1, 3, 4, 4)), (1, 3, 4, 4))])
            import ray

            (record,) = ray.get(record)
            assert record["node_id"] == node and record["runs"] == 50 and record["median_ms"] > 0
        finally:
            profiler.stop()
    assert two_nodes["head"] != two_nodes["worker"]


def test_missing_device_fails_within_seconds(two_nodes):
    from raynas.hw.remote import start_profiler

    t0 = time.monotonic()
    with pytest.raises(DeviceNotPresent) as err:
        start_profiler(_device("c"))
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert "device 'c'" in message and "device=c" in message and "device:c" in message and "['a', 'b']" in message


def test_lut_build_on_two_devices_in_parallel(two_nodes, tiny, tmp_path):
    from raynas.hw.remote import start_profiler

    profilers = [start_profiler(_device(n)) for n in ("a", "b")]
    try:
        rows, meta = build_lut(tiny, profilers, patience=30, passes=2, show_progress=False)
        catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
        for p, node in zip(profilers, (two_nodes["head"], two_nodes["worker"])):
            group = rows[rows["device"] == p.device.name]
            assert set(group["key"]) == set(catalogue.blocks) and len(group) == len(catalogue.blocks)
            assert (group["node_id"] == node).all()
            assert (group["median_ms"] > 0).all() and (group["latency_ms"] >= 0).all()
            assert (group["runs"] >= 50).all() and (group["f_n_ops"] > 0).all()
            assert (group["passes"] == 2).all() and (group["pass_spread"] >= 0).all()
            info = meta[TableKey.of(tiny, p.device).id]
            assert info["measured"] == len(group) and info["reused"] == 0 and info["build_s"] > 0
            # Stated at the group's reference speed: the median of the reference times measured with its rows
            assert (group["reference_ms"] > 0).all() and info["method"] == "isolated"
            assert info["reference_ms"] == pytest.approx(group["reference_ms"].median())
            stated = group["latency_raw_ms"].astype(float) * info["reference_ms"] / group["reference_ms"].astype(float)
            assert group["latency_ms"].astype(float).tolist() == pytest.approx(stated.tolist())

        path = tmp_path / "lut.parquet"
        write_lut(path, rows, meta)
        table, stored = read_lut(path)
        assert len(table) == len(rows) and set(stored) == set(meta)

        again, meta2 = build_lut(tiny, profilers, table, stored, patience=30, show_progress=False)
        assert all(m["measured"] == 0 and m["reused"] == len(catalogue.blocks) for m in meta2.values())
        assert all(m2["build_s"] == meta[k]["build_s"] for k, m2 in meta2.items())
    finally:
        for p in profilers:
            p.stop()

    # Another protocol is another measurement: nothing is reused.
    slower = start_profiler(replace(_device("a"), protocol=replace(FAST, runs=60)))
    try:
        rows3, meta3 = build_lut(tiny, [slower], table, stored, patience=30, show_progress=False)
    finally:
        slower.stop()
    assert meta3[TableKey.of(tiny, slower.device).id]["measured"] == len(catalogue.blocks)
    assert (rows3["runs"] == 60).all()

    # The stored table serves every model through the one loader search uses.
    key = TableKey.of(tiny, _device("a"))
    record = {"n": 2, "archs": [], "models": {k: {"calibration": {"slope": 2.0, "intercept": 0.5}}
                                             for k in ("lut", "linear", "flops", "params")}}
    save_calibration(tmp_path / "lut.calibration.json", key, record)
    arch = tiny.space.max_arch()
    on_a = table[table["device"] == "a"]
    lut_sum = sum(dict(zip(on_a["key"], on_a["latency_ms"]))[b.key] for b in tiny.blocks(arch))
    devices_file = tmp_path / "devices.yaml"
    devices_file.write_text(yaml.safe_dump({"devices": {"a": {}}}))
    for kind, cls in (("lut", LutLatencyModel), ("linear", LinearLatencyModel), ("flops", ProxyLatencyModel),
                      ("params", ProxyLatencyModel)):
        model = load_latency_model(kind, path, supernet=tiny, device="a", devices_file=devices_file)
        assert isinstance(model, cls) and model.kind == kind
        assert model.predict(arch) == pytest.approx(2.0 * model.raw(arch) + 0.5)
        assert model.predict(arch) > 0.5
        if kind == "lut":
            assert model.raw(arch) == pytest.approx(lut_sum)


def test_lut_in_context_profiles_subnets_covering_every_block(two_nodes, tiny, tmp_path):
    from raynas.hw.remote import start_profiler

    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    profiler = start_profiler(_device("a"))
    try:
        rows, meta = build_lut(tiny, [profiler], patience=30, method="context", appearances=2, show_progress=False,
                               out=str(tmp_path / "lut.parquet"))
        info = meta[TableKey.of(tiny, profiler.device).id]
        assert set(rows["key"]) == set(catalogue.blocks) and info["measured"] == len(catalogue.blocks)
        assert info["method"] == "context" and 2 <= info["subnets"] < len(catalogue.blocks)
        # every block timed inside two subnets, no call overhead to take off, at the reference speed
        assert (rows["clock"] == "profile").all() and (rows["runs"] >= 2).all() and (rows["overhead_ms"] == 0).all()
        assert (rows["latency_ms"] > 0).all() and (rows["reference_ms"] > 0).all()
        stored, stored_meta = read_lut(tmp_path / "lut.parquet")
        assert len(stored) == len(rows) and stored_meta[TableKey.of(tiny, profiler.device).id]["method"] == "context"
        # Rows of another method are another measurement: an isolated build measures every block anew.
        _, again = build_lut(tiny, [profiler], stored, stored_meta, patience=30, show_progress=False)
        assert again[TableKey.of(tiny, profiler.device).id]["measured"] == len(catalogue.blocks)
    finally:
        profiler.stop()


def test_lut_written_before_reference_columns_is_read(tiny, tmp_path):
    """A LUT from before drift-proofing (no latency_raw_ms / reference_ms) is read: raw values, no reference."""
    import pyarrow.parquet as pq

    from raynas.hw.lut import META_KEY, TABLE_COLUMNS

    old_columns = [c for c in TABLE_COLUMNS if c not in ("latency_raw_ms", "reference_ms")]
    key = TableKey.of(tiny, _device("a"))
    frame = pd.DataFrame([{**{c: 0 for c in old_columns}, **{k: v for k, v in vars(key).items()}, "key": "k1",
                           "in_shape": "[1, 3, 32, 32]", "latency_ms": 0.25, "clock": "wall", "node_id": "n",
                           "hostname": "h"}])[old_columns]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({META_KEY: json.dumps({key.id: {"blocks": 1}}).encode()})
    pq.write_table(table, tmp_path / "old.parquet")
    rows, meta = read_lut(tmp_path / "old.parquet")
    assert rows["latency_raw_ms"].tolist() == [0.25] and rows["reference_ms"].isna().all()
    assert list(rows.columns) == TABLE_COLUMNS and key.id in meta


# ---- the CLI ------------------------------------------------------------------------------------------------
def _raynas(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raynas.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_lut_and_validate_json(two_nodes, tiny_yaml, devices_yaml, tmp_path, capsys):
    from raynas.cli import main

    common = ["--space", str(tiny_yaml), "--device", "b", "--devices-file", str(devices_yaml),
              "--address", two_nodes["address"], "--quiet"]
    lut = tmp_path / "lut.parquet"
    assert main(["profile", "lut", *common, "--out", str(lut), "--patience", "30"]) == 0  # in-process: faster
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "b" and info["node_id"] == two_nodes["worker"] and info["blocks"] == 10

    # `validate` as a user runs it: a separate process connecting to the cluster
    done = _raynas("profile", "validate", *common, "--lut", str(lut), "-n", "6", "--calibration-n", "4",
                   "--seed", "3", "--json", "--save", str(tmp_path / "rows.parquet"))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    schema = {"n": int, "spearman": float, "mape": float, "within10": float, "flops_spearman": float,
              "params_spearman": float, "calibration_n": int, "lut_build_s": float}
    for key, kind in schema.items():
        assert isinstance(summary[key], kind), (key, summary[key])
    assert summary["n"] == 6 and summary["calibration_n"] == 4 and summary["device"] == "b"
    assert -1 <= summary["spearman"] <= 1 and 0 <= summary["within10"] <= 1 and summary["mape"] >= 0
    assert set(summary["models"]) == {"lut", "linear", "flops", "params"}
    # measured twice: how far the device agrees with itself, beside the models' figures
    assert 0 <= summary["self_agreement"] <= 1 and 0 <= summary["self_agreement_raw"] <= 1
    assert summary["reference_ms"] > 0 and 0 <= summary["lut_without_reference"]["within10"] <= 1
    calibration = json.loads((tmp_path / "lut.calibration.json").read_text())
    (group,) = calibration["groups"].values()
    held_out = pd.read_parquet(tmp_path / "rows.parquet")
    assert (held_out["measured_again_ms"] > 0).all() and (held_out["reference_ms"] > 0).all()
    assert len(held_out) == 6 and not set(held_out["arch"]) & {json.dumps(a, separators=(",", ":"))
                                                             for a in group["archs"]}



def test_cli_absent_device_is_a_one_line_error(two_nodes, tiny_yaml, devices_yaml, tmp_path, capsys):
    from raynas.cli import main

    t0 = time.monotonic()
    code = main(["profile", "lut", "--space", str(tiny_yaml), "--device", "c", "--devices-file", str(devices_yaml),
                 "--address", two_nodes["address"], "--out", str(tmp_path / "lut.parquet"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - t0 < 30
    assert err.count("\n") == 0 and "device 'c'" in err and "['a', 'b']" in err
    assert main(["profile", "lut", "--space", str(tiny_yaml), "--device", "nowhere", "--devices-file",
                 str(devices_yaml), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "'nowhere'" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()


def test_pipeline_profiles_every_device_present(two_nodes, tiny_yaml, devices_yaml, tmp_path, capsys):
    """pipelines/profile_devices.py (what `ray job submit` runs), here in-process against the two-node cluster."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_devices", REPO / "pipelines" / "profile_devices.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    code = pipeline.main(["--spaces", str(tiny_yaml), "--out", str(tmp_path), "--devices-file", str(devices_yaml),
                          "--address", two_nodes["address"], "--calibration-n", "3", "--patience", "30"])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads(capsys.readouterr().out)
    assert summary["devices"] == ["a", "b"]  # c is declared but on no node
    assert summary["nodes"]["a"]["node_id"] == two_nodes["head"]
    assert summary["nodes"]["b"]["node_id"] == two_nodes["worker"]
    per_device = summary["spaces"]["tiny-mbv3"]
    assert set(per_device) == {"a", "b"} and all(d["fp32"]["blocks"] == 10 and d["fp32"]["calibration_n"] == 3
                                                 for d in per_device.values())
    table, meta = read_lut(tmp_path / "tiny-mbv3.lut.parquet")
    assert sorted(set(table["device"])) == ["a", "b"] and len(meta) == 2
    calibration = json.loads((tmp_path / "tiny-mbv3.lut.calibration.json").read_text())
    assert len(calibration["groups"]) == 2


# ---- storage: LUT and calibration at a URI, resume, refusal of foreign files -------------------------------
def test_lut_and_calibration_in_object_storage(two_nodes, tiny, tiny_yaml, devices_yaml, s3_bucket, capsys):
    """`--out`/`--lut` an s3:// URI (the test's S3-compatible server): the LUT and its calibration are stored
    there, a second build reuses every block from storage, and the latency model loads from it."""
    from raynas import storage
    from raynas.cli import main
    from raynas.hw.latency import calibration_path

    common = ["--space", str(tiny_yaml), "--device", "b", "--devices-file", str(devices_yaml),
              "--address", two_nodes["address"], "--quiet"]
    lut = f"{s3_bucket}/luts/tiny.parquet"
    assert main(["profile", "lut", *common, "--out", lut, "--patience", "30"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["blocks"] == 10 and first["measured"] == 10 and first["node_id"] == two_nodes["worker"]
    stored, meta = read_lut(lut)
    assert len(stored) == 10 and (stored["node_id"] == two_nodes["worker"]).all() and len(meta) == 1

    assert main(["profile", "lut", *common, "--out", lut, "--patience", "30"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["measured"] == 0 and again["reused"] == 10 and again["lut_build_s"] == first["lut_build_s"]
    pd.testing.assert_frame_equal(read_lut(lut)[0], stored)

    assert main(["profile", "calibrate", *common, "--lut", lut, "-n", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert calibration_path(lut) == f"{s3_bucket}/luts/tiny.calibration.json" == out["calibration"]
    calibration = storage.read_json(calibration_path(lut))
    (group,) = calibration["groups"].values()
    assert group["device"] == "b" and group["n"] == 3 and len(group["measured_ms"]) == 3

    model = load_latency_model("lut", lut, supernet=tiny, device="b", devices_file=devices_yaml)
    arch = tiny.space.max_arch()
    kappa, epsilon = group["models"]["lut"]["calibration"]["slope"], group["models"]["lut"]["calibration"]["intercept"]
    assert model.predict(arch) == pytest.approx(kappa * model.raw(arch) + epsilon) and model.predict(arch) > 0


def test_killed_lut_build_keeps_its_blocks_and_resumes(two_nodes, tiny_yaml, s3_bucket, tmp_path, capsys):
    """A `raynas profile lut` process killed (SIGKILL) after its first blocks were stored: the blocks are in
    the bucket, and the next build measures only the rest, keeping the stored rows as they were."""
    import signal

    from raynas import storage
    from raynas.cli import main

    # Slow enough per block (>= 0.6 s) that the kill lands between the first stored chunk and the end.
    slow = tmp_path / "devices.yaml"
    slow.write_text(yaml.safe_dump({"devices": {"b": {"protocol": {"warmup_s": 0.02, "min_warmup_runs": 2,
                                                                   "runs": 50, "min_run_s": 0.6, "repeats": 1}}}}))
    lut = f"{s3_bucket}/resume/lut.parquet"
    args = ["profile", "lut", "--space", str(tiny_yaml), "--device", "b", "--devices-file", str(slow),
            "--address", two_nodes["address"], "--out", lut, "--patience", "30", "--quiet"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "build.log"
    with log.open("w") as stderr:
        build = subprocess.Popen([sys.executable, "-m", "raynas.cli", *args], cwd=REPO, env=env,
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not storage.exists(lut):
            assert build.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the build stored nothing within 300 s"
            time.sleep(0.05)
        os.killpg(build.pid, signal.SIGKILL)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
        build.wait(timeout=60)
    partial, meta = read_lut(lut)
    assert 0 < len(partial) < 10, len(partial)
    assert (partial["runs"] >= 50).all() and (partial["latency_ms"] >= 0).all()
    (info,) = meta.values()
    assert info["measured"] == len(partial) and info["build_s"] > 0

    assert main(args) == 0  # resumed here, from what the bucket holds
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["blocks"] == 10 and resumed["reused"] == len(partial) and resumed["measured"] == 10 - len(partial)
    assert resumed["lut_build_s"] > info["build_s"]
    table, _ = read_lut(lut)
    assert table["key"].is_unique and len(table) == 10
    kept = table.set_index("key").loc[partial["key"]]
    assert (kept["median_ms"].to_numpy() == partial["median_ms"].to_numpy()).all()
    assert (kept["measured_at"].to_numpy() == partial["measured_at"].to_numpy()).all()


def _synthetic_group(tiny, device: str = "local-cpu") -> pd.DataFrame:
    from dataclasses import asdict

    from raynas.hw.devices import get_device
    from raynas.hw.lut import TABLE_COLUMNS

    key = TableKey.of(tiny, get_device(device))
    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    rows = [{**dict.fromkeys(TABLE_COLUMNS, 1.0), **asdict(key), "key": k, "in_shape": "[]", "clock": "wall",
             "node_id": "n", "hostname": "h"} for k in catalogue.blocks]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("raynas: error: ") and "\n" not in err, err
    return err


def test_foreign_lut_is_refused_in_one_line_naming_the_file(tiny, tiny_yaml, tmp_path, s3_bucket, capsys):
    """Random bytes, a Parquet that is not a LUT, a LUT's columns without its metadata: refused by every
    reader in one line naming the option and the file, and never overwritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raynas import storage
    from raynas.cli import main
    from raynas.errors import UserError

    random_bytes = f"{s3_bucket}/bad/random.parquet"
    storage.write_bytes(random_bytes, np.random.default_rng(0).bytes(4096))
    not_a_lut = tmp_path / "other.parquet"
    pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}).to_parquet(not_a_lut)
    no_meta = tmp_path / "no_meta.parquet"
    pq.write_table(pa.Table.from_pandas(_synthetic_group(tiny), preserve_index=False), no_meta)
    cases = [(random_bytes, "is not a readable Parquet file"), (str(not_a_lut), "is not a raynas LUT (missing columns"),
             (str(no_meta), "is not a raynas LUT (no 'raynas.lut' metadata")]
    for bad, reason in cases:
        before = storage.read_bytes(bad)
        for argv, option in ((["profile", "calibrate", "--lut", bad], "--lut"),
                             (["profile", "validate", "--lut", bad], "--lut"),
                             (["profile", "lut", "--out", bad], "--out")):
            assert main([*argv, "--space", str(tiny_yaml), "--quiet"]) == 2
            err = _one_line_error(capsys)
            assert f"{option}: {storage.display(bad)} " in err and reason in err, err
        with pytest.raises(UserError, match=f"--lut: {re.escape(storage.display(bad))} .*{re.escape(reason)}"):
            load_latency_model("lut", bad, supernet=tiny, require_calibration=False)
        assert storage.read_bytes(bad) == before


def test_foreign_calibration_is_refused_in_one_line_naming_the_file(tiny, tiny_yaml, tmp_path, s3_bucket, capsys):
    from raynas import storage
    from raynas.cli import main
    from raynas.errors import UserError
    from raynas.hw.latency import calibration_path, load_calibration

    lut = f"{s3_bucket}/cal/lut.parquet"
    write_lut(lut, _synthetic_group(tiny), {})
    calibration = calibration_path(lut)
    key = TableKey.of(tiny, LOCAL_CPU)
    for content, reason in ((np.random.default_rng(1).bytes(512), "is not UTF-8 text"),
                            (b'{"groups": {"x": ', "is not valid JSON"),
                            (b'{"a": 1}', "is not a raynas calibration file (no 'groups' object)"),
                            (b'{"groups": {"g": {"models": {"lut": {}}}}}', "is not a raynas calibration file (group")):
        storage.write_bytes(calibration, content)
        for argv in (["profile", "validate", "--lut", lut], ["profile", "calibrate", "--lut", lut]):
            assert main([*argv, "--space", str(tiny_yaml), "--quiet"]) == 2  # before any Ray or measurement
            err = _one_line_error(capsys)
            assert f"calibration: {storage.display(calibration)} " in err and reason in err, err
        with pytest.raises(UserError, match=re.escape(f"calibration: {storage.display(calibration)} ")):
            load_latency_model("lut", lut, supernet=tiny)
        with pytest.raises(UserError, match=re.escape(reason)):
            load_calibration(calibration, key)
        assert storage.read_bytes(calibration) == content  # nothing overwritten
    explicit = tmp_path / "given.json"
    explicit.write_text("[]")
    assert main(["profile", "validate", "--lut", lut, "--space", str(tiny_yaml), "--calibration", str(explicit),
                 "--quiet"]) == 2
    assert f"--calibration: {explicit} is not a raynas calibration file" in _one_line_error(capsys)
