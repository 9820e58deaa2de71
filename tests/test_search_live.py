"""Live latency in the search loop (`latency.model: live`) on a real multi-node local cluster: a head that runs
the evaluator actors and one worker node labelled as the board. Every candidate is exported and timed on the
board's node while its accuracy is evaluated; the profiler actor is killed mid-search and replaced; a resumed
search measures nothing again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from raynas.search.config import validate_search_config
from raynas.space import load_space
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import save_supernet

REPO = Path(__file__).resolve().parents[1]
SPACE_YAML = REPO / "pipelines" / "configs" / "search_space_nb201_tiny.yaml"
FAST_PROTOCOL = {"warmup_s": 0.02, "min_warmup_runs": 2, "runs": 50, "repeats": 1}


@pytest.fixture(scope="module")
def board_cluster():
    """Head (2 CPUs, no device) + a worker node labelled device=board."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    board = cluster.add_node(num_cpus=1, labels={"device": "board"})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield {"board": board.node_id, "head": cluster.head_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def _config(tmp_path: Path, **latency) -> dict:
    checkpoint = save_supernet(build_supernet(load_space(SPACE_YAML)).eval(), tmp_path / "supernet.pt")
    devices = tmp_path / "devices.yaml"
    devices.write_text(yaml.safe_dump({"protocol": FAST_PROTOCOL,
                                       "devices": {"board": {"runtime": "cpu", "threads": 1, "batch_size": 1}}}))
    return validate_search_config({
        "checkpoint": str(checkpoint), "run_dir": str(tmp_path / "search"), "data": {"name": "digits"},
        "evaluator": {"num_actors": 1, "bn_samples": 64, "batch_size": 256},
        "latency": {"model": "live", "device": "board", "devices_file": str(devices), **latency},
        "search": {"algorithm": "nsga2", "budget": 12, "seed": 0, "params": {"population": 4}},
        "constraints": {"max_latency_ms": 1000.0},
        "export": {"top_k": 1, "measure": False},
    })


def _kill_profiler_once_measuring(run_dir: Path, killed: list) -> None:
    """SIGKILL-equivalent of the board's profiler once two evaluations are stored (mid-search)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(list((run_dir / "evaluations").glob("part-*.parquet"))) >= 2:
            actor = ray.get_actor("profiler:board", namespace="raynas")
            ray.kill(actor, no_restart=True)
            killed.append(time.monotonic())
            return
        time.sleep(0.1)


def test_live_search_measures_every_candidate_on_the_board_and_resumes_without_measuring(board_cluster, tmp_path):
    from raynas.search.runner import run_search_job

    cfg = _config(tmp_path)
    run_dir = Path(cfg["run_dir"])
    killed: list = []
    killer = threading.Thread(target=_kill_profiler_once_measuring, args=(run_dir, killed), daemon=True)
    killer.start()
    summary = run_search_job(cfg)
    killer.join(timeout=5)
    assert killed, "the profiler was never killed: the search ended before two evaluations were stored"
    assert summary["profilers_replaced"] >= 1

    rows = pd.read_parquet(run_dir / "evaluations.parquet")
    assert len(rows) == summary["evaluations"] >= 8 and rows["arch"].is_unique
    # Every candidate measured, on the board's node, none predicted (there is no LUT at all).
    assert (rows["latency_source"] == "measured").all()
    assert (rows["measured_node"] == board_cluster["board"]).all()
    assert (rows["latency_ms"] > 0).all() and (rows["latency_reference_ms"] > 0).all()
    assert rows["latency_predicted_ms"].isna().all()
    assert rows["feasible"].all()
    front = pd.read_parquet(run_dir / "front.parquet")
    assert len(front) and (front["latency_source"] == "measured").all()

    # Resumed: every candidate answered from the store, nothing measured again, the measurements unchanged.
    parts = sorted((run_dir / "evaluations").glob("part-*.parquet"))
    again = run_search_job(cfg, resume=True)
    assert again["evaluations_reused"] == again["evaluations"] == len(rows)
    assert sorted((run_dir / "evaluations").glob("part-*.parquet")) == parts
    resumed = pd.read_parquet(run_dir / "evaluations.parquet").set_index("arch")
    assert resumed.loc[rows["arch"], "latency_ms"].tolist() == rows["latency_ms"].tolist()


def test_lut_search_corrected_live_ends_with_a_measured_front(board_cluster, tmp_path):
    """`latency.model: lut` on a device that is a node of its own: corrected live by default. Each generation
    the unmeasured front members are measured on the board and the calibration refit; the final front is
    all measured; the report shows predicted vs measured; a resume measures nothing again."""
    from raynas.end_to_end.hw_nas import profile_device
    from raynas.search.runner import run_search_job
    from raynas.supernets.checkpoint import load_supernet

    live_cfg = _config(tmp_path)
    lut = tmp_path / "lut.parquet"
    profile_device(load_supernet(live_cfg["checkpoint"]), "board", str(lut), calibration_n=4,
                   devices_file=live_cfg["latency"]["devices_file"], max_archs=3000, patience=300)
    cfg = validate_search_config({**live_cfg, "latency": {**live_cfg["latency"], "model": "lut", "lut": str(lut),
                                                          "correction_per_generation": 2}})
    assert cfg["latency"]["correction"] == "auto"
    summary = run_search_job(cfg)
    run_dir = Path(cfg["run_dir"])

    measured = pd.read_parquet(run_dir / "live_measured.parquet")
    assert summary["live_measured"] == len(measured) > 0 and measured["arch"].is_unique
    assert (measured["measured_node"] == board_cluster["board"]).all()
    assert (measured["measured_ms"] > 0).all() and (measured["predicted_ms"] > 0).all()
    history = pd.read_parquet(run_dir / "live_calibration.parquet")
    assert history["generation"].iloc[0] == -1 and len(history) >= 2
    assert list(history["live_measured"]) == sorted(history["live_measured"])  # only ever more measurements
    front = pd.read_parquet(run_dir / "front.parquet")
    assert len(front) and (front["latency_source"] == "measured").all()  # measured, not predicted
    rows = pd.read_parquet(run_dir / "evaluations.parquet").set_index("arch")
    by_arch = measured.set_index("arch")
    assert rows.loc[by_arch.index, "latency_ms"].tolist() == pytest.approx(by_arch["measured_ms"].tolist())
    assert rows["latency_source"].isna().sum() == len(rows) - len(measured)  # the others stay predicted
    report = (run_dir / "report.md").read_text()
    assert "## Live latency: predicted vs measured" in report and "## Calibration after each generation" in report

    parts = sorted((run_dir / "live").glob("part-*.parquet"))
    again = run_search_job(cfg, resume=True)
    assert again["live_measured"] == len(measured)
    assert sorted((run_dir / "live").glob("part-*.parquet")) == parts  # nothing measured again
