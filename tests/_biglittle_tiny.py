"""A tiny `mbv3` space for the big/little tests: the family of mbv3-biglittle with a small table, so
every coupling, router and export runs in well under a second on a shared 2-core CPU."""

from raynas.space import space_from_config

TINY = {
    "name": "mbv3-tiny-bl", "family": "mbv3", "resolution": 16, "num_classes": 10,
    "resolution_choices": [128], "width_choices": [0.5, 1.0], "depth_choices": [1, 2],
    "kernel_choices": [3, 5], "expand_choices": [1, 2], "channel_divisor": 4, "se_reduction": 4,
    "stem": {"channels": 8, "kernel": 3, "stride": 2, "act": "hswish"},
    "first_block": {"channels": 8, "kernel": 3, "expand": 1, "act": "relu", "se": False},
    "stages": [{"channels": 12, "stride": 2, "act": "relu", "se": False},
               {"channels": 16, "stride": 2, "act": "hswish", "se": True},
               {"channels": 24, "stride": 1, "act": "hswish", "se": True}],
    "head": {"expand": 32, "features": 48, "act": "hswish", "dropout": 0.0},
}


def tiny_space():
    return space_from_config(dict(TINY))
