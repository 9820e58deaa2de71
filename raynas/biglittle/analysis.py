"""Seed 002's analysis of a routed pair (§5.5-5.6), as plain tables: pure numpy/pandas, no models.

  reliability      confidence in 15 equal-width bins [0, 1/15], (1/15, 2/15], ..., (14/15, 1]: per bin the
                   share of inputs, mean confidence and accuracy; ECE = sum over bins of share x |accuracy -
                   confidence| (Figure 4: is little's confidence, or the router's score, a probability?)
  exit rates       per class the share of its inputs answered by little (Figure 3, Table 10: easy vs hard classes)
  tau sweep        accuracy, routing ratio and E[MACs] = p * MACs(little) + (1 - p) * MACs(big) over a grid
                   of thresholds (Figure 5: is the curve smooth or sharp?)
  measured points  (MACs, measured milliseconds) of every exported piece per device and precision, read from
                   export manifests (Figure 2: how far MACs predict latency on each device)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

ECE_BINS = 15


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """One row per bin: bin, lower, upper, count, share, confidence (mean), accuracy, gap (accuracy -
    confidence). Empty bins keep their row (count 0, NaN means) so every diagram has all bins."""
    confidence = np.asarray(confidence, float)
    correct = np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right-closed bins, the first one closed on both sides: a confidence of exactly 1/15 is in bin 0
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / count
        accuracy = np.bincount(index, correct.astype(float), minlength=bins) / count
    return pd.DataFrame({"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:], "count": count,
                         "share": count / max(len(confidence), 1), "confidence": mean_conf,
                         "accuracy": accuracy, "gap": accuracy - mean_conf})


def ece_of(table: pd.DataFrame) -> float:
    """Expected calibration error of a `reliability` table."""
    filled = table[table["count"] > 0]
    return float((filled["share"] * filled["gap"].abs()).sum())


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    return ece_of(reliability(confidence, correct, bins))


def exit_rates(labels: np.ndarray, to_little: np.ndarray, little_correct: np.ndarray | None = None,
               big_correct: np.ndarray | None = None, num_classes: int | None = None) -> pd.DataFrame:
    """Per class: samples, to_little, to_big, exit_rate (to_little / samples, NaN for a class without
    samples) and, given both models' correctness, the accuracy of little alone, big alone and the routed
    pair on that class (seed 002 C.1). Classes 0..num_classes-1 (default: up to the largest label)."""
    labels = np.asarray(labels, int)
    to_little = np.asarray(to_little, bool)
    n = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
    samples = np.bincount(labels, minlength=n)
    little = np.bincount(labels, to_little.astype(float), minlength=n)

    def per_class(values: np.ndarray) -> np.ndarray:
        return np.bincount(labels, values.astype(float), minlength=n) / samples

    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"class": np.arange(n), "samples": samples, "to_little": little.astype(int),
               "to_big": (samples - little).astype(int), "exit_rate": little / samples}
        if little_correct is not None and big_correct is not None:
            little_correct, big_correct = np.asarray(little_correct, bool), np.asarray(big_correct, bool)
            out["little_accuracy"] = per_class(little_correct)
            out["big_accuracy"] = per_class(big_correct)
            out["routed_accuracy"] = per_class(np.where(to_little, little_correct, big_correct))
    return pd.DataFrame(out)


def tau_sweep(scores: np.ndarray, little_correct: np.ndarray, big_correct: np.ndarray, taus: Sequence[float],
              macs_little: float, macs_big: float) -> pd.DataFrame:
    """One row per threshold (to little iff score >= tau): tau, routing_ratio, accuracy, e_macs."""
    scores = np.asarray(scores, float)
    little_correct, big_correct = np.asarray(little_correct, bool), np.asarray(big_correct, bool)
    taus = np.asarray(taus, float)
    to_little = scores[None, :] >= taus[:, None]                         # (taus, inputs)
    p = to_little.mean(axis=1)
    accuracy = np.where(to_little, little_correct[None, :], big_correct[None, :]).mean(axis=1)
    return pd.DataFrame({"tau": taus, "routing_ratio": p, "accuracy": accuracy,
                         "e_macs": p * macs_little + (1 - p) * macs_big})


def largest_step(sweep: pd.DataFrame) -> float:
    """The largest accuracy change between neighbouring thresholds of a sweep: a sharp (fragile) curve
    has one big step, a smooth (robust) one only small ones."""
    acc = sweep.sort_values("tau")["accuracy"].to_numpy()
    return float(np.abs(np.diff(acc)).max()) if len(acc) > 1 else 0.0


def measured_points(manifests: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """(models, device, precision, piece, macs, latency_ms) for every piece a manifest (of `raynas
    biglittle export`, keyed by its directory) has timed; exports that timed nothing add no rows."""
    rows = []
    for where, m in manifests.items():
        macs = m["costs"]["macs"]
        for piece, ms in m["piece_ms"].items():
            rows.append({"models": where, "device": m["measured_on"], "precision": m["precision"],
                         "piece": piece, "macs": int(macs[piece]), "latency_ms": float(ms)})
    return pd.DataFrame(rows, columns=["models", "device", "precision", "piece", "macs", "latency_ms"])


def macs_latency_fit(points: pd.DataFrame) -> pd.DataFrame:
    """Per (device, precision): points, Pearson and Spearman correlation of MACs with measured latency
    (NaN with fewer than 3 points or no spread)."""
    rows = []
    for (device, precision), g in points.groupby(["device", "precision"], sort=True):
        enough = len(g) >= 3 and g["macs"].nunique() > 1 and g["latency_ms"].nunique() > 1
        rows.append({"device": device, "precision": precision, "points": len(g),
                     "pearson": float(g["macs"].corr(g["latency_ms"])) if enough else float("nan"),
                     # Spearman = Pearson of the (average) ranks; pandas' own would import scipy.stats
                     "spearman": float(g["macs"].rank().corr(g["latency_ms"].rank())) if enough
                     else float("nan")})
    return pd.DataFrame(rows, columns=["device", "precision", "points", "pearson", "spearman"])
