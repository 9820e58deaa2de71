"""Deploying a routed pair: big, little, router (and the shared trunk) as ONNX, and the per-input runner.

`export_pair` writes into a directory

  trunk.onnx    image -> trunk features (shared stem [+ blocks]); absent when the pair shares nothing
  little.onnx   trunk features (or the image) -> logits
  big.onnx      trunk features (or the image) -> logits
  router.onnx   pre-routers only: trunk features (or the image, when the router brings little's stem)
                -> ease score in [0, 1]
  manifest.json coupling, pair, router and tau, shapes, costs, predicted latency, validation figures

every file verified against PyTorch in onnxruntime. `RoutedRunner` executes the pair one input at a time
as deployed: trunk, then the router's choice (pre-routing), or little then big when little is not
confident enough (cascade). `run_routed` measures accuracy and per-input latency on a labelled set and
reports them beside the predicted E[latency] at the routing ratio it observed.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raynas.biglittle.costs import PairCostModel, PairCosts, PieceLatency
from raynas.biglittle.coupling import CoupledSupernet
from raynas.biglittle.evaluate import EvalData, deployable_pieces, predict_pair
from raynas.biglittle.metrics import evaluate_routing
from raynas.biglittle.routers import CASCADE, PRE
from raynas.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "raynas-biglittle-deploy/1"


def _shape_after(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(module.eval()(torch.zeros(shape)).shape)


def _export(module: nn.Module, shape: tuple[int, ...], path: Path) -> float:
    """`export_onnx` with its tolerance scaled to the output's magnitude: the check feeds Gaussian noise,
    on which a trained branch (reading trunk features) can output logits in the hundreds, where 1e-4
    absolute is below float32 resolution."""
    from raynas.hw.onnx_export import export_onnx

    with torch.no_grad():
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        scale = float(module.eval()(example).abs().max())
    return export_onnx(module, shape, path, atol=1e-4 * max(1.0, scale))["max_abs_diff"]


def _costs_dict(costs: PairCosts) -> dict[str, Any]:
    return {"stage": costs.stage, "has_trunk": costs.has_trunk, "macs": costs.macs, "params": costs.params,
            "activation_elems": costs.activation_elems, "latency_ms": costs.latency_ms, "call_ms": costs.call_ms}


def _costs_from_dict(d: Mapping[str, Any]) -> PairCosts:
    return PairCosts(stage=d["stage"], has_trunk=d["has_trunk"], macs=dict(d["macs"]), params=dict(d["params"]),
                     activation_elems=dict(d["activation_elems"]), latency_ms=d["latency_ms"], call_ms=d["call_ms"])


def export_pair(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData, out_dir: str | Path,
                tau: float, latency: PieceLatency | None = None, measure_device: str | None = "local-cpu",
                devices_file: str | None = None) -> dict[str, Any]:
    """Export the pair's pieces (BN calibrated per model) and a manifest; returns the manifest.

    `latency` (a calibrated latency model of raynas.hw) gives the predicted latency of each piece;
    `measure_device` times each exported piece on this node (batch 1, the device's protocol), which
    predicts E[latency] when no latency model is given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = model.pair_space.validate(pair)
    validation = evaluate_routing(predict_pair(model, pair, data), tau)
    pieces, router = deployable_pieces(model, pair, data)
    input_shape = tuple(model.big_net.input_shape(1))
    files: dict[str, str | None] = {"trunk": None, "little": "little.onnx", "big": "big.onnx", "router": None}
    shapes: dict[str, list[int]] = {}
    checks: dict[str, float] = {}
    branch_shape = input_shape
    if pieces.trunk is not None:
        files["trunk"] = "trunk.onnx"
        checks["trunk"] = _export(pieces.trunk, input_shape, out / "trunk.onnx")
        shapes["trunk"] = list(input_shape)
        branch_shape = _shape_after(pieces.trunk, input_shape)
    for which, module in (("little", pieces.little), ("big", pieces.big)):
        checks[which] = _export(module, branch_shape, out / files[which])
        shapes[which] = list(branch_shape)
    router_input = None
    if router is not None:
        if pieces.trunk is not None:
            router_module, router_shape, router_input = router, branch_shape, "trunk"
        else:  # nested pair with two stems: the router brings little's stem along
            router_module, router_shape, router_input = nn.Sequential(pieces.router_features, router), input_shape, \
                "image"
        files["router"] = "router.onnx"
        with warnings.catch_warnings():  # shape-derived normalisers are constants at a fixed input shape
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            checks["router"] = _export(router_module, router_shape, out / "router.onnx")
        shapes["router"] = list(router_shape)

    costs = PairCostModel(model, latency).costs(pair)
    piece_ms: dict[str, float] = {}
    if measure_device:
        from raynas.hw.devices import get_device
        from raynas.hw.measure import measure_onnx

        spec = get_device(measure_device, devices_file)
        for which, name in files.items():
            if name is not None:
                piece_ms[which] = measure_onnx(str(out / name), tuple(shapes[which]), spec).median_ms
    manifest = {
        "format": FORMAT, "coupling": model.coupling, "space": model.space.name,
        "pair": pair.to_dict(), "router": {**model.router.describe(), "tau": float(tau), "input": router_input},
        "input_shape": list(input_shape), "num_classes": model.num_classes, "files": files, "shapes": shapes,
        "onnx_max_abs_diff": checks, "costs": _costs_dict(costs),
        "latency_model": latency.kind if latency is not None else None,
        "piece_ms": piece_ms, "measured_on": measure_device,
        "validation": validation,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(models_dir: str | Path) -> dict[str, Any]:
    path = Path(models_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"--models: {models_dir} holds no {MANIFEST} (export a pair with `raynas biglittle export`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"--models: {path} is not a raynas big/little deployment manifest")
    for which, name in manifest["files"].items():
        if name is not None and not (Path(models_dir) / name).is_file():
            raise UserError(f"--models: {which} model {name} is missing from {models_dir}")
    return manifest


class RoutedRunner:
    """Runs an exported pair per input in onnxruntime, exactly as deployed."""

    def __init__(self, models_dir: str | Path, threads: int = 1, tau: float | None = None):
        from raynas.hw.onnx_export import ort_session

        self.dir = Path(models_dir)
        self.manifest = read_manifest(self.dir)
        self.tau = float(self.manifest["router"]["tau"] if tau is None else tau)
        self.stage = self.manifest["router"]["stage"]
        self.sessions = {which: ort_session(self.dir / name, threads=threads)
                         for which, name in self.manifest["files"].items() if name is not None}

    def _run(self, which: str, x: np.ndarray) -> np.ndarray:
        return self.sessions[which].run(None, {"input": x})[0]

    def predict(self, x: np.ndarray) -> tuple[int, bool]:
        """(predicted class, whether little answered) for one input of shape (1, C, H, W)."""
        t = self._run("trunk", x) if "trunk" in self.sessions else x
        if self.stage == PRE:
            router_in = t if self.manifest["router"]["input"] == "trunk" else x
            to_little = float(self._run("router", router_in)[0, 0]) >= self.tau
            logits = self._run("little" if to_little else "big", t)
            return int(logits[0].argmax()), to_little
        logits = self._run("little", t)[0]
        z = np.exp(logits - logits.max())
        if float(z.max() / z.sum()) >= self.tau:
            return int(logits.argmax()), True
        return int(self._run("big", t)[0].argmax()), False

    def predict_fixed(self, x: np.ndarray, which: str) -> int:
        """Always-little / always-big reference: trunk + that branch only."""
        t = self._run("trunk", x) if "trunk" in self.sessions else x
        return int(self._run(which, t)[0].argmax())


def _stats_ms(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90))}


def run_routed(models_dir: str | Path, data_cfg: Mapping[str, Any] | None, *, split: str = "val",
               limit: int | None = None, threads: int = 1, tau: float | None = None, warmup: int = 10,
               references: bool = True) -> dict[str, Any]:
    """Run the routed pair on every input of a labelled set; measured accuracy and latency beside the
    predicted E[latency] (latency model and/or per-piece timings) at the observed routing ratio."""
    from raynas.data import build_dataset

    runner = RoutedRunner(models_dir, threads=threads, tau=tau)
    m = runner.manifest
    _, channels, resolution, _ = m["input_shape"]
    dataset = build_dataset(data_cfg, split, resolution, in_channels=channels, augment=False)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise UserError("--limit: expected at least one input")
    inputs = [(dataset[i][0].unsqueeze(0).numpy(), int(dataset[i][1])) for i in range(n)]
    for x, _ in inputs[:warmup]:
        runner.predict(x)
    times, correct, little = [], 0, 0
    for x, y in inputs:
        t0 = time.perf_counter()
        pred, to_little = runner.predict(x)
        times.append(time.perf_counter() - t0)
        correct += pred == y
        little += to_little
    p = little / n
    costs = _costs_from_dict(m["costs"])
    report: dict[str, Any] = {
        "models": str(models_dir), "inputs": n, "tau": runner.tau, "router": m["router"]["name"],
        "coupling": m["coupling"], "accuracy": correct / n, "routing_ratio": p,
        "latency_ms": _stats_ms(times), "mean_latency_ms": float(np.mean(times) * 1e3),
        "e_macs": costs.expected(p), "e_macs_deployed": costs.deployed(p), "peak_macs": costs.peak(),
        "validation_at_export": {k: m["validation"][k] for k in ("accuracy", "routing_ratio", "tau")},
    }
    if costs.latency_ms is not None:
        report["predicted_e_latency_ms"] = costs.deployed(p, "latency_ms")
        report["predicted_by"] = m["latency_model"]
    if m["piece_ms"]:
        piece = PairCosts(costs.stage, costs.has_trunk, costs.macs, costs.params, costs.activation_elems,
                          latency_ms={k: m["piece_ms"].get(k, 0.0) for k in ("trunk", "little", "big", "router")})
        report["piece_timed_e_latency_ms"] = piece.deployed(p, "latency_ms")
        if "predicted_e_latency_ms" not in report:
            report["predicted_e_latency_ms"] = report["piece_timed_e_latency_ms"]
            report["predicted_by"] = "per-piece onnxruntime timings"
    if references:
        for which in ("little", "big"):
            ref_times, ref_correct = [], 0
            for x, y in inputs:
                t0 = time.perf_counter()
                ref_correct += runner.predict_fixed(x, which) == y
                ref_times.append(time.perf_counter() - t0)
            report[f"always_{which}"] = {"accuracy": ref_correct / n,
                                         "mean_latency_ms": float(np.mean(ref_times) * 1e3),
                                         "median_latency_ms": float(np.median(ref_times) * 1e3)}
    if m["router"]["stage"] == CASCADE:
        report["note"] = "cascade: little runs on every input; big only when little's confidence < tau"
    return report
