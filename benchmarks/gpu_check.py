"""GPU readiness in one short run (under 5 minutes on one modern GPU); never part of CI.

On a machine with CUDA it:
  1. trains an mbv3-biglittle supernet (sandwich rule) for a few hundred steps with Ray Train on every
     visible GPU: DDP over NCCL, AMP in bf16; prints step time and images/s;
  2. runs evaluator actors on the GPU (BN recalibration + accuracy of random subnets); prints evaluations/s;
  3. measures one exported subnet with onnxruntime's CUDA and TensorRT execution providers (those installed);
     prints median latency and IQR per provider.
On a machine without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py [--steps 300] [--evaluations 16] [--out /tmp/gpu_check]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def train_on_gpus(out: str, steps: int, gpus: int) -> tuple[str, dict]:
    """A few hundred DDP/NCCL bf16 steps; returns the supernet location and the step-time figures."""
    from raynas.train.trainer import train

    epochs = 2
    cfg = {
        "name": "gpu-check", "storage_path": out, "space": "mbv3-biglittle", "resolution": 32,
        "data": {"name": "digits", "batch_size": 128, "eval_batch_size": 512},
        "strategy": {"name": "sandwich", "num_random": 2}, "epochs": epochs,
        "steps_per_epoch": max(1, steps // epochs), "precision": "bf16",
        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 4.0e-5}, "scheduler": {"name": "cosine"},
        "eval": {"bn_samples": 512, "num_random": 1, "every": epochs},
        "scaling": {"num_workers": gpus, "use_gpu": True, "cpus_per_worker": 1},
    }
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    metrics = result.metrics()
    step_s = float((metrics["train_time_s"] / metrics["steps"]).median())
    figures = {"gpus": gpus, "steps": int(metrics["steps"].sum()), "step_ms_median": round(1000 * step_s, 2),
               "images_per_s_median": round(float(metrics["samples_per_s"].median()), 1),
               "train_wall_s": round(wall, 1), "max_acc": float(metrics["max_acc"].dropna().iloc[-1])}
    return str(result.supernet_path), figures


def evaluate_on_gpu(supernet_location: str, n: int) -> dict:
    """Evaluator actors on the GPU score `n` random subnets; evaluations per second over the batch."""
    import numpy as np

    from raynas.search.evaluator import EvaluatorConfig, make_evaluator_pool
    from raynas.supernets.checkpoint import load_supernet

    space = load_supernet(supernet_location).space
    rng = np.random.default_rng(0)
    archs = list(dict.fromkeys(space.sample(rng).to_json() for _ in range(n)))
    config = EvaluatorConfig(data={"name": "digits"}, bn_samples=512, batch_size=512, device="cuda",
                             threads=1, num_actors=1)
    pool = make_evaluator_pool(supernet_location, config)
    try:
        list(pool.map_unordered(archs[:1]))  # actor start-up and CUDA context: not part of the rate
        started = time.perf_counter()
        results = list(pool.map_unordered(archs[1:]))
        wall = time.perf_counter() - started
    finally:
        pool.shutdown()
    accuracies = [r["accuracy"] for _, r in results]
    return {"evaluations": len(results), "evaluations_per_s": round(len(results) / wall, 2),
            "accuracy_min": round(min(accuracies), 4), "accuracy_max": round(max(accuracies), 4)}


def measure_providers(supernet_location: str, work: Path) -> dict:
    """Median latency of the largest subnet at batch 1 on each GPU provider onnxruntime offers."""
    import onnxruntime as ort

    from raynas.hw.devices import DeviceSpec, MeasurementProtocol
    from raynas.hw.measure import measure_onnx
    from raynas.hw.onnx_export import export_onnx
    from raynas.supernets.checkpoint import load_supernet

    supernet = load_supernet(supernet_location)
    path = work / "largest.onnx"
    export_onnx(supernet.extract(supernet.space.max_arch()), supernet.input_shape(1), path)
    model = path.read_bytes()
    available = ort.get_available_providers()
    figures = {"available_providers": available}
    for runtime, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if provider not in available:
            figures[runtime] = "not installed"
            continue
        device = DeviceSpec(f"gpu-{runtime}", runtime=runtime, protocol=MeasurementProtocol(warmup_s=2.0, runs=200))
        try:
            timing = measure_onnx(model, supernet.input_shape(1), device)
            figures[runtime] = {"median_ms": round(timing.median_ms, 4), "iqr_ms": round(timing.iqr_ms, 4),
                                "runs": timing.runs}
        except Exception as exc:  # a provider that loads but cannot run (e.g. TensorRT libs missing)
            figures[runtime] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--out", default=None, help="storage location for the run (default: a temp dir)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        say("no CUDA device on this machine: nothing to check (exit 0)")
        return 0
    gpus = torch.cuda.device_count()
    say(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = args.out or tmp
        report: dict = {}
        supernet, report["train"] = train_on_gpus(out, args.steps, gpus)
        say(f"train: {json.dumps(report['train'])}")
        report["evaluate"] = evaluate_on_gpu(supernet, args.evaluations + 1)
        say(f"evaluate: {json.dumps(report['evaluate'])}")
        report["onnxruntime"] = measure_providers(supernet, Path(tmp))
        say(f"onnxruntime: {json.dumps(report['onnxruntime'])}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
