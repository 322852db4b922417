r"""Expected log densities :math:`E_q[\log p(x \mid \theta)]` of Pyro distributions.

One small function per distribution. Each writes the log density in terms of the
sufficient statistics its parameters need (``E[loc]``, ``E[loc²]``, ``E[log rate]``,
``E[rate]``, ...) and asks the :class:`Expect` context for them; the context raises
:class:`~.errors.NonConjugateError` naming the site, the parameter and the operation
when a parameter is not of a conjugate form. Adding a conjugate pair is adding one
function here (and, for a new latent family, one factor in :mod:`.factors`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.distributions as tdist

import pyro.distributions as dist
from pyro.distributions.torch_distribution import MaskedDistribution, ExpandedDistribution

from . import expectations as ex
from .errors import NonConjugateError
from ..distributions.stick_breaking import StickBreakingCategorical
from .symbolic import Sym

Tensor = torch.Tensor
LOG_2PI = math.log(2 * math.pi)


class Expect:
    """Expectations for the site being evaluated, with errors that name it."""

    def __init__(self, site: str, dist_name: str, factors, mu, cache: dict | None = None):
        self.site, self.dist_name, self.factors, self.mu, self.cache = site, dist_name, factors, mu, cache
        self.used: Dict[str, str] = {}  # latent site -> the parameter it entered through

    def _record(self, x, param: str) -> None:
        for s in ex.latent_sites(x):
            self.used.setdefault(s, param)

    def _fail(self, param: str, x, reason: str):
        latents = ", ".join(repr(s) for s in sorted(ex.latent_sites(x))) or "a latent site"
        raise NonConjugateError(
            f"latent site {latents} is not conditionally conjugate at site {self.site!r} "
            f"({self.dist_name}): {param} of {self.site!r} is {reason}"
        )

    def _call(self, fn, param, x, *args, **kwargs):
        self._record(x, param)
        try:
            return fn(x, *args, self.factors, self.mu, **kwargs)
        except ex.NotConjugate as e:
            self._fail(param, x, str(e))

    def mean(self, x, param):
        return self._call(ex.mean, param, x)

    def sq(self, x, param):
        return self._call(ex.second_moment, param, x)

    def wsq(self, x, weight, param):
        """sum_n weight_n E[x_n²]"""
        return self._call(ex.weighted_second_moment, param, x, weight, cache=self.cache)

    def quad(self, x, precision, param):
        return self._call(ex.quadratic_form, param, x, precision)

    def log(self, x, param):
        return self._call(ex.mean_log, param, x)

    def log1m(self, x, param):
        return self._call(ex.mean_log1m, param, x)

    def pow(self, x, power, param):
        return self._call(ex.mean_pow, param, x, power)

    def omega(self) -> Tensor:
        """E[omega] of the Polya-Gamma factor augmenting this site's logistic likelihood."""
        name = pg_name(self.site)
        self.used.setdefault(name, "Polya-Gamma augmentation")
        return self.mu[name][0]

    def const(self, x, param, hint: str = ""):
        if not ex.is_constant(x):
            e = ex.expr_of(x)
            reason = getattr(e, "reason", None) or f"a function of {ex.describe(e)}"
            self._fail(param, x, f"{reason}; CAVI needs it to be a constant{hint}")
        return x

    def independent(self, a, b, what: str):
        shared = ex.latent_sites(a) & ex.latent_sites(b)
        if shared:
            raise NonConjugateError(
                f"latent site {sorted(shared)[0]!r} enters both {what} of site {self.site!r}: "
                "their product has no closed-form expectation under the mean-field posterior"
            )


def _normal(fn, v, E: Expect):
    loc, scale = fn.loc, fn.scale
    E.independent(scale, loc, "the loc and the scale")
    E.independent(scale, v, "the value and the scale")
    d = v - loc
    return -0.5 * LOG_2PI - E.log(scale, "scale") - 0.5 * E.pow(scale, -2.0, "scale") * E.sq(d, "loc")


def _normal_summed(fn, v, E: Expect, weight):
    """``sum_n weight_n E[log N(v_n | loc_n, scale_n)]`` with cached sufficient statistics."""
    loc, scale = fn.loc, fn.scale
    E.independent(scale, loc, "the loc and the scale")
    E.independent(scale, v, "the value and the scale")
    d = v - loc
    full = ex.broadcast_shapes(weight.shape, fn.batch_shape)
    log_norm = ex.compact_apply(lambda t: -0.5 * LOG_2PI - t, E.log(scale, "scale"))
    const = ex.broadcast_sum((weight, log_norm), full)
    return const - 0.5 * E.wsq(d, (weight, E.pow(scale, -2.0, "scale")), "loc")


def _mvn(fn, v, E: Expect):
    E.const(fn._unbroadcasted_scale_tril, "covariance")
    L = fn._unbroadcasted_scale_tril
    k = L.shape[-1]
    precision = torch.cholesky_inverse(L)
    half_logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    d = v - fn.loc
    return -0.5 * k * LOG_2PI - half_logdet - 0.5 * E.quad(d, precision, "loc")


def _gamma(fn, v, E: Expect):
    a = E.const(fn.concentration, "concentration")
    E.independent(fn.rate, v, "the value and the rate")
    b = fn.rate
    return a * E.log(b, "rate") - torch.lgamma(a) + (a - 1) * E.log(v, "value") - E.pow(b, 1.0, "rate") * E.pow(v, 1.0, "value")


def _inverse_gamma(fn, v, E: Expect):
    base = fn.base_dist
    a = E.const(base.concentration, "concentration")
    b = base.rate
    E.independent(b, v, "the value and the rate")
    return a * E.log(b, "rate") - torch.lgamma(a) - (a + 1) * E.log(v, "value") - E.pow(b, 1.0, "rate") * E.pow(v, -1.0, "value")


def _exponential(fn, v, E: Expect):
    E.independent(fn.rate, v, "the value and the rate")
    return E.log(fn.rate, "rate") - E.pow(fn.rate, 1.0, "rate") * E.pow(v, 1.0, "value")


def _poisson(fn, v, E: Expect):
    v = E.const(v, "value")
    return v * E.log(fn.rate, "rate") - E.pow(fn.rate, 1.0, "rate") - torch.lgamma(v + 1)


def _beta(fn, v, E: Expect):
    a = E.const(fn.concentration1, "concentration1")
    b = E.const(fn.concentration0, "concentration0")
    lbeta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return (a - 1) * E.log(v, "value") + (b - 1) * E.log1m(v, "value") - lbeta


_SB_HINT = (
    " (a softmax of latent logits has no conjugate prior; use probabilities with a Dirichlet "
    "prior, or pyro_cavi.distributions.StickBreakingCategorical with Polya-Gamma augmentation)"
)


def _probs(fn, E: Expect, kind: str):
    if "probs" in fn.__dict__ or "logits" not in fn.__dict__:
        return fn.probs
    E.const(fn.logits, "logits", _SB_HINT)
    return fn.probs


def pg_name(site: str) -> str:
    return f"{site}.omega"


def has_latent_logits(fn) -> bool:
    """Whether a logistic-family distribution's logits depend on latents (so it needs Polya-Gamma)."""
    return isinstance(fn.__dict__.get("logits"), Sym)


def _logistic_pieces(fn, v, E: Expect):
    """(constant, kappa, b, quadratic weight) of the augmented log density
    ``const - b log 2 + kappa psi - q omega psi² / 2`` for Bernoulli, Binomial and
    stick-breaking likelihoods with logits ``psi``."""
    if isinstance(fn, StickBreakingCategorical):
        j = torch.arange(fn.logits.shape[-1], device=v.device)
        v = v.unsqueeze(-1)
        reached = (v >= j).to(fn.logits.dtype)
        stop = (v == j).to(fn.logits.dtype)
        return 0.0, reached * (stop - 0.5), reached, reached
    if isinstance(fn, tdist.Binomial):
        n = E.const(fn.total_count, "total_count")
        log_choose = torch.lgamma(n + 1) - torch.lgamma(v + 1) - torch.lgamma(n - v + 1)
        return log_choose, v - n / 2, n, 1.0
    return 0.0, v - 0.5, 1.0, 1.0


def _logistic(fn, v, E: Expect):
    psi = fn.logits
    const, kappa, b, q = _logistic_pieces(fn, v, E)
    lp = const - b * math.log(2.0) + kappa * E.mean(psi, "logits") - 0.5 * q * E.omega() * E.sq(psi, "logits")
    return lp.sum(-1) if isinstance(fn, StickBreakingCategorical) else lp


def _logistic_summed(fn, v, E: Expect, weight):
    """``sum_n weight_n E[log p(v_n | psi_n, omega_n)]`` of the Pólya-Gamma augmented density,
    with every product of broadcast pieces contracted by einsum: for a latent stick-breaking
    site enumerated over its K values, the masks (K, K − 1), responsibilities (K, N) and
    per-datum stick terms (N, K − 1) are never multiplied out to (K, N, K − 1)."""
    psi = fn.logits
    const, kappa, b, q = _logistic_pieces(fn, v, E)
    if isinstance(fn, StickBreakingCategorical):
        weight = weight.unsqueeze(-1)
    as_t = lambda t: torch.as_tensor(t, dtype=weight.dtype, device=weight.device)  # noqa: E731
    mean = E.mean(psi, "logits")
    full = ex.broadcast_shapes(weight.shape, psi.shape, *(as_t(t).shape for t in (const, kappa, b, q)))
    linear = ex.broadcast_sum((weight, as_t(kappa), mean), full)
    linear = linear + ex.broadcast_sum((weight, as_t(const) - as_t(b) * math.log(2.0)), full)
    return linear - 0.5 * E.wsq(psi, (weight, as_t(q), E.omega()), "logits")


def _bernoulli(fn, v, E: Expect):
    if has_latent_logits(fn):
        return _logistic(fn, v, E)
    p = _probs(fn, E, "bernoulli")
    return v * E.log(p, "probs") + (1 - v) * E.log1m(p, "probs")


def _binomial(fn, v, E: Expect):
    if has_latent_logits(fn):
        return _logistic(fn, v, E)
    n = E.const(fn.total_count, "total_count")
    p = _probs(fn, E, "bernoulli")
    log_choose = torch.lgamma(n + 1) - torch.lgamma(v + 1) - torch.lgamma(n - v + 1)
    return log_choose + v * E.log(p, "probs") + (n - v) * E.log1m(p, "probs")


def _stick_breaking(fn, v, E: Expect):
    if has_latent_logits(fn):
        return _logistic(fn, v, E)
    return fn.log_prob(v)


def _logistic_or_plain_summed(plain):
    def summed(fn, v, E, weight):
        if has_latent_logits(fn):
            return _logistic_summed(fn, v, E, weight)
        return (plain(fn, v, E) * weight).sum()

    return summed


def _geometric(fn, v, E: Expect):
    p = _probs(fn, E, "bernoulli")
    return v * E.log1m(p, "probs") + E.log(p, "probs")


def _categorical(fn, v, E: Expect):
    p = _probs(fn, E, "categorical")
    logp = E.log(p, "probs")
    v = v.long()
    # gather on the distinct elements only (log-weights shared by every datum, the value
    # enumerated over categories), then broadcast to the batch shape
    shape = ex.broadcast_shapes(logp.shape[:-1], v.shape)
    small_logp, small_v = torch.broadcast_tensors(ex.compact(logp, keep_last=1), ex.compact(v).unsqueeze(-1))
    return small_logp.gather(-1, small_v[..., :1]).squeeze(-1).expand(shape)


def _multinomial(fn, v, E: Expect):
    p = _probs(fn, E, "categorical")
    n = v.sum(-1)
    return torch.lgamma(n + 1) - torch.lgamma(v + 1).sum(-1) + (v * E.log(p, "probs")).sum(-1)


def _dirichlet(fn, v, E: Expect):
    a = E.const(fn.concentration, "concentration")
    log_norm = torch.lgamma(a).sum(-1) - torch.lgamma(a.sum(-1))
    return ((a - 1) * E.log(v, "value")).sum(-1) - log_norm


RULES: Dict[type, Callable] = {
    tdist.Normal: _normal,
    tdist.MultivariateNormal: _mvn,
    tdist.Gamma: _gamma,
    dist.InverseGamma: _inverse_gamma,
    tdist.Exponential: _exponential,
    tdist.Poisson: _poisson,
    tdist.Beta: _beta,
    tdist.Bernoulli: _bernoulli,
    tdist.Binomial: _binomial,
    tdist.Geometric: _geometric,
    tdist.Categorical: _categorical,
    tdist.Multinomial: _multinomial,
    tdist.Dirichlet: _dirichlet,
    StickBreakingCategorical: _stick_breaking,
}


SUMMED_RULES: Dict[Callable, Callable] = {
    _normal: _normal_summed,
    _bernoulli: _logistic_or_plain_summed(_bernoulli),
    _binomial: _logistic_or_plain_summed(_binomial),
    _stick_breaking: _logistic_or_plain_summed(_stick_breaking),
}


def find_rule(fn) -> Callable | None:
    for cls in type(fn).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def unwrap(fn):
    """Strip ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution``.

    Returns ``(base, reinterpreted_event_dims, mask)``.
    """
    event_dims = 0
    mask = None
    while True:
        if isinstance(fn, tdist.Independent):
            event_dims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            mask = fn._mask if mask is None else mask & fn._mask
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, event_dims, mask


def _params(fn):
    out = {}
    for k in getattr(fn, "arg_constraints", {}):
        if k in fn.__dict__:
            out[k] = fn.__dict__[k]
    return out


def expected_log_prob(
    name: str, fn, value, factors, mu, used: Dict[str, str] | None = None,
    weight: Tensor | None = None, cache: dict | None = None,
) -> Tensor:
    """:math:`E_q[\\log p(value \\mid params)]` with the batch shape of ``fn`` (event dims summed).

    With ``weight`` (broadcastable to the batch shape) it returns the weighted sum instead,
    which lets a rule use cached sufficient statistics. If ``used`` is given, it receives the
    latent sites the density depends on and the parameter each enters through."""
    base, event_dims, mask = unwrap(fn)
    rule = find_rule(base)
    E = Expect(name, type(base).__name__, factors, mu, cache)
    if rule is None:
        symbolic = [k for k, p in _params(base).items() if isinstance(p, Sym)]
        if symbolic or isinstance(value, Sym):
            what = f"parameter {symbolic[0]!r}" if symbolic else "value"
            latent = ex.latent_sites(_params(base)[symbolic[0]]) if symbolic else ex.latent_sites(value)
            raise NonConjugateError(
                f"latent site {', '.join(repr(s) for s in sorted(latent))} is not conditionally conjugate "
                f"at site {name!r}: CAVI has no conjugate rule for a {type(base).__name__} whose {what} "
                "depends on a latent site"
            )
        rule = lambda fn, v, E: fn.log_prob(v)  # noqa: E731 - a density with constant parameters
    if weight is not None:
        if mask is not None:
            weight = weight * mask
        summed = SUMMED_RULES.get(rule)
        if summed is not None:
            total = summed(base, value, E, weight.reshape(weight.shape + (1,) * event_dims))
        else:
            lp = rule(base, value, E)
            if event_dims:
                lp = lp.sum(tuple(range(-event_dims, 0)))
            total = ex.broadcast_sum((lp, weight), ex.broadcast_shapes(lp.shape, weight.shape))
        if used is not None:
            used.update(E.used)
        return total
    lp = rule(base, value, E)
    if used is not None:
        used.update(E.used)
    if event_dims:
        lp = lp.sum(tuple(range(-event_dims, 0)))
    if mask is not None:
        lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return lp
