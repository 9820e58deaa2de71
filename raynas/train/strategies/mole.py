"""`mole` (seed 003, TAS-LoRA): defined in `raynas.train.mole`; importing it registers it."""

from raynas.train.mole import MoLEStrategy  # noqa: F401
