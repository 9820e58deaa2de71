"""Dynamic-inference metrics of seed 002 §4.3 for one routed pair on one labelled set.

Inputs are per-example arrays (numpy): the labels, both models' logits and a router's "ease" score.
A routing decision is a boolean mask `to_little`. Definitions:

  accuracy          mean over inputs of the chosen model's correctness
  routing_ratio     p = fraction of inputs sent to little
  oracle            sends an input to little iff little is right or big is wrong too (then little is as
                    good and cheaper); oracle_accuracy = mean(little right or big right)
  oracle_gap        oracle_accuracy - accuracy
  routing_accuracy  agreement of the decisions with the oracle's
  little_precision  P(little right | sent to little);  big_needed  P(little wrong, big right | sent to big)
  ece_little        expected calibration error of little's softmax (15 equal-width confidence bins)
plus, given a pair's `PairCosts`, E[MACs] (seed formula and deployed), peak, memory and latency figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raynas.biglittle import analysis
from raynas.biglittle.analysis import ECE_BINS
from raynas.biglittle.costs import PairCosts

BASELINES = ("always-big", "always-little", "random", "oracle")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of a softmax: sum over confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    return analysis.expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


@dataclass
class PairPredictions:
    """Per-example outputs of a pair on a labelled set."""

    labels: np.ndarray
    big_logits: np.ndarray
    little_logits: np.ndarray
    router_score: np.ndarray | None = None   # pre-routers' score; None for the confidence router

    @property
    def little_probs(self) -> np.ndarray:
        return softmax(self.little_logits)

    @property
    def little_correct(self) -> np.ndarray:
        return self.little_logits.argmax(axis=1) == self.labels

    @property
    def big_correct(self) -> np.ndarray:
        return self.big_logits.argmax(axis=1) == self.labels

    @property
    def confidence(self) -> np.ndarray:
        return self.little_probs.max(axis=1)

    def scores(self) -> np.ndarray:
        """The router's ease score: its own (pre-routers) or little's confidence (cascade)."""
        return self.router_score if self.router_score is not None else self.confidence


def oracle_decisions(little_correct: np.ndarray, big_correct: np.ndarray) -> np.ndarray:
    return little_correct | ~big_correct


def routing_metrics(little_correct: np.ndarray, big_correct: np.ndarray, to_little: np.ndarray,
                    little_probs: np.ndarray | None = None, labels: np.ndarray | None = None,
                    costs: PairCosts | None = None) -> dict[str, float]:
    little_correct, big_correct = np.asarray(little_correct, bool), np.asarray(big_correct, bool)
    to_little = np.asarray(to_little, bool)
    routed_correct = np.where(to_little, little_correct, big_correct)
    oracle = oracle_decisions(little_correct, big_correct)
    n_little, n_big = int(to_little.sum()), int((~to_little).sum())
    p = float(to_little.mean())
    out = {
        "accuracy": float(routed_correct.mean()),
        "routing_ratio": p,
        "routing_accuracy": float((to_little == oracle).mean()),
        "little_precision": float(little_correct[to_little].mean()) if n_little else float("nan"),
        "big_needed": float((~little_correct & big_correct)[~to_little].mean()) if n_big else float("nan"),
        "oracle_accuracy": float((little_correct | big_correct).mean()),
        "oracle_ratio": float(oracle.mean()),
        "little_accuracy": float(little_correct.mean()),
        "big_accuracy": float(big_correct.mean()),
    }
    out["oracle_gap"] = out["oracle_accuracy"] - out["accuracy"]
    if little_probs is not None and labels is not None:
        out["ece_little"] = expected_calibration_error(little_probs, labels)
    if costs is not None:
        out.update(costs.summary(p))
    return out


def evaluate_routing(pred: PairPredictions, tau: float, costs: PairCosts | None = None) -> dict[str, float]:
    """Metrics of the router at threshold `tau` (to little iff score >= tau)."""
    to_little = pred.scores() >= tau
    return {"tau": float(tau), **routing_metrics(pred.little_correct, pred.big_correct, to_little,
                                                 pred.little_probs, pred.labels, costs)}


def tau_curve(pred: PairPredictions, taus: Sequence[float], costs: PairCosts | None = None) -> list[dict]:
    """The accuracy-vs-E[cost] curve: one metrics row per threshold."""
    return [evaluate_routing(pred, t, costs) for t in taus]


def default_taus(pred: PairPredictions, n: int = 21) -> np.ndarray:
    """Thresholds spanning every routing ratio: quantiles of the scores plus both extremes."""
    s = pred.scores()
    qs = np.quantile(s, np.linspace(0, 1, n))
    return np.unique(np.concatenate([[0.0], qs, [np.nextafter(s.max(), np.inf)]]))


def baseline_decisions(name: str, pred: PairPredictions, p_little: float = 0.5,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Routing baselines of seed 002 §4.6: always big, always little, random with ratio p, oracle."""
    n = len(pred.labels)
    if name == "always-big":
        return np.zeros(n, bool)
    if name == "always-little":
        return np.ones(n, bool)
    if name == "random":
        rng = rng or np.random.default_rng(0)
        return rng.random(n) < p_little
    if name == "oracle":
        return oracle_decisions(pred.little_correct, pred.big_correct)
    raise ValueError(f"baseline: {name!r}; allowed: {list(BASELINES)}")


def accuracy_at_cost(curve: Sequence[dict], cost_key: str, targets: Sequence[float]) -> list[float]:
    """The best accuracy reachable at or below each target cost along a curve (upper envelope,
    stepwise): how two routed pairs are compared at matched E[cost]. NaN below the curve's cheapest point."""
    points = sorted((float(r[cost_key]), float(r["accuracy"])) for r in curve)
    out = []
    for target in targets:
        reachable = [acc for cost, acc in points if cost <= target * (1 + 1e-9)]
        out.append(max(reachable) if reachable else float("nan"))
    return out
