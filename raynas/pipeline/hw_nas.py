"""The hardware-aware NAS pipeline that `ray job submit ... pipelines/hw_nas.py` and `raynas demo` run.

`run_dir` is a local path or a URI (s3://bucket/prefix, ...): every stage reads and writes it through
raynas.storage, and decides what to skip or continue from what is stored there, so the pipeline can be
re-run with the same config from any node of the cluster, in a fresh working directory: training is
skipped when its final supernet is stored (else resumes from its last epoch checkpoint), the LUT reuses
measured blocks, the search resumes from its Parquet store. A killed pipeline is re-run, never restarted.

run_dir/
  pipeline.yaml         the validated config
  train/<name>/         the Ray Train run (checkpoints, metrics.parquet, supernet.pt)
  lut.parquet           per-block latency table (+ lut.calibration.json)
  search/               evaluations, Pareto front, ONNX subnets, report.md, pareto.png
  summary.yaml          what each stage did (written at the end)
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raynas import storage
from raynas.config_utils import check_known, positive_int, read_yaml, section
from raynas.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/hw_nas",
    "checkpoint": None,   # a trained supernet: skips the train stage
    "train": None,        # a `raynas train` config (inline); its storage_path/name default into run_dir
    "profile": {"device": "local-cpu", "devices_file": None, "lut": None, "calibration_n": 10, "max_archs": 3000,
                "patience": 300},
    "search": {},         # a `raynas search` config without checkpoint/run_dir/latency.lut (filled in here)
}

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def log(msg: str) -> None:
    print(f"[hw_nas] {msg}", file=sys.stderr, flush=True)


def validate_pipeline_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate every stage's config up front, so a typo fails before hours of training."""
    from raynas.search.config import validate_search_config
    from raynas.train.config import validate_train_config

    check_known(cfg, DEFAULTS, "config")
    out = copy.deepcopy(DEFAULTS)
    out.update({k: v for k, v in cfg.items() if k not in ("profile",)})
    out["profile"] = section(cfg, "profile", DEFAULTS["profile"])
    positive_int(out["profile"]["calibration_n"], "profile.calibration_n", minimum=2)
    if not isinstance(out["run_dir"], str) or not out["run_dir"]:
        raise ConfigError(f"run_dir: expected a directory path or URI (s3://bucket/prefix), got {out['run_dir']!r}")
    run_dir = out["run_dir"] = storage.normalize(out["run_dir"])
    if out["checkpoint"] is not None:
        if not isinstance(out["checkpoint"], str) or not out["checkpoint"]:
            raise ConfigError("checkpoint: expected the location (a path or URI) of a trained supernet")
        out["checkpoint"] = storage.normalize(out["checkpoint"])
    if out["profile"]["lut"] is not None:
        if not isinstance(out["profile"]["lut"], str) or not out["profile"]["lut"]:
            raise ConfigError("profile.lut: expected the location (a path or URI) of a LUT Parquet file")
        out["profile"]["lut"] = storage.normalize(out["profile"]["lut"])
    if out["checkpoint"] is None and out["train"] is None:
        raise ConfigError("train: missing (a `raynas train` config), or give `checkpoint` of a trained supernet")
    if out["train"] is not None:
        if not isinstance(out["train"], dict):
            raise ConfigError("train: expected a mapping (a `raynas train` config)")
        train = dict(out["train"])
        train.setdefault("storage_path", storage.join(run_dir, "train"))
        train.setdefault("name", "supernet")
        space = train.get("space")
        if isinstance(space, str) and space.endswith((".yaml", ".yml")) and Path(space).is_file():
            # Ray Train workers load the space themselves, from another working directory.
            train["space"] = str(Path(space).resolve())
        out["train"] = _as_section("train", validate_train_config, train)
    if not isinstance(out["search"], dict):
        raise ConfigError("search: expected a mapping (a `raynas search` config)")
    for key in ("checkpoint", "run_dir"):
        if key in out["search"]:
            raise ConfigError(f"search.{key}: set by the pipeline; remove it")
    search = copy.deepcopy(out["search"])
    search["run_dir"] = storage.join(run_dir, "search")
    search.setdefault("latency", {})
    search["latency"].setdefault("device", out["profile"]["device"])
    search["latency"].setdefault("devices_file", out["profile"]["devices_file"])
    search["latency"]["lut"] = out["profile"]["lut"] or storage.join(run_dir, "lut.parquet")
    if out["train"] is not None:
        search.setdefault("data", out["train"]["data"])
    out["search"] = _as_section("search", validate_search_config, search)
    return out


def _as_section(name: str, validate, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run a stage's validator, naming a bad field by its place in the pipeline config (`train.epochs`)."""
    try:
        return validate(cfg)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith("config.") or msg.startswith("config:"):  # the stage config's own top level
            msg = msg[len("config"):].lstrip(".")
            raise ConfigError(f"{name}{'' if msg.startswith(':') else '.'}{msg}") from None
        raise ConfigError(f"{name}.{msg}") from None


def profile_device(supernet, device: str, lut: str, calibration_n: int, devices_file: str | None,
                   max_archs: int, patience: int) -> dict[str, Any]:
    """Build (or extend) the block LUT of `supernet`'s space on `device` and calibrate it end to end.

    `lut` is a location (path or URI); blocks and a calibration already stored there are reused.
    """
    from raynas.hw.devices import get_device
    from raynas.hw.latency import calibration_path, load_calibration, save_calibration
    from raynas.hw.lut import TableKey, build_lut, read_lut, select
    from raynas.hw.profiling import calibrate
    from raynas.hw.remote import start_profiler

    spec = get_device(device, devices_file)
    key = TableKey.of(supernet, spec)
    existing, meta = read_lut(lut, "profile.lut")
    profiler = start_profiler(spec)
    try:
        # `out`: measured blocks are stored as the build goes, so a killed pipeline's re-run measures the rest only.
        rows, new_meta = build_lut(supernet, [profiler], existing, meta, max_archs=max_archs, patience=patience,
                                   out=lut)
        record = load_calibration(calibration_path(lut), key)
        if record is None or record["n"] < calibration_n:
            record = calibrate(supernet, select(rows, key), profiler, n=calibration_n)
            save_calibration(calibration_path(lut), key, record)
    finally:
        profiler.stop()
    return {"lut_blocks": new_meta[key.id]["blocks"], "lut_build_s": new_meta[key.id]["build_s"],
            "calibration_n": record["n"]}


def trained_supernet(train_cfg: dict[str, Any]) -> str | None:
    """The final supernet of the configured training when storage already holds it complete, else None."""
    from raynas.train.trainer import SUPERNET_FILE, plan_run

    plan = plan_run(train_cfg)
    final = storage.join(plan.run_dir, SUPERNET_FILE)
    return final if plan.resume_epoch >= plan.cfg["epochs"] and storage.is_file(final) else None


def run_pipeline(cfg: dict[str, Any]) -> dict[str, Any]:
    from raynas.hw.devices import init_local_ray
    from raynas.search.runner import run_search_job
    from raynas.supernets.checkpoint import load_supernet
    from raynas.train.trainer import train

    started = time.time()
    run_dir = cfg["run_dir"]
    storage.check_writable(run_dir, "run_dir")
    storage.write_text(storage.join(run_dir, "pipeline.yaml"), yaml.safe_dump(cfg, sort_keys=False))
    # Ray Train workers report progress on their stdout: forward it, so a long pipeline shows its epochs.
    init_local_ray(devices=[cfg["profile"]["device"]], log_to_driver=True)

    summary: dict[str, Any] = {"run_dir": run_dir}
    if cfg["checkpoint"]:
        checkpoint = cfg["checkpoint"]
        log(f"1/4 train: skipped, using {storage.display(checkpoint)}")
    elif (checkpoint := trained_supernet(cfg["train"])) is not None:
        log(f"1/4 train: skipped, already trained: {storage.display(checkpoint)}")
    else:
        log("1/4 train: supernet on Ray Train")
        t0 = time.time()
        result = train(cfg["train"])
        checkpoint = str(result.supernet_path)
        summary["train_s"] = round(time.time() - t0, 1)
    summary["checkpoint"] = checkpoint
    supernet = load_supernet(checkpoint)

    log(f"2/4 profile: block LUT + calibration on device '{cfg['profile']['device']}'")
    t0 = time.time()
    p = cfg["profile"]
    summary.update(profile_device(supernet, p["device"], cfg["search"]["latency"]["lut"], p["calibration_n"],
                                  p["devices_file"], p["max_archs"], p["patience"]))
    summary["profile_s"] = round(time.time() - t0, 1)

    log("3/4 search + 4/4 export and report")
    search_cfg = {**cfg["search"], "checkpoint": checkpoint}
    summary["search"] = run_search_job(search_cfg, resume=True)
    summary["wall_s"] = round(time.time() - started, 1)
    storage.write_text(storage.join(run_dir, "summary.yaml"), yaml.safe_dump(summary, sort_keys=False))
    log(f"done in {summary['wall_s']} s: report "
        f"{storage.display(storage.join(summary['search']['run_dir'], 'report.md'))}")
    return summary


def load_pipeline_config(path: str | Path, run_dir: str | None = None) -> dict[str, Any]:
    cfg = read_yaml(path, "config")
    if run_dir:
        cfg["run_dir"] = run_dir
    return validate_pipeline_config(cfg)
