"""`raynas tune`: a Ray Tune sweep of the big/little loss weights, distillation temperature, routing
threshold and router hyper-parameters, with Optuna's TPE sampler (`OptunaSearch`) proposing trials and
ASHA stopping unpromising ones early. Each trial trains through Ray Train (see raynas.tune.trial).

<storage_path>/<name>/ (a local path or a URI such as s3://bucket/tune/name; written through raynas.storage)
  trials.parquet     one row per trial: its parameters, last metrics (validation ones when it finished)
  results.parquet    every report of every trial (epochs, then the validation row)
  best.yaml          the training config with the best trial's values filled in (`raynas train best.yaml`)
  train_runs/        each trial's Ray Train run (checkpoints, metrics.parquet, supernet.pt)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raynas import storage
from raynas.tune.config import apply_params


def _distribution(spec: dict):
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "quniform":
        return tune.quniform(*args)
    if kind == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    return tune.choice(list(args))


def _plain(value: Any) -> Any:
    """numpy scalars (Optuna's samples, metrics computed with numpy) -> Python, so YAML gets plain values."""
    return value.item() if isinstance(value, np.generic) else value


def _tuner(sweep: dict[str, Any]):
    """Optuna's TPE proposing the trials, ASHA (or FIFO) stopping them, each trial `biglittle_trial`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raynas.tune.trial import biglittle_trial

    sched = sweep["scheduler"]
    if sched["name"] == "asha":
        # stop_last_trials=False: a trial that trained all epochs still reports its validation row
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep["train"]["epochs"],
                                  grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"],
                                  stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(biglittle_trial, sweep=sweep),
                                    {"cpu": sweep["trial_cpus"]})
    # Tune keeps its experiment state in the same store as the trials' runs and the results.
    storage_path, storage_filesystem = storage.filesystem_for_ray(sweep["storage_path"])
    return tune.Tuner(
        trainable,
        param_space={k: _distribution(v) for k, v in sweep["param_space"].items()},
        tune_config=tune.TuneConfig(metric=sweep["metric"], mode=sweep["mode"],
                                    search_alg=OptunaSearch(seed=sweep["search_alg"]["seed"]),
                                    scheduler=scheduler, num_samples=sweep["num_samples"],
                                    max_concurrent_trials=sweep["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=sweep["name"], storage_path=storage_path,
                                  storage_filesystem=storage_filesystem, verbose=1),
    )


def _trial_row(result) -> dict[str, Any]:
    metrics = {k: _plain(v) for k, v in (result.metrics or {}).items() if not isinstance(v, dict)}
    row = {"trial_id": metrics.get("trial_id"), "status": "error" if result.error else "ok",
           **{f"config/{k}": _plain(v) for k, v in (result.config or {}).items()},
           **{k: v for k, v in metrics.items() if k != "config"}}
    if result.error:
        row["error"] = str(result.error).splitlines()[0][:500]
    return row


def _trial_history(result, trial_id: Any) -> pd.DataFrame:
    frame = result.metrics_dataframe.copy()
    frame["trial_id"] = trial_id
    # epoch rows carry the strategy's training-batch estimate of the score; the last, validation
    frame["score_source"] = frame.get("score_source", pd.Series(index=frame.index, dtype=object)) \
        .fillna("train_batches")
    # nested values (Tune's config column) do not go to Parquet
    return frame.drop(columns=[c for c in frame.columns if frame[c].map(lambda v: isinstance(v, dict)).any()])


def _write_best(sweep: dict[str, Any], best: dict[str, Any], finished: int, trials: int, out_dir: str) -> dict:
    """best.yaml: the training config with the best trial's values; returns what the summary adds."""
    params = {k[len("config/"):]: best[k] for k in best if k.startswith("config/")}
    best_cfg = apply_params(sweep["train"], params)
    best_cfg["name"] = f"{sweep['name']}_best"
    header = (f"# best of raynas tune '{sweep['name']}' ({finished} finished of {trials} trials): "
              f"trial {best['trial_id']}\n# validation: score {best['score']:.4f}, routed accuracy "
              f"{best['val_accuracy']:.4f}, routing ratio {best['val_routing_ratio']:.3f}, "
              f"E[MACs]/MACs(big) {best['val_e_macs_frac']:.3f}\n# swept: "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
              + "\n")
    text = header + yaml.safe_dump(best_cfg, sort_keys=False)
    location = storage.write_text(storage.join(out_dir, "best.yaml"), text)
    return {"best_trial": best["trial_id"], "best_score": best["score"], "best_params": params,
            "best_val_accuracy": best["val_accuracy"], "best_config": location}


def run_tune(sweep: dict[str, Any]) -> dict[str, Any]:
    """Run the validated sweep (see raynas.tune.config); returns a summary with the best trial."""
    from raynas.hw.devices import init_local_ray

    started = time.time()
    storage.check_writable(sweep["storage_path"], "storage_path")  # one line now, not after the trials
    init_local_ray()
    out_dir = storage.join(sweep["storage_path"], sweep["name"])
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout keeps the JSON summary
        grid = _tuner(sweep).fit()
    trials = [_trial_row(result) for result in grid]
    history = [_trial_history(result, row["trial_id"]) for result, row in zip(grid, trials)
               if result.metrics_dataframe is not None]
    storage.write_pandas(storage.join(out_dir, "trials.parquet"), pd.DataFrame(trials))
    if history:
        storage.write_pandas(storage.join(out_dir, "results.parquet"), pd.concat(history, ignore_index=True))

    finished = [t for t in trials if t.get("score_source") == "validation" and not math.isnan(t.get("score", math.nan))]
    summary: dict[str, Any] = {"name": sweep["name"], "dir": out_dir, "trials": len(trials),
                               "finished": len(finished), "stopped_early": len(trials) - len(finished),
                               "wall_s": round(time.time() - started, 1)}
    if finished:
        best = max(finished, key=lambda t: t["score"])
        summary.update(_write_best(sweep, best, len(finished), len(trials), out_dir))
    else:
        print("raynas tune: no trial finished its training; no best.yaml written", file=sys.stderr)
    return summary
