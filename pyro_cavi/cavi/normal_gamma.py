r"""Joint Normal-Gamma factors: ``CAVI(model, joint=[("w", "tau")])`` for a Gaussian site ``w``
and a Gamma site ``tau`` that scales the precision of ``w``'s blocks.

Mean-field CAVI treats :math:`q(w)\,q(\tau)` as independent; when every density that involves
``w`` is a Normal with precision :math:`\tau` times a constant (a Normal-Gamma prior,
matrix-normal-gamma experts as in CAVI-CMN, Heins et al. 2024), the complete conditional of
the pair is Normal-Gamma and the structured factor
:math:`q(w, \tau) = \mathcal{N}(w \mid m, (\tau\Lambda)^{-1})\,\mathrm{Gamma}(\tau \mid a, b)` is
exact (on a conjugate Normal-Gamma model, the ELBO equals the log evidence).

The expressions of the model keep referring to ``w`` and ``tau``: the engine evaluates them
with ``tau``'s moments :math:`(E[\tau], E[\log\tau])` and ``w``'s :math:`\tau`-tilted moments
(:meth:`.NormalGammaFactor.member_moments`), which makes :math:`E[\tau]\,E'[(y - x^\top w)^2]`
equal to :math:`E[\tau (y - x^\top w)^2]`. That identity needs the ``tau`` in each such term to
be the one of the same block, which :func:`check_term` verifies.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import pyro.distributions as dist

from . import expectations as ex
from .errors import NonConjugateError
from .factors import GammaFactor, GaussianFactor, NormalGammaFactor
from .rules import unwrap
from .symbolic import Lin, Pos
from .tracing import LatentSite, check_one_per_block

Tensor = torch.Tensor


def members(group: Tuple[str, ...], latents: Dict[str, LatentSite]):
    """``(w, tau)`` if the group is one Gaussian site and one Gamma site, else None; raises a
    ``ValueError`` naming the fault when such a pair has mismatched shapes."""
    families = {latents[n].family: n for n in group}
    if len(group) != 2 or set(families) != {"Gaussian", "Gamma"}:
        return None
    w, tau = families["Gaussian"], families["Gamma"]
    sw, st = latents[w], latents[tau]
    check_one_per_block("Normal-Gamma", group, sw, st)
    return w, tau


def make_factor(group: str, w: LatentSite, tau: LatentSite, dtype, device) -> NormalGammaFactor:
    """A fresh factor of the pair; ``tau`` (its shape is ``w``'s batch shape, as :func:`members`
    checks) is taken for the signature :func:`.categorical_gaussian.make_factor` shares."""
    return NormalGammaFactor(group, w.batch_shape.numel(), w.event_shape.numel(), dtype, device)


def views(w: LatentSite, tau: LatentSite, dtype, device) -> Dict[str, object]:
    """Factor objects that describe the members' layout (blocks, Gamma statistics) to the
    expectation code; their own parameters are never used."""
    return {
        w.name: GaussianFactor(w.name, w.shape, w.event_dim, dtype, device),
        tau.name: GammaFactor(tau.name, tau.shape, tau.event_dim, dtype, device),
    }


def add_member_moments(mu: dict, group: str, w: LatentSite, tau: LatentSite) -> None:
    (m, M), (t, log_t) = NormalGammaFactor.member_moments(mu[group])
    mu[w.name] = (m, M)
    mu[tau.name] = (t.reshape(tau.shape), log_t.reshape(tau.shape))


def stand_ins(f: NormalGammaFactor, w: LatentSite, tau: LatentSite) -> Tuple[Tensor, Tensor]:
    return f.loc.reshape(w.shape).detach().clone(), (f.concentration / f.rate).reshape(tau.shape).detach().clone()


def check_term(term, group: str, w: str, tau: str) -> None:
    """Every density that involves ``w`` must be a Normal whose precision is the same block's
    ``tau`` times a constant (``scale = c * tau.rsqrt()``)."""
    base, _, _ = unwrap(term.fn)
    where = f"site {term.name!r} ({type(base).__name__})"
    hint = (f"; in a joint Normal-Gamma factor {group!r}, every density involving {w!r} must be a Normal "
            f"with scale c * {tau}.rsqrt() (or use mean-field: leave the pair out of joint=)")
    if not isinstance(base, dist.Normal):
        raise NonConjugateError(f"latent site {w!r} enters {where}, which is not a Normal" + hint)
    scale = ex.expr_of(base.scale)
    powers = [g for g in scale.factors if g.site == tau] if isinstance(scale, Pos) else []
    if len(powers) != 1 or powers[0].power != -0.5 or powers[0].complement:
        raise NonConjugateError(f"latent site {w!r} enters {where}, whose scale is not c * {tau}.rsqrt()" + hint)
    d = ex.expr_of(term.value - base.loc)
    if not isinstance(d, Lin) or w not in d.terms:
        raise NonConjugateError(f"latent site {w!r} enters {where} other than through its loc or value" + hint)
    _, idx = d.terms[w]
    shape = torch.broadcast_shapes(d.shape, scale.shape)
    if not torch.equal(idx.expand(d.shape).expand(shape), powers[0].index.expand(scale.shape).expand(shape)):
        raise NonConjugateError(
            f"at {where}, the blocks of {w!r} and the elements of {tau!r} are paired differently "
            f"(each block of {w!r} must meet its own element of {tau!r})" + hint
        )


def draw(f: NormalGammaFactor, w: LatentSite, tau: LatentSite, sample) -> Dict[str, Tensor]:
    """A joint draw, ``tau`` from its Gamma, then ``w | tau``, through ``sample(part, distribution,
    given)`` (``part`` is ``"tau"`` or ``"w"``; ``given`` marks the draw conditional on ``tau``'s,
    which already carries the leading sample dimensions): Pyro sites for a guide, plain draws
    for :meth:`CAVI.sample_posterior`."""
    t = sample("tau", dist.Gamma(f.concentration, f.rate).to_event(1), False)
    tril = f.scale_tril * t.rsqrt()[..., None, None]
    v = sample("w", dist.MultivariateNormal(f.loc, scale_tril=tril).to_event(1), True)
    lead = t.shape[:-1]
    return {w.name: v.reshape(lead + w.shape), tau.name: t.reshape(lead + tau.shape)}


def marginal(f: NormalGammaFactor, site: LatentSite, w: LatentSite, tau: LatentSite):
    q_w, q_tau = f.marginals(w.shape, w.event_dim, tau.shape)
    return q_w if site.name == w.name else q_tau
