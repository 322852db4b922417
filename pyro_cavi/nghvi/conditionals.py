"""
Samplers for the exact conditional ``p(z | theta, y)`` of local latent variables.

A *conditional sampler* is any object with

- ``sites``: a tuple of the local sample-site names it draws;
- ``__call__(model, theta, *args, **kwargs) -> dict``: one draw ``{site: value}`` of the local
  latents from ``p(z | theta, y)``, where ``theta`` maps every global latent site name to its
  (constrained, detached) value and ``*args, **kwargs`` are the model's arguments;
- optionally ``log_prob(model, theta, z, *args, **kwargs) -> Tensor``: ``log p(z | theta, y)``
  summed over the local sites, used only to report an unbiased ELBO value.

:class:`~pyro_cavi.nghvi.HybridELBO` needs nothing else, so a closed-form sampler for a
specific model, or one derived by the CAVI engine's conjugacy detection, plugs in unchanged.
Samplers run the model themselves under :func:`pyro.poutine.block`, so nothing they do leaks
into an enclosing trace.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..cavi.rules import unwrap


class _LocalLeafMessenger(Messenger):
    """Sets local site ``site`` to a fresh leaf tensor (``value``, or zeros) marked observed."""

    def __init__(self, site: str, value: Tensor | None = None):
        super().__init__()
        self.site = site
        self.value = value
        self.leaf: Tensor | None = None
        self.event_dim = 0

    def _pyro_sample(self, msg):
        if msg["name"] != self.site:
            return
        if msg["is_observed"]:
            raise ValueError(f"local site '{self.site}' is observed; name a latent site")
        support = msg["fn"].support
        while isinstance(support, dist.constraints.independent):
            support = support.base_constraint
        if support is not dist.constraints.real:
            raise ValueError(
                f"local site '{self.site}' has support {msg['fn'].support}; a Gaussian conditional "
                "needs a real-valued site"
            )
        shape = msg["fn"].shape()
        if self.value is None or self.value.shape != shape:  # no (or stale) value: start at zero
            try:
                dtype = msg["fn"].mean.dtype
            except NotImplementedError:
                dtype = torch.get_default_dtype()
            self.leaf = torch.zeros(shape, dtype=dtype, requires_grad=True)
        elif self.value.requires_grad:
            self.leaf = self.value
        else:
            self.leaf = self.value.clone().requires_grad_(True)
        self.event_dim = msg["fn"].event_dim
        msg["value"] = self.leaf
        msg["is_observed"] = True


def _trace_at(model, theta: dict, site: str, value: Tensor | None, *args, **kwargs):
    """Trace of ``model`` given ``theta`` with local ``site`` at a leaf tensor; returns (trace, leaf, event_dim)."""
    leaf = _LocalLeafMessenger(site, value)
    with torch.enable_grad(), poutine.block(), leaf:
        trace = poutine.trace(poutine.condition(model, data=theta)).get_trace(*args, **kwargs)
    if leaf.leaf is None:
        raise ValueError(f"local site '{site}' is not a sample site of the model")
    return trace, leaf.leaf, leaf.event_dim


def gaussian_from_quadratic(
    log_density: Callable[[Tensor], Tensor],
    z0: Tensor,
    event_dim: int,
    site: str = "z",
    validate: bool = False,
) -> dist.MultivariateNormal:
    """
    The Gaussian ``N(m, P^{-1})`` whose log density equals ``log_density`` up to a constant,
    for ``log_density`` quadratic in ``z`` with independent blocks over ``z``'s batch dims.

    ``z`` has shape ``batch_shape + event_shape``; with ``k = event_shape.numel()`` the
    precision blocks ``P`` (``batch_shape + (k, k)``) come from ``k`` Hessian-vector products
    (the batch elements are independent, so one product yields one column of every block) and
    ``m = z0 + P^{-1} grad(z0)``.  With ``validate=True`` two more autograd passes check that
    the density really is quadratic (zero gradient at ``m``) with no coupling between batch
    elements, raising a ``ValueError`` naming ``site`` otherwise.
    """
    with torch.enable_grad():
        z = z0.detach().clone().requires_grad_(True)
        logp = log_density(z)
    return _gaussian_from_graph(logp, z, event_dim, site, log_density if validate else None)


def _gaussian_from_graph(logp: Tensor, z: Tensor, event_dim: int, site: str, log_density=None):
    """As :func:`gaussian_from_quadratic`, from ``logp`` already computed at the leaf ``z``;
    validates when ``log_density`` is given."""
    z0 = z
    with torch.enable_grad():
        batch_shape = z0.shape[: z0.dim() - event_dim]
        k = math.prod(z0.shape[z0.dim() - event_dim :])
        (grad,) = torch.autograd.grad(logp, z, create_graph=True)
        if not grad.requires_grad:
            raise ValueError(f"the log joint does not depend quadratically on local site '{site}'")
        grad_flat = grad.reshape(batch_shape + (k,))
        columns = []
        for j in range(k):
            v = torch.zeros_like(grad_flat)
            v[..., j] = 1.0
            (hv,) = torch.autograd.grad(grad_flat, z, grad_outputs=v, retain_graph=True)
            columns.append(-hv.reshape(batch_shape + (k,)))
        precision = torch.stack(columns, -1).detach()
        precision = 0.5 * (precision + precision.transpose(-1, -2))
        try:
            chol = torch.linalg.cholesky(precision)
        except RuntimeError as e:
            raise ValueError(
                f"the conditional of local site '{site}' is not a proper Gaussian: its precision "
                "(minus the Hessian of the log joint) is not positive definite"
            ) from e
        mean = z0.detach().reshape(batch_shape + (k,)) + torch.cholesky_solve(
            grad_flat.detach().unsqueeze(-1), chol
        ).squeeze(-1)
        if log_density is not None:
            probe = torch.randn_like(grad_flat)
            (hv,) = torch.autograd.grad(grad_flat, z, grad_outputs=probe)
            block_hv = -(precision @ probe.unsqueeze(-1)).squeeze(-1)
            scale = block_hv.abs().max().clamp(min=1e-12)
            if (hv.reshape(block_hv.shape) - block_hv).abs().max() > 1e-5 * scale:
                raise ValueError(
                    f"local site '{site}' is coupled across its batch (plate) dimensions; the "
                    "elements of a local site must be conditionally independent given theta"
                )
            z_m = mean.reshape(z0.shape).clone().requires_grad_(True)
            (grad_m,) = torch.autograd.grad(log_density(z_m), z_m)
            tol = 1e-4 * (1.0 + grad.detach().abs().max())
            if grad_m.abs().max() > tol:
                raise ValueError(
                    f"the log joint is not quadratic in local site '{site}' (its gradient at the "
                    "Gaussian mode is not zero), so its conditional is not Gaussian; pass a "
                    "sampler for it, e.g. PolyaGammaGibbs for Bernoulli/Binomial likelihoods"
                )
    return dist.MultivariateNormal(mean, precision_matrix=precision)


class GaussianConditional:
    r"""
    Exact conditional of a local latent site whose log joint is quadratic given the globals,
    e.g. Gaussian random effects in a linear mixed model
    (:math:`\alpha_i \mid \theta, y \sim N(\cdot, \cdot)` in closed form).

    The conditional is read off the model by automatic differentiation: one gradient and
    ``k`` Hessian-vector products of ``log p(y, z, theta)`` in ``z`` (``k`` the size of one
    group's random effect), then ``z = m + L^{-T} eps``.  The batch (plate) elements of the
    site must be conditionally independent given ``theta`` (one block per group).

    :param str site: name of the local sample site.
    :param bool validate: check on the first call that the log joint is quadratic and
        block-independent (two extra autograd passes), raising ``ValueError`` otherwise.
    """

    def __init__(self, site: str, validate: bool = True):
        if not isinstance(site, str):
            raise TypeError(f"site must be a site name (str), got {type(site).__name__}")
        self.site = site
        self.sites = (site,)
        self.validate = validate
        self._validated = False
        self._cache = None

    def distribution(self, model, theta: dict, *args, **kwargs) -> dist.MultivariateNormal:
        """``p(z | theta, y)`` as a batch of MultivariateNormals over the flattened event."""
        return self._distribution(model, theta, *args, **kwargs)[0]

    def _distribution(self, model, theta, *args, **kwargs):
        if self._cache is not None and self._cache[0] is theta:
            return self._cache[1:]
        trace, leaf, event_dim = _trace_at(model, theta, self.site, None, *args, **kwargs)
        with torch.enable_grad():
            logp = trace.log_prob_sum()

        def log_joint(z: Tensor) -> Tensor:
            return _trace_at(model, theta, self.site, z, *args, **kwargs)[0].log_prob_sum()

        validate = self.validate and not self._validated
        d = _gaussian_from_graph(logp, leaf, event_dim, self.site, log_joint if validate else None)
        self._validated = True
        self._cache = (theta, d, leaf.shape)
        return d, leaf.shape

    def __call__(self, model, theta: dict, *args, **kwargs) -> dict:
        d, shape = self._distribution(model, theta, *args, **kwargs)
        return {self.site: d.sample().reshape(shape)}

    def log_prob(self, model, theta: dict, z: dict, *args, **kwargs) -> Tensor:
        """``log p(z | theta, y)``; reuses the conditional of the last call with the same ``theta`` dict."""
        d = self._distribution(model, theta, *args, **kwargs)[0]
        return d.log_prob(z[self.site].reshape(d.batch_shape + d.event_shape)).sum()


def _is_binomial(fn) -> bool:
    """Whether ``fn`` is a Bernoulli/Binomial, possibly wrapped by ``.to_event``, ``.mask`` or ``.expand``."""
    return isinstance(unwrap(fn)[0], (torch.distributions.Bernoulli, torch.distributions.Binomial))


def _pad_mask(mask: Tensor, event_dim: int) -> Tensor:
    """``mask`` (over a distribution's batch shape) broadcastable against its values."""
    return mask.reshape(mask.shape + (1,) * event_dim)


def _augmented_term(fn, value: Tensor, name: str, sampler: str) -> Tensor:
    """``kappa eta - omega eta^2 / 2`` of a Bernoulli/Binomial ``fn`` (wrapped as in :func:`_is_binomial`)
    at ``value``, with ``omega ~ PG(N, eta)`` drawn here; the shape, masking and event sums are those
    of ``fn.log_prob(value)``. Masked-out values are replaced by 0 before use (they may be NaN);
    unmasked values outside ``{0, ..., N}`` raise a ``ValueError`` naming the site."""
    if isinstance(fn, torch.distributions.Independent):
        term = _augmented_term(fn.base_dist, value, name, sampler)
        return term.sum(tuple(range(-fn.reinterpreted_batch_ndims, 0)))
    if isinstance(fn, dist.MaskedDistribution):
        mask = fn._mask
        value = torch.where(_pad_mask(mask, fn.event_dim), value, torch.zeros_like(value))
        term = _augmented_term(fn.base_dist, value, name, sampler)
        return torch.where(mask, term, torch.zeros_like(term))
    if isinstance(fn, dist.ExpandedDistribution):
        term = _augmented_term(fn.base_dist, value, name, sampler)
        return torch.broadcast_to(term, torch.broadcast_shapes(term.shape, fn.batch_shape))
    logits = fn.logits
    total_count = fn.total_count if isinstance(fn, torch.distributions.Binomial) else torch.ones_like(logits)
    logits, value, total_count = torch.broadcast_tensors(logits, value.to(logits.dtype), total_count.to(logits.dtype))
    bad = ~((value >= 0) & (value <= total_count) & (value == value.round()))  # NaN is bad too
    if bad.any():
        raise ValueError(
            f"{sampler}: observed site {name!r} has {int(bad.sum())} value(s) outside the support "
            f"{{0, ..., total_count}} of its {type(fn).__name__} where unmasked (e.g. {value[bad][0].item()}); "
            "remove them or mask them with poutine.mask / .mask(...)"
        )
    rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
    omega = _random_polyagamma(total_count.detach().double().cpu().numpy(), logits.detach().double().cpu().numpy(), rng)
    omega = torch.as_tensor(omega, dtype=logits.dtype, device=logits.device)
    return (value - total_count / 2) * logits - 0.5 * omega * logits.pow(2)


class PolyaGammaGibbs:
    r"""
    Gibbs sweeps for a Gaussian local latent ``z`` whose likelihood is Bernoulli/Binomial with
    logits ``eta`` affine in ``z`` (e.g. logistic random intercepts), by Polya-Gamma
    augmentation (Polson, Scott, Windle 2013)::

        omega_n | z     ~ PG(N_n, eta_n(z))                   (``polyagamma`` package)
        z | omega, theta ~ N  with  log density  log p(z | theta) + sum_n kappa_n eta_n - omega_n eta_n^2 / 2,
                          kappa_n = y_n - N_n / 2

    The Gaussian step is read off by automatic differentiation as in
    :class:`GaussianConditional`.  Each call runs ``num_sweeps`` sweeps starting from the
    previous call's draw (``warm_start``), as the paper does inside its optimisation loop; the
    draw is then exact only in the limit of many sweeps, so this sampler has no ``log_prob``.

    :param str site: the local sample site.
    :param int num_sweeps: Gibbs sweeps per call.
    :param bool warm_start: start each call from the previous draw (when shapes agree).
    """

    def __init__(self, site: str, num_sweeps: int = 1, warm_start: bool = True):
        if not isinstance(site, str):
            raise TypeError(f"site must be a site name (str), got {type(site).__name__}")
        if not (isinstance(num_sweeps, int) and num_sweeps >= 1):
            raise ValueError(f"num_sweeps must be a positive int, got {num_sweeps}")
        self.site = site
        self.sites = (site,)
        self.num_sweeps = num_sweeps
        self.warm_start = warm_start
        self._state: Tensor | None = None

    def _augmented_log_density(self, trace) -> Tensor:
        """``sum kappa eta - omega eta^2 / 2`` over Bernoulli/Binomial sites (omega drawn at the
        trace's current z) plus the log density of every other site, differentiable in z."""
        binomial = lambda name, site: site["is_observed"] and _is_binomial(site["fn"])  # noqa: E731
        trace.compute_log_prob(site_filter=lambda name, site: not binomial(name, site))
        total, found = 0.0, False
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            if not binomial(name, node):
                total = total + node["log_prob_sum"]
                continue
            found = True
            mask, value = node["mask"], node["value"]
            if mask is False:
                continue
            if isinstance(mask, Tensor):
                value = torch.where(_pad_mask(mask, node["fn"].event_dim), value, torch.zeros_like(value))
            term = _augmented_term(node["fn"], value, name, f"PolyaGammaGibbs({self.site!r})")
            if isinstance(mask, Tensor):
                term = torch.where(mask, term, torch.zeros_like(term))
            total = total + (term * node["scale"]).sum()
        if not found:
            raise ValueError(
                f"PolyaGammaGibbs('{self.site}'): the model has no observed Bernoulli or Binomial "
                "site; use GaussianConditional for Gaussian likelihoods"
            )
        return total

    def __call__(self, model, theta: dict, *args, **kwargs) -> dict:
        z = self._state if self.warm_start else None
        for _ in range(self.num_sweeps):
            trace, leaf, event_dim = _trace_at(model, theta, self.site, z, *args, **kwargs)
            with torch.enable_grad():
                logp = self._augmented_log_density(trace)
            z = _gaussian_from_graph(logp, leaf, event_dim, self.site).sample().reshape(leaf.shape)
        self._state = z.detach()
        return {self.site: z}


def _random_polyagamma(h: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``PG(h, z)`` draws via the ``polyagamma`` package (imported lazily)."""
    from polyagamma import random_polyagamma

    h = np.broadcast_to(h, z.shape)
    return random_polyagamma(h, z, random_state=rng)
