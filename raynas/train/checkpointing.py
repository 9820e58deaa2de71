"""Training checkpoints: what one epoch's Ray checkpoint directory holds, and how a run resumes.

Layout of `<storage_path>/<name>/epoch_NNNN/` (every file loads with torch.load(weights_only=True)):
  meta.json          rank 0: format, completed epochs, space, strategy, world size
  supernet.pt        rank 0: `save_supernet` format (loadable by `load_supernet_weights`)
  train_state.pt     rank 0: optimizers, schedulers, AMP scaler, strategy state, step counter
  rng_rank<R>.pt     every rank: its torch / CUDA / numpy / python RNG states
Every worker reports its part; Ray merges them into the one directory.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raynas.errors import UserError
from raynas.supernets.checkpoint import read_checkpoint, save_supernet

FORMAT = "raynas-train/1"
META_FILE = "meta.json"
SUPERNET_FILE = "supernet.pt"
STATE_FILE = "train_state.pt"
RNG_FILE = "rng_rank{rank}.pt"


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


# ---- RNG states -----------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states; numpy/python ones as JSON (their big ints are not weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps([py_state[0], list(py_state[1]), py_state[2]]),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


# ---- writing ----------------------------------------------------------------------------------------
def write_checkpoint(directory: str | Path, *, rank: int, epoch: int, world_size: int,
                     supernet, trained_module: torch.nn.Module, train_state: dict[str, Any],
                     strategy_name: str) -> None:
    """Write this rank's part of the epoch checkpoint into `directory` (a fresh temp dir)."""
    directory = Path(directory)
    torch.save(capture_rng(), directory / RNG_FILE.format(rank=rank))
    if rank != 0:
        return
    save_supernet(supernet, directory / SUPERNET_FILE, extra={"epoch": epoch, "strategy": strategy_name})
    state = dict(train_state)
    if trained_module is not supernet:  # a strategy wrapper (router, LoRA...) holds more than the supernet
        state["model"] = trained_module.state_dict()
    torch.save(state, directory / STATE_FILE)
    # meta.json last: its presence marks the rank-0 files as written.
    (directory / META_FILE).write_text(json.dumps({
        "format": FORMAT, "epoch": epoch, "world_size": world_size,
        "space": supernet.space.name, "strategy": strategy_name,
    }))


# ---- finding and reading ------------------------------------------------------------------------------
def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's meta.json if the directory holds a complete rank-0 checkpoint, else None."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("epoch"), int):
        return None
    if not all((directory / f).is_file() and (directory / f).stat().st_size > 0
               for f in (SUPERNET_FILE, STATE_FILE)):
        return None
    return meta


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint directory of `run_dir` with the most completed epochs, if any.

    A fresh re-run with the same storage path and name resumes from it, independent of Ray's
    own run snapshot (which a killed driver may have left behind or never written).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in run_dir.iterdir():
        if child.is_dir():
            meta = read_meta(child)
            if meta is not None and (best is None or meta["epoch"] > best[0]):
                best = (meta["epoch"], child)
    return best[1] if best else None


@dataclass
class ResumeState:
    directory: Path
    epoch: int                      # completed epochs
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]  # state dict of the trained module
    train_state: dict[str, Any]
    rng: dict[str, Any] | None      # this rank's RNG states (None: saved with another world size)


def load_resume_state(directory: str | Path, rank: int, space_name: str) -> ResumeState:
    """Read a checkpoint for rank `rank`; refuses one written for another space."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta is None:
        raise UserError(f"resume: {directory} is not a complete raynas training checkpoint")
    if meta["space"] != space_name:
        raise UserError(f"resume: {directory} was trained on space '{meta['space']}', not '{space_name}'; "
                        "use another run name")
    train_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model = train_state.pop("model", None)
    if model is None:  # the trained module is the supernet itself
        model = read_checkpoint(directory / SUPERNET_FILE)["model"]
    rng_path = directory / RNG_FILE.format(rank=rank)
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    return ResumeState(directory, meta["epoch"], meta, model, train_state, rng)
