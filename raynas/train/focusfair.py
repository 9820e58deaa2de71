"""`focusfair`: supernet-teacher distillation with Focus-Fair sampling (seed 000, §3.3 and Algorithm 1).

Per batch:
  1. the teacher, the full supernet mixing every op by softmax(beta) (DARTS eq. 5), learns from the
     labels; weights and beta are updated, weight decay on this update only (BigNAS);
  2. K subnets (K = number of ops) drawn by Focus-Fair sampling learn from the teacher's soft labels
     only (KL, no label loss); their gradients add up and the weights are updated without weight decay.

Focus-Fair sampling: on every topology dimension (an edge of nb201, a block position of khyper-uib)
the K paths take the ops in an order drawn without replacement with probabilities softmax(beta/tau)
over the ops not yet taken (Algorithm 1), so every op is trained exactly once per round (FairNAS)
while high-beta ops tend to come first, i.e. to be combined in the same paths: the subnet of the
best ops is trained whole more often (the paper's example: 30% instead of 11.1%). Size dimensions
(channels, depth, kernels of khyper-uib) are drawn FairNAS-style, a fresh permutation per round.

Warm-up (configurable): `equal` keeps the Kshot-Hypernet coefficients lambda exactly uniform (and the
sampling uniform) for `warmup_epochs` (NB201 recipe); `anneal` divides them by a temperature falling
linearly from `anneal_from` to `anneal_to` (ImageNet recipe: 30 -> 1 over 10 epochs); `none`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raynas.errors import ConfigError
from raynas.space import Arch, SearchSpace
from raynas.supernets.hypernet import check_topology_supernet, find_hypernet, topology_dims
from raynas.train.losses import accuracy, label_loss, soft_target_loss
from raynas.train.strategies.base import StepContext, Strategy

WARMUP_MODES = ("equal", "anneal", "none")


# ---- the sampler -------------------------------------------------------------------------------------
def focus_fair_order(probs: np.ndarray, rng: np.random.Generator) -> list[int]:
    """One round on one dimension: indices of all choices, drawn one at a time without replacement,
    each draw with the remaining choices' probabilities renormalised (Algorithm 1's inner loop)."""
    remaining = list(range(len(probs)))
    weights = np.asarray(probs, dtype=np.float64)
    order = []
    while remaining:
        p = weights[remaining]
        total = p.sum()
        p = p / total if total > 0 else np.full(len(remaining), 1.0 / len(remaining))
        pick = int(rng.choice(len(remaining), p=p))
        order.append(remaining.pop(pick))
    return order


def focus_fair_columns(space: SearchSpace, topology_probs: Mapping[str, np.ndarray], rng: np.random.Generator,
                       num_paths: int) -> dict[str, list[Any]]:
    """The choice of every dimension for each of `num_paths` paths (before canonicalisation).

    Topology dimensions (keys of `topology_probs`, probabilities over the dimension's choices in
    order) follow Focus-Fair rounds; the others FairNAS permutations. Rounds repeat while
    `num_paths` exceeds a dimension's choices and the last one is cut.
    """
    columns = {}
    for d in space.dims:
        probs = topology_probs.get(d.name)
        order: list[int] = []
        while len(order) < num_paths:
            order += (focus_fair_order(probs, rng) if probs is not None else list(rng.permutation(d.size)))
        columns[d.name] = [d.choices[i] for i in order[:num_paths]]
    return columns


def focus_fair_paths(space: SearchSpace, topology_probs: Mapping[str, np.ndarray], rng: np.random.Generator,
                     num_paths: int | None = None) -> list[Arch]:
    """Focus-Fair subnets of one step, in draw order (the first is the most beta-focused)."""
    if num_paths is None:
        num_paths = max(len(p) for p in topology_probs.values())
    columns = focus_fair_columns(space, topology_probs, rng, num_paths)
    return [space.validate({name: col[i] for name, col in columns.items()}) for i in range(num_paths)]


def sampling_probs(supernet: torch.nn.Module, temperature: float) -> dict[str, np.ndarray]:
    """softmax(beta / tau) per topology dimension, columns in the dimension's choice order."""
    beta = supernet.arch_params.detach().float().cpu()
    probs = torch.softmax(beta / temperature, dim=-1).numpy().astype(np.float64) if math.isfinite(temperature) \
        else np.full(tuple(beta.shape), 1.0 / beta.shape[-1])
    return dict(zip(topology_dims(supernet), probs))


# ---- the warm-up schedule ------------------------------------------------------------------------------
def warmup_temperature(options: Mapping[str, Any], progress: float) -> float:
    """Temperature multiplier at `progress` epochs into training: inf = equal coefficients."""
    mode, epochs = options["warmup"], float(options["warmup_epochs"])
    if mode == "none" or progress >= epochs:
        return 1.0 if mode != "anneal" else float(options["anneal_to"])
    if mode == "equal":
        return math.inf
    start, end = float(options["anneal_from"]), float(options["anneal_to"])
    return start + (end - start) * progress / epochs


@contextlib.contextmanager
def no_weight_decay(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Step `optimizer` without weight decay (the students' update), restoring the groups' values."""
    saved = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["weight_decay"] = 0.0
    try:
        yield
    finally:
        for g, wd in zip(optimizer.param_groups, saved):
            g["weight_decay"] = wd


# ---- the strategy --------------------------------------------------------------------------------------
class FocusFairStrategy(Strategy):
    """Seed 000 Algorithm 1 on a topology supernet (optionally with a Kshot-Hypernet attached)."""

    name = "focusfair"
    FAMILIES = ("nb201", "uib")
    DEFAULTS = {
        "temperature": 1.5,         # tau of the sampling weights softmax(beta / tau)
        "paths_per_step": 0,        # K subnets per step; 0: the number of ops (one round)
        "kd_temperature": 1.0,      # softening of teacher and student logits in the KL loss
        "mean_student_loss": False,  # average the K distillation losses instead of summing (FairNAS sums)
        "warmup": "equal",          # equal (NB201 recipe) | anneal (ImageNet recipe) | none
        "warmup_epochs": 5.0,
        "anneal_from": 30.0,
        "anneal_to": 1.0,
        "warmup_sampling": True,    # the warm-up temperature also flattens the sampling weights
        # beta's own optimizer: Adam as in DARTS (lr 3e-4, betas (0.5, 0.999), weight decay 1e-3)
        "arch_lr": 3e-4,
        "arch_betas": [0.5, 0.999],
        "arch_weight_decay": 1e-3,
    }

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        positive = ("temperature", "kd_temperature", "anneal_from", "anneal_to", "arch_lr")
        for key in positive:
            if not options[key] > 0:
                raise ConfigError(f"{where}.{key}: expected a number > 0, got {options[key]!r}")
        if options["warmup"] not in WARMUP_MODES:
            raise ConfigError(f"{where}.warmup: {options['warmup']!r} is not allowed; allowed: {list(WARMUP_MODES)}")
        if options["warmup_epochs"] < 0:
            raise ConfigError(f"{where}.warmup_epochs: expected a number >= 0, got {options['warmup_epochs']!r}")
        if options["paths_per_step"] < 0:
            raise ConfigError(f"{where}.paths_per_step: expected an integer >= 0 (0 = number of ops), "
                              f"got {options['paths_per_step']!r}")
        if options["arch_weight_decay"] < 0:
            raise ConfigError(f"{where}.arch_weight_decay: expected a number >= 0, "
                              f"got {options['arch_weight_decay']!r}")
        betas = options["arch_betas"]
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                        for b in betas)):
            raise ConfigError(f"{where}.arch_betas: expected two numbers in [0, 1), got {betas!r}")

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        super().__init__(space, options, seed)
        self.num_paths = 0  # known once the supernet (its ops) is seen in prepare_model

    # ---- model and optimizers --------------------------------------------------------------------
    def prepare_model(self, supernet: torch.nn.Module) -> torch.nn.Module:
        check_topology_supernet(supernet, "strategy")
        num_ops = len(supernet.op_names())
        k = self.options["paths_per_step"] or num_ops
        if k < num_ops:
            raise ConfigError(f"strategy.paths_per_step: {k} paths cannot visit all {num_ops} ops of space "
                              f"'{self.space.name}' once per step; use >= {num_ops} or 0 (automatic)")
        self.num_paths = k
        return supernet

    def configure_optimizers(self, model, make_optimizer):
        beta = model.arch_params
        weights = [p for p in model.parameters() if p is not beta]
        arch = torch.optim.Adam([beta], lr=self.options["arch_lr"], betas=tuple(self.options["arch_betas"]),
                                weight_decay=self.options["arch_weight_decay"])
        return {"main": make_optimizer(weights), "arch": arch}

    # ---- one step --------------------------------------------------------------------------------
    def temperatures(self, ctx: StepContext) -> tuple[float, float]:
        """(lambda temperature, sampling temperature) at this step (warm-up included)."""
        progress = ctx.epoch + ctx.step / max(1, ctx.steps_per_epoch)
        warm = warmup_temperature(self.options, progress)
        sampling = self.options["temperature"] * (warm if self.options["warmup_sampling"] else 1.0)
        return warm, sampling

    def sample_paths(self, supernet: torch.nn.Module, sampling_temperature: float) -> list[Arch]:
        probs = sampling_probs(supernet, sampling_temperature)
        return focus_fair_paths(self.space, probs, self.rng, self.num_paths or None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        coefficient_t, sampling_t = self.temperatures(ctx)
        hypernet = find_hypernet(ctx.module)
        if hypernet is not None:
            hypernet.set_coefficient_temperature(coefficient_t)
        # Sample before the teacher update: the paths follow the beta the soft labels were made with.
        paths = self.sample_paths(ctx.module, sampling_t)

        teacher_logits, teacher_loss = ctx.forward_backward(x, None, label_loss(y, ctx.label_smoothing))
        ctx.optimizer_step("main", "arch")  # weights and beta, with weight decay

        kd = soft_target_loss(teacher_logits, self.options["kd_temperature"])
        scale = 1.0 / len(paths) if self.options["mean_student_loss"] else 1.0
        student_losses = []
        for i, arch in enumerate(paths):
            _, loss = ctx.forward_backward(x, arch, kd, sync=i == len(paths) - 1, scale=scale)
            student_losses.append(float(loss))
        with no_weight_decay(ctx.optimizers["main"]):
            ctx.optimizer_step("main")

        beta_probs = ctx.module.arch_weights().detach()
        return {
            "loss": float(teacher_loss) + sum(student_losses) * scale,
            "teacher_loss": float(teacher_loss),
            "teacher_train_acc": accuracy(teacher_logits, y),
            "student_kd_loss": sum(student_losses) / len(student_losses),
            "beta_max_prob": float(beta_probs.max(dim=-1).values.mean()),
        }


def paths_visit_every_op(paths: Sequence[Arch], dims: Sequence[str], ops: Sequence[str]) -> bool:
    """Whether, on every dimension in `dims`, the paths take every op exactly once (one round)."""
    return all(sorted(p[d] for p in paths) == sorted(ops) for d in dims)


__all__ = ["FocusFairStrategy", "WARMUP_MODES", "focus_fair_columns", "focus_fair_order", "focus_fair_paths",
           "no_weight_decay", "paths_visit_every_op", "sampling_probs", "warmup_temperature"]
