"""NAS-Bench-201 space: the benchmark's reference parameter / FLOP counts, teacher, weight slots, validation.

Hand derivation of the reference counts (C=16, N=5, 3 stages; every cell edge is stride 1, C_in = C_out,
so skip = identity, avg_pool has no preprocessing conv, and only nor_conv edges carry weights):

  params
    stem      3*16*9 + BN 2*16                                   =     464
    reduce 1  9*16*32 + 9*32*32 + 16*32 (shortcut) + 2 BN 4*32     =  14,464
    reduce 2  9*32*64 + 9*64*64 + 32*64            + 2 BN 4*64     =  57,600
    head      BN 2*64 + 64*K + K                                   = 778 / 6,628 / 7,928  (K = 10/100/120)
    -> conv-free cells: 73,306 (CIFAR-10) / 79,156 (CIFAR-100) / 80,456 (ImageNet16-120)
    one nor_conv_3x3 edge in all 15 cells: 5*(9*16^2+32 + 9*32^2+64 + 9*64^2+128) = 5*48,608 = 243,040
    one nor_conv_1x1 edge in all 15 cells: 5*(16^2+32 + 32^2+64 + 64^2+128)       = 5*5,600  =  28,000
    all nor_conv_3x3: 73,306 + 6*243,040 = 1,531,546 (the benchmark's CIFAR-10 max 1.532 MB)

  FLOPs, the benchmark's counter (xautodl get_model_infos, batch 1): conv k*k*Cin*Cout per output pixel,
  linear in*out + out (bias); pooling and BN not in the total. At 32x32:
    stem 432*32^2 = 442,368; each reduction (4,608+9,216+512)*16^2 = (18,432+36,864+2,048)*8^2 = 3,670,016
    linear 640 + 10 -> conv-free cells: 7,783,050 (the benchmark's CIFAR-10 min 7.78 M)
    one nor_conv_3x3 edge, 15 cells: 15 * 9*C^2*HW = 15*2,359,296 = 35,389,440 (same at every stage)
    one nor_conv_1x1 edge, 15 cells: 15 * 262,144 = 3,932,160
    all nor_conv_3x3: 7,783,050 + 6*35,389,440 = 220,119,690 (the benchmark's CIFAR-10 max 220.11 M)
  ImageNet16-120 at 16x16: every conv term /4, linear 64*120+120 = 7,800 -> 1,953,400 .. 55,037,560.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from raynas.cli import main as cli_main
from raynas.space import SpaceError, load_space
from raynas.space.loader import builtin_spaces_dir, read_space_yaml, space_from_config
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost, count_params
from raynas.supernets.nb201 import reference_flops

RESNET = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
BEST_C10 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
MIXED = "|nor_conv_1x1~0|+|avg_pool_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|none~2|"
ALL_1X1 = "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|"

# (num_classes, resolution) -> {arch: (params, benchmark FLOPs)}; "min"/"max" = space.min_arch()/max_arch().
REFERENCE = {
    (10, 32): {"min": (73_306, 7_783_050), "max": (1_531_546, 220_119_690),
               RESNET: (559_386, 78_561_930), BEST_C10: (1_288_506, 184_730_250),
               MIXED: (372_346, 51_036_810), ALL_1X1: (241_306, 31_376_010)},
    (100, 32): {"min": (79_156, 7_788_900), "max": (1_537_396, 220_125_540)},
    (120, 16): {"min": (80_456, 1_953_400), "max": (1_538_696, 55_037_560), RESNET: (566_536, 19_648_120)},
}


def _arch(space, key):
    if key == "min":
        return space.min_arch()
    if key == "max":
        return space.max_arch()
    return space.from_arch_str(key)


@pytest.fixture(scope="module")
def space():
    return load_space("nb201")


@pytest.fixture(scope="module")
def net(space):
    torch.manual_seed(0)
    net = build_supernet(space)
    net.train()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32), space.sample(rng))
        net(torch.randn(4, 3, 32, 32), None)
    return net.eval()


def _nb201_counter_flops(module: nn.Module, input_shape) -> int:
    """Independent re-implementation of the benchmark's FLOP counter (forward hooks on conv / linear)."""
    total = [0]

    def conv_hook(m, inputs, out):
        per_pixel = m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels // m.groups
        total[0] += per_pixel * out.shape[0] * out.shape[2] * out.shape[3]
        if m.bias is not None:
            total[0] += m.out_channels * out.shape[0] * out.shape[2] * out.shape[3]

    def linear_hook(m, inputs, out):
        bias_adds = m.out_features if m.bias is not None else 0
        total[0] += inputs[0].shape[0] * (m.in_features * m.out_features + bias_adds)

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(torch.rand(input_shape))
    for h in handles:
        h.remove()
    return total[0]


# ---- the benchmark's reference values --------------------------------------------------------------
@pytest.mark.parametrize("classes,resolution", list(REFERENCE))
def test_params_and_flops_equal_benchmark_reference(classes, resolution):
    space = load_space("nb201", num_classes=classes, resolution=resolution)
    for key, (params, flops) in REFERENCE[(classes, resolution)].items():
        arch = _arch(space, key)
        cost = space.cost(arch)
        assert cost["params"] == params, (key, cost)
        assert space.reference_flops(arch) == flops, key
        assert reference_flops(space, arch.to_dict()) == flops
        assert cost["macs"] == flops - classes  # the benchmark adds the classifier's bias adds


def test_published_ranges_over_all_15625_cells(space):
    """Every cell's cost lies in the benchmark's published CIFAR-10 range (0.073-1.532 MB, 7.78-220.11 M)."""
    import itertools

    params, flops = set(), set()
    for ops in itertools.product(space.ops, repeat=len(space.edge_names)):
        arch = space.validate(dict(zip(space.edge_names, ops)))
        params.add(space.cost(arch)["params"])
        flops.add(space.reference_flops(arch))
    assert (round(min(params) / 1e6, 3), round(max(params) / 1e6, 3)) == (0.073, 1.532)
    assert (math.floor(min(flops) / 1e4) / 100, math.floor(max(flops) / 1e4) / 100) == (7.78, 220.11)
    assert len(params) == 28  # (n1x1, n3x3) with n1x1 + n3x3 <= 6 edges; each pair a distinct cost


def test_benchmark_flop_counter_agrees_on_extracted_modules(net, space):
    rng = np.random.default_rng(7)
    archs = [space.min_arch(), space.max_arch(), space.from_arch_str(MIXED)]
    archs += [space.sample(rng) for _ in range(3)]
    for arch in archs:
        sub = net.extract(arch)
        assert _nb201_counter_flops(sub, (1, 3, 32, 32)) == space.reference_flops(arch)
        assert count_params(sub) == space.cost(arch)["params"]


def test_extracted_module_is_the_benchmark_structure(net, space):
    sub = net.extract(space.from_arch_str(MIXED))
    assert len(sub) == 1 + 3 * 5 + 2 + 1  # stem, 15 cells, 2 reductions, head
    cell = sub[1]
    kinds = [type(m).__name__ if not isinstance(m, nn.Sequential) else "ReLUConvBN" for m in cell.layers]
    assert kinds == ["ReLUConvBN", "AvgPool2d", "ReLUConvBN", "Identity", "ReLUConvBN", "Zero"]
    assert [m.kernel_size for m in (cell.layers[0][1], cell.layers[2][1])] == [(1, 1), (3, 3)]
    assert cell.layers[1].count_include_pad is False
    reduce = sub[6]
    assert [type(m).__name__ for m in reduce.downsample] == ["AvgPool2d", "Conv2d"]
    assert reduce.conv_a[1].stride == (2, 2) and reduce.conv_a[1].bias is None
    assert not any(type(m).__module__.startswith("raynas.nn") for m in sub.modules())


# ---- the space ----------------------------------------------------------------------------------------
def test_space_dims_cardinality_and_extremes(space):
    assert space.edge_names == ("edge_1_0", "edge_2_0", "edge_2_1", "edge_3_0", "edge_3_1", "edge_3_2")
    assert space.ops == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    assert all(space.dim(n).choices == space.ops for n in space.edge_names)
    assert space.log10_cardinality() == pytest.approx(6 * math.log10(5))
    assert round(10 ** space.log10_cardinality()) == 15_625
    assert space.arch_str(space.min_arch()) == "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
    assert set(space.max_arch().values()) == {"nor_conv_3x3"}


def test_arch_strings_round_trip_and_errors(space, rng):
    for _ in range(20):
        arch = space.sample(rng)
        assert space.from_arch_str(space.arch_str(arch)) == arch
    assert space.from_arch_str(RESNET)["edge_3_0"] == "skip_connect"
    with pytest.raises(SpaceError, match="arch field 'edge_1_0'"):
        space.from_arch_str(RESNET.replace("nor_conv_3x3~0", "conv_5x5~0", 1))
    with pytest.raises(SpaceError, match="node 2"):
        space.from_arch_str("|none~0|+|none~0|+|none~0|none~1|none~2|")


def test_no_canonicalisation_every_cell_distinct(space):
    # Two cells computing the same function (node 1 unused by the output) stay two archs, as in the benchmark.
    a = space.from_arch_str("|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|")
    b = space.from_arch_str("|nor_conv_1x1~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|")
    assert a != b and space.cost(a)["params"] != space.cost(b)["params"]


@pytest.mark.parametrize("change,field", [
    ({"foo": 1}, "space nb201.foo: unknown field"),
    ({"ops": ["none", "conv_5x5"]}, "space nb201.ops[1]: 'conv_5x5' is not allowed"),
    ({"ops": ["none"]}, "space nb201.ops"),
    ({"ops": "none"}, "space nb201.ops: got 'none'; allowed: a non-empty list"),
    ({"channels": [16, -32]}, "space nb201.channels"),
    ({"cells_per_stage": "5"}, "space nb201.cells_per_stage: got '5'; allowed: an integer"),
    ({"nodes": 1}, "space nb201.nodes: got 1; allowed: an integer >= 2"),
    ({"resolution": 30}, "space nb201.resolution: must be a positive multiple of 4"),
])
def test_yaml_validation_names_the_field(change, field):
    cfg = read_space_yaml(builtin_spaces_dir() / "nb201.yaml")
    cfg.update(change)
    with pytest.raises(SpaceError, match=field.replace(".", r"\.").replace("[", r"\[")):
        space_from_config(cfg)


def test_missing_family_key_is_named():
    cfg = read_space_yaml(builtin_spaces_dir() / "nb201.yaml")
    del cfg["ops"]
    with pytest.raises(SpaceError, match=r"space nb201\.ops: missing"):
        space_from_config(cfg)


def test_user_variant_small_cell_and_op_subset():
    cfg = read_space_yaml(builtin_spaces_dir() / "nb201.yaml")
    cfg.update(name="nb201-tiny", nodes=3, ops=["skip_connect", "nor_conv_3x3"], channels=[4, 8],
               cells_per_stage=1, resolution=8)
    space = space_from_config(cfg)
    assert space.edge_names == ("edge_1_0", "edge_2_0", "edge_2_1")
    assert set(space.min_arch().values()) == {"skip_connect"}  # no `none`: every edge the cheapest op
    net = build_supernet(space).eval()
    x = torch.randn(2, 3, 8, 8)
    for arch in (space.min_arch(), space.max_arch()):
        with torch.no_grad():
            assert torch.allclose(net(x, arch), net.extract(arch).eval()(x), atol=1e-6)
        assert net.cost(arch) == count_cost(net.extract(arch), (1, 3, 8, 8))


def test_cli_cost_and_error_exit_code(capsys, space):
    arch = space.max_arch().to_json()
    assert cli_main(["arch", "cost", "--space", "nb201", "--arch", arch, "--num-classes", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 1_537_396
    bad = json.dumps({**space.max_arch().to_dict(), "edge_3_2": "conv_7x7"})
    assert cli_main(["arch", "cost", "--space", "nb201", "--arch", bad]) == 2
    assert "edge_3_2" in capsys.readouterr().err


# ---- the supernet -------------------------------------------------------------------------------------
def test_other_datasets_forward_and_extract():
    space = load_space("nb201", num_classes=120, resolution=16)
    net = build_supernet(space).eval()
    arch = space.from_arch_str(MIXED)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, arch)
        assert out.shape == (2, 120)
        assert torch.allclose(out, net.extract(arch).eval()(x), atol=1e-5)
    assert net.cost(arch) == count_cost(net.extract(arch), (1, 3, 16, 16))


def test_min_arch_output_depends_on_input(net, space):
    with torch.no_grad():
        a = net(torch.randn(2, 3, 32, 32), space.min_arch())
        b = net(torch.randn(2, 3, 32, 32), space.min_arch())
    assert not torch.allclose(a, b)


def test_teacher_is_softmax_beta_mixture(net, space):
    assert dict(net.named_parameters())["arch_params"].shape == (6, 5)
    assert net.op_names() == space.ops and net.edge_names() == space.edge_names
    arch = space.from_arch_str(MIXED)
    x = torch.randn(2, 3, 32, 32)
    saved = net.arch_params.detach().clone()
    try:
        with torch.no_grad():  # one-hot beta: the mixture collapses to the single path of that arch
            net.arch_params.fill_(-1e4)
            for e, op in enumerate(space.cell_ops(arch)):
                net.arch_params[e, space.ops.index(op)] = 1e4
            assert torch.equal(net(x, None), net(x, arch))
            net.arch_params.copy_(saved)
            assert not torch.allclose(net(x, None), net(x, arch))
    finally:
        with torch.no_grad():
            net.arch_params.copy_(saved)


def test_teacher_mixture_matches_explicit_formula():
    """On a one-cell space, the teacher equals sum_o softmax(beta)_o * op_o(x) computed by hand."""
    cfg = read_space_yaml(builtin_spaces_dir() / "nb201.yaml")
    cfg.update(name="nb201-one", nodes=2, channels=[4], cells_per_stage=1, resolution=8)
    space = space_from_config(cfg)
    torch.manual_seed(0)
    net = build_supernet(space).eval()
    with torch.no_grad():
        net.arch_params.normal_()
        x = torch.randn(2, 3, 8, 8)
        h = net.stem(x)
        w = torch.softmax(net.arch_params[0], 0)
        edge = net.cells[0].edges[0]
        mixed = w[1] * h + w[2] * edge["nor_conv_1x1"](h) + w[3] * edge["nor_conv_3x3"](h) \
            + w[4] * edge["avg_pool_3x3"](h)
        assert torch.allclose(net(x, None), net.head(mixed), atol=1e-6)


def test_teacher_trains_arch_params(net, space):
    net.train()
    try:
        net.zero_grad()
        net(torch.randn(4, 3, 32, 32), None).logsumexp(1).sum().backward()
        assert net.arch_params.grad is not None and net.arch_params.grad.abs().sum() > 0
        net.zero_grad()
        net(torch.randn(4, 3, 32, 32), space.max_arch()).sum().backward()
        assert net.arch_params.grad is None or net.arch_params.grad.abs().sum() == 0
    finally:
        net.zero_grad()
        net.eval()


def test_conv_slots_and_weight_generator_hook(net, space):
    slots = net.conv_slots()
    assert len(slots) == 1 + 15 * 6 * 2 + 2 * 3  # stem, (1x1, 3x3) per edge per cell, 3 per reduction
    assert "cells.0.edges.0.nor_conv_3x3.conv" in slots
    assert len(net.active_conv_slots(space.max_arch())) == 1 + 15 * 6 + 6
    assert len(net.active_conv_slots(space.min_arch())) == 7
    arch = space.from_arch_str(MIXED)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = net(x, arch)
    seen = []

    def halve(a):
        seen.append(a)
        return {name: slots[name].weight * 0.5 for name in net.active_conv_slots(a)}

    net.set_weight_generator(halve)
    try:
        with torch.no_grad():
            generated = net(x, arch)
            extracted = net.extract(arch).eval()(x)
        assert seen and seen[0] == arch
        assert not torch.allclose(generated, plain)
        assert (generated - extracted).abs().max() <= 1e-5  # the static subnet carries the generated weights
    finally:
        net.set_weight_generator(None)
    with torch.no_grad():
        assert torch.equal(net(x, arch), plain)


def test_module_generator_is_registered_and_shape_checked(space):
    net = build_supernet(space)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))
            self.slot = net.conv_slots()["stem.conv"]

        def forward(self, arch):
            return {"stem.conv": self.slot.weight.detach() * self.gain}

    gen = Scale()
    net.set_weight_generator(gen)
    assert "weight_generator.gain" in net.state_dict()
    net.train()
    net(torch.randn(2, 3, 32, 32), space.max_arch()).sum().backward()
    assert gen.gain.grad is not None
    net.set_weight_generator(lambda arch: {"stem.conv": torch.zeros(1, 1, 1, 1)})
    assert "weight_generator.gain" not in net.state_dict()
    with pytest.raises(ValueError, match="stem.conv"):
        net(torch.randn(2, 3, 32, 32), space.max_arch())
