"""Latency models per precision: LUT groups, calibrations and validations keyed by (space, device, precision),
each device converting the exported FP32 models itself; old files (no precision) read as fp32. A tiny
MobileNetV3 space (10 distinct blocks, 32 px) on a real local Ray, real onnxruntime quantization."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import numpy as np
import onnx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_hw import FAST, TINY_SPACE

from raynas.errors import UserError
from raynas.hw.devices import LOCAL_CPU
from raynas.hw.in_context import scope_nodes
from raynas.hw.latency import MODEL_KINDS, calibration_path, load_calibration, load_latency_model
from raynas.hw.lut import (
    GROUP_COLUMNS,
    META_KEY,
    TABLE_COLUMNS,
    TableKey,
    collect_block_configs,
    load_group,
    read_lut,
    subnet_onnx,
    write_lut,
)
from raynas.hw.measure import block_times, node_times
from raynas.hw.precision import convert
from raynas.space import load_space
from raynas.supernets import build_supernet

# local-cpu as declared (thread clock, 1 thread), with the short protocol of the hardware tests
QUICK = replace(LOCAL_CPU.protocol, warmup_s=FAST.warmup_s, min_warmup_runs=FAST.min_warmup_runs,
                runs=FAST.runs, repeats=FAST.repeats, min_run_s=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tiny space's YAML, and a devices file declaring local-cpu with the short protocol."""
    folder = tmp_path_factory.mktemp("precision")
    paths = {"space": folder / "tiny-mbv3.yaml", "devices": folder / "devices.yaml"}
    paths["space"].write_text(yaml.safe_dump(TINY_SPACE))
    paths["devices"].write_text(yaml.safe_dump({"devices": {"local-cpu": {"protocol": asdict(QUICK)}}}))
    return paths


@pytest.fixture(scope="module")
def tiny(files):
    return build_supernet(load_space(files["space"])).eval()


def _cli(capsys, *argv: str) -> dict:
    from raynas.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_int8_lut_calibration_and_validation_beside_fp32(ray_local, tiny, files, tmp_path, capsys):
    """`raynas profile lut|calibrate|validate --precision int8` on local-cpu: the int8 group lives next to the
    fp32 one in the same LUT and calibration files, a second build measures nothing, and the int8 latency
    model predicts from the int8 table with the int8 calibration."""
    lut = str(tmp_path / "tiny.lut.parquet")
    common = ["--space", str(files["space"]), "--devices-file", str(files["devices"]), "--quiet"]
    blocks = len(collect_block_configs(tiny, patience=30, show_progress=False).blocks)
    fp32 = _cli(capsys, "profile", "lut", *common, "--out", lut, "--patience", "30")
    int8 = _cli(capsys, "profile", "lut", *common, "--out", lut, "--patience", "30", "--precision", "int8")
    assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
    assert fp32["measured"] == int8["measured"] == int8["blocks"] == blocks
    again = _cli(capsys, "profile", "lut", *common, "--out", lut, "--patience", "30", "--precision", "int8")
    assert again["measured"] == 0 and again["reused"] == blocks and again["lut_build_s"] == int8["lut_build_s"]

    table, meta = read_lut(lut)
    key8, key32 = (TableKey.of(tiny, LOCAL_CPU, p) for p in ("int8", "fp32"))
    assert sorted(meta) == sorted([key8.id, key32.id]) and key8.id.endswith("|int8")
    assert table.groupby("precision").size().to_dict() == {"fp32": blocks, "int8": blocks}
    rows8, info8 = load_group(lut, key8)
    rows32, _ = load_group(lut, key32)
    assert set(rows8["key"]) == set(rows32["key"]) and info8["precision"] == "int8"
    assert (rows8["latency_ms"] >= 0).all() and (rows8["runs"] >= 50).all() and (rows8["reference_ms"] > 0).all()
    # Measured, not copied: the int8 timings are not the fp32 ones
    assert not np.allclose(rows8.set_index("key")["median_ms"], rows32.set_index("key").loc[rows8["key"], "median_ms"])

    cal = _cli(capsys, "profile", "calibrate", *common, "--lut", lut, "-n", "3", "--precision", "int8")
    assert cal["precision"] == "int8" and cal["n"] == 3 and all(m > 0 for m in cal["measured_ms"])
    summary = _cli(capsys, "profile", "validate", *common, "--lut", lut, "-n", "4", "--precision", "int8",
                   "--json", "--no-recheck")
    assert summary["precision"] == "int8" and summary["n"] == 4 and summary["calibration_n"] == 3
    assert summary["lut_blocks"] == blocks and summary["missing_keys"] == 0
    assert all(np.isfinite(m["mape"]) for m in summary["models"].values())

    stored = json.loads((tmp_path / "tiny.lut.calibration.json").read_text())
    assert list(stored["groups"]) == [key8.id]  # fp32 was never calibrated here
    group = stored["groups"][key8.id]
    assert group["precision"] == "int8" and group["measured_ms"] == cal["measured_ms"]
    model = load_latency_model("lut", lut, supernet=tiny, devices_file=files["devices"], precision="int8")
    kappa, epsilon = (group["models"]["lut"]["calibration"][k] for k in ("slope", "intercept"))
    on_int8 = dict(zip(rows8["key"], rows8["latency_ms"]))
    archs = [tiny.space.min_arch(), tiny.space.max_arch(), tiny.space.sample(np.random.default_rng(4))]
    for arch in archs:
        raw = sum(on_int8[b.key] for b in tiny.blocks(arch))
        assert model.raw(arch) == pytest.approx(raw)
        assert np.isfinite(model.predict(arch)) and model.predict(arch) == pytest.approx(kappa * raw + epsilon)
    with pytest.raises(UserError, match=rf"no calibration for {re.escape(key32.id)}"):
        load_latency_model("lut", lut, supernet=tiny, devices_file=files["devices"])  # fp32: a table, no calibration


def test_measured_subnets_carry_their_precision_and_context_luts_work_at_int8(ray_local, tiny):
    """Each device converts the FP32 subnet itself: the records say the precision and the converted size.
    An int8 LUT built in context credits every block of the profiled int8 subnets."""
    from raynas.hw.lut import build_lut
    from raynas.hw.profiling import measure_subnets
    from raynas.hw.remote import start_profiler

    arch = tiny.space.max_arch()
    profiler = start_profiler(replace(LOCAL_CPU, protocol=QUICK))
    try:
        (fp32,), (int8,) = (measure_subnets(tiny, [arch], [profiler], show_progress=False, precision=p)["local-cpu"]
                            for p in ("fp32", "int8"))
        rows, meta = build_lut(tiny, [profiler], patience=30, method="context", precision="int8", show_progress=False)
    finally:
        profiler.stop()
    info = meta[TableKey.of(tiny, LOCAL_CPU, "int8").id]
    assert info["method"] == "context" and info["precision"] == "int8" and info["subnets"] >= 2
    assert set(rows["key"]) == set(collect_block_configs(tiny, patience=30, show_progress=False).blocks)
    assert (rows["precision"] == "int8").all() and (rows["clock"] == "profile").all()
    assert (rows["latency_ms"] > 0).all() and (rows["runs"] >= 2).all()
    model, _ = subnet_onnx(tiny, arch)
    assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
    assert fp32["size_mb"] == pytest.approx(len(model) / 1e6)
    assert int8["size_mb"] == pytest.approx(len(convert(model, "int8")) / 1e6) and int8["size_mb"] < fp32["size_mb"]


def test_quantized_subnet_nodes_are_credited_to_their_blocks(tiny):
    """onnxruntime's quantizer names a weight's DequantizeLinear after the weight (`onnx::Conv_12_...`, no block
    scope); it runs before its Conv, i.e. after the previous block's last node. `scope_nodes` names every
    such node into the block of the node it feeds, so in-context profiling credits int8 subnets correctly."""
    arch = tiny.space.max_arch()
    model, shape = subnet_onnx(tiny, arch)
    quantized = onnx.load_from_string(convert(model, "int8"))
    weights = {t.name for t in quantized.graph.initializer}
    unscoped = [n.name for n in quantized.graph.node if not n.name.startswith("/")]
    assert any(n.op_type == "DequantizeLinear" and n.input[0] in weights and n.name in unscoped
               for n in quantized.graph.node)

    scoped_bytes = scope_nodes(quantized.SerializeToString())
    scoped = onnx.load_from_string(scoped_bytes)
    blocks = len(tiny.blocks(arch))
    for node in scoped.graph.node:
        assert node.name.split("/")[1] in {str(i) for i in range(blocks)}, node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in weights:  # in the scope of what reads it
            readers = [m for m in scoped.graph.node if node.output[0] in m.input]
            assert readers and node.name.split("/")[1] == readers[0].name.split("/")[1], node.name
    # Nodes that had a scope keep their names, nothing else changes; the graph runs and every block gets time
    for before, after in zip(quantized.graph.node, scoped.graph.node, strict=True):
        assert after.name == before.name if before.name.startswith("/") else after.name.endswith(f"/{before.name}")
        assert (after.op_type, after.input, after.output) == (before.op_type, before.input, before.output)
    _, per_run = node_times(scoped_bytes, shape, replace(LOCAL_CPU, protocol=QUICK))
    per_block = block_times(per_run)
    assert sorted(per_block) == list(range(blocks)) and all(ms > 0 for ms in per_block.values())


def test_lut_and_calibration_from_before_precisions_read_as_fp32(tiny, tmp_path):
    """Files written before precisions existed: no `precision` column, groups and calibrations keyed
    space|device|runtime|resolution|num_classes. Read as fp32, they serve the fp32 model; an int8 group
    written into the same file stays beside them."""
    old_key = TableKey.of(tiny, LOCAL_CPU)
    old_id = "|".join(str(v) for k, v in asdict(old_key).items() if k != "precision")
    assert old_key.legacy_id == old_id and TableKey.of(tiny, LOCAL_CPU, "int8").legacy_id is None
    catalogue = collect_block_configs(tiny, patience=30, show_progress=False)
    old_columns = [c for c in TABLE_COLUMNS if c != "precision"]
    rows = [{**dict.fromkeys(old_columns, 1.0), **{c: getattr(old_key, c) for c in GROUP_COLUMNS[:-1]}, "key": k,
             "in_shape": "[]", "clock": "thread", "node_id": "n", "hostname": "h", "latency_ms": 0.5,
             "latency_raw_ms": 0.5, "reference_ms": 0.2} for k in catalogue.blocks]
    old_meta = {old_id: {**{c: getattr(old_key, c) for c in GROUP_COLUMNS[:-1]}, "blocks": len(rows)}}
    arrow = pa.Table.from_pandas(pd.DataFrame(rows, columns=old_columns), preserve_index=False)
    lut = tmp_path / "old.lut.parquet"
    pq.write_table(arrow.replace_schema_metadata({META_KEY: json.dumps(old_meta).encode()}), lut)
    calibration = {"format": 1, "groups": {old_id: {"n": 2, "archs": [], "models": {
        k: {"calibration": {"slope": 2.0, "intercept": 0.25}} for k in MODEL_KINDS}}}}
    (tmp_path / "old.lut.calibration.json").write_text(json.dumps(calibration))

    table, meta = read_lut(lut)
    assert list(table.columns) == TABLE_COLUMNS and (table["precision"] == "fp32").all()
    assert list(meta) == [old_key.id] and meta[old_key.id]["precision"] == "fp32"
    assert load_calibration(calibration_path(lut), old_key)["models"]["lut"]["calibration"]["slope"] == 2.0
    model = load_latency_model("lut", lut, supernet=tiny)
    arch = tiny.space.max_arch()
    assert model.predict(arch) == pytest.approx(2.0 * 0.5 * len(tiny.blocks(arch)) + 0.25)

    int8 = table.assign(precision="int8", latency_ms=0.125, latency_raw_ms=0.125)
    key8 = TableKey.of(tiny, LOCAL_CPU, "int8")
    write_lut(lut, int8, {key8.id: {**asdict(key8), "blocks": len(int8)}})
    both, meta = read_lut(lut)
    assert sorted(meta) == sorted([old_key.id, key8.id])
    assert both.groupby("precision")["latency_ms"].max().to_dict() == {"fp32": 0.5, "int8": 0.125}
    assert load_latency_model("lut", lut, supernet=tiny, require_calibration=False,
                              precision="int8").raw(arch) == pytest.approx(0.125 * len(tiny.blocks(arch)))


def test_precision_the_device_does_not_run_is_one_line(files, tmp_path, capsys):
    from raynas.cli import main

    for command, option in (("lut", ["--out", str(tmp_path / "x.parquet")]),
                            ("calibrate", ["--lut", str(tmp_path / "x.parquet")]),
                            ("validate", ["--lut", str(tmp_path / "x.parquet")])):
        assert main(["profile", command, "--space", str(files["space"]), "--precision", "fp16", *option]) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("raynas: error: --precision: device 'local-cpu' does not run 'fp16'; "
                       "allowed: ['fp32', 'int8']"), err
    assert main(["profile", "lut", "--space", str(files["space"]), "--precision", "bf16",
                 "--out", str(tmp_path / "x.parquet")]) == 2
    assert "--precision: 'bf16' is not allowed; allowed: ['fp32', 'fp16', 'int8']" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
    with pytest.raises(UserError, match=r"^precision: device 'local-cpu' does not run 'fp16'"):
        load_latency_model("lut", tmp_path / "x.parquet", supernet=build_supernet(load_space(files["space"])),
                           precision="fp16")


def test_profile_all_runs_each_precision_on_the_devices_that_run_it():
    """`pipelines/profile_devices.py --precisions fp32,int8,fp16`: a device is skipped (with a line saying what
    it runs) at a precision it does not run; a precision that no device runs is refused."""
    from raynas.hw.profile_all import precisions_to_profile

    cpu, gpu = LOCAL_CPU, replace(LOCAL_CPU, name="gpu", runtime="cuda", protocol=replace(QUICK, clock="wall"))
    chosen, skipped = precisions_to_profile([cpu, gpu], ["fp32", "int8", "fp16", "int8"])
    assert chosen == {"fp32": ["local-cpu", "gpu"], "int8": ["local-cpu"], "fp16": ["gpu"]}
    assert skipped == ["gpu: does not run int8 (it runs ['fp32', 'fp16'])",
                       "local-cpu: does not run fp16 (it runs ['fp32', 'int8'])"]
    with pytest.raises(UserError, match=r"^--precisions: device 'local-cpu' does not run 'fp16'; "
                                        r"allowed: \['fp32', 'int8'\]$"):
        precisions_to_profile([cpu], ["fp32", "fp16"])
