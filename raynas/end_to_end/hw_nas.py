"""The hardware-aware NAS pipeline that `ray job submit ... pipelines/hw_nas.py` and `raynas demo` run.

`run_dir` is a local path or a URI (s3://bucket/prefix, ...): every stage reads and writes it through
raynas.storage, and decides what to skip or continue from what is stored there, so the pipeline can be
re-run with the same config from any node of the cluster, in a fresh working directory: training is
skipped when its final supernet is stored (else resumes from its last epoch checkpoint), the LUT reuses
measured blocks, the search resumes from its Parquet store, exported subnets are kept. A killed pipeline is
re-run, never restarted. Every write is atomic (raynas.storage); a torn file of the run's own (from an older,
non-atomic writer) is set aside as `<name>.torn-<id>` and its work redone.

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

from raynas import config as c
from raynas import storage

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/hw_nas",
    "checkpoint": None,   # a trained supernet: skips the train stage
    "train": None,        # a `raynas train` config (inline); its storage_path/name default into run_dir
    "profile": {"device": "local-cpu", "devices_file": None, "lut": None, "calibration_n": 10, "max_archs": 3000,
                "patience": 300, "method": "isolated", "appearances": 2},
    "search": {},         # a `raynas search` config without checkpoint/run_dir/latency.lut (filled in here)
}

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def log(msg: str) -> None:
    print(f"[hw_nas] {msg}", file=sys.stderr, flush=True)


def _profile_section(cfg: dict[str, Any]) -> dict[str, Any]:
    from raynas.hw.devices import LUT_METHODS, get_device

    p = c.section(cfg, "profile", DEFAULTS["profile"])
    c.integer(p["calibration_n"], "profile.calibration_n", 2)
    c.integer(p["max_archs"], "profile.max_archs", 1)
    c.integer(p["patience"], "profile.patience", 1)
    c.choice(p["method"], "profile.method", LUT_METHODS)
    c.integer(p["appearances"], "profile.appearances", 1)
    p["lut"] = c.location(p["lut"], "profile.lut", optional=True)
    p["devices_file"] = c.location(p["devices_file"], "profile.devices_file", optional=True)
    get_device(c.string(p["device"], "profile.device"), p["devices_file"], "profile.device")
    return p


def _train_section(train: Any, run_dir: str) -> dict[str, Any]:
    from raynas.train.config import validate_train_config

    train = c.mapping(train, "train")
    train.setdefault("storage_path", storage.join(run_dir, "train"))
    train.setdefault("name", "supernet")
    space = train.get("space")
    if isinstance(space, str) and space.endswith((".yaml", ".yml")) and Path(space).is_file():
        # Ray Train workers load the space themselves, from another working directory.
        train["space"] = str(Path(space).resolve())
    return c.nested("train", validate_train_config, train)


def validate_pipeline_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate every stage's config up front, so a typo fails before hours of training."""
    from raynas.search.config import validate_search_config

    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, DEFAULTS, "config")
    out = copy.deepcopy(DEFAULTS)
    out.update({k: v for k, v in cfg.items() if k not in ("profile",)})
    out["profile"] = _profile_section(cfg)
    run_dir = out["run_dir"] = c.location(out["run_dir"], "run_dir")
    out["checkpoint"] = c.location(out["checkpoint"], "checkpoint", optional=True)
    if out["checkpoint"] is None and out["train"] is None:
        c.fail("train", "missing", "a `raynas train` config, or `checkpoint` of a trained supernet")
    if out["train"] is not None:
        out["train"] = _train_section(out["train"], run_dir)
    search = copy.deepcopy(c.mapping(out["search"], "search"))
    for key in ("checkpoint", "run_dir"):
        if key in search:
            c.fail(f"search.{key}", "set by the pipeline", "remove it")
    search["run_dir"] = storage.join(run_dir, "search")
    search["latency"] = c.mapping(search.get("latency") or {}, "search.latency")
    search["latency"].setdefault("device", out["profile"]["device"])
    search["latency"].setdefault("devices_file", out["profile"]["devices_file"])
    search["latency"]["lut"] = out["profile"]["lut"] or storage.join(run_dir, "lut.parquet")
    if out["train"] is not None:
        search.setdefault("data", out["train"]["data"])
    out["search"] = c.nested("search", validate_search_config, search)
    return out


def profile_device(supernet, device: str, lut: str, calibration_n: int, devices_file: str | None,
                   max_archs: int, patience: int, owned: bool = False, method: str = "isolated",
                   appearances: int = 2, precision: str = "fp32") -> dict[str, Any]:
    """Build (or extend) the block LUT of `supernet`'s space on `device` at `precision` (the search's
    `deploy.precision`) and calibrate it end to end.

    `lut` is a location (path or URI); blocks and a calibration already stored there are reused.
    `owned`: the LUT is the run's own (in its run_dir), so a torn one is set aside and redone (see
    `_redo_if_torn`); a LUT the user gave is never moved, a corrupt one is an error naming it.
    """
    from raynas.hw.devices import get_device
    from raynas.hw.latency import calibration_path, load_calibration, save_calibration
    from raynas.hw.lut import TableKey, build_lut, empty_table, read_lut, select
    from raynas.hw.profiling import calibrate
    from raynas.hw.remote import start_profiler

    spec = get_device(device, devices_file)
    key = TableKey.of(supernet, spec, precision)
    existing, meta = _redo_if_torn(lambda: read_lut(lut, "profile.lut"), lut, owned) or (empty_table(), {})
    log(f"2/4 profile: LUT {storage.display(lut)}: {len(select(existing, key))} blocks stored")
    profiler = start_profiler(spec)
    try:
        # `out`: measured blocks are stored as the build goes, so a killed pipeline's re-run measures the rest only.
        rows, new_meta = build_lut(supernet, [profiler], existing, meta, max_archs=max_archs, patience=patience,
                                   out=lut, method=method, appearances=appearances, precision=precision)
        group = new_meta[key.id]
        log(f"2/4 profile: LUT complete: {group['measured']} blocks measured, {group['reused']} reused")
        calibration = calibration_path(lut)
        record = _redo_if_torn(lambda: load_calibration(calibration, key), calibration, owned)
        calibrated = record is None or record["n"] < calibration_n
        if calibrated:
            log(f"2/4 profile: calibration: measuring {calibration_n} subnets end to end")
            record = calibrate(supernet, select(rows, key), profiler, n=calibration_n, precision=precision)
            save_calibration(calibration, key, record)
        else:
            log(f"2/4 profile: calibration: stored ({record['n']} subnets)")
    finally:
        profiler.stop()
    return {"lut_blocks": group["blocks"], "lut_build_s": group["build_s"], "lut_measured": group["measured"],
            "lut_reused": group["reused"], "calibration_n": record["n"], "calibration_measured": calibrated,
            "profilers_replaced": profiler.replaced}


def _redo_if_torn(read, location: str, owned: bool):
    """`read()` of a file the run may own. Writes are atomic, so a corrupt file of the run's own is one a
    writer of an older raynas left torn (or something else wrote over): when `owned`, it is set aside and
    None returned, so the stage does its work again instead of failing on every re-run."""
    try:
        return read()
    except storage.CorruptFile as exc:
        if not owned:
            raise
        moved = storage.set_aside(location)
        log(f"{exc}; set aside as {storage.display(moved)}, redoing it")
        return None


def trained_supernet(train_cfg: dict[str, Any]) -> str | None:
    """The final supernet of the configured training when storage already holds it complete, else None."""
    from raynas.train.trainer import plan_run

    return _complete_supernet(plan_run(train_cfg))


def _complete_supernet(plan) -> str | None:
    from raynas.train.trainer import SUPERNET_FILE

    final = storage.join(plan.run_dir, SUPERNET_FILE)
    return final if plan.resume_epoch >= plan.cfg["epochs"] and storage.is_file(final) else None


def train_stage(train_cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    """Train the supernet unless storage holds it complete; returns its location. A run killed mid-training
    continues after its last stored epoch checkpoint: `summary` records how many epochs this run trained."""
    from raynas.train.trainer import plan_run, train

    plan = plan_run(train_cfg)
    summary["train_resumed_after_epoch"] = plan.resume_epoch
    if (final := _complete_supernet(plan)) is not None:
        log(f"1/4 train: skipped, already trained: {storage.display(final)}")
        summary["train_epochs_run"] = 0
        return final
    resuming = f", resuming after epoch {plan.resume_epoch}" if plan.resume_epoch else ""
    log(f"1/4 train: supernet on Ray Train{resuming}")
    t0 = time.time()
    result = train(train_cfg)
    summary["train_epochs_run"] = plan.cfg["epochs"] - plan.resume_epoch
    summary["train_s"] = round(time.time() - t0, 1)
    return str(result.supernet_path)


def run_pipeline(cfg: dict[str, Any]) -> dict[str, Any]:
    from raynas.hw.devices import init_local_ray
    from raynas.search.runner import run_search_job
    from raynas.supernets.checkpoint import load_supernet

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
    else:
        checkpoint = train_stage(cfg["train"], summary)
    summary["checkpoint"] = checkpoint
    supernet = load_supernet(checkpoint)

    t0 = time.time()
    p = cfg["profile"]
    summary.update(profile_device(supernet, p["device"], cfg["search"]["latency"]["lut"], p["calibration_n"],
                                  p["devices_file"], p["max_archs"], p["patience"], owned=p["lut"] is None,
                                  method=p["method"], appearances=p["appearances"],
                                  precision=cfg["search"]["deploy"]["precision"]))
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
    cfg = c.read_yaml(str(path), "config")
    if run_dir:
        cfg["run_dir"] = run_dir
    return validate_pipeline_config(cfg)
