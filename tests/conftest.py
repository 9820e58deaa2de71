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


# Ray workers import actor/strategy classes defined in test modules: they inherit this PYTHONPATH
# from the raylet that any test's ray.init starts.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)


def start_local_ray():
    """A real local Ray (2 CPUs, like CI) advertising this machine as device `local-cpu`.

    Reuses the running instance when it is such a one; a test module that needed another shape of
    cluster (e.g. the two-node one in test_hw) may have replaced it, and then it is restarted.
    """
    import ray

    if ray.is_initialized():
        if ray.cluster_resources().get("device:local-cpu") and len(ray.nodes()) == 1:
            return ray
        ray.shutdown()
    # address="local": never join a cluster that some `ray start` left running on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"device:local-cpu": 1})
    return ray


@pytest.fixture
def ray_local():
    yield start_local_ray()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
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
