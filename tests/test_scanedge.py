"""SCAN-Edge space (seed 004, Table 5) and its EfficientFormerV2 supernet: table, costs, S0, validation."""

import copy
import itertools
import math
import re

import numpy as np
import pytest
import timm
import torch

from raynas.space import SpaceError, load_space, space_from_config
from raynas.space.loader import builtin_spaces_dir, read_space_yaml
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost

# EfficientFormerV2-S0 (timm `efficientformerv2_s0`): widths, depths, per-block FFN expansions, and
# MHSA in front of the last `num_vit`=2 FFNs of stages 3 and 4, all with GELU and 3x3 mid convs.
S0_WIDTHS, S0_DEPTHS = (32, 48, 96, 176), (2, 2, 6, 4)
S0_EXPANSIONS = ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4))


def _scramble(net, seed=0):
    """Layer scales and position biases away from their (near-)zero init so every branch shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.25)
            elif name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def cfg():
    return read_space_yaml(builtin_spaces_dir() / "scanedge.yaml")


@pytest.fixture(scope="module")
def space():
    return load_space("scanedge")


@pytest.fixture(scope="module")
def net(space):
    """The full supernet at 224, with layer scales and position biases moved off their near-zero init."""
    torch.manual_seed(0)
    return _scramble(build_supernet(space)).eval()


def s0_arch(space):
    v = space.max_arch().to_dict()
    v["stem.act"] = "gelu"
    for i in range(4):
        s = f"stage{i + 1}"
        v[f"{s}.width"], v[f"{s}.depth"] = S0_WIDTHS[i], S0_DEPTHS[i]
        for j in range(S0_DEPTHS[i]):
            v.update({f"{s}.b{j}.ffn": "unified", f"{s}.b{j}.kernel": 3, f"{s}.b{j}.act": "gelu",
                      f"{s}.b{j}.expansion": S0_EXPANSIONS[i][j]})
            if i >= 2:
                v[f"{s}.b{j}.mhsa"] = 4 if j >= S0_DEPTHS[i] - 2 else 0
                v[f"{s}.b{j}.mhsa_act"] = "gelu"
    v["embed3.expansion"], v["embed3.act"] = 4, "gelu"
    return space.validate(v)


# ---- the paper's table ---------------------------------------------------------------------------
def test_yaml_reproduces_table5(space):
    def choices(name):
        return space.dim(name).choices

    assert choices("stem.act") == ("relu", "gelu")
    widths = {1: (24, 28, 32, 36), 2: (40, 48, 56, 64), 3: (96, 108, 120, 132), 4: (176, 200, 224, 248)}
    depths = {1: (2, 3), 2: (2, 3), 3: (6, 7, 8, 9), 4: (4, 5, 6)}
    for s in range(1, 5):
        assert choices(f"stage{s}.width") == widths[s]
        assert choices(f"stage{s}.depth") == depths[s]
        for j in range(depths[s][-1]):
            assert choices(f"stage{s}.b{j}.ffn") == ("unified", "fused")
            assert choices(f"stage{s}.b{j}.expansion") == (2, 3, 4)
            assert choices(f"stage{s}.b{j}.kernel") == (3, 5)
            assert choices(f"stage{s}.b{j}.act") == ("relu", "gelu")
            has_mhsa = f"stage{s}.b{j}.mhsa" in space.dim_names
            assert has_mhsa == (s >= 3)
            if has_mhsa:  # 0 = no MHSA: N_mhsa in {0..N_ffn} at any position
                assert choices(f"stage{s}.b{j}.mhsa") == (0, 2, 3, 4)
                assert choices(f"stage{s}.b{j}.mhsa_act") == ("relu", "gelu")
    assert choices("embed3.expansion") == (2, 3, 4) and choices("embed3.act") == ("relu", "gelu")
    assert not any(n.startswith(("embed1.", "embed2.")) for n in space.dim_names)  # plain conv embeddings


def test_block_variants_match_table5_counts(net):
    """Distinct LUT keys per row of Table 5 equal its "#n" column (8, 96, 16, 96, 16, 24, 96, 96, 24, 96)."""
    variants = net.piece_variants()
    per_kind = {}
    for key in variants:
        kind = key.split("|")[0]
        per_kind[kind] = per_kind.get(kind, 0) + 1
    assert per_kind == {"stem": 8, "stage1.ffn": 96, "embed1": 16, "stage2.ffn": 96, "embed2": 16,
                        "stage3.mhsa": 24, "stage3.ffn": 96, "embed3": 96, "stage4.mhsa": 24,
                        "stage4.ffn": 96, "head": 4}
    assert len(variants) == 572
    # Table 5's "Res." column: stages at 1/4, 1/8, 1/16, 1/32 of the 224 input.
    for kind, side in [("stage1.ffn", 56), ("stage2.ffn", 28), ("stage3.ffn", 14), ("stage4.ffn", 7)]:
        assert all(f"x{side}x{side}|" in key for key in variants if key.startswith(kind + "|"))
    # A piece built from a variant is the same computation a subnet uses under that key.
    module, choices, shape = variants["stage3.mhsa|in=120x14x14|expansion=3|act=relu"]
    assert count_cost(module.static(shape, **choices), (1, *shape))["params"] == module.cost(shape, **choices)[0]


def test_every_subnet_key_is_a_variant(net, space):
    variants = net.piece_variants()
    rng = np.random.default_rng(0)
    for arch in [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(20)]:
        keys = [p.key for p in net._pieces(arch.to_dict(), (224, 224))]
        assert set(keys) <= set(variants)


def test_min_max_subnets_at_224(net, space):
    small, big = space.min_arch(), space.max_arch()
    # App. E: the smallest subnet has no MHSA in stages 3-4 (embed 3 keeps its attention); the largest
    # has an MHSA before every FFN of stages 3 and 4.
    small_kinds = [p.kind for p in net._pieces(small.to_dict(), (224, 224))]
    big_kinds = [p.kind for p in net._pieces(big.to_dict(), (224, 224))]
    assert "stage3.mhsa" not in small_kinds and "stage4.mhsa" not in small_kinds and "embed3" in small_kinds
    assert big_kinds.count("stage3.mhsa") == 9 and big_kinds.count("stage4.mhsa") == 6
    assert net.cost(small) == {"params": 1_437_528, "macs": 146_036_448}
    assert net.cost(big) == {"params": 64_692_412, "macs": 8_020_073_160}
    s0 = net.cost(s0_arch(space))
    assert net.cost(small)["macs"] < s0["macs"] < net.cost(big)["macs"]


def test_efficientformerv2_s0_is_a_subnet_with_its_published_cost(net, space):
    """S0 in the space costs exactly what timm's efficientformerv2_s0 counts, and close to the papers.

    Published: EfficientFormerV2 paper 3.5M params / 0.40 GMACs; SCAN-Edge Table 6: 3.6M / 402.9M.
    Both are rounded to two digits (+-1.4% and +-1.25%) and disagree with each other by 3% on the
    params (the distillation linear, 0.18M), so 5% is the tolerance for the published figures; the
    exact check is the equality with timm's model counted the same way.
    """
    arch = s0_arch(space)
    ours = net.cost(arch)
    reference = count_cost(timm.create_model("efficientformerv2_s0"), (1, 3, 224, 224))
    assert ours == reference == {"params": 3_600_256, "macs": 395_892_544}
    assert abs(ours["params"] / 3.5e6 - 1) < 0.05
    assert abs(ours["macs"] / 0.40e9 - 1) < 0.05


def _table7_arch(space, stem_act, stages, embed3):
    """An arch from Table 7's rows: per stage (width, blocks); a block is an FFN (type, E, K, act), or an
    (MHSA (E, act) or None, FFN) pair in stages 3-4, matching the table's MHSA-before-FFN order."""
    v = space.min_arch().to_dict()
    v["stem.act"] = stem_act
    for i, (width, blocks) in enumerate(stages):
        s = f"stage{i + 1}"
        v[f"{s}.width"], v[f"{s}.depth"] = width, len(blocks)
        for j, block in enumerate(blocks):
            mhsa, (ffn, e, k, act) = block if i >= 2 else (None, block)
            v.update({f"{s}.b{j}.ffn": ffn, f"{s}.b{j}.expansion": e, f"{s}.b{j}.kernel": k, f"{s}.b{j}.act": act})
            if i >= 2:
                v[f"{s}.b{j}.mhsa"], v[f"{s}.b{j}.mhsa_act"] = mhsa or (0, "relu")
    v["embed3.expansion"], v["embed3.act"] = embed3
    return space.validate(v)


def test_table7_searched_subnets_match_table6_costs(net, space):
    """Cortex@95ms / @150ms (Table 7) are subnets; their cost lands within 5% of Table 6.

    Table 6 rounds params to 0.1M (up to 1.1% here) and its FLOP counter puts S0 at 402.9M where
    torch's counter (and timm) give 395.9M (1.8%); 5% covers both. Measured gaps: @95ms -1.5% params,
    -3.5% MACs; @150ms 0.0% params, -0.7% MACs.
    """
    r, g = "relu", "gelu"
    uni, fus = (lambda e, k, a=r: ("unified", e, k, a)), (lambda e, k, a=r: ("fused", e, k, a))
    m2r, m2g = (2, r), (2, g)
    cortex95 = _table7_arch(space, r, [
        (24, [fus(2, 3), fus(2, 3)]),
        (40, [uni(2, 3), fus(2, 3)]),
        (96, [(None, uni(3, 3)), (m2r, uni(3, 3)), (m2r, uni(3, 3)), (m2r, uni(4, 3)), (None, uni(2, 3)),
              (m2r, uni(3, 3))]),
        (224, [(m2r, uni(3, 3))] * 4),
    ], (2, r))
    cortex150 = _table7_arch(space, r, [
        (32, [fus(2, 3), fus(2, 3)]),
        (40, [fus(2, 3), fus(2, 3)]),
        (96, [(None, uni(3, 3)), (m2r, uni(3, 3)), (m2r, fus(2, 3)), (m2r, uni(4, 3)), (None, uni(2, 5)),
              (m2r, uni(3, 3))]),
        (248, [(m2r, fus(3, 3)), (m2g, fus(3, 3, g)), (m2r, uni(3, 3)), (m2g, fus(3, 3, g))]),
    ], (4, r))
    assert cortex95["stage1.width"] == 24 and cortex95["stage4.b2.mhsa"] == 2
    for arch, (params, macs) in [(cortex95, (4.6e6, 441.3e6)), (cortex150, (9.7e6, 790.8e6))]:
        cost = net.cost(arch)
        assert abs(cost["params"] / params - 1) < 0.05, cost
        assert abs(cost["macs"] / macs - 1) < 0.05, cost
    assert net.cost(cortex95) == {"params": 4_531_224, "macs": 425_769_568}
    assert net.cost(cortex150) == {"params": 9_700_232, "macs": 785_330_568}


def _timm_name(name: str) -> str:
    rules = [
        (r"^stem\.(.*)$", r"stem.\1"),
        (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.(.*)$", r"stages.\1.\2.ffn.ffns.unified.\3"),
        (r"^stages\.(\d)\.blocks\.(\d+)\.ls2\.gamma$", r"stages.\1.\2.ffn.ffns.unified.ls.gamma"),
        (r"^stages\.(\d)\.blocks\.(\d+)\.ls1\.gamma$", r"stages.\1.\2.mhsa.ls.gamma"),
        (r"^stages\.(\d)\.blocks\.(\d+)\.token_mixer\.(.*)$", r"stages.\1.\2.mhsa.\3"),
        (r"^stages\.(\d)\.downsample\.conv\.(.*)$", r"embeds.embed\1.conv.\2"),
        (r"^stages\.3\.downsample\.attn\.q\.local\.(.*)$", r"embeds.embed3.q_local.\1"),
        (r"^stages\.3\.downsample\.attn\.q\.proj\.(.*)$", r"embeds.embed3.q_proj.\1"),
        (r"^stages\.3\.downsample\.attn\.(.*)$", r"embeds.embed3.\1"),
        (r"^norm\.(.*)$", r"head.norm.\1"),
        (r"^head\.(.*)$", r"head.fc.\1"),
        (r"^head_dist\.(.*)$", r"head.fc_dist.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


@torch.no_grad()
def _load_timm_into_supernet(net, reference) -> None:
    """Copy timm S0 weights into the S0 slice of the supernet (V channels: head-major -> dim-major)."""
    ours = net.state_dict()
    heads = 8
    for name, src in reference.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        dst_name = _timm_name(name)
        dst = ours[dst_name]
        if name.endswith("attention_biases"):
            side = math.isqrt(src.shape[1])
            src = src.reshape(heads, side, side)
        is_v = re.search(r"\.(v|v_local)\.", dst_name)
        is_proj_in = re.search(r"(mhsa|embed3)\.proj\.conv\.weight$", dst_name)
        if is_v or is_proj_in:
            axis = 0 if is_v else 1
            d = src.shape[axis] // heads
            perm = torch.tensor([h * d + i for i in range(d) for h in range(heads)])
            src = src.index_select(axis, perm)
        index = []
        for axis, (n_dst, n_src) in enumerate(zip(dst.shape, src.shape)):
            start = (n_dst - n_src) // 2 if dst.dim() == 4 and axis >= 2 else 0  # centre of a larger kernel
            index.append(slice(start, start + n_src))
        dst[tuple(index)] = src


@torch.no_grad()
def test_s0_subnet_computes_exactly_what_timm_s0_computes(net, space):
    reference = timm.create_model("efficientformerv2_s0").eval()
    gen = torch.Generator().manual_seed(0)
    for name, t in reference.state_dict().items():  # non-trivial norms, biases and layer scales
        if not t.is_floating_point():
            continue
        if name.endswith("running_var") or name.endswith("bn.weight") or name == "norm.weight":
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif "gamma" in name:
            t.copy_(torch.rand(t.shape, generator=gen) * 0.3 + 0.2)
        elif name.endswith(("running_mean", "bias", "attention_biases")):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    local = copy.deepcopy(net)
    _load_timm_into_supernet(local, reference)
    arch = s0_arch(space)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    expected = reference(x)
    assert expected.abs().max() > 0.1
    got = local(x, arch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    subnet = local.extract(arch).eval()
    torch.testing.assert_close(subnet(x), expected, atol=1e-4, rtol=1e-4)


# ---- subnets at other resolutions ----------------------------------------------------------------
@torch.no_grad()
def test_extract_at_other_resolutions_matches_supernet_and_cost(net, space):
    rng = np.random.default_rng(1)
    for resolution, arch in [(32, space.max_arch()), (48, space.sample(rng)), (64, space.sample(rng))]:
        x = torch.randn(2, 3, resolution, resolution)
        subnet = net.extract(arch, resolution=resolution).eval()
        torch.testing.assert_close(subnet(x), net(x, arch), atol=1e-5, rtol=1e-5)
        assert net.cost(arch, resolution=resolution) == count_cost(subnet, (1, 3, resolution, resolution))


def _tiny_cfg(cfg, resolution=32):
    """A small declared variant of the same structure (16k raw archs, so exhaustive enumeration is cheap)."""
    tiny = copy.deepcopy(cfg)
    tiny.update(name="scanedge-tiny", resolution=resolution, num_classes=5)
    tiny.pop("references")  # EfficientFormerV2-S0 is not a subnet of the tiny table
    layout = [  # width, depths, ffn types, MHSA activations
        ([8], [1], ["unified", "fused"], None),
        ([16], [1], ["fused"], None),
        ([16, 24], [1, 2], ["unified", "fused"], ["relu", "gelu"]),
        ([24, 32], [1, 2], ["fused"], ["relu"]),
    ]
    for stage, (width, depth, ffn, mhsa_act) in zip(tiny["stages"], layout):
        stage.update(width=width, depth=depth, ffn=ffn, expansion=[2], kernel=[3], act=["relu"])
        if "mhsa" in stage:
            stage["mhsa"].update(expansion=[2], act=mhsa_act)
    tiny["stages"][3]["embed"].update(expansion=[2], act=["gelu"])
    tiny["attention"] = {"heads": 2, "key_dim": 4, "downsample_key_dim": 4, "bias_resolution": 32}
    return tiny


@torch.no_grad()
def test_inputs_larger_than_the_bias_tables(cfg):
    space = space_from_config(_tiny_cfg(cfg, resolution=32))
    local = _scramble(build_supernet(space).eval(), seed=2)
    rng = np.random.default_rng(2)
    for arch in (space.max_arch(), space.sample(rng)):
        x = torch.randn(2, 3, 96, 96)  # stage-4 grid 3x3 against tables built for 1x1 -> clamped offsets
        subnet = local.extract(arch, resolution=96).eval()
        torch.testing.assert_close(subnet(x), local(x, arch), atol=1e-5, rtol=1e-5)
        assert local.cost(arch, resolution=96) == count_cost(subnet, (1, 3, 96, 96))


def test_checkpoint_weights_do_not_depend_on_the_resolution(cfg):
    small = build_supernet(space_from_config(_tiny_cfg(cfg), resolution=32))
    large = build_supernet(space_from_config(_tiny_cfg(cfg), resolution=96))
    large.load_state_dict(small.state_dict())  # bias tables sized by attention.bias_resolution


def test_training_mode_backward_reaches_only_the_active_ffn(cfg):
    space = space_from_config(_tiny_cfg(cfg))
    local = build_supernet(space).train()
    arch = space.validate({**space.min_arch().to_dict(), "stage1.b0.ffn": "fused"})
    out = local(torch.randn(4, 3, 32, 32), arch)
    out.square().mean().backward()
    block = local.stages[0][0].ffn.ffns
    assert block["fused"].fc1.conv.weight.grad is not None
    assert block["unified"].fc1.conv.weight.grad is None  # dual FFN: separate weights per type
    assert local.stem.conv1.conv.weight.grad.abs().sum() > 0


# ---- canonicalisation and cardinality --------------------------------------------------------------
def test_canonicalize_resets_inactive_fields(space, net):
    base = space.min_arch().to_dict()  # depth 6 in stage 3, no MHSA
    changed = dict(base)
    changed["stage3.b8.ffn"], changed["stage3.b8.kernel"] = "fused", 5  # beyond the depth
    changed["stage3.b0.mhsa_act"] = "gelu"  # activation of an absent MHSA
    changed["stage4.b5.mhsa"] = 4
    a, b = space.validate(base), space.validate(changed)
    assert a == b and hash(a) == hash(b) and a.to_json() == b.to_json()
    assert net.cost(a) == net.cost(b)
    # ...but an active field is kept.
    active = space.validate({**base, "stage3.b0.mhsa": 3, "stage3.b0.mhsa_act": "gelu"})
    assert active["stage3.b0.mhsa_act"] == "gelu" and active != a


def test_log10_cardinality_counts_distinct_networks(cfg, space):
    tiny = space_from_config(_tiny_cfg(cfg))
    distinct = {tiny.validate(dict(zip(tiny.dim_names, values)))
                for values in itertools.product(*(d.choices for d in tiny.dims))}
    assert len(distinct) == 2 * 2 * 1 * 2 * (6 + 6**2) * 2 * (2 + 2**2) == 4032  # by hand, per stage
    assert math.isclose(10 ** tiny.log10_cardinality(), len(distinct), rel_tol=1e-9)
    # Full space: stem act x per stage width x sum over depths of per-block choices ^ depth.
    ffn = 2 * 3 * 2 * 2
    attn = ffn * (1 + 3 * 2)
    expected = (2 * 4 * (ffn**2 + ffn**3) * 4 * (ffn**2 + ffn**3) * 4 * sum(attn**d for d in (6, 7, 8, 9))
                * 4 * 3 * 2 * sum(attn**d for d in (4, 5, 6)))
    assert math.isclose(space.log10_cardinality(), math.log10(expected), rel_tol=1e-12)


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(depthwise=True), "space scanedge.depthwise: unknown field"),
        (lambda c: c["stages"][0].update(kernels=[3]), "space scanedge.stages[0].kernels: unknown field"),
        (lambda c: c["stages"][1].update(kernel=[3, 4]), "space scanedge.stages[1].kernel[1]: got 4"),
        (lambda c: c["stages"][2].update(ffn=["fused", "ghost"]),
         "space scanedge.stages[2].ffn[1]: 'ghost' is not allowed; allowed: ['unified', 'fused']"),
        (lambda c: c["stages"][0].update(act=["swish"]), "space scanedge.stages[0].act[0]: 'swish' is not allowed"),
        (lambda c: c["stages"][3].update(width={"min": 176, "max": 250, "step": 24}),
         "space scanedge.stages[3].width: min 176, max 250, step 24 is not allowed"),
        (lambda c: c["stages"][1].pop("embed"), "space scanedge.stages[1].embed: missing"),
        (lambda c: c["stages"][0].update(embed={"type": "conv"}), "space scanedge.stages[0].embed: not allowed"),
        (lambda c: c["stages"][3]["embed"].update(type="pool"),
         "space scanedge.stages[3].embed.type: 'pool' is not allowed; allowed: ['conv', 'mhsa_ds']"),
        (lambda c: c["stages"][2]["mhsa"].update(stride=3), "space scanedge.stages[2].mhsa.stride: got 3"),
        (lambda c: c["stages"][2].update(depth=[]),
         "space scanedge.stages[2].depth: got []; allowed: a non-empty list"),
        (lambda c: c["stages"][2].update(depth="6"),
         "space scanedge.stages[2].depth: got '6'; allowed: a non-empty list"),
        (lambda c: c["attention"].update(heads=0), "space scanedge.attention.heads: got 0"),
        (lambda c: c["head"].update(distillation="yes"), "space scanedge.head.distillation"),
        (lambda c: c.pop("stages"), "space scanedge.stages: missing"),
    ],
)
def test_yaml_errors_name_the_field(cfg, edit, message):
    bad = copy.deepcopy(cfg)
    edit(bad)
    with pytest.raises(SpaceError) as err:
        space_from_config(bad)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_arch_errors_name_the_field(space):
    arch = space.max_arch().to_dict()
    with pytest.raises(SpaceError, match=r"'stage2\.b1\.kernel': 7 is not allowed; allowed: \[3, 5\]"):
        space.validate({**arch, "stage2.b1.kernel": 7})
    with pytest.raises(SpaceError, match=r"'stage1\.b0\.mhsa': unknown"):
        space.validate({**arch, "stage1.b0.mhsa": 2})
    with pytest.raises(SpaceError, match=r"'stage4\.width': 180 is not allowed"):
        space.validate({**arch, "stage4.width": 180})


def test_block_keys_ignore_position_inside_a_stage(net, space):
    subnet = net.extract(s0_arch(space), resolution=32)
    keys = subnet.block_keys
    # S0 stage 3: blocks 1-3 are unified e3 k3 GELU on the same input -> one key used three times.
    assert keys.count("stage3.ffn|in=96x2x2|ffn=unified|expansion=3|kernel=3|act=gelu") == 3
    assert keys[0] == "stem|in=3x32x32|width=32|act=gelu" and keys[-1] == "head|in=176x1x1|classes=1000"
    assert "embed3|in=96x2x2|width=176|expansion=4|act=gelu" in keys
