"""NSGA-II over (big, little, split) pairs with the search issue's actors and result store: objectives
routed accuracy and E[latency] (a latency model of raynas.hw), constraint on the peak latency."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _biglittle_tiny import tiny_space

from raynas import storage
from raynas.biglittle.costs import PairCostModel, PieceLatency
from raynas.biglittle.coupling import CoupledSupernet, save_coupled
from raynas.biglittle.search import validate_pair_search_config
from raynas.cli import main as cli_main
from raynas.errors import ConfigError
from raynas.hw.latency import Affine, ProxyLatencyModel

DATA = {"name": "synthetic", "num_samples": 48, "num_val_samples": 24, "image_size": 8, "channels": 3}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from raynas.hw.devices import init_local_ray

    started = init_local_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_piece_latency_composes_the_latency_model():
    torch.manual_seed(0)
    model = CoupledSupernet(tiny_space(), "partial", splits=[2, 4], router="learned", router_hidden=4)
    proxy = ProxyLatencyModel(model.big_net, "flops", Affine(slope=1e-4, intercept=0.05))
    costs = PairCostModel(model, PieceLatency(proxy))
    pair = model.pair_space.extreme_pair()
    c = costs.costs(pair)
    lay = model.layout(pair)
    # a standalone model's latency is the proxy's prediction for it (trunk + branch, one call each)
    assert c.model("big", "latency_ms") == pytest.approx(proxy.predict(lay.big) + 0.05)
    est = costs.estimate(pair)
    assert est["latency_ms"] == pytest.approx(c.peak("latency_ms")) and est["macs"] == c.peak()


def _lut_model(supernet, archs):
    """A LUT latency model over the blocks of `archs` (synthetic per-block milliseconds)."""
    from raynas.hw.features import FEATURES, block_features
    from raynas.hw.latency import LutLatencyModel

    rows = {}
    for arch in archs:
        for block in supernet.blocks(arch):
            feats = block_features(block.module, block.in_shape)
            rows[block.key] = {"key": block.key, "latency_ms": 0.01 + 1e-6 * feats["n_ops"] * 100,
                               **{f"f_{n}": feats[n] for n in FEATURES}}
    return LutLatencyModel(supernet, pd.DataFrame(list(rows.values())), Affine(slope=1.0, intercept=0.05))


@pytest.mark.parametrize("coupling", ["nested", "partial"])
def test_piece_latency_with_a_lut_matches_whole_subnets(coupling):
    torch.manual_seed(0)
    model = CoupledSupernet(tiny_space(), coupling, splits=[2, 4] if coupling == "partial" else None,
                            router="confidence")
    rng = np.random.default_rng(0)
    pairs = [model.pair_space.extreme_pair(rng)] + [model.pair_space.sample(rng) for _ in range(4)]
    archs = [a for p in pairs for a in (model.pair_space.big(p), model.pair_space.little(p))]
    lut = _lut_model(model.big_net, archs)
    costs = PairCostModel(model, PieceLatency(lut))
    for pair in pairs:
        c, lay = costs.costs(pair), model.layout(pair)
        extra_call = 0.05 if lay.has_trunk else 0.0  # trunk and branch are two onnxruntime calls
        assert c.model("big", "latency_ms") == pytest.approx(lut.predict(lay.big) + extra_call)
        if coupling == "nested":
            assert c.model("little", "latency_ms") == pytest.approx(lut.predict(lay.little) + extra_call)
    assert not lut.missing_keys


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_nsga2_pair_search(where, local_ray, tmp_path, capsys, request, monkeypatch):
    # In a bucket: the checkpoint and every artifact there, nothing in the working directory.
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    torch.manual_seed(0)
    model = CoupledSupernet(tiny_space(), "partial", splits=[2, 4], router="confidence")
    ckpt = save_coupled(model, storage.join(root, "supernet.pt"))
    run_dir = storage.join(root, "search")
    cfg = {"checkpoint": str(ckpt), "run_dir": run_dir, "data": DATA, "tau": 0.3,
           "evaluator": {"num_actors": 2, "bn_samples": 24, "batch_size": 24, "threads": 1},
           "latency": {"model": "flops", "calibration_subnets": 2},
           "search": {"algorithm": "nsga2", "budget": 8, "seed": 0, "objectives": ["accuracy", "e_latency_ms"],
                      "params": {"population": 4}},
           "constraints": {"max_peak_latency_ms": 1e6}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["biglittle", "search", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["evaluations"] == 8 and summary["front"] >= 1 and summary["feasible"] == 8
    records = storage.read_pandas(storage.join(run_dir, "evaluations.parquet"))
    assert len(records) == 8
    for col in ("accuracy", "routing_ratio", "oracle_gap", "ece_little", "e_latency_ms", "peak_latency_ms",
                "e_macs", "memory_bytes", "latency_ms"):
        assert records[col].notna().all(), col
    assert (records["e_latency_ms"] <= records["peak_latency_ms"] + 1e-9).all()
    assert set(json.loads(records["arch"][0])) >= {"big.width", "little.width", "split"}
    assert all(storage.is_file(storage.join(run_dir, f)) for f in ("front.parquet", "pareto.png", "summary.yaml"))
    assert len(storage.list_files(storage.join(run_dir, "evaluations"), ".parquet")) == 8
    # a resumed search answers every pair from the store
    assert cli_main(["biglittle", "search", str(path), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluations"] == 8
    assert len(storage.list_files(storage.join(run_dir, "evaluations"), ".parquet")) == 8
    assert list(cwd.iterdir()) == []


def test_search_config_names_the_field():
    with pytest.raises(ConfigError, match="checkpoint"):
        validate_pair_search_config({})
    with pytest.raises(ConfigError, match="tau"):
        validate_pair_search_config({"checkpoint": "x.pt", "tau": 2})
    with pytest.raises(ConfigError, match="latency.lut"):
        validate_pair_search_config({"checkpoint": "x.pt", "latency": {"model": "lut"}})
    with pytest.raises(ConfigError, match="search.objectives"):
        validate_pair_search_config({"checkpoint": "x.pt", "search": {"objectives": ["e_latency_ms"]}})
