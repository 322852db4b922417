r"""Which guide to draw from, and the density :math:`\log q` when the guide trace does not hold it.

Most guides record every latent site with its own distribution, and :math:`\log q(\theta)` is
the guide trace's log density (Pyro's ``AutoContinuous`` guides included: their ``Delta``
sites carry the log-Jacobian of the auxiliary latent). Two kinds of guide record values as ``Delta`` sites and get their density here:

* a uniform mixture guide (``components``) records the chosen component's draw; its density
  is the mixture :math:`\frac1A \sum_a q_a(\theta)`, evaluated by conditioning each component
  on the draws;
* a hybrid guide (``global_guide`` and ``conditional``, NG-HVI) draws local sites from their
  exact conditional :math:`p(z \mid \theta, y)`; it is re-run with that conditional's
  ``log_prob`` on the ``Delta`` (``log_density``), so that
  :math:`p(\theta, z, y) / q(\theta) p(z \mid \theta, y) = p(\theta, y) / q(\theta)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.runtime import get_plates
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


#: ``infer`` key of a ``Delta`` site whose ``log_density`` is the exact conditional density
EXACT_CONDITIONAL = "exact_conditional"


class ExactConditionalGuide:
    r"""A hybrid guide :math:`q(\theta) p(z \mid \theta, y)` whose local ``Delta`` sites carry
    :math:`\log p(z \mid \theta, y)` (one draw at a time, like the hybrid guide itself)."""

    def __init__(self, hybrid: Any):
        log_prob = getattr(hybrid.conditional, "log_prob", None)
        if not callable(log_prob):
            raise ValueError(
                f"the local sites {list(hybrid.conditional.sites)} are drawn by "
                f"{type(hybrid.conditional).__name__}, which has no log_prob: their density "
                "p(z | theta, y) is unknown, so the importance ratio cannot be formed"
            )
        self.hybrid = hybrid

    def __call__(self, *args, **kwargs) -> Dict[str, Tensor]:
        if any(f.vectorized for f in get_plates()):
            raise ValueError("ExactConditionalGuide draws one theta at a time")
        h = self.hybrid
        theta = {name: v.detach() for name, v in h.global_guide(*args, **kwargs).items()}
        z = h.conditional(h.model, theta, *args, **kwargs)
        log_density = h.conditional.log_prob(h.model, theta, z, *args, **kwargs).detach()
        for i, (name, value) in enumerate(z.items()):
            ld = log_density if i == 0 else torch.zeros_like(log_density)
            pyro.sample(name, dist.Delta(value, log_density=ld, event_dim=value.dim()), infer={EXACT_CONDITIONAL: True})
        return {**theta, **z}


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
    if hasattr(guide, "global_guide") and hasattr(guide, "conditional"):
        return ExactConditionalGuide(guide), None
    return guide, None
