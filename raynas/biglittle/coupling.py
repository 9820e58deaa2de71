"""A coupled big/little supernet: the three couplings of seed 002 §3.2 over `mbv3` supernets.

Every pair runs as  trunk -> {little branch, big branch}, with a router on the trunk's output:

  coupling  weights                                   trunk (computed once)
  nested    one supernet; little is a subnet of big   the stem, when both stems are the same
                                                      computation (same resolution and stem width),
                                                      else none (the router then reads little's stem)
  sibling   big supernet + little supernet            big's stem
  partial   big supernet + little supernet            big's stem and block slots [0, split)

In `sibling`/`partial` little may be narrower than the trunk: its branch starts with `ChannelPrefix`,
reading the trunk's first channels (the weight-entanglement convention: fewer channels are a prefix).

`forward(x, arch)` keeps the `Supernet` calling convention so the training loop, BN recalibration and
evaluation work unchanged: a base-space arch (or None) runs the big supernet; a pair arch runs the pair
and returns `pack(big_logits, little_logits, router_logit)`, which `unpack` splits (the training
strategy's loss reads it). The coupling's configuration travels inside the state dict (a uint8 JSON
buffer), so a checkpoint rebuilds the same coupled model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raynas.biglittle.pairspace import PairSpace, build_pair_space, is_pair
from raynas.biglittle.routers import PRE, Router, build_router
from raynas.errors import ConfigError
from raynas.space import Arch, SearchSpace
from raynas.supernets.base import Block, Composite, StageFeatures, Supernet

CONFIG_BUFFER = "biglittle_config"
FORMAT = "raynas-biglittle/1"


class ChannelPrefix(nn.Module):
    """The first `channels` channels of a feature map (a narrower network reading a wider trunk)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.channels]


@dataclass(frozen=True)
class PairLayout:
    """Where one pair's computation lives."""

    big: Arch
    little: Arch
    split: int                 # leading block slots in the trunk (partial); 0 otherwise
    has_trunk: bool            # False only for nested pairs whose stems differ
    trunk_channels: int        # channels of the trunk output (0 without a trunk)
    little_in: int             # channels little's branch reads from the trunk
    router_channels: int       # channels of the router's input features


@dataclass
class PairOutput:
    big: torch.Tensor
    little: torch.Tensor
    router_logit: torch.Tensor | None
    features: torch.Tensor


@dataclass
class PairPieces:
    """Static pieces of one pair (plain PyTorch, ONNX-exportable) and their blocks (latency keys)."""

    trunk: nn.Module | None        # image -> trunk features
    little: nn.Module              # trunk features (image without trunk) -> logits
    big: nn.Module
    router_features: nn.Module | None  # image -> router input, when there is no trunk
    blocks: dict[str, list[Block]]


def pack(big: torch.Tensor, little: torch.Tensor, router_logit: torch.Tensor | None) -> torch.Tensor:
    r = router_logit if router_logit is not None else big.new_zeros(big.shape[0])
    return torch.cat([big, little, r.unsqueeze(-1).to(big.dtype)], dim=-1)


def unpack(packed: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = num_classes
    return packed[:, :c], packed[:, c:2 * c], packed[:, 2 * c]


def _sequential(blocks: list[Block], prefix: nn.Module | None = None) -> nn.Sequential:
    modules = ([prefix] if prefix is not None else []) + [b.module for b in blocks]
    return nn.Sequential(*modules)


class CoupledSupernet(nn.Module, Composite, StageFeatures):
    """Big and little supernets (one shared in `nested`) plus a router; see the module docstring."""

    description = "a big/little pair (load it with `raynas biglittle`)"

    def __init__(self, space: SearchSpace, coupling: str = "nested", splits: list[int] | None = None,
                 router: str = "learned", router_hidden: int = 32, supernet_kwargs: Mapping[str, Any] | None = None,
                 big_net: Supernet | None = None):
        super().__init__()
        from raynas.supernets import build_supernet

        self.space = space
        self.pair_space: PairSpace = build_pair_space(space, coupling, splits)
        self.coupling = coupling
        kwargs = dict(supernet_kwargs or {})
        self.big_net = big_net if big_net is not None else build_supernet(space, **kwargs)
        self.little_net = None if coupling == "nested" else build_supernet(space, **kwargs)
        self.router: Router = build_router(router, self._max_router_channels(), router_hidden)
        self.config = {"coupling": coupling, "splits": list(self.pair_space.splits) if coupling == "partial" else None,
                       "router": router, "router_hidden": router_hidden, "supernet_kwargs": kwargs}
        blob = json.dumps({"format": FORMAT, **self.config}).encode()
        self.register_buffer(CONFIG_BUFFER, torch.tensor(list(blob), dtype=torch.uint8))
        self.detach_router_input = True  # router gradients stay out of the shared trunk (strategy option)

    def deployable(self) -> Supernet:
        """What `raynas export` writes subnets of: the big member (a pair is exported by `raynas biglittle`)."""
        return self.big_net

    # ---- structure ---------------------------------------------------------------------------
    @property
    def little_supernet(self) -> Supernet:
        return self.big_net if self.little_net is None else self.little_net

    @property
    def num_classes(self) -> int:
        return self.space.num_classes

    def _max_router_channels(self) -> int:
        st = self.space.structure
        return max(max(w.stem, w.first, *w.stages) for w in map(st.widths_at, self.space.dim("width").choices))

    def layout(self, pair: Mapping[str, Any]) -> PairLayout:
        ps = self.pair_space
        pair = pair if isinstance(pair, Arch) else ps.validate(pair)
        big, little, split = ps.big(pair), ps.little(pair), ps.split(pair)
        big_plan = self.big_net.plan(big)
        little_plan = self.little_supernet.plan(little)
        little_stem_out = little_plan.stem.first_block.out_ch
        if self.coupling == "nested":
            has_trunk = big_plan.stem == little_plan.stem
            trunk_ch = big_plan.stem.first_block.out_ch if has_trunk else 0
            return PairLayout(big, little, 0, has_trunk, trunk_ch, trunk_ch,
                              trunk_ch if has_trunk else little_stem_out)
        trunk_ch = _channels_at(big_plan, split)
        little_in = _channels_at(little_plan, split)
        if little_in > trunk_ch:  # canonicalisation keeps little no wider than big
            raise ValueError(f"little reads {little_in} channels from a {trunk_ch}-channel trunk")
        return PairLayout(big, little, split, True, trunk_ch, little_in, trunk_ch)

    # ---- forward -----------------------------------------------------------------------------
    def trunk(self, x: torch.Tensor, lay: PairLayout) -> torch.Tensor | None:
        if not lay.has_trunk:
            return None
        h = self.big_net.forward_stem(x, lay.big)
        if lay.split:
            h = self.big_net.forward_slots(h, lay.big, 0, lay.split)
        return h

    def little_logits(self, x: torch.Tensor, t: torch.Tensor | None, lay: PairLayout) -> torch.Tensor:
        net = self.little_supernet
        if t is None:
            return net(x, lay.little)
        if lay.little_in < t.shape[1]:
            t = t[:, : lay.little_in]
        return net.forward_head(net.forward_slots(t, lay.little, lay.split), lay.little)

    def big_logits(self, x: torch.Tensor, t: torch.Tensor | None, lay: PairLayout) -> torch.Tensor:
        if t is None:
            return self.big_net(x, lay.big)
        return self.big_net.forward_head(self.big_net.forward_slots(t, lay.big, lay.split), lay.big)

    def router_features(self, x: torch.Tensor, t: torch.Tensor | None, lay: PairLayout) -> torch.Tensor:
        """What a pre-router reads: the trunk output, or little's stem output when there is no trunk."""
        if t is not None:
            return t
        return self.little_supernet.forward_stem(x, lay.little)

    def router_logit(self, features: torch.Tensor) -> torch.Tensor | None:
        if self.router.stage != PRE:
            return None
        return self.router(features.detach() if self.detach_router_input else features)

    def forward_pair(self, x: torch.Tensor, pair: Mapping[str, Any], *, run_big: bool = True,
                     run_little: bool = True) -> PairOutput:
        lay = self.layout(pair)
        t = self.trunk(x, lay)
        features = self.router_features(x, t, lay)
        router_logit = self.router_logit(features)
        big = self.big_logits(x, t, lay) if run_big else None
        little = self.little_logits(x, t, lay) if run_little else None
        return PairOutput(big, little, router_logit, features)

    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None, *, features: bool = False):
        if features:
            return self.forward_features(x, arch)
        if is_pair(arch):
            out = self.forward_pair(x, arch)
            return pack(out.big, out.little, out.router_logit)
        return self.big_net(x, arch)

    def forward_features(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None):
        """For feature distillation. A pair: (packed logits, (big's stage outputs, little's)), the stages
        that end inside the branches (after the trunk), so both lists name the same stages. A base arch:
        the big supernet's (logits, stage outputs)."""
        if not is_pair(arch):
            return self.big_net.forward_features(x, arch)
        lay = self.layout(arch)
        t = self.trunk(x, lay)
        router_logit = self.router_logit(self.router_features(x, t, lay))
        big, big_stages = _branch_features(self.big_net, x, t, lay.big, lay.split)
        if t is not None and lay.little_in < t.shape[1]:
            t = t[:, : lay.little_in]
        little, little_stages = _branch_features(self.little_supernet, x, t, lay.little, lay.split)
        return pack(big, little, router_logit), (big_stages, little_stages)

    # ---- cost and extraction -------------------------------------------------------------------
    def cost_parts(self, pair: Mapping[str, Any]) -> dict[str, dict[str, int]]:
        """Exact params/MACs of the pieces: trunk, little branch, big branch, router (incl. its own
        feature extractor when there is no trunk). little = trunk + little branch, big likewise."""
        lay = self.layout(pair)
        zero = {"params": 0, "macs": 0}
        big_net, little_net = self.big_net, self.little_supernet
        if lay.has_trunk:
            trunk = big_net.cost(lay.big, head=False, end=lay.split)
            little = little_net.cost(lay.little, stem=False, start=lay.split)
            big = big_net.cost(lay.big, stem=False, start=lay.split)
        else:
            trunk, little, big = zero, little_net.cost(lay.little), big_net.cost(lay.big)
        router = dict(zero)
        if self.router.stage == PRE:
            router = dict(self.router.cost(lay.router_channels))
            if not lay.has_trunk:
                stem = little_net.cost(lay.little, head=False, end=0)
                router = {k: router[k] + stem[k] for k in router}
        return {"trunk": dict(trunk), "little": dict(little), "big": dict(big), "router": router}

    def piece_blocks(self, pair: Mapping[str, Any]) -> dict[str, list[Block]]:
        """The supernets' static blocks of each piece (weights copied at call time: BN stats as now)."""
        lay = self.layout(pair)
        big_net, little_net = self.big_net, self.little_supernet
        if lay.has_trunk:
            out = {"trunk": big_net.blocks(lay.big, head=False, end=lay.split),
                   "little": little_net.blocks(lay.little, stem=False, start=lay.split),
                   "big": big_net.blocks(lay.big, stem=False, start=lay.split), "router_features": []}
        else:
            out = {"trunk": [], "little": little_net.blocks(lay.little), "big": big_net.blocks(lay.big),
                   "router_features": little_net.blocks(lay.little, head=False, end=0)}
        return out

    @torch.no_grad()
    def extract_pieces(self, pair: Mapping[str, Any], which: tuple[str, ...] = ("trunk", "little", "big")
                       ) -> PairPieces:
        """Static pieces with the current weights and BN statistics. Callers recalibrate BN first
        (for `nested`, big and little separately: they share BN layers; see raynas.biglittle.evaluate)."""
        lay = self.layout(pair)
        blocks = self.piece_blocks(pair)
        prefix = ChannelPrefix(lay.little_in) if lay.has_trunk and lay.little_in < lay.trunk_channels else None
        pieces = PairPieces(
            trunk=_sequential(blocks["trunk"]).eval() if lay.has_trunk and "trunk" in which else None,
            little=_sequential(blocks["little"], prefix).eval() if "little" in which else None,
            big=_sequential(blocks["big"]).eval() if "big" in which else None,
            router_features=(_sequential(blocks["router_features"]).eval()
                             if not lay.has_trunk and "trunk" in which else None),
            blocks=blocks)
        return pieces

    def static_router(self, pair: Mapping[str, Any]) -> nn.Module | None:
        if self.router.stage != PRE:
            return None
        return self.router.static(self.layout(pair).router_channels).eval()


def _branch_features(net: Supernet, x: torch.Tensor, t: torch.Tensor | None, arch: Arch, split: int):
    """(logits, stage outputs) of one branch: from the image when there is no trunk, else from the trunk's output."""
    if t is None:
        return net.forward_features(x, arch)
    h, stages = net.forward_slot_features(t, arch, split)
    return net.forward_head(h, arch), stages


def _channels_at(plan, split: int) -> int:
    """Channels of the tensor entering block slot `split` (the stem output when split is 0)."""
    before = [p for i, p in zip(plan.slots, plan.blocks) if i < split]
    return before[-1].out_ch if before else plan.stem.first_block.out_ch


# ---- checkpoints -----------------------------------------------------------------------------------
def coupled_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    blob = state_dict.get(CONFIG_BUFFER)
    if blob is None:
        raise ConfigError("checkpoint: not a big/little (coupled) supernet; train one with strategy 'biglittle'")
    cfg = json.loads(bytes(blob.tolist()).decode())
    if cfg.pop("format", None) != FORMAT:
        raise ConfigError("checkpoint: unknown big/little checkpoint format")
    return cfg


def load_coupled(path: str | os.PathLike | bytes) -> CoupledSupernet:
    """A coupled supernet from a checkpoint (a location or its bytes) written by training with the `biglittle`
    strategy."""
    from raynas.space import space_from_config
    from raynas.supernets.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    cfg = coupled_config(state["model"])
    space = space_from_config(state["space_config"])
    model = CoupledSupernet(space, **cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def save_coupled(model: CoupledSupernet, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> str:
    from raynas.supernets.checkpoint import save_supernet

    return save_supernet(model, path, extra)
