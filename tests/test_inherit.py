"""Size-specific supernets with weight inheritance (seed 001, AutoViT): inherit, plan, train a chain."""

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from raynas.errors import ConfigError
from raynas.space import load_space
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import load_supernet, save_supernet
from raynas.train.chain import load_chain_config, plan_size_specific, train_size_specific
from raynas.train.inherit import InheritStrategy, inherit_from_checkpoint

# Three tiny AutoViT spaces with one layout (like autovit-s / -xs / -xxs): XS is a sub-space of S, so
# every XS subnet also exists in S; XXS is narrower and only shares prefixes.
S = {"name": "tiny-s", "family": "autovit", "resolution": 32, "num_classes": 10, "patch_size": 2, "head_dim": 4,
     "stem": {"widths": [8]},
     "conv_stages": [{"name": "mb1", "widths": [8, 16], "depths": [1], "stride": 2}],
     "transformer_stages": [
         {"name": "t1", "widths": [16, 24], "depths": [1, 2], "heads": [1, 2], "mlp_ratios": [1.0, 2.0], "stride": 1},
         {"name": "t2", "widths": [24, 32], "depths": [1, 2], "heads": [1, 2], "mlp_ratios": [1.0, 2.0], "stride": 2},
     ],
     "num_transformer_stages": [1, 2],
     "head": {"widths": [32, 48]}}


def _variant(name, t_widths, heads, head_widths, mb_widths):
    cfg = copy.deepcopy(S)
    cfg["name"] = name
    cfg["conv_stages"][0]["widths"] = mb_widths
    for st, widths in zip(cfg["transformer_stages"], t_widths):
        st["widths"], st["heads"] = widths, heads
    cfg["head"]["widths"] = head_widths
    return cfg


XS = _variant("tiny-xs", [[16], [24]], [1], [32], [8])
XXS = _variant("tiny-xxs", [[8, 12], [12, 16]], [1], [16, 24], [8])


@pytest.fixture
def spaces(tmp_path):
    paths = {}
    for cfg in (S, XS, XXS):
        paths[cfg["name"]] = tmp_path / f"{cfg['name']}.yaml"
        paths[cfg["name"]].write_text(yaml.safe_dump(cfg))
    return paths


def _randomised(net, seed):
    """Distinct random weights and BatchNorm statistics, so a missed or misplaced copy shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.2)
    return net.eval()


def _as_src_arch(src_space, arch):
    return src_space.validate({**src_space.min_arch().to_dict(), **arch.to_dict()})


def test_common_subnet_is_identical_after_inheritance(spaces, tmp_path):
    src = _randomised(build_supernet(load_space(spaces["tiny-s"])), 0)
    path = save_supernet(src, tmp_path / "s.pt")
    space = load_space(spaces["tiny-xs"])
    options = InheritStrategy.validate_options({"init_from": str(path), "base": {"name": "sandwich", "num_random": 1}})
    assert options["base"] == {"name": "sandwich", "num_random": 1, "temperature": 1.0, "distill": "logits",
                               "feature_weight": 1.0}
    strategy = InheritStrategy(space, options, seed=0)
    assert strategy.name == "sandwich+inherit" and strategy.teacher_arch() == space.max_arch()
    dst = strategy.prepare_model(build_supernet(space)).eval()
    report = strategy.inherit_report
    assert report["skipped"] == [] and report["tensors"] == report["complete"] == len(dst.state_dict())
    x = torch.randn(3, 3, 32, 32)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for arch in [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(6)]:
            assert torch.allclose(dst(x, arch), src(x, _as_src_arch(src.space, arch)), atol=1e-6, rtol=0), \
                arch.to_json()
    # a narrower space receives the overlapping prefixes of every tensor
    xxs = build_supernet(load_space(spaces["tiny-xxs"]))
    report = inherit_from_checkpoint(xxs, path)
    src_state = src.state_dict()
    for name, t in xxs.state_dict().items():
        assert torch.equal(t, src_state[name][tuple(slice(0, n) for n in t.shape)]), name


def _chain(spaces, storage, **train):
    return {
        "name": "sizes", "storage_path": str(storage),
        "train": {"epochs": 1, "steps_per_epoch": 2, "strategy": "uniform", "seed": 0,
                  "data": {"name": "digits", "batch_size": 8, "eval_batch_size": 64, "max_val_samples": 64},
                  "eval": {"bn_samples": 16, "num_random": 0}, "scaling": {"num_workers": 1}, **train},
        "stages": [
            {"space": str(spaces["tiny-s"])},
            # a negligible learning rate keeps the inherited weights (the test can see they arrived in
            # the workers); two DDP workers here, one elsewhere to keep the test short
            {"space": str(spaces["tiny-xs"]), "inherit_from": "tiny-s",
             "train": {"optimizer": {"lr": 1e-9, "weight_decay": 0.0}, "scaling": {"num_workers": 2}}},
            {"space": str(spaces["tiny-xxs"]), "inherit_from": "tiny-s"},
        ],
    }


def test_chain_is_validated_before_any_compute(spaces, tmp_path):
    cfg = _chain(spaces, tmp_path)
    stages = plan_size_specific(cfg)
    assert [s.key for s in stages] == ["tiny-s", "tiny-xs", "tiny-xxs"]
    assert [s.inherit_from for s in stages] == [None, "tiny-s", "tiny-s"]
    assert stages[1].shared_fraction == pytest.approx(1.0) and 0 < stages[2].shared_fraction <= 1
    assert stages[1].cfg["optimizer"]["lr"] == 1e-9 and stages[2].cfg["optimizer"]["lr"] == 0.05
    assert all(s.run_dir == str(tmp_path.resolve() / "sizes" / s.key) for s in stages)

    bad = copy.deepcopy(cfg)
    bad["stages"][1]["inherit_from"] = "tiny-xxs"  # a later stage
    with pytest.raises(ConfigError, match=r"stages\[1\].inherit_from: 'tiny-xxs' is not an earlier stage"):
        plan_size_specific(bad)
    bad = copy.deepcopy(cfg)
    bad["stages"].append({"space": "nb201", "name": "nb", "inherit_from": "tiny-s"})
    with pytest.raises(ConfigError, match=r"stages\[3\].inherit_from: stage 'tiny-s' is 'autovit'"):
        plan_size_specific(bad)
    bad = copy.deepcopy(cfg)
    bad["stages"][2]["train"] = {"optimizer": {"lr": -1}}
    with pytest.raises(ConfigError, match=r"stages\[2\]: optimizer.lr"):
        plan_size_specific(bad)
    bad = copy.deepcopy(cfg)
    bad["train"]["space"] = "autovit-s"
    with pytest.raises(ConfigError, match="train.space"):
        plan_size_specific(bad)
    other_head_dim = copy.deepcopy(XXS)
    other_head_dim["head_dim"] = 8
    path = tmp_path / "hd.yaml"
    path.write_text(yaml.safe_dump(other_head_dim))
    bad = copy.deepcopy(cfg)
    bad["stages"][2]["space"] = str(path)
    with pytest.raises(ConfigError, match="head_dim"):
        plan_size_specific(bad)


def test_config_file_resolves_stage_spaces(spaces, tmp_path):
    cfg = _chain({k: v.name for k, v in spaces.items()}, tmp_path / "runs")
    cfg.pop("name")
    path = spaces["tiny-s"].parent / "chain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_chain_config(path, {"train.scaling.num_workers": 1, "name": None})
    assert loaded["name"] == "chain" and loaded["train"]["scaling"]["num_workers"] == 1
    assert loaded["stages"][0]["space"] == str(spaces["tiny-s"].resolve())


def test_size_specific_chain_trains_each_stage(ray_local, spaces, tmp_path):
    cfg = _chain(spaces, tmp_path)
    cfg["stages"] = cfg["stages"][:2]  # S, then XS from S (XXS adds a third Ray Train start, nothing new)
    results = train_size_specific(cfg, quiet=True)
    assert [r.key for r in results] == ["tiny-s", "tiny-xs"]
    assert [r.skipped for r in results] == [False, False]
    for r in results:
        rows = r.metrics
        assert len(rows) == 1 and int(rows["steps"].iloc[0]) == 2
    assert [int(r.metrics["world_size"].iloc[0]) for r in results] == [1, 2]
    assert results[0].metrics["strategy"].iloc[0] == "uniform"
    assert results[1].metrics["strategy"].iloc[0] == "uniform+inherit"
    assert results[1].inherited_from == results[0].supernet_path

    # The XS stage trained at lr 1e-9 from the S stage's weights: a subnet in both spaces still computes
    # what the trained S supernet computes (train mode: batch statistics, independent of running ones).
    s, xs = load_supernet(results[0].supernet_path).train(), load_supernet(results[1].supernet_path).train()
    x = torch.randn(4, 3, 32, 32)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for arch in [xs.space.max_arch()] + [xs.space.sample(rng) for _ in range(3)]:
            assert torch.allclose(xs(x, arch), s(x, _as_src_arch(s.space, arch)), atol=1e-4, rtol=0)

    summary = json.loads((tmp_path / "sizes" / "chain.json").read_text())
    assert [e["inherit_from"] for e in summary] == [None, "tiny-s"]
    assert all("loss" in e["last_epoch"] for e in summary)
    # re-running a finished chain trains nothing again
    again = train_size_specific(cfg, quiet=True)
    assert [r.skipped for r in again] == [True, True]


def test_example_chain_config_is_valid(tmp_path):
    """pipelines/configs/train_autovit_sizes.yaml: S, then XS and XXS inheriting from S."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "train_autovit_sizes.yaml"
    stages = plan_size_specific(load_chain_config(path, {"storage_path": str(tmp_path)}))
    assert [(s.key, s.inherit_from) for s in stages] == [("autovit-s", None), ("autovit-xs", "autovit-s"),
                                                         ("autovit-xxs", "autovit-s")]
    assert all(0 < s.shared_fraction <= 1 for s in stages[1:])
