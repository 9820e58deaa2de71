"""Deploying a routed pair: big, little, router (and the shared trunk) as ONNX, and the per-input runner.

`export_pair` writes into a directory

  trunk.onnx    image -> trunk features (shared stem [+ blocks]); absent when the pair shares nothing
  little.onnx   trunk features (or the image) -> logits
  big.onnx      trunk features (or the image) -> logits
  router.onnx   pre-routers only: trunk features (or the image, when the router brings little's stem)
                -> ease score in [0, 1]
  manifest.json coupling, pair, router and tau, precision, shapes, sizes, costs, predicted and measured
                latency, validation figures (PyTorch FP32, and the written files in onnxruntime)

every piece verified against PyTorch in onnxruntime in FP32, then written at the deployed precision
(raynas.hw.onnx_export / raynas.hw.precision: fp16 by onnxruntime's converter, int8 as static QDQ whose
activation ranges come from training images; a piece reading the trunk is calibrated on the trunk's
features of them). The directory is a local path or a URI (s3://...): files are written and read
through raynas.storage. `RoutedRunner` executes the pair one input at a time
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
from raynas.hw.precision import check_precision

MANIFEST = "manifest.json"
FORMAT = "raynas-biglittle-deploy/1"
DEFAULT_CALIBRATION_IMAGES = 64
PIECES = ("trunk", "little", "big", "router")


def _shape_after(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(module.eval()(torch.zeros(shape)).shape)


def _export(module: nn.Module, shape: tuple[int, ...], location: str, precision: str,
            calibration: list[np.ndarray] | None) -> dict[str, Any]:
    """`export_onnx` at `precision` with its tolerance scaled to the output's magnitude: the check feeds
    Gaussian noise, on which a trained branch (reading trunk features) can output logits in the hundreds,
    where 1e-4 absolute is below float32 resolution."""
    from raynas.hw.onnx_export import export_onnx

    with torch.no_grad():
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        scale = float(module.eval()(example).abs().max())
    return export_onnx(module, shape, location, atol=1e-4 * max(1.0, scale), precision=precision,
                       calibration=calibration)


def _costs_dict(costs: PairCosts) -> dict[str, Any]:
    return {"stage": costs.stage, "has_trunk": costs.has_trunk, "macs": costs.macs, "params": costs.params,
            "activation_elems": costs.activation_elems, "latency_ms": costs.latency_ms, "call_ms": costs.call_ms}


def _costs_from_dict(d: Mapping[str, Any]) -> PairCosts:
    return PairCosts(stage=d["stage"], has_trunk=d["has_trunk"], macs=dict(d["macs"]), params=dict(d["params"]),
                     activation_elems=dict(d["activation_elems"]), latency_ms=d["latency_ms"], call_ms=d["call_ms"])


def export_pair(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData, out_dir: str | os.PathLike,
                tau: float, latency: PieceLatency | None = None, measure_device: str | None = "local-cpu",
                devices_file: str | None = None, precision: str = "fp32",
                calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> dict[str, Any]:
    """Export the pair's pieces (BN calibrated per model) at `precision` and a manifest; returns the manifest.

    `latency` (a calibrated latency model of raynas.hw) gives the predicted latency of each piece;
    `measure_device` times each exported piece on this node (batch 1, the device's protocol, at the
    written precision, which the device must run), which predicts E[latency] when no latency model is
    given. int8 activation ranges come from the first `calibration_images` of `data`'s training images.
    """
    out = storage.normalize(out_dir)
    pair = model.pair_space.validate(pair)
    check_precision(precision, "--precision")
    if measure_device:
        from raynas.hw.devices import get_device

        get_device(measure_device, devices_file).check_precision(precision, "--precision")
    images = calibration_images_of(data, calibration_images) if precision == "int8" else None
    validation = evaluate_routing(predict_pair(model, pair, data), tau)
    input_shape = tuple(model.big_net.input_shape(1))
    pieces, router = deployable_pieces(model, pair, data)
    files, shapes, infos, router_input = _export_pieces(pieces, router, input_shape, out, precision, images)
    costs = PairCostModel(model, latency).costs(pair)
    piece_ms = _measure_pieces(out, files, shapes, measure_device, devices_file) if measure_device else {}
    manifest = {
        "format": FORMAT, "coupling": model.coupling, "space": model.space.name,
        "pair": pair.to_dict(), "router": {**model.router.describe(), "tau": float(tau), "input": router_input},
        "precision": precision, "calibration_images": sum(map(len, images)) if images else None,
        "input_shape": list(input_shape), "num_classes": model.num_classes, "files": files, "shapes": shapes,
        "size_mb": {which: info["size_mb"] for which, info in infos.items()},
        "onnx_max_abs_diff": {which: info["max_abs_diff"] for which, info in infos.items()},
        "precision_max_abs_diff": {which: info["max_abs_diff_vs_fp32"] for which, info in infos.items()},
        "costs": _costs_dict(costs),
        "latency_model": latency.kind if latency is not None else None,
        "piece_ms": piece_ms, "measured_on": measure_device,
        "validation": validation,
    }
    storage.write_json(storage.join(out, MANIFEST), manifest)
    # the files as written (at their precision), run as deployed on the same images as `validation`
    manifest["validation_deployed"] = RoutedRunner(out).evaluate(data.val_loader)
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest


def calibration_images_of(data: EvalData, count: int) -> list[np.ndarray]:
    """`count` of the (normalized) training images `data` recalibrates BN with, seeded, in batches: what
    int8 activation ranges are calibrated on."""
    from raynas.hw.onnx_accuracy import calibration_batches, labelled_arrays

    if not 1 <= count <= data.bn_samples:
        raise UserError(f"--calibration-images: {count} is not allowed; allowed: 1 to {data.bn_samples} "
                        "(the training images drawn for BN recalibration, --bn-samples)")
    return calibration_batches(labelled_arrays(data.bn_loader)[0], count)


@torch.no_grad()
def _export_pieces(pieces, router, input_shape: tuple[int, ...], out: str, precision: str,
                   images: list[np.ndarray] | None):
    """Each piece as verified ONNX at `precision` in `out`: (file names, input shapes, export_onnx's checks
    and sizes per piece, what the router reads: 'trunk', 'image' or None). An int8 piece is calibrated on
    what it reads when deployed: the calibration images, or the trunk's features of them."""
    files: dict[str, str | None] = {"trunk": None, "little": "little.onnx", "big": "big.onnx", "router": None}
    shapes: dict[str, list[int]] = {}
    infos: dict[str, dict[str, Any]] = {}
    branch_shape, features = input_shape, images
    if pieces.trunk is not None:
        files["trunk"] = "trunk.onnx"
        infos["trunk"] = _export(pieces.trunk, input_shape, storage.join(out, "trunk.onnx"), precision, images)
        shapes["trunk"] = list(input_shape)
        branch_shape = _shape_after(pieces.trunk, input_shape)
        if images is not None:
            features = [pieces.trunk.eval()(torch.from_numpy(x)).numpy() for x in images]
    for which, module in (("little", pieces.little), ("big", pieces.big)):
        infos[which] = _export(module, branch_shape, storage.join(out, files[which]), precision, features)
        shapes[which] = list(branch_shape)
    router_input = None
    if router is not None:
        if pieces.trunk is not None:
            router_module, router_shape, router_input, fed = router, branch_shape, "trunk", features
        else:  # nested pair with two stems: the router brings little's stem along
            router_module, router_shape, router_input, fed = nn.Sequential(pieces.router_features, router), \
                input_shape, "image", images
        files["router"] = "router.onnx"
        with warnings.catch_warnings():  # shape-derived normalisers are constants at a fixed input shape
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            infos["router"] = _export(router_module, router_shape, storage.join(out, "router.onnx"), precision, fed)
        shapes["router"] = list(router_shape)
    return files, shapes, infos, router_input


def _measure_pieces(out: str, files: Mapping[str, str | None], shapes: Mapping[str, list[int]], device: str,
                    devices_file: str | None) -> dict[str, float]:
    """Median milliseconds of each exported piece (at its written precision) on this node, under the
    device's protocol."""
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
    # manifests written before precisions were all FP32 and did not record sizes
    manifest.setdefault("precision", "fp32")
    if "size_mb" not in manifest:
        manifest["size_mb"] = {which: storage.size(storage.join(models_dir, name)) / 1e6
                               for which, name in manifest["files"].items() if name is not None}
    for which, name in manifest["files"].items():
        if name is not None and not storage.is_file(storage.join(models_dir, name)):
            raise UserError(f"--models: {which} model {name} is missing from {models_dir}")
    return manifest


class RoutedRunner:
    """Runs an exported pair (at whatever precision it was written: inputs and outputs stay float32) in
    onnxruntime, exactly as deployed. `providers`: onnxruntime execution providers (default the CPU one)."""

    def __init__(self, models_dir: str | os.PathLike, threads: int = 1, tau: float | None = None,
                 providers: list[str] | None = None):
        from raynas.hw.onnx_accuracy import ort_session

        self.dir = storage.normalize(models_dir)
        self.manifest = read_manifest(self.dir)
        self.tau = float(self.manifest["router"]["tau"] if tau is None else tau)
        self.stage = self.manifest["router"]["stage"]
        # A session holds its model in memory: a temporary download of a remote directory may go after.
        with storage.local_copy(self.dir) as local:
            self.sessions = {which: ort_session(local / name, threads=threads, providers=providers)
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

    def predict_batch(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Both branches and the routing decision for a batch (every piece runs on every input: the
        decisions and answers are those of `predict`, not its cost): little, big, to_little, routed."""
        t = self._run("trunk", x) if "trunk" in self.sessions else x
        little, big = self._run("little", t).argmax(1), self._run("big", t).argmax(1)
        if self.stage == PRE:
            score = self._run("router", t if self.manifest["router"]["input"] == "trunk" else x)[:, 0]
        else:
            logits = self._run("little", t)
            z = np.exp(logits - logits.max(1, keepdims=True))
            score = z.max(1) / z.sum(1)
        to_little = score >= self.tau
        return {"little": little, "big": big, "to_little": to_little, "routed": np.where(to_little, little, big)}

    def evaluate(self, batches) -> dict[str, float]:
        """Accuracy of the routed pair, of little and big alone, and the routing ratio on labelled batches."""
        parts: dict[str, list[np.ndarray]] = {"labels": [], "little": [], "big": [], "to_little": [], "routed": []}
        for x, y in batches:
            for k, v in self.predict_batch(np.asarray(x, np.float32)).items():
                parts[k].append(v)
            parts["labels"].append(np.asarray(y))
        a = {k: np.concatenate(v) for k, v in parts.items()}
        return {"accuracy": float((a["routed"] == a["labels"]).mean()), "routing_ratio": float(a["to_little"].mean()),
                "little_accuracy": float((a["little"] == a["labels"]).mean()),
                "big_accuracy": float((a["big"] == a["labels"]).mean()), "tau": self.tau,
                "precision": self.manifest["precision"]}


def piece_timed_costs(manifest: Mapping[str, Any]) -> PairCosts:
    """The pair's costs with each piece's latency as timed at export (`latency_ms` None when nothing was
    timed): latency of little or big alone, and of the routed pair at a routing ratio, from measured pieces."""
    costs = _costs_from_dict(manifest["costs"])
    timed = {k: manifest["piece_ms"].get(k, 0.0) for k in PIECES} if manifest["piece_ms"] else None
    return PairCosts(costs.stage, costs.has_trunk, costs.macs, costs.params, costs.activation_elems,
                     latency_ms=timed)


def model_size_mb(manifest: Mapping[str, Any], which: str) -> float:
    """Size of what one model needs on the board: 'little' or 'big' (trunk + branch) or 'pair' (every file)."""
    parts = PIECES if which == "pair" else ("trunk", which)
    return float(sum(manifest["size_mb"].get(k, 0.0) for k in parts))


def _stats_ms(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90))}


def run_routed(models_dir: str | os.PathLike, data_cfg: Mapping[str, Any] | None, *, split: str = "val",
               limit: int | None = None, threads: int = 1, tau: float | None = None, warmup: int = 10,
               references: bool = True, providers: list[str] | None = None) -> dict[str, Any]:
    """Run the routed pair on every input of a labelled set; measured accuracy and latency beside the
    predicted E[latency] (latency model and/or per-piece timings) at the observed routing ratio."""
    from raynas.data import Batches, Normalizer, eval_dataset, normalization

    runner = RoutedRunner(models_dir, threads=threads, tau=tau, providers=providers)
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
        "coupling": m["coupling"], "precision": m["precision"], "accuracy": correct / n, "routing_ratio": p,
        "latency_ms": _stats_ms(times), "mean_latency_ms": float(np.mean(times) * 1e3),
        "e_macs": costs.expected(p), "e_macs_deployed": costs.deployed(p), "peak_macs": costs.peak(),
        "validation_at_export": {k: m["validation"][k] for k in ("accuracy", "routing_ratio", "tau")},
    }
    if costs.latency_ms is not None:
        report["predicted_e_latency_ms"] = costs.deployed(p, "latency_ms")
        report["predicted_by"] = m["latency_model"]
    piece = piece_timed_costs(m)
    if piece.latency_ms is not None:
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
