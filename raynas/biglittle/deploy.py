"""Deploying a routed pair: big, little, router (and the shared trunk) as ONNX, and the per-input runner.

`export_pair` writes into a directory

  trunk.onnx    image -> trunk features (shared stem [+ blocks]); absent when the pair shares nothing
  little.onnx   trunk features (or the image) -> logits
  big.onnx      trunk features (or the image) -> logits
  router.onnx   pre-routers only: trunk features (or the image, when the router brings little's stem)
                -> ease score in [0, 1]
  manifest.json coupling, pair, router and tau, shapes, costs, predicted latency, validation figures

every file verified against PyTorch in onnxruntime. The directory is a local path or a URI (s3://...):
files are written and read through raynas.storage. `RoutedRunner` executes the pair one input at a time
as deployed: trunk, then the router's choice (pre-routing), or little then big when little is not
confident enough (cascade). `run_routed` measures accuracy and per-input latency on a labelled set and
reports them beside the predicted E[latency] at the routing ratio it observed.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from raynas import storage
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


def _export(module: nn.Module, shape: tuple[int, ...], location: str) -> float:
    """`export_onnx` with its tolerance scaled to the output's magnitude: the check feeds Gaussian noise,
    on which a trained branch (reading trunk features) can output logits in the hundreds, where 1e-4
    absolute is below float32 resolution."""
    from raynas.hw.onnx_export import export_onnx

    with torch.no_grad():
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        scale = float(module.eval()(example).abs().max())
    return export_onnx(module, shape, location, atol=1e-4 * max(1.0, scale))["max_abs_diff"]


def _costs_dict(costs: PairCosts) -> dict[str, Any]:
    return {"stage": costs.stage, "has_trunk": costs.has_trunk, "macs": costs.macs, "params": costs.params,
            "activation_elems": costs.activation_elems, "latency_ms": costs.latency_ms, "call_ms": costs.call_ms}


def _costs_from_dict(d: Mapping[str, Any]) -> PairCosts:
    return PairCosts(stage=d["stage"], has_trunk=d["has_trunk"], macs=dict(d["macs"]), params=dict(d["params"]),
                     activation_elems=dict(d["activation_elems"]), latency_ms=d["latency_ms"], call_ms=d["call_ms"])


def export_pair(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData, out_dir: str | os.PathLike,
                tau: float, latency: PieceLatency | None = None, measure_device: str | None = "local-cpu",
                devices_file: str | None = None) -> dict[str, Any]:
    """Export the pair's pieces (BN calibrated per model) and a manifest; returns the manifest.

    `latency` (a calibrated latency model of raynas.hw) gives the predicted latency of each piece;
    `measure_device` times each exported piece on this node (batch 1, the device's protocol), which
    predicts E[latency] when no latency model is given.
    """
    out = storage.normalize(out_dir)
    pair = model.pair_space.validate(pair)
    validation = evaluate_routing(predict_pair(model, pair, data), tau)
    input_shape = tuple(model.big_net.input_shape(1))
    files, shapes, checks, router_input = _export_pieces(*deployable_pieces(model, pair, data), input_shape, out)
    costs = PairCostModel(model, latency).costs(pair)
    piece_ms = _measure_pieces(out, files, shapes, measure_device, devices_file) if measure_device else {}
    manifest = {
        "format": FORMAT, "coupling": model.coupling, "space": model.space.name,
        "pair": pair.to_dict(), "router": {**model.router.describe(), "tau": float(tau), "input": router_input},
        "input_shape": list(input_shape), "num_classes": model.num_classes, "files": files, "shapes": shapes,
        "onnx_max_abs_diff": checks, "costs": _costs_dict(costs),
        "latency_model": latency.kind if latency is not None else None,
        "piece_ms": piece_ms, "measured_on": measure_device,
        "validation": validation,
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def _export_pieces(pieces, router, input_shape: tuple[int, ...], out: str):
    """Each piece as verified ONNX in `out`: (file names, input shapes, max abs diffs vs PyTorch, what the
    router reads: 'trunk', 'image' or None)."""
    files: dict[str, str | None] = {"trunk": None, "little": "little.onnx", "big": "big.onnx", "router": None}
    shapes: dict[str, list[int]] = {}
    checks: dict[str, float] = {}
    branch_shape = input_shape
    if pieces.trunk is not None:
        files["trunk"] = "trunk.onnx"
        checks["trunk"] = _export(pieces.trunk, input_shape, storage.join(out, "trunk.onnx"))
        shapes["trunk"] = list(input_shape)
        branch_shape = _shape_after(pieces.trunk, input_shape)
    for which, module in (("little", pieces.little), ("big", pieces.big)):
        checks[which] = _export(module, branch_shape, storage.join(out, files[which]))
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
            checks["router"] = _export(router_module, router_shape, storage.join(out, "router.onnx"))
        shapes["router"] = list(router_shape)
    return files, shapes, checks, router_input


def _measure_pieces(out: str, files: Mapping[str, str | None], shapes: Mapping[str, list[int]], device: str,
                    devices_file: str | None) -> dict[str, float]:
    """Median milliseconds of each exported piece on this node, under the device's protocol."""
    from raynas.hw.devices import get_device
    from raynas.hw.measure import measure_onnx

    spec = get_device(device, devices_file)
    return {which: measure_onnx(storage.read_bytes(storage.join(out, name), "onnx"), tuple(shapes[which]),
                                spec).median_ms
            for which, name in files.items() if name is not None}


def read_manifest(models_dir: str | os.PathLike) -> dict[str, Any]:
    location = storage.join(models_dir, MANIFEST)
    if not storage.is_file(location):
        raise UserError(f"--models: {models_dir} holds no {MANIFEST} (export a pair with `raynas biglittle export`)")
    manifest = storage.read_json(location, "--models")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"--models: {storage.display(location)} is not a raynas big/little deployment manifest")
    for which, name in manifest["files"].items():
        if name is not None and not storage.is_file(storage.join(models_dir, name)):
            raise UserError(f"--models: {which} model {name} is missing from {models_dir}")
    return manifest


class RoutedRunner:
    """Runs an exported pair per input in onnxruntime, exactly as deployed."""

    def __init__(self, models_dir: str | os.PathLike, threads: int = 1, tau: float | None = None):
        from raynas.hw.onnx_export import ort_session

        self.dir = storage.normalize(models_dir)
        self.manifest = read_manifest(self.dir)
        self.tau = float(self.manifest["router"]["tau"] if tau is None else tau)
        self.stage = self.manifest["router"]["stage"]
        # A session holds its model in memory: a temporary download of a remote directory may go after.
        with storage.local_copy(self.dir) as local:
            self.sessions = {which: ort_session(local / name, threads=threads)
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


def run_routed(models_dir: str | os.PathLike, data_cfg: Mapping[str, Any] | None, *, split: str = "val",
               limit: int | None = None, threads: int = 1, tau: float | None = None, warmup: int = 10,
               references: bool = True) -> dict[str, Any]:
    """Run the routed pair on every input of a labelled set; measured accuracy and latency beside the
    predicted E[latency] (latency model and/or per-piece timings) at the observed routing ratio."""
    from raynas.data import Batches, Normalizer, eval_dataset, normalization

    runner = RoutedRunner(models_dir, threads=threads, tau=tau)
    m = runner.manifest
    _, channels, resolution, _ = m["input_shape"]
    if limit is not None and limit < 1:
        raise UserError("--limit: expected at least one input")
    dataset = eval_dataset(data_cfg, split, resolution, channels)
    if limit is not None:
        dataset = dataset.limit(limit)
    batches = Batches(dataset, 256, "cpu", Normalizer(*normalization(data_cfg, channels)))
    inputs = [(x.unsqueeze(0).numpy(), int(y)) for xs, ys in batches for x, y in zip(xs, ys)]
    n = len(inputs)
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
