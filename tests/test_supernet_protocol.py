"""Every built-in space honours the supernet protocol: equivalence, ONNX, cost, checkpoints."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from raynas.hw.onnx_export import export_onnx
from raynas.space import builtin_space_names, load_space
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import load_supernet, save_supernet
from raynas.supernets.counting import count_cost

TEST_RESOLUTION = 32
N_ARCHS = 10
SPACES = builtin_space_names()


@pytest.fixture(scope="module", params=SPACES)
def supernet(request):
    torch.manual_seed(0)
    space = load_space(request.param, resolution=TEST_RESOLUTION, num_classes=10)
    net = build_supernet(space)
    # Give BatchNorm real running statistics so eval-mode outputs are well scaled.
    net.train()
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, *net.input_shape()[1:]), space.sample(rng))
        net(torch.randn(4, *net.input_shape()[1:]), None)
    return net.eval()


def _archs(space, n=N_ARCHS, seed=0):
    rng = np.random.default_rng(seed)
    archs = [space.min_arch(), space.max_arch()]
    archs += [space.sample(rng) for _ in range(n - 2)]
    return archs


@torch.no_grad()
def test_extracted_subnet_matches_supernet(supernet):
    x = torch.randn(2, *supernet.input_shape()[1:], generator=torch.Generator().manual_seed(0))
    for arch in _archs(supernet.space):
        expected = supernet(x, arch)
        got = supernet.extract(arch).eval()(x)
        assert got.shape == (2, supernet.space.num_classes)
        assert torch.isfinite(expected).all()
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-5, f"{supernet.space.name} {arch.to_json()}: max diff {diff}"


def test_cost_equals_count_over_extracted_module(supernet):
    for arch in _archs(supernet.space):
        counted = count_cost(supernet.extract(arch), supernet.input_shape(1))
        assert supernet.cost(arch) == counted, arch.to_json()
    small, big = supernet.cost(supernet.space.min_arch()), supernet.cost(supernet.space.max_arch())
    assert small["params"] <= big["params"] and small["macs"] <= big["macs"]


def test_onnx_matches_pytorch(supernet, tmp_path):
    """export_onnx runs the file in onnxruntime and compares with PyTorch before keeping it."""
    for i, arch in enumerate(_archs(supernet.space, seed=3)):
        subnet = supernet.extract(arch).eval()
        out = tmp_path / f"{i}.onnx"
        result = export_onnx(subnet, supernet.input_shape(1), out, seed=i)
        assert result["max_abs_diff"] <= 1e-4 and out.stat().st_size > 0
        out.unlink()  # large subnets: keep the temporary directory small


def test_onnx_runs_batches_in_onnxruntime(supernet, tmp_path):
    subnet = supernet.extract(supernet.space.min_arch()).eval()
    out = tmp_path / "min.onnx"
    export_onnx(subnet, supernet.input_shape(1), out)
    x = np.random.default_rng(0).standard_normal(supernet.input_shape(3)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        expected = subnet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_checkpoint_round_trip(supernet, tmp_path):
    path = save_supernet(supernet, tmp_path / "supernet.pt")
    fresh = load_supernet(path)
    x = torch.randn(2, *supernet.input_shape()[1:])
    arch = supernet.space.sample(np.random.default_rng(5))
    with torch.no_grad():
        assert torch.equal(fresh(x, arch), supernet(x, arch))
    assert torch.load(path, weights_only=True)["space"] == supernet.space.name


def test_space_operators_and_encoding(supernet, rng):
    space = supernet.space
    for _ in range(20):
        a, b = space.sample(rng), space.sample(rng)
        assert space.decode(space.encode(a)) == a
        assert space.validate(json.loads(a.to_json())) == a
        for child in (space.mutate(a, rng, 0.3), space.crossover(a, b, rng)):
            assert space.validate(child.to_dict()) == child
    assert space.log10_cardinality() > 0
