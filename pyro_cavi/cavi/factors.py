r"""Exponential-family factors of the mean-field posterior.

Every factor says the same four things (as BayesPy's nodes do): its sufficient
statistics :math:`T(x)` and their expectations (the *mean parameters*
:math:`\mu = E_q[T(x)]`), how natural parameters :math:`\eta` follow from the
gradient of the expected log joint with respect to :math:`\mu`, its entropy, and
the posterior distribution it stands for.

The update is the one of Autoconj (Hoffman, Johnson & Tran 2018) and of
conjugate-computation VI (Khan & Lin 2017): when :math:`E_q[\log p(x, y)]` is
multilinear in the factors' mean parameters, the optimal factor :math:`q_i` has
natural parameters :math:`\eta_i = \partial E_q[\log p] / \partial \mu_i`, with the
log base measure of :math:`q_i` read off as part of :math:`T`.

============== ================================ =============================================
family         sufficient statistics T(x)        natural parameters from the gradient g
============== ================================ =============================================
Gaussian       x, x xᵀ (per block)               Λ = −2 sym(g_{xxᵀ}),  m = Λ⁻¹ g_x
Gamma          x, log x                          α = 1 + g_{log x},  β = −g_x
InverseGamma   1/x, log x                        α = −1 − g_{log x},  β = −g_{1/x}
Beta           log x, log(1 − x)                 a = 1 + g_{log x},  b = 1 + g_{log(1−x)}
Dirichlet      log x                             α = 1 + g_{log x}
Categorical    one-hot(x)                        probs = softmax(g)
============== ================================ =============================================
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.distributions as tdist

import pyro.distributions as dist

from .errors import NonConjugateError
from .symbolic import compact

Tensor = torch.Tensor


class _NotASufficientStatistic(Exception):
    pass


class ExpFamilyFactor:
    """Base class: a factor ``q(x_site)`` with mean parameters ``self.mean_params``."""

    family: str = ""
    discrete: bool = False
    positive: bool = False
    auxiliary: bool = False  # not a model site (e.g. a Polya-Gamma augmentation variable)

    def __init__(self, site: str, shape: torch.Size, event_dim: int, dtype, device):
        self.site = site
        self.shape = torch.Size(shape)
        self.event_dim = event_dim
        self.dtype = dtype
        self.device = device
        self.mean_params: Tuple[Tensor, ...] = ()

    # -- what every family provides
    def update(self, grads: Tuple[Tensor, ...]) -> None:
        """Set the natural parameters to ``grads``, the gradient of the expected log joint
        with respect to the mean parameters (the optimal coordinate update)."""
        raise NotImplementedError

    def natural(self) -> Tuple[Tensor, ...]:
        """The current natural parameters, in the layout :meth:`update` takes."""
        raise NotImplementedError

    def entropy(self) -> Tensor:
        raise NotImplementedError

    def distribution(self) -> tdist.Distribution:
        raise NotImplementedError

    def stand_in(self) -> Tensor:
        """A concrete value used while tracing (the posterior mean)."""
        return self.distribution().mean

    # -- expectations used by expressions of positive latents
    def mean_log(self, mu, index: Tensor) -> Tensor:
        raise _NotASufficientStatistic("log")

    def mean_log1m(self, mu, index: Tensor) -> Tensor:
        raise _NotASufficientStatistic("log(1 - x)")

    def mean_pow(self, mu, index: Tensor, power: float) -> Tensor:
        raise _NotASufficientStatistic(f"x ** {power:g}")

    def _check(self, name: str, value: Tensor) -> None:
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise NonConjugateError(
                f"the update of latent site {self.site!r} ({self.family}) gave a non-positive or "
                f"non-finite {name}: the model is not conditionally conjugate in this site, or its "
                "prior is improper"
            )

    def __repr__(self) -> str:
        return f"{self.family}{tuple(self.shape)}"


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t.reshape(-1)[index]``, looked up once per distinct index of a broadcast ``index``."""
    return t.reshape(-1)[compact(index)].expand(index.shape)


class GaussianFactor(ExpFamilyFactor):
    r"""Gaussian factor with a full covariance inside each block.

    In block mode each plate element of the site is an independent block of
    ``n_e = prod(event_shape)`` elements; in dense mode (chosen automatically when
    plate elements are coupled by the likelihood) the site is a single block.
    Mean parameters: ``m`` of shape ``(n_blocks, n_e)`` and ``M = E[x xᵀ]`` of shape
    ``(n_blocks, n_e, n_e)``.
    """

    family = "Gaussian"

    def __init__(self, site, shape, event_dim, dtype, device, dense: bool = False):
        super().__init__(site, shape, event_dim, dtype, device)
        self.dense = dense
        batch = self.shape[: len(self.shape) - event_dim]
        event = self.shape[len(self.shape) - event_dim:]
        if dense:
            self.num_blocks, self.block_size = 1, self.shape.numel()
        else:
            self.num_blocks, self.block_size = batch.numel(), event.numel()
        eye = torch.eye(self.block_size, dtype=dtype, device=device)
        self.loc = torch.zeros(self.num_blocks, self.block_size, dtype=dtype, device=device)
        self.scale_tril = eye.expand(self.num_blocks, -1, -1).clone()
        self._set_mean_params()

    def _set_mean_params(self):
        cov = self.scale_tril @ self.scale_tril.mT
        self.mean_params = (self.loc, cov + self.loc.unsqueeze(-1) * self.loc.unsqueeze(-2))

    def set(self, loc: Tensor, scale_tril: Tensor) -> None:
        self.loc = loc.reshape(self.num_blocks, self.block_size).to(self.dtype)
        self.scale_tril = scale_tril.reshape(self.num_blocks, self.block_size, self.block_size).to(self.dtype)
        self._set_mean_params()

    def update(self, grads):
        g_m, g_M = grads
        precision = -(g_M + g_M.mT)
        if self.block_size == 1:  # scalar blocks: no LAPACK call
            if not bool((precision > 0).all()):
                self._not_positive_definite()
            self.loc = g_m / precision[..., 0]
            self.scale_tril = precision.rsqrt()
            self._set_mean_params()
            return
        try:
            chol = torch.linalg.cholesky(precision)
        except RuntimeError:
            self._not_positive_definite()
        self.loc = torch.cholesky_solve(g_m.unsqueeze(-1), chol).squeeze(-1)
        # scale_tril of the covariance: inverse of the precision's Cholesky factor, then re-factorised
        eye = torch.eye(self.block_size, dtype=self.dtype, device=self.device)
        cov = torch.cholesky_solve(eye.expand_as(chol), chol)
        cov = 0.5 * (cov + cov.mT)
        self.scale_tril = torch.linalg.cholesky(cov)
        self._set_mean_params()

    def natural(self):
        precision = torch.cholesky_inverse(self.scale_tril) if self.block_size > 1 else self.scale_tril ** -2
        return (precision @ self.loc.unsqueeze(-1)).squeeze(-1), -0.5 * precision

    def _not_positive_definite(self):
        raise NonConjugateError(
            f"the update of latent site {self.site!r} (Gaussian) gave a precision matrix that is "
            "not positive definite: the site's prior is improper or the model is not conditionally "
            "conjugate in it"
        )

    def entropy(self):
        n = self.block_size
        logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum()
        return logdet + 0.5 * n * self.num_blocks * (1.0 + torch.log(torch.tensor(2 * torch.pi, dtype=self.dtype)))

    def distribution(self):
        batch = self.shape[: len(self.shape) - self.event_dim]
        event = self.shape[len(self.shape) - self.event_dim:]
        if not self.dense and self.event_dim == 0:
            return dist.Normal(self.loc.reshape(batch), self.scale_tril.reshape(batch).abs())
        if not self.dense and self.event_dim == 1:
            d = self.block_size
            return dist.MultivariateNormal(self.loc.reshape(batch + (d,)), scale_tril=self.scale_tril.reshape(batch + (d, d)))
        if self.dense:
            return ReshapedMultivariateNormal(self.loc[0], self.scale_tril[0], self.shape)
        loc = self.loc.reshape(batch + (self.block_size,))
        return ReshapedMultivariateNormal(loc, self.scale_tril.reshape(batch + (self.block_size,) * 2), event)

    def stand_in(self):
        return self.loc.reshape(self.shape)

    @property
    def covariance(self) -> Tensor:
        return self.scale_tril @ self.scale_tril.mT


class ReshapedMultivariateNormal(dist.TorchDistribution):
    """A multivariate normal over a flattened block, presented with the site's own shape
    (a joint Gaussian over a whole plate, or over a matrix-valued event)."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc: Tensor, scale_tril: Tensor, event_shape: torch.Size, validate_args=None):
        self.mvn = dist.MultivariateNormal(loc, scale_tril=scale_tril)
        super().__init__(self.mvn.batch_shape, torch.Size(event_shape), validate_args=False)

    def _flat(self, value: Tensor) -> Tensor:
        return value.reshape(value.shape[: value.dim() - len(self.event_shape)] + (-1,))

    def _shaped(self, value: Tensor) -> Tensor:
        return value.reshape(value.shape[:-1] + self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self._shaped(self.mvn.rsample(sample_shape))

    def log_prob(self, value):
        return self.mvn.log_prob(self._flat(value))

    @property
    def mean(self):
        return self._shaped(self.mvn.mean)

    @property
    def variance(self):
        return self._shaped(self.mvn.variance)

    @property
    def covariance_matrix(self):
        return self.mvn.covariance_matrix

    def entropy(self):
        return self.mvn.entropy()

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        loc = self.mvn.loc.expand(batch_shape + self.mvn.event_shape)
        tril = self.mvn.scale_tril.expand(batch_shape + self.mvn.scale_tril.shape[-2:])
        return ReshapedMultivariateNormal(loc, tril, self.event_shape)


class _PositivePowerFactor(ExpFamilyFactor):
    """Gamma-type factors with mean parameters ``(E[x ** power], E[log x])``."""

    positive = True
    power: float = 1.0

    def mean_log(self, mu, index):
        return _gather(mu[1], index)

    def mean_pow(self, mu, index, power):
        if power == self.power:
            return _gather(mu[0], index)
        raise _NotASufficientStatistic(f"x ** {power:g}")


class GammaFactor(_PositivePowerFactor):
    """``Gamma(concentration, rate)``; mean parameters ``(E[x], E[log x])``."""

    family = "Gamma"
    power = 1.0

    def __init__(self, site, shape, event_dim, dtype, device):
        super().__init__(site, shape, event_dim, dtype, device)
        self.set(torch.ones(self.shape, dtype=dtype, device=device), torch.ones(self.shape, dtype=dtype, device=device))

    def set(self, concentration, rate):
        self.concentration, self.rate = concentration, rate
        self.mean_params = (concentration / rate, torch.digamma(concentration) - rate.log())

    def natural(self):
        return -self.rate, self.concentration - 1.0

    def update(self, grads):
        g_x, g_log = grads
        a, b = 1.0 + g_log, -g_x
        self._check("concentration", a)
        self._check("rate", b)
        self.set(a, b)

    def entropy(self):
        a, b = self.concentration, self.rate
        return (a - b.log() + torch.lgamma(a) + (1.0 - a) * torch.digamma(a)).sum()

    def distribution(self):
        d = dist.Gamma(self.concentration, self.rate)
        return d.to_event(self.event_dim) if self.event_dim else d


class InverseGammaFactor(_PositivePowerFactor):
    """``InverseGamma(concentration, rate)``; mean parameters ``(E[1/x], E[log x])``."""

    family = "InverseGamma"
    power = -1.0

    def __init__(self, site, shape, event_dim, dtype, device):
        super().__init__(site, shape, event_dim, dtype, device)
        self.set(2 * torch.ones(self.shape, dtype=dtype, device=device), torch.ones(self.shape, dtype=dtype, device=device))

    def set(self, concentration, rate):
        self.concentration, self.rate = concentration, rate
        self.mean_params = (concentration / rate, rate.log() - torch.digamma(concentration))

    def natural(self):
        return -self.rate, -self.concentration - 1.0

    def update(self, grads):
        g_inv, g_log = grads
        a, b = -1.0 - g_log, -g_inv
        self._check("concentration", a)
        self._check("rate", b)
        self.set(a, b)

    def entropy(self):
        a, b = self.concentration, self.rate
        return (a + b.log() + torch.lgamma(a) - (1.0 + a) * torch.digamma(a)).sum()

    def distribution(self):
        d = dist.InverseGamma(self.concentration, self.rate)
        return d.to_event(self.event_dim) if self.event_dim else d

    def stand_in(self):
        return self.rate / (self.concentration + 1.0)


class NormalGammaFactor(ExpFamilyFactor):
    r"""Joint Normal-Gamma factor over a Gaussian site ``w`` and a Gamma site ``tau`` whose
    elements scale the precision of ``w``'s blocks (structured mean-field):

    .. math::
        q(w_b, \tau_b) = \mathcal{N}(w_b \mid m_b, (\tau_b \Lambda_b)^{-1})\,
        \mathrm{Gamma}(\tau_b \mid a_b, b_b),

    one pair per block ``b`` (a plate element of ``w`` and the matching element of ``tau``).
    It is the exact complete conditional when every density that involves ``w`` is a Normal
    whose precision is ``tau`` times a constant (matrix-normal-gamma experts, Normal-Gamma
    priors; Bishop 2006 §2.3.6, Heins et al. 2024). Sufficient statistics
    :math:`(\tau w, \tau w w^\top, \tau, \log\tau)`; natural parameters
    :math:`(\Lambda m, -\Lambda/2, -(b + m^\top\Lambda m/2), a - 1 + D/2)`; mean parameters
    :math:`(\bar\tau m, \bar\tau m m^\top + \Lambda^{-1}, \bar\tau, \psi(a) - \log b)` with
    :math:`\bar\tau = a/b`.
    """

    family = "NormalGamma"

    def __init__(self, site, num_blocks: int, block_size: int, dtype, device):
        super().__init__(site, torch.Size([num_blocks, block_size]), 1, dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size
        eye = torch.eye(block_size, dtype=dtype, device=device)
        self.set(torch.zeros(num_blocks, block_size, dtype=dtype, device=device), eye.expand(num_blocks, -1, -1).clone(),
                 torch.ones(num_blocks, dtype=dtype, device=device), torch.ones(num_blocks, dtype=dtype, device=device))

    def set(self, loc: Tensor, scale_tril: Tensor, concentration: Tensor, rate: Tensor) -> None:
        """``scale_tril``: Cholesky factor of :math:`\Lambda^{-1}` (the covariance of ``w`` at ``tau = 1``)."""
        self.loc, self.scale_tril, self.concentration, self.rate = loc, scale_tril, concentration, rate
        tau = concentration / rate
        cov = scale_tril @ scale_tril.mT
        outer = loc.unsqueeze(-1) * loc.unsqueeze(-2)
        self.mean_params = (tau.unsqueeze(-1) * loc, tau[:, None, None] * outer + cov, tau,
                            torch.digamma(concentration) - rate.log())

    def update(self, grads):
        g_m, g_M, g_tau, g_log = grads
        precision = -(g_M + g_M.mT)
        try:
            chol = torch.linalg.cholesky(precision)
        except RuntimeError:
            raise NonConjugateError(
                f"the update of the Normal-Gamma factor {self.site!r} gave a precision matrix that is "
                "not positive definite: a prior is improper or the model is not conditionally conjugate in it"
            ) from None
        loc = torch.cholesky_solve(g_m.unsqueeze(-1), chol).squeeze(-1)
        eye = torch.eye(self.block_size, dtype=self.dtype, device=self.device)
        cov = torch.cholesky_solve(eye.expand_as(chol), chol)
        scale_tril = torch.linalg.cholesky(0.5 * (cov + cov.mT))
        a = g_log + 1.0 - 0.5 * self.block_size
        b = -g_tau - 0.5 * (loc * g_m).sum(-1)
        self._check("concentration", a)
        self._check("rate", b)
        self.set(loc, scale_tril, a, b)

    def natural(self):
        precision = torch.cholesky_inverse(self.scale_tril)
        eta = (precision @ self.loc.unsqueeze(-1)).squeeze(-1)
        return (eta, -0.5 * precision, -(self.rate + 0.5 * (self.loc * eta).sum(-1)),
                self.concentration - 1.0 + 0.5 * self.block_size)

    def entropy(self):
        a, b = self.concentration, self.rate
        gamma = a - b.log() + torch.lgamma(a) + (1.0 - a) * torch.digamma(a)
        logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # 1/2 log |Lambda^-1|
        d = self.block_size
        gauss = 0.5 * d * (1.0 + math.log(2 * math.pi)) + logdet - 0.5 * d * self.mean_params[3]
        return (gamma + gauss).sum()

    @staticmethod
    def member_moments(mu) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
        """The moments the two sites' expressions are evaluated with: for ``w`` the moments under
        the ``tau``-tilted distribution, :math:`(E[\tau w], E[\tau w w^\top]) / E[\tau]`, so that
        :math:`E[\tau]\,E'[(y - w^\top x)^2] = E[\tau (y - w^\top x)^2]` exactly; for ``tau``
        :math:`(E[\tau], E[\log\tau])`."""
        t_m, t_M, tau, log_tau = mu
        return (t_m / tau.unsqueeze(-1), t_M / tau[:, None, None]), (tau, log_tau)

    def distribution(self):
        raise NotImplementedError("a Normal-Gamma factor is read through its members' marginals")

    def marginals(self, shape_w: torch.Size, event_dim_w: int, shape_tau: torch.Size):
        """Marginal posteriors: ``w`` multivariate Student-t with ``2a`` degrees of freedom and
        scale :math:`(b/a)\Lambda^{-1}`; ``tau`` Gamma(a, b)."""
        a, b = self.concentration, self.rate
        tau = dist.Gamma(a.reshape(shape_tau), b.reshape(shape_tau))  # one element per block of w
        batch = shape_w[: len(shape_w) - event_dim_w]
        tril = (b / a).sqrt()[:, None, None] * self.scale_tril
        if event_dim_w == 0:
            w = dist.StudentT(2 * a.reshape(batch), self.loc.reshape(batch), tril.reshape(batch))
        else:
            w = dist.MultivariateStudentT(2 * a.reshape(batch), self.loc.reshape(batch + (-1,)),
                                          tril.reshape(batch + (self.block_size, self.block_size)))
        return w, tau


class BetaFactor(ExpFamilyFactor):
    """``Beta(a, b)``; mean parameters ``(E[log x], E[log(1 - x)])``."""

    family = "Beta"
    positive = True

    def __init__(self, site, shape, event_dim, dtype, device):
        super().__init__(site, shape, event_dim, dtype, device)
        one = torch.ones(self.shape, dtype=dtype, device=device)
        self.set(one, one.clone())

    def set(self, c1, c0):
        self.concentration1, self.concentration0 = c1, c0
        total = torch.digamma(c1 + c0)
        self.mean_params = (torch.digamma(c1) - total, torch.digamma(c0) - total)

    def natural(self):
        return self.concentration1 - 1.0, self.concentration0 - 1.0

    def update(self, grads):
        a, b = 1.0 + grads[0], 1.0 + grads[1]
        self._check("concentration1", a)
        self._check("concentration0", b)
        self.set(a, b)

    def entropy(self):
        return self.distribution().entropy().sum()

    def distribution(self):
        d = dist.Beta(self.concentration1, self.concentration0)
        return d.to_event(self.event_dim) if self.event_dim else d

    def mean_log(self, mu, index):
        return _gather(mu[0], index)

    def mean_log1m(self, mu, index):
        return _gather(mu[1], index)


class DirichletFactor(ExpFamilyFactor):
    """``Dirichlet(alpha)``; mean parameters ``E[log x]``."""

    family = "Dirichlet"
    positive = True

    def __init__(self, site, shape, event_dim, dtype, device):
        super().__init__(site, shape, event_dim, dtype, device)
        self.set(torch.ones(self.shape, dtype=dtype, device=device))

    def set(self, concentration):
        self.concentration = concentration
        self.mean_params = (torch.digamma(concentration) - torch.digamma(concentration.sum(-1, keepdim=True)),)

    def natural(self):
        return (self.concentration - 1.0,)

    def update(self, grads):
        a = 1.0 + grads[0]
        self._check("concentration", a)
        self.set(a)

    def entropy(self):
        return self.distribution().entropy().sum()

    def distribution(self):
        d = dist.Dirichlet(self.concentration)
        return d.to_event(self.event_dim - 1) if self.event_dim > 1 else d

    def mean_log(self, mu, index):
        return _gather(mu[0], index)


class CategoricalFactor(ExpFamilyFactor):
    """Responsibilities of a discrete site: ``probs`` of shape ``batch_shape + (K,)``.

    ``support`` holds the value of each category (``0..K-1`` for a Categorical,
    ``0., 1.`` for a Bernoulli site).
    """

    family = "Categorical"
    discrete = True

    def __init__(self, site, shape, event_dim, dtype, device, support: Tensor, bernoulli: bool = False):
        super().__init__(site, shape, event_dim, dtype, device)
        self.support = support
        self.bernoulli = bernoulli
        k = support.shape[0]
        self.set(torch.full(self.shape + (k,), 1.0 / k, dtype=dtype, device=device))

    def set(self, probs):
        self.probs = probs
        self.mean_params = (probs,)

    def natural(self):
        return (self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny).log(),)

    def update(self, grads):
        g = grads[0]
        self.set(torch.softmax(g, -1))

    def entropy(self):
        p = self.probs
        return -(torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))).sum()

    def distribution(self):
        if self.bernoulli:
            return dist.Bernoulli(probs=self.probs[..., 1])
        return dist.Categorical(probs=self.probs)

    def stand_in(self):
        return self.support[0].expand(self.shape)


def polya_gamma_mean(b: Tensor, c: Tensor) -> Tensor:
    """:math:`E[\\omega] = \\frac{b}{2c}\\tanh(c/2)` for :math:`\\omega \\sim PG(b, c)`, with its c -> 0 limit b/4."""
    c = c.abs()
    small = c < 1e-4
    safe = torch.where(small, torch.ones_like(c), c)
    return torch.where(small, b / 4 * (1 - c * c / 12), b / (2 * safe) * torch.tanh(safe / 2))


def log_cosh(x: Tensor) -> Tensor:
    x = x.abs()
    return x + torch.nn.functional.softplus(-2 * x) - math.log(2.0)


class PolyaGammaFactor(ExpFamilyFactor):
    r"""Pólya-Gamma factor :math:`q(\omega) = PG(b, c)` of an augmented logistic likelihood.

    Augmentation (Polson, Scott & Windle 2013): for logits :math:`\psi`,
    :math:`\frac{(e^\psi)^a}{(1 + e^\psi)^b} = 2^{-b} e^{\kappa\psi}
    \int_0^\infty e^{-\omega\psi^2/2} PG(\omega \mid b, 0)\, d\omega` with
    :math:`\kappa = a - b/2`. Relative to its base measure :math:`PG(b, 0)` the factor is
    exponential-family with statistic :math:`\omega`, natural parameter
    :math:`-c^2/2` and log-normaliser :math:`-b \log\cosh(c/2)`; the optimal
    :math:`c^2 = E_q[\psi^2]`. ``entropy()`` returns :math:`H[q] + E_q[\log PG(\omega|b, 0)]
    = -\mathrm{KL}(q \,\|\, PG(b, 0))`, weighted by the likelihood term's weight, since the
    base measure belongs to the augmented model. The fixed point is the Jaakkola-Jordan bound.
    """

    family = "PolyaGamma"
    auxiliary = True

    def __init__(self, site, shape, b: Tensor, weight: Tensor, dtype, device):
        super().__init__(site, shape, 0, dtype, device)
        self.b = torch.as_tensor(b, dtype=dtype, device=device).expand(self.shape)
        self.weight = torch.as_tensor(weight, dtype=dtype, device=device).expand(self.shape)
        self.set(torch.zeros(self.shape, dtype=dtype, device=device))

    def set(self, c: Tensor) -> None:
        self.c = c
        self.mean_params = (polya_gamma_mean(self.b, c),)

    def update(self, grads):
        # d E[log p] / d E[omega] = -weight * E[psi²] / 2 (summed over enumerated values)
        g = grads[0]
        positive = self.weight > 0
        c2 = torch.where(positive, -2 * g / torch.where(positive, self.weight, torch.ones_like(self.weight)), torch.zeros_like(g))
        self.set(c2.clamp_min(0).sqrt())

    def entropy(self):
        kl = self.b * log_cosh(self.c / 2) - 0.5 * self.c ** 2 * self.mean_params[0]
        return -(self.weight * kl).sum()

    def distribution(self):
        raise NotImplementedError("Polya-Gamma factors are auxiliary; draw from them with the polyagamma package")

    def stand_in(self):
        return self.mean_params[0]
