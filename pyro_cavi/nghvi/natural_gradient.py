"""
Exact Fisher information of a factor-covariance Gaussian and its damped natural gradient.

The variational density is ``q(theta) = N(mu, Sigma)`` with ``Sigma = B B^T + D^2``,
``B`` an ``(M, p)`` factor loading matrix and ``D = diag(d)``.  Its Fisher information is
block diagonal in ``(mu, (B, d))``::

    F_mu      = Sigma^{-1}
    F_(B,d)   = 1/2 J^T (Sigma^{-1} kron Sigma^{-1}) J,     J = d vec(Sigma) / d (vec B, d)

Nothing here builds an ``M x M`` matrix, let alone the ``(Mp + M)^2`` Fisher block:
``Sigma^{-1} = D^{-2} - U U^T`` (Woodbury, ``U`` is ``M x p``) and the ``(B, d)`` block is
applied matrix-free.  The damped natural gradient ``(F + delta diag F)^{-1} g`` is solved by
Woodbury for ``mu`` (O(M p^2 + p^3)) and by Jacobi-preconditioned conjugate gradients for
``(B, d)`` (O(M p^2) per iteration).

:class:`FactorGaussianFisher` works in the paper's coordinates ``(mu, B, d)``;
:func:`natural_gradient` maps to the parameters Pyro's
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` actually stores,
``loc``, ``cov_factor = W`` and the unconstrained value ``u`` of ``scale = s = T(u)``, where
``B = diag(s) W`` and ``d = s``, and returns the exact damped natural gradient in those
coordinates.

Reference: Zhang, Smith, Maneesoonthorn, Loaiza-Maya (2023), "Natural Gradient Hybrid
Variational Inference with Application to Deep Mixed Models", arXiv:2302.13536, Section 3.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class CGResult(NamedTuple):
    solution: Tensor
    num_iterations: int
    residual_norm: float


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    preconditioner: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> CGResult:
    """
    Solve ``A x = rhs`` for symmetric positive definite ``A`` given only ``matvec(x) = A x``,
    with an optional diagonal (Jacobi) ``preconditioner`` holding ``diag(A)``.  Stops when
    ``||A x - rhs|| <= tol * ||rhs||``.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    rhs_norm = rhs.norm()
    if rhs_norm == 0:
        return CGResult(x, 0, 0.0)
    z = r / preconditioner if preconditioner is not None else r
    direction = z.clone()
    rz = torch.dot(r, z)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        a_direction = matvec(direction)
        step = rz / torch.dot(direction, a_direction)
        x = x + step * direction
        r = r - step * a_direction
        if r.norm() <= tol * rhs_norm:
            break
        z = r / preconditioner if preconditioner is not None else r
        rz_new = torch.dot(r, z)
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return CGResult(x, iteration, float(r.norm() / rhs_norm))


class FactorGaussianFisher:
    """
    Fisher information of ``N(mu, B B^T + diag(d)^2)`` in the coordinates ``(mu, B, d)``.

    With ``P = Sigma^{-1}`` and a perturbation ``V = (V_B, v_d)``, ``dSigma = V_B B^T + B V_B^T
    + 2 diag(d * v_d)`` and ``W = P dSigma P``; the ``(B, d)`` Fisher-vector product is
    ``(W B, d * diag(W))``, evaluated with ``P = D^{-2} - U U^T`` in O(M p^2).

    :param Tensor cov_factor: ``B``, shape ``(M, p)``.
    :param Tensor cov_diag_sqrt: ``d``, shape ``(M,)``, nonzero.
    """

    def __init__(self, cov_factor: Tensor, cov_diag_sqrt: Tensor):
        if cov_factor.dim() != 2 or cov_diag_sqrt.shape != cov_factor.shape[:1]:
            raise ValueError(
                f"expected cov_factor of shape (M, p) and d of shape (M,), got "
                f"{tuple(cov_factor.shape)} and {tuple(cov_diag_sqrt.shape)}"
            )
        if not bool((cov_diag_sqrt != 0).all()):
            raise ValueError("the diagonal scale d of Sigma = B B^T + D^2 has a zero entry")
        self.B = cov_factor
        self.d = cov_diag_sqrt
        self.inv_d2 = cov_diag_sqrt.pow(-2)
        p = cov_factor.shape[1]
        inv_d2_B = cov_factor * self.inv_d2.unsqueeze(-1)
        capacitance = torch.eye(p, dtype=cov_factor.dtype) + cov_factor.T @ inv_d2_B
        chol = torch.linalg.cholesky(capacitance)
        # U = D^{-2} B L^{-T}, so that P = D^{-2} - U U^T.
        self.U = torch.linalg.solve_triangular(chol, inv_d2_B.T, upper=False).T
        u2 = self.U.pow(2).sum(-1)
        self.precision_diag = self.inv_d2 - u2
        # diag(P diag(a) P) = a * (d^-4 - 2 d^-2 |u_i|^2) + u_i^T (U^T diag(a) U) u_i
        self._diag_coef = self.inv_d2 * (self.inv_d2 - 2.0 * u2)
        self.PB = self.precision_matmul(cov_factor)
        self.BtPB = cov_factor.T @ self.PB

    def precision_matmul(self, x: Tensor) -> Tensor:
        """``Sigma^{-1} x`` for ``x`` of shape ``(M,)`` or ``(M, k)``."""
        if x.dim() == 1:
            return self.inv_d2 * x - self.U @ (self.U.T @ x)
        return self.inv_d2.unsqueeze(-1) * x - self.U @ (self.U.T @ x)

    # ---- mu block -------------------------------------------------------------------------
    def solve_loc(self, grad: Tensor, damping: float) -> Tensor:
        """``(P + damping diag P)^{-1} grad`` by Woodbury: ``P + damping diag P = H - U U^T``."""
        h = self.inv_d2 + damping * self.precision_diag
        inv_h_U = self.U / h.unsqueeze(-1)
        capacitance = torch.eye(self.U.shape[1], dtype=h.dtype) - self.U.T @ inv_h_U
        inv_h_g = grad / h
        correction = inv_h_U @ torch.linalg.solve(capacitance, self.U.T @ inv_h_g)
        return inv_h_g + correction

    # ---- (B, d) block ----------------------------------------------------------------------
    def fisher_vp(self, v_B: Tensor, v_d: Tensor) -> tuple[Tensor, Tensor]:
        """The ``(B, d)`` Fisher block applied to ``(v_B, v_d)``, without forming it."""
        a = 2.0 * self.d * v_d  # dSigma = v_B B^T + B v_B^T + diag(a)
        PV = self.precision_matmul(v_B)
        # P diag(a) P = diag(a / d^4) - D^{-2} diag(a) U U^T - U U^T diag(a) D^{-2} + U (U^T diag(a) U) U^T
        PaPB = self.precision_matmul(a.unsqueeze(-1) * self.PB)
        WB = PV @ self.BtPB + self.PB @ (PV.T @ self.B) + PaPB
        UtaU = self.U.T @ (a.unsqueeze(-1) * self.U)
        diag_PaP = a * self._diag_coef + ((self.U @ UtaU) * self.U).sum(-1)
        diag_W = 2.0 * (PV * self.PB).sum(-1) + diag_PaP
        return WB, self.d * diag_W

    def fisher_diag(self) -> tuple[Tensor, Tensor]:
        """Diagonal of the ``(B, d)`` Fisher block: ``P_ii (B^T P B)_jj + (P B)_ij^2`` and ``2 d_i^2 P_ii^2``."""
        diag_B = self.precision_diag.unsqueeze(-1) * self.BtPB.diagonal() + self.PB.pow(2)
        diag_d = 2.0 * self.d.pow(2) * self.precision_diag.pow(2)
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
    :returns: the natural gradient in the same coordinates as the inputs, and the number of
        conjugate-gradient iterations used for the ``(W, u)`` block.
    """
    M, p = cov_factor.shape
    fisher = FactorGaussianFisher(scale.unsqueeze(-1) * cov_factor, scale)
    ng_loc = fisher.solve_loc(loc_grad, damping)
    fvp, diag = fisher_matvec(cov_factor, scale, scale_derivative, fisher)

    def damped_fvp(vector: Tensor) -> Tensor:
        return fvp(vector) + damping * diag * vector

    rhs = torch.cat([cov_factor_grad, scale_grad.unsqueeze(-1)], 1).view(-1)
    result = conjugate_gradient(
        damped_fvp, rhs, preconditioner=(1.0 + damping) * diag, tol=cg_tol, max_iter=cg_max_iter
    )
    x = result.solution.view(M, p + 1)
    return NaturalGradient(ng_loc, x[:, :p], x[:, p], result.num_iterations)


def fisher_matvec(
    cov_factor: Tensor, scale: Tensor, scale_derivative: Tensor, fisher: FactorGaussianFisher | None = None
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
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
    s, W, t = scale, cov_factor, scale_derivative
    if fisher is None:
        fisher = FactorGaussianFisher(s.unsqueeze(-1) * W, s)
    s_col, two_s = s.unsqueeze(-1), 2.0 * s
    U, PB, BtPB, B = fisher.U, fisher.PB, fisher.BtPB, fisher.B
    inv_d2_col, coef = fisher.inv_d2.unsqueeze(-1), fisher._diag_coef

    def fvp(vector: Tensor) -> Tensor:
        V = vector.view(M, p + 1)
        v_s = t * V[:, p]
        a = two_s * v_s  # dSigma = V_B B^T + B V_B^T + diag(a)
        X = torch.cat([torch.addcmul(v_s.unsqueeze(-1) * W, s_col, V[:, :p]), a.unsqueeze(-1) * PB], 1)
        PX = inv_d2_col * X - U @ (U.T @ X)  # [P V_B, P diag(a) P B]
        PV = PX[:, :p]
        g_B = torch.addmm(torch.addmm(PX[:, p:], PV, BtPB), PB, PV.T @ B)
        diag_W = 2.0 * (PV * PB).sum(-1) + a * coef + ((U @ (U.T @ (a.unsqueeze(-1) * U))) * U).sum(-1)
        g_u = t * ((g_B * W).sum(-1) + s * diag_W)
        return torch.cat([s_col * g_B, g_u.unsqueeze(-1)], 1).view(-1)

    diag_B, _ = fisher.fisher_diag()
    diag_s = fisher.precision_diag * (1.0 + W.pow(2).sum(-1)) + s.pow(-2)
    diag = torch.cat([s.pow(2).unsqueeze(-1) * diag_B, (t.pow(2) * diag_s).unsqueeze(-1)], 1).view(-1)
    return fvp, diag
