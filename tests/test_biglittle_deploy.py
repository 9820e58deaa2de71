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
