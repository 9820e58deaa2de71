"""Costs of a routed pair: MACs, parameters, memory and latency of its pieces, and how they compose.

A pair is deployed as trunk -> router -> one branch (pre-routing) or trunk -> little -> maybe big
(cascade). With p the fraction of inputs the router sends to little:

  seed 002's metric   E[cost] = p * cost(little) + (1 - p) * cost(big), cost(model) = trunk + its branch
  deployed            pre:     trunk + router + p * little + (1 - p) * big
                      cascade: trunk + little + (1 - p) * big          (little always runs first)
  peak (worst input)  pre:     trunk + router + max(little, big);  cascade: trunk + little + big
  memory              max(mem(big), mem(little)), mem = 4 bytes x (parameters + activations), activations
                      estimated as the largest pair of consecutive piece-boundary tensors (batch 1)

Latency of a piece comes from a latency model of raynas.hw: its calibrated slope times the piece's raw
score (LUT rows of the piece's blocks, the block linear model, or MACs/params for the proxies), plus the
model's intercept (a fixed per-call cost) once per onnxruntime call the path makes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raynas.biglittle.coupling import CoupledSupernet
from raynas.biglittle.routers import CASCADE
from raynas.errors import UserError
from raynas.space import Arch
from raynas.supernets.base import Block

if TYPE_CHECKING:  # annotations only: raynas.hw.latency loads ray and torch
    from raynas.hw.latency import CalibratedModel


@dataclass
class PairCosts:
    """Per-piece costs of one pair. `latency_ms` per piece excludes per-call overhead (`call_ms`)."""

    stage: str                                  # router stage: "pre" or "cascade"
    has_trunk: bool
    macs: dict[str, int]
    params: dict[str, int]
    activation_elems: dict[str, int]            # peak boundary activations of little and big
    latency_ms: dict[str, float] | None = None
    call_ms: float = 0.0

    # ---- per model ---------------------------------------------------------------------------
    def model(self, which: str, metric: str = "macs") -> float:
        """cost(little) or cost(big) as a standalone network: trunk + its branch."""
        if metric == "latency_ms":
            self._need_latency()
            return self.latency_ms["trunk"] + self.latency_ms[which] + self.call_ms * self._model_calls
        table = self.macs if metric == "macs" else self.params
        return float(table["trunk"] + table[which])

    @property
    def _model_calls(self) -> int:
        return 1 + int(self.has_trunk)

    def memory_bytes(self, which: str) -> int:
        return 4 * (self.params["trunk"] + self.params[which] + self.activation_elems[which])

    # ---- routed ------------------------------------------------------------------------------
    def expected(self, p_little: float, metric: str = "macs") -> float:
        """Seed 002's E[cost] = p * cost(little) + (1 - p) * cost(big)."""
        return p_little * self.model("little", metric) + (1 - p_little) * self.model("big", metric)

    def _parts(self, metric: str) -> dict[str, float]:
        if metric == "latency_ms":
            self._need_latency()
            return self.latency_ms
        return self.macs if metric == "macs" else self.params

    def deployed(self, p_little: float, metric: str = "macs") -> float:
        """Expected cost of the routed execution (trunk reuse, router overhead, cascade order)."""
        c = self._parts(metric)
        if self.stage == CASCADE:
            value = c["trunk"] + c["little"] + (1 - p_little) * c["big"]
            calls = int(self.has_trunk) + 1 + (1 - p_little)
        else:
            value = c["trunk"] + c["router"] + p_little * c["little"] + (1 - p_little) * c["big"]
            calls = int(self.has_trunk) + 2
        return float(value + (self.call_ms * calls if metric == "latency_ms" else 0.0))

    def peak(self, metric: str = "macs") -> float:
        """Worst case over inputs (real-time guarantees): the most expensive routed path."""
        c = self._parts(metric)
        if self.stage == CASCADE:
            value, calls = c["trunk"] + c["little"] + c["big"], int(self.has_trunk) + 2
        else:
            value, calls = c["trunk"] + c["router"] + max(c["little"], c["big"]), int(self.has_trunk) + 2
        return float(value + (self.call_ms * calls if metric == "latency_ms" else 0.0))

    def memory(self) -> int:
        """max(mem(big), mem(little)): only one of them runs at a time."""
        return max(self.memory_bytes("little"), self.memory_bytes("big"))

    def _need_latency(self) -> None:
        if self.latency_ms is None:
            raise UserError("latency: no latency model was given for this pair's costs")

    def summary(self, p_little: float) -> dict[str, float]:
        """Every cost figure at routing ratio `p_little` (flat, for records and reports)."""
        out = {
            "macs_little": self.model("little"), "macs_big": self.model("big"),
            "e_macs": self.expected(p_little), "e_macs_deployed": self.deployed(p_little),
            "peak_macs": self.peak(), "memory_bytes": float(self.memory()),
            "params_deployed": float(sum(self.params.values())),
        }
        if self.latency_ms is not None:
            out.update({
                "latency_little_ms": self.model("little", "latency_ms"),
                "latency_big_ms": self.model("big", "latency_ms"),
                "e_latency_ms": self.deployed(p_little, "latency_ms"),
                "e_latency_seed_ms": self.expected(p_little, "latency_ms"),
                "peak_latency_ms": self.peak("latency_ms"),
            })
        return out


# ---- latency of pieces ------------------------------------------------------------------------------
class PieceLatency:
    """Prices pieces (lists of `Block`s) with a calibrated latency model of raynas.hw.latency: its slope
    times the model's raw score of the piece; its intercept is the per-call cost (`call_ms`)."""

    def __init__(self, model: CalibratedModel):
        self.model = model
        self.kind = model.kind  # recorded with search results and deployments
        self.slope = float(model.calibration.slope)
        self.call_ms = float(model.calibration.intercept)

    def piece_ms(self, blocks: Sequence[Block], cost: Mapping[str, int]) -> float:
        """Milliseconds of one piece without the per-call overhead."""
        return self.slope * self.model.piece_raw(blocks, cost)


# ---- putting it together ------------------------------------------------------------------------------
def _activation_peak(blocks: Sequence[Block], num_classes: int) -> int:
    sizes = [math.prod(b.in_shape) for b in blocks] + [num_classes]
    return max((a + b for a, b in zip(sizes, sizes[1:])), default=num_classes)


@dataclass
class PairCostModel:
    """Cached `PairCosts` of pairs of one coupled supernet (and one latency model, optional)."""

    model: CoupledSupernet
    latency: PieceLatency | None = None
    cache_size: int = 4096
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def costs(self, pair: Any) -> PairCosts:
        pair = pair if isinstance(pair, Arch) else self.model.pair_space.validate(pair)
        if pair in self._cache:
            self._cache.move_to_end(pair)
            return self._cache[pair]
        m = self.model
        lay = m.layout(pair)
        parts = m.cost_parts(pair)
        blocks = m.piece_blocks(pair)
        n = m.num_classes
        activations = {which: _activation_peak(blocks["trunk"] + blocks[which], n) for which in ("little", "big")}
        latency = None
        call_ms = 0.0
        if self.latency is not None:
            latency = {which: self.latency.piece_ms(blocks[which], parts[which])
                       for which in ("trunk", "little", "big")}
            # the router: its feature extractor's blocks (nested, no trunk) are priced like any piece; its
            # MLP is not a supernet block, so LUT-based models count it only through the per-call cost
            router_blocks = blocks["router_features"]
            latency["router"] = (self.latency.piece_ms(router_blocks, parts["router"])
                                 if m.router.stage != CASCADE else 0.0)
            call_ms = self.latency.call_ms
        costs = PairCosts(stage=m.router.stage, has_trunk=lay.has_trunk,
                          macs={k: int(v["macs"]) for k, v in parts.items()},
                          params={k: int(v["params"]) for k, v in parts.items()},
                          activation_elems=activations, latency_ms=latency, call_ms=call_ms)
        self._cache[pair] = costs
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return costs

    def estimate(self, pair: Arch) -> dict[str, float]:
        """Data-free estimates for search (`SearchContext.estimate`): `latency_ms` is the PEAK latency
        (the constraint of the pair search), `macs` the peak MACs, `params` everything deployed."""
        c = self.costs(pair)
        return {"latency_ms": c.peak("latency_ms") if c.latency_ms is not None else float("nan"),
                "macs": int(c.peak()), "params": int(sum(c.params.values()))}


def calibrated_proxy_latency(supernet, archs: Sequence[Arch], device: str = "local-cpu",
                             devices_file: str | None = None) -> Any:
    """A `flops` proxy latency model of raynas.hw calibrated here and now: the given subnets are
    exported to ONNX and timed on this node with the device's measurement protocol (no LUT needed)."""
    from raynas.hw.devices import get_device
    from raynas.hw.latency import ProxyLatencyModel
    from raynas.hw.measure import measure_onnx
    from raynas.hw.profiling import subnet_onnx

    spec = get_device(device, devices_file)
    measured = []
    for arch in archs:
        onnx_bytes, shape = subnet_onnx(supernet, arch)
        measured.append(measure_onnx(onnx_bytes, shape, spec).median_ms)
    model = ProxyLatencyModel(supernet, "flops")
    model.calibrate(list(archs), measured)
    model.measured = list(zip([a.to_json() for a in archs], measured))
    return model
