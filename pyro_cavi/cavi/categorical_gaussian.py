r"""Joint discrete-Gaussian factors: ``CAVI(model, joint=[("z", "x")])`` for a discrete site ``z``
and a Gaussian site ``x`` whose prior is indexed by ``z`` (one ``z`` per block of ``x``).

Mean-field CAVI treats :math:`q(z)\,q(x)` as independent. The structured factor keeps one
Gaussian per category, as in the CAVI-CMN of Heins et al. (2024, arXiv 2408.16429, the
hidden layer :math:`q(z_n)\,q(x_n \mid z_n)`):

.. math::
    q(z = k, x) = r_k\, \mathcal{N}(x \mid m_k, S_k), \qquad k = 1..K,

an exponential family with sufficient statistics :math:`([z{=}k],\ [z{=}k]\,x,\ [z{=}k]\,x x^\top)`
and mean parameters :math:`\mu_{0k} = r_k`, :math:`\mu_{1k} = r_k m_k`,
:math:`\mu_{2k} = r_k (S_k + m_k m_k^\top)`. The model's terms are evaluated with ``x``
enumerated along ``z``'s dimension (``x``'s stand-in carries one copy per category, so every
term that involves ``x`` is weighted by :math:`r_k`): the expected log joint is
:math:`\sum_k r_k f_k(E[x \mid k], E[x x^\top \mid k]) + \dots` with :math:`f_k` affine in the
conditional moments, i.e. linear in :math:`(\mu_0, \mu_1, \mu_2)`. Terms that involve ``x`` but
not ``z`` (an output layer on ``x``) are evaluated once, with ``x``'s mixture moments
:math:`E[x] = \sum_k \mu_{1k}`, :math:`E[x x^\top] = \sum_k \mu_{2k}` (equal to the sum over
``k``, since they are linear in ``x``'s moments, at a K-th of the cost): the model is traced
twice (:meth:`CAVI._trace`), once with ``x`` enumerated along ``z`` (site key ``"x|z"``, see
:func:`conditional_key`) and once with ``x`` as an ordinary Gaussian site, and each term is
taken from the second trace unless it depends on ``z`` there.

Natural parameters. Since :math:`r_k f_k(m_k, M_k) = a_k \mu_{0k} + b_k^\top\mu_{1k} + C_k : \mu_{2k}`
with :math:`f_k = a_k + b_k^\top m + C_k : M`, the gradient with respect to :math:`(\mu_0, \mu_1, \mu_2)`
is :math:`(a_k, b_k, C_k)`, which is read off in one backward pass by evaluating the expected
log joint with the weights :math:`r_k` set to one and the conditional moments set to zero
(:meth:`CAVI._grads`): then :math:`\partial/\partial r_k = f_k(0, 0) = a_k` and the gradients
with respect to the conditional moments are :math:`b_k, C_k` (no division by :math:`r_k`, so
categories with vanishing responsibility keep exact natural parameters).

Update (:meth:`CategoricalGaussianFactor.update`): :math:`\Lambda_k = -(C_k + C_k^\top)`,
:math:`m_k = \Lambda_k^{-1} b_k`, :math:`S_k = \Lambda_k^{-1}` and
:math:`r_k \propto \exp(a_k + \log Z_k)` with the Gaussian log-partition
:math:`\log Z_k = \tfrac12 b_k^\top \Lambda_k^{-1} b_k - \tfrac12 \log\det\Lambda_k + \tfrac d2 \log 2\pi`.
Entropy :math:`H[r] + \sum_k r_k H[\mathcal{N}(m_k, S_k)]`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import pyro.distributions as dist

from .errors import NonConjugateError
from .factors import CategoricalFactor, ExpFamilyFactor, GaussianFactor
from .symbolic import Lin, Sym
from .tracing import LatentSite, check_one_per_block

Tensor = torch.Tensor


def _log_partition(b: Tensor, loc: Tensor, half_logdet: Tensor) -> Tensor:
    """:math:`\log \int \exp(b^\top x - \tfrac12 x^\top \Lambda x)\,dx` with ``loc`` =
    :math:`\Lambda^{-1} b` and ``half_logdet`` = :math:`\tfrac12 \log\det\Lambda`."""
    return 0.5 * (b * loc).sum(-1) - half_logdet + 0.5 * b.shape[-1] * math.log(2 * math.pi)


class CategoricalGaussianFactor(ExpFamilyFactor):
    r"""Structured factor :math:`q(z)\,q(x \mid z)` over ``num_blocks`` independent pairs, each a
    discrete ``z`` with ``num_categories`` values and a Gaussian block of ``block_size`` elements.

    State: ``probs`` (num_blocks, K), ``loc`` (num_blocks, K, d) and ``scale_tril``
    (num_blocks, K, d, d) of :math:`q(x \mid z = k)`. ``mean_params`` are
    :math:`(r_k, E[x \mid k], E[x x^\top \mid k])`, the quantities the model's terms are
    evaluated with; :meth:`update` takes the gradient with respect to the joint mean parameters
    :math:`(\mu_0, \mu_1, \mu_2)` (see the module docstring for how the engine obtains it).
    Every operation broadcasts over leading dimensions (restarts swept together).
    """

    family = "CategoricalGaussian"
    discrete = True  # contains a discrete site: not fitted while discrete sites are being seeded

    def __init__(self, site, num_blocks: int, num_categories: int, block_size: int, dtype, device):
        super().__init__(site, torch.Size([num_blocks, num_categories, block_size]), 1, dtype, device)
        self.num_blocks, self.num_categories, self.block_size = num_blocks, num_categories, block_size
        eye = torch.eye(block_size, dtype=dtype, device=device)
        self.set(torch.full((num_blocks, num_categories), 1.0 / num_categories, dtype=dtype, device=device),
                 torch.zeros(num_blocks, num_categories, block_size, dtype=dtype, device=device),
                 eye.expand(num_blocks, num_categories, -1, -1).clone())

    def set(self, probs: Tensor, loc: Tensor, scale_tril: Tensor) -> None:
        self.probs, self.loc, self.scale_tril = probs, loc, scale_tril
        cov = scale_tril @ scale_tril.mT
        self.mean_params = (probs, loc, cov + loc.unsqueeze(-1) * loc.unsqueeze(-2))

    def _solve(self, grads) -> Tuple[Tensor, Tensor, Tensor]:
        """``(log r unnormalised, loc, scale_tril)`` of the optimal factor for natural
        parameters ``grads = (a, b, C)``."""
        a, b, C = grads
        precision = -(C + C.mT)
        d = self.block_size
        if d == 1:
            lam = precision[..., 0, 0]
            if not bool((lam > 0).all()):
                self._not_positive_definite()
            loc = b / lam.unsqueeze(-1)
            tril = lam.rsqrt()[..., None, None]
            half_logdet = 0.5 * lam.log()
        else:
            chol, info = torch.linalg.cholesky_ex(precision)
            if bool((info != 0).any()):
                self._not_positive_definite()
            loc = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
            eye = torch.eye(d, dtype=b.dtype, device=b.device)
            cov = torch.cholesky_solve(eye.expand_as(chol), chol)
            tril = torch.linalg.cholesky(0.5 * (cov + cov.mT))
            half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return a + _log_partition(b, loc, half_logdet), loc, tril

    def log_weights(self, grads) -> Tensor:
        """Unnormalised :math:`\\log r_k` of the optimal factor: :math:`a_k + \\log Z_k`, the
        log marginal likelihood of category ``k`` with ``x`` integrated out (the score that
        seeds discrete sites)."""
        return self._solve(grads)[0]

    def update(self, grads) -> None:
        log_r, loc, tril = self._solve(grads)
        self.set(torch.softmax(log_r, -1), loc, tril)

    def natural(self):
        precision = torch.cholesky_inverse(self.scale_tril) if self.block_size > 1 else self.scale_tril ** -2
        b = (precision @ self.loc.unsqueeze(-1)).squeeze(-1)
        C = -0.5 * precision
        log_r = self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny).log()
        half_logdet = -self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return log_r - _log_partition(b, self.loc, half_logdet), b, C

    def _not_positive_definite(self):
        raise NonConjugateError(
            f"the update of the joint factor {self.site!r} gave a precision matrix of its Gaussian part "
            "that is not positive definite: the Gaussian site's prior is improper or the model is not "
            "conditionally conjugate in it"
        )

    def entropy(self) -> Tensor:
        p = self.probs
        h_r = -torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
        d = self.block_size
        h_x = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) + 0.5 * d * (1.0 + math.log(2 * math.pi))
        return (h_r + p * h_x).sum()

    def distribution(self):
        raise NotImplementedError("a discrete-Gaussian factor is read through its members' marginals")


class ProbsView:
    """The discrete member of a :class:`CategoricalGaussianFactor` presented as a
    :class:`~.factors.CategoricalFactor` is to the seeding code: ``probs`` with the site's
    shape, ``set(probs)`` keeps the Gaussian part."""

    def __init__(self, f: CategoricalGaussianFactor, z: LatentSite):
        self.f, self.shape = f, z.shape

    @property
    def probs(self) -> Tensor:
        return self.f.probs.reshape(self.shape + (self.f.num_categories,))

    def set(self, probs: Tensor) -> None:
        self.f.set(probs.reshape(self.f.probs.shape).to(self.f.probs.dtype), self.f.loc, self.f.scale_tril)


def conditional_key(z: str, x: str) -> str:
    """The name under which the enumerated ``x`` (one block per (block, category)) enters expressions."""
    return f"{x}|{z}"


def members(group: Tuple[str, ...], latents: Dict[str, LatentSite]) -> Optional[Tuple[str, str]]:
    """``(z, x)`` if the group is one discrete site and one other site, else None. Raises a
    ``ValueError`` naming the sites when the other site is not Gaussian or the shapes do not pair
    one ``z`` with each block of ``x``."""
    discrete = [n for n in group if latents[n].family == "Categorical"]
    if not discrete:
        return None
    if len(group) != 2 or len(discrete) != 1:
        raise ValueError(
            f"joint: the group {group} has discrete site(s) {discrete}; a joint group with a discrete site "
            "must be exactly one discrete site and one Gaussian site, e.g. joint=[('z', 'x')]"
        )
    z = discrete[0]
    x = next(n for n in group if n != z)
    sx, sz = latents[x], latents[z]
    if sx.family != "Gaussian":
        raise ValueError(
            f"joint: the discrete site {z!r} can only be paired with a Gaussian site; {x!r} has a "
            f"{sx.family} prior (a discrete-Gaussian factor q({z}) q({x} | {z}))"
        )
    check_one_per_block("discrete-Gaussian", group, sx, sz)
    return z, x


def make_factor(group: str, z: LatentSite, x: LatentSite, dtype, device) -> CategoricalGaussianFactor:
    event = x.event_shape
    return CategoricalGaussianFactor(group, z.shape.numel(), z.support.shape[0], event.numel(), dtype, device)


def views(z: LatentSite, x: LatentSite, dtype, device) -> Dict[str, ExpFamilyFactor]:
    """Factor objects describing the members' layout to the expectation code: the enumerated ``x``
    as a Gaussian site with one block per (block of ``x``, category), block ``b * K + k``, and ``x``
    itself (mixture moments) with its own blocks."""
    k = z.support.shape[0]
    event = x.event_shape
    key = conditional_key(z.name, x.name)
    return {
        z.name: CategoricalFactor(z.name, z.shape, 0, dtype, device, support=z.support,
                                  bernoulli=z.support.is_floating_point()),
        key: GaussianFactor(key, z.shape + (k,) + event, x.event_dim, dtype, device),
        x.name: GaussianFactor(x.name, x.shape, x.event_dim, dtype, device),
    }


def add_member_moments(mu: dict, group: str, z: LatentSite, x: LatentSite) -> None:
    """``z``'s responsibilities, ``x``'s conditional moments (one block per (block, category)) and
    its mixture moments, all differentiable functions of the factor's ``mean_params``."""
    r, m, M = mu[group]
    d = m.shape[-1]
    mu[z.name] = (r.reshape(z.shape + r.shape[-1:]),)
    mu[conditional_key(z.name, x.name)] = (m.reshape(-1, d), M.reshape(-1, d, d))
    mu[x.name] = ((r.unsqueeze(-1) * m).sum(-2), (r[..., None, None] * M).sum(-3))


def _enumerated_shape(z: LatentSite, x: LatentSite) -> Tuple[torch.Size, torch.Size]:
    """Shape of ``x``'s stand-in (one copy per category, in ``z``'s enumeration dimension) and of
    its block index (event dims of size one)."""
    k = z.support.shape[0]
    batch = z.shape
    event = x.event_shape
    pad = -z.enum_dim - 1 - len(batch)
    lead = (k,) + (1,) * pad + tuple(batch)
    return torch.Size(lead + tuple(event)), torch.Size(lead + (1,) * x.event_dim)


def stand_in(f: CategoricalGaussianFactor, z: LatentSite, x: LatentSite, dtype, device) -> Sym:
    """``x``'s symbolic stand-in: enumerated along ``z``'s dimension, element ``k`` of block ``b``
    being block ``b * K + k`` of the view from :func:`views`."""
    k = z.support.shape[0]
    shape, idx_shape = _enumerated_shape(z, x)
    event = x.event_shape
    d = event.numel()
    nb = z.shape.numel()
    idx = (torch.arange(nb, device=device).reshape(1, nb) * k + torch.arange(k, device=device).reshape(k, 1))
    idx = idx.reshape(idx_shape)
    coef = torch.eye(d, dtype=dtype, device=device).reshape(event + (d,))
    expr = Lin(torch.zeros((), dtype=dtype, device=device), {conditional_key(z.name, x.name): (coef, idx)}, shape)
    value = f.loc.detach().reshape(nb, k, d).transpose(0, 1).reshape(shape).clone()
    return Sym(value, expr)


def mixture_stand_in(f: CategoricalGaussianFactor, x: LatentSite, dtype, device) -> Sym:
    """``x``'s stand-in as an ordinary Gaussian site (its expressions read the mixture moments)."""
    from .symbolic import identity_lin

    value = (f.probs.unsqueeze(-1) * f.loc).sum(-2).detach().reshape(x.shape).clone()
    return Sym(value, identity_lin(x.name, x.shape, x.event_dim, False, dtype, device))


def depends_on(term, z: LatentSite) -> bool:
    """Whether a traced term has ``z``'s enumeration dimension (in its parameters or value)."""
    value = term.value
    value_batch = value.shape[: value.dim() - term.fn.event_dim] if isinstance(value, torch.Tensor) else ()
    batch = torch.broadcast_shapes(term.fn.batch_shape, value_batch)
    return len(batch) >= -z.enum_dim and batch[z.enum_dim] > 1


def check_prior(terms, group: str, z: LatentSite, x: LatentSite) -> None:
    """``x``'s prior must depend on ``z`` (``x ~ Normal(f(z), g(z))``): otherwise the pairing is
    not what the user meant (the discrete site does not index the Gaussian's parameters)."""
    term = next(t for t in terms if t.name == x.name)
    batch = term.fn.batch_shape
    if len(batch) < -z.enum_dim or batch[z.enum_dim] == 1:
        raise ValueError(
            f"joint: in the discrete-Gaussian pair {group!r}, the prior of {x.name!r} does not depend on {z.name!r}; "
            f"the pair needs {x.name!r} ~ Normal(loc[{z.name}], scale[{z.name}]) (a discrete site indexing the "
            "Gaussian's parameters), or leave the pair out of joint="
        )


def _components(f: CategoricalGaussianFactor, z: LatentSite, x: LatentSite):
    k, d = f.num_categories, f.block_size
    probs = f.probs.reshape(z.shape + (k,))
    loc = f.loc.reshape(z.shape + (k, d))
    tril = f.scale_tril.reshape(z.shape + (k, d, d))
    return probs, loc, tril


def marginal(f: CategoricalGaussianFactor, site: LatentSite, z: LatentSite, x: LatentSite):
    """``z``: Categorical(r); ``x``: the mixture :math:`\\sum_k r_k \\mathcal{N}(m_k, S_k)`."""
    probs, loc, tril = _components(f, z, x)
    if site.name == z.name:
        return dist.Categorical(probs=probs)
    mix = dist.Categorical(probs=probs)
    if x.event_dim == 0:
        return dist.MixtureSameFamily(mix, dist.Normal(loc[..., 0], tril[..., 0, 0]))
    return dist.MixtureSameFamily(mix, dist.MultivariateNormal(loc, scale_tril=tril))


def _conditional(f, z, x, zv: Tensor):
    """Location and scale factor of :math:`q(x \\mid z = zv)`, broadcast over ``zv``'s leading dims."""
    probs, loc, tril = _components(f, z, x)
    loc = torch.take_along_dim(loc.expand(zv.shape + loc.shape[-2:]), zv[..., None, None], dim=-2).squeeze(-2)
    tril = torch.take_along_dim(tril.expand(zv.shape + tril.shape[-3:]), zv[..., None, None, None], dim=-3).squeeze(-3)
    return loc, tril


def draw(f: CategoricalGaussianFactor, z: LatentSite, x: LatentSite, sample) -> Dict[str, Tensor]:
    """A joint draw, ``z`` from its responsibilities, then ``x | z``, through ``sample(part,
    distribution, given)`` (``part`` is ``z``'s or ``x``'s name; ``given`` marks the draw
    conditional on ``z``'s, which already carries the leading sample dimensions): Pyro sites for
    a guide, plain draws for :meth:`CAVI.sample_posterior`."""
    probs, _, _ = _components(f, z, x)
    zv = sample(z.name, dist.Categorical(probs=probs).to_event(len(z.shape)), False)
    loc, tril = _conditional(f, z, x, zv)
    v = sample(x.name, dist.MultivariateNormal(loc, scale_tril=tril).to_event(len(z.shape)), True)
    lead = zv.shape[: zv.dim() - len(z.shape)]
    return {z.name: z.support[zv], x.name: v.reshape(lead + x.shape)}
