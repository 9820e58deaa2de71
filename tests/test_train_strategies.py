"""Strategies without Ray: samplers, losses, one real step each, state round trip, registry."""

from collections import Counter

import numpy as np
import pytest
import torch

from raynas.errors import ConfigError
from raynas.space import Dim, SearchSpace, load_space
from raynas.supernets import build_supernet
from raynas.train.config import SECTIONS
from raynas.train.losses import soft_target_loss
from raynas.train.optim import optimizer_factory
from raynas.train.samplers import fair_paths, sandwich_archs
from raynas.train.strategies import build_strategy, get_strategy_class, strategy_names
from raynas.train.strategies.base import StepContext

OWN = ("uniform", "fair", "sandwich")


def test_fair_paths_visit_every_choice_once_per_step(tiny_nb201_yaml, rng):
    space = load_space(tiny_nb201_yaml)
    for _ in range(5):
        paths = fair_paths(space, rng)
        assert len(paths) == 5  # 5 ops per edge
        for d in space.dims:
            assert Counter(p[d.name] for p in paths) == Counter(d.choices)
    # Paths differ between steps (fresh permutations).
    assert fair_paths(space, rng) != fair_paths(space, rng)


def test_fair_paths_balance_dimensions_of_different_sizes(rng):
    space = SearchSpace("mixed", "test", (Dim("a", (1, 2)), Dim("b", (1, 2, 3)), Dim("c", (1, 2, 3, 4, 5))))
    paths = fair_paths(space, rng)
    assert len(paths) == 5
    for d in space.dims:
        counts = Counter(p[d.name] for p in paths)
        assert set(counts) == set(d.choices)  # every choice at least once
        assert max(counts.values()) - min(counts.values()) <= 1  # as even as possible


def test_sandwich_archs_are_largest_smallest_then_random(tiny_nb201_yaml, rng):
    space = load_space(tiny_nb201_yaml)
    archs = sandwich_archs(space, rng, 3)
    assert archs[0] == space.max_arch() and archs[1] == space.min_arch() and len(archs) == 5


def test_soft_target_loss():
    t = torch.randn(4, 10)
    assert soft_target_loss(t)(t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_loss(t, 2.0)(torch.randn(4, 10)).item() > 0
    with pytest.raises(ValueError, match="detached"):
        soft_target_loss(t.requires_grad_())


def _context(model):
    opts = {"main": optimizer_factory(SECTIONS["optimizer"])(model.parameters())}
    return StepContext(model, model, opts, device=torch.device("cpu"), amp_dtype=None,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=0.1, grad_clip=5.0,
                       world_size=1)


@pytest.mark.parametrize("name", OWN)
def test_each_strategy_takes_a_real_step_and_checkpoints_its_state(name, tiny_nb201_yaml, tmp_path):
    torch.manual_seed(0)
    space = load_space(tiny_nb201_yaml)
    strategy = build_strategy({"name": name}, space, seed=3)
    model = strategy.prepare_model(build_supernet(space))
    ctx = _context(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    metrics = strategy.train_step(x, y, ctx)
    assert np.isfinite(metrics["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    # Sampler state survives a weights_only checkpoint: the next step samples the same subnets.
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    twin = build_strategy({"name": name}, space, seed=99)
    twin.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert twin.rng.integers(1 << 30) == strategy.rng.integers(1 << 30)


def test_sandwich_distils_students_from_the_largest(tiny_nb201_yaml):
    torch.manual_seed(0)
    space = load_space(tiny_nb201_yaml)
    strategy = build_strategy({"name": "sandwich", "num_random": 1}, space, seed=0)
    model = build_supernet(space)
    metrics = strategy.train_step(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)), _context(model))
    assert {"teacher_loss", "smallest_kd_loss", "student_kd_loss"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(metrics["teacher_loss"] + 2 * metrics["student_kd_loss"])


def test_registry():
    assert set(OWN) <= set(strategy_names())
    # A config is data: `module:Class` would import code from it; plug-ins come from --plugin or entry points.
    for bad, field in (("nope", "strategy.name: unknown"),
                       ("raynas.train.strategies.fair:FairStrategy", "names code to import.*--plugin"),
                       ("raynas.nothing:X", "names code to import"), ("raynas.space:Dim", "names code to import")):
        with pytest.raises(ConfigError, match=field):
            get_strategy_class(bad)
    with pytest.raises(ConfigError, match=r"strategy\.num_random"):
        get_strategy_class("sandwich").validate_options({"num_random": -1})
    with pytest.raises(ConfigError, match=r"strategy\.m: unknown field"):
        get_strategy_class("fair").validate_options({"m": 3})
    with pytest.raises(ConfigError, match=r"strategy\.temperature: got 'hot'"):
        get_strategy_class("sandwich").validate_options({"temperature": "hot"})
    with pytest.raises(ConfigError, match=r"^strategy\.distill: 'features' is not allowed; allowed: \['none'"):
        get_strategy_class("sandwich").validate_options({"distill": "features"})
    with pytest.raises(ConfigError, match=r"strategy\.feature_weight"):
        get_strategy_class("biglittle").validate_options({"feature_weight": -1.0})


def test_sandwich_without_distillation_trains_students_on_labels(tiny_nb201_yaml):
    torch.manual_seed(0)
    space = load_space(tiny_nb201_yaml)
    strategy = build_strategy({"name": "sandwich", "num_random": 1, "distill": "none"}, space, seed=0)
    model = build_supernet(space)
    metrics = strategy.train_step(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)), _context(model))
    assert {"smallest_label_loss", "student_label_loss"} <= set(metrics) and "student_kd_loss" not in metrics
    assert metrics["loss"] == pytest.approx(metrics["teacher_loss"] + 2 * metrics["student_label_loss"])
    assert "progressive_phase" not in metrics  # off unless asked for
    assert "progressive" not in strategy.options
