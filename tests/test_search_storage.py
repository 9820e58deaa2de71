"""The search with its run_dir (and checkpoint) in object storage: the real S3-compatible server of conftest.

Every artifact lands in the bucket and nothing in the working directory; a search resumed from a fresh
working directory (as on another node) reads its state back from the bucket and re-evaluates nothing.
`raynas export --out` refuses an unwritable location before any work and writes into a bucket prefix.

Reuses tests/test_search_e2e.py's tiny trained supernet and LUT (pipelines/configs/search_space_nb201_tiny.yaml).
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from test_search_e2e import (  # noqa: F401  (module fixtures, shared)
    SPACE_YAML,
    TOP_K,
    checkpoint,
    devices_file,
    lut,
    ray_local,
    search_config,
    workdir,
)

from raynas import storage
from raynas.cli import main as cli_main
from raynas.search.evaluator import EvaluatorConfig, SubnetEvaluator
from raynas.search.results import ResultStore
from raynas.space import Arch
from raynas.supernets.checkpoint import load_supernet

BUDGET, POPULATION = 12, 6
ARTIFACTS = {"config.yaml", "evaluations", "evaluations.parquet", "front.parquet", "exported.parquet", "onnx",
             "report.md", "pareto.png"}


@pytest.fixture
def counted_evaluations(monkeypatch):
    """The arch JSONs the search hands to its evaluator actors (the real pool, observed on the driver)."""
    from raynas.search import runner

    asked: list[str] = []
    real = runner.pool_evaluator

    def observed(pool):
        evaluate = real(pool)

        def wrapped(arch_jsons):
            arch_jsons = list(arch_jsons)
            asked.extend(arch_jsons)
            yield from evaluate(arch_jsons)

        return wrapped

    monkeypatch.setattr(runner, "pool_evaluator", observed)
    return asked


def test_search_in_a_bucket_writes_only_there_and_resumes_from_it(ray_local, checkpoint, lut, devices_file,  # noqa: F811
                                                                  s3_bucket, counted_evaluations, tmp_path,
                                                                  monkeypatch):
    from raynas.search.runner import run_search_job

    first_cwd, second_cwd = tmp_path / "node_a", tmp_path / "node_b"
    first_cwd.mkdir()
    second_cwd.mkdir()
    monkeypatch.chdir(first_cwd)
    # The checkpoint lives in the bucket too: the evaluator actors get its bytes, never a driver path.
    ckpt = storage.write_bytes(storage.join(s3_bucket, "train", "supernet.pt"), checkpoint.read_bytes())
    run_dir = storage.join(s3_bucket, "runs", "search")
    cfg = search_config(run_dir, ckpt, lut, devices_file, budget=BUDGET, params={"population": POPULATION})
    summary = run_search_job(cfg)

    assert summary["run_dir"] == run_dir
    assert list(first_cwd.iterdir()) == [], "the search wrote into the working directory"
    assert ARTIFACTS <= set(storage.list_dir(run_dir))
    assert yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml")))["run_dir"] == run_dir
    evaluations = storage.read_pandas(storage.join(run_dir, "evaluations.parquet"))
    parts = ResultStore(storage.join(run_dir, "evaluations")).part_files()
    assert len(parts) == len(evaluations) == summary["evaluations"] == len(set(counted_evaluations))
    assert len(counted_evaluations) == len(set(counted_evaluations)), "an arch was evaluated twice"
    assert evaluations["arch"].is_unique and evaluations["accuracy"].between(0, 1).all()
    front = storage.read_pandas(storage.join(run_dir, "front.parquet"))
    assert len(front) == summary["front"] >= 1 and set(front["arch"]) <= set(evaluations["arch"])

    # The exported subnets are in the bucket, verified ONNX equal to the PyTorch subnet, measured on the device.
    exported = storage.read_pandas(storage.join(run_dir, "exported.parquet"))
    assert len(exported) == min(TOP_K, len(front)) and (exported["measured_ms"] > 0).all()
    # Exported with each subnet's own recalibrated BN statistics, as the evaluator actors scored it.
    local = SubnetEvaluator(storage.read_bytes(ckpt), EvaluatorConfig(data={"name": "digits"}, bn_samples=256,
                                                                      batch_size=256))
    supernet = local.supernet
    x = torch.randn(supernet.input_shape(1), generator=torch.Generator().manual_seed(0))
    for rec in exported.to_dict("records"):
        assert rec["onnx"].startswith("onnx/")  # relative to run_dir, wherever run_dir is
        model = storage.read_bytes(storage.join(run_dir, rec["onnx"]))
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        local.evaluate(rec["arch"])
        with torch.no_grad():
            expected = supernet.extract(Arch.from_json(rec["arch"])).eval()(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)
    assert sorted(storage.list_dir(storage.join(run_dir, "onnx"))) == [f"subnet_{i}.onnx" for i in range(len(exported))]
    report = storage.read_text(storage.join(run_dir, "report.md"))
    assert report.startswith("# raynas search report: nb201-tiny") and "](pareto.png)" in report
    assert all(f"| {p} |" in report for p in exported["onnx"])
    assert storage.read_bytes(storage.join(run_dir, "pareto.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    # Resumed from another working directory (another node): the state comes from the bucket alone.
    monkeypatch.chdir(second_cwd)
    counted_evaluations.clear()
    stored = {r["arch"]: r["finished_at"] for r in ResultStore(storage.join(run_dir, "evaluations")).records()}
    resumed = run_search_job(cfg, resume=True)
    assert counted_evaluations == [], "the resumed search re-evaluated stored archs"
    assert list(second_cwd.iterdir()) == []
    after = ResultStore(storage.join(run_dir, "evaluations"))
    assert len(after.part_files()) == len(parts) and resumed["evaluations"] == summary["evaluations"]
    assert {r["arch"]: r["finished_at"] for r in after.records()} == stored
    assert set(storage.read_pandas(storage.join(run_dir, "front.parquet"))["arch"]) == set(front["arch"])


def test_export_to_an_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    arch = json.dumps(load_supernet_space().max_arch().to_dict())
    # A checkpoint that does not exist: were it read first, the error would name it, not --out.
    for out in (blocker / "subnet.onnx", blocker / "exports"):
        started = time.monotonic()
        code = cli_main(["export", "--space", str(SPACE_YAML), "--arch", arch, "--out", str(out),
                         "--checkpoint", str(tmp_path / "missing.pt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("raynas: error: --out: ") and "not writable" in err[0] and "missing.pt" not in err[0]
        assert time.monotonic() - started < 5
    assert blocker.read_text() == "x"


def test_export_into_a_bucket_directory(checkpoint, s3_bucket, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    ckpt = storage.write_bytes(storage.join(s3_bucket, "supernet.pt"), checkpoint.read_bytes())
    supernet = load_supernet(ckpt)
    arch = supernet.space.max_arch()
    out = storage.join(s3_bucket, "exports")
    assert cli_main(["export", "--space", str(SPACE_YAML), "--arch", arch.to_json(), "--out", out,
                     "--checkpoint", ckpt]) == 0
    result = json.loads(capsys.readouterr().out)
    assert storage.parent(result["path"]) == out and result["path"].endswith(".onnx")
    assert storage.list_dir(out) == [storage.basename(result["path"])]
    assert list(tmp_path.iterdir()) == []
    session = ort.InferenceSession(storage.read_bytes(result["path"]), providers=["CPUExecutionProvider"])
    x = torch.randn(supernet.input_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = supernet.extract(arch).eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def load_supernet_space():
    from raynas.space import load_space

    return load_space(SPACE_YAML)
