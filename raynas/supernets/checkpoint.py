"""Supernet checkpoints that load with `torch.load(weights_only=True)` and know their space.

`load_supernet` is the one way to get a supernet back from a checkpoint: the state names its space
(the whole declaration), the build options of every optional part it holds (Kshot-Hypernet, MoLE
experts: `raynas.supernets.supernet_kwargs`) and the weights, so the network is rebuilt as trained
before its weights load. Every defect of a file is one `checkpoint: <file>: ...` line.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch
from torch import nn

from raynas import storage
from raynas.errors import UserError
from raynas.supernets.base import Composite, Supernet

FORMAT = "raynas-supernet/1"
# Entries every checkpoint holds, with their types; `supernet_state` writes them all.
REQUIRED = {"space": str, "space_config": dict, "num_classes": int, "resolution": int, "model": dict}


class CheckpointError(UserError):
    pass


def supernet_state(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds. A composite (big/little pair) also records where its deployable member's
    weights are (`member`, a state-dict prefix) and what it is, so the member loads on its own."""
    from raynas.supernets import supernet_kwargs

    member = model.deployable() if isinstance(model, Composite) else model
    composite = {}
    if member is not model:
        prefix = next(name for name, module in model.named_modules() if module is member)
        composite = {"member": f"{prefix}.", "composite": model.description}
    return {
        "format": FORMAT,
        "space": model.space.name,
        "space_config": dict(model.space.config),
        "num_classes": model.space.num_classes,
        "resolution": model.space.resolution,
        "model": model.state_dict(),
        "supernet_kwargs": supernet_kwargs(member),
        **composite,
        **(extra or {}),
    }


def _where(source: str | os.PathLike | bytes) -> str:
    return "<checkpoint bytes>" if isinstance(source, bytes) else storage.display(source)


def _fail(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint: {where}: {problem}")


def save_supernet(model: nn.Module, location: str | os.PathLike, extra: dict[str, Any] | None = None) -> str:
    """Write the checkpoint to a local path or URI (atomically, see raynas.storage); returns the location."""
    return storage.save_torch(location, supernet_state(model, extra))


def _unpickle(data: bytes, where: str) -> Any:
    try:
        # weights_only refuses every object that is not a tensor or a plain container; its warning about
        # the pickle protocol of a foreign file would print lines before the one-line refusal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, foreign or malicious files
        raise _fail(where, f"not a raynas checkpoint (unreadable or unsafe: {type(exc).__name__})") from None


def read_checkpoint(source: str | os.PathLike | bytes) -> dict[str, Any]:
    """A checkpoint's state from a location (local path or URI), or from its bytes (shipped to remote
    actors via the object store); its required entries are checked."""
    where = _where(source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = storage.read_bytes(source, "checkpoint")
        except storage.StorageError as exc:
            raise CheckpointError(str(exc)) from None
    state = _unpickle(data, where)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _fail(where, f"not a raynas supernet checkpoint (no format tag '{FORMAT}')")
    for key, kind in REQUIRED.items():
        if key not in state:
            raise _fail(where, f"missing entry '{key}'; allowed: a checkpoint written by `raynas train`")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _fail(where, f"entry '{key}' is a {type(state[key]).__name__}, expected {kind.__name__}")
    return state


def _rebuild(state: dict[str, Any], where: str, overrides: dict[str, Any]) -> Supernet:
    """The supernet the checkpoint was trained as (space, classes, resolution, build options), untrained."""
    from raynas.space import space_from_config
    from raynas.supernets import build_supernet

    kwargs = state.get("supernet_kwargs", {})
    if not isinstance(kwargs, dict):
        raise _fail(where, f"entry 'supernet_kwargs' is a {type(kwargs).__name__}, expected dict")
    try:
        space = space_from_config(state["space_config"])
        return build_supernet(space, **{**kwargs, **overrides})
    except UserError as exc:  # a declaration or options this version does not accept
        raise _fail(where, f"its space or supernet options are not valid here ({exc})") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise _fail(where, f"its supernet options cannot rebuild a network ({type(exc).__name__}: {exc})") from None


def _member_weights(state: dict[str, Any], where: str) -> dict[str, Any]:
    prefix = state.get("member", "")
    if not isinstance(prefix, str):
        raise _fail(where, f"entry 'member' is a {type(prefix).__name__}, expected str")
    if not prefix:
        return state["model"]
    return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}


def load_supernet(path: str | os.PathLike | bytes, member: bool = False, **supernet_kwargs: Any) -> Supernet:
    """The checkpoint's supernet with its weights, as trained (classes, resolution, hypernet, MoLE), in eval mode.

    A composite's checkpoint (a big/little pair) is refused unless `member`: then its deployable member
    (the big supernet) is loaded; `raynas biglittle` loads the pair itself.
    """
    state = read_checkpoint(path)
    where = _where(path)
    if "member" in state and not member:
        raise _fail(where, f"holds {state.get('composite', 'several supernets')}, not one supernet; allowed: "
                           "a single-supernet checkpoint, or `raynas export` (which exports its deployable member)")
    supernet = _rebuild(state, where, supernet_kwargs)
    try:
        supernet.load_state_dict(_member_weights(state, where))
    except (RuntimeError, ValueError) as exc:  # weights of another build of the space (e.g. an edited YAML)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        raise _fail(where, f"its weights do not fit the supernet of space '{supernet.space.name}' ({detail})") from None
    return supernet.eval()
