"""Dynamic-inference metrics and cost composition on hand-computed cases (seed 002 §3.5, §4.3)."""

import numpy as np
import pytest

from raynas.biglittle.costs import PairCosts
from raynas.biglittle.metrics import (
    PairPredictions,
    accuracy_at_cost,
    baseline_decisions,
    evaluate_routing,
    expected_calibration_error,
    routing_metrics,
    tau_curve,
)

LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])
LITTLE_RIGHT = np.array([1, 1, 1, 0, 0, 1, 0, 0], bool)
BIG_RIGHT = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)
TO_LITTLE = np.array([1, 1, 0, 0, 1, 1, 1, 0], bool)


def one_hot_logits(correct: np.ndarray, scale: float = 5.0) -> np.ndarray:
    """Logits predicting the label where `correct`, the next class otherwise."""
    pred = np.where(correct, LABELS, (LABELS + 1) % 4)
    logits = np.zeros((len(LABELS), 4))
    logits[np.arange(len(LABELS)), pred] = scale
    return logits


def costs(stage: str) -> PairCosts:
    return PairCosts(stage=stage, has_trunk=True,
                     macs={"trunk": 10, "little": 20, "big": 100, "router": 1},
                     params={"trunk": 5, "little": 10, "big": 50, "router": 2},
                     activation_elems={"little": 100, "big": 300},
                     latency_ms={"trunk": 1.0, "little": 2.0, "big": 8.0, "router": 0.5}, call_ms=0.1)


def test_routing_metrics_by_hand():
    m = routing_metrics(LITTLE_RIGHT, BIG_RIGHT, TO_LITTLE)
    assert m["accuracy"] == pytest.approx(6 / 8)           # routed: 1 1 | 1 1 | 0 1 0 | 1
    assert m["routing_ratio"] == pytest.approx(5 / 8)
    # oracle: little iff little right or big wrong too = [1 1 1 0 0 1 1 0]
    assert m["oracle_ratio"] == pytest.approx(5 / 8)
    assert m["routing_accuracy"] == pytest.approx(6 / 8)   # disagrees on inputs 2 and 4
    assert m["little_precision"] == pytest.approx(3 / 5)
    assert m["big_needed"] == pytest.approx(2 / 3)         # inputs 3 and 7 of 2, 3, 7
    assert m["oracle_accuracy"] == pytest.approx(7 / 8)
    assert m["oracle_gap"] == pytest.approx(7 / 8 - 6 / 8)
    assert m["little_accuracy"] == pytest.approx(4 / 8) and m["big_accuracy"] == pytest.approx(6 / 8)


def test_expected_calibration_error_by_hand():
    # two inputs at confidence 0.9 (one right), two at 0.62 (both right), 15 bins:
    # ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.62| = 0.2 + 0.19
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.62, 0.38], [0.62, 0.38]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.39)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)


def test_pre_router_costs_by_hand():
    c, p = costs("pre"), 5 / 8
    assert c.model("little") == 30 and c.model("big") == 110
    assert c.expected(p) == pytest.approx(p * 30 + (1 - p) * 110)          # seed: 60
    assert c.deployed(p) == pytest.approx(10 + 1 + p * 20 + (1 - p) * 100)  # 61
    assert c.peak() == pytest.approx(111)
    assert c.memory() == 4 * (5 + 50 + 300)                                # max(mem(big), mem(little))
    assert c.model("little", "latency_ms") == pytest.approx(3.0 + 2 * 0.1)  # trunk and branch: two calls
    assert c.expected(p, "latency_ms") == pytest.approx(p * 3.2 + (1 - p) * 9.2)
    assert c.deployed(p, "latency_ms") == pytest.approx(1 + 0.5 + p * 2 + (1 - p) * 8 + 3 * 0.1)
    assert c.peak("latency_ms") == pytest.approx(1 + 0.5 + 8 + 3 * 0.1)


def test_cascade_costs_by_hand():
    c, p = costs("cascade"), 5 / 8
    assert c.deployed(p) == pytest.approx(10 + 20 + (1 - p) * 100)         # little always runs first
    assert c.peak() == pytest.approx(130)
    assert c.deployed(p, "latency_ms") == pytest.approx(1 + 2 + (1 - p) * 8 + 0.1 * (2 + (1 - p)))
    assert c.expected(0.0) == c.model("big") and c.expected(1.0) == c.model("little")


def test_metrics_with_costs_and_tau_curve():
    pred = PairPredictions(LABELS, one_hot_logits(BIG_RIGHT), one_hot_logits(LITTLE_RIGHT),
                           router_score=np.linspace(0.05, 0.95, 8))
    m = evaluate_routing(pred, 0.5, costs("pre"))
    assert m["routing_ratio"] == pytest.approx(4 / 8)                      # scores >= 0.5: last four
    assert m["e_macs"] == pytest.approx(0.5 * 30 + 0.5 * 110)
    assert m["peak_latency_ms"] == pytest.approx(9.8)
    assert 0 <= m["ece_little"] <= 1
    curve = tau_curve(pred, [0.0, 0.5, 1.01], costs("pre"))
    assert [r["routing_ratio"] for r in curve] == [1.0, 0.5, 0.0]
    assert curve[0]["accuracy"] == pytest.approx(4 / 8) and curve[-1]["accuracy"] == pytest.approx(6 / 8)
    assert [r["e_macs"] for r in curve] == sorted(r["e_macs"] for r in curve)
    # the confidence router (no router score) uses little's max softmax
    cascade = PairPredictions(LABELS, one_hot_logits(BIG_RIGHT), one_hot_logits(LITTLE_RIGHT))
    np.testing.assert_allclose(cascade.scores(), cascade.little_probs.max(axis=1))


def test_baselines_and_matched_cost():
    pred = PairPredictions(LABELS, one_hot_logits(BIG_RIGHT), one_hot_logits(LITTLE_RIGHT))
    assert not baseline_decisions("always-big", pred).any() and baseline_decisions("always-little", pred).all()
    oracle = baseline_decisions("oracle", pred)
    m = routing_metrics(pred.little_correct, pred.big_correct, oracle)
    assert m["accuracy"] == pytest.approx(7 / 8) and m["oracle_gap"] == pytest.approx(0.0)
    assert m["routing_accuracy"] == pytest.approx(1.0)
    random = baseline_decisions("random", pred, 0.5, np.random.default_rng(0))
    assert random.dtype == bool and len(random) == 8
    with pytest.raises(ValueError):
        baseline_decisions("psychic", pred)
    curve = [{"e_macs": 30, "accuracy": 0.5}, {"e_macs": 70, "accuracy": 0.8}, {"e_macs": 110, "accuracy": 0.75}]
    assert accuracy_at_cost(curve, "e_macs", [20, 30, 80, 200])[1:] == [0.5, 0.8, 0.8]
    assert np.isnan(accuracy_at_cost(curve, "e_macs", [20])[0])
