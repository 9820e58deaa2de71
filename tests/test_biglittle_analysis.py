"""Seed 002's analysis of a routed pair: ECE and reliability bins, per-class exit rates, the tau sweep and
the MACs-vs-latency points on hand-computed inputs; `raynas biglittle evaluate --out` writing the figures
and the Parquet tables that agree with its JSON."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _biglittle_tiny import tiny_space

from raynas.biglittle import analysis
from raynas.biglittle.costs import PairCosts
from raynas.biglittle.coupling import CoupledSupernet, save_coupled
from raynas.biglittle.deploy import export_pair
from raynas.biglittle.evaluate import eval_data
from raynas.biglittle.metrics import PairPredictions, expected_calibration_error, tau_curve
from raynas.cli import main as cli_main

LITTLE_RIGHT = np.array([0, 1, 1, 1], bool)
BIG_RIGHT = np.array([1, 1, 0, 1], bool)
SCORES = np.array([0.2, 0.5, 0.8, 0.95])


def test_reliability_and_ece_by_hand():
    # two inputs at confidence 0.9 (one right), two at 0.62 (both right): bins (13/15, 14/15] and (9/15, 10/15]
    # ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.62| = 0.2 + 0.19
    t = analysis.reliability([0.9, 0.9, 0.62, 0.62], [1, 0, 1, 1])
    assert len(t) == 15 and t["count"].sum() == 4
    filled = t[t["count"] > 0].set_index("bin")
    assert list(filled.index) == [9, 13]
    assert filled.loc[13, "accuracy"] == pytest.approx(0.5) and filled.loc[13, "confidence"] == pytest.approx(0.9)
    assert filled.loc[9, "gap"] == pytest.approx(0.38) and filled.loc[9, "share"] == pytest.approx(0.5)
    assert t.loc[0, "lower"] == 0.0 and t.loc[14, "upper"] == 1.0 and np.isnan(t.loc[0, "accuracy"])
    assert analysis.ece_of(t) == pytest.approx(0.39)
    # bins are right-closed, the first closed at 0 too: 1/15 is in bin 0, 2/15 in bin 1, 1.0 in bin 14
    edges = analysis.reliability([0.0, 1 / 15, 2 / 15, 1.0], [1, 1, 1, 1])
    assert edges["count"].tolist() == [2, 1] + [0] * 12 + [1]
    # a calibrated set: confidence 0.75 and three of four right
    assert analysis.expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_ece_of_softmax_is_the_metrics_ece(rng):
    logits = rng.normal(size=(200, 5)) * 3
    labels = rng.integers(0, 5, 200)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = analysis.reliability(probs.max(1), probs.argmax(1) == labels)
    assert analysis.ece_of(t) == pytest.approx(expected_calibration_error(probs, labels))
    # by the definition, bin by bin
    idx = np.minimum((np.ceil(probs.max(1) * 15) - 1).clip(0), 14).astype(int)
    ece = sum(abs((probs.argmax(1) == labels)[idx == b].mean() - probs.max(1)[idx == b].mean()) * (idx == b).mean()
              for b in range(15) if (idx == b).any())
    assert analysis.ece_of(t) == pytest.approx(ece)


def test_exit_rates_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    to_little = np.array([1, 1, 0, 0, 1, 0], bool)
    little_right = np.array([1, 0, 1, 1, 1, 0], bool)
    big_right = np.array([1, 1, 1, 0, 0, 1], bool)
    r = analysis.exit_rates(labels, to_little, little_right, big_right, num_classes=4).set_index("class")
    assert r["samples"].tolist() == [3, 2, 1, 0]
    assert r["to_little"].tolist() == [2, 1, 0, 0] and r["to_big"].tolist() == [1, 1, 1, 0]
    assert r.loc[0, "exit_rate"] == pytest.approx(2 / 3) and r.loc[1, "exit_rate"] == pytest.approx(0.5)
    assert r.loc[2, "exit_rate"] == 0.0 and np.isnan(r.loc[3, "exit_rate"])  # no inputs of class 3
    # class 0: little right on 2 of 3, big on 3; routed = little, little, big -> right, wrong, right
    assert r.loc[0, "little_accuracy"] == pytest.approx(2 / 3) and r.loc[0, "big_accuracy"] == 1.0
    assert r.loc[0, "routed_accuracy"] == pytest.approx(2 / 3)
    assert r.loc[1, "routed_accuracy"] == pytest.approx(0.5)       # big wrong on input 3, little right on 4
    assert list(analysis.exit_rates(labels, to_little).columns) == ["class", "samples", "to_little", "to_big",
                                                                    "exit_rate"]


def test_tau_sweep_by_hand_and_as_the_metrics_curve():
    s = analysis.tau_sweep(SCORES, LITTLE_RIGHT, BIG_RIGHT, [0.0, 0.5, 0.9, 1.0], macs_little=10, macs_big=100)
    assert s["routing_ratio"].tolist() == [1.0, 0.75, 0.25, 0.0]
    # tau 0.5: big on input 0 (right), little on 1-3 (right) -> 1.0; tau 0.9: big, big, big (wrong), little
    assert s["accuracy"].tolist() == pytest.approx([0.75, 1.0, 0.75, 0.75])
    assert s["e_macs"].tolist() == pytest.approx([10, 32.5, 77.5, 100])
    assert analysis.largest_step(s) == pytest.approx(0.25)

    # the same numbers as metrics.tau_curve with a PairCosts (E[MACs] = p cost(little) + (1-p) cost(big))
    labels = np.array([0, 1, 2, 3])
    logits = np.eye(4)[np.where(LITTLE_RIGHT, labels, (labels + 1) % 4)] * 5
    big_logits = np.eye(4)[np.where(BIG_RIGHT, labels, (labels + 1) % 4)] * 5
    pred = PairPredictions(labels, big_logits, logits, SCORES)
    costs = PairCosts("pre", True, macs={"trunk": 4, "little": 6, "big": 96, "router": 1},
                      params=dict.fromkeys(("trunk", "little", "big", "router"), 1), activation_elems={"little": 1,
                                                                                                        "big": 1})
    curve = tau_curve(pred, s["tau"], costs)
    assert [r["accuracy"] for r in curve] == pytest.approx(s["accuracy"].tolist())
    assert [r["e_macs"] for r in curve] == pytest.approx(s["e_macs"].tolist())


def _manifest(device, precision, macs, ms):
    return {"measured_on": device, "precision": precision, "costs": {"macs": macs}, "piece_ms": ms}


def test_measured_points_and_macs_latency_fit_by_hand():
    manifests = {
        "a": _manifest("cpu", "fp32", {"trunk": 1_000, "little": 2_000, "big": 4_000, "router": 10},
                       {"trunk": 1.0, "little": 2.0, "big": 4.0}),   # router not timed: no row
        "b": _manifest("cpu", "int8", {"trunk": 1_000, "little": 2_000, "big": 4_000, "router": 10},
                       {"little": 1.5, "big": 1.0}),
        "c": _manifest("gpu", "fp32", {"trunk": 0, "little": 1, "big": 2, "router": 0}, {}),  # timed nothing
    }
    p = analysis.measured_points(manifests)
    assert len(p) == 5 and set(p["models"]) == {"a", "b"}
    assert p[(p["models"] == "a") & (p["piece"] == "big")][["macs", "latency_ms"]].values.tolist() == [[4000, 4.0]]
    fit = analysis.macs_latency_fit(p).set_index("precision")
    assert fit.loc["fp32", "points"] == 3 and fit.loc["fp32", "pearson"] == pytest.approx(1.0)
    assert fit.loc["fp32", "spearman"] == pytest.approx(1.0)
    assert fit.loc["int8", "points"] == 2 and np.isnan(fit.loc["int8", "spearman"])  # too few points
    assert analysis.measured_points({}).empty


def _model():
    torch.manual_seed(3)
    model = CoupledSupernet(tiny_space(), "partial", splits=[2, 4], router="learned", router_hidden=8)
    with torch.no_grad():  # spread the scores: a fresh router says ~0.5 and a fresh little ~1/10 everywhere
        for p in model.router.parameters():
            p.normal_(0, 0.5)
        model.little_supernet.head.classifier.weight.mul_(30)
    return model


DATA = json.dumps({"name": "synthetic", "num_samples": 64, "num_val_samples": 40, "image_size": 8,
                   "channels": 3, "noise": 0.3})


def test_cli_evaluate_writes_the_analysis(ray_local, tmp_path, capsys):
    model = _model()
    ckpt = save_coupled(model, tmp_path / "supernet.pt")
    models = tmp_path / "deploy"  # pieces timed on local-cpu
    manifest = export_pair(model, model.pair_space.extreme_pair(), eval_data(json.loads(DATA), 16, 3, bn_samples=64),
                           models, 0.5)

    out = tmp_path / "analysis"
    assert cli_main(["biglittle", "evaluate", "--checkpoint", str(ckpt), "--data", DATA, "--bn-samples", "64",
                     "--tau", "0.5", "--out", str(out), "--models", str(models)]) == 0
    report = json.loads(capsys.readouterr().out)
    a = report["analysis"]
    for name in ("reliability", "exit_histogram", "tau_sensitivity", "latency_macs"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert set(a["files"]) == {p.name for p in out.iterdir()}
    assert {"exit_rates.md", "analysis.md", "latency_macs_fit.parquet"} <= set(a["files"])

    rel = pd.read_parquet(out / "reliability.parquet")
    assert set(rel["score"]) == {"little_confidence", "router_score"}
    little = rel[rel["score"] == "little_confidence"]
    assert little["count"].sum() == 40 and len(little) == 15
    assert analysis.ece_of(little) == pytest.approx(a["ece"]["little_confidence"])
    assert a["ece"]["little_confidence"] == pytest.approx(report["at_tau"]["ece_little"])
    assert analysis.ece_of(rel[rel["score"] == "router_score"]) == pytest.approx(a["ece"]["router_score"])

    rates = pd.read_parquet(out / "exit_rates.parquet")
    assert rates["samples"].sum() == 40 and len(rates) == 10
    for cls, rate in zip(rates["class"], rates["exit_rate"]):
        assert rate == pytest.approx(a["exit_rates"][str(cls)], nan_ok=True)
    # the share over all inputs is the routing ratio at the pair's tau
    assert rates["to_little"].sum() / 40 == pytest.approx(a["exit_rate"])
    assert a["exit_rate"] == pytest.approx(report["at_tau"]["routing_ratio"])
    assert "| class | samples |" in (out / "exit_rates.md").read_text()

    sweep = pd.read_parquet(out / "tau_sensitivity.parquet")
    assert sweep["tau"].tolist() == pytest.approx(np.linspace(0, 1, 21).tolist())
    for row, printed in zip(sweep.to_dict("records"), a["tau_sensitivity"], strict=True):
        assert row == pytest.approx(printed)
    assert sweep["routing_ratio"].is_monotonic_decreasing and sweep["routing_ratio"].iloc[0] == 1.0
    at_half = sweep[np.isclose(sweep["tau"], 0.5)].iloc[0]
    assert at_half["accuracy"] == pytest.approx(report["at_tau"]["accuracy"])
    assert at_half["e_macs"] == pytest.approx(report["at_tau"]["e_macs"])

    points = pd.read_parquet(out / "latency_macs.parquet")
    timed = manifest["piece_ms"]
    assert dict(zip(points["piece"], points["latency_ms"])) == pytest.approx(timed)
    assert dict(zip(points["piece"], points["macs"])) == {k: manifest["costs"]["macs"][k] for k in timed}
    assert set(points["device"]) == {"local-cpu"} and set(points["precision"]) == {"fp32"}
    fit = pd.read_parquet(out / "latency_macs_fit.parquet")
    assert fit.drop(columns=["device", "precision"]).to_dict("records") == [
        pytest.approx({k: v for k, v in r.items() if k not in ("device", "precision")}, nan_ok=True)
        for r in a["latency_macs"]]


def test_cli_evaluate_without_measured_models_notes_it(ray_local, tmp_path, capsys):
    ckpt = save_coupled(_model(), tmp_path / "supernet.pt")
    out = tmp_path / "analysis"
    assert cli_main(["biglittle", "evaluate", "--checkpoint", str(ckpt), "--data", DATA, "--bn-samples", "64",
                     "--router", "confidence", "--taus", "0.2,0.6", "--out", str(out)]) == 0
    a = json.loads(capsys.readouterr().out)["analysis"]
    assert "no measured exports" in a["latency_macs"] and not (out / "latency_macs.png").exists()
    assert "no measured exports" in (out / "analysis.md").read_text()
    assert set(pd.read_parquet(out / "reliability.parquet")["score"]) == {"little_confidence"}  # no pre-router
    assert pd.read_parquet(out / "tau_sensitivity.parquet")["tau"].tolist() == [0.2, 0.6]
    assert set(a["files"]) == {p.name for p in out.iterdir()}


def test_cli_evaluate_refuses_a_directory_without_a_manifest(tmp_path, capsys):
    code = cli_main(["biglittle", "evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--out",
                     str(tmp_path / "a"), "--models", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--models: " in err[0] and "manifest.json" in err[0], err
