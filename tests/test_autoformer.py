"""AutoFormer family (seed 003, TAS-LoRA Table 2): paper sizes, validation, canonical archs, layout."""

import itertools
import math

import numpy as np
import pytest
import timm
import torch
import yaml

from raynas.nn.attention import DynamicMultiHeadSelfAttention
from raynas.space import load_space
from raynas.space.space import SpaceError
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost

SPACES = ("autoformer-t", "autoformer-s", "autoformer-b")

# TAS-LoRA Table 3 (AutoFormer rows): searched model of each space, params and FLOPs (multiply-adds).
PUBLISHED = {
    "autoformer-t": {"params": 5.7e6, "macs": 1.3e9},
    "autoformer-s": {"params": 22.9e6, "macs": 5.1e9},
    "autoformer-b": {"params": 54.0e6, "macs": 11.0e9},
}

# TAS-LoRA Table 2.
TABLE2 = {
    "autoformer-t": {"num_heads": [3, 4], "mlp_ratio": [3.5, 4.0], "embed_dim": [192, 216, 240],
                     "depth": [12, 13, 14]},
    "autoformer-s": {"num_heads": [5, 6, 7], "mlp_ratio": [3.0, 3.5, 4.0], "embed_dim": [320, 384, 448],
                     "depth": [12, 13, 14]},
    "autoformer-b": {"num_heads": [9, 10], "mlp_ratio": [3.0, 3.5, 4.0], "embed_dim": [512, 576, 624],
                     "depth": [14, 15, 16]},
}


def _uniform_arch(space, embed_dim, depth, heads, mlp_ratio):
    values = {"embed_dim": embed_dim, "depth": depth}
    for i in range(space.spec.max_depth):
        values[f"b{i}.heads"], values[f"b{i}.mlp_ratio"] = heads, mlp_ratio
    return space.validate(values)


def _tiny_cfg(**changes):
    cfg = {"name": "af-tiny", "family": "autoformer", "resolution": 32, "num_classes": 10, "patch_size": 16,
           "head_dim": 8, "qkv_bias": True, "global_pool": "mean", "embed_dim": [16, 24], "depth": [1, 2],
           "num_heads": [1, 2], "mlp_ratio": [1.5, 2]}
    cfg.update(changes)
    return cfg


def _write(tmp_path, cfg):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", SPACES)
def test_space_is_table2(name):
    space = load_space(name)
    assert (space.resolution, space.num_classes, space.spec.patch_size, space.spec.head_dim) == (224, 1000, 16, 64)
    table = TABLE2[name]
    assert list(space.dim("embed_dim").choices) == table["embed_dim"]
    assert list(space.dim("depth").choices) == table["depth"]
    assert len(space.dims) == 2 + 2 * table["depth"][-1]
    assert list(space.dim("b0.heads").choices) == table["num_heads"]
    assert list(space.dim(f"b{table['depth'][-1] - 1}.mlp_ratio").choices) == table["mlp_ratio"]
    per_block = len(table["num_heads"]) * len(table["mlp_ratio"])
    expected = len(table["embed_dim"]) * sum(per_block**d for d in table["depth"])
    assert space.log10_cardinality() == pytest.approx(math.log10(expected), abs=1e-12)


@pytest.mark.parametrize("name", SPACES)
def test_size_range_contains_published_searched_model(name):
    space = load_space(name)
    supernet = build_supernet(space)
    small, big = supernet.cost(space.min_arch()), supernet.cost(space.max_arch())
    for key in ("params", "macs"):
        assert small[key] <= PUBLISHED[name][key] <= big[key], (name, key, small[key], big[key])


@pytest.mark.parametrize("name,timm_name,arch", [
    ("autoformer-t", "deit_tiny_patch16_224", (192, 12, 3, 4.0)),
    ("autoformer-s", "deit_small_patch16_224", (384, 12, 6, 4.0)),
])
def test_deit_shaped_subnet_matches_timm_deit_exactly(name, timm_name, arch):
    """A DeiT-shaped subnet has exactly DeiT's parameters (timm reference) and MACs (same counter)."""
    space = load_space(name)
    cost = build_supernet(space).cost(_uniform_arch(space, *arch))
    deit = timm.create_model(timm_name, pretrained=False)
    assert cost == count_cost(deit, (1, 3, 224, 224))


def test_paper_resolution_forward_equals_extracted_and_cost_is_counted():
    torch.manual_seed(0)
    space = load_space("autoformer-t", num_classes=10)
    supernet = build_supernet(space).eval()
    arch = space.min_arch()
    x = torch.randn(1, 3, 224, 224)
    subnet = supernet.extract(arch).eval()
    with torch.no_grad():
        assert (supernet(x, arch) - subnet(x)).abs().max().item() <= 1e-5
    assert supernet.cost(arch) == count_cost(subnet, (1, 3, 224, 224))
    assert [b.in_shape for b in supernet.blocks(arch)][1] == (1, 197, 192)


@pytest.mark.parametrize("space_res,run_res", [(64, 32), (32, 64), (48, 32)])
def test_resolution_override_resamples_positions_consistently(space_res, run_res):
    torch.manual_seed(0)
    space = load_space("autoformer-t", resolution=space_res, num_classes=10)
    supernet = build_supernet(space).eval()
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, run_res, run_res)
    for arch in (space.min_arch(), space.sample(rng)):
        subnet = supernet.extract(arch, resolution=run_res).eval()
        tokens = (run_res // 16) ** 2 + 1
        assert subnet[0].pos_embed.shape == (1, tokens, arch["embed_dim"])
        with torch.no_grad():
            assert (supernet(x, arch) - subnet(x)).abs().max().item() <= 1e-5
        assert supernet.cost(arch, resolution=run_res) == count_cost(subnet, (1, 3, run_res, run_res))
    # At the space's own resolution the stored table is used as is (a slice, no resampling).
    arch = space.max_arch()
    own = supernet.extract(arch)[0].pos_embed
    assert torch.equal(own, supernet.pos_embed[..., : arch["embed_dim"]])


def test_bad_resolution_is_refused(tmp_path):
    with pytest.raises(SpaceError, match=r"space af-tiny\.resolution: 40 .*multiples of 16"):
        load_space(_write(tmp_path, _tiny_cfg(resolution=40)))
    supernet = build_supernet(load_space(_write(tmp_path, _tiny_cfg())))
    with pytest.raises(SpaceError, match="resolution: 24"):
        supernet.extract(supernet.space.min_arch(), resolution=24)
    with pytest.raises(SpaceError, match="resolution: 40"):
        supernet(torch.zeros(1, 3, 32, 40), supernet.space.min_arch())


@pytest.mark.parametrize("change,message", [
    ({"heads": [3]}, r"space af-tiny\.heads: unknown field; allowed: \[.*'num_heads'"),
    ({"num_heads": 3}, r"space af-tiny\.num_heads: got 3; allowed: a non-empty list of integers"),
    ({"num_heads": []}, r"space af-tiny\.num_heads: got \[\]; allowed: a non-empty list"),
    ({"num_heads": [2, 0]}, r"space af-tiny\.num_heads\[1\]: got 0; allowed: a non-empty list of integers >= 1"),
    ({"depth": [2, 2]}, r"space af-tiny\.depth: duplicate choices"),
    ({"embed_dim": [16.5]}, r"space af-tiny\.embed_dim\[0\]: got 16\.5"),
    ({"mlp_ratio": ["4"]}, r"space af-tiny\.mlp_ratio\[0\]: got '4'; allowed: a number in \(0\.0, inf\)"),
    ({"patch_size": 0}, r"space af-tiny\.patch_size: got 0; allowed: an integer >= 1"),
    ({"head_dim": "64"}, r"space af-tiny\.head_dim: got '64'; allowed: an integer"),
    ({"qkv_bias": "yes"}, r"space af-tiny\.qkv_bias: got 'yes'; allowed: true or false"),
    ({"global_pool": "max"}, r"space af-tiny\.global_pool: 'max' is not allowed; allowed: \['cls', 'mean'\]"),
])
def test_yaml_validation_names_the_field(tmp_path, change, message):
    with pytest.raises(SpaceError, match=message):
        load_space(_write(tmp_path, _tiny_cfg(**change)))


def test_arch_validation_names_the_field():
    space = load_space("autoformer-t")
    good = space.sample(np.random.default_rng(0)).to_dict()
    with pytest.raises(SpaceError, match=r"'b3\.heads': 5 is not allowed; allowed: \[3, 4\]"):
        space.validate({**good, "b3.heads": 5})
    with pytest.raises(SpaceError, match=r"'embed_dim': 200 is not allowed; allowed: \[192, 216, 240\]"):
        space.validate({**good, "embed_dim": 200})
    with pytest.raises(SpaceError, match=r"'b14\.heads': unknown"):
        space.validate({**good, "b14.heads": 3})
    assert space.validate({**good, "b0.mlp_ratio": 4})["b0.mlp_ratio"] == 4.0  # JSON spelling of 4.0


def test_blocks_beyond_depth_are_canonicalised():
    space = load_space("autoformer-t")
    values = space.max_arch().to_dict()
    values["depth"] = 12
    for i in (12, 13):
        values[f"b{i}.heads"], values[f"b{i}.mlp_ratio"] = 4, 4.0
    arch = space.validate(values)
    assert (arch["b12.heads"], arch["b13.mlp_ratio"]) == (3, 3.5)
    other = space.validate({**values, "b13.heads": 3, "b12.mlp_ratio": 3.5})
    assert arch == other and hash(arch) == hash(other)
    assert arch["b11.heads"] == 4  # active blocks keep their choice
    rng = np.random.default_rng(1)
    for _ in range(50):
        a = space.sample(rng)
        assert all(a[f"b{i}.heads"] == 3 and a[f"b{i}.mlp_ratio"] == 3.5 for i in range(a["depth"], 14))


def test_cardinality_counts_distinct_networks(tmp_path):
    space = load_space(_write(tmp_path, _tiny_cfg()))
    distinct = {space.validate(dict(zip(space.dim_names, combo)))
                for combo in itertools.product(*(d.choices for d in space.dims))}
    assert len(distinct) == 2 * (4 + 4**2)
    assert space.log10_cardinality() == pytest.approx(math.log10(len(distinct)), abs=1e-12)


def test_block_attributes_for_router():
    space = load_space("autoformer-s")
    arch = space.sample(np.random.default_rng(3))
    attrs = space.block_attributes(arch)
    assert len(attrs) == arch["depth"]
    assert attrs[0] == (arch["b0.heads"], arch["b0.mlp_ratio"], arch["embed_dim"])
    assert all(e == arch["embed_dim"] for _, _, e in attrs)


def test_lora_target_layers_are_dynamic_linears(tmp_path):
    from raynas.nn.dynamic import DynamicLinear

    supernet = build_supernet(load_space(_write(tmp_path, _tiny_cfg())))
    names = {n.split(".")[-1] for n, m in supernet.named_modules() if isinstance(m, DynamicLinear)}
    assert names == {"qkv", "proj", "fc1", "fc2", "head"}
    arch = supernet.space.max_arch()
    assert supernet.block_attributes(arch.to_dict()) == supernet.space.block_attributes(arch)


def test_qkv_layout_is_autoformer_interleaved():
    """Rows 3c, 3c+1, 3c+2 of qkv are q, k, v of channel c: check against textbook attention."""
    torch.manual_seed(0)
    attn = DynamicMultiHeadSelfAttention(max_dim=24, max_heads=3, head_dim=8).eval()
    x = torch.randn(2, 5, 16)
    heads, d = 2, 8
    w, b = attn.qkv.weight[: 3 * heads * d, :16], attn.qkv.bias[: 3 * heads * d]
    q, k, v = (torch.nn.functional.linear(x, w[i::3], b[i::3]) for i in range(3))
    split = [t.reshape(2, 5, heads, d).transpose(1, 2) for t in (q, k, v)]
    ref = torch.softmax(split[0] @ split[1].transpose(-2, -1) / math.sqrt(d), -1) @ split[2]
    ref = torch.nn.functional.linear(ref.transpose(1, 2).reshape(2, 5, heads * d),
                                     attn.proj.weight[:16, : heads * d], attn.proj.bias[:16])
    with torch.no_grad():
        assert torch.allclose(attn(x, heads), ref, atol=1e-6)
        assert torch.allclose(attn.static(16, heads)(x), ref, atol=1e-6)
        # Leading dims beyond batch are independent sequences (MobileViT patches).
        x4 = torch.randn(2, 3, 5, 16)
        assert torch.allclose(attn(x4, heads)[:, 1], attn(x4[:, 1], heads), atol=1e-6)


def test_train_mode_backward_touches_only_the_active_slice(tmp_path):
    torch.manual_seed(0)
    supernet = build_supernet(load_space(_write(tmp_path, _tiny_cfg()))).train()
    arch = supernet.space.min_arch()  # embed 16 of 24, depth 1 of 2, 1 head of 2
    loss = supernet(torch.randn(4, 3, 32, 32), arch).logsumexp(-1).mean()
    loss.backward()
    assert supernet.head.weight.grad[:, :16].abs().sum() > 0
    assert supernet.head.weight.grad[:, 16:].abs().sum() == 0
    assert supernet.layers[0].attn.qkv.weight.grad[3 * 8:].abs().sum() == 0
    assert supernet.layers[1].mlp.fc1.weight.grad is None
    with torch.no_grad():
        teacher = supernet.eval()(torch.ones(1, 3, 32, 32))
        assert torch.equal(teacher, supernet(torch.ones(1, 3, 32, 32), supernet.space.max_arch()))


def test_extracted_subnet_is_plain_torch(tmp_path):
    supernet = build_supernet(load_space(_write(tmp_path, _tiny_cfg())))
    subnet = supernet.extract(supernet.space.max_arch())
    assert not [m for m in subnet.modules() if type(m).__name__.startswith("Dynamic")]
    assert subnet.block_keys[1] == "autoformer.block(tokens=5,dim=24,heads=2,head_dim=8,hidden=48,qkv_bias=1)"
