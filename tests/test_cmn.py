"""Bilinear expressions (products of two latents) and the conditional mixture network."""

import pathlib
import sys

import pytest
import torch

import pyro
import pyro.distributions as dist
from conftest import fit

from pyro_cavi import CAVI
from pyro_cavi.cavi import expectations as ex
from pyro_cavi.cavi.symbolic import Bil, Sym, identity_lin

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import cmn  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


class _Blocks:
    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size


def test_bilinear_moments_against_monte_carlo():
    """E[psi] and E[psi²] for psi = [x, 1] @ [b, c]ᵀ + 0.3 sum(x), x and b independent Gaussians."""
    g = torch.Generator().manual_seed(0)
    N, H, J = 4, 3, 2
    x = Sym(torch.zeros(N, H), identity_lin("x", torch.Size([N, H]), 1, False, torch.float64, "cpu"))
    b = Sym(torch.zeros(J, H), identity_lin("b", torch.Size([J, H]), 1, False, torch.float64, "cpu"))
    c = torch.randn(J, 1, generator=g)
    psi = torch.cat([x, torch.ones(N, 1)], -1) @ torch.cat([b, c], -1).T + 0.3 * x.sum(-1, keepdim=True)
    assert isinstance(psi._expr, Bil) and psi.shape == (N, J)

    def moments(nb, ne):
        m = torch.randn(nb, ne, generator=g)
        a = torch.randn(nb, ne, ne, generator=g)
        return m, a @ a.mT + 0.1 * torch.eye(ne)

    mx, Cx = moments(N, H)
    mb, Cb = moments(J, H)
    mu = {"x": (mx, Cx + mx[..., None] * mx[..., None, :]), "b": (mb, Cb + mb[..., None] * mb[..., None, :])}
    factors = {"x": _Blocks(N, H), "b": _Blocks(J, H)}
    e1, e2 = ex.mean(psi, factors, mu), ex.second_moment(psi, factors, mu)
    S = 200_000
    xs = torch.distributions.MultivariateNormal(mx, Cx).sample((S,))
    bs = torch.distributions.MultivariateNormal(mb, Cb).sample((S,))
    vals = torch.cat([xs, torch.ones(S, N, 1)], -1) @ torch.cat([bs, c.expand(S, J, 1)], -1).mT + 0.3 * xs.sum(-1, keepdim=True)
    z1 = (e1 - vals.mean(0)) / (vals.std(0) / S ** 0.5)
    z2 = (e2 - (vals ** 2).mean(0)) / ((vals ** 2).std(0) / S ** 0.5)
    assert z1.abs().max() < 4.5 and z2.abs().max() < 4.5


def test_bilinear_regression_monotone_and_fixed_point():
    """y_n ~ N(u_n * v, 0.1) with local u_n and global v: the v update is a closed-form
    regression on E[u], E[u²] (checked against the formula written here)."""
    g = torch.Generator().manual_seed(1)
    n = 50
    y = 2.0 * torch.randn(n, generator=g) + 0.1 * torch.randn(n, generator=g)

    def model(y):
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(u * v, 0.1), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, y, num_steps=50, tol=0.0)
    with torch.no_grad():
        cavi._update("v")  # one more coordinate update of v given the current q(u)
    qu, qv = cavi.posterior["u"], cavi.posterior["v"]
    Eu, Eu2 = qu.mean, qu.variance + qu.mean ** 2
    prec = 1.0 + Eu2.sum() / 0.01
    assert float(qv.mean) == pytest.approx(float((Eu * y).sum() / 0.01 / prec), rel=1e-10)
    assert float(qv.variance) == pytest.approx(float(1 / prec), rel=1e-10)


def test_cmn_on_pinwheels_learns_and_elbo_never_decreases():
    X, y = cmn.pinwheels(60, seed=0)  # 300 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:], y[150:]
    cavi = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=5), seed=1, init="forgy")
    losses = fit(cavi, Xtr, ytr, num_steps=60, tol=1e-8)
    assert losses[-1] < losses[0]
    p = cmn.predict_proba(cavi, Xte, num_samples=100)
    assert torch.allclose(p.sum(-1), torch.ones(len(yte)))
    accuracy = (p.argmax(-1) == yte).double().mean()
    assert accuracy > 0.6  # chance is 0.2; this fit reaches about 0.77
    pb = cmn.predict_proba_bound(cavi, Xte)  # the authors' deterministic predictive
    assert torch.allclose(pb.sum(-1), torch.ones(len(yte)))
    assert (pb.argmax(-1) == yte).double().mean() > 0.6
    assert "x1: Gaussian factor" in repr(cavi) and "y.omega: PolyaGamma" in repr(cavi)


def test_cmn_normal_gamma_expert_updates_match_closed_form():
    """The paper's experts, A_kj | γ_kj ~ N(0, (λ0 γ_kj)⁻¹ I), γ_kj ~ Gamma(a0, b0), fitted
    mean-field: after a sweep, one more update of q(γ) and then of q(A) must equal the
    textbook formulas written here from the other factors' moments:
    a = a0 + (D+1)/2 + ½ Σ_n r_nk,  b = b0 + ½ λ0 E‖A_kj‖² + ½ Σ_n r_nk E[(x1_nj − A_kj·x̃_n)²];
    Λ_A = E[γ_kj] (λ0 I + Σ_n r_nk x̃_n x̃_nᵀ),  Λ_A m_A = E[γ_kj] Σ_n r_nk E[x1_nj] x̃_n."""
    X, y = cmn.pinwheels(12, seed=3)  # 60 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    K, lam0, a0, b0 = 3, 0.1, 2.0, 1.0
    model = lambda X, y: cmn.cmn(X, y, num_experts=K, expert_prior_prec=lam0, precision_shape=a0, precision_rate=b0)
    cavi = CAVI(model, seed=0, init="forgy")
    fit(cavi, X, y, num_steps=15, tol=0.0)
    Xt = torch.cat([X, torch.ones(len(X), 1)], -1)  # (N, D+1)
    q = cavi.posterior
    r = q["z"].probs  # (N, K)
    m1, C1 = q["x1"].mean, q["x1"].covariance_matrix  # (N, h), (N, h, h)
    Ex1sq = m1 ** 2 + torch.diagonal(C1, dim1=-2, dim2=-1)
    with torch.no_grad():
        cavi._update("prec")
    qA, qg = cavi.posterior["A"], cavi.posterior["prec"]
    mA, CA = qA.mean, qA.covariance_matrix  # (K, h, D+1), (K, h, D+1, D+1)
    EAA = CA + mA.unsqueeze(-1) * mA.unsqueeze(-2)
    # E[(x1_nj − a_kj·x̃_n)²] for every n, k, j
    cross = torch.einsum("nh,khd,nd->nkh", m1, mA, Xt)
    quad = torch.einsum("nd,khde,ne->nkh", Xt, EAA, Xt)
    resid = Ex1sq.unsqueeze(1) - 2 * cross + quad
    shape = a0 + Xt.shape[1] / 2 + 0.5 * r.sum(0).unsqueeze(-1).expand(K, mA.shape[1])
    rate = b0 + 0.5 * lam0 * torch.diagonal(EAA, dim1=-2, dim2=-1).sum(-1) + 0.5 * (r.unsqueeze(-1) * resid).sum(0)
    assert torch.allclose(qg.concentration, shape, rtol=1e-9)
    assert torch.allclose(qg.rate, rate, rtol=1e-9)
    with torch.no_grad():
        cavi._update("A")
    qA = cavi.posterior["A"]
    Eg = (shape / rate).unsqueeze(-1).unsqueeze(-1)  # (K, h, 1, 1)
    gram = torch.einsum("nk,nd,ne->kde", r, Xt, Xt).unsqueeze(1)  # (K, 1, D+1, D+1)
    prec = Eg * (lam0 * torch.eye(Xt.shape[1]) + gram)
    rhs = (shape / rate).unsqueeze(-1) * torch.einsum("nk,nj,nd->kjd", r, m1, Xt)
    assert torch.allclose(qA.precision_matrix, prec, rtol=1e-8)
    assert torch.allclose(qA.mean, torch.linalg.solve(prec, rhs.unsqueeze(-1)).squeeze(-1), rtol=1e-7, atol=1e-10)


def test_cmn_gating_and_assignment_updates_match_closed_form():
    """The stick-breaking gating with Pólya-Gamma augmentation, written out by hand from the
    other factors' moments (P(z_n >= j) = sum_{k >= j} r_nk, kappa_nj = r_nj - P(z_n >= j)/2):
    Λ_j = Σ0⁻¹ + Σ_n P(z_n >= j) E[ω_nj] x̃_n x̃_nᵀ,  Λ_j m_j = Σ0⁻¹ m0_j + Σ_n κ_nj x̃_n;
    log r_nk = Σ_{j <= k, j < K-1} [(1{j = k} − ½) E ψ_nj − ½ E ω_nj E ψ_nj² − log 2]
             + Σ_h [½ E log γ_kh − ½ log 2π − ½ E γ_kh E(x1_nh − A_kh·x̃_n)²] + const_n."""
    X, y = cmn.pinwheels(12, seed=3)  # 60 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    K, scale = 4, 5.0
    model = lambda X, y: cmn.cmn(X, y, num_experts=K, gate_scale=scale)
    cavi = CAVI(model, seed=0, init="forgy")
    fit(cavi, X, y, num_steps=15, tol=0.0)
    Xt = torch.cat([X, torch.ones(len(X), 1)], -1)  # (N, D+1)
    r = cavi.posterior["z"].probs  # (N, K)
    Eomega = cavi.factors["z.omega"].mean_params[0]  # (N, K-1)
    reach = r.flip(-1).cumsum(-1).flip(-1)[:, : K - 1]  # P(z_n >= j)
    kappa = r[:, : K - 1] - 0.5 * reach
    m0 = torch.zeros(K - 1, Xt.shape[1])
    m0[:, -1] = cmn.stick_uniform_bias(K)
    with torch.no_grad():
        cavi._update("gate")
    qG = cavi.posterior["gate"]
    prec = torch.eye(Xt.shape[1]) / scale**2 + torch.einsum("nj,nd,ne->jde", reach * Eomega, Xt, Xt)
    rhs = m0 / scale**2 + torch.einsum("nj,nd->jd", kappa, Xt)
    assert torch.allclose(qG.precision_matrix, prec, rtol=1e-9)
    assert torch.allclose(qG.mean, torch.linalg.solve(prec, rhs.unsqueeze(-1)).squeeze(-1), rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        cavi._update("z")
    Epsi = Xt @ qG.mean.T  # (N, K-1)
    EGG = qG.covariance_matrix + qG.mean.unsqueeze(-1) * qG.mean.unsqueeze(-2)
    Epsi2 = torch.einsum("nd,jde,ne->nj", Xt, EGG, Xt)
    stick = -0.5 * Eomega * Epsi2 - torch.log(torch.tensor(2.0))  # (N, K-1), common part
    gate_term = torch.zeros(len(X), K)
    for k in range(K):
        for j in range(min(k + 1, K - 1)):
            gate_term[:, k] += stick[:, j] + ((1.0 if j == k else 0.0) - 0.5) * Epsi[:, j]
    qx, qA, qg = cavi.posterior["x1"], cavi.posterior["A"], cavi.posterior["prec"]
    m1, Ex1sq = qx.mean, qx.mean**2 + torch.diagonal(qx.covariance_matrix, dim1=-2, dim2=-1)
    EAA = qA.covariance_matrix + qA.mean.unsqueeze(-1) * qA.mean.unsqueeze(-2)
    resid = (Ex1sq.unsqueeze(1) - 2 * torch.einsum("nh,khd,nd->nkh", m1, qA.mean, Xt)
             + torch.einsum("nd,khde,ne->nkh", Xt, EAA, Xt))
    Elog_g = torch.digamma(qg.concentration) - torch.log(qg.rate)
    expert_term = (0.5 * Elog_g - 0.5 * torch.log(torch.tensor(2 * torch.pi)) - 0.5 * qg.mean * resid).sum(-1)
    expected = torch.softmax(gate_term + expert_term, -1)
    assert torch.allclose(cavi.posterior["z"].probs, expected, rtol=1e-7, atol=1e-12)


def test_stick_bound_is_exact_without_variance_and_below_the_expected_log_prob():
    """The Pólya-Gamma bound per category: exact when the logits have no variance (c = |φ|),
    and with variance a lower bound on E[log p(k)] (checked by Monte Carlo)."""
    from pyro_cavi.distributions import StickBreakingCategorical

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(6, 4, generator=g)
    exact = StickBreakingCategorical(phi).log_probs
    assert torch.allclose(cmn._stick_bound_log_probs(phi, phi.abs()), exact, atol=1e-12)
    sd = 0.8 * torch.rand(6, 4, generator=g)
    psi = phi + sd * torch.randn((100_000, 6, 4), generator=g)
    expected = StickBreakingCategorical(psi).log_probs.mean(0)
    bound = cmn._stick_bound_log_probs(phi, (phi ** 2 + sd ** 2).sqrt())
    assert (bound <= expected + 1e-3).all() and (bound < expected - 1e-3).any()


def test_output_bound_is_a_tight_lower_bound_on_the_marginal_class_probability():
    """cmn._output_bound (the authors' smoothing through the output layer): for x1 ~ N(mu, 1/p)
    and nearly fixed output weights, each class's bound lies below the exact
    log ∫ p(y | x1) N(x1) dx1 (a fine quadrature written here) and within a few hundredths of it."""
    from pyro_cavi.distributions import StickBreakingCategorical

    mu = torch.tensor([[[-1.0], [0.3]], [[2.0], [0.0]]])  # (N=2, K=2, h=1)
    prec = torch.tensor([[4.0], [1.0]])  # (K, h)
    Bm = torch.tensor([[1.5, -0.2], [-0.7, 0.4]])  # 3 classes: 2 sticks over [x1, 1]
    BC = 1e-8 * torch.eye(2).expand(2, 2, 2)
    bound = cmn._output_bound(mu, prec, Bm, BC, iters=20)  # (2, 2, 3)
    grid = torch.linspace(-12, 12, 20001)
    dx = grid[1] - grid[0]
    logits = grid.unsqueeze(-1) * Bm[:, 0] + Bm[:, 1]  # (G, 2)
    log_lik = StickBreakingCategorical(logits).log_probs  # (G, 3)
    for n in range(2):
        for k in range(2):
            dens = torch.distributions.Normal(mu[n, k, 0], prec[k, 0].rsqrt()).log_prob(grid)
            exact = torch.logsumexp(log_lik + dens.unsqueeze(-1), 0) + dx.log()
            assert (bound[n, k] <= exact + 1e-6).all(), (bound[n, k], exact)
            assert (bound[n, k] >= exact - 0.05).all(), (bound[n, k], exact)


def _authors_engine(X, y, K, **kwargs):
    init = cmn.authors_init(num_classes=int(y.max()) + 1, **kwargs)
    cavi = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=K), seed=0, init=init,
                joint=[("A", "prec")] if kwargs.pop("joint_experts", False) else [])
    with torch.no_grad():
        cavi._prepare((X, y), {})
        cavi._ensure_initialised()
    return cavi


def test_cmn_authors_init_sets_their_start_and_updates_z_first():
    """init="authors" (VersesTech/cavi-cmn): before any sweep Γ and B sit at the prior mean with
    covariance 1e-2·I, the experts' rows have means in ±3/√(D+1) (not all equal), γ ~ Gamma(2, 1),
    A's covariance is I / E[γ]; and q(z) has been updated from these, with q(x1) still at its
    default N(0, I) (q(x1) is updated after it): log r_nk written out by hand as in the gating
    test above."""
    X, y = cmn.pinwheels(12, seed=3)  # 60 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    K, L = 4, 5
    cavi = _authors_engine(X, y, K)
    Xt = torch.cat([X, torch.ones(len(X), 1)], -1)
    D1 = Xt.shape[1]
    q = cavi.posterior
    gate_loc = torch.zeros(K - 1, D1)
    gate_loc[:, -1] = cmn.stick_uniform_bias(K)
    out_loc = torch.zeros(L - 1, L)
    out_loc[:, -1] = cmn.stick_uniform_bias(L)
    for site, loc in (("gate", gate_loc), ("out", out_loc)):
        assert torch.allclose(q[site].mean, loc, atol=1e-12)
        assert torch.allclose(q[site].covariance_matrix, 1e-2 * torch.eye(loc.shape[-1]).expand(loc.shape[:-1] + (loc.shape[-1],) * 2))
    mA = q["A"].mean
    assert mA.shape == (K, L - 1, D1) and mA.abs().max() <= 3 / D1 ** 0.5 and mA.std() > 0.3 / D1 ** 0.5
    assert torch.allclose(q["prec"].concentration, torch.full((K, L - 1), 2.0))
    assert torch.allclose(q["prec"].rate, torch.ones(K, L - 1))
    assert torch.allclose(q["A"].covariance_matrix, 0.5 * torch.eye(D1).expand(K, L - 1, D1, D1))
    # q(z) from these parameters, the Pólya-Gamma factor refitted first at the default (uniform)
    # q(z): E[ω_nj] = tanh(c/2)/(2c), c² = P(z_n >= j) E[ψ_nj²]
    Epsi = Xt @ gate_loc.T
    Epsi2 = Epsi ** 2 + 1e-2 * (Xt ** 2).sum(-1, keepdim=True)
    pg_mean = lambda c: torch.tanh(c / 2) / (2 * c)
    Eomega = pg_mean((Epsi2 * (K - torch.arange(K - 1.0)) / K).sqrt())
    gate_term = torch.zeros(len(X), K)
    for k in range(K):
        for j in range(min(k + 1, K - 1)):
            gate_term[:, k] += -0.5 * Eomega[:, j] * Epsi2[:, j] - torch.log(torch.tensor(2.0)) \
                + ((1.0 if j == k else 0.0) - 0.5) * Epsi[:, j]
    EAA = 0.5 * torch.eye(D1) + mA.unsqueeze(-1) * mA.unsqueeze(-2)
    resid = 1.0 + torch.einsum("nd,khde,ne->nkh", Xt, EAA, Xt)  # E(x1 − A x̃)² with x1 ~ N(0, 1)
    expert_term = (0.5 * (torch.digamma(torch.tensor(2.0))) - torch.log(torch.tensor(2 * torch.pi)) / 2 - resid).sum(-1)
    r = q["z"].probs
    assert torch.allclose(r, torch.softmax(gate_term + expert_term, -1), rtol=1e-7, atol=1e-12)
    # and refitted again, at the new q(z), before q(x1)
    reach = r.flip(-1).cumsum(-1).flip(-1)[:, : K - 1]
    assert torch.allclose(cavi.factors["z.omega"].mean_params[0], pg_mean((reach * Epsi2).sqrt()), rtol=1e-9)


def test_cmn_authors_init_joint_experts_and_bad_input():
    X, y = cmn.pinwheels(8, seed=1)
    X = (X - X.mean(0)) / X.std(0)
    cavi = _authors_engine(X, y, 3, joint_experts=True)
    f = cavi.factors["A+prec"]  # Normal-Gamma: V = I, a = 2, b = 1
    assert torch.allclose(f.scale_tril, torch.eye(3).expand(12, 3, 3)) and torch.allclose(f.concentration, torch.full((12,), 2.0))
    assert torch.allclose(f.rate, torch.ones(12)) and f.loc.abs().max() <= 3 / 3 ** 0.5
    with pytest.raises(ValueError, match="init must be 'forgy' or 'authors'"):
        cmn.fit_cavi(X, y, num_experts=3, init="kmeans")
    with pytest.raises(ValueError, match="'w', which is not a factor"):
        fit(CAVI(lambda X, y: cmn.cmn(X, y, num_experts=3), init=lambda cavi, gen: ["w"]), X, y, num_steps=1)
    with pytest.raises(ValueError, match="a callable init"):
        CAVI(lambda X, y: cmn.cmn(X, y), init="random")


def test_cmn_authors_init_elbo_never_decreases_and_learns():
    X, y = cmn.pinwheels(60, seed=0)  # 300 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:], y[150:]
    cavi = _authors_engine(Xtr, ytr, 5)
    start = -cavi.evaluate_loss(Xtr, ytr)
    losses = fit(cavi, Xtr, ytr, num_steps=60, tol=1e-8)
    assert -losses[0] >= start
    p = cmn.predict_proba(cavi, Xte, num_samples=100)
    assert (p.argmax(-1) == yte).double().mean() > 0.6  # chance is 0.2


def _stick_breaking_log_probs(psi):
    """log p(category c) = Σ_{j<c} log σ(−ψ_j) + log σ(ψ_c) (no stop term for the last category),
    written out here independently of pyro_cavi.distributions."""
    go = torch.nn.functional.logsigmoid(-psi)
    stop = torch.nn.functional.logsigmoid(psi)
    passed = torch.cat([torch.zeros_like(go[..., :1]), go.cumsum(-1)], -1)
    return passed + torch.cat([stop, torch.zeros_like(stop[..., :1])], -1)


def test_cmn_nuts_potential_is_the_log_joint_with_z_summed_out():
    """The potential energy NUTS runs on (Pyro's initialize_model on cmn with z enumerated,
    started by init_outside_enumeration) equals the negative log joint written out here:
    log p(Γ) + log p(γ) + log p(A | γ) + log p(B) + Σ_n log Σ_k π_k(x_n) N(x1_n | A_k x̃_n, γ_k⁻¹)
    + Σ_n log SB(y_n | B [x1_n, 1]) + Σ log γ (the Jacobian of γ = exp(u)); x1 has one value per
    datum (N, h), not one per expert."""
    from pyro.infer import config_enumerate
    from pyro.infer.mcmc.util import initialize_model

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.cmn_baselines import init_outside_enumeration

    X, y = cmn.pinwheels(4, seed=2)  # 20 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    N, K, L = len(y), 3, 5
    h, D1 = L - 1, X.shape[1] + 1
    model = config_enumerate(lambda X, y: cmn.cmn(X, y, num_experts=K))
    params, potential, _, _ = initialize_model(model, (X, y), max_plate_nesting=2, init_strategy=init_outside_enumeration())
    assert params["x1"].shape == (N, h) and params["A"].shape == (K, h, D1) and params["prec"].shape == (K, h)
    g = torch.Generator().manual_seed(0)
    z = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    gate, A, u, out, x1 = z["gate"], z["A"], z["prec"], z["out"], z["x1"]
    prec = u.exp()
    Normal, Gamma = torch.distributions.Normal, torch.distributions.Gamma
    gate_loc = torch.zeros(K - 1, D1)
    gate_loc[:, -1] = -torch.log(torch.arange(K - 1, 0, -1.0))
    out_loc = torch.zeros(L - 1, h + 1)
    out_loc[:, -1] = -torch.log(torch.arange(L - 1, 0, -1.0))
    Xt = torch.cat([X, torch.ones(N, 1)], -1)
    log_joint = (Normal(gate_loc, 5.0).log_prob(gate).sum() + Gamma(2.0, 1.0).log_prob(prec).sum() + u.sum()
                 + Normal(0.0, (0.1 * prec).rsqrt().unsqueeze(-1)).log_prob(A).sum()
                 + Normal(out_loc, 5.0).log_prob(out).sum())
    log_gate = _stick_breaking_log_probs(Xt @ gate.T)  # (N, K)
    log_expert = Normal(torch.einsum("khd,nd->nkh", A, Xt), prec.rsqrt()).log_prob(x1.unsqueeze(1)).sum(-1)  # (N, K)
    log_joint = log_joint + torch.logsumexp(log_gate + log_expert, -1).sum()
    log_y = _stick_breaking_log_probs(torch.cat([x1, torch.ones(N, 1)], -1) @ out.T)
    log_joint = log_joint + log_y[torch.arange(N), y].sum()
    assert float(potential(z)) == pytest.approx(-float(log_joint), rel=1e-10)


def test_cmn_under_nuts_separates_a_toy_set_and_agrees_with_cavi():
    """models/cmn.py:cmn under Pyro's NUTS (z enumerated, one short seeded chain) on two
    well-separated Gaussian blobs (30 training points, K = 2 experts): the posterior predictive
    from the NUTS draws classifies 100 held-out points with accuracy ≥ 0.95 (the Bayes error is
    about 0.001; a chain stuck at the prior would score about 0.5) and agrees with the CAVI fit's
    predictive on them: mean |p_NUTS(y = 1 | x) − p_CAVI(y = 1 | x)| < 0.08 (0.013-0.048 over
    chain seeds 0-5 in development; ≈ 0.5 between a fit and the prior predictive)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.cmn_baselines import fit_nuts, nuts_predict_proba

    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat(65)
    X = 0.7 * torch.randn(len(y), 2, generator=g) + 1.5 * (2 * y - 1).unsqueeze(-1)
    Xtr, ytr, Xte, yte = X[:30], y[:30], X[30:], y[30:]
    fit = fit_nuts(Xtr, ytr, num_experts=2, num_warmup=40, num_samples=40, max_tree_depth=5, seed=0)
    assert fit.samples["x1"].shape == (40, 30, 1) and fit.samples["A"].shape == (40, 2, 1, 3)
    assert fit.num_grads > 80  # at least one leapfrog step per iteration
    p = nuts_predict_proba(fit, Xte)
    assert torch.allclose(p.sum(-1), torch.ones(len(yte)))
    assert (p.argmax(-1) == yte).double().mean() >= 0.95
    cavi = cmn.fit_cavi(Xtr, ytr, num_experts=2, num_steps=200, seed=0)
    p_cavi = cmn.predict_proba(cavi, Xte, num_samples=200)
    assert (p[:, 1] - p_cavi[:, 1]).abs().mean() < 0.08


@pytest.mark.parametrize(
    "kwargs, labels, message",
    [
        ({"num_experts": 1}, None, r"num_experts must be an int >= 2 .* got 1"),
        ({"num_experts": 0}, None, r"num_experts must be an int >= 2 .* got 0"),
        ({"num_experts": 3}, "zeros", r"at least 2 classes .* got num_classes=1 \(inferred from y\.max\(\) \+ 1\)"),
        ({"num_experts": 3, "num_classes": 1}, "zeros", r"at least 2 classes .* got num_classes=1\n"),
        ({"num_experts": 3, "hidden": 0}, None, r"hidden must be None or an int >= 1, got 0"),
    ],
)
def test_cmn_refuses_degenerate_sizes(kwargs, labels, message):
    # before: a ZeroDivisionError from a plate of size 0, or hidden=0 silently read as L - 1
    X, y = cmn.pinwheels(4, num_classes=3)
    y = torch.zeros_like(y) if labels == "zeros" else y
    with pytest.raises(ValueError, match=message):
        cmn.fit_cavi(X, y, num_steps=2, **kwargs)


def test_ensemble_predictive_is_the_equal_weight_mixture_of_the_restarts():
    """``predict_proba(..., ensemble=True)`` averages every restart's own predictive: it equals
    the mean of the restarts' predictives drawn with the same random numbers, so by concavity of
    the log its log density of each test point is at least the restarts' average; an engine
    fitted without restarts is refused."""
    X, y = cmn.pinwheels(40, seed=2)
    X = (X - X.mean(0)) / X.std(0)
    Xtr, ytr, Xte, yte = X[:120], y[:120], X[120:], y[120:]
    cavi = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=4), seed=0, num_restarts=3)
    cavi.run(Xtr, ytr, num_steps=15, tol=0.0, progress=False)
    pyro.set_rng_seed(5)
    ens = cmn.predict_proba(cavi, Xte, num_samples=30, ensemble=True)
    pyro.set_rng_seed(5)
    each = torch.stack([cmn.predict_proba(fit, Xte, num_samples=30) for fit in cavi.restart_fits()])
    assert len({round(float(p.max()), 6) for p in each}) == 3  # three different fits
    assert torch.allclose(ens, each.mean(0), rtol=1e-6, atol=1e-7)
    assert torch.allclose(ens.sum(-1), torch.ones(len(yte)))
    rows = torch.arange(len(yte))
    assert (ens[rows, yte].log() >= each[:, rows, yte].log().mean(0) - 1e-6).all()
    single = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=4), seed=0)
    single.run(Xtr, ytr, num_steps=2, progress=False)
    with pytest.raises(RuntimeError, match="num_restarts > 1"):
        cmn.predict_proba(single, Xte, ensemble=True)
