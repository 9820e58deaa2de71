"""Input-adaptive routers of seed 002 §3.4 behind one interface: an "ease" score in [0, 1] per input;
an input goes to the little model when its score >= tau, else to the big one.

  * `confidence` (cascade): little runs first; score = its max softmax probability.
  * `learned` (pre-routing): a small MLP on the pooled features after the shared stem/trunk decides
    before either model runs. Trained first on oracle targets (is little correct?), then through a
    Gumbel-softmax or straight-through relaxation of the hard decision (see raynas.biglittle.train).
  * `difficulty` (pre-routing): hand-made statistics of those features (spatial and channel entropy,
    spread, sparsity) feed a logistic classifier of easy vs hard.

Pre-routers read features whose channel count varies with the pair (width, split); their first layer
is a `DynamicLinear` sliced to the active channels, like every other layer of the supernet.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raynas.errors import ConfigError
from raynas.nn.dynamic import DynamicLinear

ROUTERS = ("confidence", "learned", "difficulty")
PRE, CASCADE = "pre", "cascade"
EPS = 1e-6


def confidence_score(little_logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability of the little model (the cascade's acceptance score)."""
    return F.softmax(little_logits.float(), dim=-1).max(dim=-1).values


class Router(nn.Module):
    """Base: `stage` says when it decides (`pre`: on trunk features; `cascade`: on little's output)."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = PRE
    trainable: ClassVar[bool] = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Logit of "little suffices" per input, shape (B,)."""
        raise NotImplementedError

    def static(self, in_channels: int) -> nn.Module:  # pragma: no cover
        """Plain module: features (B, C, H, W) -> score (B, 1) in [0, 1], ONNX-exportable."""
        raise NotImplementedError

    def cost(self, in_channels: int) -> dict[str, int]:
        return {"params": 0, "macs": 0}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage}


class ConfidenceRouter(Router):
    name, stage, trainable = "confidence", CASCADE, False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the confidence router scores little's output: use confidence_score(logits)")


class _ScoreHead(nn.Module):
    """Static router: features -> sigmoid(logit) as (B, 1)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(features))


class LearnedRouter(Router):
    """Global average pool -> Linear(C, hidden) -> ReLU -> Linear(hidden, 1)."""

    name = "learned"

    def __init__(self, max_in: int, hidden: int = 32):
        super().__init__()
        self.max_in, self.hidden = max_in, hidden
        self.fc1 = DynamicLinear(max_in, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.float().mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(pooled))).squeeze(-1)

    @torch.no_grad()
    def static(self, in_channels: int) -> nn.Module:
        fc2 = nn.Linear(self.hidden, 1)
        fc2.load_state_dict(self.fc2.state_dict())
        return _ScoreHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.fc1.static(in_channels),
                                        nn.ReLU(), fc2))

    def cost(self, in_channels: int) -> dict[str, int]:
        h = self.hidden
        return {"params": in_channels * h + h + h + 1, "macs": in_channels * h + h}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hidden": self.hidden}


class DifficultyFeatures(nn.Module):
    """Six bounded statistics of a feature map that track how "busy" (hard) an input looks.

    spatial entropy of the per-location energy and channel entropy of the pooled magnitudes (both
    normalised to [0, 1]), log(1 + std), log(1 + mean |h|), fraction of positive activations, and
    log(1 + coefficient of variation of the energy map). Written with basic ops so it exports to ONNX.
    """

    num_features = 6

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        b, c = h.shape[0], h.shape[1]
        hw = h.shape[2] * h.shape[3]
        energy = (h * h).mean(dim=1).reshape(b, hw)
        p = energy / (energy.sum(dim=1, keepdim=True) + EPS)
        spatial_entropy = -(p * torch.log(p + EPS)).sum(dim=1) / math.log(max(hw, 2))
        magnitude = h.abs().mean(dim=(2, 3))
        q = magnitude / (magnitude.sum(dim=1, keepdim=True) + EPS)
        channel_entropy = -(q * torch.log(q + EPS)).sum(dim=1) / math.log(max(c, 2))
        flat = h.reshape(b, -1)
        mean = flat.mean(dim=1, keepdim=True)
        std = ((flat - mean) ** 2).mean(dim=1).sqrt()
        mean_abs = flat.abs().mean(dim=1)
        positive = (flat > 0).float().mean(dim=1)
        e_mean = energy.mean(dim=1, keepdim=True)
        e_std = ((energy - e_mean) ** 2).mean(dim=1).sqrt()
        cv = e_std / (e_mean.squeeze(1) + EPS)
        return torch.stack([spatial_entropy, channel_entropy, torch.log1p(std), torch.log1p(mean_abs), positive,
                            torch.log1p(cv)], dim=1)


class DifficultyRouter(Router):
    """Logistic classifier (easy vs hard) on `DifficultyFeatures`."""

    name = "difficulty"

    def __init__(self):
        super().__init__()
        self.features = DifficultyFeatures()
        self.linear = nn.Linear(DifficultyFeatures.num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(features)).squeeze(-1)

    @torch.no_grad()
    def static(self, in_channels: int) -> nn.Module:
        linear = nn.Linear(DifficultyFeatures.num_features, 1)
        linear.load_state_dict(self.linear.state_dict())
        return _ScoreHead(nn.Sequential(DifficultyFeatures(), linear))

    def cost(self, in_channels: int) -> dict[str, int]:
        n = DifficultyFeatures.num_features
        return {"params": n + 1, "macs": n}


def build_router(name: str, max_in: int, hidden: int = 32) -> Router:
    if name == "confidence":
        return ConfidenceRouter()
    if name == "learned":
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ConfigError(f"router_hidden: expected an integer >= 1, got {hidden!r}")
        return LearnedRouter(max_in, hidden)
    if name == "difficulty":
        return DifficultyRouter()
    raise ConfigError(f"router: {name!r} is not allowed; allowed: {list(ROUTERS)}")


# ---- relaxations of the hard decision (router training after the oracle warm start) -------------
def gumbel_decision(logit: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hard 0/1 sample of Bernoulli(sigmoid(logit)) with the binary Gumbel-softmax (logistic noise)
    gradient: forward is the hard decision, backward the relaxed one (straight-through Gumbel)."""
    u = torch.rand_like(logit).clamp(EPS, 1 - EPS)
    soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
    return (soft > 0.5).float() - soft.detach() + soft


def straight_through_decision(logit: torch.Tensor) -> torch.Tensor:
    """Hard threshold of sigmoid(logit) at 0.5 forward, sigmoid's gradient backward."""
    soft = torch.sigmoid(logit)
    return (soft > 0.5).float() - soft.detach() + soft
