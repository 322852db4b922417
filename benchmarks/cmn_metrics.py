r"""Classification metrics for probabilistic classifiers (CAVI-CMN reproduction, issue 4).

Given predicted class probabilities ``probs`` of shape ``(N, L)`` (rows sum to one) and
integer labels ``y`` of shape ``(N,)``:

* accuracy: :math:`\frac1N \sum_n [\arg\max_l p_{nl} = y_n]`;
* mean log predictive density (LPD, nats): :math:`\frac1N \sum_n \log p_{n y_n}`;
* expected calibration error (Guo et al. 2017, "On calibration of modern neural networks"):
  with top-label confidence :math:`c_n = \max_l p_{nl}` and :math:`B` equal-width bins
  :math:`((b-1)/B, b/B]` on :math:`[0, 1]`,
  :math:`\mathrm{ECE} = \sum_b \frac{|S_b|}{N} \big| \mathrm{acc}(S_b) - \mathrm{conf}(S_b) \big|`.
  Confidence 0 goes into the first bin. The CAVI-CMN paper and its anchors use :math:`B = 20`.
"""

from __future__ import annotations

import torch


def _check(probs: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"probs and y must be tensors, got {type(probs).__name__} and {type(y).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, L), got {tuple(probs.shape)}")
    if y.shape != probs.shape[:1]:
        raise ValueError(f"y must have shape ({probs.shape[0]},) to match probs {tuple(probs.shape)}, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer labels, got dtype {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}], got range [{int(y.min())}, {int(y.max())}]")
    if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype), atol=1e-4):
        raise ValueError("probs must be non-negative with rows summing to one")


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose most probable class is the label."""
    _check(probs, y)
    return float((probs.argmax(-1) == y).double().mean())


def log_predictive_density(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean log probability of the label, in nats (``-inf`` if some label has probability 0)."""
    _check(probs, y)
    return float(probs.double().gather(-1, y.unsqueeze(-1)).log().mean())


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 20) -> float:
    """ECE over ``num_bins`` equal-width bins of top-label confidence."""
    _check(probs, y)
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()
    # bin b holds ((b-1)/B, b/B]; confidence 0 goes to bin 1
    bins = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)
    gap = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct - conf)
    return float(gap.abs().sum() / len(y))
