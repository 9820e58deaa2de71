"""Supernet checkpoints that load with `torch.load(weights_only=True)` and know their space."""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from raynas import storage
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


def _where(source: str | os.PathLike | bytes) -> str:
    return "<checkpoint bytes>" if isinstance(source, bytes) else storage.display(source)


def save_supernet(supernet: Supernet, location: str | os.PathLike, extra: dict[str, Any] | None = None) -> str:
    """Write the checkpoint to a local path or URI (atomically, see raynas.storage); returns the location."""
    return storage.save_torch(location, supernet_state(supernet, extra))


def read_checkpoint(source: str | os.PathLike | bytes) -> dict[str, Any]:
    """A checkpoint's state from a location (local path or URI), or from its bytes (shipped to remote
    actors via the object store)."""
    where = _where(source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = storage.read_bytes(source, "checkpoint")
        except storage.StorageError as exc:
            raise CheckpointError(str(exc)) from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"checkpoint: {where} is not a raynas checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "raynas-supernet/1":
        raise CheckpointError(f"checkpoint: {where} is not a raynas supernet checkpoint")
    return state


def load_supernet(path: str | os.PathLike | bytes, **supernet_kwargs: Any) -> Supernet:
    """Rebuild the checkpoint's space and supernet (as trained: classes, resolution) with its weights."""
    from raynas.space import space_from_config
    from raynas.supernets import build_supernet

    state = read_checkpoint(path)
    where = _where(path)
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


def load_supernet_weights(supernet: Supernet, path: str | os.PathLike | bytes, strict: bool = True) -> dict[str, Any]:
    """Load weights into `supernet`; a checkpoint of another space is refused."""
    state = read_checkpoint(path)
    if state["space"] != supernet.space.name:
        raise CheckpointError(
            f"checkpoint: {_where(path)} was trained on space '{state['space']}', not '{supernet.space.name}'")
    supernet.load_state_dict(state["model"], strict=strict)
    return state
