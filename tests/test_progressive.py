"""OFA progressive shrinking (phases sample only released dims; the phase is a function of the epoch, also
after a resume) and feature distillation (attention transfer between stage outputs) for `sandwich` and the
big/little joint loss, on a tiny mbv3 at 32 px."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _biglittle_tiny import TINY

from raynas.errors import ConfigError
from raynas.space import load_space, space_from_config
from raynas.supernets import build_supernet
from raynas.train.samplers import ProgressiveSchedule, hold
from raynas.train.strategies import build_strategy
from raynas.train.strategies.base import StepContext
from raynas.train.strategies.distill import feature_loss

PHASES = {"phases": ["full", "kernel", "depth", "width"], "epochs": [1, 1, 2, 1]}


@pytest.fixture(scope="module")
def space():
    return space_from_config({**TINY, "resolution": 32})


def _ctx(model):
    opt = {"main": torch.optim.AdamW(model.parameters(), lr=3e-3)}
    return StepContext(model, model, opt, device=torch.device("cpu"), amp_dtype=None,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=0.1, grad_clip=None,
                       world_size=1)


# ---- the schedule --------------------------------------------------------------------------------
def test_mbv3_declares_its_groups(space):
    groups = space.progressive_groups()
    assert list(groups) == ["kernel", "depth", "width"]
    grouped = [d for dims in groups.values() for d in dims]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(space.dim_names) - {"resolution"}
    assert all(d.endswith(".kernel") for d in groups["kernel"]) and "width" in groups["width"]


def test_phase_is_a_function_of_the_epoch(space):
    schedule = ProgressiveSchedule.of(space, PHASES, "strategy.progressive")
    assert [schedule.phase(e) for e in range(6)] == [0, 1, 2, 2, 3, 3]  # past the end: the last phase
    groups = space.progressive_groups()
    every = set(d for dims in groups.values() for d in dims)
    assert schedule.held(0) == every
    assert schedule.held(1) == every - set(groups["kernel"])
    assert schedule.held(3) == set(groups["width"])
    assert schedule.held(4) == set()


@pytest.mark.parametrize("name", ["uniform", "sandwich", "biglittle"])
def test_each_phase_samples_only_the_released_dims(space, name):
    options = {"name": name, "progressive": PHASES, **({"num_random": 3} if name != "uniform" else {})}
    strategy = build_strategy(options, space, seed=0)
    if name == "biglittle":
        strategy.prepare_model(build_supernet(space))
        ps = strategy.model.pair_space
        members = lambda arch: [ps.big(arch), ps.little(arch)]  # noqa: E731
    else:
        members = lambda arch: [arch]  # noqa: E731
    groups = space.progressive_groups()
    released: set[str] = set()
    for epoch, phase in enumerate(["full", "kernel", "depth", "depth", "width"]):
        released |= set(groups.get(phase, ()))
        held = strategy.held_dims(epoch)
        assert held == {d for dims in groups.values() for d in dims} - released
        seen = {d: set() for d in space.dim_names}
        for _ in range(60):
            for arch in (a for step_arch in strategy.archs(epoch) for a in members(step_arch)):
                assert hold(space, arch, held) == arch  # held dims at their largest wherever they act
                for d in space.dim_names:
                    seen[d].add(arch[d])
        for d in space.dim_names:
            if d in released and space.dim(d).size > 1:
                assert seen[d] == set(space.dim(d).choices), (phase, d)
            if d in held and phase in ("full", "kernel"):  # depth held at its largest: every block acts
                assert seen[d] == {space.dim(d).choices[-1]}, (phase, d)


def test_resumed_strategy_continues_in_the_phase_of_its_epoch(space, tmp_path):
    strategy = build_strategy({"name": "sandwich", "progressive": PHASES}, space, seed=0)
    strategy.archs(0)
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    resumed = build_strategy({"name": "sandwich", "progressive": PHASES}, space, seed=7)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for epoch in (2, 3):
        assert resumed.held_dims(epoch) == strategy.held_dims(epoch) == set(space.progressive_groups()["width"])
        assert resumed.archs(epoch) == strategy.archs(epoch)  # same sampler state, same phase


def test_progressive_errors_are_one_line(space, tiny_nb201_yaml):
    from raynas.train.config import validate_train_config

    nb201 = load_space(tiny_nb201_yaml)
    with pytest.raises(ConfigError) as info:
        build_strategy({"name": "sandwich", "progressive": PHASES}, nb201, seed=0)
    assert str(info.value) == ("strategy.progressive: space 'nb201-tiny' (family 'nb201') declares no "
                               "progressive-shrinking groups; allowed: families ['mbv3']")
    for bad, field in [({"phases": ["kernel", "depth"], "epochs": [1, 1]}, r"progressive\.phases: got"),
                       ({"phases": ["kernel", "full", "depth", "width"], "epochs": [1] * 4}, "'full' first"),
                       ({"phases": ["kernel", "depth", "width"], "epochs": [1, 1]}, r"progressive\.epochs"),
                       ({"phases": ["kernel", "depth", "width"], "epochs": [1, 0, 1]}, r"epochs\[1\]"),
                       ({"phases": ["kernel"], "epochs": [1], "when": 2}, r"progressive\.when: unknown")]:
        with pytest.raises(ConfigError, match=field):
            build_strategy({"name": "uniform", "progressive": bad}, space, seed=0)
    with pytest.raises(ConfigError, match=r"strategy\.progressive: unknown field"):  # fair draws its own paths
        build_strategy({"name": "fair", "progressive": PHASES}, space, seed=0)
    base = {"space": "mbv3-biglittle", "data": {"name": "digits"}, "epochs": 4,
            "strategy": {"name": "sandwich", "progressive": PHASES}}
    with pytest.raises(ConfigError, match=r"^strategy\.progressive\.epochs: the phases last 5 epochs, the run 4;"):
        validate_train_config(base)


def test_plan_refuses_progressive_on_other_families_before_compute(tiny_nb201_yaml, tmp_path):
    from raynas.train.trainer import plan_run

    cfg = {"space": tiny_nb201_yaml, "name": "t", "storage_path": str(tmp_path), "data": {"name": "digits"},
           "epochs": 5, "strategy": {"name": "uniform", "progressive": PHASES}}
    with pytest.raises(ConfigError, match=r"^strategy\.progressive: .*family 'nb201'.*allowed: families \['mbv3'\]$"):
        plan_run(cfg)
    cfg["strategy"] = {"name": "sandwich", "distill": "logits+features"}
    with pytest.raises(ConfigError, match=r"^strategy\.distill: 'logits\+features' needs stage features.*\['mbv3'\]$"):
        plan_run(cfg)


# ---- feature distillation ---------------------------------------------------------------------------
def test_stage_features_leave_the_logits_unchanged(space):
    torch.manual_seed(0)
    net = build_supernet(space).eval()
    x = torch.randn(2, 3, 32, 32)
    for seed in range(3):
        arch = space.sample(np.random.default_rng(seed))
        logits, stages = net(x, arch, features=True)
        assert torch.equal(logits, net(x, arch))
        assert len(stages) == len(space.structure.stages)
        assert stages[-1].shape[1] == net.plan(arch).head.in_ch  # the last stage feeds the head


def test_feature_loss_is_zero_for_the_teacher_itself_and_trains_the_student(space):
    torch.manual_seed(0)
    net = build_supernet(space).train()
    x = torch.randn(4, 3, 32, 32)
    _, teacher = net(x, space.max_arch(), features=True)
    teacher = [t.detach() for t in teacher]
    assert float(feature_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    _, student = net(x, space.min_arch(), features=True)
    loss = feature_loss(student, teacher)
    assert float(loss) > 1e-4
    loss.backward()
    assert net.stem.conv.weight.grad.abs().sum() > 0  # gradients reach the student's (shared) weights
    # widths and spatial sizes may differ (attention maps need no projection; maps are pooled)
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 24, 2, 2)
    assert float(feature_loss([a], [b])) >= 0
    with pytest.raises(ValueError, match="detached"):
        feature_loss(student, [s.detach().requires_grad_() for s in student])


@pytest.mark.parametrize("distill", ["none", "logits", "logits+features"])
@pytest.mark.parametrize("progressive", [False, True])
def test_sandwich_trains_with_each_option(space, distill, progressive):
    torch.manual_seed(0)
    options = {"name": "sandwich", "num_random": 1, "distill": distill, "feature_weight": 2.0}
    if progressive:
        options["progressive"] = PHASES
    strategy = build_strategy(options, space, seed=0)
    model = strategy.prepare_model(build_supernet(space))
    ctx = _ctx(model)
    ctx.epoch = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    m = strategy.train_step(x, y, ctx)
    assert np.isfinite(m["loss"]) and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    kind = "label" if distill == "none" else "kd"
    w = 2.0 if distill == "logits+features" else 0.0
    assert m["loss"] == pytest.approx(m["teacher_loss"] + 2 * (m[f"student_{kind}_loss"]
                                                               + w * m.get("student_feature_loss", 0.0)))
    assert ("student_feature_loss" in m) == (distill == "logits+features")
    assert m.get("progressive_phase") == (1.0 if progressive else None)


def test_feature_distillation_under_mixed_precision(space):
    """Autocast passes give bf16 stage outputs; the losses see fp32 copies (CPU autocast stands in for a GPU)."""
    torch.manual_seed(0)
    strategy = build_strategy({"name": "sandwich", "num_random": 0, "distill": "logits+features"}, space, seed=0)
    model = strategy.prepare_model(build_supernet(space))
    ctx = _ctx(model)
    ctx.amp_dtype = torch.bfloat16
    m = strategy.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), ctx)
    assert np.isfinite(m["loss"]) and m["student_feature_loss"] > 0


@pytest.mark.parametrize("distill,coupling", [("none", "nested"), ("logits", "sibling"),
                                              ("logits+features", "nested"), ("logits+features", "partial")])
def test_biglittle_trains_with_each_option(space, distill, coupling):
    torch.manual_seed(0)
    strategy = build_strategy({"name": "biglittle", "coupling": coupling, "distill": distill, "num_random": 1,
                               "progressive": PHASES}, space, seed=0)
    model = strategy.prepare_model(build_supernet(space))
    ctx = _ctx(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for epoch in (1, 4):
        strategy.on_epoch_start(epoch, 5)
        ctx.epoch = epoch
        m = strategy.train_step(x, y, ctx)
        assert np.isfinite(m["loss"]) and m["progressive_phase"] == {1: 1.0, 4: 3.0}[epoch]
    assert (m["kd"] == 0.0) == (distill == "none")
    assert ("feature_kd" in m) == (distill == "logits+features")
    if "feature_kd" in m:
        assert m["feature_kd"] > 0


# ---- through Ray Train: DDP over two workers, the phases of the real loop ----------------------------------
def test_progressive_feature_distillation_trains_through_ray_train(ray_local, tmp_path):
    """Stage features go through the DDP wrapper's forward (its gradient sync is prepared there), and the
    loop's epochs select the phases (a resumed run enters the loop at its epoch, as tested above)."""
    from raynas.train.trainer import train

    space_yaml = tmp_path / "tiny.yaml"
    space_yaml.write_text(yaml.safe_dump({**TINY, "resolution": 32}))
    cfg = {"name": "prog", "storage_path": str(tmp_path / "runs"), "space": str(space_yaml),
           "data": {"name": "digits", "batch_size": 8, "max_train_samples": 32, "max_val_samples": 16,
                    "eval_batch_size": 16},
           "strategy": {"name": "sandwich", "num_random": 1, "distill": "logits+features",
                        "progressive": {"phases": ["kernel", "depth", "width"], "epochs": [1, 1, 1]}},
           "epochs": 3, "steps_per_epoch": 1, "eval": {"every": 0}, "scaling": {"num_workers": 2}}
    result = train(cfg, quiet=True)
    metrics = pd.read_parquet(result.metrics_path).sort_values("epoch")
    assert list(metrics["progressive_phase"]) == [0.0, 1.0, 2.0] and list(metrics["world_size"]) == [2, 2, 2]
    assert (metrics["student_feature_loss"] > 0).all()


def test_learning_rate_restarts_at_each_progressive_phase():
    """OFA restarts the schedule per phase: the rate is back at its peak when a phase begins and decayed to
    the floor just before the next one; without progressive shrinking the cosine spans the whole run."""
    from raynas.train.optim import WarmupCosine

    steps = 10  # per epoch; phases of 3, 3 and 6 epochs
    fn = WarmupCosine(total_steps=12 * steps, warmup_steps=steps, min_ratio=0.0, restarts=(3 * steps, 6 * steps))
    assert fn(0) == pytest.approx(0.1) and fn(steps) == pytest.approx(1.0)  # warm-up, then the first cosine
    for start, end in ((3 * steps, 6 * steps), (6 * steps, 12 * steps)):
        assert fn(start) == pytest.approx(1.0)
        assert fn(end - 1) < 0.02
        assert fn((start + end) // 2) == pytest.approx(0.5, abs=0.06)
    whole = WarmupCosine(total_steps=12 * steps, warmup_steps=steps, min_ratio=0.0)
    assert whole(3 * steps) < 1.0 and whole(6 * steps) == pytest.approx(
        0.5 * (1 + np.cos(np.pi * 50 / 110)))
