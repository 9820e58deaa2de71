"""Couplings of seed 002 §3.2 (nested / sibling / partial): pair-space canonical form, each coupling's
forward against its extracted static pieces, exact piece costs, checkpoints, the joint-loss strategy."""

import numpy as np
import pytest
import torch
from _biglittle_tiny import tiny_space

from raynas.biglittle.coupling import ChannelPrefix, CoupledSupernet, load_coupled, save_coupled, unpack
from raynas.biglittle.pairspace import build_pair_space
from raynas.errors import ConfigError
from raynas.space import SpaceError
from raynas.supernets import build_supernet
from raynas.supernets.counting import count_cost
from raynas.train.strategies import build_strategy
from raynas.train.strategies.base import StepContext

COUPLINGS = ("nested", "sibling", "partial")


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def pairs_of(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    ps = model.pair_space
    return [ps.extreme_pair(rng)] + [ps.sample(rng) for _ in range(n - 1)]


# ---- the pair space ----------------------------------------------------------------------------
def test_nested_pairs_keep_little_inside_big(space, rng):
    ps = build_pair_space(space, "nested")
    for _ in range(50):
        pair = ps.sample(rng)
        big, little = ps.big(pair), ps.little(pair)
        for d in space.dims:
            assert d.index(little[d.name]) <= d.index(big[d.name]), d.name
    # mutation and crossover stay canonical, so equal networks hash equal
    a, b = ps.sample(rng), ps.sample(rng)
    for child in (ps.crossover(a, b, rng), ps.mutate(a, rng, 0.5), ps.decode(ps.encode(a))):
        assert ps.validate(dict(child)) == child
    # an unordered pair is put in order: the larger choice goes to big
    swapped = dict(a)
    swapped["big.width"], swapped["little.width"] = 0.5, 1.0
    assert ps.validate(swapped)["big.width"] == 1.0


def test_partial_shares_the_trunk_settings(space, rng):
    ps = build_pair_space(space, "partial", [2, 4])
    assert ps.dim("split").choices == (2, 4)
    for _ in range(50):
        pair = ps.sample(rng)
        big, little, split = ps.big(pair), ps.little(pair), ps.split(pair)
        assert little["resolution"] == big["resolution"]
        assert space.dim("width").index(little["width"]) <= space.dim("width").index(big["width"])
        for s in range(split // 2):  # 2 slots per stage in the tiny space: whole stages before the split
            assert little[f"stage{s + 1}.depth"] == big[f"stage{s + 1}.depth"]
            for j in range(2):
                assert little[f"stage{s + 1}.b{j}.kernel"] == big[f"stage{s + 1}.b{j}.kernel"]


def test_bad_couplings_and_splits_name_the_field(space):
    with pytest.raises(ConfigError, match="coupling"):
        build_pair_space(space, "glued")
    with pytest.raises(ConfigError, match="splits"):
        build_pair_space(space, "partial", [0])
    with pytest.raises(ConfigError, match="splits"):
        build_pair_space(space, "nested", [2])
    with pytest.raises(SpaceError, match="mbv3"):
        from raynas.space import load_space
        build_pair_space(load_space("nb201", resolution=32, num_classes=10), "nested")


# ---- forward vs extraction, costs ----------------------------------------------------------------
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_forward_matches_extracted_pieces_and_costs(space, coupling):
    torch.manual_seed(0)
    model = CoupledSupernet(space, coupling, splits=[2, 4] if coupling == "partial" else None,
                            router="learned").eval()
    x = torch.randn(3, 3, 16, 16)
    saw_prefix = False
    for pair in pairs_of(model, 6):
        packed = model(x, pair)
        big, little, router_logit = unpack(packed, 10)
        pieces = model.extract_pieces(pair)
        t = pieces.trunk(x) if pieces.trunk is not None else x
        torch.testing.assert_close(pieces.big(t), big, atol=1e-5, rtol=0)
        torch.testing.assert_close(pieces.little(t), little, atol=1e-5, rtol=0)
        features = t if pieces.trunk is not None else pieces.router_features(x)
        torch.testing.assert_close(model.static_router(pair)(features).squeeze(1), torch.sigmoid(router_logit),
                                   atol=1e-5, rtol=0)
        saw_prefix |= any(isinstance(m, ChannelPrefix) for m in pieces.little)
        # piece costs are exact (the FLOP counter of raynas.supernets.counting) and compose
        parts = model.cost_parts(pair)
        shape = (1, 3, 16, 16)
        if pieces.trunk is not None:
            assert count_cost(pieces.trunk, shape) == parts["trunk"]
            shape = tuple(pieces.trunk(torch.zeros(shape)).shape)
        assert count_cost(pieces.big, shape) == parts["big"]
        assert count_cost(pieces.little, shape) == parts["little"]
        lay = model.layout(pair)
        standalone_big = model.big_net.cost(lay.big)
        assert parts["trunk"]["macs"] + parts["big"]["macs"] == standalone_big["macs"]
        if coupling == "nested":
            assert parts["trunk"]["macs"] + parts["little"]["macs"] == model.big_net.cost(lay.little)["macs"]
    if coupling != "nested":
        assert saw_prefix, "some pair should have a narrower little reading the trunk's first channels"


def test_nested_little_is_the_supernet_subnet(space):
    """Nested: little's logits are exactly the shared supernet's subnet (one set of weights)."""
    torch.manual_seed(0)
    model = CoupledSupernet(space, "nested", router="confidence").eval()
    assert model.little_net is None
    x = torch.randn(2, 3, 16, 16)
    for pair in pairs_of(model, 4):
        _, little, _ = unpack(model(x, pair), 10)
        torch.testing.assert_close(little, model.big_net(x, model.pair_space.little(pair)), atol=1e-6, rtol=0)


def test_sibling_branches_have_their_own_weights(space):
    torch.manual_seed(0)
    model = CoupledSupernet(space, "sibling", router="difficulty")
    pair = model.pair_space.extreme_pair()
    x = torch.randn(4, 3, 16, 16)
    big, little, r = unpack(model(x, pair), 10)
    (little.sum() + r.sum()).backward()
    # little's loss reaches the shared stem and little's own blocks, never big's blocks or head
    assert model.big_net.stem.conv.weight.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in model.big_net.stages.parameters())
    assert model.little_net.head.classifier.weight.grad is not None
    assert model.little_net.stem.conv.weight.grad is None  # little's own stem is never used


def test_base_arch_runs_the_big_supernet(space):
    torch.manual_seed(0)
    model = CoupledSupernet(space, "partial", router="learned").eval()
    x = torch.randn(2, 3, 16, 16)
    arch = space.max_arch()
    torch.testing.assert_close(model(x, arch), model.big_net(x, arch))
    torch.testing.assert_close(model(x, None), model.big_net(x, None))


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_checkpoint_round_trip(space, coupling, tmp_path):
    torch.manual_seed(0)
    model = CoupledSupernet(space, coupling, router="learned", router_hidden=8).eval()
    path = save_coupled(model, tmp_path / "coupled.pt", extra={"epoch": 1})
    loaded = load_coupled(path)
    assert loaded.coupling == coupling and loaded.router.hidden == 8
    x = torch.randn(2, 3, 16, 16)
    pair = model.pair_space.extreme_pair()
    torch.testing.assert_close(loaded(x, pair), model(x, pair))


def test_plain_supernet_checkpoint_is_refused(space, tmp_path):
    from raynas.supernets.checkpoint import save_supernet

    path = save_supernet(build_supernet(space), tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="biglittle"):
        load_coupled(path)


def test_coupled_checkpoint_is_refused_as_a_plain_supernet(space, tmp_path):
    from raynas.supernets.checkpoint import CheckpointError, load_supernet

    path = save_coupled(CoupledSupernet(space, "nested"), tmp_path / "coupled.pt")
    with pytest.raises(CheckpointError, match="big/little"):
        load_supernet(path)


# ---- the joint-loss strategy -------------------------------------------------------------------
def _ctx(model):
    opt = {"main": torch.optim.AdamW(model.parameters(), lr=3e-3)}
    return StepContext(model, model, opt, device=torch.device("cpu"), amp_dtype=None,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=0.0, grad_clip=None,
                       world_size=1)


@pytest.mark.parametrize("coupling,router,estimator", [("nested", "learned", "gumbel"),
                                                       ("sibling", "confidence", "gumbel"),
                                                       ("partial", "difficulty", "ste"),
                                                       ("partial", "learned", "ste")])
def test_joint_loss_strategy_trains(space, coupling, router, estimator):
    torch.manual_seed(0)
    strategy = build_strategy({"name": "biglittle", "coupling": coupling, "router": router, "num_random": 1,
                               "router_estimator": estimator, "router_warmup": 0.5, "cost_weight": 0.1},
                              space, seed=0)
    model = strategy.prepare_model(build_supernet(space))
    ctx = _ctx(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    losses = []
    for epoch in range(2):  # epoch 0: oracle warm start; epoch 1: relaxed (learned router)
        strategy.on_epoch_start(epoch, 2)
        for _ in range(4):
            m = strategy.train_step(x, y, ctx)
            losses.append(m["ce_big"] + m["ce_little"])
    assert m["router_relaxed"] == float(router == "learned")
    for key in ("ce_big", "ce_little", "kd", "router_loss", "routed_train_acc", "little_ratio", "score"):
        assert np.isfinite(m[key]), key
    if router == "confidence":
        assert m["router_loss"] == 0.0
    assert losses[-1] < losses[0]  # it learns the (memorisable) batch
    state = strategy.state_dict()
    strategy.load_state_dict(state)


def test_strategy_options_are_validated(space):
    for bad, field in [({"coupling": "x"}, "coupling"), ({"router": "x"}, "router"), ({"alpha": -1.0}, "alpha"),
                       ({"tau": 1.5}, "tau"), ({"temperature": 0.0}, "temperature"), ({"splits": "2"}, "splits"),
                       ({"router_estimator": "reinforce"}, "router_estimator")]:
        with pytest.raises(ConfigError, match=field):
            build_strategy({"name": "biglittle", **bad}, space, seed=0)


def test_single_arch_strategy_trains_one_subnet(space):
    strategy = build_strategy({"name": "single-arch", "arch": "min"}, space, seed=0)
    assert strategy.teacher_arch() == space.min_arch()
    model = build_supernet(space)
    m = strategy.train_step(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)), _ctx(model))
    assert np.isfinite(m["loss"])
    with pytest.raises(SpaceError):
        build_strategy({"name": "single-arch", "arch": '{"width": 3}'}, space, seed=0)
