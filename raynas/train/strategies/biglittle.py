"""Registers the big/little strategies ('biglittle', 'single-arch'), defined in raynas.biglittle.train."""

from raynas.biglittle.train import BigLittleStrategy, SingleArchStrategy  # noqa: F401
