"""Routers of seed 002 §3.4 (confidence, learned, difficulty): scores, static/ONNX equivalence,
learnability, the Gumbel / straight-through relaxations, and fitting a router to one pair."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _biglittle_tiny import tiny_space
from torch.utils.data import DataLoader, TensorDataset

from raynas.biglittle.coupling import CoupledSupernet
from raynas.biglittle.evaluate import EvalData, fit_router
from raynas.biglittle.routers import (
    CASCADE,
    PRE,
    DifficultyFeatures,
    DifficultyRouter,
    LearnedRouter,
    build_router,
    confidence_score,
    gumbel_decision,
    straight_through_decision,
)
from raynas.errors import ConfigError
from raynas.hw.onnx_export import export_onnx


def test_confidence_score_is_little_max_softmax():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e2 = np.exp(2.0)
    np.testing.assert_allclose(confidence_score(logits).numpy(), [e2 / (e2 + 2), 1 / 3], rtol=1e-6)
    router = build_router("confidence", max_in=8)
    assert router.stage == CASCADE and not router.trainable and router.cost(8) == {"params": 0, "macs": 0}


@pytest.mark.parametrize("name", ["learned", "difficulty"])
def test_pre_routers_static_and_onnx_match(name, tmp_path):
    torch.manual_seed(0)
    router = build_router(name, max_in=24, hidden=8)
    assert router.stage == PRE and router.trainable
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.3)
    for channels in (12, 24):  # the dynamic first layer slices to the active channels
        h = torch.randn(5, channels, 4, 4)
        static = router.static(channels).eval()
        score = static(h)
        assert score.shape == (5, 1) and bool(((score > 0) & (score < 1)).all())
        torch.testing.assert_close(score.squeeze(1), torch.sigmoid(router(h)), atol=1e-6, rtol=0)
        result = export_onnx(static, (1, channels, 4, 4), tmp_path / f"{name}{channels}.onnx")
        assert result["max_abs_diff"] < 1e-5


def test_router_costs_count_their_linear_layers():
    from raynas.supernets.counting import count_cost

    learned = LearnedRouter(max_in=24, hidden=8)
    assert count_cost(learned.static(16), (1, 16, 4, 4)) == learned.cost(16)
    difficulty = DifficultyRouter()
    assert count_cost(difficulty.static(16), (1, 16, 4, 4)) == difficulty.cost(16)


def test_difficulty_features_are_bounded_and_track_spread():
    torch.manual_seed(0)
    flat = torch.ones(1, 8, 4, 4)                   # uniform energy: maximal spatial entropy
    peaked = torch.zeros(1, 8, 4, 4)
    peaked[0, :, 0, 0] = 5.0                        # all energy in one place: zero spatial entropy
    f = DifficultyFeatures()(torch.cat([flat, peaked, torch.randn(3, 8, 4, 4)]))
    assert f.shape == (5, DifficultyFeatures.num_features) and torch.isfinite(f).all()
    assert f[0, 0] == pytest.approx(1.0, abs=1e-4) and f[1, 0] == pytest.approx(0.0, abs=1e-4)
    assert bool(((f[:, :2] >= -1e-6) & (f[:, :2] <= 1 + 1e-6)).all())   # normalised entropies
    assert bool(((f[:, 4] >= 0) & (f[:, 4] <= 1)).all())                # fraction of positives
    assert f[1, 5] > f[0, 5]                                             # energy spread (CV) larger when peaked


@pytest.mark.parametrize("name", ["learned", "difficulty"])
def test_pre_routers_learn_an_easy_hard_split(name):
    """Inputs whose features are 'busy' (high variance) are hard; a router learns to tell them apart."""
    torch.manual_seed(0)
    n = 256
    hard = torch.rand(n) < 0.5
    scale = torch.where(hard, 3.0, 0.3).view(n, 1, 1, 1)
    h = torch.randn(n, 8, 4, 4) * scale + torch.where(hard, 0.0, 1.0).view(n, 1, 1, 1)
    target = (~hard).float()  # little suffices on the easy ones
    router = build_router(name, max_in=8, hidden=16)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(150):
        loss = F.binary_cross_entropy_with_logits(router(h), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = float(((router(h) > 0).float() == target).float().mean())
    assert accuracy > 0.9


def test_relaxed_decisions_are_hard_forward_soft_backward():
    torch.manual_seed(0)
    logit = torch.tensor([-8.0, 8.0, 0.3], requires_grad=True)
    for decide in (lambda z: gumbel_decision(z, 0.5), straight_through_decision):
        g = decide(logit)
        assert set(g.detach().tolist()) <= {0.0, 1.0}
        assert g[0].item() == 0.0 and g[1].item() == 1.0      # saturated logits decide deterministically
        (g * torch.tensor([1.0, 1.0, 1.0])).sum().backward()
        assert logit.grad is not None and logit.grad[2] > 0   # the relaxed gradient reaches the logit
        logit.grad = None
    # the Gumbel sample is stochastic: p(1) ~ sigmoid(logit)
    z = torch.full((4000,), 0.8)
    assert float(gumbel_decision(z).mean()) == pytest.approx(float(torch.sigmoid(z[0])), abs=0.03)


def test_build_router_names_the_field():
    with pytest.raises(ConfigError, match="router"):
        build_router("magic", max_in=8)
    with pytest.raises(ConfigError, match="router_hidden"):
        build_router("learned", max_in=8, hidden=0)


@pytest.mark.parametrize("coupling", ["nested", "partial"])
def test_fit_router_specialises_to_a_pair(coupling):
    torch.manual_seed(0)
    space = tiny_space()
    model = CoupledSupernet(space, coupling, router="learned", router_hidden=8)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(96, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (96,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    data = EvalData(loader, loader, 64)
    pair = model.pair_space.extreme_pair()
    before = [p.detach().clone() for p in model.router.parameters()]
    supernet_before = [p.detach().clone() for p in model.big_net.parameters()]
    out = fit_router(model, pair, data, loader, epochs=3)
    assert set(out) == {"router_fit_loss", "router_fit_acc", "oracle_little_share"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.router.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(supernet_before, model.big_net.parameters()))
    assert fit_router(CoupledSupernet(space, coupling, router="confidence"), pair, data, loader) == {}
