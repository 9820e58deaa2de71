"""Top-1 accuracy of an ONNX model in onnxruntime, and the training images that calibrate an INT8 conversion.

What a board answers is the deployed model's, not the PyTorch subnet's: after FP16 or INT8 conversion
(raynas.hw.precision) a subnet's accuracy is measured on the converted graph itself. Evaluator actors and
`raynas export` call this on arrays they already hold (normalised images, labels), so the module imports
neither torch nor the supernets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import onnxruntime as ort

from raynas import config as c
from raynas import storage

DEFAULT_BATCH_SIZE = 256
CALIBRATION_BATCH_SIZE = 16  # images per calibration batch: onnxruntime's calibrator reads one at a time


def ort_session(model: str | os.PathLike | bytes, threads: int = 1,
                providers: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session of a model file (local path) or of the model's bytes, quiet, `threads` intra-op
    threads (one by default: measurements and evaluator actors share their node's cores)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])


def _model_bytes(model: str | os.PathLike | bytes) -> bytes:
    return model if isinstance(model, bytes) else storage.read_bytes(model, "model")


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    """The input's batch size when the graph fixes it (an export without a dynamic batch axis), else None."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def _check_arrays(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> None:
    wanted = session.get_inputs()[0].shape
    if images.ndim != len(wanted):
        c.fail("images", f"shape {images.shape} has {images.ndim} dims", f"{len(wanted)} dims, as the model's "
               f"input {wanted}")
    fixed = [w if isinstance(w, int) and w > 0 else None for w in wanted[1:]]
    if any(w is not None and w != got for w, got in zip(fixed, images.shape[1:])):
        c.fail("images", f"shape {images.shape} does not fit the model's input {wanted}",
               "images of the model's channels and resolution")
    if len(images) == 0 or len(images) != len(labels):
        c.fail("labels", f"{len(labels)} labels for {len(images)} images", "one label per image, at least one")


def onnx_accuracy(model: str | os.PathLike | bytes, images: np.ndarray, labels: np.ndarray,
                  batch_size: int = DEFAULT_BATCH_SIZE, providers: list[str] | None = None,
                  threads: int = 1) -> float:
    """Top-1 accuracy (0..1) of the ONNX `model` (its bytes, or a local path or URI) on `images` (N, C, H, W,
    normalised as the model was trained) and their integer `labels` (N), run in onnxruntime.

    A graph with a fixed batch size is fed batches of that size (the last one padded, its padding's answers
    dropped); a dynamic batch axis takes `batch_size` images at a time.
    """
    c.integer(batch_size, "batch_size", 1)
    session = ort_session(_model_bytes(model), threads, providers)
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    _check_arrays(session, images, labels)
    name = session.get_inputs()[0].name
    fixed = _fixed_batch(session)
    step = fixed or batch_size
    correct = 0
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - count, *chunk.shape[1:]), np.float32)])
        logits = session.run(None, {name: chunk})[0][:count]
        correct += int((logits.argmax(axis=-1) == labels[start:start + count]).sum())
    return correct / len(images)


def calibration_batches(images: np.ndarray, n: int, batch_size: int = CALIBRATION_BATCH_SIZE,
                        seed: int = 0) -> list[np.ndarray]:
    """`n` images drawn (seeded, without replacement; all of them if there are fewer) from `images`, which
    should be training images: INT8 activation ranges fitted on validation images would leak them into the
    accuracy measured on them. Returned as float32 batches of at most `batch_size`, for
    raynas.hw.precision.convert."""
    c.integer(n, "calibration_images", 1)
    c.integer(batch_size, "batch_size", 1)
    if len(images) == 0:
        c.fail("images", "no calibration images", "at least one training image")
    rng = np.random.default_rng(seed)
    chosen = np.asarray(images, dtype=np.float32)[np.sort(rng.permutation(len(images))[:n])]
    return [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]


def labelled_arrays(batches: Iterable, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) as numpy arrays from (images, labels) batches of tensors (raynas.data.Batches: already
    normalised), the first `limit` images if given."""
    images, labels, seen = [], [], 0
    for x, y in batches:
        images.append(np.asarray(x.detach().cpu(), dtype=np.float32))
        labels.append(np.asarray(y.detach().cpu()))
        seen += len(images[-1])
        if limit is not None and seen >= limit:
            break
    if not images:
        c.fail("data", "the split holds no images", "a split with at least one image")
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]
