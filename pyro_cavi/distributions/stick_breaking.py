r"""The stick-breaking categorical distribution.

With :math:`K - 1` logits :math:`\psi_k`,

.. math::
    \pi_k = \sigma(\psi_k) \prod_{j<k} (1 - \sigma(\psi_j)) \quad (k < K - 1), \qquad
    \pi_{K-1} = \prod_{j<K-1} (1 - \sigma(\psi_j)).

Each factor is a logistic "stick", so Pólya-Gamma augmentation (Polson, Scott & Windle
2013; Linderman, Johnson & Adams 2015) makes a stick-breaking likelihood with linear
logits conditionally conjugate to Gaussian coefficients. This is the output and gating
layer of conditional mixture networks (Heins et al. 2024, arXiv 2408.16429).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyro.distributions import TorchDistribution

Tensor = torch.Tensor


def stick_breaking_log_probs(logits: Tensor) -> Tensor:
    """``log pi`` of shape ``(..., K)`` from stick logits of shape ``(..., K-1)``."""
    log_stop = F.logsigmoid(logits)  # log sigma(psi_k)
    log_go = F.logsigmoid(-logits)  # log (1 - sigma(psi_k))
    passed = torch.cumsum(log_go, -1)
    before = F.pad(passed[..., :-1], (1, 0))  # sum_{j<k} log(1 - sigma(psi_j))
    return torch.cat([log_stop + before, passed[..., -1:]], -1)


class StickBreakingCategorical(TorchDistribution):
    """Categorical distribution over ``{0, ..., K-1}`` parameterised by ``K-1`` stick-breaking logits.

    :param logits: tensor of shape ``batch_shape + (K - 1,)``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = True

    def __init__(self, logits: Tensor, validate_args=None):
        if not isinstance(logits, torch.Tensor):
            logits = torch.as_tensor(logits, dtype=torch.get_default_dtype())
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(
                f"StickBreakingCategorical: logits must have a last dimension of size K - 1 >= 1, got shape {tuple(logits.shape)}"
            )
        self.logits = logits
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=validate_args)

    @property
    def num_categories(self) -> int:
        return self.logits.shape[-1] + 1

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.num_categories - 1)

    @property
    def log_probs(self) -> Tensor:
        """``log pi`` with a trailing dimension of size ``K``."""
        return stick_breaking_log_probs(self.logits)

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.long().unsqueeze(-1)
        value, log_pmf = torch.broadcast_tensors(value, self.log_probs)
        return log_pmf.gather(-1, value[..., :1]).squeeze(-1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return torch.distributions.Categorical(logits=self.log_probs).sample(sample_shape)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        k = self.num_categories
        values = torch.arange(k, device=self.logits.device).reshape((k,) + (1,) * len(self.batch_shape))
        if expand:
            values = values.expand((k,) + self.batch_shape)
        return values

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StickBreakingCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.logits.shape[-1:])
        super(StickBreakingCategorical, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return (self.probs * torch.arange(self.num_categories, dtype=self.logits.dtype, device=self.logits.device)).sum(-1)

    @property
    def variance(self) -> Tensor:
        k = torch.arange(self.num_categories, dtype=self.logits.dtype, device=self.logits.device)
        p = self.probs
        return (p * k * k).sum(-1) - (p * k).sum(-1) ** 2

    def entropy(self) -> Tensor:
        lp = self.log_probs
        return -(lp.exp() * lp).sum(-1)
