"""Accuracy predictor χ (SCAN-Edge, seed 004 App. C): a 1-D convolution over padded one-hot encodings.

Each decision of the arch becomes one row: the one-hot of its choice, padded to the widest dimension.
The rows, in the space's order (stage by stage, block by block), form a (num_dims x width) matrix that
a stack of 1-D convolutions reads along the network, followed by linear layers that output accuracy.
Trained with L1 loss; among a few candidates (seeds/widths) the one with the highest Spearman rank
correlation on held-out evaluated subnets is kept, because search only needs the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from raynas.space import Arch, SearchSpace


def one_hot_matrix(space: SearchSpace, archs: Sequence[Arch]) -> torch.Tensor:
    width = max(d.size for d in space.dims)
    idx = torch.from_numpy(np.stack([space.encode(a) for a in archs]))  # (n, num_dims)
    out = torch.zeros(len(archs), width, len(space.dims))  # channels = one-hot width, length = dims
    out.scatter_(1, idx.unsqueeze(1), 1.0)
    return out


class AccuracyPredictorNet(nn.Module):
    def __init__(self, width: int, length: int, channels: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(width, channels, 3, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * length, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x)).squeeze(-1)


class AccuracyPredictor:
    def __init__(self, space: SearchSpace, candidates: int = 3, epochs: int = 300, lr: float = 3e-3,
                 seed: int = 0):
        self.space, self.candidates, self.epochs, self.lr, self.seed = space, candidates, epochs, lr, seed
        self.net: AccuracyPredictorNet | None = None
        self.spearman: float = float("nan")
        self._scale = (0.0, 1.0)

    def _train_one(self, x: torch.Tensor, y: torch.Tensor, seed: int, channels: int) -> AccuracyPredictorNet:
        torch.manual_seed(seed)
        net = AccuracyPredictorNet(x.shape[1], x.shape[2], channels)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=1e-4)
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = nn.functional.l1_loss(net(x), y)
            loss.backward()
            opt.step()
        return net.eval()

    def fit(self, archs: Sequence[Arch], accuracies: Sequence[float]) -> AccuracyPredictor:
        x = one_hot_matrix(self.space, archs)
        acc = torch.tensor(accuracies, dtype=torch.float32)
        mean, std = float(acc.mean()), float(acc.std().clamp_min(1e-6)) if len(acc) > 1 else 1.0
        self._scale = (mean, std)
        y = (acc - mean) / std
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(archs))
        n_val = max(2, len(archs) // 5) if len(archs) >= 10 else 0
        val, train = order[:n_val], order[n_val:]
        best, best_rho = None, -np.inf
        for c in range(self.candidates):
            net = self._train_one(x[train], y[train], seed=self.seed * 100 + c, channels=(16, 32, 64)[c % 3])
            if n_val:
                with torch.no_grad():
                    rho = spearmanr(net(x[val]).numpy(), y[val].numpy()).statistic
                rho = -np.inf if np.isnan(rho) else rho
            else:
                rho = 0.0
            if best is None or rho > best_rho:  # rho is -inf when undefined (e.g. tied accuracies)
                best, best_rho = net, rho
        # The chosen architecture is refitted on all data: the held-out split only chose it.
        channels = dict(zip((16, 32, 64), range(3)))
        chosen_channels = best.conv[0].out_channels
        self.net = self._train_one(x, y, seed=self.seed * 100 + channels[chosen_channels], channels=chosen_channels)
        self.spearman = float(best_rho) if n_val and np.isfinite(best_rho) else float("nan")
        return self

    @torch.no_grad()
    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("predictor is not fitted")
        mean, std = self._scale
        return (self.net(one_hot_matrix(self.space, archs)) * std + mean).numpy()
