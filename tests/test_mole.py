"""TAS-LoRA Mixture-of-LoRA-Experts (seed 003): merge, freezing, router warm-up, Ray Train run, checkpoints."""

import copy
import math

import numpy as np
import pytest
import torch
import yaml

from raynas import storage
from raynas.errors import ConfigError
from raynas.nn.lora import BLOCK_TARGETS, LSTMRouter, MoLELinear
from raynas.space import load_space
from raynas.supernets import build_supernet, supernet_kwargs
from raynas.supernets.checkpoint import load_supernet, save_supernet
from raynas.supernets.counting import count_cost
from raynas.supernets.mole import attach_mole
from raynas.train.mole import MoLEStrategy
from raynas.train.strategies.base import StepContext

# A tiny AutoFormer variant: 2x2 patches of 16 px at resolution 32, two blocks at most.
TINY = {"name": "af-mole-tiny", "family": "autoformer", "resolution": 32, "num_classes": 10, "patch_size": 16,
        "head_dim": 8, "qkv_bias": True, "global_pool": "mean", "embed_dim": [16, 24], "depth": [1, 2],
        "num_heads": [1, 2], "mlp_ratio": [1.5, 2.0]}
SMALL_ROUTER = {"rank": 2, "alpha": 2.0, "router_embed": 16, "router_hidden": 8}


@pytest.fixture
def space_path(tmp_path):
    path = tmp_path / "af-mole-tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture
def pretrained(space_path, tmp_path):
    """A saved plain supernet of the tiny space (the checkpoint `mole` fine-tunes)."""
    torch.manual_seed(0)
    net = build_supernet(load_space(space_path))
    return save_supernet(net, tmp_path / "pretrained.pt"), net


def _archs(space, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(n)]


def _perturbed(net, seed=1):
    """Non-zero experts and a non-trivial router, so merged weights differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.mole_layers():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)
        for p in net.router.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def test_expert_counts_are_the_papers_groups():
    """TAS-LoRA §4.1.2: experts = heads x MLP ratios x embed dims: T 12, S 27, B 18."""
    for name, groups in (("autoformer-t", 12), ("autoformer-s", 27), ("autoformer-b", 18)):
        spec = load_space(name).spec
        router = LSTMRouter(spec.num_heads, spec.mlp_ratios, spec.embed_dims, num_experts=groups, embed=4,
                            hidden=4, init="groupwise", init_bias=3.0)
        assert router.num_groups == groups, name


def test_fresh_experts_leave_the_supernet_unchanged(space_path):
    torch.manual_seed(0)
    net = build_supernet(load_space(space_path)).eval()
    x = torch.randn(3, 3, 32, 32)
    archs = _archs(net.space)
    with torch.no_grad():
        before = [net(x, a) for a in archs]
    mole = attach_mole(net, SMALL_ROUTER).eval()
    assert mole.num_experts == 2 * 2 * 2
    assert all(isinstance(m, MoLELinear) for m in (net.head, net.layers[0].attn.qkv, net.layers[1].mlp.fc2))
    with torch.no_grad():
        for a, ref in zip(archs, before):
            assert torch.equal(mole(x, a), ref)  # B = 0: every expert starts as a no-op


def test_groupwise_router_initialisation(space_path):
    """Zero head weights, bias delta on the group's expert: each block starts on its group's expert."""
    mole = attach_mole(build_supernet(load_space(space_path)), {**SMALL_ROUTER, "init_bias": 3.0})
    router, e = mole.router, mole.num_experts
    expected_top = math.exp(3.0) / (math.exp(3.0) + e - 1)
    seen = set()
    with torch.no_grad():
        for arch in _archs(mole.space, n=12):
            attributes = mole.block_attributes(arch)
            gates, head = router(attributes)
            assert gates.shape == (len(attributes), len(BLOCK_TARGETS), e)
            groups = router.groups_of(attributes).tolist()
            for i, g in enumerate(groups):
                assert (gates[i].argmax(dim=-1) == router.expert_of_group(g)).all()
                assert torch.allclose(gates[i].max(dim=-1).values, torch.tensor(expected_top), atol=1e-6)
                seen.add(router.expert_of_group(g))
            assert head.argmax().item() == router.expert_of_group(groups[-1])
    assert len(seen) > 1  # different groups go to different experts
    random_init = attach_mole(build_supernet(load_space(space_path)), {**SMALL_ROUTER, "router_init": "random"})
    assert random_init.router.block_weight.abs().sum() > 0


@pytest.mark.parametrize("mode", ["branch", "merged"])
def test_merged_subnet_equals_unmerged_forward(space_path, mode):
    """extract(arch) merges the routed LoRA mixture into plain nn.Linear weights: same outputs, base shapes."""
    torch.manual_seed(0)
    base = build_supernet(load_space(space_path)).eval()
    base_copy = copy.deepcopy(base)
    mole = _perturbed(attach_mole(base, SMALL_ROUTER)).eval()
    mole.set_forward_mode(mode)  # branch: W x + sum_e g_e B_e A_e x (eq. 4); merged: one linear (eq. 8)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for arch in _archs(mole.space, n=6):
            unmerged = mole(x, arch)
            sub = mole.extract(arch)
            assert torch.allclose(sub(x), unmerged, atol=1e-5, rtol=0), arch.to_json()
            assert not torch.allclose(base_copy(x, arch), unmerged, atol=1e-3)  # LoRA really changes it
            assert not any(isinstance(m, MoLELinear) for m in sub.modules())
            plain = base_copy.extract(arch)
            assert [b.shape for b in sub.parameters()] == [b.shape for b in plain.parameters()]
            assert mole.cost(arch) == count_cost(sub, (1, 3, 32, 32)) == base_copy.cost(arch)


def _context(module, optimizers):
    return StepContext(module, module, optimizers, device=torch.device("cpu"), amp_dtype=None,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=0.0, grad_clip=None,
                       world_size=1)


def test_training_step_freezes_base_and_router_during_warmup(space_path, pretrained):
    path, _ = pretrained
    options = MoLEStrategy.validate_options({"init_from": str(path), "warmup_epochs": 1, **SMALL_ROUTER})
    space = load_space(space_path)
    strategy = MoLEStrategy(space, options, seed=0)
    torch.manual_seed(0)
    module = strategy.prepare_model(build_supernet(space))
    from raynas.train.optim import optimizer_factory

    make = optimizer_factory({"name": "adamw", "lr": 1e-2, "momentum": 0.9, "nesterov": False,
                              "weight_decay": 0.05, "betas": [0.9, 0.999], "decay_norm_and_bias": False})
    optimizers = strategy.configure_optimizers(module, make)
    assert {id(p) for g in optimizers["lora"].param_groups for p in g["params"]} == \
        {id(p) for p in module.lora_parameters()}
    ctx = _context(module, optimizers)
    base0 = {n: p.detach().clone() for n, p in module.supernet.named_parameters() if not n.endswith(("_a", "_b"))}
    router0 = [p.detach().clone() for p in module.router_parameters()]
    lora_b0 = [m.lora_b.detach().clone() for m in module.mole_layers()]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    module.train()

    ctx.epoch = 0  # warm-up: experts only
    metrics = strategy.train_step(x, y, ctx)
    assert metrics["router_frozen"] == 1.0 and math.isfinite(metrics["loss"])
    assert all(torch.equal(p, p0) for p, p0 in zip(module.router_parameters(), router0))
    assert any(not torch.equal(m.lora_b, b0) for m, b0 in zip(module.mole_layers(), lora_b0))

    ctx.epoch = 1  # after warm-up: experts and router
    metrics = strategy.train_step(x, y, ctx)
    assert metrics["router_frozen"] == 0.0
    assert any(not torch.equal(p, p0) for p, p0 in zip(module.router_parameters(), router0))
    for n, p in module.supernet.named_parameters():
        if n in base0:
            assert torch.equal(p, base0[n]), f"frozen base weight {n} changed"
            assert not p.requires_grad and p.grad is None


def test_options_are_validated(space_path, pretrained, tmp_path):
    path, _ = pretrained
    with pytest.raises(ConfigError, match="init_from: missing"):
        MoLEStrategy.validate_options({})
    with pytest.raises(ConfigError, match="does not exist"):
        MoLEStrategy.validate_options({"init_from": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match="router_init"):
        MoLEStrategy.validate_options({"init_from": str(path), "router_init": "fancy"})
    with pytest.raises(ConfigError, match="experts: unknown field"):
        MoLEStrategy.validate_options({"init_from": str(path), "experts": 3})
    nb201 = save_supernet(build_supernet(load_space("nb201", resolution=32, num_classes=10)), tmp_path / "nb.pt")
    with pytest.raises(ConfigError, match="'nb201' supernet"):
        MoLEStrategy.validate_options({"init_from": str(nb201)})
    with pytest.raises(ConfigError, match="applies to families"):
        MoLEStrategy.check_space(load_space("nb201"))
    # A checkpoint of another resolution is refused by name, not by a tensor-size traceback.
    options = MoLEStrategy.validate_options({"init_from": str(path)})
    other = load_space(space_path, resolution=64)
    with pytest.raises(ConfigError, match="resolution 32"):
        MoLEStrategy(other, options, 0).prepare_model(build_supernet(other))


def test_checkpoint_round_trip_keeps_experts_and_router(space_path, tmp_path):
    torch.manual_seed(0)
    mole = _perturbed(attach_mole(build_supernet(load_space(space_path)), {**SMALL_ROUTER, "init_bias": 2.0}))
    x = torch.randn(2, 3, 32, 32)
    arch = mole.space.sample(np.random.default_rng(3))
    mole.eval()
    with torch.no_grad():
        ref = mole(x, arch)
    # with the build kwargs stored (what the core's save should write) and with only the state dict
    with_kwargs = save_supernet(mole, tmp_path / "a.pt", extra={"supernet_kwargs": supernet_kwargs(mole)})
    bare = save_supernet(mole, tmp_path / "b.pt")
    for path in (with_kwargs, bare):
        loaded = load_supernet(path)
        assert loaded.config == mole.config and loaded.num_experts == mole.num_experts
        for (n, a), (m, b) in zip(mole.state_dict().items(), loaded.state_dict().items()):
            assert n == m and (a == b if n == "_extra_state" else torch.equal(a, b)), n
        with torch.no_grad():
            assert torch.equal(loaded(x, arch), ref)
            assert torch.allclose(loaded.extract(arch)(x), ref, atol=1e-5, rtol=0)
    state = torch.load(with_kwargs, weights_only=True)
    assert state["supernet_kwargs"] == {"mole": mole.config}
    with pytest.raises(ValueError, match="MoLE checkpoint was built with"):
        attach_mole(build_supernet(load_space(space_path)), SMALL_ROUTER).load_state_dict(state["model"])


def test_mole_run_on_ray_train_with_two_workers(ray_local, space_path, pretrained, tmp_path):
    from raynas.train.trainer import train

    path, base = pretrained
    cfg = {
        "name": "mole-tiny", "storage_path": str(tmp_path / "runs"), "space": str(space_path),
        "epochs": 2, "steps_per_epoch": 2, "seed": 0,
        "strategy": {"name": "mole", "init_from": str(path), "warmup_epochs": 1, **SMALL_ROUTER},
        "data": {"name": "digits", "batch_size": 8, "eval_batch_size": 64, "max_val_samples": 64},
        "optimizer": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.05},
        "scheduler": {"name": "cosine", "warmup_epochs": 1},
        "eval": {"bn_samples": 16, "num_random": 1},
        "scaling": {"num_workers": 2},
    }
    result = train(cfg, quiet=True)
    rows = result.metrics().sort_values("epoch")
    assert rows["epoch"].tolist() == [1, 2] and (rows["world_size"] == 2).all()
    assert (rows["steps"] == 2).all() and rows["global_step"].tolist() == [2, 4]
    assert rows["router_frozen"].tolist() == [1.0, 0.0]  # one warm-up epoch with the router frozen
    assert rows[["teacher_acc", "min_acc", "max_acc", "random_acc"]].notna().all().all()

    trained = load_supernet(result.supernet_path)
    fresh = attach_mole(copy.deepcopy(base), trained.config)
    for (n, p), (_, q) in zip(trained.supernet.named_parameters(), fresh.supernet.named_parameters()):
        if n.endswith("lora_b"):
            continue
        if not n.endswith("lora_a"):
            assert torch.equal(p, q), f"frozen base weight {n} changed in Ray Train"
    assert any(m.lora_b.abs().sum() > 0 for m in trained.mole_layers())
    assert any(not torch.equal(p, q) for p, q in zip(trained.router.parameters(), fresh.router.parameters()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for arch in _archs(trained.space, n=2):
            assert torch.allclose(trained.extract(arch)(x), trained(x, arch), atol=1e-5, rtol=0)
    # every epoch checkpoint holds the MoLE parts too
    epoch_ckpt = load_supernet(storage.join(result.checkpoint_dir, "supernet.pt"))
    assert torch.equal(epoch_ckpt.router.block_bias, trained.router.block_bias)


def test_example_configs_are_valid(tmp_path):
    """pipelines/configs/train_mole_pretrain.yaml then train_mole.yaml (its init_from pointed at a checkpoint)."""
    from pathlib import Path

    from raynas.train.config import load_train_config
    from raynas.train.trainer import plan_run

    configs = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
    pre = plan_run(load_train_config(configs / "train_mole_pretrain.yaml", {"storage_path": str(tmp_path)}))
    assert pre.space.name == "autoformer-t" and pre.num_classes == 10
    ckpt = save_supernet(build_supernet(pre.space), tmp_path / pre.cfg["name"] / "supernet.pt")
    plan = plan_run(load_train_config(configs / "train_mole.yaml",
                                      {"storage_path": str(tmp_path), "strategy.init_from": str(ckpt)}))
    options = plan.cfg["strategy"]
    assert options["name"] == "mole" and options["rank"] == 8 and options["init_bias"] == 3.0
    assert plan.space.resolution == pre.space.resolution
