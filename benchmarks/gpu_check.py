"""GPU readiness in one short run (under 5 minutes on one modern GPU); never part of CI.

On a machine with CUDA it:
  1. trains an mbv3-biglittle supernet (sandwich rule) for a few hundred steps with Ray Train on every
     visible GPU: DDP over NCCL, AMP in bf16; prints step time and images/s;
  2. runs evaluator actors on the GPU (BN recalibration + accuracy of random subnets); prints evaluations/s;
  3. measures one exported subnet with onnxruntime's CUDA and TensorRT execution providers (those installed);
     prints median latency and IQR per provider;
  4. measures energy per inference through NVML's total-energy counter (raynas.hw.energy, meter `nvml`) over
     the timed window of CUDA-provider latency, idle power subtracted: the exported subnet and the fixed
     reference model at batch 1 and 64, three measurements each; prints how often the counter moves.
On a machine without CUDA it prints one line saying so ("no GPU") and exits 0.

    python benchmarks/gpu_check.py [--steps 300] [--evaluations 16] [--out /tmp/gpu_check] [--energy-only]
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


def largest_subnet(supernet_location: str, work: Path) -> tuple[bytes, tuple[int, ...]]:
    """The supernet's largest subnet as ONNX (exported once into `work`) and its input shape at batch 1."""
    from raynas.hw.onnx_export import export_onnx
    from raynas.supernets.checkpoint import load_supernet

    supernet = load_supernet(supernet_location)
    path = work / "largest.onnx"
    if not path.is_file():
        export_onnx(supernet.extract(supernet.space.max_arch()), supernet.input_shape(1), path)
    return path.read_bytes(), tuple(supernet.input_shape(1))


def measure_providers(supernet_location: str, work: Path) -> dict:
    """Median latency of the largest subnet at batch 1 on each GPU provider onnxruntime offers."""
    import onnxruntime as ort

    from raynas.hw.devices import DeviceSpec, MeasurementProtocol
    from raynas.hw.measure import measure_onnx

    model, shape = largest_subnet(supernet_location, work)
    available = ort.get_available_providers()
    figures = {"available_providers": available}
    for runtime, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if provider not in available:
            figures[runtime] = "not installed"
            continue
        device = DeviceSpec(f"gpu-{runtime}", runtime=runtime, protocol=MeasurementProtocol(warmup_s=2.0, runs=200))
        try:
            timing = measure_onnx(model, shape, device)
            figures[runtime] = {"median_ms": round(timing.median_ms, 4), "iqr_ms": round(timing.iqr_ms, 4),
                                "runs": timing.runs}
        except Exception as exc:  # a provider that loads but cannot run (e.g. TensorRT libs missing)
            figures[runtime] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return figures


def counter_update_ms(meter, seconds: float = 1.0) -> float | None:
    """How often (ms) the meter's counter moves, polled for `seconds`; None when it did not move."""
    import numpy as np

    changes, last = [], meter.counters()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        now = meter.counters()
        if now != last:
            changes.append(time.perf_counter())
            last = now
        time.sleep(0.0005)
    return round(1000 * float(np.median(np.diff(changes))), 2) if len(changes) > 2 else None


def nvml_energy(models: dict[str, tuple[bytes, tuple[int, ...]]], repeats: int = 3) -> dict:
    """Latency and NVML energy per inference of each named `(onnx bytes, input shape)` on the CUDA provider
    of GPU 0, `repeats` measurements each (their spread is the figure's noise)."""
    import numpy as np
    import onnxruntime as ort

    from raynas.errors import UserError
    from raynas.hw.devices import DeviceSpec, EnergySpec, MeasurementProtocol
    from raynas.hw.energy import meter_for
    from raynas.hw.measure import measure_onnx

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime offers no CUDAExecutionProvider ({ort.get_available_providers()})"}
    protocol = MeasurementProtocol(warmup_s=2.0, runs=200, min_run_s=2.0, reference_runs=0)
    spec = EnergySpec("nvml", index=0, idle_s=2.0)
    try:
        meter = meter_for(DeviceSpec("gpu-nvml", runtime="cuda", energy=spec))
    except UserError as exc:  # no pynvml, or a GPU without the counter
        return {"skipped": str(exc)}
    figures: dict = {"gpu": str(meter.name), "counter_update_ms": counter_update_ms(meter),
                     "idle_w": round(meter.idle_w(), 2)}
    for name, (model, shape) in models.items():
        for batch in (1, 64):
            device = DeviceSpec("gpu-nvml", runtime="cuda", batch_size=batch, protocol=protocol, energy=spec)
            timings = [measure_onnx(model, shape, device) for _ in range(repeats)]
            energy = [t.energy_mj for t in timings]
            latency = [t.median_ms for t in timings]
            figures[f"{name}@b{batch}"] = {
                "median_ms": [round(v, 4) for v in latency], "energy_mj": [round(v, 3) for v in energy],
                "energy_mj_median": round(float(np.median(energy)), 3),
                "energy_mj_spread": round(float(np.max(energy) - np.min(energy)), 3),
                "power_above_idle_w": round(float(np.median(energy) / np.median(latency)), 1),
                "runs": [t.runs for t in timings], "window_s": [round(t.energy_window_s, 2) for t in timings]}
            say(f"nvml {name}@b{batch}: {json.dumps(figures[f'{name}@b{batch}'])}")
    return figures


def reference_model() -> dict[str, tuple[bytes, tuple[int, ...]]]:
    from raynas.hw.measure import REFERENCE_SHAPE, reference_onnx

    return {"reference": (reference_onnx(), REFERENCE_SHAPE)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--out", default=None, help="storage location for the run (default: a temp dir)")
    parser.add_argument("--energy-only", action="store_true",
                        help="only the NVML energy of the fixed reference model (no training, a minute or two)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        say("no GPU (no CUDA device) on this machine: nothing to check (exit 0)")
        return 0
    gpus = torch.cuda.device_count()
    say(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.energy_only:
        report = {"nvml_energy": nvml_energy(reference_model())}
        print(json.dumps(report))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = args.out or tmp
        report: dict = {}
        supernet, report["train"] = train_on_gpus(out, args.steps, gpus)
        say(f"train: {json.dumps(report['train'])}")
        report["evaluate"] = evaluate_on_gpu(supernet, args.evaluations + 1)
        say(f"evaluate: {json.dumps(report['evaluate'])}")
        report["onnxruntime"] = measure_providers(supernet, Path(tmp))
        say(f"onnxruntime: {json.dumps(report['onnxruntime'])}")
        report["nvml_energy"] = nvml_energy({**reference_model(), "largest": largest_subnet(supernet, Path(tmp))})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
