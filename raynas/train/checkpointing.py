"""Training checkpoints: what one epoch's Ray checkpoint directory holds, and how a run resumes.

Layout of `<storage_path>/<name>/epoch_NNNN/`, a local path or a URI such as s3://bucket/runs/name/epoch_0003
(every file loads with torch.load(weights_only=True)):
  meta.json          rank 0: format, completed epochs, space, strategy, world size
  supernet.pt        rank 0: `save_supernet` format (loadable by `load_supernet`)
  train_state.pt     rank 0: optimizers, schedulers, AMP scaler, strategy state, step counter
  rng_rank<R>.pt     every rank: its torch / CUDA / numpy / python RNG states
Every worker reports its part through `ray.train.report`; Ray merges them into the one directory in the
run's storage. All reading goes through raynas.storage, so any node can resume a run.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raynas import storage
from raynas.errors import UserError
from raynas.supernets.checkpoint import read_checkpoint, save_supernet

FORMAT = "raynas-train/1"
META_FILE = "meta.json"
SUPERNET_FILE = "supernet.pt"
STATE_FILE = "train_state.pt"
RNG_FILE = "rng_rank{rank}.pt"
CHECKPOINT_DIR_PATTERN = re.compile(r"epoch_(\d+)")


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
def write_checkpoint(directory: str | os.PathLike, *, rank: int, epoch: int, world_size: int,
                     supernet, trained_module: torch.nn.Module, train_state: dict[str, Any],
                     strategy_name: str) -> None:
    """Write this rank's part of the epoch checkpoint into `directory`: normally a fresh local temp dir
    that `ray.train.report` then uploads into the run's storage."""
    storage.save_torch(storage.join(directory, RNG_FILE.format(rank=rank)), capture_rng())
    if rank != 0:
        return
    save_supernet(supernet, storage.join(directory, SUPERNET_FILE),
                  extra={"epoch": epoch, "strategy": strategy_name})
    state = dict(train_state)
    if trained_module is not supernet:  # a strategy wrapper (router, LoRA...) holds more than the supernet
        state["model"] = trained_module.state_dict()
    storage.save_torch(storage.join(directory, STATE_FILE), state)
    # meta.json last, with the sizes of the rank-0 files: Ray uploads the directory file by file, in no
    # set order and not atomically, so a worker killed mid-upload can leave meta.json beside a cut-off
    # supernet.pt; the sizes tell such a directory from a complete one (see `read_meta`).
    storage.write_text(storage.join(directory, META_FILE), json.dumps({
        "format": FORMAT, "epoch": epoch, "world_size": world_size,
        "space": supernet.space.name, "strategy": strategy_name,
        "sizes": {f: storage.size(storage.join(directory, f)) for f in (SUPERNET_FILE, STATE_FILE)},
    }))


# ---- finding and reading ------------------------------------------------------------------------------
def read_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's meta.json if `directory` (a local path or URI) holds a complete rank-0 checkpoint
    (its files whole, as meta.json records their sizes), else None."""
    try:
        meta = storage.read_json(storage.join(directory, META_FILE), "checkpoint")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("epoch"), int):
            return None
        # Checkpoints of older raynas versions record no sizes: any non-empty file passes for them.
        sizes = meta.get("sizes") if isinstance(meta.get("sizes"), dict) else {}
        for name in (SUPERNET_FILE, STATE_FILE):
            found = storage.size(storage.join(directory, name))
            if found == 0 or found != sizes.get(name, found):
                return None
    except storage.StorageError:
        return None
    return meta


def find_latest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint directory of `run_dir` (a local path or URI) with the most completed
    epochs, if any, as a location string.

    A fresh re-run with the same storage path and name resumes from it, on any node and in any working
    directory, independent of Ray's own run snapshot (which a killed driver may have left behind or
    never written).
    """
    epochs = sorted(((int(m.group(1)), name) for name in storage.list_dir(run_dir)
                     if (m := CHECKPOINT_DIR_PATTERN.fullmatch(name))), reverse=True)
    for _, name in epochs:  # newest first: a later one may be incomplete (rank 0 died writing it)
        directory = storage.join(run_dir, name)
        if read_meta(directory) is not None:
            return directory
    return None


@dataclass
class ResumeState:
    directory: str
    epoch: int                      # completed epochs
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]  # state dict of the trained module
    train_state: dict[str, Any]
    rng: dict[str, Any] | None      # this rank's RNG states (None: saved with another world size)


def load_resume_state(directory: str | os.PathLike, rank: int, space_name: str) -> ResumeState:
    """Read a checkpoint (a local path or URI) for rank `rank`; refuses one written for another space."""
    directory = str(directory)
    where = storage.display(directory)
    meta = read_meta(directory)
    if meta is None:
        raise UserError(f"resume: {where} is not a complete raynas training checkpoint")
    if meta["space"] != space_name:
        raise UserError(f"resume: {where} was trained on space '{meta['space']}', not '{space_name}'; "
                        "use another run name")
    train_state = storage.load_torch(storage.join(directory, STATE_FILE), "resume")
    model = train_state.pop("model", None)
    if model is None:  # the trained module is the supernet itself
        model = read_checkpoint(storage.join(directory, SUPERNET_FILE))["model"]
    rng_location = storage.join(directory, RNG_FILE.format(rank=rank))
    rng = storage.load_torch(rng_location, "resume") if storage.is_file(rng_location) else None
    return ResumeState(directory, meta["epoch"], meta, model, train_state, rng)
