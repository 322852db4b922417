"""
The damped natural gradient of NG-HVI against a dense Fisher computed independently as the
Hessian of KL(q_lambda0 || q_lambda) at lambda = lambda0 (torch's closed-form Gaussian KL).
"""

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence
from torch.nn.functional import softplus

import pyro
from pyro.distributions import constraints
from pyro.distributions.transforms import SoftplusTransform, ExpTransform

from pyro_cavi.nghvi import FactorGaussianFisher, NaturalGradientAdadelta, NGHVIOptim, natural_gradient
from pyro_cavi.nghvi.natural_gradient import conjugate_gradient, paper_natural_gradient


def _pyro_mvn(lam, M, p, transform):
    """N(loc, diag(s)(W W^T + I)diag(s)), s = T(u), the AutoLowRankMultivariateNormal family."""
    loc, W, u = lam[:M], lam[M : M + M * p].reshape(M, p), lam[M + M * p :]
    s = transform(u)
    B = s.unsqueeze(-1) * W
    return MultivariateNormal(loc, B @ B.T + torch.diag(s**2))


def _paper_mvn(lam, M, p):
    """N(mu, B B^T + diag(d)^2) in the paper's coordinates (mu, B, d)."""
    mu, B, d = lam[:M], lam[M : M + M * p].reshape(M, p), lam[M + M * p :]
    return MultivariateNormal(mu, B @ B.T + torch.diag(d**2))


def _dense_fisher(family, lam0):
    q0 = family(lam0)
    return torch.autograd.functional.hessian(lambda lam: kl_divergence(q0, family(lam)), lam0)


@pytest.mark.parametrize("M,p", [(4, 1), (6, 2), (7, 3)])
@pytest.mark.parametrize("damping", [0.1, 10.0])
@pytest.mark.parametrize("transform", [SoftplusTransform(), ExpTransform()], ids=["softplus", "exp"])
@pytest.mark.parametrize("numpy_max_size", [20000, 0], ids=["numpy", "torch"])
def test_natural_gradient_matches_dense_solve(M, p, damping, transform, numpy_max_size):
    torch.manual_seed(M * 10 + p)
    lam0 = torch.randn(M + M * p + M, dtype=torch.float64)
    F = _dense_fisher(lambda lam: _pyro_mvn(lam, M, p, transform), lam0)
    g = torch.randn_like(lam0)
    expected = torch.linalg.solve(F + damping * torch.diag(F.diagonal()), g)

    loc, W, u = lam0[:M], lam0[M : M + M * p].reshape(M, p), lam0[M + M * p :]
    s = transform(u)
    ng = natural_gradient(
        g[:M],
        W,
        g[M : M + M * p].reshape(M, p),
        s,
        g[M + M * p :],
        transform.log_abs_det_jacobian(u, s).exp(),
        damping=damping,
        cg_tol=1e-13,
        cg_max_iter=1000,
        numpy_max_size=numpy_max_size,
    )
    actual = torch.cat([ng.loc, ng.cov_factor.reshape(-1), ng.scale_unconstrained])
    assert actual.dtype == torch.float64
    assert torch.allclose(actual, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())


def test_numpy_and_torch_paths_agree_in_float32():
    """The float64 NumPy path (small CPU problems) and the torch path give the same natural
    gradient, returned in the parameters' dtype."""
    torch.manual_seed(0)
    M, p = 40, 3
    W, u = torch.randn(M, p) * 0.3, torch.randn(M) - 2.0
    s, t = softplus(u), torch.sigmoid(u)
    grads = torch.randn(M) * 100, torch.randn(M, p), torch.randn(M)
    a = natural_gradient(grads[0], W, grads[1], s, grads[2], t, cg_tol=1e-7, numpy_max_size=10**6)
    b = natural_gradient(grads[0].double(), W.double(), grads[1].double(), s.double(), grads[2].double(), t.double(),
                         cg_tol=1e-7, numpy_max_size=0)
    for x, y in zip(a[:3], b[:3]):
        assert x.dtype == torch.float32
        assert torch.allclose(x.double(), y, rtol=1e-4, atol=1e-5 * y.abs().max())


@pytest.mark.parametrize("M,p", [(5, 1), (6, 3)])
@pytest.mark.parametrize("dense_max", [64, 0], ids=["dense-P", "woodbury"])
def test_fisher_blocks_in_paper_coordinates(M, p, dense_max):
    torch.manual_seed(p)
    mu, B, d = torch.randn(M, dtype=torch.float64), torch.randn(M, p, dtype=torch.float64), torch.rand(M, dtype=torch.float64) + 0.3
    lam0 = torch.cat([mu, B.reshape(-1), d])
    F = _dense_fisher(lambda lam: _paper_mvn(lam, M, p), lam0)
    fisher = FactorGaussianFisher(B, d, dense_precision_max_dim=dense_max)
    assert (fisher.P is None) == (dense_max == 0)
    # the mu block is Sigma^{-1} and there is no mu-(B, d) cross term
    assert torch.allclose(F[:M, :M], torch.linalg.inv(B @ B.T + torch.diag(d**2)), atol=1e-10)
    assert F[:M, M:].abs().max() < 1e-10
    F_Bd = F[M:, M:]
    v = torch.randn(M * p + M, dtype=torch.float64)
    gB, gd = fisher.fisher_vp(v[: M * p].reshape(M, p), v[M * p :])
    assert torch.allclose(torch.cat([gB.reshape(-1), gd]), F_Bd @ v, atol=1e-10)
    dB, dd = fisher.fisher_diag()
    assert torch.allclose(torch.cat([dB.reshape(-1), dd]), F_Bd.diagonal(), atol=1e-10)
    g = torch.randn(M, dtype=torch.float64)
    F_mu = F[:M, :M]
    expected = torch.linalg.solve(F_mu + 10.0 * torch.diag(F_mu.diagonal()), g)
    assert torch.allclose(fisher.solve_loc(g, 10.0), expected, atol=1e-10)


def test_conjugate_gradient_solves_spd_system():
    torch.manual_seed(0)
    A = torch.randn(30, 30, dtype=torch.float64)
    A = A @ A.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64)
    result = conjugate_gradient(lambda x: A @ x, b, preconditioner=A.diagonal(), tol=1e-12, max_iter=500)
    assert torch.allclose(result.solution, torch.linalg.solve(A, b), atol=1e-8)
    assert result.residual_norm <= 1e-12
    # the same solver on NumPy arrays
    An, bn = A.numpy(), b.numpy()
    result = conjugate_gradient(lambda x: An @ x, bn, preconditioner=An.diagonal(), tol=1e-12, max_iter=500)
    assert abs(result.solution - torch.linalg.solve(A, b).numpy()).max() < 1e-8


def test_fisher_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(M, p\)"):
        FactorGaussianFisher(torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="zero entry"):
        FactorGaussianFisher(torch.ones(3, 2), torch.tensor([1.0, 0.0, 1.0]))


def _adadelta_first_step(g, rho, eps):
    square_avg = (1 - rho) * g**2
    return (eps**0.5) / (square_avg + eps).sqrt() * g


def test_optimizer_step_is_adadelta_on_the_natural_gradient_in_guide_coordinates():
    torch.manual_seed(3)
    M, p, damping, rho, eps = 5, 2, 10.0, 0.95, 1e-6
    loc = torch.randn(M, dtype=torch.float64, requires_grad=True)
    W = torch.randn(M, p, dtype=torch.float64, requires_grad=True)
    u = torch.randn(M, dtype=torch.float64, requires_grad=True)
    lam0 = torch.cat([loc, W.reshape(-1), u]).detach()
    g = torch.randn_like(lam0)
    loc.grad, W.grad, u.grad = g[:M].clone(), g[M : M + M * p].reshape(M, p).clone(), g[M + M * p :].clone()
    F = _dense_fisher(lambda lam: _pyro_mvn(lam, M, p, SoftplusTransform()), lam0)
    ng = torch.linalg.solve(F + damping * torch.diag(F.diagonal()), g)
    opt = NaturalGradientAdadelta(
        [loc, W, u], SoftplusTransform(), damping=damping, momentum=0.0, rho=rho, eps=eps, clip_norm=None, cg_tol=1e-13,
        coordinates="guide",
    )
    opt.step()
    new = torch.cat([loc, W.reshape(-1), u]).detach()
    assert torch.allclose(new, lam0 - _adadelta_first_step(ng, rho, eps), atol=1e-9)

    # momentum 0.6 scales the first averaged direction by 0.4; clipping bounds its norm
    loc2, W2, u2 = (x.detach().clone().requires_grad_() for x in (lam0[:M], lam0[M : M + M * p].reshape(M, p), lam0[M + M * p :]))
    loc2.grad, W2.grad, u2.grad = g[:M].clone(), g[M : M + M * p].reshape(M, p).clone(), g[M + M * p :].clone()
    clip = 0.5 * ng.norm().item()
    opt2 = NaturalGradientAdadelta(
        [loc2, W2, u2], SoftplusTransform(), momentum=0.6, clip_norm=clip, cg_tol=1e-13, coordinates="guide"
    )
    opt2.step()
    direction = 0.4 * ng * clip / ng.norm()
    new2 = torch.cat([loc2, W2.reshape(-1), u2]).detach()
    assert torch.allclose(new2, lam0 - _adadelta_first_step(direction, rho, eps), atol=1e-9)


def test_sg_mode_in_guide_coordinates_is_plain_adadelta():
    torch.manual_seed(4)
    params = [torch.randn(4, requires_grad=True), torch.randn(4, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ng_opt = NaturalGradientAdadelta(
        params, SoftplusTransform(), natural_gradient=False, momentum=0.0, clip_norm=None, coordinates="guide"
    )
    ref_opt = torch.optim.Adadelta(twins, lr=1.0, rho=0.95, eps=1e-6)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, gr in zip(params, twins, grads):
            p.grad, t.grad = gr.clone(), gr.clone()
        ng_opt.step()
        ref_opt.step()
    for p, t in zip(params, twins):
        assert torch.allclose(p, t, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": -1.0}, "damping"),
        ({"momentum": 1.0}, "momentum"),
        ({"rho": 1.5}, "rho"),
        ({"eps": 0.0}, "eps"),
        ({"clip_norm": -2.0}, "clip_norm"),
        ({"coordinates": "raw"}, "coordinates"),
    ],
)
def test_optimizer_rejects_bad_arguments(kwargs, match):
    params = [torch.zeros(3, requires_grad=True), torch.zeros(3, 1, requires_grad=True), torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match):
        NaturalGradientAdadelta(params, SoftplusTransform(), **kwargs)
    with pytest.raises(ValueError, match="expected"):
        NaturalGradientAdadelta(params[:2], SoftplusTransform())


def test_pyro_optim_groups_the_guide_parameters():
    pyro.clear_param_store()
    store = pyro.get_param_store()
    loc = pyro.param("G.loc", torch.zeros(3))
    pyro.param("G.cov_factor", torch.ones(3, 2))
    pyro.param("G.scale", torch.ones(3), constraint=constraints.softplus_positive)
    pyro.param("other", torch.ones(2))
    params = [store._params[name] for name in ("G.loc", "G.cov_factor", "G.scale", "other")]
    for q in params:
        q.grad = torch.ones_like(q)
    optim = NGHVIOptim()
    with pytest.warns(UserWarning, match="'other' is not the loc, cov_factor or scale"):
        optim(params)
    kinds = {store.param_name(k): type(v).__name__ for k, v in optim.optim_objs.items()}
    assert kinds == {"G.loc": "NaturalGradientAdadelta", "other": "Adadelta"}
    assert isinstance(optim.optim_objs[params[0]].scale_transform, SoftplusTransform)
    assert not torch.equal(pyro.param("G.loc"), torch.zeros(3))


# ---- the paper's coordinates (mu, B lower triangular, d), as in the authors' code ----------


def _lower_mvn(lam, M, p):
    """N(mu, B B^T + diag(d)^2) with only the lower triangle of B as parameters."""
    rows, cols = torch.tril_indices(M, p)
    k = len(rows)
    B = torch.zeros(M, p, dtype=lam.dtype).index_put((rows, cols), lam[M : M + k])
    return MultivariateNormal(lam[:M], B @ B.T + torch.diag(lam[M + k :] ** 2))


@pytest.mark.parametrize("M,p", [(4, 1), (6, 2), (7, 3)])
@pytest.mark.parametrize("damping", [0.1, 10.0])
@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("dense_max", [64, 0], ids=["dense-P", "woodbury"])
def test_paper_natural_gradient_matches_dense_solve_with_lower_triangular_B(M, p, damping, use_numpy, dense_max):
    torch.manual_seed(M + p)
    rows, cols = torch.tril_indices(M, p)
    k = len(rows)
    lam0 = torch.cat([torch.randn(M + k, dtype=torch.float64), torch.rand(M, dtype=torch.float64) + 0.2])
    lam0[-1] *= -1  # a negative d: Sigma depends on d^2 only
    F = _dense_fisher(lambda lam: _lower_mvn(lam, M, p), lam0)
    g = torch.randn_like(lam0)
    expected = torch.linalg.solve(F + damping * torch.diag(F.diagonal()), g)

    free = torch.zeros(M, p, dtype=torch.bool).index_put((rows, cols), torch.tensor(True))
    B = torch.zeros(M, p, dtype=torch.float64).index_put((rows, cols), lam0[M : M + k])
    g_B = torch.randn(M, p, dtype=torch.float64).index_put((rows, cols), g[M : M + k])  # junk above the diagonal
    args = (g[:M], B, g_B, lam0[M + k :], g[M + k :], free)
    if use_numpy:
        args = tuple(x.numpy() for x in args)
    ng = paper_natural_gradient(*args, damping=damping, cg_tol=1e-13, cg_max_iter=1000, dense_precision_max_dim=dense_max)
    ng_B = torch.as_tensor(ng.cov_factor)
    assert (ng_B[~free] == 0).all()
    actual = torch.cat([torch.as_tensor(ng.loc), ng_B[rows, cols], torch.as_tensor(ng.cov_diag_sqrt)])
    assert torch.allclose(actual, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())


def _paper_objective(mu, B, d, coef):
    """A smooth test objective of (mu, B, d), even in d (a function of the distribution)."""
    a, C, e = coef
    return (a * mu).sum() + 0.5 * (mu**2).sum() + (C * B).sum() + (B**2).sum() + (e * d**2).sum() + (d**4).sum()


def _reference_paper_steps(mu, B, d, coef, steps, damping, momentum, clip, natural, rho=0.95, eps=1e-6):
    """NG-HVI / SG-HVI as in the authors' MATLAB code, written out densely: gradient in
    (mu, B, d) with the entries of B above the diagonal removed, damped natural gradient
    (dense Fisher of the reduced coordinates), clipping, momentum, ADADELTA, additive update."""
    M, p = B.shape
    rows, cols = torch.tril_indices(M, p)
    k = len(rows)
    lam = torch.cat([mu, B[rows, cols], d])
    buf, g2, delta2 = (torch.zeros_like(lam) for _ in range(3))
    trajectory = []
    for _ in range(steps):
        x = lam.clone().requires_grad_()
        Bx = torch.zeros(M, p, dtype=lam.dtype).index_put((rows, cols), x[M : M + k])
        (g,) = torch.autograd.grad(_paper_objective(x[:M], Bx, x[M + k :], coef), x)
        if natural:
            F = _dense_fisher(lambda v: _lower_mvn(v, M, p), lam)
            g = torch.linalg.solve(F + damping * torch.diag(F.diagonal()), g)
        if clip is not None and g.norm() > clip:
            g = g * clip / g.norm()
        buf = momentum * buf + (1 - momentum) * g
        g2 = rho * g2 + (1 - rho) * buf**2
        step = (delta2 + eps).sqrt() / (g2 + eps).sqrt() * buf
        delta2 = rho * delta2 + (1 - rho) * step**2
        lam = lam - step
        trajectory.append((lam[:M], torch.zeros(M, p, dtype=lam.dtype).index_put((rows, cols), lam[M : M + k]), lam[M + k :]))
    return trajectory


@pytest.mark.parametrize("natural", [True, False], ids=["NG-HVI", "SG-HVI"])
def test_optimizer_in_paper_coordinates_matches_the_authors_algorithm(natural):
    torch.manual_seed(7)
    M, p, steps = 6, 3, 4
    coef = (torch.randn(M, dtype=torch.float64), torch.randn(M, p, dtype=torch.float64), torch.rand(M, dtype=torch.float64))
    mu0 = torch.randn(M, dtype=torch.float64)
    B0 = (0.3 * torch.randn(M, p, dtype=torch.float64)).tril()
    d0 = torch.rand(M, dtype=torch.float64) + 0.5
    if not natural:
        d0[2], coef[2][2] = 0.002, 1000.0  # SG-HVI's first ADADELTA step (~0.0045) takes this d through zero
    momentum, clip = (0.6, 5.0) if natural else (0.0, None)
    expected = _reference_paper_steps(mu0, B0, d0, coef, steps, 10.0, momentum, clip, natural)

    transform = SoftplusTransform()
    loc = mu0.clone().requires_grad_()
    W = (B0 / d0[:, None]).requires_grad_()
    u = transform.inv(d0).requires_grad_()
    opt = NaturalGradientAdadelta(
        [loc, W, u], transform, momentum=momentum, clip_norm=clip, natural_gradient=natural, cg_tol=1e-13, cg_max_iter=500
    )
    signs = []
    for mu_ref, B_ref, d_ref in expected:
        opt.zero_grad()
        s = transform(u)
        _paper_objective(loc, s[:, None] * W, s, coef).backward()  # gradients w.r.t. the stored (loc, W, u)
        opt.step()
        s = transform(u).detach()
        assert torch.allclose(loc.detach(), mu_ref, atol=1e-10)
        assert torch.allclose(s, d_ref.abs(), atol=1e-10), (s - d_ref.abs()).abs().max()
        assert torch.allclose(s[:, None] * W.detach(), B_ref, atol=1e-10)
        assert (W.detach().triu(1) == 0).all()  # B stays lower triangular
        signs.append(torch.sign(d_ref[2]).item())
    if not natural:
        assert -1.0 in signs  # the sign change of d was exercised


def test_paper_coordinates_hold_entries_above_the_diagonal():
    """A guide started with a full cov_factor keeps the entries of B above the diagonal."""
    torch.manual_seed(1)
    M, p = 5, 2
    loc, W, u = torch.zeros(M, requires_grad=True), torch.randn(M, p, requires_grad=True), torch.zeros(M, requires_grad=True)
    s0 = softplus(u.detach())
    upper = (s0[:, None] * W.detach()).triu(1)
    opt = NaturalGradientAdadelta([loc, W, u], SoftplusTransform())
    for _ in range(3):
        opt.zero_grad()
        (loc.sum() + (W**2).sum() + u.sum()).backward()
        opt.step()
    B = softplus(u.detach())[:, None] * W.detach()
    assert torch.allclose(B.triu(1), upper, atol=1e-6)
    assert not torch.allclose(B.tril(), (s0[:, None] * W.detach()).tril())


@pytest.mark.parametrize("M,p", [(5, 2), (7, 3)])
def test_authors_fisher_approximation_option(M, p):
    """fisher='authors': the (B, B) part is 2 (B^T P B) kron P (Hessian_ong_deepglmm.m's G22),
    the (B, d) and (d, d) parts exact; lower-triangular B."""
    torch.manual_seed(11)
    rows, cols = torch.tril_indices(M, p)
    k = len(rows)
    B = torch.zeros(M, p, dtype=torch.float64).index_put((rows, cols), torch.randn(k, dtype=torch.float64))
    d = torch.rand(M, dtype=torch.float64) + 0.3
    P = torch.linalg.inv(B @ B.T + torch.diag(d**2))
    full = torch.kron(P.contiguous(), (B.T @ P @ B).contiguous()) * 2.0  # row-major vec(V): vec(P V C) = (P kron C^T) vec(V)
    lam0 = torch.cat([torch.zeros(M, dtype=torch.float64), B[rows, cols], d])
    F = _dense_fisher(lambda lam: _lower_mvn(lam, M, p), lam0)[M:, M:]
    lower = rows * p + cols
    F[:k, :k] = full[lower][:, lower]
    g = torch.randn(k + M, dtype=torch.float64)
    expected = torch.linalg.solve(F + 10.0 * torch.diag(F.diagonal()), g)
    free = torch.zeros(M, p, dtype=torch.bool).index_put((rows, cols), torch.tensor(True))
    g_B = torch.zeros(M, p, dtype=torch.float64).index_put((rows, cols), g[:k])
    for dense_max in (64, 0):  # explicit P and Woodbury products
        ng = paper_natural_gradient(
            torch.zeros(M, dtype=torch.float64), B, g_B, d, g[k:], free, cg_tol=1e-13, cg_max_iter=1000, fisher="authors",
            dense_precision_max_dim=dense_max,
        )
        actual = torch.cat([ng.cov_factor[rows, cols], ng.cov_diag_sqrt])
        assert torch.allclose(actual, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())
    with pytest.raises(ValueError, match="fisher"):
        paper_natural_gradient(g[:M], B, g_B, d, g[k:], free, fisher="approx")


def test_paper_coordinates_keep_d_off_zero_in_the_guide():
    """When the additive update puts d_i within eps^(1/3) ||B_i|| of zero, the guide's scale is
    that floor (float32: 4.9e-3 ||B_i||), the sign of d is kept, and the guide's distribution
    stays valid."""
    M, p = 3, 2
    transform = SoftplusTransform()
    d0 = torch.tensor([0.5, 0.5, 0.003])
    B0 = torch.tensor([[0.3, 0.0], [0.2, 0.1], [0.4, 0.3]])
    loc = torch.zeros(M, requires_grad=True)
    W = (B0 / d0[:, None]).requires_grad_()
    u = transform.inv(d0).requires_grad_()
    opt = NaturalGradientAdadelta([loc, W, u], transform, natural_gradient=False, momentum=0.0, clip_norm=None)
    loc.grad, W.grad = torch.zeros(M), torch.zeros(M, p)
    u.grad = torch.tensor([0.0, 0.0, 100.0])  # d_2 moves by ~ -0.0045 (ADADELTA's first step): to -0.0015
    opt.step()
    s = transform(u).detach()
    floor = torch.finfo(torch.float32).eps ** (1 / 3) * 0.5  # ||B_2|| = 0.5
    assert abs(s[2].item() - floor) < 1e-6 and floor > 0.0015
    assert opt.state[u]["sign"][2].item() == -1.0
    assert torch.allclose(s[:2], d0[:2])
    B = s[:, None] * W.detach()
    assert torch.allclose(B, B0, atol=1e-6)
    MultivariateNormal(loc.detach(), B @ B.T + torch.diag(s**2))  # positive definite
