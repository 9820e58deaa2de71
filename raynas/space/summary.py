"""One-line arch summaries: the pieces families build their `SearchSpace.arch_summary` from.

A report row cannot print a whole arch (an mbv3 arch has 47 fields, a scanedge one 130), so each family
renders its archs as a short string of what differs between subnets (widths, depths, kernels per stage);
the full arch stays in the run's Parquet files. These helpers keep the spellings alike across families.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def short(value: Any) -> str:
    """A choice as briefly as it reads unambiguously: 4.0 -> '4', 0.75 -> '0.75', 'gelu' -> 'gelu'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def per_block(values: Iterable[Any]) -> str:
    """One field over the blocks of a stage: a single value when every block has it ('3'), else one
    value per block, run together when each is one character ('353'), '/'-separated otherwise ('3.5/4')."""
    texts = [short(v) for v in values]
    if len(set(texts)) == 1:
        return texts[0]
    return "".join(texts) if all(len(t) == 1 for t in texts) else "/".join(texts)


def compact(arch: Mapping[str, Any]) -> str:
    """The generic summary: fields that differ only by their numbers (`stage2.b3.kernel`) are one group
    (`stage#.b#.kernel`) rendered with `per_block`, in the order the fields come."""
    groups: dict[str, list[Any]] = {}
    for name, value in arch.items():
        groups.setdefault(re.sub(r"\d+", "#", name), []).append(value)
    return " ".join(f"{group}={per_block(values)}" for group, values in groups.items())
