"""
The NG-HVI optimiser: damped natural gradient, momentum, norm clipping and ADADELTA on the
parameters of :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor
from torch.distributions import transform_to

import pyro
from pyro.distributions import constraints
from pyro.optim import PyroOptim
from pyro.optim.optim import _load_state_dict

from .natural_gradient import natural_gradient

_ROLES = ("loc", "cov_factor", "scale")


class NaturalGradientAdadelta(torch.optim.Optimizer):
    r"""
    One NG-HVI step (Zhang et al. 2023, arXiv:2302.13536, Algorithm 1) for the three
    parameters of a factor-covariance Gaussian ``N(loc, diag(s)(W W^T + I) diag(s))``,
    ``s = T(u)``, given the gradients of the loss (negative ELBO):

    1. natural gradient  :math:`\tilde g = (F + \delta\,\mathrm{diag}\,F)^{-1} g`, exact
       Gaussian Fisher ``F`` (see :func:`~pyro_cavi.nghvi.natural_gradient.natural_gradient`);
    2. norm clipping: :math:`\tilde g \leftarrow \tilde g \min(1, c / \|\tilde g\|)`;
    3. momentum: :math:`\bar g_t = m\,\bar g_{t-1} + (1 - m)\,\tilde g`;
    4. ADADELTA (Zeiler 2012): :math:`E[g^2]_t = \rho E[g^2]_{t-1} + (1-\rho)\bar g_t^2`,
       :math:`\Delta_t = \sqrt{E[\Delta^2]_{t-1} + \epsilon} / \sqrt{E[g^2]_t + \epsilon}\;\bar g_t`,
       :math:`E[\Delta^2]_t = \rho E[\Delta^2]_{t-1} + (1-\rho)\Delta_t^2`, parameter ``-= Delta_t``.

    With ``natural_gradient=False`` step 1 is the identity (SG-HVI).

    :param params: exactly ``[loc, cov_factor, scale_unconstrained]``.
    :param scale_transform: the transform ``T`` with ``scale = T(u)`` (e.g.
        ``transform_to(constraints.softplus_positive)``).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        scale_transform: torch.distributions.Transform,
        damping: float = 10.0,
        momentum: float = 0.6,
        rho: float = 0.95,
        eps: float = 1e-6,
        clip_norm: float | None = 50.0,
        natural_gradient: bool = True,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 100,
    ):
        params = list(params)
        if len(params) != 3:
            raise ValueError(f"expected [loc, cov_factor, scale], got {len(params)} tensors")
        loc, cov_factor, scale = params
        if loc.dim() != 1 or cov_factor.dim() != 2 or scale.shape != loc.shape:
            raise ValueError(
                "expected loc (M,), cov_factor (M, p), scale (M,), got "
                f"{tuple(loc.shape)}, {tuple(cov_factor.shape)}, {tuple(scale.shape)}"
            )
        if cov_factor.shape[0] != loc.shape[0]:
            raise ValueError(f"cov_factor has {cov_factor.shape[0]} rows but loc has {loc.shape[0]}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0 < rho < 1:
            raise ValueError(f"rho must be in (0, 1), got {rho}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        defaults = dict(
            damping=damping,
            momentum=momentum,
            rho=rho,
            eps=eps,
            clip_norm=clip_norm,
            natural_gradient=natural_gradient,
            cg_tol=cg_tol,
            cg_max_iter=cg_max_iter,
        )
        super().__init__([{"params": params}], defaults)
        self.scale_transform = scale_transform
        self.last_cg_iterations = 0

    def _direction(self, group: dict) -> list[Tensor]:
        loc, cov_factor, u = group["params"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]
        if not group["natural_gradient"]:
            return [g.detach() for g in grads]
        with torch.no_grad():
            scale = self.scale_transform(u)
            dscale_du = self.scale_transform.log_abs_det_jacobian(u, scale).exp()
            ng = natural_gradient(
                grads[0],
                cov_factor,
                grads[1],
                scale,
                grads[2],
                dscale_du,
                damping=group["damping"],
                cg_tol=group["cg_tol"],
                cg_max_iter=group["cg_max_iter"],
            )
        self.last_cg_iterations = ng.cg_iterations
        return [ng.loc, ng.cov_factor, ng.scale_unconstrained]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            direction = self._direction(group)
            if group["clip_norm"] is not None:
                norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction))))
                if norm > group["clip_norm"]:
                    direction = torch._foreach_mul(direction, group["clip_norm"] / norm)
            rho, eps, m = group["rho"], group["eps"], group["momentum"]
            if not self.state[params[0]]:
                for p in params:
                    self.state[p].update(
                        momentum_buffer=torch.zeros_like(p), square_avg=torch.zeros_like(p), acc_delta=torch.zeros_like(p)
                    )
            states = [self.state[p] for p in params]
            square_avg = [st["square_avg"] for st in states]
            acc_delta = [st["acc_delta"] for st in states]
            # multi-tensor (foreach) updates: one dispatch per operation for all three parameters
            if m:
                buf = [st["momentum_buffer"] for st in states]
                torch._foreach_mul_(buf, m)
                torch._foreach_add_(buf, direction, alpha=1 - m)
            else:
                buf = direction
            torch._foreach_mul_(square_avg, rho)
            torch._foreach_addcmul_(square_avg, buf, buf, value=1 - rho)
            std = torch._foreach_add(square_avg, eps)
            torch._foreach_sqrt_(std)
            delta = torch._foreach_add(acc_delta, eps)
            torch._foreach_sqrt_(delta)
            torch._foreach_div_(delta, std)
            torch._foreach_mul_(delta, buf)
            torch._foreach_mul_(acc_delta, rho)
            torch._foreach_addcmul_(acc_delta, delta, delta, value=1 - rho)
            torch._foreach_sub_(params, delta)
        return loss


class NGHVIOptim(PyroOptim):
    """
    :class:`~pyro.optim.PyroOptim` for :class:`~pyro.infer.SVI` that runs
    :class:`NaturalGradientAdadelta` jointly on the ``loc``, ``cov_factor`` and ``scale`` of
    every :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` (any three parameters
    named ``<prefix>.loc``, ``<prefix>.cov_factor``, ``<prefix>.scale``), and plain ADADELTA
    (``lr=1``) on any other parameter.  Defaults are the paper's: damping 10, momentum 0.6,
    ADADELTA ``rho=0.95``, ``eps=1e-6``, clipping the natural gradient's norm at 50.

    Usage::

        svi = SVI(model, guide, NGHVIOptim(), loss=HybridELBO(GaussianConditional("alpha")))

    See :func:`SGHVIOptim` for the ordinary-gradient baseline.
    """

    def __init__(
        self,
        damping: float = 10.0,
        momentum: float = 0.6,
        rho: float = 0.95,
        eps: float = 1e-6,
        clip_norm: float | None = 50.0,
        natural_gradient: bool = True,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 100,
    ):
        optim_args = dict(
            damping=damping,
            momentum=momentum,
            rho=rho,
            eps=eps,
            clip_norm=clip_norm,
            natural_gradient=natural_gradient,
            cg_tol=cg_tol,
            cg_max_iter=cg_max_iter,
        )
        super().__init__(NaturalGradientAdadelta, optim_args)
        self._grouped: dict[Tensor, Tensor] = {}  # member param -> key param (the loc)

    def _make(self, key: Tensor, factory):
        optimizer = self.optim_objs[key] = factory()
        self.grad_clip[key] = None
        state = self._state_waiting_to_be_consumed.pop(pyro.get_param_store().param_name(key), None)
        if state is not None:
            _load_state_dict(optimizer, state)

    def __call__(self, params, *args, **kwargs) -> None:
        store = pyro.get_param_store()
        params = list(params)
        by_name = {store.param_name(p): p for p in params}
        for name, p in by_name.items():
            if p in self._grouped or p in self.optim_objs:
                continue
            prefix, _, role = (name or "").rpartition(".")
            members = {r: by_name.get(f"{prefix}.{r}") for r in _ROLES}
            if role in _ROLES and all(m is not None for m in members.values()):
                loc = members["loc"]
                constraint = store._constraints.get(f"{prefix}.scale", constraints.real)
                transform = transform_to(constraint)
                self._make(
                    loc,
                    lambda: NaturalGradientAdadelta(
                        [members[r] for r in _ROLES], transform, **self.pt_optim_args
                    ),
                )
                for m in members.values():
                    self._grouped[m] = loc
            else:
                args_ = self.pt_optim_args
                if args_["natural_gradient"]:
                    warnings.warn(
                        f"NGHVIOptim: parameter '{name}' is not the loc, cov_factor or scale of an "
                        "AutoLowRankMultivariateNormal guide; it gets ADADELTA on its ordinary gradient",
                        stacklevel=2,
                    )
                self._make(
                    p, lambda: torch.optim.Adadelta([p], lr=1.0, rho=args_["rho"], eps=args_["eps"])
                )
        stepped = set()
        for p in params:
            key = self._grouped.get(p, p)
            if key not in stepped:
                stepped.add(key)
                self.optim_objs[key].step(*args, **kwargs)


def SGHVIOptim(rho: float = 0.95, eps: float = 1e-6) -> NGHVIOptim:
    """
    The SG-HVI baseline of Zhang et al. (2023): ADADELTA on the ordinary gradient of the same
    hybrid objective, no natural gradient, momentum or clipping (as in the authors' code).
    """
    return NGHVIOptim(natural_gradient=False, momentum=0.0, clip_norm=None, rho=rho, eps=eps)
