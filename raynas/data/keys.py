"""Seeded per-row keys: every random choice about a row is a hash of the row's stable id.

The hold-out split, capped and BN-calibration subsets, each epoch's order and each epoch's augmentation
are all functions of (seed, ..., row id). None of them depends on which node reads the row, how Ray Data
cut the data into blocks, how many CPUs the cluster has, or whether the run was resumed, so they are the
same wherever and whenever they are computed.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser: a bijection on uint64 whose outputs pass statistical tests of randomness.
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def row_keys(ids: np.ndarray, *salt: int) -> np.ndarray:
    """A pseudo-random uint64 per id, fixed by the salt (seed, purpose, epoch, ...)."""
    with np.errstate(over="ignore"):
        key = np.uint64(0)
        for s in salt:
            key = _splitmix(np.asarray(key ^ (np.uint64(s & 0xFFFFFFFFFFFFFFFF) + _GOLDEN), dtype=np.uint64))
        return _splitmix(np.asarray(ids).astype(np.int64).view(np.uint64) ^ key)


def smallest(ids: np.ndarray, n: int, *salt: int) -> tuple[np.ndarray, int]:
    """The `n` ids with the smallest keys (a seeded random subset of exactly n), and the largest key
    among them: a row belongs to the subset iff its key is <= that threshold."""
    keys = row_keys(ids, *salt)
    order = np.argsort(keys, kind="stable")[:n]
    return np.sort(np.asarray(ids)[order]), int(keys[order[-1]]) if n else -1


def in_subset(ids: np.ndarray, threshold: int, *salt: int) -> np.ndarray:
    return row_keys(ids, *salt) <= np.uint64(threshold) if threshold >= 0 else np.zeros(len(ids), bool)


def text_id(text: str) -> int:
    """A stable 63-bit id of a string (e.g. a file's path under the data root)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def bytes_ids(values) -> np.ndarray:
    """Stable 63-bit ids of byte strings (e.g. a Parquet row's encoded image and label)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(v, digest_size=8).digest(), "little") >> 1 for v in values),
                       dtype=np.int64, count=len(values))


# Salts of the different uses of a seed, so that e.g. the hold-out and the BN subset are independent.
HOLDOUT, CAP, SUBSET, ORDER, AUGMENT = 1, 2, 3, 4, 5
