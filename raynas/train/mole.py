"""`mole`: TAS-LoRA fine-tuning (seed 003 §3.3, §4.1.2) of a trained AutoFormer supernet.

The supernet (`init_from`, a `raynas train` output such as `<run>/supernet.pt`) is loaded and
frozen; LoRA experts and an LSTM router (`raynas.supernets.mole`) are attached and trained. Each step
trains one uniformly sampled subnet on the labels, as AutoFormer does. For the first
`warmup_epochs` (paper: 5) the router is frozen, so each expert learns from the group of blocks
the group-wise initialisation gave it; afterwards experts and router train jointly.

Optimisers follow the paper: the experts use the configured optimizer (TAS-LoRA: AdamW, lr 5e-4,
with `scheduler.warmup_epochs: 5` giving its linear warm-up), the router its own SGD
(`router_lr`, paper 0.1); both follow the configured cosine schedule. The saved supernet is the
`MoLESupernet`: its `extract(arch)` merges the subnet's LoRA mixture into plain linear weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from raynas import storage
from raynas.errors import ConfigError, UserError
from raynas.nn.lora import MOLE_DEFAULTS, validate_mole_config
from raynas.supernets.mole import MoLESupernet, attach_mole
from raynas.train.losses import accuracy, label_loss
from raynas.train.samplers import uniform_arch
from raynas.train.strategies.base import StepContext, Strategy

STRATEGY_KEYS = {"init_from": None, "warmup_epochs": 5, "router_lr": 0.1, "router_momentum": 0.9,
                 "router_weight_decay": 0.0}


def _checked(path: str, where: str, read):
    """`read(path)` (a local path or URI, read through raynas.storage); errors name `where`."""
    if not storage.is_file(path):
        raise ConfigError(f"{where}: file {storage.display(path)} does not exist (a trained autoformer "
                          f"supernet, e.g. <storage_path>/<run>/supernet.pt)")
    try:
        return read(path)
    except UserError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('checkpoint: ')}") from None


def load_pretrained(supernet: torch.nn.Module, path: str, where: str = "strategy.init_from") -> None:
    """Load a plain supernet checkpoint of the same space, resolution and classes into `supernet`."""
    from raynas.supernets.checkpoint import load_supernet

    pretrained = _checked(path, where, load_supernet)
    theirs, space = pretrained.space, supernet.space
    if theirs.name != space.name:
        raise ConfigError(f"{where}: {path} was trained on space '{theirs.name}', not '{space.name}'")
    for key in ("resolution", "num_classes"):
        if getattr(theirs, key) != getattr(space, key):
            raise ConfigError(f"{where}: {path} was trained with {key} {getattr(theirs, key)}; this run has "
                              f"{getattr(space, key)} (set `resolution` / the dataset to match the pretrained "
                              f"supernet)")
    if isinstance(pretrained, MoLESupernet):
        raise ConfigError(f"{where}: {path} already holds MoLE experts; give the plain pretrained supernet")
    supernet.load_state_dict(pretrained.state_dict())


class MoLEStrategy(Strategy):
    name = "mole"
    FAMILIES = ("autoformer",)
    LOADS_WEIGHTS = True
    DEFAULTS = {**STRATEGY_KEYS, **MOLE_DEFAULTS}

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        if options["init_from"] is None:
            raise ConfigError(f"{where}.init_from: missing; give the trained autoformer supernet to fine-tune "
                              f"(e.g. <storage_path>/<run>/supernet.pt)")
        if not isinstance(options["init_from"], str):
            raise ConfigError(f"{where}.init_from: expected a checkpoint path, got {options['init_from']!r}")
        # Absolute (or a URI): every worker reads it, whatever its working directory.
        options["init_from"] = storage.normalize(options["init_from"])
        from raynas.supernets.checkpoint import read_checkpoint

        state = _checked(options["init_from"], f"{where}.init_from", read_checkpoint)
        family = state.get("space_config", {}).get("family")
        if family not in cls.FAMILIES:
            raise ConfigError(f"{where}.init_from: {options['init_from']} is a '{family}' supernet; "
                              f"mole fine-tunes {list(cls.FAMILIES)} supernets")
        if options["warmup_epochs"] < 0:
            raise ConfigError(f"{where}.warmup_epochs: expected an integer >= 0, got {options['warmup_epochs']}")
        if not options["router_lr"] > 0:
            raise ConfigError(f"{where}.router_lr: expected a number > 0, got {options['router_lr']}")
        if not 0 <= options["router_momentum"] < 1:
            raise ConfigError(f"{where}.router_momentum: expected a number in [0, 1), "
                              f"got {options['router_momentum']}")
        if options["router_weight_decay"] < 0:
            raise ConfigError(f"{where}.router_weight_decay: expected a number >= 0, "
                              f"got {options['router_weight_decay']}")
        validate_mole_config(cls.mole_config(options), where)

    @staticmethod
    def mole_config(options: Mapping[str, Any]) -> dict[str, Any]:
        return {k: options[k] for k in MOLE_DEFAULTS}

    # ---- model and optimizers --------------------------------------------------------------------
    def prepare_model(self, supernet: torch.nn.Module) -> MoLESupernet:
        load_pretrained(supernet, self.options["init_from"])
        return attach_mole(supernet, self.mole_config(self.options))

    def configure_optimizers(self, model: MoLESupernet, make_optimizer) -> dict[str, torch.optim.Optimizer]:
        router = torch.optim.SGD(model.router_parameters(), lr=self.options["router_lr"],
                                 momentum=self.options["router_momentum"],
                                 weight_decay=self.options["router_weight_decay"])
        return {"lora": make_optimizer(model.lora_parameters()), "router": router}

    def export_supernet(self, model: MoLESupernet) -> MoLESupernet:
        return model  # a Supernet itself: its extract() merges the LoRA mixture

    # ---- training --------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        net: MoLESupernet = ctx.module
        frozen = ctx.epoch < self.options["warmup_epochs"]
        net.set_router_frozen(frozen)
        arch = uniform_arch(self.space, self.rng)
        logits, loss = ctx.forward_backward(x, arch, label_loss(y, ctx.label_smoothing))
        if frozen:
            ctx.optimizer_step("lora")
            # The router has no gradients (routing ran without them): this step changes nothing; it
            # only keeps the router's LR schedule in step with its optimizer.
            ctx.optimizers["router"].step()
        else:
            ctx.optimizer_step("lora", "router")
        with torch.no_grad():
            block_gates, _ = net.routing(arch)
        return {"loss": float(loss), "train_acc": accuracy(logits, y), "router_frozen": float(frozen),
                # mean probability of each layer's top expert: 1 = hard routing, 1/E = uniform
                "router_top_prob": float(block_gates.max(dim=-1).values.mean())}


__all__ = ["MoLEStrategy", "load_pretrained"]
