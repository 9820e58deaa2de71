"""Elastic layers with weight entanglement: every width/kernel choice slices one largest weight.

Each layer has `forward(x, ...)` taking the active sizes and `static(...)` returning a plain
PyTorch layer that holds a copy of exactly the sliced weights (used by `Supernet.extract`).
Input channels are always read from the incoming tensor, so a layer follows whatever the
previous layer produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


def _center_crop_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Smaller kernels are the centre of the largest one (OFA-style, without transform matrices)."""
    big = weight.shape[-1]
    if k == big:
        return weight
    start = (big - k) // 2
    return weight[..., start : start + k, start : start + k]


def fan_out_init(weight: torch.Tensor) -> None:
    """OFA's conv initialisation (He normal over the fan-out), the elastic convs' default."""
    nn.init.kaiming_normal_(weight, mode="fan_out")


def conv2d_default_init(weight: torch.Tensor) -> None:
    """nn.Conv2d's own initialisation, for a family whose reference trained plain torch convs (NAS-Bench-201)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class DynamicConv2d(nn.Module):
    """Conv whose output channels and (odd) kernel size are chosen per forward.

    `depthwise=True` makes groups equal to the active channel count (in == out).
    """

    def __init__(self, max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1,
                 depthwise: bool = False, bias: bool = False, dilation: int = 1,
                 init: Callable[[torch.Tensor], None] = fan_out_init):
        super().__init__()
        self.max_in, self.max_out, self.max_kernel = max_in, max_out, max_kernel
        self.stride, self.depthwise, self.dilation = stride, depthwise, dilation
        in_per_group = 1 if depthwise else max_in
        self.weight = nn.Parameter(torch.empty(max_out, in_per_group, max_kernel, max_kernel))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        init(self.weight)

    def active_weight(self, in_ch: int, out_ch: int, kernel: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The slice a (in_ch, out_ch, kernel) choice uses of the largest weight: the stored one, or a
        full-size `weight` supplied instead (a hypernetwork's generated weight)."""
        if weight is None:
            weight = self.weight
        elif tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"DynamicConv2d: supplied weight has shape {tuple(weight.shape)}, "
                             f"expected {tuple(self.weight.shape)}")
        w = weight[:out_ch] if self.depthwise else weight[:out_ch, :in_ch]
        return _center_crop_kernel(w, kernel)

    def _check(self, in_ch: int, out_ch: int, kernel: int) -> None:
        if in_ch > self.max_in or out_ch > self.max_out or kernel > self.max_kernel or kernel % 2 == 0:
            raise ValueError(f"DynamicConv2d: in={in_ch}/{self.max_in} out={out_ch}/{self.max_out} "
                             f"kernel={kernel}/{self.max_kernel} not available")
        if self.depthwise and in_ch != out_ch:
            raise ValueError("DynamicConv2d: depthwise conv needs in == out channels")

    def out_channels(self, in_ch: int, out_channels: int | None = None) -> int:
        """Output width of a choice: a depthwise conv keeps its input's, others default to the largest."""
        return in_ch if self.depthwise else (out_channels or self.max_out)

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel_size: int | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        in_ch = x.shape[1]
        out_ch = self.out_channels(in_ch, out_channels)
        k = kernel_size or self.max_kernel
        self._check(in_ch, out_ch, k)
        bias = self.bias[:out_ch] if self.bias is not None else None
        pad = self.dilation * (k - 1) // 2
        return F.conv2d(x, self.active_weight(in_ch, out_ch, k, weight), bias, self.stride, pad, self.dilation,
                        groups=in_ch if self.depthwise else 1)

    @torch.no_grad()
    def static(self, in_ch: int, out_channels: int | None = None, kernel_size: int | None = None,
               weight: torch.Tensor | None = None) -> nn.Conv2d:
        out_ch = self.out_channels(in_ch, out_channels)
        k = kernel_size or self.max_kernel
        self._check(in_ch, out_ch, k)
        # skip_init: the weights are overwritten below, so default initialisation is wasted work
        conv = skip_init(nn.Conv2d, in_ch, out_ch, k, self.stride, self.dilation * (k - 1) // 2, self.dilation,
                         groups=in_ch if self.depthwise else 1, bias=self.bias is not None)
        conv.weight.copy_(self.active_weight(in_ch, out_ch, k, weight))
        if self.bias is not None:
            conv.bias.copy_(self.bias[:out_ch])
        return conv


class DynamicLinear(nn.Module):
    """Linear layer whose input (from x) and output features are sliced from the largest weight."""

    def __init__(self, max_in: int, max_out: int, bias: bool = True):
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.weight = nn.Parameter(torch.empty(max_out, max_in))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        nn.init.trunc_normal_(self.weight, std=0.02)

    def active(self, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if in_f > self.max_in or out_f > self.max_out:
            raise ValueError(f"DynamicLinear: in={in_f}/{self.max_in} out={out_f}/{self.max_out} not available")
        bias = self.bias[:out_f] if self.bias is not None else None
        return self.weight[:out_f, :in_f], bias

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        w, b = self.active(x.shape[-1], out_features or self.max_out)
        return F.linear(x, w, b)

    @torch.no_grad()
    def static(self, in_f: int, out_features: int | None = None) -> nn.Linear:
        out_f = out_features or self.max_out
        w, b = self.active(in_f, out_f)
        lin = skip_init(nn.Linear, in_f, out_f, bias=b is not None)
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
        return lin


class DynamicBatchNorm2d(nn.Module):
    """BatchNorm over the first C channels; running statistics are shared prefixes too.

    Subnet evaluation must recalibrate these statistics (see raynas.train.bn), since a
    prefix's statistics are polluted by the other widths it was trained with.
    """

    def __init__(self, max_ch: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.max_ch, self.eps, self.momentum = max_ch, eps, momentum
        self.weight = nn.Parameter(torch.ones(max_ch))
        self.bias = nn.Parameter(torch.zeros(max_ch))
        self.register_buffer("running_mean", torch.zeros(max_ch))
        self.register_buffer("running_var", torch.ones(max_ch))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c > self.max_ch:
            raise ValueError(f"DynamicBatchNorm2d: {c} channels > {self.max_ch}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, used by BN recalibration
                momentum = 1.0 / float(self.num_batches_tracked)
        # Slices of the buffers are views, so training updates the shared statistics in place.
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
                            self.training, momentum or 0.0, self.eps)

    @torch.no_grad()
    def static(self, ch: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(ch, eps=self.eps, momentum=self.momentum if self.momentum is not None else 0.1)
        bn.weight.copy_(self.weight[:ch])
        bn.bias.copy_(self.bias[:ch])
        bn.running_mean.copy_(self.running_mean[:ch])
        bn.running_var.copy_(self.running_var[:ch])
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class DynamicLayerNorm(nn.Module):
    """LayerNorm over the first C features of the last dimension."""

    def __init__(self, max_ch: int, eps: float = 1e-6):
        super().__init__()
        self.max_ch, self.eps = max_ch, eps
        self.weight = nn.Parameter(torch.ones(max_ch))
        self.bias = nn.Parameter(torch.zeros(max_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        return F.layer_norm(x, (c,), self.weight[:c], self.bias[:c], self.eps)

    @torch.no_grad()
    def static(self, ch: int) -> nn.LayerNorm:
        ln = nn.LayerNorm(ch, eps=self.eps)
        ln.weight.copy_(self.weight[:ch])
        ln.bias.copy_(self.bias[:ch])
        return ln


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of `divisor` (MobileNet convention), never below 90% of v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v
