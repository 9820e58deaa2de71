"""The `focusfair` strategy (seed 000 Algorithm 1): Focus-Fair sampling, the warm-up schedules, the
two-update step (teacher with weight decay, students on soft labels without), the Kshot-Hypernet
warm-up inside a step, and a run through Ray Train with 2 workers."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from raynas.errors import ConfigError
from raynas.space import load_space, space_from_config
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import read_checkpoint
from raynas.supernets.hypernet import attach_hypernet, find_hypernet
from raynas.train.focusfair import (
    focus_fair_columns,
    focus_fair_order,
    focus_fair_paths,
    paths_visit_every_op,
    sampling_probs,
    warmup_temperature,
)
from raynas.train.losses import soft_target_loss
from raynas.train.optim import optimizer_factory
from raynas.train.strategies import build_strategy, get_strategy_class
from raynas.train.strategies.base import StepContext, rng_from_json, rng_state_json

OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
TINY = {"name": "nb201-ff-test", "family": "nb201", "resolution": 8, "num_classes": 10, "in_channels": 1,
        "channels": [4, 8], "cells_per_stage": 1, "nodes": 4, "ops": OPS}
UIB = {"name": "uib-ff-test", "family": "uib", "resolution": 16, "num_classes": 5,
       "stem": {"channels": 8, "kernel": 3, "stride": 1}, "activation": "relu", "ops": ["extra_dw", "ib", "ffn"],
       "stages": [{"channels": [8, 16], "depth": [1, 2], "kernels": [3, 5], "expand": [1], "stride": 1},
                  {"channels": [16], "depth": [1], "kernels": [3], "expand": [2, 4], "stride": 2}],
       "head": {"channels": 24, "hidden": 32, "dropout": 0.0, "activation": "relu"}}


@pytest.fixture(scope="module")
def space():
    return space_from_config(TINY)


def peaked_probs(space, top: str, logit: float = 3.0, tau: float = 1.5) -> dict[str, np.ndarray]:
    beta = np.zeros(len(OPS))
    beta[OPS.index(top)] = logit
    p = np.exp(beta / tau) / np.exp(beta / tau).sum()
    return {name: p for name in space.edge_names}


# ---- sampling ----------------------------------------------------------------------------------------
def test_every_op_once_per_round_on_every_edge(space):
    rng = np.random.default_rng(0)
    probs = peaked_probs(space, "nor_conv_3x3")
    for _ in range(50):
        paths = focus_fair_paths(space, probs, rng)
        assert len(paths) == len(OPS)
        assert paths_visit_every_op(paths, space.edge_names, OPS)
    # two rounds when asked for 10 paths: every op exactly twice
    paths = focus_fair_paths(space, probs, rng, num_paths=10)
    assert all(sorted(p[e] for p in paths) == sorted(OPS * 2) for e in space.edge_names)


def test_high_beta_ops_come_first_and_together(space):
    rng = np.random.default_rng(1)
    probs = peaked_probs(space, "nor_conv_3x3")
    p_top = probs["edge_1_0"][OPS.index("nor_conv_3x3")]
    rounds = 1000
    first = [focus_fair_paths(space, probs, rng)[0] for _ in range(rounds)]
    freq_top = np.mean([a["edge_2_1"] == "nor_conv_3x3" for a in first])
    assert abs(freq_top - p_top) < 0.05 and freq_top > 2 * (1 / len(OPS))
    # the all-best subnet is a whole path far more often than under FairNAS (1/5 ** 6 per round)
    whole = np.mean([all(a[e] == "nor_conv_3x3" for e in space.edge_names) for a in first])
    assert whole > 50 * (1 / len(OPS)) ** 6
    # a higher tau flattens the focus
    flat = {k: np.exp(np.log(v) / 4) / np.exp(np.log(v) / 4).sum() for k, v in probs.items()}
    first_flat = [focus_fair_paths(space, flat, rng)[0] for _ in range(rounds)]
    assert np.mean([a["edge_2_1"] == "nor_conv_3x3" for a in first_flat]) < freq_top - 0.1


def test_papers_example_probability():
    """§3.3: softmax(beta) = [.2, .5, .3] and [.3, .1, .6] -> [o1, o2] first with probability 0.3."""
    rng = np.random.default_rng(2)
    n = 6000
    hits = sum(focus_fair_order(np.array([.2, .5, .3]), rng)[0] == 1
               and focus_fair_order(np.array([.3, .1, .6]), rng)[0] == 2 for _ in range(n))
    assert abs(hits / n - 0.30) < 0.025


def test_uib_ops_focus_fair_and_size_dims_fair():
    space = space_from_config(UIB)
    net = build_supernet(space)
    probs = sampling_probs(net, 1.5)
    assert set(probs) == set(space.topology_dims)
    rng = np.random.default_rng(3)
    for _ in range(20):
        columns = focus_fair_columns(space, probs, rng, 3)
        for dim in space.topology_dims:
            assert sorted(columns[dim]) == sorted(space.op_names)
        assert set(columns["stage1.channels"]) == {8, 16}
    paths = focus_fair_paths(space, probs, rng)
    assert len(paths) == 3 and all(space.validate(p) == p for p in paths)


def test_uniform_sampling_probs_at_infinite_temperature(space):
    net = build_supernet(space)
    with torch.no_grad():
        net.arch_params[:, 3] = 5.0
    assert np.allclose(sampling_probs(net, math.inf)["edge_3_2"], 0.2)
    expected = math.exp(5 / 1.5) / (math.exp(5 / 1.5) + 4)
    assert sampling_probs(net, 1.5)["edge_3_2"][3] == pytest.approx(expected, abs=1e-3)


# ---- schedules and configuration -----------------------------------------------------------------------
def test_warmup_schedules():
    opts = {"warmup": "equal", "warmup_epochs": 5.0, "anneal_from": 30.0, "anneal_to": 1.0}
    assert warmup_temperature(opts, 0.0) == math.inf and warmup_temperature(opts, 4.99) == math.inf
    assert warmup_temperature(opts, 5.0) == 1.0
    opts = {**opts, "warmup": "anneal", "warmup_epochs": 10.0}
    assert warmup_temperature(opts, 0.0) == 30.0
    assert warmup_temperature(opts, 5.0) == pytest.approx(15.5)
    assert warmup_temperature(opts, 12.0) == 1.0
    assert warmup_temperature({**opts, "warmup": "none"}, 0.0) == 1.0


def test_refuses_size_spaces_and_bad_options():
    cls = get_strategy_class("focusfair")
    with pytest.raises(ConfigError, match=r"strategy: 'focusfair' applies to families \['nb201', 'uib'\], "
                                          r"not to space 'mbv3-biglittle'"):
        build_strategy({"name": "focusfair"}, load_space("mbv3-biglittle"), 0)
    with pytest.raises(ConfigError, match=r"strategy.warmup: 'slow' is not allowed; allowed: \['equal'"):
        cls.validate_options({"warmup": "slow"})
    with pytest.raises(ConfigError, match=r"strategy.temperature: expected a number > 0"):
        cls.validate_options({"temperature": 0})
    strategy = build_strategy({"name": "focusfair", "paths_per_step": 3}, space_from_config(TINY), 0)
    with pytest.raises(ConfigError, match=r"strategy.paths_per_step: 3 paths cannot visit all 5 ops"):
        strategy.prepare_model(build_supernet(space_from_config(TINY)))


# ---- one step, in process ------------------------------------------------------------------------------
def _context(module, optimizers, steps_per_epoch=1):
    ctx = StepContext(module, module, optimizers, device=torch.device("cpu"), amp_dtype=None,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=0.0, grad_clip=None,
                      world_size=1)
    ctx.steps_per_epoch = steps_per_epoch
    return ctx


SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.1, "betas": [0.9, 0.999],
       "decay_norm_and_bias": True, "grad_clip": None}


def test_step_is_teacher_update_with_decay_then_students_on_soft_labels_without(space):
    torch.manual_seed(0)
    net = build_supernet(space).train()
    strategy = build_strategy({"name": "focusfair", "warmup": "none", "arch_lr": 0.01}, space, 0)
    module = strategy.prepare_model(net)
    optimizers = strategy.configure_optimizers(module, optimizer_factory(SGD))
    assert not any(p is module.arch_params for g in optimizers["main"].param_groups for p in g["params"])
    ref = copy.deepcopy(net)
    ref_rng = rng_from_json(rng_state_json(strategy.rng))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    metrics = strategy.train_step(x, y, _context(module, optimizers))
    assert {"loss", "teacher_loss", "student_kd_loss", "beta_max_prob"} <= set(metrics)
    assert all(g["weight_decay"] == 0.1 for g in optimizers["main"].param_groups)  # restored

    # Algorithm 1 by hand: paths from softmax(beta / 1.5) before the update ...
    paths = focus_fair_paths(space, sampling_probs(ref, 1.5), ref_rng)
    weights = [p for p in ref.parameters() if p is not ref.arch_params]
    arch_opt = torch.optim.Adam([ref.arch_params], lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3)
    # ... the teacher on labels: weights with weight decay, beta with its own Adam ...
    logits = ref(x, None)
    F.cross_entropy(logits, y).backward()
    with torch.no_grad():
        for p in weights:
            if p.grad is not None:
                p -= 0.1 * (p.grad + 0.1 * p)
                p.grad = None
    arch_opt.step()
    # ... then the students on the teacher's soft labels only, accumulated, no weight decay.
    kd = soft_target_loss(logits.detach())
    for arch in paths:
        kd(ref(x, arch)).backward()
    with torch.no_grad():
        for p in weights:
            if p.grad is not None:
                p -= 0.1 * p.grad
    for (name, got), expected in zip(net.named_parameters(), ref.parameters()):
        assert torch.allclose(got, expected, atol=1e-5), name
    assert not torch.allclose(net.arch_params, torch.zeros_like(net.arch_params), atol=1e-4)


def test_hypernet_coefficients_equal_in_warmup_and_trained_after():
    torch.manual_seed(0)
    space = space_from_config(TINY)
    net = build_supernet(space).train()
    hyper = attach_hypernet(net, {"h": 8, "n": 4, "unit": 4, "mixer_depth": 1})
    strategy = build_strategy({"name": "focusfair", "warmup": "equal", "warmup_epochs": 1.0}, space, 0)
    module = strategy.prepare_model(net)
    optimizers = strategy.configure_optimizers(module, optimizer_factory({**SGD, "weight_decay": 0.0}))
    ctx = _context(module, optimizers, steps_per_epoch=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    b_before = {k: v.detach().clone() for k, v in hyper.b.items()}
    ctx.epoch, ctx.step = 0, 1                      # inside the warm-up epoch
    strategy.train_step(x, y, ctx)
    assert math.isinf(float(hyper.coefficient_temperature))
    assert torch.equal(hyper.arch_features(space.max_arch())[1], torch.full((4,), 0.25))
    assert any(not torch.equal(b_before[k], v) for k, v in hyper.b.items())   # the hypernet trains
    ctx.epoch, ctx.step = 1, 0                      # warm-up over
    strategy.train_step(x, y, ctx)
    assert float(hyper.coefficient_temperature) == 1.0
    lam = hyper.arch_features(space.max_arch())[1]
    assert not torch.allclose(lam, torch.full((4,), 0.25))
    assert find_hypernet(module) is hyper


def test_step_on_uib_with_hypernet():
    torch.manual_seed(0)
    space = space_from_config(UIB)
    net = build_supernet(space).train()
    hyper = attach_hypernet(net, {"h": 8, "n": 4, "unit": 8, "mixer_depth": 1})
    strategy = build_strategy({"name": "focusfair", "warmup": "anneal", "warmup_epochs": 2.0}, space, 0)
    module = strategy.prepare_model(net)
    assert strategy.num_paths == 3
    optimizers = strategy.configure_optimizers(module, optimizer_factory(SGD))
    ctx = _context(module, optimizers)
    beta = net.arch_params.detach().clone()
    metrics = strategy.train_step(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)), ctx)
    assert float(hyper.coefficient_temperature) == 30.0   # anneal_from at progress 0
    assert all(math.isfinite(v) for v in metrics.values())
    assert not torch.equal(beta, net.arch_params.detach())


# ---- through Ray Train ------------------------------------------------------------------------------
def test_focusfair_with_hypernet_trains_through_ray_train_with_two_workers(ray_local, tmp_path):
    """One run covers the strategy under DDP (beta's own optimizer, two updates per step) and the
    Kshot-Hypernet from `supernet: {hypernet: ...}` to a checkpoint that rebuilds it."""
    from raynas.supernets.checkpoint import load_supernet
    from raynas.train.trainer import train

    space_path = tmp_path / "nb201-ff.yaml"
    space_path.write_text(yaml.safe_dump({**TINY, "name": "nb201-ff"}))
    hyper = {"h": 8, "n": 4, "unit": 4, "mixer_depth": 1}
    cfg = {"name": "ff2", "storage_path": str(tmp_path / "runs"), "space": str(space_path), "epochs": 2,
           "steps_per_epoch": 2, "seed": 0, "supernet": {"hypernet": hyper},
           "strategy": {"name": "focusfair", "warmup": "equal", "warmup_epochs": 1, "arch_lr": 0.01},
           "data": {"name": "digits", "batch_size": 16, "max_train_samples": 128, "max_val_samples": 64},
           "eval": {"bn_samples": 64, "num_random": 1},
           "scaling": {"num_workers": 2}}
    result = train(cfg, quiet=True)
    metrics = result.metrics()
    assert list(metrics["epoch"]) == [1, 2] and list(metrics["world_size"]) == [2, 2]
    assert list(metrics["steps"]) == [2, 2] and set(metrics["strategy"]) == {"focusfair"}
    assert metrics["teacher_acc"].notna().all() and np.isfinite(metrics["student_kd_loss"]).all()
    state = read_checkpoint(result.supernet_path)
    assert state["strategy"] == "focusfair" and state["supernet_kwargs"]["hypernet"]["n"] == 4
    torch.manual_seed(0)  # the loop seeds the same way before building: beta's initial value
    initial = build_supernet(load_space(str(space_path), num_classes=10), hypernet=hyper)
    assert not torch.allclose(state["model"]["arch_params"], initial.arch_params)  # beta learned
    assert not torch.allclose(state["model"]["weight_generator.b.u4x4x3x3"], initial.weight_generator.b["u4x4x3x3"])

    supernet = load_supernet(result.supernet_path)
    assert find_hypernet(supernet) is not None
    assert float(find_hypernet(supernet).coefficient_temperature) == 1.0   # warm-up over after epoch 1
    arch = supernet.space.sample(np.random.default_rng(0))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(supernet(x, arch), supernet.extract(arch).eval()(x), atol=1e-5)
