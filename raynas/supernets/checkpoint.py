"""Supernet checkpoints that load with `torch.load(weights_only=True)` and know their space."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from raynas.errors import UserError
from raynas.supernets.base import Supernet


class CheckpointError(UserError):
    pass


# The state-dict buffer that marks a big/little coupled supernet (raynas.biglittle writes it).
COUPLED_MARKER = "biglittle_config"


def supernet_state(supernet: Supernet, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from raynas.supernets import supernet_kwargs

    return {
        "format": "raynas-supernet/1",
        "space": supernet.space.name,
        "space_config": dict(supernet.space.config),
        "num_classes": supernet.space.num_classes,
        "resolution": supernet.space.resolution,
        "model": supernet.state_dict(),
        "supernet_kwargs": supernet_kwargs(supernet),
        **(extra or {}),
    }


def save_supernet(supernet: Supernet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(supernet_state(supernet, extra), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_checkpoint(path: str | Path | bytes) -> dict[str, Any]:
    """A checkpoint's state from a file, or from its bytes (shipped to remote actors via the object store)."""
    if isinstance(path, bytes):
        source, path = io.BytesIO(path), "<checkpoint bytes>"
    else:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint: file {path} does not exist")
        source = path
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"checkpoint: {path} is not a raynas checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "raynas-supernet/1":
        raise CheckpointError(f"checkpoint: {path} is not a raynas supernet checkpoint")
    return state


def load_supernet(path: str | Path | bytes, **supernet_kwargs: Any) -> Supernet:
    """Rebuild the checkpoint's space and supernet (as trained: classes, resolution) with its weights."""
    from raynas.space import space_from_config
    from raynas.supernets import build_supernet

    state = read_checkpoint(path)
    where = "<checkpoint bytes>" if isinstance(path, bytes) else path
    if COUPLED_MARKER in state["model"]:
        raise CheckpointError(f"checkpoint: {where} holds a big/little (coupled) supernet; use it with "
                              "`raynas biglittle` / pipelines/biglittle.py, or train a single supernet")
    space = space_from_config(state["space_config"])
    kwargs = {**state.get("supernet_kwargs", {}), **supernet_kwargs}
    supernet = build_supernet(space, **kwargs)
    try:
        supernet.load_state_dict(state["model"])
    except RuntimeError as exc:  # weights of another build of the space (e.g. an edited YAML)
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(
            f"checkpoint: {where} does not fit the supernet of space '{space.name}' ({first})") from None
    return supernet.eval()


def load_supernet_weights(supernet: Supernet, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load weights into `supernet`; a checkpoint of another space is refused."""
    state = read_checkpoint(path)
    if state["space"] != supernet.space.name:
        raise CheckpointError(
            f"checkpoint: {path} was trained on space '{state['space']}', not '{supernet.space.name}'"
        )
    supernet.load_state_dict(state["model"], strict=strict)
    return state
