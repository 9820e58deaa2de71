import os

import numpy as np
import pytest
import torch

# Tests run on 2 cores next to Ray workers: one intra-op thread keeps timings sane.
torch.set_num_threads(1)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        # Workers import test modules (actor classes defined in tests) from this directory.
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        pythonpath = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 resources={"device:local-cpu": 1}, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_nb201_yaml(tmp_path_factory):
    """The NB201 cell space on a tiny skeleton (C=4, one cell per stage): a space YAML path for fast
    training tests. Same dims and ops as the built-in `nb201`."""
    import yaml

    from raynas.space.loader import builtin_spaces_dir

    cfg = yaml.safe_load((builtin_spaces_dir() / "nb201.yaml").read_text())
    cfg.update(name="nb201-tiny", channels=[4, 8, 16], cells_per_stage=1, resolution=16, num_classes=10)
    path = tmp_path_factory.mktemp("spaces") / "nb201-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
