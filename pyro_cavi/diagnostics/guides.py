r"""Which guide to draw from, and the density :math:`\log q` when the guide trace does not hold it.

Most guides record every latent site with its own distribution, and :math:`\log q(\theta)` is
the guide trace's log density (Pyro's ``AutoContinuous`` guides included: their ``Delta``
sites carry the log-Jacobian of the auxiliary latent). A uniform mixture guide records the
chosen component's draw as a ``Delta``; its density is the mixture
:math:`\frac1A \sum_a q_a(\theta)`, evaluated here by conditioning each component on the draws.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

import pyro.poutine as poutine
from pyro.poutine.util import prune_subsample_sites

Tensor = torch.Tensor


def _component_log_density(component: Callable, values: Dict[str, Tensor], args, kwargs) -> Tensor:
    rows = []
    num_samples = next(iter(values.values())).shape[0]
    for s in range(num_samples):
        data = {name: v[s] for name, v in values.items()}
        tr = prune_subsample_sites(poutine.trace(poutine.condition(component, data=data)).get_trace(*args, **kwargs))
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and name not in data:
                raise ValueError(
                    f"mixture component {type(component).__name__} samples site {name!r} that the mixture does not "
                    "record; its density at the mixture's draws is not defined"
                )
        rows.append(tr.log_prob_sum())
    return torch.stack(rows)


def mixture_log_density(mixture: Any, args: tuple, kwargs: dict) -> Callable[[Dict[str, Tensor]], Tensor]:
    r""":math:`\log \frac1A \sum_a q_a(\theta_s)` for a guide with ``components`` (a uniform mixture)."""

    def log_q(values: Dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            rows = torch.stack([_component_log_density(c, values, args, kwargs) for c in mixture.components])
        return torch.logsumexp(rows, 0) - math.log(rows.shape[0])

    return log_q


def guide_and_log_density(fit_or_guide: Any, model: Callable, args: tuple, kwargs: dict) -> Tuple[Callable, Optional[Callable]]:
    """``(guide, log_q_fn)``: the guide callable of a fit (its ``.guide``) or the guide itself, and
    a replacement for the guide trace's density where the trace does not hold it (else ``None``)."""
    guide = getattr(fit_or_guide, "guide", fit_or_guide)
    if not callable(guide):
        raise TypeError(f"{type(fit_or_guide).__name__} is neither a Pyro guide nor a fit with a .guide")
    if hasattr(guide, "components") and hasattr(guide, "num_components"):
        if getattr(guide, "local_plate", None) is not None:
            raise ValueError(
                f"{type(guide).__name__} has one mixture per datum (local_plate={guide.local_plate!r}); "
                "psis weighs a mixture over the joint of all latents only"
            )
        return guide, mixture_log_density(guide, args, kwargs)
    return guide, None
