"""A subnet exported at the precision a board runs: FP16 and INT8 (static QDQ, per-channel) converted from the
verified FP32 graph, its accuracy measured in onnxruntime (raynas.hw.onnx_accuracy), and `raynas export
--precision` end to end on a checkpoint trained on digits, its data found through the run's config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from _biglittle_tiny import TINY as MBV3_TINY

from raynas.cli import main as cli_main
from raynas.hw.onnx_accuracy import calibration_batches, labelled_arrays, onnx_accuracy, ort_session
from raynas.hw.onnx_export import export_onnx, verified_onnx
from raynas.hw.precision import seeded_batches
from raynas.space import load_space, space_from_config
from raynas.space.loader import builtin_spaces_dir
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import load_supernet, save_supernet
from raynas.train.bn import recalibrate_bn

REPO = Path(__file__).resolve().parents[1]
SPACE_YAML = REPO / "pipelines" / "configs" / "search_space_nb201_tiny.yaml"  # 16 px digits, 64 archs
DATA = {"name": "digits"}
ARCH = {"edge_1_0": "nor_conv_3x3", "edge_2_0": "nor_conv_3x3", "edge_2_1": "nor_conv_1x1"}  # of SPACE_YAML
DIGITS_VAL = 359  # digits' hold-out split: 20% of 1797 images


def _nb201(channels: list[int]) -> dict:
    cfg = yaml.safe_load((builtin_spaces_dir() / "nb201.yaml").read_text())
    cfg.update(name=f"nb201-{channels[-1]}", channels=channels, cells_per_stage=1, resolution=32, num_classes=10)
    return cfg


def _subnet(cfg: dict, seed: int = 0):
    """The largest subnet of a fresh supernet of `cfg` (32 px) with weights unlike a fresh build's and its BN
    statistics fitted, so activations and logits have the spread of a trained network's."""
    torch.manual_seed(seed)
    supernet = build_supernet(space_from_config(cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in supernet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    arch = supernet.space.max_arch()
    recalibrate_bn(supernet, arch, [torch.randn(supernet.input_shape(64), generator=generator)], 64)
    return supernet.extract(arch).eval(), supernet.input_shape(1)


def _inputs(shape: tuple[int, ...], n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


def _initializers(model: bytes) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load_from_string(model).graph.initializer}


# ---- conversion ----------------------------------------------------------------------------------------------------
def test_fp16_answers_as_fp32_with_half_the_weight_bytes():
    subnet, shape = _subnet(dict(MBV3_TINY, resolution=32))
    verified = verified_onnx(subnet, shape, "fp16")
    x = _inputs(shape, 8)
    fp32 = ort_session(verified.fp32).run(None, {"input": x})[0]
    fp16 = ort_session(verified.model).run(None, {"input": x})[0]
    assert fp16.dtype == np.float32  # the graph's edges stay float32: callers feed the same tensors
    scale = float(np.abs(fp32).max())
    np.testing.assert_allclose(fp16, fp32, atol=1e-2 * scale, rtol=0)
    assert (fp16.argmax(1) == fp32.argmax(1)).all()
    assert 0 < verified.info["max_abs_diff_vs_fp32"] <= 1e-2 * scale
    weights32, weights16 = _initializers(verified.fp32), _initializers(verified.model)
    assert {i.data_type for i in weights16.values()} == {onnx.TensorProto.FLOAT16}
    assert sum(len(i.raw_data) for i in weights16.values()) * 2 == sum(len(i.raw_data) for i in weights32.values())
    assert verified.info["size_mb"] == len(verified.model) / 1e6 < 0.7 * verified.info["fp32_size_mb"]


@pytest.mark.parametrize("channels", [[4, 8, 16], [16, 32, 64]])
def test_int8_is_static_qdq_with_per_channel_int8_weights(channels):
    subnet, shape = _subnet(_nb201(channels))
    verified = verified_onnx(subnet, shape, "int8", seeded_batches((8, *shape[1:]), count=4))
    model = onnx.load_from_string(verified.model)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights32, weights8 = _initializers(verified.fp32), _initializers(verified.model)
    quantized = {name: w for name, w in weights8.items()  # zero points are int8 too: the weights are renamed
                 if w.data_type == onnx.TensorProto.INT8 and name.endswith("_quantized")}
    conv_weights = {n.input[1] for n in onnx.load_from_string(verified.fp32).graph.node if n.op_type == "Conv"}
    assert conv_weights and conv_weights <= {name.removesuffix("_quantized") for name in quantized}
    dequantize = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name, weight in quantized.items():
        original = weights32[name.removesuffix("_quantized")]
        assert list(weight.dims) == list(original.dims)
        assert len(weight.raw_data) * 4 == len(original.raw_data)  # 1 byte a weight instead of 4
        if original.name in conv_weights:  # one scale per output channel
            node = dequantize[name]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert axis == 0 and list(weights8[node.input[1]].dims) == [weight.dims[0]] and weight.dims[0] > 1
    # The file: per-channel scales, zero points and the Q/DQ nodes cost a fixed overhead per layer, so only a
    # subnet with enough weights shrinks much (measured: 0.104 -> 0.083 MB at 4-16 channels, 1.47 -> 0.44 at 16-64).
    ratio = verified.info["size_mb"] / verified.info["fp32_size_mb"]
    assert ratio < (0.35 if channels[-1] == 64 else 1.0)
    assert np.isfinite(verified.info["max_abs_diff_vs_fp32"])


def test_export_writes_the_converted_model_and_keeps_the_fp32_default(tmp_path):
    subnet, shape = _subnet(dict(MBV3_TINY, resolution=32))
    plain = export_onnx(subnet, shape, tmp_path / "fp32.onnx")  # the signature every caller already uses
    assert plain["precision"] == "fp32" and plain["size_mb"] == plain["fp32_size_mb"]
    assert plain["max_abs_diff_vs_fp32"] == 0.0
    assert (tmp_path / "fp32.onnx").stat().st_size / 1e6 == plain["size_mb"]
    half = export_onnx(subnet, shape, tmp_path / "fp16.onnx", precision="fp16")
    assert (tmp_path / "fp16.onnx").stat().st_size / 1e6 == half["size_mb"] < half["fp32_size_mb"] == plain["size_mb"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "fp16.onnx")))


# ---- accuracy in onnxruntime -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixed_batch", [None, 4])
def test_onnx_accuracy_is_the_torch_accuracy(fixed_batch, tmp_path):
    subnet, shape = _subnet(dict(MBV3_TINY, resolution=32))
    images = _inputs(shape, 50)
    with torch.no_grad():
        predicted = subnet(torch.from_numpy(images)).argmax(1).numpy()
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(50) < 0.7, predicted, rng.integers(0, 10, 50))  # some right, some wrong
    expected = float((predicted == labels).mean())
    assert 0.6 < expected < 0.95
    export_shape = shape if fixed_batch is None else (fixed_batch, *shape[1:])
    export_onnx(subnet, export_shape, tmp_path / "m.onnx", dynamic_batch=fixed_batch is None)
    # 50 images: batches of 7 (the last one short) on a dynamic axis; of 4 (the last one padded) on a fixed one
    assert onnx_accuracy(tmp_path / "m.onnx", images, labels, batch_size=7) == expected
    assert onnx_accuracy((tmp_path / "m.onnx").read_bytes(), images, labels) == expected


def test_onnx_accuracy_refuses_arrays_that_do_not_fit(tmp_path):
    subnet, shape = _subnet(dict(MBV3_TINY, resolution=32))
    export_onnx(subnet, shape, tmp_path / "m.onnx")
    images = _inputs(shape, 4)
    with pytest.raises(Exception, match=r"^labels: 3 labels for 4 images; allowed: one label per image"):
        onnx_accuracy(tmp_path / "m.onnx", images, np.zeros(3, int))
    with pytest.raises(Exception, match=r"^images: shape \(4, 3, 16, 16\) does not fit the model's input"):
        onnx_accuracy(tmp_path / "m.onnx", images[:, :, :16, :16], np.zeros(4, int))


def test_calibration_batches_are_a_seeded_draw():
    images = np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1)
    batches = calibration_batches(images, 40, batch_size=16, seed=3)
    assert [len(b) for b in batches] == [16, 16, 8]
    drawn = np.concatenate(batches).ravel()
    assert len(set(drawn)) == 40 and drawn.dtype == np.float32
    again = np.concatenate(calibration_batches(images, 40, batch_size=16, seed=3)).ravel()
    other = np.concatenate(calibration_batches(images, 40, batch_size=16, seed=4)).ravel()
    assert (drawn == again).all() and set(drawn) != set(other)
    assert len(np.concatenate(calibration_batches(images, 500))) == 100  # all of them when there are fewer


# ---- raynas export --precision, on a trained checkpoint -------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    from conftest import start_local_ray

    return start_local_ray()


@pytest.fixture(scope="module")
def run_dir(ray_local, tmp_path_factory) -> Path:
    """A run directory as `raynas train` leaves it (supernet.pt, epoch_0002/supernet.pt beside config.yaml), of
    the tiny NB201 space trained briefly in process on digits: ARCH alone, on the training split materialized
    once (un-augmented digits, in a fixed order), which is all an export needs of it."""
    from raynas.data import Batches, Normalizer, eval_dataset, normalization
    from raynas.train.config import validate_train_config

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    space = load_space(str(SPACE_YAML))
    supernet = build_supernet(space)
    train = Batches(eval_dataset(DATA, "train", space.resolution, space.in_channels), 64, "cpu",
                    Normalizer(*normalization(DATA, space.in_channels)))
    optimizer = torch.optim.Adam(supernet.parameters(), lr=0.01)
    arch = space.validate(ARCH)
    supernet.train()
    for _ in range(3):
        for x, y in train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(supernet(x, arch), y).backward()
            optimizer.step()
    save_supernet(supernet.eval(), run / "supernet.pt")
    save_supernet(supernet, run / "epoch_0002" / "supernet.pt")
    cfg = validate_train_config({"name": "digits-run", "space": str(SPACE_YAML), "epochs": 3, "data": DATA})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run



def _export(capsys, *args: str) -> dict:
    assert cli_main(["export", "--space", str(SPACE_YAML), "--arch", json.dumps(ARCH), *args]) == 0, \
        capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_export_int8_calibrates_on_the_training_data_and_measures_accuracy(run_dir, tmp_path, capsys):
    from raynas.biglittle.evaluate import eval_data
    from raynas.train.bn import evaluate_subnet

    out = tmp_path / "int8.onnx"
    result = _export(capsys, "--checkpoint", str(run_dir / "supernet.pt"), "--out", str(out), "--precision", "int8",
                     "--calibration-images", "32", "--bn-samples", "256")
    assert result["precision"] == "int8" and result["calibration"] == "32 training images"
    assert result["data"] == "digits" and result["data_from"] == str(run_dir / "config.yaml")
    assert result["accuracy_images"] == DIGITS_VAL and result["bn_recalibration_images"] == 256
    assert result["accuracy_skipped"] is None
    assert result["size_mb"] == out.stat().st_size / 1e6 and result["fp32_size_mb"] > 0
    # The FP32 accuracy is the supernet's own score of the subnet (BN recalibrated on the same 256 images),
    # as the search's evaluators measure it; ONNX and PyTorch may part on at most one near-tie.
    sets = eval_data(DATA, 16, 3, bn_samples=256)
    torch_accuracy = evaluate_subnet(load_supernet(run_dir / "supernet.pt"), ARCH, sets.bn_loader, sets.val_loader,
                                     256)
    assert abs(result["accuracy_fp32"] - torch_accuracy) <= 1 / DIGITS_VAL
    assert result["accuracy_fp32"] > 0.5  # trained: chance is 0.1
    assert abs(result["accuracy"] - result["accuracy_fp32"]) < 0.1
    # The written file is the INT8 model: it loads in onnxruntime and scores what the command printed.
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    images, labels = labelled_arrays(sets.val_loader)
    assert onnx_accuracy(out, images, labels) == result["accuracy"]


def test_export_fp16_of_an_epoch_checkpoint_finds_its_run_data(run_dir, tmp_path, capsys):
    result = _export(capsys, "--checkpoint", str(run_dir / "epoch_0002" / "supernet.pt"), "--out", f"{tmp_path}/",
                     "--precision", "fp16", "--bn-samples", "256")
    assert result["data_from"] == str(run_dir / "config.yaml") and result["calibration"] is None
    assert result["path"].endswith("-fp16.onnx") and Path(result["path"]).is_file()
    assert abs(result["accuracy"] - result["accuracy_fp32"]) <= 2 / DIGITS_VAL


def test_export_int8_of_a_fresh_supernet_calibrates_on_seeded_inputs(tmp_path, capsys):
    result = _export(capsys, "--out", str(tmp_path / "m.onnx"), "--precision", "int8")
    assert result["calibration"] == "seeded inputs (fit for latency only)"
    assert result["accuracy"] is None and result["accuracy_fp32"] is None
    assert result["accuracy_skipped"] == "no data: no --data and no --checkpoint (a fresh supernet)"
    session = ort_session(tmp_path / "m.onnx")
    assert session.run(None, {"input": _inputs((1, 3, 16, 16), 2)})[0].shape == (2, 10)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_refuses_an_unknown_precision_and_int8_without_training_data(tmp_path, capsys):
    args = ["export", "--space", str(SPACE_YAML), "--arch", json.dumps(ARCH), "--out", str(tmp_path / "m.onnx")]
    assert cli_main([*args, "--precision", "int4"]) == 2
    assert _one_error_line(capsys) == ("raynas: error: --precision: 'int4' is not allowed; allowed: "
                                       "['fp32', 'fp16', 'int8']")
    checkpoint = save_supernet(build_supernet(load_space(str(SPACE_YAML))), tmp_path / "alone.pt")  # no run config
    assert cli_main([*args, "--checkpoint", checkpoint, "--precision", "int8"]) == 2
    assert _one_error_line(capsys) == (
        f"raynas: error: --data: missing (no --data and no run config (config.yaml) beside {checkpoint}); INT8 "
        "calibrates a trained checkpoint on its training images; allowed: a dataset name, JSON object or YAML with "
        "a data section")
    assert not (tmp_path / "m.onnx").exists()
