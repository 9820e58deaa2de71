"""Evaluating a pair of a coupled supernet: BatchNorm recalibration per model, predictions on a labelled
set, static pieces for deployment, and fitting a pre-router to one chosen pair.

BatchNorm. In `nested` coupling big and little run through the same (weight-shared) BN layers, so their
statistics cannot be calibrated at once: big is recalibrated and run, then little (and the router, which
reads little's stem or the shared stem). In `sibling`/`partial` the branches live in separate supernets
and the trunk is one computation, so one recalibration pass over the pair calibrates everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas.biglittle.coupling import CoupledSupernet, PairPieces
from raynas.biglittle.metrics import PairPredictions
from raynas.biglittle.routers import PRE
from raynas.space import Arch
from raynas.train.bn import recalibrate_bn


@dataclass
class EvalData:
    """Fixed BN-recalibration images and a labelled evaluation set (both in a fixed order): re-iterable
    batches of materialized Ray Datasets (raynas.data)."""

    bn_loader: Iterable
    val_loader: Iterable
    bn_samples: int


def eval_data(data_cfg: Mapping[str, Any] | None, resolution: int, in_channels: int = 3, bn_samples: int = 512,
              batch_size: int = 256, split: str = "val") -> EvalData:
    from raynas.data import Batches, Normalizer, eval_dataset, normalization

    bn = eval_dataset(data_cfg, "train", resolution, in_channels, num_samples=bn_samples, seed=0)
    target = eval_dataset(data_cfg, split, resolution, in_channels)
    normalize = Normalizer(*normalization(data_cfg, in_channels))
    return EvalData(Batches(bn, batch_size, "cpu", normalize), Batches(target, batch_size, "cpu", normalize),
                    bn.count())


def _router_score(model: CoupledSupernet, logit: torch.Tensor | None) -> torch.Tensor | None:
    return torch.sigmoid(logit) if (logit is not None and model.router.stage == PRE) else None


@torch.no_grad()
def _run(model: CoupledSupernet, pair: Arch, loader: Iterable, run_big: bool, run_little: bool) -> dict:
    out: dict[str, list] = {"labels": [], "big": [], "little": [], "score": []}
    for x, y in loader:
        o = model.forward_pair(x, pair, run_big=run_big, run_little=run_little)
        out["labels"].append(y)
        if run_big:
            out["big"].append(o.big)
        if run_little:
            out["little"].append(o.little)
            score = _router_score(model, o.router_logit)
            if score is not None:
                out["score"].append(score)
    return {k: torch.cat(v).numpy() if v else None for k, v in out.items()}


@torch.no_grad()
def predict_pair(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData) -> PairPredictions:
    """Both models' logits and the router's score on `data.val_loader`, each model BN-recalibrated.
    Leaves the model in eval mode with little's statistics (nested) or the pair's (otherwise)."""
    pair = model.pair_space.validate(pair)
    model.eval()
    if model.coupling == "nested":
        lay = model.layout(pair)
        recalibrate_bn(model, lay.big, data.bn_loader, data.bn_samples)
        big = _run(model, pair, data.val_loader, run_big=True, run_little=False)
        recalibrate_bn(model, lay.little, data.bn_loader, data.bn_samples)
        little = _run(model, pair, data.val_loader, run_big=False, run_little=True)
        return PairPredictions(big["labels"], big["big"], little["little"], little["score"])
    recalibrate_bn(model, pair, data.bn_loader, data.bn_samples)
    both = _run(model, pair, data.val_loader, run_big=True, run_little=True)
    return PairPredictions(both["labels"], both["big"], both["little"], both["score"])


@torch.no_grad()
def deployable_pieces(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData
                      ) -> tuple[PairPieces, nn.Module | None]:
    """Static trunk / little / big pieces (and the static router) with BN calibrated per model."""
    pair = model.pair_space.validate(pair)
    model.eval()
    if model.coupling == "nested":
        lay = model.layout(pair)
        recalibrate_bn(model, lay.big, data.bn_loader, data.bn_samples)
        big = model.extract_pieces(pair, which=("big",)).big
        recalibrate_bn(model, lay.little, data.bn_loader, data.bn_samples)
        pieces = model.extract_pieces(pair, which=("trunk", "little"))
        pieces.big = big
    else:
        recalibrate_bn(model, pair, data.bn_loader, data.bn_samples)
        pieces = model.extract_pieces(pair)
    return pieces, model.static_router(pair)


@torch.no_grad()
def _router_training_set(model: CoupledSupernet, pair: Arch, data: EvalData, loader: Iterable
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router input features and oracle targets (little right, or big wrong too) on `loader`."""
    lay = model.layout(pair)
    if model.coupling == "nested":
        recalibrate_bn(model, lay.big, data.bn_loader, data.bn_samples)
        big_right = torch.cat([(model(x, lay.big).argmax(-1) == y) for x, y in loader])
        recalibrate_bn(model, lay.little, data.bn_loader, data.bn_samples)
    else:
        recalibrate_bn(model, pair, data.bn_loader, data.bn_samples)
        big_right = None
    feats, little_right, big_parts = [], [], []
    for x, y in loader:
        t = model.trunk(x, lay)
        feats.append(model.router_features(x, t, lay))
        little_right.append(model.little_logits(x, t, lay).argmax(-1) == y)
        if big_right is None:
            big_parts.append(model.big_logits(x, t, lay).argmax(-1) == y)
    big_right = big_right if big_right is not None else torch.cat(big_parts)
    target = torch.cat(little_right) | ~big_right
    return torch.cat(feats), target.float()


def fit_router(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData, loader: Iterable,
               epochs: int = 50, lr: float = 0.01, weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Fit the pre-router to one pair (supernet frozen) on `loader`'s images with the oracle targets:
    a pair chosen by search gets a router specialised to it. Returns the final training loss/accuracy."""
    if model.router.stage != PRE:
        return {}
    pair = model.pair_space.validate(pair)
    model.eval()
    feats, target = _router_training_set(model, pair, data, loader)
    router = model.router
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(target)
    batch = min(256, n)
    # class balance: the oracle target is mostly "little" on easy data; weight the rare class up
    pos = float(target.mean().clamp(1e-3, 1 - 1e-3))
    weight = torch.where(target > 0, torch.tensor(0.5 / pos), torch.tensor(0.5 / (1 - pos)))
    router.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss = F.binary_cross_entropy_with_logits(router(feats[idx]), target[idx], weight=weight[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    router.eval()
    with torch.no_grad():
        logit = router(feats)
        loss = float(F.binary_cross_entropy_with_logits(logit, target, weight=weight))
        acc = float(((logit > 0).float() == target).float().mean())
    return {"router_fit_loss": loss, "router_fit_acc": acc, "oracle_little_share": float(target.mean())}

