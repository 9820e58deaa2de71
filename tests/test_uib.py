"""The `uib` family: seed 000's MobileNetV4-UIB space (Table 9), KHyper-S/M/L (Tables 10-12), the
softmax(beta) teacher, the weight-generator hook, canonicalisation and validation."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import yaml

from raynas.cli import main as cli_main
from raynas.space import Arch, SpaceError, load_space, space_from_config
from raynas.space.loader import builtin_spaces_dir
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost

SPACE = "khyper-uib"

# A tiny declaration for mechanism tests: a stride-1 stage whose first block can be residual (stem 8 ->
# channels 8) and a stride-2 stage with a searched expansion.
TINY = {
    "name": "tiny-uib", "family": "uib", "resolution": 16, "num_classes": 5,
    "stem": {"channels": 8, "kernel": 3, "stride": 1},
    "activation": "relu",
    "ops": ["extra_dw", "ib", "ffn"],
    "stages": [
        {"channels": [8, 16], "depth": [1, 2], "kernels": [3, 5], "expand": [1], "stride": 1},
        {"channels": [16], "depth": [1], "kernels": [3], "expand": [2, 4], "stride": 2},
    ],
    "head": {"channels": 24, "hidden": 32, "dropout": 0.0, "activation": "relu"},
}


def khyper_cfg():
    return yaml.safe_load((builtin_spaces_dir() / f"{SPACE}.yaml").read_text())


@pytest.fixture(scope="module")
def space():
    return load_space(SPACE)


@pytest.fixture(scope="module")
def supernet(space):
    return build_supernet(space).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(TINY))
    net.train()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # real BN statistics, so eval-mode outputs are well scaled
        for _ in range(4):
            net(torch.randn(4, 3, 16, 16), net.space.sample(rng))
        net(torch.randn(4, 3, 16, 16), None)
    return net.eval()


# ---- Table 9: the space itself -------------------------------------------------------------------
def test_table9_dims(space):
    table9 = [([16, 24], [1, 2]), ([24, 32], [2, 3]), ([40, 48], [2, 3]), ([80, 88], [2, 3, 4]),
              ([112, 128], [2, 3, 4, 5, 6]), ([192, 216], [2, 3, 4, 5, 6]), ([320, 352], [1, 2])]
    for s, (channels, depths) in enumerate(table9, start=1):
        assert list(space.dim(f"stage{s}.channels").choices) == channels
        assert list(space.dim(f"stage{s}.depth").choices) == depths
        for i in range(depths[-1]):
            assert space.dim(f"stage{s}.b{i}.op").choices == ("ffn", "convnext", "ib", "extra_dw")
            assert space.dim(f"stage{s}.b{i}.k1").choices == (3, 5)
            assert space.dim(f"stage{s}.b{i}.k2").choices == (3, 5)
    assert len(space.topology_dims) == 26 and len(space.dims) == 7 * 2 + 26 * 3


def test_cardinality_formula(space):
    # per active block: ffn 1 + convnext 2 + ib 2 + extra_dw 4 = 9 distinct configurations
    expected = 1
    for channels, depths in [(2, [1, 2]), (2, [2, 3]), (2, [2, 3]), (2, [2, 3, 4]), (2, range(2, 7)),
                             (2, range(2, 7)), (2, [1, 2])]:
        expected *= channels * sum(9**d for d in depths)
    assert space.log10_cardinality() == pytest.approx(math.log10(expected), abs=1e-12)
    assert space.log10_cardinality() == pytest.approx(27.2534, abs=1e-4)


def test_cardinality_is_exact_by_enumeration():
    space = space_from_config(TINY)
    archs = {space._make(dict(zip(space.dim_names, values)))
             for values in itertools.product(*(d.choices for d in space.dims))}
    # stage 1: 2 widths x (v + v^2), v = ffn 1 + ib 2 + extra_dw 4; stage 2: 3 ops x 2 expansions
    assert len(archs) == 2 * (7 + 49) * 6
    assert 10 ** space.log10_cardinality() == pytest.approx(len(archs))


def test_min_and_max_subnet_at_paper_resolution(space, supernet):
    small, big = space.min_arch(), space.max_arch()
    assert all(small[f] == "ffn" for f in space.topology_dims)
    assert all(big[f] == "extra_dw" for f in space.topology_dims)
    assert big["stage5.b5.k1"] == big["stage5.b5.k2"] == 5
    # Computed once with count_cost over the extracted subnets (224^2, 1000 classes); pinned here.
    assert supernet.cost(small) == {"params": 4_460_072, "macs": 232_515_584}
    assert supernet.cost(big) == {"params": 10_279_040, "macs": 991_102_224}
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = supernet.cost(space.sample(rng))
        assert supernet.cost(small)["params"] <= c["params"] <= supernet.cost(big)["params"]
        assert supernet.cost(small)["macs"] <= c["macs"] <= supernet.cost(big)["macs"]


# ---- Tables 10-12: KHyper-S/M/L --------------------------------------------------------------------
# Input column of the tables (H, C) per block, then the head. Table 10 prints 8^2 after the stride-2
# block at 17^2; 'same' padding (MNv4, timm, this code) gives ceil(17/2) = 9.
TABLE_INPUTS = {
    "khyper-s": [(136, 32)] + [(136, 16)] * 2 + [(68, 24)] * 2 + [(34, 48)] * 3 + [(17, 88)] * 2
                + [(17, 112)] * 3 + [(9, 192)] * 3 + [(9, 320)],
    "khyper-m": [(160, 32), (160, 16)] + [(80, 32)] * 2 + [(40, 48)] * 2 + [(20, 88)] * 4 + [(20, 128)] * 5
                + [(10, 216)] * 4 + [(10, 320)] * 2,
    "khyper-l": [(160, 32)] + [(160, 24)] * 2 + [(80, 32)] * 3 + [(40, 48)] * 3 + [(20, 88)] * 4
                + [(20, 128)] * 6 + [(10, 216)] * 6 + [(10, 352)] * 2,
}
# Our exact counts (whole network incl. the 1000-class classifier) at the tables' resolutions.
OUR_COST = {
    "khyper-s": {"params": 5_250_808, "macs": 612_732_704},
    "khyper-m": {"params": 8_172_320, "macs": 1_331_861_600},
    "khyper-l": {"params": 9_997_104, "macs": 1_904_915_200},
}


@pytest.mark.parametrize("name", ["khyper-s", "khyper-m", "khyper-l"])
def test_khyper_named_archs(space, supernet, name):
    named = space.named_archs[name]
    assert space.validate(named.arch.to_dict()) == named.arch
    blocks = supernet.blocks(named.arch, resolution=named.resolution)
    shapes = [(b.in_shape[2], b.in_shape[1]) for b in blocks[1:]]  # skip the stem
    assert shapes == TABLE_INPUTS[name]
    cost = supernet.cost(named.arch, resolution=named.resolution)
    assert cost == OUR_COST[name]
    paper_params, paper_macs = named.paper["params_m"] * 1e6, named.paper["macs_g"] * 1e9
    gap_p, gap_m = cost["params"] / paper_params - 1, cost["macs"] / paper_macs - 1
    print(f"{name}@{named.resolution}: params {cost['params'] / 1e6:.2f}M vs paper {named.paper['params_m']}M "
          f"({gap_p:+.1%}); MACs {cost['macs'] / 1e9:.3f}G vs paper {named.paper['macs_g']}G ({gap_m:+.1%})")
    # Known, reported gap: about +1.3M params in each model (the size of the 1280x1000 classifier).
    assert 0 <= cost["params"] - paper_params < 1.45e6
    assert abs(gap_m) < 0.25


def test_khyper_ordering_follows_the_paper(space, supernet):
    costs = [supernet.cost(space.named_arch(n), resolution=space.named_archs[n].resolution)
             for n in ("khyper-s", "khyper-m", "khyper-l")]
    papers = [space.named_archs[n].paper for n in ("khyper-s", "khyper-m", "khyper-l")]
    assert [c["params"] for c in costs] == sorted(c["params"] for c in costs)
    assert [c["macs"] for c in costs] == sorted(c["macs"] for c in costs)
    assert [p["params_m"] for p in papers] == sorted(p["params_m"] for p in papers)


def test_khyper_s_extracts_and_counts_at_small_resolution(supernet):
    arch = supernet.space.named_arch("khyper-s")
    subnet = supernet.extract(arch, resolution=64)
    assert supernet.cost(arch, resolution=64) == count_cost(subnet, (1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = subnet(x)
        assert out.shape == (1, 1000)
        assert (out - supernet(x, arch)).abs().max() <= 1e-5


# ---- canonicalisation ---------------------------------------------------------------------------
def test_canonicalisation_resets_inactive_and_unused_fields(space):
    arch = space.named_arch("khyper-s").to_dict()
    # stage1 has depth 2 of max 2; stage 5 depth 3 of 6: b3..b5 are inactive.
    variant = dict(arch, **{"stage5.b4.op": "extra_dw", "stage5.b4.k1": 5, "stage5.b4.k2": 5,
                            "stage1.b1.k1": 5, "stage1.b1.k2": 5,  # b1 is an FFN: uses no kernel
                            "stage1.b0.k1": 5})  # b0 is an IB: uses k2 only
    assert space.validate(variant) == space.named_arch("khyper-s")
    assert hash(space.validate(variant)) == hash(space.named_arch("khyper-s"))
    canon = space.validate(variant)
    assert canon["stage5.b4.op"] == "ffn" and canon["stage5.b4.k1"] == 3 and canon["stage1.b1.k2"] == 3
    # an active change is kept
    changed = space.validate(dict(arch, **{"stage1.b0.k2": 5}))
    assert changed != space.named_arch("khyper-s")


def test_encode_decode_and_operators_stay_canonical(space, rng):
    for _ in range(30):
        a, b = space.sample(rng), space.sample(rng)
        for x in (a, space.mutate(a, rng, 0.5), space.crossover(a, b, rng)):
            assert space.decode(space.encode(x)) == x
            assert space.validate(x.to_dict()) == x


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(foo=1), "space khyper-uib.foo: unknown field"),
    (lambda c: c["stages"][2].update(kernels=[3, 4]), "space khyper-uib.stages[2].kernels"),
    (lambda c: c["stages"][0].update(width=[8]), "space khyper-uib.stages[0].width: unknown field"),
    (lambda c: c["stages"][1].update(channels="24"),
     "space khyper-uib.stages[1].channels: got '24'; allowed: a non-empty list"),
    (lambda c: c["stages"][1].update(expand=[0]), "space khyper-uib.stages[1].expand"),
    (lambda c: c.update(ops=["mbconv"]), "space khyper-uib.ops"),
    (lambda c: c["head"].update(activation="gelu"), "space khyper-uib.head.activation: 'gelu' is not allowed"),
    (lambda c: c["head"].update(dropout=1.5), "space khyper-uib.head.dropout"),
    (lambda c: c["stem"].update(channels="32"), "space khyper-uib.stem.channels: got '32'; allowed: an integer"),
    (lambda c: c.pop("stages"), "space khyper-uib.stages: missing"),
    (lambda c: c["named_archs"]["khyper-l"]["stages"][3]["blocks"][0].update(op="fnn"),
     "space khyper-uib.named_archs.khyper-l: arch field 'stage4.b0.op': 'fnn' is not allowed"),
    (lambda c: c["named_archs"]["khyper-s"]["stages"][0]["blocks"][1].update(k1=3),
     "space khyper-uib.named_archs.khyper-s.stages[0].blocks[1].k1: op 'ffn' has no such depthwise conv"),
    (lambda c: c["named_archs"]["khyper-m"]["stages"][6].update(channels=336),
     "space khyper-uib.named_archs.khyper-m: arch field 'stage7.channels': 336 is not allowed"),
])
def test_declaration_errors_name_the_field(mutate, field):
    cfg = copy.deepcopy(khyper_cfg())
    mutate(cfg)
    with pytest.raises(SpaceError) as info:
        space_from_config(cfg)
    assert field in str(info.value), str(info.value)


def test_arch_errors_name_the_field(space):
    arch = space.max_arch().to_dict()
    with pytest.raises(SpaceError, match=r"arch field 'stage3\.b1\.op': 'mbconv' is not allowed; allowed: "
                                         r"\['ffn', 'convnext', 'ib', 'extra_dw'\]"):
        space.validate(dict(arch, **{"stage3.b1.op": "mbconv"}))
    with pytest.raises(SpaceError, match=r"arch field 'stage2\.b0\.k1': 7 is not allowed; allowed: \[3, 5\]"):
        space.validate(dict(arch, **{"stage2.b0.k1": 7}))
    with pytest.raises(SpaceError, match="named arch: unknown 'khyper-xl'"):
        space.named_arch("khyper-xl")


def test_cli_reports_bad_declaration_with_exit_2(tmp_path, capsys):
    cfg = khyper_cfg()
    cfg["stages"][4]["depth"] = [2, 0]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["spaces", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space khyper-uib.stages[4].depth" in err[0]


# ---- the supernet: subnets, teacher, hook --------------------------------------------------------
def test_tiny_subnets_match_extracted_and_costs(tiny, rng):
    x = torch.randn(2, 3, 16, 16)
    space = tiny.space
    archs = [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(8)]
    residual = space.validate(dict(space.max_arch(), **{"stage1.channels": 8}))  # 8 -> 8 at stride 1
    for arch in archs + [residual]:
        subnet = tiny.extract(arch)
        with torch.no_grad():
            assert (subnet(x) - tiny(x, arch)).abs().max() <= 1e-5
        assert tiny.cost(arch) == count_cost(subnet, tiny.input_shape(1))
    assert tiny.extract(residual)[1].residual and not tiny.extract(space.max_arch())[1].residual


def test_strided_ffn_block(tiny):
    arch = tiny.space.validate(dict(tiny.space.max_arch(), **{"stage2.b0.op": "ffn"}))
    blocks = tiny.blocks(arch)
    assert blocks[-2].key.startswith("uib.ffn:relu:k0/0:s2:")
    assert blocks[-1].in_shape == (1, 16, 8, 8)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (tiny.extract(arch)(x) - tiny(x, arch)).abs().max() <= 1e-5


def test_topology_interface(tiny):
    assert tiny.op_names() == ("ffn", "ib", "extra_dw")  # size order whatever the YAML order
    assert tiny.topology_dims() == ("stage1.b0.op", "stage1.b1.op", "stage2.b0.op")
    assert tuple(tiny.arch_params.shape) == (3, 3)
    for field in tiny.topology_dims():
        assert tiny.space.dim(field).choices == tiny.op_names()
    assert torch.allclose(tiny.arch_weights(1.5).sum(-1), torch.ones(3))


@pytest.mark.parametrize("op", ["ffn", "ib", "extra_dw"])
def test_teacher_with_one_hot_beta_is_that_single_path(tiny, op):
    space = tiny.space
    j = tiny.op_names().index(op)
    arch = dict(space.max_arch())
    for field in tiny.topology_dims():
        arch[field] = op
    arch = space.validate(arch)
    x = torch.randn(2, 3, 16, 16)
    saved = tiny.arch_params.detach().clone()
    try:
        with torch.no_grad():
            tiny.arch_params.zero_()
            tiny.arch_params[:, j] = 200.0  # softmax is one-hot in float32
            assert (tiny(x, None) - tiny(x, arch)).abs().max() <= 1e-6
    finally:
        with torch.no_grad():
            tiny.arch_params.copy_(saved)


def test_teacher_mixes_ops_and_trains_beta():
    torch.manual_seed(0)
    net = build_supernet(space_from_config(TINY)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(net(x, None), y).backward()
    assert net.arch_params.grad is not None and net.arch_params.grad.abs().sum() > 0
    # every op at every position received gradient in the teacher step
    for positions in net.stages:
        for ops in positions:
            for op in ops.values():
                assert op.units["pw_proj"].conv.weight.grad is not None
    net.zero_grad(set_to_none=True)
    arch = net.space.validate(dict(net.space.max_arch(), **{"stage1.b0.op": "ib"}))
    torch.nn.functional.cross_entropy(net(x, arch), y).backward()
    assert net.arch_params.grad is None  # a single path does not touch beta
    assert net.stages[0][0]["ib"].units["pw_proj"].conv.weight.grad is not None
    assert net.stages[0][0]["extra_dw"].units["pw_proj"].conv.weight.grad is None


def test_weight_generator_hook(tiny):
    space, x = tiny.space, torch.randn(2, 3, 16, 16)
    arch = space.validate(dict(space.sample(np.random.default_rng(3)), **{"stage1.depth": 2}))
    convs = tiny.conv_slots()
    assert "stem.conv" in convs and "head_conv.conv" in convs
    active = tiny.active_conv_slots(arch)
    op0, op1 = arch["stage1.b0.op"], arch["stage1.b1.op"]
    assert f"stages.0.0.{op0}.units.pw_exp.conv" in active and f"stages.0.1.{op1}.units.pw_proj.conv" in active
    assert not any(n.startswith("stages.0.0.") and f".{op0}." not in n for n in active)
    assert len(active) == 2 + sum(len(tiny._block(b).units) for b in tiny.active_blocks(arch))
    calls = []

    def halve(a):
        calls.append(a)
        return {n: convs[n].weight * 0.5 for n in active}

    with torch.no_grad():
        plain = tiny(x, arch)
        tiny.set_weight_generator(lambda a: {n: c.weight.clone() for n, c in convs.items()})
        assert torch.equal(tiny(x, arch), plain)
        tiny.set_weight_generator(lambda a: {})  # slots left out keep their stored weights
        assert torch.equal(tiny(x, arch), plain)
        tiny.set_weight_generator(halve)
        generated = tiny(x, arch)
        assert not torch.allclose(generated, plain)
        assert calls == [arch]  # one call per forward
        # extract bakes the generated weights into the static subnet
        assert (tiny.extract(arch)(x) - generated).abs().max() <= 1e-5
        calls.clear()
        tiny(x, None)
        assert calls == [None]  # the teacher
        tiny.set_weight_generator(lambda a: {"stem.conv": torch.zeros(1)})
        with pytest.raises(ValueError, match="weight generator: 'stem.conv' needs shape"):
            tiny(x, arch)
        tiny.set_weight_generator(None)
        assert torch.equal(tiny(x, arch), plain)


def test_module_generator_is_registered_and_trains():
    net = build_supernet(space_from_config(TINY)).train()

    class Scales(torch.nn.Module):  # one learnable scale per conv, standing in for a hypernetwork
        def __init__(self, convs):
            super().__init__()
            self.convs = convs  # a plain dict: not registered twice
            self.scale = torch.nn.Parameter(torch.ones(len(convs)))

        def forward(self, arch):
            return {n: c.weight * self.scale[i] for i, (n, c) in enumerate(self.convs.items())}

    net.set_weight_generator(Scales(net.conv_slots()))
    assert any(k.startswith("weight_generator.") for k in net.state_dict())
    net(torch.randn(2, 3, 16, 16), net.space.max_arch()).sum().backward()
    assert net.weight_generator.scale.grad.abs().sum() > 0
    net.set_weight_generator(None)
    assert not any(k.startswith("weight_generator.") for k in net.state_dict())


def test_arch_given_as_plain_mapping_is_validated(tiny):
    x = torch.randn(1, 3, 16, 16)
    arch = tiny.space.max_arch()
    with torch.no_grad():
        assert torch.equal(tiny(x, arch.to_dict()), tiny(x, arch))
    with pytest.raises(SpaceError, match="stage1.depth"):
        tiny(x, dict(arch.to_dict(), **{"stage1.depth": 3}))
    assert isinstance(arch, Arch)
