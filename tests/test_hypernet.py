"""Kshot-Hypernet (seed 000 §3.1-3.2): generated shapes, equal-lambda warm-up, the decomposition,
extraction equivalence, ONNX, checkpoints, and both topology families (nb201, uib)."""

import math

import numpy as np
import pytest
import torch

from raynas.errors import ConfigError
from raynas.hw.onnx_export import export_onnx
from raynas.nn.hyper import validate_hypernet_config
from raynas.space import space_from_config
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import load_supernet, read_checkpoint, save_supernet
from raynas.supernets.hypernet import KshotHypernet, attach_hypernet, find_hypernet

NB201 = {"name": "nb201-hyper-test", "family": "nb201", "resolution": 8, "num_classes": 5, "in_channels": 3,
         "channels": [6, 12], "cells_per_stage": 1, "nodes": 4,
         "ops": ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]}
UIB = {"name": "uib-hyper-test", "family": "uib", "resolution": 16, "num_classes": 5,
       "stem": {"channels": 8, "kernel": 3, "stride": 1}, "activation": "relu", "ops": ["extra_dw", "ib", "ffn"],
       "stages": [{"channels": [8, 16], "depth": [1, 2], "kernels": [3, 5], "expand": [1], "stride": 1},
                  {"channels": [16], "depth": [1], "kernels": [3], "expand": [2, 4], "stride": 2}],
       "head": {"channels": 24, "hidden": 32, "dropout": 0.0, "activation": "relu"}}
# unit 4 makes the 6- and 12-channel convs span several unit kernels, some cropped (6 = 4 + 2).
TINY_HYPER = {"h": 8, "n": 4, "rank": 6, "unit": 4, "mixer_depth": 1}


def _as_if_trained(hyper):
    """Open the arch gate and spread the dictionary (both start neutral: plain weight sharing at init)."""
    with torch.no_grad():
        hyper.features.z_gate.fill_(1.0)
        for p in hyper.a_delta.values():
            p.normal_(0, 0.05)
    return hyper


def _warm_bn(net, shape, rng, archs=4):
    """Real BN statistics, so eval-mode outputs are well scaled."""
    net.train()
    with torch.no_grad():
        for _ in range(archs):
            net(torch.randn(shape), net.space.sample(rng))
        net(torch.randn(shape), None)
    return net.eval()


@pytest.fixture(scope="module")
def nb201():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(NB201))
    _as_if_trained(attach_hypernet(net, TINY_HYPER))
    return _warm_bn(net, (4, 3, 8, 8), np.random.default_rng(0))


@pytest.fixture(scope="module")
def uib():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(UIB))
    _as_if_trained(attach_hypernet(net, TINY_HYPER))
    return _warm_bn(net, (4, 3, 16, 16), np.random.default_rng(0))


def test_config_defaults_are_the_papers_and_errors_name_the_field():
    cfg = validate_hypernet_config({})
    assert (cfg["h"], cfg["n"], cfg["rank"]) == (32, 64, None)
    with pytest.raises(ConfigError, match=r"supernet\.hypernet\.k: unknown field"):
        validate_hypernet_config({"k": 3})
    with pytest.raises(ConfigError, match=r"supernet\.hypernet\.n: got 0; allowed: an integer >= 1"):
        validate_hypernet_config({"n": 0})


def test_refuses_a_size_space_without_topology_hooks():
    net = build_supernet("mbv3-biglittle")
    with pytest.raises(ConfigError, match=r"supernet.hypernet: space 'mbv3-biglittle' .*allowed families"):
        attach_hypernet(net, TINY_HYPER)


@pytest.mark.parametrize("fixture", ["nb201", "uib"])
def test_generates_every_active_slot_at_its_shape(fixture, request):
    net = request.getfixturevalue(fixture)
    hyper = find_hypernet(net)
    slots = net.conv_slots()
    arch = net.space.sample(np.random.default_rng(1))
    weights = hyper.generate(arch)
    assert sorted(weights) == sorted(net.active_conv_slots(arch))
    for name, w in weights.items():
        assert w.shape == slots[name].weight.shape, name
        assert torch.isfinite(w).all()
    teacher = hyper.generate(None)
    assert sorted(teacher) == sorted(slots)  # the mixture runs every conv


def test_initial_weights_keep_the_stored_init_scale():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(NB201))
    stored = {n: m.weight.detach().std().item() for n, m in net.conv_slots().items()}
    weights = attach_hypernet(net, {"h": 16, "n": 4, "unit": 4}).generate(None)
    ratios = np.array([weights[n].detach().std().item() / stored[n] for n in weights if weights[n].numel() >= 64])
    assert 0.5 < np.median(ratios) < 2.0


def test_weights_start_shared_and_depend_on_the_arch_once_the_gate_opens():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(NB201))
    hyper = attach_hypernet(net, TINY_HYPER)
    a = net.space.max_arch()
    b = net.space.validate({**a.to_dict(), "edge_1_0": "nor_conv_1x1"})
    slot = "cells.2.edges.5.nor_conv_3x3.conv"  # a conv both archs run (cells.1 is the reduction)
    assert torch.equal(hyper.generate(a)[slot], hyper.generate(b)[slot])   # init: plain weight sharing
    with torch.no_grad():
        hyper.features.z_gate.fill_(0.5)
    assert not torch.allclose(hyper.generate(a)[slot], hyper.generate(b)[slot])
    with torch.no_grad():
        hyper.features.z_gate.zero_()
        for p in hyper.a_delta.values():
            p.normal_(0, 0.05)                     # a spread dictionary: lambda alone makes them differ
    assert not torch.allclose(hyper.generate(a)[slot], hyper.generate(b)[slot])


def test_equal_coefficients_in_warmup_then_arch_dependent(nb201):
    hyper = find_hypernet(nb201)
    rng = np.random.default_rng(2)
    a, b = nb201.space.sample(rng), nb201.space.sample(rng)
    try:
        hyper.set_coefficient_temperature(math.inf)
        lam_a, lam_b = hyper.arch_features(a)[1], hyper.arch_features(b)[1]
        assert torch.equal(lam_a, torch.full((4,), 0.25)) and torch.equal(lam_a, lam_b)
        hyper.set_coefficient_temperature(30.0)   # the ImageNet recipe's annealing start: nearly equal
        hot = hyper.arch_features(a)[1]
        hyper.set_coefficient_temperature(1.0)
        lam_a, lam_b = hyper.arch_features(a)[1], hyper.arch_features(b)[1]
        assert torch.allclose(lam_a.sum(), torch.tensor(1.0)) and not torch.allclose(lam_a, lam_b)
        assert (hot - 0.25).abs().max() < (lam_a - 0.25).abs().max()
    finally:
        hyper.set_coefficient_temperature(1.0)


def test_generated_weight_is_the_lambda_mixture_of_the_dictionary(nb201):
    """eq. 2-3: W = sum_n lambda_n w_n with w_n = gain (A_n)^T z B, A_n = A_shared + A_delta_n."""
    hyper = find_hypernet(nb201)
    arch = nb201.space.max_arch()
    name = "cells.0.edges.0.nor_conv_3x3.conv"     # 6 -> 6 channels, unit 4: a 2 x 2 grid cropped to 6 x 6
    lay = hyper.layouts[name]
    with torch.no_grad():
        z, lam = hyper.arch_features(arch)
        entries = []
        for n in range(hyper.n):
            a_n = torch.cat([hyper.a_shared[lay.group][r] + hyper.a_delta[lay.group][r, n] for r in lay.in_rows], -1)
            b = torch.cat([hyper.b[lay.group][r].view(z.shape[1], -1, 3, 3) for r in lay.out_rows], 1)
            gain = getattr(hyper, f"gain_{lay.group}")[lay.out_rows[0]]
            w = gain * torch.einsum("hc,hr,rokl->ockl", a_n, z, b)[:6, :6]
            entries.append(w)
        expected = sum(lam[n] * entries[n] for n in range(hyper.n))
        got = hyper.generate(arch, [name])[name]
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("fixture,shape", [("nb201", (3, 3, 8, 8)), ("uib", (3, 3, 16, 16))])
def test_extracted_subnet_equals_supernet_with_hypernet(fixture, shape, request, tmp_path):
    net = request.getfixturevalue(fixture)
    rng = np.random.default_rng(3)
    x = torch.randn(shape)
    for _ in range(4):
        arch = net.space.sample(rng)
        with torch.no_grad():
            expected = net(x, arch)
            got = net.extract(arch).eval()(x)
        assert (expected - got).abs().max().item() <= 1e-5
    report = export_onnx(net.extract(arch).eval(), (1, *shape[1:]), tmp_path / "subnet.onnx")
    assert report["max_abs_diff"] <= 1e-4


def test_gradients_reach_the_hypernet_not_the_stored_weights(nb201):
    nb201.train()
    nb201.zero_grad(set_to_none=True)
    arch = nb201.space.max_arch()
    nb201(torch.randn(4, 3, 8, 8), arch).square().mean().backward()
    hyper = find_hypernet(nb201)
    assert all(p.grad is not None for p in hyper.b.values())
    assert hyper.features.to_z.weight.grad is not None and hyper.features.cab.to_logit.weight.grad is not None
    assert all(m.weight.grad is None for m in nb201.conv_slots().values())
    nb201.zero_grad(set_to_none=True)
    nb201.eval()


def test_eval_cache_follows_parameter_updates(nb201):
    hyper = find_hypernet(nb201)
    arch = nb201.space.max_arch()
    name = nb201.active_conv_slots(arch)[-1]
    with torch.no_grad():
        first = hyper(arch)[name].clone()
        assert hyper(arch) is hyper(arch)          # reused while nothing changes
        hyper.b[hyper.layouts[name].group].mul_(2.0)
        assert torch.allclose(hyper(arch)[name], 2 * first, atol=1e-6)
        hyper.b[hyper.layouts[name].group].mul_(0.5)


def test_checkpoint_rebuilds_the_hypernet(nb201, tmp_path):
    path = save_supernet(nb201, tmp_path / "s.pt")
    assert read_checkpoint(path)["supernet_kwargs"] == {"hypernet": {**TINY_HYPER, "cab_reduction": 4}}
    rebuilt = load_supernet(path)   # build_supernet(space, hypernet=...) + the weights
    assert isinstance(rebuilt.weight_generator, KshotHypernet)
    arch = nb201.space.sample(np.random.default_rng(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, arch), nb201(x, arch), atol=1e-6)
        assert torch.allclose(rebuilt(x, None), nb201(x, None), atol=1e-6)
    assert build_supernet(nb201.space).state_dict().keys() < rebuilt.state_dict().keys()
