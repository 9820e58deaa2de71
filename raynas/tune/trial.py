"""One Tune trial: co-train a big/little supernet through Ray Train with the trial's loss and router
settings, then judge the routed pair on the validation set.

The trial runs `TorchTrainer` (the training loop of raynas.train) with Ray Tune's `TuneReportCallback`,
so every epoch's row reaches Tune as it is reported: ASHA prunes on its `score`, the biglittle strategy's
training-batch estimate (routed accuracy at tau minus the cost penalty). A trial that finishes reports
once more with `score` measured on the validation set (BN recalibrated per model), tagged
`score_source: validation`; only those are candidates for the best configuration.
"""

from __future__ import annotations

from typing import Any

from raynas import storage
from raynas.tune.config import apply_params

TRAIN_RUNS = "train_runs"  # the sweep's subdirectory holding each trial's Ray Train run


def evaluate_trial(supernet_path: str, train_cfg: dict[str, Any], evaluation: dict[str, Any],
                   cost_penalty: float) -> dict[str, Any]:
    """Validation metrics of the trial's pair at its tau, and the score the sweep ranks."""
    from raynas.biglittle.costs import PairCostModel
    from raynas.biglittle.coupling import load_coupled
    from raynas.biglittle.evaluate import eval_data, predict_pair
    from raynas.biglittle.metrics import evaluate_routing

    model = load_coupled(supernet_path)
    space = model.space
    data = eval_data(train_cfg["data"], space.resolution, space.in_channels, evaluation["bn_samples"])
    ps = model.pair_space
    pair = ps.extreme_pair() if evaluation["pair"] == "extreme" else ps.validate(evaluation["pair"])
    tau = float(train_cfg["strategy"]["tau"])
    costs = PairCostModel(model).costs(pair)
    m = evaluate_routing(predict_pair(model, pair, data), tau, costs)
    e_frac = m["e_macs"] / max(m["macs_big"], 1.0)
    keys = ("accuracy", "routing_ratio", "routing_accuracy", "oracle_accuracy", "oracle_gap", "ece_little",
            "little_accuracy", "big_accuracy", "e_macs", "e_macs_deployed", "peak_macs", "macs_little", "macs_big",
            "memory_bytes")
    return {"score": m["accuracy"] - cost_penalty * e_frac, "score_source": "validation",
            "val_score": m["accuracy"] - cost_penalty * e_frac, "val_e_macs_frac": e_frac,
            **{f"val_{k}": m[k] for k in keys}, "pair": pair.to_json()}


def biglittle_trial(config: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """Tune function trainable; `config` holds the sampled parameters, `sweep` the validated tune config.
    The trial's run lives in the sweep's storage (`<storage_path>/<name>/train_runs/trial_<id>`, a local
    path or URI) and is built exactly as `raynas train` builds one (raynas.train.trainer.build_trainer)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raynas.train.trainer import SUPERNET_FILE, build_trainer, plan_run

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(sweep["train"], config)
    cfg["name"] = f"trial_{trial_id}"
    cfg["storage_path"] = storage.join(sweep["storage_path"], sweep["name"], TRAIN_RUNS)
    plan = plan_run(cfg)
    build_trainer(plan, callbacks=[TuneReportCallback()]).fit()
    metrics = evaluate_trial(storage.join(plan.run_dir, SUPERNET_FILE), plan.cfg, sweep["evaluation"],
                             sweep["objective"]["cost_penalty"])
    ray.tune.report({**metrics, "run_dir": plan.run_dir})
