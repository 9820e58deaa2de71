"""Faults with real processes: the pipeline's driver SIGKILLed in every stage, a profiler actor's process
killed mid-LUT, storage that stops being writable mid-run, a Ray Train worker SIGKILLed mid-epoch.

Each run resumes: nothing finished is computed again (asserted through what storage holds: epoch rows,
LUT rows' `measured_at`, evaluation parts' `stored_at`, ONNX files' inodes), nothing stored is half-written,
and a torn file that an older, non-atomic writer could have left is set aside and redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cluster_helpers import ray_env

from raynas import storage

REPO = Path(__file__).resolve().parents[1]

# A 27-arch NB201 cell space (3 edges x 3 ops, 57 distinct blocks): big enough that every stage lasts
# long enough to be killed in, small enough for the whole pipeline to run several times in a test.
SPACE = {"name": "nb201-faults", "family": "nb201", "resolution": 16, "num_classes": 10, "in_channels": 3,
         "channels": [8, 16], "cells_per_stage": 1, "nodes": 3,
         "ops": ["skip_connect", "nor_conv_1x1", "nor_conv_3x3"]}
# This machine under a short timing protocol: no time-based warm-up, one series (the built-in local-cpu
# warms up 0.2 s per model, which would make the LUT the bulk of the test).
DEVICES = {"devices": {"quick-cpu": {"description": "this machine, short protocol for tests",
                                     "protocol": {"warmup_s": 0.0, "min_warmup_runs": 1, "runs": 50,
                                                  "repeats": 1, "clock": "thread"}}}}


def _write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _pipeline_config(tmp_path: Path) -> Path:
    cfg = {
        "train": {
            "space": _write_yaml(tmp_path / "space.yaml", SPACE),
            "data": {"name": "digits", "batch_size": 32, "max_val_samples": 128},
            "strategy": "uniform", "epochs": 2, "steps_per_epoch": 4,
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0}, "scheduler": {"name": "constant"},
            "eval": {"bn_samples": 64, "num_random": 1}, "scaling": {"num_workers": 1},
        },
        "profile": {"device": "quick-cpu", "devices_file": _write_yaml(tmp_path / "devices.yaml", DEVICES),
                    "calibration_n": 4, "patience": 100},
        "search": {
            "evaluator": {"num_actors": 2, "bn_samples": 64, "batch_size": 64},
            "latency": {"model": "lut"},
            "search": {"algorithm": "nsga2", "budget": 12, "seed": 0, "objectives": ["accuracy", "latency_ms"],
                       "params": {"population": 4}},
            "export": {"top_k": 2, "measure": True},
        },
    }
    path = tmp_path / "pipeline.yaml"
    _write_yaml(path, cfg)
    return path


def _processes_with(marker: bytes) -> list[int]:
    """Processes whose environment holds `marker`: the driver and everything it started (Ray's GCS,
    raylet, workers and actors inherit the environment), however they grouped themselves."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:  # not an artifact: the kernel's process table
                if marker in f.read():
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or a kernel thread
            pass
    return found


class PipelineProcess:
    """`raynas pipeline CONFIG --run-dir DIR` as a real process in a session of its own, so one SIGKILL
    of its process group hits the driver and the local Ray it started at once, as an OOM killer or a
    scheduler's kill would."""

    def __init__(self, config: Path, run_dir: Path, logs: Path, name: str):
        self.marker = f"RAYNAS_FAULT_RUN={uuid.uuid4().hex}".encode()
        key, value = self.marker.decode().split("=")
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "raynas.cli", "pipeline", str(config), "--run-dir", str(run_dir)],
                cwd=REPO, env={**ray_env(), key: value}, stdout=out, stderr=err, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_for(self, ready, what: str, timeout_s: float = 300) -> None:
        """Poll (every 20 ms) until `ready()`; the process must still be running then."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.proc.poll() is None, f"the pipeline ended (rc {self.proc.returncode}) before {what}:\n" \
                                             f"{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{self.output()[-4000:]}"
            time.sleep(0.02)

    def says(self, text: str) -> bool:
        return text in self.output()

    def kill(self) -> None:
        """SIGKILL the process group; then every process of the run (Ray's too) must be gone: a stray
        raylet would hold the run's resources and a re-run would find its actors' names taken."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._assert_no_strays()

    def finish(self, timeout_s: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._assert_no_strays()
        return rc

    def _assert_no_strays(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := _processes_with(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left}
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes of the killed run outlived it: {names}")


def _assert_whole(run_dir: Path) -> None:
    """Every artifact in the run directory reads whole (torn-file leftovers were set aside by name)."""
    import onnx

    for path in run_dir.rglob("*"):
        if not path.is_file() or ".torn-" in path.name or ".tmp-" in path.name:
            continue
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text())
        elif path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)


def _parts(search: Path) -> dict[str, dict]:
    """Evaluation parts by file name: their record (arch, stored_at, ...)."""
    return {p.name: pq.read_table(p).to_pylist()[0] for p in sorted((search / "evaluations").glob("part-*.parquet"))}


@pytest.mark.timeout(900)
@pytest.mark.timeout(1200)  # seven pipeline launches, each starting Python, Ray and Ray Train
def test_pipeline_killed_in_every_stage_resumes_and_survives_unwritable_storage(tmp_path):
    """One run directory, the driver's process group SIGKILLed in training, LUT build, calibration, search
    and export in turn (plus a run stopped by storage that stops being writable after the LUT). Every
    re-run continues where the last one stopped; the last one finds two torn files and redoes them."""
    config = _pipeline_config(tmp_path)
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    train_run, search = run / "train" / "supernet", run / "search"
    lut, calibration = run / "lut.parquet", run / "lut.calibration.json"

    def start(name: str) -> PipelineProcess:
        return PipelineProcess(config, run, logs, name)

    # 1. Training: killed once epoch 1 is checkpointed (its progress line follows the upload), in epoch 2.
    p = start("1-train")
    p.wait_for(lambda: p.says("epoch 1/2"), "epoch-1 progress line")
    p.kill()
    assert not (train_run / "supernet.pt").exists(), "the kill came after training ended"
    epoch1 = pd.read_parquet(train_run / "metrics.parquet").to_dict("records")
    assert [r["epoch"] for r in epoch1] == [1]

    # 2. Training resumes after epoch 1; the LUT build is killed once it has stored its first blocks.
    p = start("2-lut")
    p.wait_for(lut.exists, "first LUT blocks stored")
    p.kill()
    assert p.says("1/4 train: supernet on Ray Train, resuming after epoch 1"), p.output()[-3000:]
    assert not calibration.exists(), "the kill came after the LUT was complete"
    lut_at_kill = pd.read_parquet(lut).set_index("key")["measured_at"]
    assert len(lut_at_kill) > 0

    # 3. The LUT measures only the blocks it lacks; calibration is killed while measuring subnets.
    p = start("3-calibration")
    p.wait_for(lambda: p.says("calibration: measuring"), "calibration")
    p.kill()
    assert p.says("1/4 train: skipped, already trained"), p.output()[-3000:]
    assert p.says(f"2/4 profile: LUT {lut}: {len(lut_at_kill)} blocks stored"), p.output()[-3000:]
    final_lut = pd.read_parquet(lut).set_index("key")["measured_at"]
    assert len(final_lut) > len(lut_at_kill), "the kill in stage 2 came after the LUT was complete"
    assert p.says(f"LUT complete: {len(final_lut) - len(lut_at_kill)} blocks measured, {len(lut_at_kill)} reused")
    assert final_lut[lut_at_kill.index].equals(lut_at_kill), "a stored block was measured again"
    assert not calibration.exists()

    # 4. Storage stops being writable mid-run: once the LUT is complete, search/ becomes a regular file.
    # (Tests run as root in CI, and root ignores a read-only mode bit: chmod cannot make a directory
    # unwritable here, while a file where a directory must be is refused to every user.)
    p = start("4-unwritable")
    p.wait_for(lambda: p.says("2/4 profile: LUT complete"), "LUT complete")
    search.write_bytes(b"in the way")
    assert p.finish() == 2, p.output()[-3000:]
    errors = [line for line in p.err.read_text().splitlines() if line.startswith("raynas: error:")]
    assert len(errors) == 1 and str(search) in errors[0] and "not writable" in errors[0], p.output()[-3000:]
    assert "Traceback" not in p.output()
    assert calibration.exists(), "calibration (before the search) was stored"
    search.unlink()

    # 5. The re-run measures and calibrates nothing; the search is killed once evaluations are stored.
    p = start("5-search")
    p.wait_for(lambda: len(_parts(search)) >= 2 if (search / "evaluations").is_dir() else False,
               "stored evaluations")
    p.kill()
    assert p.says("LUT complete: 0 blocks measured") and p.says("calibration: stored (4 subnets)"), \
        p.output()[-3000:]
    parts_at_kill = _parts(search)

    # 6. The search resumes from its store; the export is killed once the first subnet is exported.
    p = start("6-export")
    p.wait_for(lambda: (search / "exports" / "subnet_0.json").exists(), "first exported subnet")
    p.kill()
    assert p.says(f"[search] resuming: {len(parts_at_kill)} evaluations already stored"), p.output()[-3000:]
    parts_before_export = _parts(search)
    assert {k: v["stored_at"] for k, v in parts_before_export.items() if k in parts_at_kill} == \
        {k: v["stored_at"] for k, v in parts_at_kill.items()}
    subnet_0 = (search / "onnx" / "subnet_0.onnx").stat()

    # 7. Torn files an older raynas (non-atomic writes) could have left: an evaluation part and the second
    # subnet's ONNX cut short. The last run completes, sets them aside and redoes them, and nothing else.
    torn_part = sorted(parts_before_export)[0]
    part = search / "evaluations" / torn_part
    part.write_bytes(part.read_bytes()[:40])
    torn_onnx = (search / "onnx" / "subnet_0.onnx").read_bytes()[:100]
    (search / "onnx" / "subnet_1.onnx").write_bytes(torn_onnx)
    p = start("7-complete")
    assert p.finish() == 0, p.output()[-5000:]
    assert p.says(f"evaluation part: {part} is not a readable Parquet file"), p.output()[-3000:]
    assert p.says("[search] export: 2 subnets, 1 already exported, 1 to measure") or \
        p.says("[search] export: 2 subnets, 1 already exported, 2 to measure"), p.output()[-3000:]
    summary = yaml.safe_load((run / "summary.yaml").read_text())
    assert summary["train_epochs_run"] == 0 and summary["lut_measured"] == 0
    assert summary["calibration_measured"] is False and summary["lut_blocks"] == len(final_lut)

    # Training: epoch 1 was trained once (its row is the one the first run wrote).
    metrics = pd.read_parquet(train_run / "metrics.parquet").to_dict("records")
    assert [r["epoch"] for r in metrics] == [1, 2] and metrics[0] == epoch1[0]
    # Search: every evaluation stored before a kill kept (the torn one redone), each arch once.
    parts = _parts(search)
    kept = {k: v for k, v in parts_before_export.items() if k != torn_part}
    assert all(parts[k]["stored_at"] == v["stored_at"] for k, v in kept.items()), "an evaluation was redone"
    archs = [v["arch"] for v in parts.values()]
    assert len(archs) == len(set(archs)) == summary["search"]["evaluations"]
    assert parts_before_export[torn_part]["arch"] in archs, "the torn evaluation was not redone"
    assert summary["search"]["evaluations_reused"] == len(parts_before_export) - 1
    assert list((search / "evaluations").glob(f"{torn_part}.torn-*"))
    # Export: subnet 0 was not exported again (same file), subnet 1 was, whole.
    assert (search / "onnx" / "subnet_0.onnx").stat().st_ino == subnet_0.st_ino
    assert (search / "onnx" / "subnet_1.onnx").read_bytes() != torn_onnx
    exported = pd.read_parquet(search / "exported.parquet")
    assert list(exported["onnx"]) == ["onnx/subnet_0.onnx", "onnx/subnet_1.onnx"]
    assert (exported["measured_ms"] > 0).all()
    _assert_whole(run)


# ---- a profiler actor killed mid-LUT ------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_profiler_killed_mid_lut_is_replaced_and_keeps_what_it_measured(ray_local, tmp_path):
    """SIGKILL of the profiler actor's process once the build has stored blocks: a new actor takes over,
    the LUT ends with every block, and the blocks stored before the kill are not measured again. Then the
    LUT file is torn (cut short, as a non-atomic writer killed mid-write leaves it): the pipeline's
    profile stage sets it aside and builds it anew instead of failing on every re-run."""
    from raynas.end_to_end.hw_nas import profile_device
    from raynas.hw.devices import get_device
    from raynas.hw.lut import TableKey, build_lut, collect_block_configs, read_lut, select
    from raynas.hw.remote import start_profiler
    from raynas.space import space_from_config
    from raynas.supernets import build_supernet

    # The tests' local node is labelled local-cpu: declared here with the short protocol.
    devices_file = _write_yaml(tmp_path / "devices.yaml", {"devices": {"local-cpu": DEVICES["devices"]["quick-cpu"]}})
    spec = get_device("local-cpu", devices_file)
    supernet = build_supernet(space_from_config({**SPACE, "ops": ["skip_connect", "nor_conv_3x3"]}))
    location = str(tmp_path / "lut.parquet")
    profiler = start_profiler(spec)
    first_pid = profiler.node["pid"]
    before_kill: dict[str, pd.Series] = {}

    def kill_once_blocks_are_stored() -> None:
        while not storage.is_file(location):
            time.sleep(0.02)
        before_kill["rows"] = read_lut(location)[0].set_index("key")["measured_at"]
        os.kill(first_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_blocks_are_stored, daemon=True)
    killer.start()
    try:
        rows, meta = build_lut(supernet, [profiler], patience=50, out=location, show_progress=False)
    finally:
        profiler.stop()
    killer.join(timeout=10)

    key = TableKey.of(supernet, spec)
    catalogue = collect_block_configs(supernet, patience=50, show_progress=False)
    stored = read_lut(location)[0]
    assert sorted(select(stored, key)["key"]) == sorted(catalogue.blocks), "the build did not complete"
    assert profiler.replaced == 1 and profiler.node["pid"] != first_pid
    measured_at = stored.set_index("key")["measured_at"]
    kept = before_kill["rows"]
    assert 0 < len(kept) < len(measured_at), "the kill came after the last block"
    assert measured_at[kept.index].equals(kept), "a block stored before the kill was measured again"

    # A torn LUT of the run's own is set aside and rebuilt (a user's --lut would be an error naming it).
    whole = Path(location).read_bytes()
    Path(location).write_bytes(whole[:len(whole) // 2])
    summary = profile_device(supernet, "local-cpu", location, 2, devices_file, 3000, 50, owned=True)
    assert summary["lut_measured"] == summary["lut_blocks"] == len(catalogue.blocks)
    assert list(tmp_path.glob("lut.parquet.torn-*"))


# ---- a Ray Train worker SIGKILLed mid-epoch -------------------------------------------------------------
from raynas.train.strategies import register_strategy  # noqa: E402
from raynas.train.strategies.uniform import UniformStrategy  # noqa: E402


@register_strategy
class KillableStrategy(UniformStrategy):
    """`uniform`, and a log line per epoch started (`epoch pid`) in `options.log`. On its first attempt at
    epoch 2, rank 0 writes its pid to `options.pid_file` after one step and waits there to be killed, so
    the test's SIGKILL lands mid-epoch, not between epochs. Workers import it from tests/ (--plugin)."""

    name = "killable"
    DEFAULTS = {"log": "", "pid_file": ""}

    def on_epoch_start(self, epoch, num_epochs):
        with open(self.options["log"], "a") as f:  # the test's own counter, not a run artifact
            f.write(f"{epoch} {os.getpid()}\n")

    def train_step(self, x, y, ctx):
        pid_file = Path(self.options["pid_file"])
        if ctx.epoch == 1 and ctx.step == 1 and not pid_file.exists() and \
                torch.distributed.get_rank() == 0:
            pid_file.write_text(str(os.getpid()))
            time.sleep(300)  # killed long before
        return super().train_step(x, y, ctx)


def _train_config(tmp_path, space_yaml, name, strategy):
    return {
        "name": name, "storage_path": str(tmp_path / "runs"), "space": space_yaml,
        "data": {"name": "digits", "batch_size": 8, "max_train_samples": 64, "max_val_samples": 32,
                 "eval_batch_size": 32},
        "strategy": strategy, "epochs": 3, "steps_per_epoch": 2, "seed": 1,
        # Constant learning rate: the run resumed after epoch 1 computes what the uninterrupted run does.
        "scheduler": {"name": "constant"}, "eval": {"bn_samples": 32, "num_random": 1},
        "scaling": {"num_workers": 2}, "failure": {"max_failures": 1},
    }


@pytest.mark.timeout(600)
def test_worker_sigkilled_mid_epoch_resumes_from_the_last_checkpoint(ray_local, tmp_path, tiny_nb201_yaml):
    from raynas.train.trainer import train

    straight = train(_train_config(tmp_path, tiny_nb201_yaml, "straight", "uniform"), quiet=True)

    log, pid_file = tmp_path / "epochs.log", tmp_path / "worker.pid"
    strategy = {"name": "killable", "log": str(log), "pid_file": str(pid_file)}

    def kill_worker_when_waiting() -> None:
        while not pid_file.exists():
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_worker_when_waiting, daemon=True)
    killer.start()
    killed = train(_train_config(tmp_path, tiny_nb201_yaml, "killed", strategy), quiet=True,
                   plugins=["test_faults"])
    killer.join(timeout=10)

    # Rank 0's epochs (both ranks log; rank 0 is the one whose pid was written): epoch 1 ran once, epoch 2
    # twice (the killed attempt and the resumed one, in a new process), epoch 3 once.
    victim = int(pid_file.read_text())
    started = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert [e for e, pid in started if pid == victim] == [0, 1], started
    epochs = sorted(e for e, _ in started)
    assert epochs.count(0) == 2 and epochs.count(1) == 4 and epochs.count(2) == 2, started  # 2 ranks each
    assert list(pd.read_parquet(killed.metrics_path)["epoch"]) == [1, 2, 3]
    final = storage.load_torch(killed.supernet_path)["model"]
    reference = storage.load_torch(straight.supernet_path)["model"]
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
