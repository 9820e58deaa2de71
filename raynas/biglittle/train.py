"""Co-training strategies for big/little pairs (plugged into the Ray Train loop of raynas.train).

`biglittle`: the joint loss of seed 002 §3.3 with sandwich sampling and in-place distillation:

    L = CE(big) + alpha * CE(little) + beta * KD(little <- big, T) + gamma * L_router

per pair, over the sandwich pair (largest big, smallest little) and `num_random` random pairs of the
coupling's pair space each step; gradients of all pairs add up into one optimizer step. The teacher of
in-place distillation is the pair's own big output of the same forward pass, detached (US-Nets/BigNAS).
Label smoothing applies to big's CE only (the one label-trained model, as in `sandwich`).

L_router trains a learned/difficulty router on the trunk features (detached by default, so routing
never distorts the shared features):
  * warm start (first `router_warmup` of the epochs, and always for `difficulty`): BCE against the
    oracle target "little is correct" (or big is wrong too: then little loses nothing);
  * then (learned router): the hard decision g in {0, 1} relaxed by `router_estimator` (Gumbel-softmax
    or straight-through), L_router = mean(g * CE_little + (1 - g) * CE_big) with both CEs detached,
    plus `cost_weight` * mean(g * MACs(little) + (1 - g) * MACs(big)) / MACs(big), the optional cost
    term (NACHOS-style), which pushes easy inputs to little.
The confidence router has no parameters: L_router = 0.

`distill` (raynas.train.strategies.distill): `logits` is the beta KD term above; `none` drops it;
`logits+features` adds `feature_weight` * attention-transfer loss between big's and little's stage
outputs (big's detached, like its logits). `progressive` (OFA progressive shrinking): in each phase
both members of every sampled pair draw only the dims released so far (the others at their largest).

`single-arch`: trains one fixed architecture alone (label CE): the independently trained models of the
seed's critical baseline (an independently trained cascade of the same two architectures).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from raynas.biglittle.coupling import CoupledSupernet, unpack
from raynas.biglittle.pairspace import BIG, COUPLINGS, LITTLE
from raynas.biglittle.routers import ROUTERS, confidence_score, gumbel_decision, straight_through_decision
from raynas.errors import ConfigError
from raynas.space import Arch, SearchSpace
from raynas.train.losses import accuracy, label_loss, soft_target_loss
from raynas.train.samplers import smallest_arch, uniform_arch
from raynas.train.strategies.base import StepContext, Strategy
from raynas.train.strategies.distill import DISTILL_DEFAULTS, check_distill, feature_loss, uses_features, uses_logits

ESTIMATORS = ("gumbel", "ste")


def _nonneg(options: dict, key: str, where: str) -> None:
    if options[key] < 0:
        raise ConfigError(f"{where}.{key}: expected a number >= 0, got {options[key]}")


class BigLittleStrategy(Strategy):
    name = "biglittle"
    FAMILIES = ("mbv3",)
    DEFAULTS = {
        "coupling": "nested", "splits": None, "router": "learned", "router_hidden": 32,
        "alpha": 1.0, "beta": 1.0, "gamma": 0.5, "temperature": 2.0, "cost_weight": 0.0,
        "router_warmup": 0.5, "router_estimator": "gumbel", "gumbel_temperature": 1.0,
        "detach_router_input": True, "num_random": 1,
        # reporting only: the routed accuracy per step is measured at this threshold, and
        # score = routed_acc - score_cost_penalty * E[MACs] / MACs(big) (what `raynas tune` ranks)
        "tau": 0.5, "score_cost_penalty": 0.1,
        **DISTILL_DEFAULTS,
    }
    PROGRESSIVE = True

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        if options["coupling"] not in COUPLINGS:
            raise ConfigError(f"{where}.coupling: {options['coupling']!r} is not allowed; allowed: {list(COUPLINGS)}")
        if options["router"] not in ROUTERS:
            raise ConfigError(f"{where}.router: {options['router']!r} is not allowed; allowed: {list(ROUTERS)}")
        if options["router_estimator"] not in ESTIMATORS:
            raise ConfigError(f"{where}.router_estimator: {options['router_estimator']!r} is not allowed; "
                              f"allowed: {list(ESTIMATORS)}")
        splits = options["splits"]
        if splits is not None and not (isinstance(splits, list) and all(
                isinstance(s, int) and not isinstance(s, bool) for s in splits)):
            raise ConfigError(f"{where}.splits: expected a list of block-slot indices, got {splits!r}")
        for key in ("alpha", "beta", "gamma", "cost_weight", "score_cost_penalty"):
            _nonneg(options, key, where)
        for key in ("temperature", "gumbel_temperature"):
            if not options[key] > 0:
                raise ConfigError(f"{where}.{key}: expected a number > 0, got {options[key]}")
        for key in ("tau", "router_warmup"):
            if not 0 <= options[key] <= 1:
                raise ConfigError(f"{where}.{key}: expected a number in [0, 1], got {options[key]}")
        if options["num_random"] < 0:
            raise ConfigError(f"{where}.num_random: expected an integer >= 0, got {options['num_random']}")
        if options["router_hidden"] < 1:
            raise ConfigError(f"{where}.router_hidden: expected an integer >= 1, got {options['router_hidden']}")
        check_distill(options, where)

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        super().__init__(space, options, seed)
        self.model: CoupledSupernet | None = None
        self.relaxed = False

    # ---- model ---------------------------------------------------------------------------------
    def prepare_model(self, supernet):
        o = self.options
        dropout = float(supernet.head.dropout.p)  # rebuild the little supernet exactly like big's
        self.model = CoupledSupernet(self.space, o["coupling"], o["splits"], o["router"], o["router_hidden"],
                                     supernet_kwargs={"dropout": dropout}, big_net=supernet)
        self.model.pair_space.validate(self.model.pair_space.extreme_pair())  # fails early on bad splits
        return self.model

    def teacher_arch(self) -> Arch:
        return self.space.max_arch()

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        warm_epochs = math.ceil(self.options["router_warmup"] * num_epochs)
        self.relaxed = self.options["router"] == "learned" and epoch >= warm_epochs

    # ---- the joint loss --------------------------------------------------------------------------
    def joint_loss(self, y: torch.Tensor, label_smoothing: float, macs_little: float, macs_big: float,
                   parts: dict[str, float]):
        """loss_fn(packed pair logits) -> the joint loss; fills `parts` with its detached terms."""
        o, num_classes = self.options, self.space.num_classes
        router = self.model.router

        def loss_fn(packed: torch.Tensor, stages: tuple[list, list] | None = None) -> torch.Tensor:
            big, little, router_logit = unpack(packed, num_classes)
            ce_big = F.cross_entropy(big, y, label_smoothing=label_smoothing)
            ce_little_each = F.cross_entropy(little, y, reduction="none")
            ce_little = ce_little_each.mean()
            zero = torch.zeros((), device=packed.device)
            kd = soft_target_loss(big.detach(), o["temperature"])(little) if uses_logits(o) else zero
            router_loss = torch.zeros((), device=packed.device)
            if router.trainable:
                if self.relaxed:
                    if o["router_estimator"] == "gumbel":
                        g = gumbel_decision(router_logit, o["gumbel_temperature"])
                    else:
                        g = straight_through_decision(router_logit)
                    ce_big_each = F.cross_entropy(big.detach(), y, reduction="none")
                    router_loss = (g * ce_little_each.detach() + (1 - g) * ce_big_each).mean()
                    if o["cost_weight"]:
                        rel_cost = (g * macs_little + (1 - g) * macs_big) / max(macs_big, 1.0)
                        router_loss = router_loss + o["cost_weight"] * rel_cost.mean()
                else:
                    # oracle target: little is right (or big is wrong too, so little loses nothing)
                    oracle = ((little.detach().argmax(dim=-1) == y) | (big.detach().argmax(dim=-1) != y)).float()
                    router_loss = F.binary_cross_entropy_with_logits(router_logit, oracle)
            total = ce_big + o["alpha"] * ce_little + o["beta"] * kd + o["gamma"] * router_loss
            parts.update(ce_big=float(ce_big.detach()), ce_little=float(ce_little.detach()), kd=float(kd.detach()),
                         router_loss=float(router_loss.detach()))
            if stages is not None:  # distill: logits+features
                big_stages, little_stages = stages
                feature_kd = feature_loss(little_stages, [f.detach() for f in big_stages])
                total = total + o["feature_weight"] * feature_kd
                parts["feature_kd"] = float(feature_kd.detach())
            return total

        return loss_fn

    def routed_metrics(self, packed: torch.Tensor, y: torch.Tensor, macs_little: float, macs_big: float
                       ) -> dict[str, float]:
        """Training-batch estimate of the routed pair at `tau` (train-mode BN: indicative only)."""
        big, little, router_logit = unpack(packed, self.space.num_classes)
        if self.model.router.trainable:
            score = torch.sigmoid(router_logit)
        else:
            score = confidence_score(little)
        to_little = score >= self.options["tau"]
        routed = torch.where(to_little, little.argmax(-1), big.argmax(-1))
        ratio = float(to_little.float().mean())
        e_frac = (ratio * macs_little + (1 - ratio) * macs_big) / max(macs_big, 1.0)
        routed_acc = float((routed == y).float().mean())
        return {"big_train_acc": accuracy(big, y), "little_train_acc": accuracy(little, y),
                "routed_train_acc": routed_acc, "little_ratio": ratio, "e_macs_frac": e_frac,
                "score": routed_acc - self.options["score_cost_penalty"] * e_frac}

    def archs(self, epoch: int) -> list[Arch]:
        """The pairs one step of `epoch` trains: the sandwich pair (largest big, smallest little), then
        `num_random` random pairs; progressive shrinking holds the unreleased dims of both members."""
        ps = self.model.pair_space
        held = self.held_dims(epoch)
        if not held:
            return [ps.extreme_pair(self.rng), *(ps.sample(self.rng) for _ in range(self.options["num_random"]))]
        split = ps.extreme_pair(self.rng).get("split")  # the same draw as without shrinking
        extreme = ps.make(ps.base.max_arch(), smallest_arch(ps.base, held), split)
        pair_held = frozenset(prefix + d for d in held for prefix in (BIG, LITTLE))
        return [extreme, *(uniform_arch(ps, self.rng, pair_held) for _ in range(self.options["num_random"]))]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        self.model.detach_router_input = self.options["detach_router_input"]
        pairs = self.archs(ctx.epoch)
        features = uses_features(self.options)
        metrics: dict[str, float] = self.progress_metrics(ctx.epoch)
        total = 0.0
        for i, pair in enumerate(pairs):
            cost = self.model.cost_parts(pair)
            macs_little = float(cost["trunk"]["macs"] + cost["little"]["macs"])
            macs_big = float(cost["trunk"]["macs"] + cost["big"]["macs"])
            parts: dict[str, float] = {}
            loss_fn = self.joint_loss(y, ctx.label_smoothing, macs_little, macs_big, parts)
            if features:
                packed, _, loss = ctx.forward_backward_features(x, pair, loss_fn, sync=i == len(pairs) - 1)
            else:
                packed, loss = ctx.forward_backward(x, pair, loss_fn, sync=i == len(pairs) - 1)
            total += float(loss)
            if i == 0:  # the sandwich pair: its terms and routed accuracy are the logged ones
                metrics.update(parts)
                metrics.update(self.routed_metrics(packed, y, macs_little, macs_big))
        ctx.optimizer_step()
        metrics["loss"] = total
        metrics["router_relaxed"] = float(self.relaxed)
        return metrics


def parse_arch_option(space: SearchSpace, value: Any, where: str) -> Arch:
    """'max', 'min', an arch mapping, or its JSON text."""
    if value == "max":
        return space.max_arch()
    if value == "min":
        return space.min_arch()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}.arch: expected 'max', 'min' or an arch (JSON object), got {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.arch: expected 'max', 'min' or an arch (JSON object), got {value!r}")
    return space.validate(value)


class SingleArchStrategy(Strategy):
    """Train one architecture alone with label CE (independently trained baseline models)."""

    name = "single-arch"
    DEFAULTS = {"arch": "max"}

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        super().__init__(space, options, seed)
        self.arch = parse_arch_option(space, self.options["arch"], "strategy")

    def teacher_arch(self) -> Arch:
        return self.arch

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        logits, loss = ctx.forward_backward(x, self.arch, label_loss(y, ctx.label_smoothing))
        ctx.optimizer_step()
        return {"loss": float(loss), "train_acc": accuracy(logits, y)}
