"""`raynas tune`: a real 2-trial Ray Tune sweep (OptunaSearch + ASHA) whose trials train a tiny coupled
big/little supernet through Ray Train; trial results in Parquet, the best configuration as YAML."""

import json

import pandas as pd
import pytest
import yaml
from _biglittle_tiny import TINY

from raynas import storage
from raynas.cli import main as cli_main
from raynas.errors import ConfigError
from raynas.train.config import load_train_config
from raynas.tune.config import apply_params, load_tune_config


def write_configs(tmp_path, **tune_changes):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(TINY))
    train = {"name": "bl", "storage_path": str(tmp_path / "runs"), "space": "space.yaml",
             "data": {"name": "synthetic", "num_samples": 48, "num_val_samples": 24, "image_size": 8,
                      "channels": 3, "batch_size": 16, "eval_batch_size": 24},
             "strategy": {"name": "biglittle", "coupling": "partial", "splits": [2], "router": "learned",
                          "num_random": 0},
             "epochs": 2, "steps_per_epoch": 2, "optimizer": {"name": "adamw", "lr": 0.003},
             "eval": {"bn_samples": 24, "num_random": 0, "every": 0},
             "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    tune = {"name": "sweep", "storage_path": str(tmp_path / "tune"), "train": "train.yaml",
            "param_space": {"alpha": {"loguniform": [0.5, 2.0]}, "beta": {"uniform": [0.0, 1.0]},
                            "gamma": {"uniform": [0.1, 1.0]}, "temperature": {"uniform": [1.0, 4.0]},
                            "tau": {"uniform": [0.3, 0.9]}, "router_hidden": {"choice": [4, 8]}},
            "num_samples": 2, "max_concurrent_trials": 2,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "search_alg": {"name": "optuna", "seed": 0},
            "evaluation": {"pair": "extreme", "bn_samples": 24}, "trial_cpus": 0.25, **tune_changes}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tune))
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray of 2 CPUs (address="local": never another session's cluster on this machine)."""
    import ray

    from raynas.hw.devices import init_local_ray

    started = init_local_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_two_trial_optuna_asha_sweep(local_ray, tmp_path, capsys):
    path = write_configs(tmp_path)
    assert cli_main(["tune", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "tune" / "sweep"
    assert summary["trials"] == 2 and summary["finished"] + summary["stopped_early"] == 2

    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"ok"}
    for param in ("alpha", "beta", "gamma", "temperature", "tau", "router_hidden"):
        assert trials[f"config/{param}"].notna().all()
    assert trials["config/alpha"].between(0.5, 2.0).all() and trials["config/router_hidden"].isin([4, 8]).all()
    history = pd.read_parquet(out / "results.parquet")
    epochs = history[history["score_source"] == "train_batches"]
    assert len(epochs) >= 2 and epochs["score"].notna().all()  # ASHA saw every epoch's score

    finished = trials[trials["score_source"] == "validation"]
    assert len(finished) == summary["finished"] >= 1
    assert finished["val_accuracy"].between(0, 1).all() and finished["val_routing_ratio"].between(0, 1).all()
    best = finished.loc[finished["score"].idxmax()]
    assert summary["best_trial"] == best["trial_id"]
    # the best configuration is a valid training config carrying the best trial's values
    best_cfg = load_train_config(out / "best.yaml")
    assert best_cfg["strategy"]["alpha"] == pytest.approx(best["config/alpha"])
    assert best_cfg["strategy"]["tau"] == pytest.approx(best["config/tau"])
    assert best_cfg["strategy"]["router_hidden"] == best["config/router_hidden"]
    assert (out / "train_runs" / f"trial_{best['trial_id']}" / "supernet.pt").is_file()


@pytest.mark.usefixtures("ray_s3")
def test_sweep_keeps_trials_and_results_in_the_bucket(s3_bucket, tmp_path, capsys, monkeypatch):
    """Tune's experiment state, every trial's Ray Train run and the sweep's results go to the storage URI;
    the working directory stays empty."""
    path = write_configs(tmp_path, storage_path=f"{s3_bucket}/tune", num_samples=1, max_concurrent_trials=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli_main(["tune", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = f"{s3_bucket}/tune/sweep"
    assert summary["dir"] == out and summary["trials"] == summary["finished"] == 1
    trials = storage.read_pandas(storage.join(out, "trials.parquet"))
    assert len(trials) == 1 and trials["status"][0] == "ok" and trials["score_source"][0] == "validation"
    assert len(storage.read_pandas(storage.join(out, "results.parquet"))) >= 2
    assert summary["best_config"] == storage.join(out, "best.yaml")
    best_cfg = yaml.safe_load(storage.read_text(summary["best_config"]))
    assert best_cfg["strategy"]["tau"] == pytest.approx(trials["config/tau"][0])
    run = storage.join(out, "train_runs", f"trial_{summary['best_trial']}")
    assert {"supernet.pt", "metrics.parquet", "epoch_0002"} <= set(storage.list_dir(run))
    assert list(work.iterdir()) == []


def test_tune_config_errors_name_the_field(tmp_path):
    path = write_configs(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cases = [({"param_space": {"alpha": {"normal": [0, 1]}}}, "param_space.alpha"),
             ({"param_space": {"alpha": {"uniform": [2, 1]}}}, "param_space.alpha.uniform"),
             ({"param_space": {"tau": {"uniform": [0.5, 1.5]}}}, "strategy.tau"),
             ({"param_space": {"optimizer.lr": {"loguniform": [0, 1]}}}, "loguniform"),
             ({"scheduler": {"name": "pbt"}}, "scheduler.name"),
             ({"num_samples": 0}, "num_samples"),
             ({"bogus": 1}, "config.bogus")]
    for change, field in cases:
        bad = {**cfg, **change}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_tune_config(tmp_path / "bad.yaml")
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    train["strategy"] = {"name": "sandwich"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    with pytest.raises(ConfigError, match="biglittle"):
        load_tune_config(path)


def test_params_go_to_strategy_options_or_dotted_paths():
    cfg = apply_params({"strategy": {"name": "biglittle"}, "optimizer": {"lr": 0.1}},
                       {"alpha": 2.0, "optimizer.lr": 0.01})
    assert cfg["strategy"]["alpha"] == 2.0 and cfg["optimizer"]["lr"] == 0.01
