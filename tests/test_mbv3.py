"""`mbv3` family (seed 002 §3.2): paper-range costs, validation, canonicalisation, resolution
semantics, the stem/slots/head pieces big/little couplings build on, and weight entanglement."""

import math

import numpy as np
import pytest
import torch
import yaml

from raynas.cli import main as cli_main
from raynas.hw.onnx_export import export_onnx
from raynas.space import SpaceError, load_space, space_from_config
from raynas.space.loader import builtin_spaces_dir
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost
from raynas.supernets.mbv3_blocks import InputResize

SPACE = "mbv3-biglittle"


def base_cfg() -> dict:
    return yaml.safe_load((builtin_spaces_dir() / f"{SPACE}.yaml").read_text())


def variant(**changes) -> dict:
    cfg = base_cfg()
    cfg.pop("references")  # the reference models need not be subnets of a variant's table
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def space224():
    return load_space(SPACE)


@pytest.fixture(scope="module")
def net224(space224):
    return build_supernet(space224).eval()


# ---- the seed's space and OFA's numbers ------------------------------------------------------------
def test_dims_follow_seed_002(space224):
    assert space224.dim("width").choices == (0.25, 0.5, 0.75, 1.0)
    assert space224.dim("resolution").choices == (128, 160, 192, 224)
    assert space224.dim("stage1.depth").choices == (1, 2, 3, 4)
    assert space224.dim("stage3.b2.kernel").choices == (3, 5, 7)
    assert space224.dim("stage5.b3.expand").choices == (1, 2, 4, 6)
    # 5 stages x (depth + 4 blocks x (kernel, expand)) + resolution + width
    assert len(space224.dims) == 5 * 9 + 2
    per_stage = sum(12**d for d in (1, 2, 3, 4))
    assert space224.cardinality() == 4 * 4 * per_stage**5
    assert space224.log10_cardinality() == pytest.approx(math.log10(16 * per_stage**5))


def test_ofa_variant_cardinality_and_cost_range():
    """The YAML can declare OFA's own MobileNetV3 space (d 2-4, e 3/4/6, k 3/5/7, width 1.0):
    its cardinality is OFA's ((3x3)^2 + (3x3)^3 + (3x3)^4)^5 ~ 2e19, and its subnets span the
    ~100M-600M MACs range reported for OFA-MobileNetV3 at 224."""
    space = space_from_config(variant(name="ofa-mbv3", depth_choices=[2, 3, 4], expand_choices=[3, 4, 6],
                                      width_choices=[1.0], resolution_choices=[224]))
    assert space.cardinality() == (9**2 + 9**3 + 9**4) ** 5
    net = build_supernet(space)
    small, big = net.cost(space.min_arch()), net.cost(space.max_arch())
    assert 100e6 <= small["macs"] <= 200e6 and 3e6 <= small["params"] <= 4e6
    assert 500e6 <= big["macs"] <= 620e6 and 7e6 <= big["params"] <= 8.5e6


def test_paper_resolution_cost_range(space224, net224):
    small, big = net224.cost(space224.min_arch()), net224.cost(space224.max_arch())
    # Largest: OFA's largest subnet (d4 k7 e6, width 1.0, 224): ~7.7M params, ~570M MACs.
    assert 7e6 <= big["params"] <= 8.5e6 and 500e6 <= big["macs"] <= 620e6
    # Smallest (width 0.25, 128 px, one expansion-1 3x3 block per stage): a few M MACs; its
    # parameters are dominated by the full-width 1280 x 1000 classifier.
    assert small["macs"] < 10e6 and 1e6 < small["params"] < 2e6
    # The resolution dim alone scales MACs, never params.
    by_res = [net224.cost(space224.max_arch().replace(resolution=r)) for r in (128, 160, 192, 224)]
    assert len({c["params"] for c in by_res}) == 1
    assert [c["macs"] for c in by_res] == sorted(c["macs"] for c in by_res)
    assert by_res[0]["macs"] < 0.4 * by_res[-1]["macs"]


# ---- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    ({"colour": 1}, "space mbv3-biglittle.colour: unknown field"),
    ({"kernel_choices": [3, 4]}, "space mbv3-biglittle.kernel_choices"),
    ({"expand_choices": []}, "space mbv3-biglittle.expand_choices"),
    ({"width_choices": [0.5, 0.5]}, "space mbv3-biglittle.width_choices"),
    ({"width_choices": [0.0, 1.0]}, "space mbv3-biglittle.width_choices"),
    ({"channel_divisor": 0}, "space mbv3-biglittle.channel_divisor"),
    ({"stem": {"channels": 16, "kernel": 3, "stride": 3, "act": "hswish"}}, "space mbv3-biglittle.stem.stride"),
    ({"stem": {"channels": 16, "kernel": 3, "stride": 2}}, "space mbv3-biglittle.stem.act: missing"),
    ({"first_block": {"channels": 16, "kernel": 3, "expand": 1, "act": "relu", "se": "no"}},
     "space mbv3-biglittle.first_block.se"),
    ({"head": {"expand": 960, "features": 1280, "act": "hswish", "dropout": 1.5}},
     "space mbv3-biglittle.head.dropout"),
    ({"stages": []}, "space mbv3-biglittle.stages"),
])
def test_bad_declarations_name_the_field(changes, field):
    with pytest.raises(SpaceError) as err:
        space_from_config(variant(**changes))
    assert str(err.value).startswith(field)


def test_bad_stage_entries_name_the_stage():
    cfg = base_cfg()
    cfg["stages"][2]["act"] = "gelu"
    with pytest.raises(SpaceError, match=r"stages\[2\]\.act: 'gelu' is not allowed; allowed: \['hswish', 'relu'\]"):
        space_from_config(cfg)
    cfg = base_cfg()
    cfg["stages"][0]["groups"] = 2
    with pytest.raises(SpaceError, match=r"stages\[0\]\.groups: unknown field"):
        space_from_config(cfg)


def test_bad_archs_name_the_field(space224):
    arch = space224.max_arch().to_dict()
    with pytest.raises(SpaceError, match=r"'stage2\.b1\.kernel': 4 is not allowed; allowed: \[3, 5, 7\]"):
        space224.validate({**arch, "stage2.b1.kernel": 4})
    with pytest.raises(SpaceError, match=r"'resolution': 100 is not allowed"):
        space224.validate({**arch, "resolution": 100})
    with pytest.raises(SpaceError, match=r"'stage9\.depth': unknown"):
        space224.validate({**arch, "stage9.depth": 1})


def test_cli_reports_bad_yaml_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(variant(expand_choices=[0, 2])))
    assert cli_main(["spaces", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expand_choices" in err


# ---- canonicalisation ----------------------------------------------------------------------------------
def test_inactive_blocks_are_reset(space224):
    values = space224.max_arch().to_dict()
    values["stage2.depth"] = 2
    a = space224.validate(values)
    assert a["stage2.b2.kernel"] == 3 and a["stage2.b3.expand"] == 1
    assert a["stage2.b1.kernel"] == 7 and a["stage2.b1.expand"] == 6  # active blocks keep their choices
    b = space224.validate({**values, "stage2.b3.kernel": 5, "stage2.b2.expand": 4})
    assert a == b and hash(a) == hash(b)
    assert space224.decode(space224.encode(a)) == a


def test_widths_rounding_to_the_same_channels_are_one_network():
    tiny = variant(name="tiny", width_choices=[0.9, 1.0], stem={"channels": 8, "kernel": 3, "stride": 2,
                   "act": "hswish"}, first_block={"channels": 8, "kernel": 3, "expand": 1, "act": "relu",
                                                  "se": False},
                   stages=[{"channels": 8, "stride": 2, "act": "relu", "se": True},
                           {"channels": 16, "stride": 2, "act": "hswish", "se": False}],
                   head={"expand": 16, "features": 32, "act": "hswish"})
    space = space_from_config(tiny)
    a = space.validate({**space.max_arch().to_dict(), "width": 1.0})
    assert a["width"] == 0.9  # 0.9 and 1.0 both give channels 8/8/8/16/16/32
    per_stage = sum(12**d for d in (1, 2, 3, 4))
    assert space.cardinality() == 1 * 4 * per_stage**2


# ---- resolution semantics -------------------------------------------------------------------------------
def test_resolution_override_collapses_or_caps_the_dim():
    assert load_space(SPACE, resolution=32).dim("resolution").choices == (32,)
    assert load_space(SPACE, resolution=192).dim("resolution").choices == (128, 160, 192)


def test_searched_resolution_resizes_inside_the_subnet(space224, net224, tmp_path):
    arch = space224.min_arch().replace(resolution=160, width=0.5)
    subnet = net224.extract(arch).eval()
    assert isinstance(subnet[0], InputResize) and subnet.block_keys[0] == "mbv3.resize:3x224->160"
    assert "in3x160x160" in subnet.block_keys[1]
    x = torch.randn(2, *net224.input_shape()[1:])
    with torch.no_grad():
        assert (subnet(x) - net224(x, arch)).abs().max().item() <= 1e-5
    # the resize is free in MACs: cost is the network at 160 px, fed 224 px images
    assert net224.cost(arch) == count_cost(subnet, net224.input_shape(1))
    assert export_onnx(subnet, net224.input_shape(1), tmp_path / "r160.onnx")["max_abs_diff"] <= 1e-4
    # at its own resolution no resize piece is needed
    assert not any(k.startswith("mbv3.resize") for k in net224.extract(arch.replace(resolution=224)).block_keys)


def test_fixed_resolution_runs_at_the_given_size():
    space = load_space(SPACE, resolution=32, num_classes=10)
    net = build_supernet(space).eval()
    arch = space.sample(np.random.default_rng(0))
    subnet = net.extract(arch, resolution=64)
    assert not isinstance(subnet[0], InputResize)
    assert net.cost(arch, resolution=64) == count_cost(subnet, net.input_shape(1, 64))
    assert net.cost(arch, resolution=64)["macs"] > net.cost(arch)["macs"]


# ---- pieces for big/little couplings -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def net32():
    torch.manual_seed(0)
    space = load_space(SPACE, resolution=32, num_classes=10)
    net = build_supernet(space)
    net.train()
    with torch.no_grad():
        for seed in range(3):
            net(torch.randn(4, 3, 32, 32), space.sample(np.random.default_rng(seed)))
    return net.eval()


def test_prefix_and_suffix_pieces_compose(net32):
    space = net32.space
    assert len(net32.slots) == 20 and net32.slots[4] == (1, 0)
    x = torch.randn(2, 3, 32, 32)
    for seed in range(2):
        arch = space.sample(np.random.default_rng(seed))
        with torch.no_grad():
            full = net32(x, arch)
        for split in (0, 9, 20):
            with torch.no_grad():
                trunk = net32.forward_slots(net32.forward_stem(x, arch), arch, 0, split)
                out = net32.forward_head(net32.forward_slots(trunk, arch, split), arch)
            assert torch.allclose(out, full, atol=1e-6, rtol=0)
            prefix = net32.blocks(arch, end=split, head=False)
            suffix = net32.blocks(arch, stem=False, start=split)
            keys = [b.key for b in prefix + suffix]
            assert keys == net32.extract(arch).block_keys
            parts = [net32.cost(arch, end=split, head=False), net32.cost(arch, stem=False, start=split)]
            assert sum(p["macs"] for p in parts) == net32.cost(arch)["macs"]
            assert sum(p["params"] for p in parts) == net32.cost(arch)["params"]
            plan = net32.plan(arch)
            assert len(prefix) - 1 == sum(i < split for i in plan.slots)  # stem + blocks before the split
            assert len(plan.blocks) == sum(arch[f"stage{s}.depth"] for s in range(1, 6))


def test_block_keys_describe_their_inputs(net32):
    arch = net32.space.max_arch()
    h = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for block in net32.blocks(arch):
            assert tuple(h.shape) == block.in_shape, block.key
            h = block.module(h)
    assert h.shape == (1, 10)


def test_teacher_is_the_largest_subnet(net32):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net32(x), net32(x, net32.space.max_arch()))


def test_training_step_touches_only_the_active_slices():
    torch.manual_seed(0)
    space = load_space(SPACE, resolution=32, num_classes=10)
    net = build_supernet(space).train()
    arch = space.min_arch().replace(**{"stage3.b0.kernel": 3, "stage3.b0.expand": 2})
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32), arch), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    block = net.stages[2][0]
    dw = block.depthwise.conv.weight.grad
    hidden = net.plan(arch).blocks[2].hidden
    assert dw[:hidden, :, 2:5, 2:5].abs().sum() > 0  # the centre 3x3 of the 7x7 kernel
    assert dw[hidden:].abs().sum() == 0 and dw[:, :, 0].abs().sum() == 0
    assert net.stages[2][1].depthwise.conv.weight.grad is None  # beyond depth 1: not run


def test_expansion_one_keeps_the_shared_expand_conv():
    """A searched block at expansion 1 still runs its (square) expand conv, so the depthwise weights it
    shares with expansions 2..6 read the same kind of input; the fixed first block has no expand conv."""
    torch.manual_seed(0)
    space = load_space(SPACE, resolution=32, num_classes=10)
    net = build_supernet(space)
    arch = space.min_arch()
    plan = net.plan(arch)
    assert all(p.expand == 1 and p.has_expand for p in plan.blocks)
    assert not plan.stem.first_block.has_expand
    block = net.blocks(arch, stem=False, head=False)[0]
    expand = block.module.expand
    assert isinstance(expand, torch.nn.Sequential) and expand[0].weight.shape[:2] == (plan.blocks[0].in_ch,) * 2
    # Gradients of an expansion-1 step reach the expand conv's square top-left slice only.
    net.train()(torch.randn(2, 3, 32, 32), arch).sum().backward()
    grad = net.stages[0][0].expand.conv.weight.grad
    c = plan.blocks[0].in_ch
    assert grad[:c, :c].abs().sum() > 0 and grad[c:].abs().sum() == 0
