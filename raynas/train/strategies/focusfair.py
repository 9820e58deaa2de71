"""`focusfair` (seed 000 Algorithm 1): defined in `raynas.train.focusfair`; importing it registers it."""

from raynas.train.focusfair import FocusFairStrategy  # noqa: F401
