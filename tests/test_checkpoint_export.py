"""One loader for every checkpoint: `raynas export --checkpoint` on hypernet, MoLE, size-specific and big/little
checkpoints (the network is rebuilt as trained), and one `checkpoint: <file>: ...` line for every bad file."""

import io
import json
import os
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from _biglittle_tiny import TINY as MBV3_TINY

from raynas.cli import main as cli_main
from raynas.space import load_space, space_from_config
from raynas.supernets import build_supernet
from raynas.supernets.checkpoint import save_supernet

NB201 = {"name": "nb201-export-test", "family": "nb201", "resolution": 8, "num_classes": 5, "in_channels": 3,
         "channels": [6, 12], "cells_per_stage": 1, "nodes": 4,
         "ops": ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]}
AUTOFORMER = {"name": "af-export-test", "family": "autoformer", "resolution": 32, "num_classes": 10,
              "patch_size": 16, "head_dim": 8, "qkv_bias": True, "global_pool": "mean", "embed_dim": [16, 24],
              "depth": [1, 2], "num_heads": [1, 2], "mlp_ratio": [1.5, 2.0]}
HYPERNET = {"h": 8, "n": 4, "unit": 4, "mixer_depth": 1}
MOLE = {"rank": 2, "alpha": 2.0, "router_embed": 8, "router_hidden": 8}


def _space_file(tmp_path, cfg) -> str:
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    """Weights unlike a fresh build's (zero LoRA experts would hide a checkpoint that loads nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _export(tmp_path, capsys, space: str, arch, checkpoint: str) -> np.ndarray:
    """Export through the CLI; returns the ONNX model's output on a fixed input."""
    out = tmp_path / "subnet.onnx"
    assert cli_main(["export", "--space", space, "--arch", arch.to_json(), "--out", str(out),
                     "--checkpoint", checkpoint]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["path"].endswith("subnet.onnx") and result["params"] > 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": _input(session)})[0]


def _input(session) -> np.ndarray:
    shape = [1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _expected(supernet, arch, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return supernet.eval().extract(arch).eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("kind", ["hypernet", "mole", "size-specific", "biglittle"])
def test_export_rebuilds_the_network_the_checkpoint_was_trained_as(kind, tmp_path, capsys):
    torch.manual_seed(0)
    if kind == "hypernet":
        cfg, net = NB201, build_supernet(space_from_config(NB201), hypernet=HYPERNET)
    elif kind == "mole":
        cfg, net = AUTOFORMER, build_supernet(space_from_config(AUTOFORMER), mole=MOLE)
    elif kind == "size-specific":  # what `raynas train` with a chain (train/inherit) saves per space
        cfg, net = None, build_supernet(load_space("autovit-xxs", resolution=32, num_classes=10))
    else:
        from raynas.biglittle.coupling import CoupledSupernet

        cfg, net = MBV3_TINY, CoupledSupernet(space_from_config(MBV3_TINY), coupling="sibling")
    _perturb(net)
    checkpoint = save_supernet(net, tmp_path / "supernet.pt", extra={"epoch": 1})
    space = "autovit-xxs" if cfg is None else _space_file(tmp_path, cfg)
    arch = net.space.sample(np.random.default_rng(1))
    got = _export(tmp_path, capsys, space, arch, checkpoint)
    # The exported subnet computes what the trained network's subnet computes (a pair: its big member).
    member = net.big_net if kind == "biglittle" else net
    x = _input(ort.InferenceSession(str(tmp_path / "subnet.onnx"), providers=["CPUExecutionProvider"]))
    np.testing.assert_allclose(got, _expected(member, arch, x), atol=1e-4, rtol=1e-4)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def nb201_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_supernet(build_supernet(space_from_config(NB201)), tmp_path / "good.pt"), _space_file(tmp_path, NB201)


def _export_fails(tmp_path, space: str, checkpoint: str) -> int:
    arch = space_from_config(NB201).max_arch().to_json()
    return cli_main(["export", "--space", space, "--arch", arch, "--out", str(tmp_path / "x.onnx"),
                     "--checkpoint", checkpoint])


def test_a_checkpoint_missing_an_entry_is_one_line(nb201_checkpoint, tmp_path, capsys):
    good, space = nb201_checkpoint
    state = torch.load(good, weights_only=True)
    del state["num_classes"]
    bad = tmp_path / "no-classes.pt"
    torch.save(state, bad)
    assert _export_fails(tmp_path, space, str(bad)) == 2
    line = _one_error_line(capsys)
    assert line == f"raynas: error: checkpoint: {bad}: missing entry 'num_classes'; allowed: a checkpoint written " \
                   "by `raynas train`"


def test_weights_that_do_not_fit_the_space_are_one_line(nb201_checkpoint, tmp_path, capsys):
    good, space = nb201_checkpoint
    state = torch.load(good, weights_only=True)
    state["space_config"] = {**state["space_config"], "channels": [8, 16]}  # same name, other widths
    bad = tmp_path / "other-widths.pt"
    torch.save(state, bad)
    assert _export_fails(tmp_path, space, str(bad)) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"raynas: error: checkpoint: {bad}: its weights do not fit the supernet of space "
                           f"'{NB201['name']}' (size mismatch for "), line


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_without_running_code_or_warnings(nb201_checkpoint, tmp_path, capsys):
    _, space = nb201_checkpoint
    marker = tmp_path / "pwned"
    for name, data in (("zip.pt", None), ("pickle.pt", pickle.dumps({"format": "raynas-supernet/1",
                                                                       "x": _Payload(marker)}))):
        bad = tmp_path / name
        if data is None:  # torch's own (zip) container around the same payload
            buffer = io.BytesIO()
            torch.save({"format": "raynas-supernet/1", "x": _Payload(marker)}, buffer)
            data = buffer.getvalue()
        bad.write_bytes(data)
        assert _export_fails(tmp_path, space, str(bad)) == 2
        line = _one_error_line(capsys)  # no torch warning lines before it
        assert line.startswith(f"raynas: error: checkpoint: {bad}: not a raynas checkpoint (unreadable or unsafe")
    assert not marker.exists()


def test_a_checkpoint_of_another_space_names_both(nb201_checkpoint, tmp_path, capsys):
    good, _ = nb201_checkpoint
    other = _space_file(tmp_path, {**NB201, "name": "nb201-other"})
    assert _export_fails(tmp_path, other, good) == 2
    assert _one_error_line(capsys) == (f"raynas: error: --checkpoint: {good} was trained on space "
                                       f"'{NB201['name']}', not 'nb201-other'")
