"""Training config validation before any compute, and the `raynas train` / pipeline entry points."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raynas.cli import main as raynas_main
from raynas.errors import ConfigError, UserError
from raynas.space import load_space
from raynas.supernets import build_supernet
from raynas.train.checkpointing import find_latest_checkpoint, write_checkpoint
from raynas.train.config import load_train_config, validate_train_config
from raynas.train.trainer import plan_run

ROOT = Path(__file__).resolve().parents[1]
BASE = {"space": "nb201", "epochs": 1, "name": "t"}


def test_defaults_filled():
    cfg = validate_train_config(BASE)
    assert cfg["strategy"] == {"name": "uniform"} and cfg["data"]["name"] == "digits"
    assert cfg["eval"]["bn_samples"] == 2048 and cfg["scaling"]["num_workers"] == 1
    assert Path(cfg["storage_path"]).is_absolute()


@pytest.mark.parametrize("change, field", [
    ({"epoch": 3}, "epoch: unknown field"),
    ({"epochs": 0}, "epochs: got 0; allowed: an integer >= 1"),
    ({"space": None}, "space: missing"),
    ({"strategy": "spos"}, "strategy.name: unknown 'spos'"),
    ({"strategy": {"name": "sandwich", "num_random": -2}}, "strategy.num_random"),
    ({"strategy": {"name": "fair", "paths": 2}}, "strategy.paths: unknown field"),
    ({"optimizer": {"name": "lamb"}}, "optimizer.name: 'lamb' is not allowed"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr"),
    ({"optimizer": {"momentun": 0.9}}, "optimizer.momentun: unknown field"),
    ({"scheduler": {"warmup_epochs": 5}}, "scheduler.warmup_epochs"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
    ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu: got 'yes'; allowed: true or false"),
    ({"failure": {"max_failures": "many"}}, "failure.max_failures"),
    ({"checkpoint": {"num_to_keep": 0}}, "checkpoint.num_to_keep"),
    ({"eval": {"bn_samples": 0}}, "eval.bn_samples"),
    ({"precision": "fp8"}, "precision: 'fp8' is not allowed"),
    ({"data": {"name": "imagenet"}}, "data.name: 'imagenet' is not allowed"),
    ({"name": "a/b"}, "name: got 'a/b'; allowed: a run name"),
    ({"storage_path": ""}, "storage_path: got ''; allowed: a local path or a URI"),
    ({"strategy": "raynas.train.strategies.fair:FairStrategy"}, "strategy.name: 'raynas.train.strategies.fair:"),
])
def test_config_errors_are_one_line_naming_the_field(change, field):
    with pytest.raises(ConfigError) as info:
        validate_train_config({**BASE, **change})
    assert field in str(info.value) and "\n" not in str(info.value)


def test_plan_checks_space_supernet_options_and_fair_paths(tmp_path):
    with pytest.raises(UserError, match="space: unknown 'nb202'"):
        plan_run({**BASE, "space": "nb202", "storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="^supernet: "):
        plan_run({**BASE, "supernet": {"no_such_option": 1}, "storage_path": str(tmp_path)})
    from raynas.train.strategies import build_strategy

    with pytest.raises(ConfigError, match="strategy.paths_per_step"):
        build_strategy({"name": "fair", "paths_per_step": 2}, load_space("nb201"), 0)


def test_rerun_with_another_space_is_refused(tmp_path, tiny_nb201_yaml):
    space = load_space(tiny_nb201_yaml)
    ckpt = tmp_path / "runs" / "t" / "epoch_0001"
    ckpt.mkdir(parents=True)
    net = build_supernet(space)
    write_checkpoint(ckpt, rank=0, epoch=1, world_size=1, supernet=net, trained_module=net,
                     train_state={"epoch": 1}, strategy_name="uniform")
    assert find_latest_checkpoint(tmp_path / "runs" / "t") == str(ckpt)
    plan = plan_run({**BASE, "space": tiny_nb201_yaml, "storage_path": str(tmp_path / "runs")})
    assert plan.resume_dir == str(ckpt) and plan.resume_epoch == 1
    with pytest.raises(ConfigError, match="trained space 'nb201-tiny', not 'nb201'"):
        plan_run({**BASE, "storage_path": str(tmp_path / "runs")})
    # Each rank's RNG file loads weights_only.
    assert torch.load(ckpt / "rng_rank0.pt", weights_only=True)["torch"].dtype == torch.uint8


def test_load_config_overrides_and_relative_space(tmp_path, tiny_nb201_yaml):
    (tmp_path / "space.yaml").write_text(Path(tiny_nb201_yaml).read_text())
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"space": "space.yaml", "epochs": 2, "scaling": {"num_workers": 1}}))
    cfg = load_train_config(path, {"scaling.num_workers": 3, "name": None, "storage_path": str(tmp_path)})
    assert cfg["name"] == "exp" and cfg["scaling"]["num_workers"] == 3
    assert cfg["space"] == str((tmp_path / "space.yaml").resolve())


def test_cli_exits_2_with_one_line_before_any_compute(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"space": "nb201", "epochs": 1, "optimizer": {"lr": "fast"}}))
    assert raynas_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raynas: error: optimizer.lr") and "\n" not in err
    assert raynas_main(["train", str(path.with_name("missing.yaml"))]) == 2
    path.write_text("space: [unclosed")
    assert raynas_main(["train", str(path)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"space": "nb201", "epochs": 1}))
    assert raynas_main(["train", str(good), "--num-workers", "0"]) == 2
    assert "--num-workers: got 0" in capsys.readouterr().err


def test_pipeline_script_validates_the_same_way(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_supernet", ROOT / "pipelines" / "train_supernet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"space": "nb201", "epochs": 1, "strategy": "bogus"}))
    assert module.main(["--config", str(path)]) == 2
    assert "strategy.name: unknown 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("config", [ROOT / "pipelines" / "configs" / f"train_{s}.yaml"
                                    for s in ("uniform", "fair", "sandwich")], ids=lambda p: p.stem)
def test_example_configs_are_valid(config, tmp_path):
    cfg = load_train_config(config, {"storage_path": str(tmp_path)})
    plan = plan_run(cfg)
    assert plan.cfg["data"]["name"] == "digits" and plan.num_classes == 10


CMDLINE_PLUGIN = """
from raynas.train.strategies import register_strategy
from raynas.train.strategies.uniform import UniformStrategy


@register_strategy
class CmdlineUniform(UniformStrategy):
    name = "cmdline-uniform"
"""
ENTRY_POINT_PLUGIN = """
from raynas.train.strategies.uniform import UniformStrategy


class PackagedUniform(UniformStrategy):
    name = "packaged-uniform"
"""
# Importing it is the harm a config must not be able to cause.
IMPORT_MARKER_MODULE = "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\nclass X: pass\n"


def test_strategy_plugins_come_from_entry_points_or_the_command_line_never_the_config(tmp_path, monkeypatch,
                                                                                       capsys):
    import raynas.train.strategies as strategies
    from raynas.train.strategies import get_strategy_class, strategy_names

    strategy_names()  # built-ins registered; the plug-ins below go into a copy the test throws away
    monkeypatch.setattr(strategies, "STRATEGIES", strategies.STRATEGIES.copy())
    (tmp_path / "cmdline_plugin.py").write_text(CMDLINE_PLUGIN)
    (tmp_path / "packaged_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    (tmp_path / "config_named.py").write_text(IMPORT_MARKER_MODULE)
    # An installed distribution declaring an entry point (what `pip install` of a plug-in package leaves).
    dist = tmp_path / "raynas_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: raynas-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[raynas.strategies]\npackaged = packaged_plugin:PackagedUniform\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("cmdline_plugin", "packaged_plugin", "config_named"):
        monkeypatch.delitem(sys.modules, module, raising=False)

    def config(strategy, **fields):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"space": "nb201", "epochs": 1, "strategy": strategy,
                                        "storage_path": str(tmp_path / "runs"), **fields}))
        return str(path)

    # A `module:Class` in a config file is refused in one line, and nothing is imported from it.
    assert raynas_main(["train", config("config_named:X")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raynas: error: strategy.name: 'config_named:X' names code to import") and "\n" not in err
    assert "--plugin" in err and "raynas.strategies" in err
    assert not (tmp_path / "imported").exists() and "config_named" not in sys.modules

    # A plug-in module works only when the command line names it.
    assert raynas_main(["train", config("cmdline-uniform")]) == 2
    assert "strategy.name: unknown 'cmdline-uniform'" in capsys.readouterr().err
    # (a bad scaling.num_workers stops the run at a later field: the strategy itself validated)
    assert raynas_main(["train", config("cmdline-uniform", scaling={"num_workers": 0}), "--plugin",
                        "cmdline_plugin"]) == 2
    assert capsys.readouterr().err.startswith("raynas: error: scaling.num_workers")
    assert raynas_main(["train", config("uniform"), "--plugin", "no_such_plugin_module"]) == 2
    assert capsys.readouterr().err.startswith("raynas: error: --plugin: cannot import module 'no_such_plugin_module'")

    # An installed package's entry point is found by its name alone.
    assert get_strategy_class("packaged").__name__ == "PackagedUniform"
    assert validate_train_config({**BASE, "strategy": "packaged"})["strategy"] == {"name": "packaged"}
    with pytest.raises(ConfigError, match=r"strategy.name: unknown 'nope'; allowed: \[.*'packaged'"):
        get_strategy_class("nope")
