"""BatchNorm recalibration and subnet evaluation (the evaluator actors' entry point), on digits read through
Ray Data (raynas.data)."""

import numpy as np
import torch
from torch import nn

from raynas.data import Batches, Normalizer, eval_dataset, normalization
from raynas.space import load_space
from raynas.supernets import build_supernet
from raynas.train.bn import batchnorm_layers, evaluate_subnet, preserved_bn_stats, recalibrate_bn


class ConvBN(nn.Module):
    """A plain nn.BatchNorm2d net with the supernet call signature."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x, arch=None):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_recalibration_is_the_cumulative_average_over_exactly_num_samples():
    torch.manual_seed(0)
    net = ConvBN()
    data = torch.randn(50, 3, 6, 6) * 3 + 1
    loader = [(data[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 50, 8)]
    recalibrate_bn(net, None, loader, num_samples=20)  # batches of 8, 8, then 4 of the third
    assert not net.training and net.bn.momentum == 0.1  # eval mode, momentum restored
    with torch.no_grad():
        feats = [net.conv(data[a:b]) for a, b in ((0, 8), (8, 16), (16, 20))]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net.bn.running_mean, expected_mean)
    torch.testing.assert_close(net.bn.running_var, expected_var)
    assert all(p.grad is None for p in net.parameters())


def _batches(cfg, split, space, batch_size=64):
    """An evaluation split as re-iterable normalised batches, in a fixed order."""
    return Batches(eval_dataset(cfg, split, space.resolution, space.in_channels), batch_size, "cpu",
                   Normalizer(*normalization(cfg, space.in_channels)))


def test_recalibration_changes_supernet_statistics_per_subnet(ray_local, tiny_nb201_yaml):
    torch.manual_seed(0)
    space = load_space(tiny_nb201_yaml)
    net = build_supernet(space)
    loader = _batches({"name": "digits"}, "train", space)
    before = [m.running_mean.clone() for m in batchnorm_layers(net)]
    recalibrate_bn(net, space.max_arch(), loader, 128)
    after_max = [m.running_mean.clone() for m in batchnorm_layers(net)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after_max))
    recalibrate_bn(net, space.max_arch(), loader, 128)  # deterministic
    assert all(torch.equal(a, m.running_mean) for a, m in zip(after_max, batchnorm_layers(net)))
    recalibrate_bn(net, space.sample(np.random.default_rng(1)), loader, 128)
    assert any(not torch.equal(a, m.running_mean) for a, m in zip(after_max, batchnorm_layers(net)))


def test_evaluate_subnet_accuracy_and_preserved_stats(ray_local, tiny_nb201_yaml):
    torch.manual_seed(0)
    space = load_space(tiny_nb201_yaml)
    net = build_supernet(space).train()
    bn_loader = _batches({"name": "digits"}, "train", space)
    val_loader = _batches({"name": "digits", "max_val_samples": 100}, "val", space)
    arch = space.max_arch()
    snapshot = [m.running_var.clone() for m in batchnorm_layers(net)]
    with preserved_bn_stats(net):
        acc = evaluate_subnet(net, arch, bn_loader, val_loader, bn_samples=256)
    assert net.training and all(torch.equal(s, m.running_var) for s, m in zip(snapshot, batchnorm_layers(net)))
    assert 0.0 <= acc <= 1.0
    # The same number by hand: recalibrate, then count.
    recalibrate_bn(net, arch, bn_loader, 256)
    with torch.no_grad():
        correct = sum(int((net(x, arch).argmax(1) == y).sum()) for x, y in val_loader)
    assert acc == correct / 100
