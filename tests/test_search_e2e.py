"""The search end to end on real parts: a trained tiny supernet, a LUT measured on this machine, evaluator
actors recalibrating BN (one of whose processes dies mid-population), the Parquet store, ONNX export verified
in onnxruntime, measurement on the device, the report; then `--resume` after the search process is killed.

Space: pipelines/configs/search_space_nb201_tiny.yaml (64 archs, 16 px digits); everything is shared per module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml

from raynas.data import Batches, EpochBatches, Normalizer, eval_dataset, normalization, train_dataset, train_feed_info
from raynas.errors import ConfigError
from raynas.search.config import validate_search_config
from raynas.search.evaluator import EvaluatorConfig, SubnetEvaluator, make_evaluator_pool
from raynas.search.pareto import minimised_matrix
from raynas.search.results import ResultStore
from raynas.space import Arch, load_space
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import load_supernet, save_supernet
from raynas.train.samplers import uniform_arch

REPO = Path(__file__).resolve().parents[1]
SPACE_YAML = REPO / "pipelines" / "configs" / "search_space_nb201_tiny.yaml"
# A shortened protocol (runs stays at the project's minimum of 50): the LUT is built in seconds.
FAST_PROTOCOL = {"warmup_s": 0.02, "min_warmup_runs": 2, "runs": 50, "repeats": 1}
DATA = {"name": "digits"}
BUDGET, POPULATION, TOP_K = 24, 8, 2


# ---- an evaluator whose process dies once ------------------------------------------------------------------------
@dataclass(frozen=True)
class DyingEvaluatorConfig(EvaluatorConfig):
    marker: str = ""  # created by the one actor that dies, so exactly one dies per test run


class DyingEvaluator(SubnetEvaluator):
    """A real evaluator whose worker process exits (os._exit: no exception, no clean-up) on its second
    evaluation, the first time any actor gets there."""

    def __init__(self, checkpoint: bytes, config: DyingEvaluatorConfig):
        super().__init__(checkpoint, config)
        self.calls = 0

    def evaluate(self, arch_json: str) -> dict:
        self.calls += 1
        if self.calls == 2:
            try:
                os.close(os.open(self.config.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # another actor already died
            else:
                os._exit(1)
        return super().evaluate(arch_json)


# ---- shared fixtures: a trained supernet, its LUT on local-cpu, one finished search job ----------------
@pytest.fixture(scope="module")
def ray_local():
    """conftest's local Ray (device local-cpu), held for the whole module."""
    from conftest import start_local_ray

    return start_local_ray()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search_e2e")


@pytest.fixture(scope="module")
def checkpoint(ray_local, workdir) -> Path:
    """The supernet trained briefly in process (single-path uniform sampling, as SPOS) on digits.

    In process rather than through Ray Train: the same weights in seconds instead of a minute of Ray Train
    start-up (tests/test_pipeline.py covers training through Ray Train).
    """
    torch.manual_seed(0)
    space = load_space(SPACE_YAML)
    supernet = build_supernet(space)
    train = train_dataset(DATA, space.resolution, space.in_channels, seed=0)
    batches = EpochBatches(train, train_feed_info(train.context), 64, "cpu",
                           Normalizer(*normalization(DATA, space.in_channels)))
    optimizer = torch.optim.Adam(supernet.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    supernet.train()
    for epoch in range(4):
        for x, y in batches.epoch(epoch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(supernet(x, uniform_arch(space, rng)), y).backward()
            optimizer.step()
    return Path(save_supernet(supernet.eval(), workdir / "supernet.pt"))


@pytest.fixture(scope="module")
def devices_file(workdir) -> Path:
    path = workdir / "devices.yaml"
    path.write_text(yaml.safe_dump({"protocol": FAST_PROTOCOL,
                                    "devices": {"local-cpu": {"runtime": "cpu", "threads": 1, "batch_size": 1}}}))
    return path


@pytest.fixture(scope="module")
def lut(ray_local, checkpoint, devices_file, workdir) -> Path:
    """Block LUT + end-to-end calibration measured on this machine (the device `local-cpu`)."""
    from raynas.end_to_end.hw_nas import profile_device

    path = workdir / "lut.parquet"
    info = profile_device(load_supernet(checkpoint), "local-cpu", path, calibration_n=4,
                          devices_file=str(devices_file), max_archs=3000, patience=600)
    assert info["lut_blocks"] == 2 * 64 + 3  # every cell at both stages + stem, reduction, head
    return path


def search_config(run_dir: Path, checkpoint: Path, lut: Path, devices_file: Path, **search) -> dict:
    return validate_search_config({
        "checkpoint": str(checkpoint), "run_dir": str(run_dir), "data": DATA,
        "evaluator": {"num_actors": 2, "bn_samples": 256, "batch_size": 256},
        "latency": {"model": "lut", "lut": str(lut), "device": "local-cpu", "devices_file": str(devices_file)},
        "search": {"algorithm": "nsga2", "budget": BUDGET, "seed": 0, "params": {"population": POPULATION},
                   **search},
        "export": {"top_k": TOP_K, "measure": True},
    })


@pytest.fixture(scope="module")
def job(ray_local, checkpoint, lut, devices_file, workdir):
    """`raynas search` end to end, during which one evaluator actor's process dies mid-population."""
    from raynas.search import runner

    marker = workdir / "actor_died"

    def pool_with_a_dying_actor(checkpoint_path, config, actor_cls=SubnetEvaluator, method="evaluate"):
        config = DyingEvaluatorConfig(**{**asdict(config), "deploy": config.deploy}, marker=str(marker))
        return make_evaluator_pool(checkpoint_path, config, actor_cls=DyingEvaluator, method=method)

    cfg = search_config(workdir / "search", checkpoint, lut, devices_file)
    with pytest.MonkeyPatch.context() as patch:  # real actors of a subclass; the pool and runner unchanged
        patch.setattr(runner, "make_evaluator_pool", pool_with_a_dying_actor)
        summary = runner.run_search_job(cfg)
    assert marker.exists()
    return cfg, summary


def evaluations(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "evaluations.parquet")


def part_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "evaluations").glob("part-*.parquet"))


def accuracy_by_arch(df: pd.DataFrame) -> dict[str, float]:
    return dict(zip(df["arch"], df["accuracy"]))


# ---- the finished job -----------------------------------------------------------------------------------
def test_every_arch_evaluated_once_despite_a_dead_actor(job, checkpoint):
    cfg, summary = job
    run_dir = Path(summary["run_dir"])
    df = evaluations(run_dir)
    # One actor process died holding a candidate: it was replaced, the candidate retried, nothing doubled.
    assert summary["actors_replaced"] == 1
    assert df["arch"].is_unique and len(df) == summary["evaluations"] == len(part_files(run_dir))
    assert BUDGET - POPULATION < len(df) <= BUDGET
    assert df["worker"].nunique() >= 2, "both evaluator actors took part"
    assert df["accuracy"].between(0, 1).all() and df["accuracy"].nunique() > 3
    assert df["accuracy"].max() > 0.25  # a trained supernet: well above chance (0.1) for its best subnets
    assert (df["latency_ms"] > 0).all() and (df["params"] > 0).all()
    # The stored accuracy is the evaluator's: BN recalibrated on the fixed training subset, top-1 on val.
    row = df.loc[df["accuracy"].idxmax()]
    local = SubnetEvaluator(checkpoint.read_bytes(), EvaluatorConfig(data=DATA, bn_samples=256, batch_size=256))
    assert local.evaluate(row["arch"])["accuracy"] == pytest.approx(row["accuracy"], abs=1e-12)


def test_front_is_the_non_dominated_set(job):
    _, summary = job
    run_dir = Path(summary["run_dir"])
    df, front = evaluations(run_dir), pd.read_parquet(run_dir / "front.parquet")
    assert len(front) == summary["front"] >= 1 and set(front["arch"]) <= set(df["arch"])
    objectives = ("accuracy", "latency_ms")
    F_all = minimised_matrix(df.to_dict("records"), objectives)
    F_front = minimised_matrix(front.to_dict("records"), objectives)
    for f in F_front:  # nothing evaluated dominates a front member
        assert not np.any(np.all(F_all <= f, axis=1) & np.any(F_all < f, axis=1))
    on_front = set(front["arch"])
    for arch, f in zip(df["arch"], F_all):  # and every other evaluation is dominated by some front member
        if arch not in on_front:
            assert np.any(np.all(F_front <= f, axis=1))


def test_exported_onnx_matches_pytorch_and_is_measured(job, checkpoint):
    cfg, summary = job
    run_dir = Path(summary["run_dir"])
    exported = pd.read_parquet(run_dir / "exported.parquet")
    assert len(exported) == min(TOP_K, summary["front"])
    assert (exported["measured_ms"] > 0).all() and (exported["latency_ms"] > 0).all()
    assert (exported["measured_runs"] >= 50).all() and (exported["device"] == "local-cpu").all()
    assert (exported["precision"] == "fp32").all()
    # The deployed model answers as the search scored it: fp32 ONNX accuracy == the supernet's (up to one
    # of the ~360 validation images whose top two logits tie within float rounding).
    np.testing.assert_allclose(exported["accuracy_deployed"], exported["accuracy"], atol=0.003)
    local = SubnetEvaluator(checkpoint.read_bytes(), EvaluatorConfig(data=DATA, bn_samples=256, batch_size=256))
    space = local.supernet.space
    val = eval_dataset(DATA, "val", space.resolution, space.in_channels)
    images = next(iter(Batches(val, 4, "cpu", Normalizer(*normalization(DATA, space.in_channels)))))[0]
    for rec in exported.to_dict("records"):
        path = run_dir / rec["onnx"]
        onnx.checker.check_model(onnx.load(str(path)))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        # Exported with the subnet's own recalibrated BN statistics, as the evaluator scored it.
        local.evaluate(rec["arch"])
        subnet = local.supernet.extract(Arch.from_json(rec["arch"])).eval()
        for x in images:
            x = x.unsqueeze(0)
            with torch.no_grad():
                expected = subnet(x).numpy()
            np.testing.assert_allclose(session.run(None, {name: x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_report_and_plot(job):
    _, summary = job
    run_dir = Path(summary["run_dir"])
    report = (run_dir / "report.md").read_text()
    assert "## Pareto front" in report and "## Exported subnets (ONNX)" in report and "measured_ms" in report
    assert "pareto.png" in report and all(f"onnx/subnet_{i}.onnx" in report for i in range(TOP_K))
    png = (run_dir / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ---- resume after the search process is killed ---------------------------------------------------------------
def test_resume_after_killed_search_reevaluates_nothing(ray_local, job, checkpoint, lut, devices_file, workdir):
    from raynas.search.runner import run_search_job

    _, full = job
    cfg = search_config(workdir / "killed", checkpoint, lut, devices_file)
    cfg_path = workdir / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # The search runs as its own driver process on this test's Ray (as under `ray job submit`); killing it
    # (a new process session: only what it started) takes its actors down with it.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = workdir / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raynas.cli", "search", str(cfg_path)], env=env,
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(part_files(cfg["run_dir"])) < 5:
            assert proc.poll() is None, f"search exited early: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no evaluations stored within 300 s"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {r["arch"]: r for r in ResultStore(Path(cfg["run_dir"]) / "evaluations").records()}
    total = full["evaluations"]
    assert 5 <= len(before) < total, "the kill must land mid-search"
    assert not (Path(cfg["run_dir"]) / "evaluations.parquet").exists()

    with pytest.raises(ConfigError, match="--resume"):  # a fresh run never overwrites stored results
        run_search_job(cfg, resume=False)
    summary = run_search_job(cfg, resume=True)

    after = ResultStore(Path(cfg["run_dir"]) / "evaluations").records()
    parts = part_files(cfg["run_dir"])
    assert len(parts) == len(after) == summary["evaluations"] == total, "an arch was evaluated twice"
    for r in after:  # stored evaluations were reused, not redone
        if r["arch"] in before:
            assert r["finished_at"] == before[r["arch"]]["finished_at"]
    # Deterministic algorithm + deterministic evaluator: the resumed run ends where the uninterrupted one did.
    resumed, uninterrupted = evaluations(cfg["run_dir"]), evaluations(full["run_dir"])
    assert accuracy_by_arch(resumed) == accuracy_by_arch(uninterrupted)
    assert set(pd.read_parquet(Path(cfg["run_dir"]) / "front.parquet")["arch"]) == \
        set(pd.read_parquet(Path(full["run_dir"]) / "front.parquet")["arch"])


def test_accuracy_predictor_fits_when_ranks_are_undefined():
    """Regression: tied accuracies make every candidate's Spearman undefined; scanedge must not crash."""
    from raynas.search.predictor import AccuracyPredictor

    space = load_space(SPACE_YAML)
    rng = np.random.default_rng(0)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(40)))[:20]
    predictor = AccuracyPredictor(space, epochs=20).fit(archs, [0.5] * len(archs))
    assert np.isnan(predictor.spearman)
    assert np.allclose(predictor.predict(archs[:3]), 0.5)


# ---- deployed at the board's precision ------------------------------------------------------------------------
def test_int8_deployment_predicts_exports_and_scores_at_int8(ray_local, checkpoint, lut, devices_file, workdir):
    """`deploy: {precision: int8, quantized_accuracy: true}`: the latency objective is the int8 model's (an
    int8 group beside the fp32 one in the same LUT), each candidate's accuracy is that of its INT8 ONNX in
    onnxruntime, and the exported front members are INT8 QDQ graphs scoring what their records say."""
    from raynas.end_to_end.hw_nas import profile_device
    from raynas.hw.latency import load_latency_model
    from raynas.hw.onnx_accuracy import labelled_arrays, onnx_accuracy
    from raynas.search.runner import run_search_job

    supernet = load_supernet(checkpoint)
    profile_device(supernet, "local-cpu", lut, calibration_n=4, devices_file=str(devices_file), max_archs=3000,
                   patience=600, precision="int8")
    groups = pd.read_parquet(lut).groupby("precision").size().to_dict()
    assert groups == {"fp32": 131, "int8": 131}
    cfg = search_config(workdir / "int8", checkpoint, lut, devices_file, budget=6, params={"population": 3})
    cfg["deploy"] = {"precision": "int8", "quantized_accuracy": True, "calibration_images": 32}
    cfg["export"]["top_k"] = 1
    summary = run_search_job(validate_search_config(cfg))
    assert summary["precision"] == "int8"

    df = evaluations(summary["run_dir"])
    int8_model = load_latency_model("lut", lut, supernet=supernet, device="local-cpu",
                                    devices_file=str(devices_file), precision="int8")
    for row in df.itertuples():
        assert row.latency_ms == pytest.approx(int8_model.predict(Arch.from_json(row.arch)))
    assert df["accuracy"].between(0, 1).all() and df["accuracy_supernet"].between(0, 1).all()
    assert (df["accuracy"] - df["accuracy_supernet"]).abs().max() < 0.15  # int8 costs little on digits

    (rec,) = pd.read_parquet(Path(summary["run_dir"]) / "exported.parquet").to_dict("records")
    assert rec["precision"] == "int8" and rec["measured_ms"] > 0
    graph = onnx.load(str(Path(summary["run_dir"]) / rec["onnx"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    space = supernet.space
    val = eval_dataset(DATA, "val", space.resolution, space.in_channels)
    images, labels = labelled_arrays(Batches(val, 256, "cpu", Normalizer(*normalization(DATA, space.in_channels))))
    assert onnx_accuracy(graph.SerializeToString(), images, labels) == pytest.approx(rec["accuracy_deployed"])
    assert rec["accuracy_deployed"] == pytest.approx(df.set_index("arch").loc[rec["arch"], "accuracy"])
