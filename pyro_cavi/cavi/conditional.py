r"""Exact conditionals of local latents, found by the CAVI engine's conjugacy detection.

For hybrid VI (NG-HVI, :mod:`pyro_cavi.nghvi`) the local latents :math:`z` are drawn from
their exact conditional :math:`p(z \mid \theta, y)`. Condition the model on the global
values :math:`\theta` (``poutine.condition``); what is left latent is :math:`z`. If the
CAVI engine finds :math:`z` conditionally conjugate with a Gaussian complete conditional,
one coordinate update of a single Gaussian factor over all of :math:`z` (joint across
sites, block-diagonal across independent plate elements) *is* that conditional:
:math:`q^*(z) \propto \exp \log p(z, y \mid \theta) = p(z \mid \theta, y)`.

Where the conditional is not Gaussian in closed form (e.g. Pólya-Gamma-augmented logistic
likelihoods, whose augmented conditional is Gaussian only given the augmentation
variables), this class refuses with :class:`~.errors.NonConjugateError`: use a Gibbs
sampler such as :class:`pyro_cavi.nghvi.PolyaGammaGibbs` instead.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample

from .cavi import CAVI
from .errors import NonConjugateError

Tensor = torch.Tensor


class CAVIConditional:
    """A conditional sampler (the interface of :mod:`pyro_cavi.nghvi.conditionals`) for
    Gaussian local latents, derived automatically from the model.

    :param sites: names of the local latent sites.
    """

    def __init__(self, sites: Sequence[str]):
        self.sites = tuple(sites)
        if not self.sites:
            raise ValueError("CAVIConditional needs at least one local site name")

    def fit(self, model, theta: Dict[str, Tensor], *args, **kwargs) -> CAVI:
        """The CAVI engine holding ``p(z | theta, y)`` as its (single) Gaussian factor."""
        conditioned = poutine.condition(model, data={k: v.detach() for k, v in theta.items()})
        cavi = CAVI(conditioned, joint=[self.sites] if len(self.sites) > 1 else ())
        with poutine.block(), torch.no_grad():
            tr = poutine.trace(conditioned).get_trace(*args, **kwargs)
            latent = {n for n, s in tr.nodes.items()
                      if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
            if latent != set(self.sites):
                extra, missing = sorted(latent - set(self.sites)), sorted(set(self.sites) - latent)
                raise ValueError(
                    "CAVIConditional: given theta, the latent sites left are "
                    f"{sorted(latent)}; expected exactly the local sites {list(self.sites)}"
                    + (f" (theta lacks {extra})" if extra else "") + (f" (not latent: {missing})" if missing else "")
                )
            for name in self.sites:
                fn = tr.nodes[name]["fn"]
                if fn.support.is_discrete:
                    raise NonConjugateError(
                        f"CAVIConditional: local site {name!r} is discrete ({type(fn).__name__}); it draws Gaussian "
                        "local latents only: pass a sampler for it (any callable with a 'sites' attribute)"
                    )
            cavi._prepare(args, kwargs)
            for name, f in cavi.factors.items():
                if f.family != "Gaussian":
                    raise NonConjugateError(
                        f"CAVIConditional: the conditional of {name!r} given theta is not Gaussian in closed form "
                        f"(its factor is {f.family}); pass a sampler for it, e.g. PolyaGammaGibbs for logistic models"
                    )
            cavi.step(*args, **kwargs)
        return cavi

    def __call__(self, model, theta: Dict[str, Tensor], *args, **kwargs) -> Dict[str, Tensor]:
        cavi = self.fit(model, theta, *args, **kwargs)
        with poutine.block(), torch.no_grad():
            tr = poutine.trace(cavi.guide).get_trace(*args, **kwargs)
        return {name: tr.nodes[name]["value"] for name in self.sites}

    def log_prob(self, model, theta: Dict[str, Tensor], z: Dict[str, Tensor], *args, **kwargs) -> Tensor:
        """``log p(z | theta, y)`` summed over the local sites."""
        cavi = self.fit(model, theta, *args, **kwargs)
        (factor,) = cavi.factors.values()
        if len(self.sites) == 1:
            q = cavi.posterior[self.sites[0]]
            lp = q.log_prob(z[self.sites[0]])
            return lp.sum()
        layout = cavi._group_layout(next(iter(cavi.factors)))
        flat = torch.cat([z[name].reshape(-1) for name, _, _ in layout])
        return torch.distributions.MultivariateNormal(factor.loc[0], scale_tril=factor.scale_tril[0]).log_prob(flat)
