"""
The NG-HVI optimiser: damped natural gradient, momentum, norm clipping and ADADELTA on the
parameters of :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.distributions import transform_to

import pyro
from pyro.distributions import constraints
from pyro.optim import PyroOptim
from pyro.optim.optim import _load_state_dict

from .natural_gradient import from_numpy, natural_gradient, paper_natural_gradient, runs_in_numpy, to_numpy

_ROLES = ("loc", "cov_factor", "scale")


def _clipped_momentum_adadelta(xp, values, direction, buffers, group) -> tuple[list, float]:
    """The paper's step after the (natural) gradient, in its order: clip the whole direction's
    norm at ``clip_norm``, momentum ``m`` (``buf = m buf + (1 - m) g``), then ADADELTA
    (``rho``, ``eps``): ``delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * buf``.
    ``xp`` is ``numpy`` or ``torch``; ``buffers`` holds, per value, the arrays
    ``momentum_buffer``, ``square_avg`` and ``acc_delta``, updated in place. Returns the new
    values (``value - delta``) and the direction's norm before clipping."""
    norm = float(sum(float((g * g).sum()) for g in direction)) ** 0.5
    if group["clip_norm"] is not None:
        if norm > group["clip_norm"]:
            direction = [g * (group["clip_norm"] / norm) for g in direction]
    rho, eps, m = group["rho"], group["eps"], group["momentum"]
    new = []
    for x, st, g in zip(values, buffers, direction):
        if m:
            buf = st["momentum_buffer"]
            buf *= m
            buf += (1.0 - m) * g
        else:
            buf = g
        square_avg, acc_delta = st["square_avg"], st["acc_delta"]
        square_avg *= rho
        square_avg += (1.0 - rho) * buf * buf
        delta = xp.sqrt(acc_delta + eps) / xp.sqrt(square_avg + eps) * buf
        acc_delta *= rho
        acc_delta += (1.0 - rho) * delta * delta
        new.append(x - delta)
    return new, norm


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

    Coordinates.  ADADELTA and momentum act coordinate by coordinate and the damping
    ``delta diag F`` depends on the coordinates, so the coordinates in which these steps run
    change the algorithm.  With ``coordinates="paper"`` (the default) they run, as in the
    authors' code (``Hessian_ong_deepglmm.m``, ``adadelta_norestrict.m``), on the paper's
    ``(mu, B, d)`` with ``Sigma = B B^T + diag(d)^2`` and ``B`` lower triangular (entries above
    the diagonal are not parameters: they get no gradient and keep their values, zero from
    :class:`~pyro_cavi.nghvi.HybridGuide`'s start); ``d`` is updated additively and may change
    sign (``Sigma`` depends on ``d^2``; the sign is kept in the optimiser state).  The guide's
    stored parameters are recovered after each step: ``loc = mu``, ``scale = T(u) = |d|``,
    ``cov_factor = B / |d|``; the gradients are pulled into ``(mu, B, d)`` by the chain rule.
    Only when writing the scale back, ``|d_i|`` is kept at least ``eps^(1/3) ||B_i||`` of the
    parameters' dtype (``5e-3 ||B_i||`` in float32): torch's ``LowRankMultivariateNormal``
    factors ``I + W^T W``, which loses positive definiteness in float32 as ``d_i`` crosses zero.
    With ``coordinates="guide"`` every step acts directly on the stored ``(loc, cov_factor, u)``
    (all of ``cov_factor`` free) with the exact Fisher in those coordinates.

    Number of factors.  With :class:`~pyro_cavi.nghvi.HybridELBO`'s default (reparameterisation)
    gradient, the paper's coordinates are unstable beyond ``p = 3`` on the 8-parameter linear
    random-intercept model (``benchmarks/nghvi_rank.py``): with ``p = 4, 5, 8`` the smoothed ELBO
    falls 1,500-4,900 nats below its plateau again and again.  Traced step by step
    (``benchmarks/results/nghvi.md``): the map ``(B lower triangular, d) -> Sigma`` has near-null
    (``p = 4``) and null (``p >= 5``) directions; the exact gradient has no component along them,
    the single-draw reparameterisation gradient does (pure noise), so the parameters drift along
    them into regions where the ``(B, d)`` Fisher is nearly singular.  One such region is
    ``d_i -> 0``: ``Sigma`` depends on ``d_i^2``, so ``F_(d_i, d_i) = 2 d_i^2 P_ii^2`` vanishes
    (and so does ``d_i``'s damping ``delta F_(d_i, d_i)``) while the estimate of the gradient in
    ``d_i`` stays of order one; at ``p = 4`` the first excursion starts with one ``|d_i|`` near
    zero, a large natural gradient almost all in ``d_i``, clipping, and ADADELTA's rate for
    ``d_i`` collapsing.  With ``HybridELBO(..., covariance_gradient="stein")``, whose
    estimate has no component along those directions and vanishes with ``d_i``, NG-HVI in the
    paper's coordinates converges for every ``p`` tried (3, 4, 5, 8); ``coordinates="guide"``
    (``d = softplus(u) > 0``) converges too.  Neither is the default: the authors' algorithm is
    the reparameterisation gradient in the paper's coordinates, which is stable at their
    ``p = 3`` (and the Stein gradient changes the iterations to the plateau at ``p = 3``, see the
    results file).  Bounding ``d_i``'s damping or ``|d_i|`` from below, a KL trust region on the
    step, or projecting out only the exact null directions did not make ``p >= 4`` stable.

    :param params: exactly ``[loc, cov_factor, scale_unconstrained]``.
    :param scale_transform: the transform ``T`` with ``scale = T(u)`` (e.g.
        ``transform_to(constraints.softplus_positive)``).
    :param coordinates: ``"paper"`` or ``"guide"``, see above.
    :param fisher: ``"exact"`` (default) or ``"authors"``: the authors' approximate ``(B, B)``
        Fisher block (``"paper"`` coordinates only; see
        :func:`~pyro_cavi.nghvi.natural_gradient.paper_natural_gradient`), for comparison.
    :param numpy_max_size: in ``"paper"`` coordinates, CPU problems with ``M (p + 1)`` up to this
        size run in NumPy float64 (state kept in float64 tensors), larger ones in torch.
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
        coordinates: str = "paper",
        numpy_max_size: int = 20000,
        fisher: str = "exact",
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
        if coordinates not in ("paper", "guide"):
            raise ValueError(f"coordinates must be 'paper' or 'guide', got {coordinates!r}")
        if fisher not in ("exact", "authors") or (fisher == "authors" and coordinates != "paper"):
            raise ValueError(f"fisher must be 'exact', or 'authors' with coordinates='paper', got {fisher!r}")
        defaults = dict(
            damping=damping,
            momentum=momentum,
            rho=rho,
            eps=eps,
            clip_norm=clip_norm,
            natural_gradient=natural_gradient,
            cg_tol=cg_tol,
            cg_max_iter=cg_max_iter,
            coordinates=coordinates,
            numpy_max_size=numpy_max_size,
            fisher=fisher,
        )
        super().__init__([{"params": params}], defaults)
        self.scale_transform = scale_transform
        self.last_cg_iterations = 0
        self.last_direction_norm = 0.0  # norm of the last step's (natural) gradient before clipping

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

    # ---- the paper's coordinates (mu, B lower triangular, d) --------------------------------
    _BUFFERS = ("momentum_buffer", "square_avg", "acc_delta")

    def _paper_buffers(self, group: dict, dtype: torch.dtype) -> list[dict]:
        params = group["params"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            for key in self._BUFFERS:
                if key not in st:
                    st[key] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                elif st[key].dtype != dtype:
                    st[key] = st[key].to(dtype)
        u_state = states[2]
        if "sign" not in u_state:
            u_state["sign"] = torch.ones(params[2].shape, dtype=dtype, device=params[2].device)
        elif u_state["sign"].dtype != dtype:
            u_state["sign"] = u_state["sign"].to(dtype)
        return states

    def _paper_step(self, group: dict) -> None:
        loc, W_param, u_param = group["params"]
        M, p = W_param.shape
        use_numpy = runs_in_numpy(W_param, group["numpy_max_size"])
        dtype = torch.float64 if use_numpy else W_param.dtype
        states = self._paper_buffers(group, dtype)
        transform = self.scale_transform
        s_t = transform(u_param)
        t_t = transform.log_abs_det_jacobian(u_param, s_t).exp()  # ds/du
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in group["params"]]
        if use_numpy:
            xp, arr, view = np, to_numpy, Tensor.numpy  # view: the float64 state buffers, updated in place
            free = np.tri(M, p, dtype=bool)
        else:
            xp, arr, view = torch, Tensor.detach, Tensor.detach
            free = torch.ones(M, p, dtype=torch.bool, device=W_param.device).tril()
        mu, W, s, t = arr(loc), arr(W_param), arr(s_t), arr(t_t)
        g_loc, g_W, g_u = (arr(g) for g in grads)
        sign = view(states[2]["sign"])
        # (loc, W, u) -> (mu, B, d): B = s W, d = sign * s, s = T(u); chain rule for the gradient
        d = sign * s
        B = s[:, None] * W
        g_B = xp.where(free, g_W / s[:, None], 0.0 * g_W)
        g_d = sign * (g_u / t - (g_W * W).sum(-1) / s)
        if group["natural_gradient"]:
            ng = paper_natural_gradient(
                g_loc,
                B,
                g_B,
                d,
                g_d,
                free,
                damping=group["damping"],
                cg_tol=group["cg_tol"],
                cg_max_iter=group["cg_max_iter"],
                fisher=group["fisher"],
            )
            direction = [ng.loc, ng.cov_factor, ng.cov_diag_sqrt]
            self.last_cg_iterations = ng.cg_iterations
        else:
            direction = [g_loc, g_B, g_d]
        buffers = [{key: view(st[key]) for key in self._BUFFERS} for st in states]
        (mu, B, d), self.last_direction_norm = _clipped_momentum_adadelta(xp, (mu, B, d), direction, buffers, group)
        sign[...] = xp.where(d < 0, -1.0, 1.0)
        # The guide stores W = B / |d| in its own dtype, and torch's LowRankMultivariateNormal
        # factors I + W^T W: as d_i crosses zero (the authors' additive update lets it) that
        # matrix loses positive definiteness in float32.  Keep |d_i| >= eps^(1/3) ||B_i||
        # (5e-3 ||B_i|| in float32, 6e-6 in float64): a change of at most 2.4e-5 (float32)
        # of the row's variance, only while |d_i| is inside that band.
        floor = torch.finfo(u_param.dtype).eps ** (1.0 / 3.0) * xp.sqrt((B * B).sum(-1))
        s = xp.maximum(xp.abs(d), floor)
        if not bool((s > 0).all()):
            raise ValueError("NG-HVI: a row of Sigma = B B^T + D^2 became zero (d_i = 0 and B_i = 0)")
        W = B / s[:, None]
        if use_numpy:
            mu, W, s = from_numpy(mu, loc), from_numpy(W, W_param), from_numpy(s, u_param)
        loc.copy_(mu)
        W_param.copy_(W)
        u_param.copy_(transform.inv(s.to(u_param.dtype)))

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
            if group["coordinates"] == "paper":
                self._paper_step(group)
                continue
            direction = self._direction(group)
            if not self.state[params[0]]:
                for p in params:
                    self.state[p].update({key: torch.zeros_like(p) for key in self._BUFFERS})
            buffers = [self.state[p] for p in params]
            new, self.last_direction_norm = _clipped_momentum_adadelta(torch, params, direction, buffers, group)
            for p, x in zip(params, new):
                p.copy_(x)
        return loss


class NGHVIOptim(PyroOptim):
    """
    :class:`~pyro.optim.PyroOptim` for :class:`~pyro.infer.SVI` that runs
    :class:`NaturalGradientAdadelta` jointly on the ``loc``, ``cov_factor`` and ``scale`` of
    every :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` (any three parameters
    named ``<prefix>.loc``, ``<prefix>.cov_factor``, ``<prefix>.scale``), and plain ADADELTA
    (``lr=1``) on any other parameter.  Defaults are the paper's: damping 10, momentum 0.6,
    ADADELTA ``rho=0.95``, ``eps=1e-6``, clipping the natural gradient's norm at 50, all in the
    paper's coordinates ``(mu, B lower triangular, d)`` (``coordinates="paper"``, see
    :class:`NaturalGradientAdadelta`).  With more than the paper's ``p = 3`` factors, pair it with
    ``HybridELBO(..., covariance_gradient="stein")`` (or use ``coordinates="guide"``): with the
    default reparameterisation gradient the paper's coordinates are unstable from ``p = 4`` on
    (measured with ``dim theta = 8``; :class:`NaturalGradientAdadelta` says why).

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
        coordinates: str = "paper",
        fisher: str = "exact",
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
            coordinates=coordinates,
            fisher=fisher,
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


def SGHVIOptim(rho: float = 0.95, eps: float = 1e-6, coordinates: str = "paper") -> NGHVIOptim:
    """
    The SG-HVI baseline of Zhang et al. (2023): ADADELTA on the ordinary gradient of the same
    hybrid objective, no natural gradient, momentum or clipping, in the same coordinates as
    NG-HVI (by default the paper's ``(mu, B lower triangular, d)``), as in the authors' code
    (``hybrid_lmm_train.m`` with ``SGA = 1``, ``adadelta_norestrict.m``).
    """
    return NGHVIOptim(natural_gradient=False, momentum=0.0, clip_norm=None, rho=rho, eps=eps, coordinates=coordinates)
