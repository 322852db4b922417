"""The MIS importance-weighted bound on log p(x) used to report test log-likelihoods."""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._traces import guess_max_plate_nesting, model_log_joint
from .base import BaseMixtureGuide


@torch.no_grad()
def mis_log_likelihood(
    model: Callable,
    guide: BaseMixtureGuide,
    *args,
    num_samples_per_component: int = 100,
    chunk_size: Optional[int] = None,
    max_plate_nesting: Optional[int] = None,
    **kwargs,
) -> Tensor:
    r"""
    The multiple importance sampling estimate of :math:`\log p(x)` with ``L`` draws from every
    component of a uniform mixture guide (Hotti et al., ICML 2024, the test NLL estimator):

    .. math::

        \log \hat p(x) = \log \frac{1}{AL} \sum_{a=1}^{A}\sum_{l=1}^{L}
            \frac{p(x, z_{a,l})}{\frac{1}{A}\sum_{j=1}^{A} q_j(z_{a,l})},
        \qquad z_{a,l} \sim q_a .

    Its expectation is a lower bound on :math:`\log p(x)` that tightens as ``L`` grows. For a
    per-datum guide (``guide.local_plate``, e.g. :class:`AmortizedMixtureGuide`) the estimate
    is returned per datum, shape ``(N,)``; otherwise as a scalar. The test NLL is its negative.

    :param num_samples_per_component: ``L``.
    :param chunk_size: draws per component per pass (default ``L``), to bound memory.
    """
    if not isinstance(guide, BaseMixtureGuide):
        raise TypeError(f"mis_log_likelihood needs a mixture guide, got {type(guide).__name__}")
    L = num_samples_per_component
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"num_samples_per_component must be a positive int, got {L!r}")
    chunk_size = L if chunk_size is None else chunk_size
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    A = guide.num_components
    components = torch.arange(A)
    log_weights = []
    done = 0
    while done < L:
        n = min(chunk_size, L - done)
        samples = guide.sample_components(components, n, particle_dim, *args, **kwargs)
        log_p = model_log_joint(model, samples.values, samples.size, particle_dim, args, kwargs,
                                local_plate=guide.local_plate)
        log_q = torch.logsumexp(guide.log_prob_components(samples, components, particle_dim, *args, **kwargs), 0)
        log_weights.append(log_p - (log_q - math.log(A)))
        done += n
    log_weights = torch.cat(log_weights, dim=0)
    return torch.logsumexp(log_weights, dim=0) - math.log(A * L)
