"""The hardware-aware NAS pipeline script fails fast on bad input: one line naming the field, exit 2, before
Ray starts or anything is written. The pipeline itself runs under `ray job submit` on a multi-node cluster
with an `s3://` run directory in tests/test_cluster.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import ray_env

REPO = Path(__file__).resolve().parents[1]
TINY = "pipelines/configs/hw_nas_tiny.yaml"


def run_pipeline_script(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/hw_nas.py", "--config", str(config),
                           "--run-dir", str(tmp_path / "run")], cwd=REPO, env=ray_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["search"]["search"].update(algorithm="hillclimb"), "search.search.algorithm"),
    (lambda c: c["search"]["evaluator"].update(num_actors=0), "search.evaluator.num_actors"),
    (lambda c: c["train"].update(epochs="two"), "train.epochs"),
    (lambda c: c["profile"].update(calibration_n=1), "profile.calibration_n"),
    (lambda c: c.update(serach={}), "config.serach"),
])
def test_bad_config_exits_2_with_one_line_naming_the_field(mutate, field, tmp_path):
    cfg = yaml.safe_load((REPO / TINY).read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    done = run_pipeline_script(path, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "run").exists(), "nothing may start before the config is valid"
    assert time.monotonic() - started < 60
