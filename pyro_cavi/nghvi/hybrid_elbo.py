"""
The hybrid ELBO of Zhang et al. (2023): a variational density over the global parameters only,
with the local latents drawn from their exact conditional.
"""

from __future__ import annotations

import copy
import warnings

import torch

import pyro.distributions as dist

import pyro.poutine as poutine
from pyro.infer.elbo import ELBO
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from .conditionals import GaussianConditional
from .natural_gradient import FactorGaussianFisher

_COVARIANCE_GRADIENTS = ("reparameterization", "stein")


def _detached(fn):
    """A shallow copy of a distribution with every tensor it holds (parameters and cached
    factorisations, recursively through wrapped base distributions) detached."""
    out = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            setattr(out, key, value.detach())
        elif isinstance(value, torch.distributions.Distribution):
            setattr(out, key, _detached(value))
    return out


def _path_log_prob(trace) -> torch.Tensor:
    """``log q(theta)`` of a guide trace differentiated only through the sampled values."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        # Delta sites (an autoguide's unpacked values) hold the log-Jacobian as a function of the
        # sampled latent only: keep them as they are.
        fn = fn if isinstance(fn, dist.Delta) else _detached(fn)
        log_p = fn.log_prob(site["value"])
        scale = site.get("scale", 1.0)
        mask = site.get("mask")
        if mask is not None:
            log_p = log_p * mask
        total = total + (scale * log_p).sum()
    return total


def _as_conditional(local_sites):
    if isinstance(local_sites, str):
        return GaussianConditional(local_sites)
    if not hasattr(local_sites, "sites") or not callable(local_sites):
        raise TypeError(
            "HybridELBO expects a local site name or a conditional sampler (a callable with a "
            f"'sites' attribute), got {type(local_sites).__name__}"
        )
    return local_sites


def _stein_surrogate(surrogate: torch.Tensor, guide_trace, guide) -> torch.Tensor:
    """``surrogate`` with the same value and the same gradient except along the guide's Gaussian
    draw ``x = mu + ...``: there ``g . dx/dlambda`` (``g`` the gradient of ``surrogate`` at ``x``) is
    replaced by ``g . dmu/dlambda + 1/2 v^T (dSigma/dlambda) g``, ``v = Sigma^{-1} (x - mu)``
    (the Stein covariance gradient, see :class:`HybridELBO`)."""
    aux = [site for site in guide_trace.nodes.values() if site["type"] == "sample" and site["infer"].get("is_auxiliary")]
    fn = aux[0]["fn"] if len(aux) == 1 else None
    if not isinstance(fn, (torch.distributions.LowRankMultivariateNormal, torch.distributions.MultivariateNormal)):
        raise ValueError(
            "covariance_gradient='stein' needs a guide whose latent is one Gaussian draw "
            "(AutoLowRankMultivariateNormal or AutoMultivariateNormal), got "
            f"{type(guide).__name__} with {len(aux)} auxiliary site(s)"
            + (f" of type {type(fn).__name__}" if len(aux) == 1 else "")
        )
    x = aux[0]["value"]
    if not x.requires_grad:
        return surrogate
    (g,) = torch.autograd.grad(surrogate, x, retain_graph=True)
    with torch.no_grad():
        diff = x - fn.loc
        if isinstance(fn, torch.distributions.LowRankMultivariateNormal):
            v = FactorGaussianFisher(fn.cov_factor, fn.cov_diag.sqrt()).precision_matmul(diff)
        else:
            v = torch.cholesky_solve(diff.unsqueeze(-1), fn.scale_tril).squeeze(-1)
    if isinstance(fn, torch.distributions.LowRankMultivariateNormal):
        cov_g = fn.cov_factor @ (fn.cov_factor.T @ g) + fn.cov_diag * g
    else:
        cov_g = fn.scale_tril @ (fn.scale_tril.T @ g)
    replacement = g @ fn.loc + 0.5 * (v @ cov_g) - g @ x
    return surrogate + replacement - replacement.detach()


class HybridELBO(ELBO):
    r"""
    Hybrid variational inference (Zhang, Smith, Maneesoonthorn, Loaiza-Maya 2023,
    arXiv:2302.13536).  The variational family is :math:`q_\lambda(\theta)\,p(z \mid \theta, y)`:
    a guide over the global latents :math:`\theta` (typically
    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`, :math:`\Sigma = BB^T + D^2`)
    and the *exact* conditional of the local latents :math:`z`.  The objective is

    .. math::

        \mathcal L(\lambda) = \mathbb E_{q_\lambda(\theta) p(z\mid\theta,y)}
            [\log p(y, z, \theta) - \log q_\lambda(\theta) - \log p(z \mid \theta, y)]
            = \mathbb E_{q_\lambda(\theta)}[\log p(y, \theta) - \log q_\lambda(\theta)],

    the marginal ELBO with :math:`z` integrated out.  Its reparameterisation gradient needs
    :math:`\nabla_\theta \log p(y,\theta) = \mathbb E_{p(z\mid\theta,y)}[\nabla_\theta \log p(y,z,\theta)]`
    (Fisher's identity), estimated with one draw :math:`z \sim p(z \mid \theta, y)` per particle
    held fixed while differentiating.  The guide, and so the natural gradient of
    :class:`~pyro_cavi.nghvi.NGHVIOptim`, involve only :math:`\theta`, whose dimension does not
    grow with the number of groups.

    The local sites are drawn by ``conditional`` (see :mod:`pyro_cavi.nghvi.conditionals`), which
    must not appear in the guide.  The reported loss is the negative of the unbiased ELBO
    estimate above when the sampler has ``log_prob``; otherwise it omits the
    :math:`-\log p(z\mid\theta,y)` term, so its expectation is off by the conditional entropy of
    :math:`z` and it is only good for monitoring (a warning says so once); the gradient is the
    same either way.

    :param local_sites: a local site name (shorthand for :class:`GaussianConditional`) or a
        conditional sampler object.
    :param int num_particles: draws of :math:`(\theta, z)` averaged per step.
    :param bool path_gradient: differentiate :math:`\log q_\lambda(\theta)` only through the
        draw :math:`\theta = \mu + Bz + d \circ \epsilon`, not through its explicit dependence on
        :math:`\lambda` (the "path derivative" or "sticking the landing" estimator, Roeder, Wu
        and Duvenaud 2017).  The score term it drops has expectation zero, so the gradient stays
        unbiased; its variance vanishes where :math:`q` equals a Gaussian posterior.  This is the
        estimator of the authors' code (Zhang et al. 2023: the gradient of
        :math:`\log p(y, z, \theta) - \log q_\lambda(\theta)` with respect to :math:`\theta`, times
        :math:`\partial\theta/\partial\lambda`), and the default; ``False`` gives the total derivative
        of Pyro's ``Trace_ELBO``.
    :param str covariance_gradient: how the gradient reaches the guide's covariance parameters.
        ``"reparameterization"`` (the default, the authors' estimator): through the draw
        :math:`\theta = \mu + Bz + d \circ \epsilon`, i.e. :math:`\nabla_B = g z^T`,
        :math:`\nabla_d = g \circ \epsilon` with :math:`g = \nabla_\theta h(\theta)`,
        :math:`h = \log p(y, z, \theta) - \log q(\theta)`.  ``"stein"``: through an estimate of
        the gradient with respect to :math:`\Sigma` itself, by Stein's lemma
        :math:`\mathbb E[g (\theta - \mu)^T] = \mathbb E[\nabla^2 h]\,\Sigma`, so
        :math:`\nabla_\Sigma \mathbb E[h] = \tfrac12 \mathbb E[\nabla^2 h] \approx
        \hat G = \tfrac14 (g v^T + v g^T)`, :math:`v = \Sigma^{-1}(\theta - \mu)` (Opper and
        Archambeau 2009; Lin, Khan and Schmidt 2019), pulled back by the chain rule:
        :math:`\nabla_B = 2 \hat G B`, :math:`\nabla_{d_i} = 2 \hat G_{ii} d_i` (and likewise for
        any parameterisation of :math:`\Sigma`).  Both are unbiased for the same gradient; the
        location gradient is :math:`g` in both.  Why "stein": the reparameterisation estimate
        depends on how :math:`\Sigma` is parameterised, the Stein one only on :math:`\Sigma`.
        Where different ``(B, d)`` give the same :math:`\Sigma` (``B`` with ``p`` close to
        ``dim theta``: the map ``(B lower triangular, d) -> Sigma`` has null directions from
        ``p = 5`` on in dimension 8, near-null ones from ``p = 4``), the exact gradient has no
        component along them but the reparameterisation estimate does, pure noise there, and
        :math:`\nabla_{d_i}` stays of order one as :math:`d_i \to 0` while the exact gradient
        (``Sigma`` depends on ``d_i^2``) vanishes like :math:`d_i`.  The Stein estimate lies in the
        span of the exact gradients (no noise along those directions) and vanishes with
        :math:`d_i`.  NG-HVI in the paper's coordinates needs it beyond ``p = 3``: see
        :class:`~pyro_cavi.nghvi.NaturalGradientAdadelta` and ``benchmarks/results/nghvi.md``.
        It needs a guide whose latent is one Gaussian draw (``AutoLowRankMultivariateNormal``,
        ``AutoMultivariateNormal``) and ``path_gradient=True``; it costs one more backward pass
        through the model per particle.
    """

    def __init__(
        self,
        local_sites,
        num_particles: int = 1,
        path_gradient: bool = True,
        covariance_gradient: str = "reparameterization",
    ):
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if not isinstance(path_gradient, bool):
            raise TypeError(f"path_gradient must be a bool, got {path_gradient!r}")
        if covariance_gradient not in _COVARIANCE_GRADIENTS:
            raise ValueError(f"covariance_gradient must be one of {_COVARIANCE_GRADIENTS}, got {covariance_gradient!r}")
        if covariance_gradient == "stein" and not path_gradient:
            raise ValueError("covariance_gradient='stein' needs path_gradient=True (the Stein estimate is of the path gradient)")
        super().__init__(num_particles=num_particles)
        self.path_gradient = path_gradient
        self.covariance_gradient = covariance_gradient
        self.conditional = _as_conditional(local_sites)
        self._warned = False
        self._checked = False

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("HybridELBO computes its particles in loss / loss_and_grads")

    def _get_global_guide(self, guide):
        return getattr(guide, "global_guide", guide)

    def _check_sites(self, model, guide_trace, theta, args, kwargs):
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, data=theta)).get_trace(*args, **kwargs)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if name not in guide_trace.nodes and name not in self.conditional.sites:
                raise ValueError(
                    f"latent site '{name}' of the model is neither in the guide nor a local site "
                    f"of the conditional sampler (local sites: {list(self.conditional.sites)})"
                )
        self._checked = True

    def _particle(self, model, guide, args, kwargs):
        guide = self._get_global_guide(guide)
        guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
        theta = {}
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name in self.conditional.sites:
                raise ValueError(
                    f"local site '{name}' is drawn from its exact conditional and must not be in the "
                    "guide; build the guide on poutine.block(model, hide=[...local sites...])"
                )
            if not site["is_observed"] and not site["infer"].get("is_auxiliary"):
                theta[name] = site["value"].detach()
        if not self._checked:
            self._check_sites(model, guide_trace, theta, args, kwargs)
        z = {k: v.detach() for k, v in self.conditional(model, theta, *args, **kwargs).items()}
        missing = set(self.conditional.sites) - set(z)
        if missing:
            raise ValueError(f"the conditional sampler returned no value for local sites {sorted(missing)}")
        conditioned = poutine.condition(model, data=z)
        model_trace = poutine.trace(poutine.replay(conditioned, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace = prune_subsample_sites(model_trace)
        log_q = guide_trace.log_prob_sum()
        if self.path_gradient and torch.is_grad_enabled():
            # log q(theta) with the guide's parameters held fixed and theta (still a function
            # of the parameters) differentiable: the path derivative.
            log_q_path = _path_log_prob(guide_trace)
            log_q = log_q_path + (log_q - log_q_path).detach()
        surrogate = model_trace.log_prob_sum() - log_q
        if self.covariance_gradient == "stein" and torch.is_grad_enabled():
            surrogate = _stein_surrogate(surrogate, guide_trace, guide)
        log_conditional = None
        if hasattr(self.conditional, "log_prob"):
            with torch.no_grad():
                log_conditional = self.conditional.log_prob(model, theta, z, *args, **kwargs)
        return surrogate, log_conditional

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Negative surrogate objective whose gradient is the hybrid ELBO gradient estimate."""
        total = 0.0
        for _ in range(self.num_particles):
            surrogate, _ = self._particle(model, guide, args, kwargs)
            total = total - surrogate / self.num_particles
        return total

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        loss, surrogate_loss = 0.0, 0.0
        for _ in range(self.num_particles):
            surrogate, log_conditional = self._particle(model, guide, args, kwargs)
            surrogate_loss = surrogate_loss - surrogate / self.num_particles
            value = surrogate.detach()
            if log_conditional is not None:
                value = value - log_conditional
            elif not self._warned:
                warnings.warn(
                    "the conditional sampler has no log_prob: the reported loss omits "
                    "-log p(z | theta, y) and is not a negative ELBO estimate",
                    stacklevel=3,
                )
                self._warned = True
            loss = loss - float(value) / self.num_particles
        return loss, surrogate_loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of the negative hybrid ELBO (no gradient)."""
        with torch.no_grad():
            return self._loss_and_surrogate(model, guide, args, kwargs)[0]

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the negative hybrid ELBO and accumulate its gradient into the parameters."""
        loss, surrogate_loss = self._loss_and_surrogate(model, guide, args, kwargs)
        if torch.is_tensor(surrogate_loss) and surrogate_loss.requires_grad:
            surrogate_loss.backward()
        return loss
