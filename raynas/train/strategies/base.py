"""The strategy protocol: how one training step samples subnets and which losses train them.

A strategy is a sampler plus a loss. The loop owns data, devices, DDP, AMP, schedules, evaluation
and checkpoints; a strategy owns the step. It may also wrap the supernet (extra modules such as a
router or LoRA experts go into the module it returns, so DDP syncs them and checkpoints hold them),
create its own optimizers (e.g. one for architecture parameters), and keep state (sampler RNG,
temperatures) that is checkpointed with `state_dict` / `load_state_dict`.

To add one: subclass `Strategy`, set `name` and `DEFAULTS`, implement `train_step`, and declare it
in `raynas.train.strategies.STRATEGIES`, or ship it as a plug-in (a `raynas.strategies` entry point,
or a module given with `--plugin` that decorates it with `@register_strategy`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from raynas import config as c
from raynas.space import Arch, SearchSpace
from raynas.train.samplers import NO_DIMS, ProgressiveSchedule, check_progressive_epochs, validate_progressive

LossFn = Callable[[torch.Tensor], torch.Tensor]
FeatureLossFn = Callable[[torch.Tensor, Any], torch.Tensor]
OptimizerFactory = Callable[..., torch.optim.Optimizer]


class StepContext:
    """What a strategy uses in one step. Built by the loop; valid for the whole run.

    `model` is the module being trained, DDP-wrapped when there are several workers: call it only
    through `forward_backward`, which puts each forward and its backward in the right DDP sync
    context and under autocast. `module` is the same module unwrapped (for buffers, parameters).
    """

    def __init__(self, model: nn.Module, module: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                 *, device: torch.device, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler,
                 label_smoothing: float, grad_clip: float | None, world_size: int):
        self.model, self.module, self.optimizers = model, module, dict(optimizers)
        self.device, self.amp_dtype, self.scaler = device, amp_dtype, scaler
        self.label_smoothing, self.grad_clip, self.world_size = label_smoothing, grad_clip, world_size
        self.epoch = 0            # 0-based epoch being trained
        self.step = 0             # 0-based step within the epoch
        self.global_step = 0      # steps since the start of training (survives resume)
        self.steps_per_epoch = 1
        self.num_epochs = 1

    @property
    def is_distributed(self) -> bool:
        return self.model is not self.module

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _sync_context(self, sync: bool):
        if sync or not self.is_distributed:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def forward_backward(self, x: torch.Tensor, arch: Arch | None, loss_fn: LossFn, *, sync: bool = True,
                         scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward subnet `arch` (None: the teacher / full net), loss_fn(logits), backward.

        Gradients add up across calls until an optimizer step. Under DDP, `sync=False` keeps them
        local (no all-reduce); the last pass before `optimizer_step` must use `sync=True`, which
        all-reduces everything accumulated since the previous step. Returns (detached fp32 logits,
        detached loss).
        """
        logits, _, loss = self._pass(x, arch, loss_fn, sync, scale, features=False)
        return logits, loss

    def forward_backward_features(self, x: torch.Tensor, arch: Any, loss_fn: FeatureLossFn, *, sync: bool = True,
                                  scale: float = 1.0) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """`forward_backward` for feature distillation: the model (a `StageFeatures` supernet) also returns
        its stage outputs, and the loss is loss_fn(logits, features). Returns (detached fp32 logits,
        detached fp32 features, detached loss)."""
        return self._pass(x, arch, loss_fn, sync, scale, features=True)

    def _pass(self, x, arch, loss_fn, sync: bool, scale: float, features: bool):
        with self._sync_context(sync):
            with self.autocast():
                # through the (DDP) wrapper's forward either way: DDP prepares its gradient sync there
                out = self.model(x, arch, features=True) if features else self.model(x, arch)
            logits, feats = (out[0], _to_float(out[1])) if features else (out, None)
            loss = loss_fn(logits.float(), feats) if features else loss_fn(logits.float())
            self.scaler.scale(loss * scale).backward()
        return logits.detach().float(), _detached(feats), loss.detach()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, arch: Arch | None) -> torch.Tensor:
        """Logits without gradients, outside DDP (no collective): e.g. a teacher's soft labels."""
        with self.autocast():
            return self.module(x, arch).float()

    def optimizer_step(self, *names: str) -> None:
        """Unscale, clip, step the named optimizers (all when none named), then zero their grads."""
        names = names or tuple(self.optimizers)
        opts = [self.optimizers[n] for n in names]
        if self.grad_clip is not None:
            for opt in opts:
                self.scaler.unscale_(opt)
            params = [p for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)


def _to_float(tree: Any) -> Any:
    """fp32 copies of the tensors in a (nested) list/tuple of features (AMP passes give fp16/bf16)."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_float(t) for t in tree)
    return tree.float()


def _detached(tree: Any) -> Any:
    if tree is None:
        return None
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detached(t) for t in tree)
    return tree.detach()


def rng_state_json(rng: np.random.Generator) -> str:
    """numpy Generator state as JSON: its 128-bit integers would not load with weights_only=True."""
    return json.dumps(rng.bit_generator.state)


def rng_from_json(text: str) -> np.random.Generator:
    state = json.loads(text)
    rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
    rng.bit_generator.state = state
    return rng


class Strategy:
    """Base class: subclasses set `name`, `DEFAULTS` and implement `train_step`.

    Life cycle, on every worker: `__init__(space, options, seed)` -> `prepare_model(supernet)` ->
    `configure_optimizers(model, make_optimizer)` -> [`load_state_dict`] -> per epoch
    `on_epoch_start` -> per batch `train_step` -> `state_dict` at each checkpoint.
    The same seed on every rank makes every rank sample the same subnets at each step.
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # families this strategy applies to (None: all); checked before any compute
    FAMILIES: ClassVar[tuple[str, ...] | None] = None
    # True when the strategy initialises the supernet from a checkpoint of its own choosing (`init_from`):
    # a size-specific chain cannot hand it inherited weights
    LOADS_WEIGHTS: ClassVar[bool] = False
    # True when the strategy draws its subnets through the samplers with `held_dims(epoch)`: it then takes
    # the `progressive` option (OFA progressive shrinking, raynas.train.samplers.ProgressiveSchedule)
    PROGRESSIVE: ClassVar[bool] = False

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        self.space = space
        self.options = {**self.DEFAULTS, **dict(options)}
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        progressive = self.options.get("progressive") if self.PROGRESSIVE else None
        self.schedule = (ProgressiveSchedule.of(space, progressive, "strategy.progressive")
                         if progressive is not None else None)

    # ---- configuration ---------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, options: Mapping[str, Any], where: str = "strategy") -> dict[str, Any]:
        """Fill defaults, refuse unknown keys and wrong types; subclasses add range checks in `check`.

        A `PROGRESSIVE` strategy also takes `progressive`, which stays out of the options when not given
        (off), so the configs of runs without it read as before."""
        options = dict(c.mapping(options, where) if options is not None else {})
        c.check_known(options, [*cls.DEFAULTS, *(["progressive"] if cls.PROGRESSIVE else [])], where)
        progressive = options.pop("progressive", None) if cls.PROGRESSIVE else None
        out = c.with_defaults(options, cls.DEFAULTS, where)
        if progressive is not None:
            out["progressive"] = validate_progressive(progressive, c.join(where, "progressive"))
        for key, default in cls.DEFAULTS.items():
            value, field = out[key], c.join(where, key)
            if default is None or value is None:
                continue
            if isinstance(default, bool):
                c.boolean(value, field)
            elif isinstance(default, int):
                c.integer(value, field)
            elif isinstance(default, float):
                c.number(value, field)
            elif not isinstance(value, type(default)):
                c.fail(field, f"got {value!r}", f"a {type(default).__name__} like {default!r}")
        cls.check(out, where)
        return out

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        """Range checks of option values; raise ConfigError naming `{where}.{key}`."""

    @classmethod
    def check_space(cls, space: SearchSpace) -> None:
        if cls.FAMILIES is not None and space.family not in cls.FAMILIES:
            c.fail("strategy", f"'{cls.name}' applies to families {list(cls.FAMILIES)}, not to space "
                   f"'{space.name}' (family '{space.family}')")

    @classmethod
    def check_fit(cls, options: Mapping[str, Any], space: SearchSpace, where: str = "strategy") -> None:
        """`check_space`, then the validated options that depend on the space (before any compute)."""
        cls.check_space(space)
        if cls.PROGRESSIVE and options.get("progressive") is not None:
            ProgressiveSchedule.of(space, options["progressive"], c.join(where, "progressive"))

    @classmethod
    def check_epochs(cls, options: Mapping[str, Any], epochs: int, where: str = "strategy") -> None:
        """The validated options that depend on the run's number of epochs."""
        if cls.PROGRESSIVE:
            check_progressive_epochs(options.get("progressive"), epochs, c.join(where, "progressive"))

    # ---- model and optimizers --------------------------------------------------------------------
    def prepare_model(self, supernet: nn.Module) -> nn.Module:
        """The module to train (called as module(x, arch)); wrap the supernet to add parameters."""
        return supernet

    def configure_optimizers(self, model: nn.Module, make_optimizer: OptimizerFactory
                             ) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers; `make_optimizer(params, **overrides)` builds the configured one."""
        return {"main": make_optimizer(model.parameters())}

    def export_supernet(self, model: nn.Module) -> nn.Module:
        """The supernet to save at each checkpoint and at the end (e.g. with LoRA merged)."""
        return model

    def teacher_arch(self) -> Arch | None:
        """The subnet whose accuracy is reported as 'teacher' (None: the supernet's full net)."""
        return None

    # ---- training --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook for schedules owned by the strategy (temperatures, warm-up phases)."""

    def held_dims(self, epoch: int) -> frozenset[str]:
        """The dims progressive shrinking holds at their largest choice in `epoch` (none when off). A
        function of the epoch alone (`StepContext.epoch`), so a resumed run continues in its phase."""
        return self.schedule.held(epoch) if self.schedule is not None else NO_DIMS

    def lr_restart_epochs(self) -> tuple[int, ...]:
        """Epochs at which the learning-rate schedule starts again: each progressive-shrinking phase after
        the first (OFA), none otherwise."""
        return self.schedule.ends[:-1] if self.schedule is not None else ()

    def progress_metrics(self, epoch: int) -> dict[str, float]:
        """The phase index as a per-step metric when progressive shrinking is on (else nothing)."""
        return {"progressive_phase": float(self.schedule.phase(epoch))} if self.schedule is not None else {}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        """One optimisation step on batch (x, y); returns scalar metrics, including 'loss'."""
        raise NotImplementedError

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically; must load with torch.load(weights_only=True)."""
        return {"rng": rng_state_json(self.rng)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng = rng_from_json(state["rng"])
