"""Deployment: big / little / router (+ trunk) exported as ONNX, and the routed runner in onnxruntime
agreeing input by input with the PyTorch pair it came from."""

import json

import numpy as np
import pytest
import torch
from _biglittle_tiny import tiny_space

from raynas import storage
from raynas.biglittle.coupling import CoupledSupernet, save_coupled
from raynas.biglittle.deploy import RoutedRunner, export_pair, read_manifest, run_routed
from raynas.biglittle.evaluate import eval_data, predict_pair
from raynas.cli import main as cli_main
from raynas.errors import UserError

DATA = {"name": "synthetic", "num_samples": 64, "num_val_samples": 24, "image_size": 8, "channels": 3,
        "noise": 0.3}


def _model(coupling, router):
    torch.manual_seed(1)
    model = CoupledSupernet(tiny_space(), coupling, splits=[2, 4] if coupling == "partial" else None,
                            router=router, router_hidden=8)
    with torch.no_grad():  # spread the scores: a fresh router says ~0.5 and a fresh little ~1/10 everywhere
        for p in model.router.parameters():
            p.normal_(0, 0.5)
        model.little_supernet.head.classifier.weight.mul_(50)
    return model


@pytest.mark.parametrize("coupling,router,measure", [("nested", "learned", False),
                                                     ("partial", "confidence", True),
                                                     ("sibling", "difficulty", False)])
def test_routed_onnx_runner_matches_pytorch(coupling, router, measure, ray_local, tmp_path):
    model = _model(coupling, router)
    data = eval_data(DATA, 16, 3, bn_samples=64)
    pair = model.pair_space.extreme_pair()
    pred = predict_pair(model, pair, data)
    scores = pred.scores()
    tau = float(np.median(scores))
    manifest = export_pair(model, pair, data, tmp_path, tau, measure_device="local-cpu" if measure else None)

    expected_files = {"little.onnx", "big.onnx", "manifest.json"}
    if model.router.stage == "pre":
        expected_files.add("router.onnx")
    if model.layout(pair).has_trunk:
        expected_files.add("trunk.onnx")
    assert expected_files <= {p.name for p in tmp_path.iterdir()}
    assert max(manifest["onnx_max_abs_diff"].values()) < 1e-4
    assert read_manifest(tmp_path)["pair"] == pair.to_dict()
    if measure:
        assert set(manifest["piece_ms"]) == {k for k, v in manifest["files"].items() if v}
        assert all(v > 0 for v in manifest["piece_ms"].values())

    runner = RoutedRunner(tmp_path)
    images = torch.cat([x for x, _ in data.val_loader])  # the images predict_pair saw, in its order
    to_little = scores >= tau
    routed = np.where(to_little, pred.little_logits.argmax(1), pred.big_logits.argmax(1))
    checked = 0
    for i, x in enumerate(images):
        if abs(scores[i] - tau) < 1e-4:  # a tie at the threshold may go either way in float32
            continue
        got, went_little = runner.predict(x.unsqueeze(0).numpy())
        assert went_little == bool(to_little[i]), i
        assert got == routed[i], i
        checked += 1
    assert checked >= len(images) - 2

    report = run_routed(tmp_path, DATA, limit=12, warmup=2)
    assert report["inputs"] == 12 and 0 <= report["accuracy"] <= 1 and 0 <= report["routing_ratio"] <= 1
    assert report["mean_latency_ms"] > 0
    assert report["always_big"]["mean_latency_ms"] > 0 and report["always_little"]["mean_latency_ms"] > 0
    assert report["e_macs"] <= report["peak_macs"] + 1e-9
    if measure:
        assert report["predicted_e_latency_ms"] > 0 and report["predicted_by"] == "per-piece onnxruntime timings"


def test_cli_export_and_run(ray_local, tmp_path, capsys):
    model = _model("nested", "learned")
    ckpt = save_coupled(model, tmp_path / "supernet.pt")
    out = tmp_path / "deploy"
    data = json.dumps(DATA)
    assert cli_main(["biglittle", "export", "--checkpoint", str(ckpt), "--data", data, "--out", str(out),
                     "--tau", "0.5", "--bn-samples", "64", "--no-measure"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["files"]["router"] == "router.onnx"
    assert cli_main(["biglittle", "run", "--models", str(out), "--data", data, "--limit", "5",
                     "--no-references"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == 5 and "always_big" not in report
    assert cli_main(["biglittle", "evaluate", "--checkpoint", str(ckpt), "--data", data, "--bn-samples", "64",
                     "--taus", "0.0,0.5,1.01"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert [r["routing_ratio"] for r in evaluated["curve"]][::2] == [1.0, 0.0]


def test_runner_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["biglittle", "run", "--models", str(tmp_path), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        read_manifest(tmp_path)
    assert cli_main(["biglittle", "run", "--models", str(tmp_path), "--data", "{not json"]) == 2


def test_cli_export_and_run_in_a_bucket(s3_bucket, ray_local, tmp_path, monkeypatch, capsys):
    """Checkpoint, exported pair and manifest all in object storage; the working directory gains nothing, and
    the pair run from the bucket routes every input as the same pair exported to a local directory."""
    monkeypatch.chdir(tmp_path)
    model = _model("nested", "learned")
    ckpt = save_coupled(model, storage.join(s3_bucket, "train", "supernet.pt"))
    out = storage.join(s3_bucket, "deploy")
    data = json.dumps(DATA)
    assert cli_main(["biglittle", "export", "--checkpoint", ckpt, "--data", data, "--out", out,
                     "--tau", "0.5", "--bn-samples", "64", "--no-measure"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert set(storage.list_dir(out)) == {"manifest.json", *(f for f in exported["files"].values() if f)}
    assert read_manifest(out)["files"] == exported["files"]
    assert cli_main(["biglittle", "run", "--models", out, "--data", data, "--limit", "6", "--no-references"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == [], "the export or the run wrote into the working directory"

    local = tmp_path / "local"
    export_pair(model, model.pair_space.extreme_pair(), eval_data(DATA, 16, 3, bn_samples=64), local, 0.5,
                measure_device=None)
    assert run_routed(local, DATA, limit=6, references=False)["accuracy"] == remote["accuracy"]
    assert RoutedRunner(out).manifest["pair"] == RoutedRunner(local).manifest["pair"]


def test_cli_export_refuses_an_unwritable_out_before_loading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli_main(["biglittle", "export", "--checkpoint", str(tmp_path / "missing.pt"), "--out",
                     str(blocker / "deploy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out: " in err[0] and "not writable" in err[0], err


# ---- precisions ------------------------------------------------------------------------------------------
PREC_DATA = {"name": "synthetic", "num_samples": 128, "num_val_samples": 48, "image_size": 8, "channels": 3,
             "noise": 0.3}


def _trained(steps=40):
    """A partial pair (trunk, both branches and a learned router reading the trunk) trained for a few
    steps on the synthetic training images, its router fitted to the pair: well above chance on
    validation (big ~0.8, little ~0.5), so quantization has accuracy to lose."""
    from raynas.biglittle.evaluate import fit_router

    torch.manual_seed(0)
    model = CoupledSupernet(tiny_space(), "partial", splits=[2, 4], router="learned", router_hidden=8)
    data = eval_data(PREC_DATA, 16, 3, bn_samples=128)
    pair = model.pair_space.extreme_pair()
    (x, y), = list(data.bn_loader)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model.forward_pair(x, pair)
        loss = torch.nn.functional.cross_entropy(out.big, y) + torch.nn.functional.cross_entropy(out.little, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fit_router(model, pair, data, data.bn_loader, epochs=20)
    return model, data


def _op_types(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_precisions_table_on_local_cpu(ray_local, tmp_path, capsys):
    import onnx
    import pandas as pd

    model, data = _trained()
    ckpt = save_coupled(model, tmp_path / "supernet.pt")
    out = tmp_path / "precisions"
    assert cli_main(["biglittle", "precisions", "--checkpoint", str(ckpt), "--data", json.dumps(PREC_DATA),
                     "--bn-samples", "128", "--tau", "0.7", "--calibration-images", "96", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = pd.read_parquet(out / "precisions.parquet")
    assert table.to_dict("records") == printed["rows"]
    assert [(r["precision"], r["model"]) for r in printed["rows"]] == [
        (p, m) for p in ("fp32", "int8") for m in ("big", "little", "routed")]  # local-cpu runs fp32 and int8
    assert "| local-cpu | int8 | routed |" in (out / "precisions.md").read_text()
    assert (table["size_mb"] > 0).all() and (table["latency_ms"] > 0).all() and (table["run_median_ms"] > 0).all()
    assert (table["inputs"] == 48).all()
    by = table.set_index(["precision", "model"])
    assert by.loc[("fp32", "big"), "accuracy"] >= 0.6  # trained: the comparison means something
    for m in ("big", "little", "routed"):
        assert abs(by.loc[("int8", m), "accuracy"] - by.loc[("fp32", m), "accuracy"]) <= 0.15, m
        assert by.loc[("int8", m), "accuracy_vs_fp32"] == pytest.approx(
            by.loc[("int8", m), "accuracy"] - by.loc[("fp32", m), "accuracy"])
        assert by.loc[("fp32", m), "latency_vs_fp32"] == 1.0
    # the pair is every file; each model its trunk and branch
    fp32 = read_manifest(out / "fp32")
    assert by.loc[("fp32", "routed"), "size_mb"] == pytest.approx(sum(fp32["size_mb"].values()))
    assert by.loc[("fp32", "big"), "size_mb"] == pytest.approx(fp32["size_mb"]["trunk"] + fp32["size_mb"]["big"])
    assert by.loc[("fp32", "big"), "latency_ms"] == pytest.approx(fp32["piece_ms"]["trunk"] + fp32["piece_ms"]["big"])

    # the int8 export: QDQ pieces (the router and branches calibrated on the trunk's output), recorded as such
    int8 = read_manifest(out / "int8")
    assert int8["precision"] == "int8" and int8["calibration_images"] == 96 and int8["measured_on"] == "local-cpu"
    for which, name in int8["files"].items():
        if name:
            assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(out / "int8" / name), which
            onnx.checker.check_model(str(out / "int8" / name))
    assert "QuantizeLinear" not in _op_types(out / "fp32" / "big.onnx")
    assert int8["validation_deployed"]["accuracy"] == pytest.approx(by.loc[("int8", "routed"), "accuracy"])

    # int8 answers as fp32 does on most inputs, branch by branch
    images = np.concatenate([x.numpy() for x, _ in data.val_loader])
    got = RoutedRunner(out / "int8").predict_batch(images)
    want = RoutedRunner(out / "fp32").predict_batch(images)
    for which in ("little", "big"):
        assert (got[which] == want[which]).mean() >= 0.8, which

    # `run` of the int8 pair on the device reports its precision
    assert cli_main(["biglittle", "run", "--models", str(out / "int8"), "--data", json.dumps(PREC_DATA),
                     "--device", "local-cpu", "--limit", "8", "--no-references"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["precision"] == "int8" and run["inputs"] == 8


def test_fp16_export_keeps_float32_io_and_answers(ray_local, tmp_path):
    """FP16 (for a device that runs it; not timed here): every piece converted, inputs and outputs float32,
    and the runner's answers those of the FP32 export."""
    import onnx

    model = _model("partial", "learned")
    data = eval_data(DATA, 16, 3, bn_samples=64)
    pair = model.pair_space.extreme_pair()
    m16 = export_pair(model, pair, data, tmp_path / "fp16", 0.5, measure_device=None, precision="fp16")
    export_pair(model, pair, data, tmp_path / "fp32", 0.5, measure_device=None)
    assert m16["precision"] == "fp16" and m16["calibration_images"] is None
    for which, name in m16["files"].items():
        if name:
            g = onnx.load(str(tmp_path / "fp16" / name)).graph
            assert {i.data_type for i in g.initializer if i.data_type in (1, 10)} == {10}, which  # FLOAT16 weights
            assert g.input[0].type.tensor_type.elem_type == 1 and g.output[0].type.tensor_type.elem_type == 1
    # half the bytes per weight (the tiniest pieces may grow by the casts at their edges)
    assert m16["size_mb"]["big"] < 0.7 * read_manifest(tmp_path / "fp32")["size_mb"]["big"]
    images = np.concatenate([x.numpy() for x, _ in data.val_loader])
    got = RoutedRunner(tmp_path / "fp16").predict_batch(images)
    want = RoutedRunner(tmp_path / "fp32").predict_batch(images)
    assert (got["big"] == want["big"]).mean() >= 0.9 and (got["little"] == want["little"]).mean() >= 0.9


def test_precision_the_device_does_not_run_is_one_line(tmp_path, capsys):
    from raynas.hw.devices import get_device

    with pytest.raises(UserError) as exc:
        get_device("local-cpu").check_precision("fp16", "--precision")
    expected = str(exc.value)
    assert "local-cpu" in expected and "fp16" in expected
    ckpt = str(tmp_path / "missing.pt")  # refused before the checkpoint is read
    for argv, flag in ((["export", "--out", str(tmp_path / "d"), "--precision", "fp16"], "--precision"),
                       (["precisions", "--out", str(tmp_path / "p"), "--precisions", "fp32,fp16"], "--precisions")):
        assert cli_main(["biglittle", *argv, "--checkpoint", ckpt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(expected.replace("--precision:", f"{flag}:")), err
    assert cli_main(["biglittle", "export", "--checkpoint", ckpt, "--out", str(tmp_path / "d"), "--precision",
                     "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--precision: " in err and "fp32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()
