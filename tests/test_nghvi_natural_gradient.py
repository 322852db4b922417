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
from pyro_cavi.nghvi.natural_gradient import conjugate_gradient


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
def test_fisher_blocks_in_paper_coordinates(M, p):
    torch.manual_seed(p)
    mu, B, d = torch.randn(M, dtype=torch.float64), torch.randn(M, p, dtype=torch.float64), torch.rand(M, dtype=torch.float64) + 0.3
    lam0 = torch.cat([mu, B.reshape(-1), d])
    F = _dense_fisher(lambda lam: _paper_mvn(lam, M, p), lam0)
    fisher = FactorGaussianFisher(B, d)
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


def test_optimizer_step_is_adadelta_on_the_natural_gradient():
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
        [loc, W, u], SoftplusTransform(), damping=damping, momentum=0.0, rho=rho, eps=eps, clip_norm=None, cg_tol=1e-13
    )
    opt.step()
    new = torch.cat([loc, W.reshape(-1), u]).detach()
    assert torch.allclose(new, lam0 - _adadelta_first_step(ng, rho, eps), atol=1e-9)

    # momentum 0.6 scales the first averaged direction by 0.4; clipping bounds its norm
    loc2, W2, u2 = (x.detach().clone().requires_grad_() for x in (lam0[:M], lam0[M : M + M * p].reshape(M, p), lam0[M + M * p :]))
    loc2.grad, W2.grad, u2.grad = g[:M].clone(), g[M : M + M * p].reshape(M, p).clone(), g[M + M * p :].clone()
    clip = 0.5 * ng.norm().item()
    opt2 = NaturalGradientAdadelta([loc2, W2, u2], SoftplusTransform(), momentum=0.6, clip_norm=clip, cg_tol=1e-13)
    opt2.step()
    direction = 0.4 * ng * clip / ng.norm()
    new2 = torch.cat([loc2, W2.reshape(-1), u2]).detach()
    assert torch.allclose(new2, lam0 - _adadelta_first_step(direction, rho, eps), atol=1e-9)


def test_sg_mode_is_plain_adadelta():
    torch.manual_seed(4)
    params = [torch.randn(4, requires_grad=True), torch.randn(4, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ng_opt = NaturalGradientAdadelta(params, SoftplusTransform(), natural_gradient=False, momentum=0.0, clip_norm=None)
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
