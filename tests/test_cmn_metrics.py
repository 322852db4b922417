"""Accuracy, log predictive density and ECE of benchmarks/cmn_metrics.py on hand-computed cases."""

import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from cmn_metrics import accuracy, expected_calibration_error, log_predictive_density  # noqa: E402

PROBS = torch.tensor([[0.90, 0.10], [0.20, 0.80], [0.60, 0.40], [0.30, 0.70]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 1])


def test_accuracy_and_lpd_by_hand():
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)
    expected = (math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4
    assert log_predictive_density(PROBS, LABELS) == pytest.approx(expected, rel=1e-12)


def test_ece_by_hand_twenty_bins():
    # confidences 0.9, 0.8, 0.6, 0.7 fall into the bins (0.85, 0.9], (0.75, 0.8], (0.55, 0.6], (0.65, 0.7]:
    # one point each, correct, correct, wrong, correct -> |1-0.9| + |1-0.8| + |0-0.6| + |1-0.7| over 4
    assert expected_calibration_error(PROBS, LABELS, 20) == pytest.approx((0.1 + 0.2 + 0.6 + 0.3) / 4)


def test_ece_pools_points_within_a_bin():
    # two bins of width 0.5: all confidences in (0.5, 1]: accuracy 3/4, mean confidence 0.75 -> ECE 0
    assert expected_calibration_error(PROBS, LABELS, 2) == pytest.approx(0.0, abs=1e-12)
    # one bin of width 1 with labels flipped: accuracy 1/4, mean confidence 0.75
    flipped = 1 - LABELS
    assert expected_calibration_error(PROBS, flipped, 1) == pytest.approx(0.5)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.6 with 20 bins belongs to (0.55, 0.6], together with 0.58
    probs = torch.tensor([[0.6, 0.4], [0.58, 0.42], [0.61, 0.39]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    # bin (0.55, 0.6]: accuracy 1/2, confidence 0.59; bin (0.6, 0.65]: accuracy 1, confidence 0.61
    expected = (2 * abs(0.5 - 0.59) + abs(1 - 0.61)) / 3
    assert expected_calibration_error(probs, y, 20) == pytest.approx(expected, rel=1e-12)


def test_ece_against_loop_reference():
    """Random case against a plain Python loop over bins."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(500, 4, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 4, (500,), generator=g)
    conf, pred = probs.max(-1)
    ece = 0.0
    for b in range(20):
        lo, hi = b / 20, (b + 1) / 20
        inside = [(c, p == t) for c, p, t in zip(conf.tolist(), pred.tolist(), y.tolist()) if lo < c <= hi]
        if inside:
            ece += len(inside) / 500 * abs(sum(ok for _, ok in inside) / len(inside) - sum(c for c, _ in inside) / len(inside))
    assert expected_calibration_error(probs, y) == pytest.approx(ece, rel=1e-10)


def test_perfect_confident_predictions():
    probs = torch.eye(3, dtype=torch.float64)
    y = torch.arange(3)
    assert accuracy(probs, y) == 1.0
    assert log_predictive_density(probs, y) == 0.0
    assert expected_calibration_error(probs, y) == 0.0


@pytest.mark.parametrize(
    "probs, y, match",
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), "shape \\(N, L\\)"),
        (PROBS, torch.tensor([0, 1]), "y must have shape \\(4,\\)"),
        (PROBS, torch.tensor([0, 1, 2, 1]), "labels must lie in \\[0, 1\\]"),
        (PROBS * 2, LABELS, "rows summing to one"),
    ],
)
def test_bad_input_raises_value_error(probs, y, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, y)


def test_float_labels_raise_type_error():
    with pytest.raises(TypeError, match="integer labels"):
        accuracy(PROBS, LABELS.double())
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(PROBS, LABELS, 0)
