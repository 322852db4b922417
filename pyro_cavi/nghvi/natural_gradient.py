"""
Exact Fisher information of a factor-covariance Gaussian and its damped natural gradient.

The variational density is ``q(theta) = N(mu, Sigma)`` with ``Sigma = B B^T + D^2``,
``B`` an ``(M, p)`` factor loading matrix and ``D = diag(d)``.  Its Fisher information is
block diagonal in ``(mu, (B, d))``::

    F_mu      = Sigma^{-1}
    F_(B,d)   = 1/2 J^T (Sigma^{-1} kron Sigma^{-1}) J,     J = d vec(Sigma) / d (vec B, d)

The ``(Mp + M)^2`` Fisher block is never built: the ``(B, d)`` block is applied matrix-free,
with ``Sigma^{-1} = D^{-2} - U U^T`` (Woodbury, ``U`` is ``M x p``) for large ``M`` and the
explicit ``M x M`` precision for ``M <= 64``, where a few larger array operations cost less than
many tiny ones.  The damped natural gradient ``(F + delta diag F)^{-1} g`` is solved by Woodbury
(or a direct ``M x M`` solve) for ``mu`` (O(M p^2 + p^3)) and by Jacobi-preconditioned conjugate
gradients for ``(B, d)`` (O(M p^2) per iteration with Woodbury).

:func:`paper_natural_gradient` returns it in the paper's coordinates ``(mu, B, d)``, optionally
with only the lower triangle of ``B`` free, as the authors' code does and as
:class:`~pyro_cavi.nghvi.NaturalGradientAdadelta` uses it by default;
:func:`natural_gradient` maps to the parameters Pyro's
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` actually stores,
``loc``, ``cov_factor = W`` and the unconstrained value ``u`` of ``scale = s = T(u)``, where
``B = diag(s) W`` and ``d = s``, and returns the exact damped natural gradient in those
coordinates (the optimiser's ``coordinates="guide"``).

Cost.  The benchmark models have dim theta = 8 to 73, where a torch operation on such small
tensors costs a few microseconds of dispatch, more than its arithmetic; a natural gradient is
about a hundred of them (5 to 6 CG iterations).  Every function here is therefore written once
against the array operations torch and NumPy share, and the callers run it in NumPy (float64) for
CPU tensors with ``M (p + 1) <= numpy_max_size``, where an operation costs about a third as much,
and in torch otherwise (large ``M``, GPU).

Reference: Zhang, Smith, Maneesoonthorn, Loaiza-Maya (2023), "Natural Gradient Hybrid
Variational Inference with Application to Deep Mixed Models", arXiv:2302.13536, Section 3.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

Array = Union[Tensor, np.ndarray]


def _xp(x: Array):
    """The array namespace of ``x``: ``numpy`` or ``torch`` (the operations used here exist in both)."""
    return np if isinstance(x, np.ndarray) else torch


def runs_in_numpy(cov_factor: Tensor, numpy_max_size: int) -> bool:
    """Whether a problem with the ``M x p`` matrix ``cov_factor`` runs in NumPy float64: on the
    CPU with ``M (p + 1) <= numpy_max_size`` (see "Cost" above); otherwise in torch, in the
    tensors' own dtype and on their device."""
    M, p = cov_factor.shape
    return cov_factor.device.type == "cpu" and M * (p + 1) <= numpy_max_size


def to_numpy(x: Tensor) -> np.ndarray:
    """A float64 NumPy copy of the CPU tensor ``x`` (detached)."""
    return x.detach().numpy().astype(np.float64)


def from_numpy(x: np.ndarray, like: Tensor) -> Tensor:
    """The NumPy result ``x`` as a CPU tensor of ``like``'s dtype."""
    return torch.from_numpy(x).to(like.dtype)


class CGResult(NamedTuple):
    solution: Array
    num_iterations: int
    residual_norm: float


def conjugate_gradient(
    matvec: Callable[[Array], Array],
    rhs: Array,
    preconditioner: Array | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> CGResult:
    """
    Solve ``A x = rhs`` for symmetric positive definite ``A`` given only ``matvec(x) = A x``,
    with an optional diagonal (Jacobi) ``preconditioner`` holding ``diag(A)``.  Stops when
    ``||A x - rhs|| <= tol * ||rhs||``.  ``rhs`` is a vector (torch or NumPy).
    """
    xp = _xp(rhs)
    x = xp.zeros_like(rhs)
    r = rhs * 1.0
    rhs_norm = float(xp.vdot(rhs, rhs)) ** 0.5
    if rhs_norm == 0:
        return CGResult(x, 0, 0.0)
    stop = (tol * rhs_norm) ** 2
    inv_pre = 1.0 / preconditioner if preconditioner is not None else None
    z = r * inv_pre if inv_pre is not None else r
    direction = z * 1.0
    rz = float(xp.vdot(r, z))
    iteration, rr = 0, rhs_norm**2
    for iteration in range(1, max_iter + 1):
        a_direction = matvec(direction)  # may be overwritten by the next call: used only here
        step = rz / float(xp.vdot(direction, a_direction))
        x += step * direction
        r -= step * a_direction
        rr = float(xp.vdot(r, r))
        if rr <= stop:
            break
        z = r * inv_pre if inv_pre is not None else r
        rz_new = float(xp.vdot(r, z))
        direction *= rz_new / rz
        direction += z
        rz = rz_new
    return CGResult(x, iteration, rr**0.5 / rhs_norm)


class FactorGaussianFisher:
    """
    Fisher information of ``N(mu, B B^T + diag(d)^2)`` in the coordinates ``(mu, B, d)``.

    With ``P = Sigma^{-1}`` and a perturbation ``V = (V_B, v_d)``, ``dSigma = V_B B^T + B V_B^T
    + 2 diag(d * v_d)`` and ``W = P dSigma P``; the ``(B, d)`` Fisher-vector product is
    ``(W B, d * diag(W))``, evaluated with ``P = D^{-2} - U U^T`` in O(M p^2).

    For small ``M`` (``M <= dense_precision_max_dim``) the ``M x M`` precision ``P`` itself is
    formed once (O(M^2 p)) and every product uses it: fewer, larger array operations, which is
    what costs on tiny problems.  The ``(Mp + M)^2`` Fisher block is never formed.

    :param cov_factor: ``B``, shape ``(M, p)`` (a torch tensor or a NumPy array).
    :param cov_diag_sqrt: ``d``, shape ``(M,)``, nonzero.
    :param dense_precision_max_dim: largest ``M`` for which ``P`` is formed explicitly.
    """

    def __init__(self, cov_factor: Array, cov_diag_sqrt: Array, dense_precision_max_dim: int = 64):
        if cov_factor.ndim != 2 or tuple(cov_diag_sqrt.shape) != tuple(cov_factor.shape[:1]):
            raise ValueError(
                f"expected cov_factor of shape (M, p) and d of shape (M,), got "
                f"{tuple(cov_factor.shape)} and {tuple(cov_diag_sqrt.shape)}"
            )
        if not bool((cov_diag_sqrt != 0).all()):
            raise ValueError("the diagonal scale d of Sigma = B B^T + D^2 has a zero entry")
        xp = self.xp = _xp(cov_factor)
        self.B = cov_factor
        self.d = cov_diag_sqrt
        self.inv_d2 = 1.0 / (cov_diag_sqrt * cov_diag_sqrt)
        self._U = self._diag_coef_ = None
        self.P = None
        if cov_factor.shape[0] <= dense_precision_max_dim:
            self.P = xp.linalg.inv(cov_factor @ cov_factor.T + xp.diag(cov_diag_sqrt * cov_diag_sqrt))
            self.P2 = self.P * self.P  # P2 @ a = diag(P diag(a) P)
            self.precision_diag = self.P.diagonal() * 1.0
        else:
            self.precision_diag = self.inv_d2 - (self.U * self.U).sum(-1)
        self.PB = self.precision_matmul(cov_factor)
        self.BtPB = cov_factor.T @ self.PB

    @property
    def U(self) -> Array:
        """``U = D^{-2} B L^{-T}`` with ``L L^T = I + B^T D^{-2} B``, so that ``P = D^{-2} - U U^T``."""
        if self._U is None:
            xp, B = self.xp, self.B
            inv_d2_B = B * self.inv_d2[:, None]
            chol = xp.linalg.cholesky(xp.eye(B.shape[1], dtype=B.dtype) + B.T @ inv_d2_B)
            self._U = xp.linalg.solve(chol, inv_d2_B.T).T  # L is p x p: a general solve is as cheap
        return self._U

    @property
    def _diag_coef(self) -> Array:
        """``d^-4 - 2 d^-2 |u_i|^2``: ``diag(P diag(a) P) = a * coef + u_i^T (U^T diag(a) U) u_i``."""
        if self._diag_coef_ is None:
            self._diag_coef_ = self.inv_d2 * (self.inv_d2 - 2.0 * (self.U * self.U).sum(-1))
        return self._diag_coef_

    def precision_matmul(self, x: Array) -> Array:
        """``Sigma^{-1} x`` for ``x`` of shape ``(M,)`` or ``(M, k)``."""
        if self.P is not None:
            return self.P @ x
        if x.ndim == 1:
            return self.inv_d2 * x - self.U @ (self.U.T @ x)
        return self.inv_d2[:, None] * x - self.U @ (self.U.T @ x)

    # ---- mu block -------------------------------------------------------------------------
    def solve_loc(self, grad: Array, damping: float) -> Array:
        """``(P + damping diag P)^{-1} grad`` by Woodbury: ``P + damping diag P = H - U U^T``
        (a direct ``M x M`` solve when ``P`` is formed)."""
        xp = self.xp
        if self.P is not None:
            return xp.linalg.solve(self.P + damping * xp.diag(self.precision_diag), grad)
        h = self.inv_d2 + damping * self.precision_diag
        inv_h_U = self.U / h[:, None]
        capacitance = xp.eye(self.U.shape[1], dtype=h.dtype) - self.U.T @ inv_h_U
        inv_h_g = grad / h
        correction = inv_h_U @ xp.linalg.solve(capacitance, self.U.T @ inv_h_g)
        return inv_h_g + correction

    # ---- (B, d) block ----------------------------------------------------------------------
    def fisher_vp(self, v_B: Array, v_d: Array) -> tuple[Array, Array]:
        """The ``(B, d)`` Fisher block applied to ``(v_B, v_d)``, without forming it."""
        a = 2.0 * self.d * v_d  # dSigma = v_B B^T + B v_B^T + diag(a)
        PV = self.precision_matmul(v_B)
        if self.P is not None:
            WB = self.P @ (a[:, None] * self.PB) + PV @ self.BtPB + self.PB @ (PV.T @ self.B)
            return WB, self.d * (2.0 * (PV * self.PB).sum(-1) + self.P2 @ a)
        # P diag(a) P = diag(a / d^4) - D^{-2} diag(a) U U^T - U U^T diag(a) D^{-2} + U (U^T diag(a) U) U^T
        PaPB = self.precision_matmul(a[:, None] * self.PB)
        WB = PV @ self.BtPB + self.PB @ (PV.T @ self.B) + PaPB
        UtaU = self.U.T @ (a[:, None] * self.U)
        diag_PaP = a * self._diag_coef + ((self.U @ UtaU) * self.U).sum(-1)
        diag_W = 2.0 * (PV * self.PB).sum(-1) + diag_PaP
        return WB, self.d * diag_W

    def fisher_diag(self) -> tuple[Array, Array]:
        """Diagonal of the ``(B, d)`` Fisher block: ``P_ii (B^T P B)_jj + (P B)_ij^2`` and ``2 d_i^2 P_ii^2``."""
        diag_B = self.precision_diag[:, None] * self.BtPB.diagonal() + self.PB * self.PB
        diag_d = 2.0 * (self.d * self.precision_diag) ** 2
        return diag_B, diag_d


class NaturalGradient(NamedTuple):
    loc: Tensor
    cov_factor: Tensor
    scale_unconstrained: Tensor
    cg_iterations: int


def natural_gradient(
    loc_grad: Tensor,
    cov_factor: Tensor,
    cov_factor_grad: Tensor,
    scale: Tensor,
    scale_grad: Tensor,
    scale_derivative: Tensor,
    damping: float = 10.0,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 100,
    numpy_max_size: int = 20000,
) -> NaturalGradient:
    """
    Damped natural gradient ``(F + damping * diag F)^{-1} g`` of the parameters of
    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`.

    The guide stores ``loc``, ``cov_factor = W`` (``M x p``) and ``u``, the unconstrained value
    of ``scale = s = T(u)``, with ``Sigma = diag(s) (W W^T + I) diag(s)``, i.e. ``B = diag(s) W``
    and ``d = s`` in the paper's notation.  ``F`` is the exact Fisher information of the
    Gaussian with respect to ``(loc, W, u)``: the ``(B, d)`` block of
    :class:`FactorGaussianFisher` pulled back through the Jacobian of ``(W, u) -> (B, d)``.

    :param scale_derivative: ``ds/du`` elementwise (``sigmoid(u)`` for the softplus constraint).
    :param cg_tol: relative residual at which conjugate gradients stop (the authors' MATLAB
        code uses ``pcg``'s default, 1e-6).
    :param numpy_max_size: CPU problems with ``M (p + 1)`` up to this size are solved in NumPy
        float64 (less per-operation overhead than torch on small arrays); larger ones, and
        tensors on other devices, in torch in their own dtype.  ``0`` always uses torch.
    :returns: the natural gradient in the same coordinates (and dtype) as the inputs, and the
        number of conjugate-gradient iterations used for the ``(W, u)`` block.
    """
    inputs = (loc_grad, cov_factor, cov_factor_grad, scale, scale_grad, scale_derivative)
    if runs_in_numpy(cov_factor, numpy_max_size):
        ng_loc, ng_W, ng_u, iters = _natural_gradient(*map(to_numpy, inputs), damping, cg_tol, cg_max_iter)
        return NaturalGradient(*(from_numpy(x, cov_factor) for x in (ng_loc, ng_W, ng_u)), iters)
    return NaturalGradient(*_natural_gradient(*inputs, damping, cg_tol, cg_max_iter))


def _natural_gradient(loc_grad, W, W_grad, s, u_grad, t, damping, cg_tol, cg_max_iter):
    M, p = W.shape
    xp = _xp(W)
    fisher = FactorGaussianFisher(s[:, None] * W, s)
    ng_loc = fisher.solve_loc(loc_grad, damping)
    fvp, diag = fisher_matvec(W, s, t, fisher)
    damped_diag = damping * diag

    def damped_fvp(vector: Array) -> Array:
        return fvp(vector) + damped_diag * vector

    rhs = xp.concatenate([W_grad, u_grad[:, None]], 1).reshape(-1)
    result = conjugate_gradient(damped_fvp, rhs, preconditioner=(1.0 + damping) * diag, tol=cg_tol, max_iter=cg_max_iter)
    x = result.solution.reshape(M, p + 1)
    return ng_loc, x[:, :p], x[:, p], result.num_iterations


def fisher_matvec(
    cov_factor: Array, scale: Array, scale_derivative: Array, fisher: FactorGaussianFisher | None = None
) -> tuple[Callable[[Array], Array], Array]:
    """
    The undamped ``(W, u)`` Fisher-vector product and the diagonal of that block, as used by
    :func:`natural_gradient` (exposed for testing and diagnostics).  Vectors are the rows of the
    ``(M, p + 1)`` matrix ``[V_W, v_u]`` flattened: ``[V_W[0], v_u[0], V_W[1], v_u[1], ...]``.

    The product pushes ``(V_W, v_u)`` forward to ``(V_B, v_d) = (diag(v_s) W + diag(s) V_W, v_s)``
    with ``v_s = (ds/du) v_u``, applies :meth:`FactorGaussianFisher.fisher_vp` (inlined here, with
    both precision products done in one pass) and pulls the result back:
    ``g_W = diag(s) g_B``, ``g_u = (ds/du) (rowsum(g_B * W) + g_d)``.
    """
    M, p = cov_factor.shape
    xp = _xp(cov_factor)
    s, W, t = scale, cov_factor, scale_derivative
    if fisher is None:
        fisher = FactorGaussianFisher(s[:, None] * W, s)
    s_col, two_s = s[:, None], 2.0 * s
    U, PB, BtPB, B = fisher.U, fisher.PB, fisher.BtPB, fisher.B
    Ut, inv_d2_col, coef = U.T, fisher.inv_d2[:, None], fisher._diag_coef

    def fvp(vector: Array) -> Array:
        V = vector.reshape(M, p + 1)
        v_s = t * V[:, p]
        a = two_s * v_s  # dSigma = V_B B^T + B V_B^T + diag(a)
        a_col = a[:, None]
        X = xp.concatenate([v_s[:, None] * W + s_col * V[:, :p], a_col * PB, a_col * U], 1)
        UtX = Ut @ X  # [U^T V_B, U^T diag(a) P B, U^T diag(a) U]
        PX = inv_d2_col * X[:, : 2 * p] - U @ UtX[:, : 2 * p]  # [P V_B, P diag(a) P B]
        PV = PX[:, :p]
        g_B = PX[:, p:] + PV @ BtPB + PB @ (PV.T @ B)
        diag_W = 2.0 * (PV * PB).sum(-1) + a * coef + ((U @ UtX[:, 2 * p :]) * U).sum(-1)
        g_u = t * ((g_B * W).sum(-1) + s * diag_W)
        return xp.concatenate([s_col * g_B, g_u[:, None]], 1).reshape(-1)

    diag_B, _ = fisher.fisher_diag()
    diag_s = fisher.precision_diag * (1.0 + (W * W).sum(-1)) + 1.0 / (s * s)
    diag = xp.concatenate([(s * s)[:, None] * diag_B, (t * t * diag_s)[:, None]], 1).reshape(-1)
    return fvp, diag


class PaperNaturalGradient(NamedTuple):
    loc: Array
    cov_factor: Array
    cov_diag_sqrt: Array
    cg_iterations: int


def paper_natural_gradient(
    loc_grad: Array,
    cov_factor: Array,
    cov_factor_grad: Array,
    cov_diag_sqrt: Array,
    cov_diag_sqrt_grad: Array,
    free: Array | None = None,
    damping: float = 10.0,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 100,
    fisher: str = "exact",
    dense_precision_max_dim: int = 64,
) -> PaperNaturalGradient:
    """
    Damped natural gradient ``(F + damping * diag F)^{-1} g`` in the paper's coordinates
    ``(mu, B, d)`` of ``N(mu, B B^T + diag(d)^2)``, with only the entries of ``B`` where ``free``
    is true as parameters (the others are held fixed): the authors' code (Zhang et al. 2023,
    ``Hessian_ong_deepglmm.m``) keeps ``B`` lower triangular and removes the entries above the
    diagonal from the Fisher system and the gradient.  ``F`` is the exact Fisher information
    restricted to ``(mu, B[free], d)``; the ``(B, d)`` block is solved by Jacobi-preconditioned
    conjugate gradients on :meth:`FactorGaussianFisher.fisher_vp` (matrix-free, O(M p^2) per
    iteration), the ``mu`` block by Woodbury.

    ``fisher="authors"`` replaces the ``(B, B)`` part of the block by the authors' approximation
    ``2 (B^T P B) kron P`` (their ``G22``; the exact part is ``(B^T P B) kron P`` plus a
    commutation term), keeping the exact ``(B, d)`` and ``(d, d)`` parts as they do; it is there
    for comparison only (the issue asks for the exact Fisher).

    Arrays are torch tensors or NumPy arrays (all of one kind); ``free`` is a boolean
    ``(M, p)`` array (default: all entries free).  The returned ``cov_factor`` is zero where
    ``free`` is false.  ``dense_precision_max_dim``: see :class:`FactorGaussianFisher`.
    """
    M, p = cov_factor.shape
    xp = _xp(cov_factor)
    if fisher not in ("exact", "authors"):
        raise ValueError(f"fisher must be 'exact' or 'authors', got {fisher!r}")
    authors = fisher == "authors"
    fisher = FactorGaussianFisher(cov_factor, cov_diag_sqrt, dense_precision_max_dim)
    ng_loc = fisher.solve_loc(loc_grad, damping)
    diag_B, diag_d = fisher.fisher_diag()
    if authors:
        diag_B = 2.0 * fisher.precision_diag[:, None] * fisher.BtPB.diagonal()
    diag = xp.concatenate([diag_B, diag_d[:, None]], 1)
    rhs = xp.concatenate([cov_factor_grad, cov_diag_sqrt_grad[:, None]], 1)
    if free is None:
        mask = None
        preconditioner = (1.0 + damping) * diag
    else:
        mask = xp.concatenate([free, xp.ones_like(free[:, :1])], 1)
        rhs = xp.where(mask, rhs, 0.0 * rhs)
        # entries held fixed have zero right-hand side and a zero row: CG never moves them
        preconditioner = xp.where(mask, (1.0 + damping) * diag, 1.0 + 0.0 * diag)
        mask = mask * 1.0
    result = conjugate_gradient(
        _damped_bd_operator(fisher, damping * diag, mask, authors), rhs.reshape(-1), preconditioner.reshape(-1), tol=cg_tol, max_iter=cg_max_iter
    )
    x = result.solution.reshape(M, p + 1)
    return PaperNaturalGradient(ng_loc, x[:, :p], x[:, p], result.num_iterations)


def _damped_bd_operator(
    fisher: FactorGaussianFisher, damped_diag: Array, mask: Array | None, authors: bool = False
) -> Callable[[Array], Array]:
    """``v -> mask * (F_(B,d) v) + damped_diag * v`` on vectors in the flattened ``(M, p + 1)``
    layout ``[V_B | v_d]``, written into one preallocated output (``authors``: the authors'
    ``(B, B)`` part ``2 (B^T P B) kron P``, see :func:`paper_natural_gradient`)."""
    B, d, PB, BtPB, P = fisher.B, fisher.d, fisher.PB, fisher.BtPB, fisher.P
    M, p = B.shape
    xp = fisher.xp
    out = xp.zeros_like(damped_diag)
    two_d = 2.0 * d
    if authors:

        def bd_product(V: Array) -> None:
            a = two_d * V[:, p]
            out[:, :p] = 2.0 * (fisher.precision_matmul(V[:, :p]) @ BtPB) + fisher.precision_matmul(a[:, None] * PB)
            out[:, p] = fisher.fisher_vp(V[:, :p], V[:, p])[1]  # the d rows are exact in both

    elif P is None:

        def bd_product(V: Array) -> None:
            g_B, g_d = fisher.fisher_vp(V[:, :p], V[:, p])
            out[:, :p] = g_B
            out[:, p] = g_d

    else:
        # the dense-P branch of fisher_vp with the d-scalings folded into constants:
        # P diag(2 d v_d) P B = P (v_d * 2 d P B),  d * diag(P diag(2 d v_d) P) = (d P2 2d) v_d,
        # PV^T B = V_B^T P B
        PB_2d = two_d[:, None] * PB
        dP2d = (d[:, None] * fisher.P2) * two_d

        def bd_product(V: Array) -> None:
            v_d = V[:, p]
            V_B = V[:, :p]
            PV = P @ V_B
            out[:, :p] = P @ (v_d[:, None] * PB_2d) + PV @ BtPB + PB @ (V_B.T @ PB)
            out[:, p] = (PV * PB_2d).sum(-1) + dP2d @ v_d

    def matvec(vector: Array) -> Array:  # returns a view of ``out``, overwritten by the next call
        V = vector.reshape(M, p + 1)
        bd_product(V)
        if mask is not None:
            out.__imul__(mask)
        out.__iadd__(damped_diag * V)
        return out.reshape(-1)

    return matvec
