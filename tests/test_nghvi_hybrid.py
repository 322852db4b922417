"""
The hybrid ELBO and NG-HVI end to end: the loss is the marginal ELBO, its gradient is Fisher's
identity, and NG-HVI's posterior means of beta in the linear random-intercept model match an
exact Gibbs sampler written here.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Predictive
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal

from models.mixed import linear_random_intercept, logistic_random_intercept, simulate_linear_random_intercept
from pyro_cavi.nghvi import HybridELBO, HybridGuide, NGHVIOptim, PolyaGammaGibbs, SGHVIOptim


def _data(num_groups, group_size=10, sigma2_a=1.0, seed=0):
    train, test = simulate_linear_random_intercept(num_groups=num_groups, group_size=group_size, sigma2_a=sigma2_a, seed=seed)
    return train, (train["X"], train["group"], train["num_groups"], train["y"])


def _log_marginal(X, group, G, y, beta, sigma2_a, sigma2_e):
    """log p(y, theta) with alpha integrated out: y_i ~ N(X_i beta, sigma2_e I + sigma2_a 1 1^T) (equal group sizes)."""
    n = X.shape[0] // G
    resid = (y - X @ beta).reshape(G, n)
    cov = sigma2_e * torch.eye(n) + sigma2_a * torch.ones(n, n)
    log_lik = dist.MultivariateNormal(torch.zeros(n), cov).log_prob(resid).sum()
    log_prior = (
        dist.Normal(0.0, 10.0).log_prob(beta).sum()
        + dist.InverseGamma(1.01, 1.01).log_prob(sigma2_a)
        + dist.InverseGamma(1.01, 1.01).log_prob(sigma2_e)
    )
    return log_lik + log_prior


def test_loss_is_the_marginal_elbo_for_every_draw():
    pyro.clear_param_store()
    _, args = _data(num_groups=20)
    guide = HybridGuide(linear_random_intercept, "alpha", rank=2)
    elbo = HybridELBO(guide.conditional)
    elbo.loss(linear_random_intercept, guide, *args)  # initialise the guide's parameters
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss = elbo.loss(linear_random_intercept, guide, *args)
        pyro.set_rng_seed(seed)
        guide_trace = poutine.trace(guide.global_guide).get_trace(*args)
        theta = {k: guide_trace.nodes[k]["value"] for k in ("beta", "sigma2_a", "sigma2_e")}
        expected = _log_marginal(*args, **theta) - guide_trace.log_prob_sum()
        assert loss == pytest.approx(-expected.item(), rel=1e-4)


def test_gradient_is_fishers_identity():
    """With a point-mass guide, E_z[grad log p(y, z, theta)] equals grad log p(y, theta)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    _, args = _data(num_groups=15)
    global_guide = AutoDelta(poutine.block(linear_random_intercept, hide=["alpha"]))
    guide = HybridGuide(linear_random_intercept, "alpha", global_guide=global_guide)
    elbo = HybridELBO(guide.conditional)
    elbo.loss(linear_random_intercept, guide, *args)  # create the parameters
    names = ["AutoDelta.beta", "AutoDelta.sigma2_a", "AutoDelta.sigma2_e"]
    unconstrained = [pyro.get_param_store()._params[n] for n in names]
    draws = []
    for _ in range(300):
        loss = elbo.differentiable_loss(linear_random_intercept, guide, *args)
        grads = torch.autograd.grad(loss, unconstrained)
        draws.append(torch.cat([g.reshape(-1) for g in grads]))
    draws = torch.stack(draws)
    theta = [pyro.param(n) for n in names]
    exact = torch.autograd.grad(-_log_marginal(*args, *theta), unconstrained)
    exact = torch.cat([g.reshape(-1) for g in exact])
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() <= 4 * se + 1e-3 * exact.abs()).all()


def _gibbs_linear_random_intercept(X, group, G, y, num_samples, burn_in, seed=0):
    """Exact blocked Gibbs sampler for Example 1 (beta | rest, alpha | rest, variances | rest)."""
    g = torch.Generator().manual_seed(seed)
    X, y = X.double(), y.double()
    n, k = X.shape
    n_i = torch.bincount(group, minlength=G).double()
    XtX = X.T @ X
    beta, alpha, s2a, s2e = torch.zeros(k, dtype=torch.float64), torch.zeros(G, dtype=torch.float64), 1.0, 1.0
    out = []
    for it in range(num_samples + burn_in):
        prec = XtX / s2e + torch.eye(k, dtype=torch.float64) / 100.0
        chol = torch.linalg.cholesky(prec)
        mean = torch.cholesky_solve((X.T @ (y - alpha[group]) / s2e).unsqueeze(-1), chol).squeeze(-1)
        beta = mean + torch.linalg.solve_triangular(chol.T, torch.randn(k, 1, dtype=torch.float64, generator=g), upper=True).squeeze(-1)
        resid = y - X @ beta
        var = 1.0 / (n_i / s2e + 1.0 / s2a)
        alpha = var * torch.zeros(G, dtype=torch.float64).index_add_(0, group, resid) / s2e
        alpha = alpha + var.sqrt() * torch.randn(G, dtype=torch.float64, generator=g)
        s2a = 1.0 / torch._standard_gamma(torch.tensor(1.01 + G / 2, dtype=torch.float64)).item() * (1.01 + 0.5 * alpha.pow(2).sum().item())
        ssr = (resid - alpha[group]).pow(2).sum().item()
        s2e = 1.0 / torch._standard_gamma(torch.tensor(1.01 + n / 2, dtype=torch.float64)).item() * (1.01 + 0.5 * ssr)
        if it >= burn_in:
            out.append(beta)
    return torch.stack(out)


def _fit_nghvi(args, num_steps, average_last, optim=None, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = HybridGuide(linear_random_intercept, "alpha", rank=3)
    svi = SVI(linear_random_intercept, guide, optim or NGHVIOptim(), HybridELBO(guide.conditional))
    locs, losses = [], []
    for step in range(num_steps):
        with pyro.validation_enabled(False):
            losses.append(svi.step(*args))
        if step >= num_steps - average_last:
            locs.append(guide.global_guide.loc.detach().clone())
    return guide, torch.stack(locs).mean(0), losses


def _check_beta_against_gibbs(num_groups, num_steps, gibbs_samples, tol_sd):
    train, args = _data(num_groups=num_groups)
    guide, loc, _ = _fit_nghvi(args, num_steps, average_last=num_steps // 4)
    beta_vi = loc[:6]  # beta is the first (unconstrained = constrained) block of the latent vector
    samples = _gibbs_linear_random_intercept(*args, num_samples=gibbs_samples, burn_in=500)
    mean, sd = samples.mean(0).float(), samples.std(0).float()
    # Monte Carlo error of the Gibbs mean (batch means) plus a fraction of the posterior sd
    batches = samples.reshape(20, -1, 6).mean(1)
    mcse = (batches.std(0) / math.sqrt(20)).float()
    assert ((beta_vi - mean).abs() <= 4 * mcse + tol_sd * sd).all(), (beta_vi, mean, sd, mcse)
    # the factor-covariance Gaussian's marginal sds are close to the exact posterior sds
    sd_vi = guide.global_guide.get_posterior().stddev.detach()[:6]
    ratio = sd_vi / sd
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def test_nghvi_beta_matches_gibbs_small():
    _check_beta_against_gibbs(num_groups=60, num_steps=1200, gibbs_samples=3000, tol_sd=0.15)


@pytest.mark.slow
def test_nghvi_beta_matches_gibbs_example1():
    _check_beta_against_gibbs(num_groups=1000, num_steps=4000, gibbs_samples=10000, tol_sd=0.1)


def test_hybrid_guide_predictive_draws_locals_from_conditional():
    train, args = _data(num_groups=40, sigma2_a=10.0)
    guide, _, _ = _fit_nghvi(args, num_steps=150, average_last=1)
    samples = Predictive(linear_random_intercept, guide=guide, num_samples=50, return_sites=["alpha", "beta", "sigma2_a"])(
        *args
    )
    assert samples["alpha"].shape == (50, 40) and samples["beta"].reshape(50, -1).shape == (50, 6)
    # conditional draws track the true random effects (the prior would be uncorrelated with them)
    corr = torch.corrcoef(torch.stack([samples["alpha"].mean(0), train["alpha"]]))[0, 1]
    assert corr > 0.9


def test_to_inference_data_exports_theta_locals_and_pointwise_log_likelihood():
    from pyro_cavi import to_inference_data

    train, args = _data(num_groups=30, sigma2_a=10.0)
    guide, _, _ = _fit_nghvi(args, num_steps=150, average_last=1)
    idata = to_inference_data(guide, linear_random_intercept, *args, num_samples=40)
    post = idata.posterior
    assert post["alpha"].shape == (1, 40, 30) and post["sigma2_e"].shape == (1, 40)
    assert idata.log_likelihood["y"].shape == (1, 40, 150)
    # locals come from the exact conditional given the data: they track the true effects and vary across draws
    alpha = torch.as_tensor(post["alpha"].values[0])
    assert torch.corrcoef(torch.stack([alpha.mean(0), train["alpha"]]))[0, 1] > 0.9
    assert (alpha.std(0) > 0.05).all()
    # pointwise log likelihood is that of N(X beta + alpha[group], sigma2_e) at each draw
    beta = torch.as_tensor(post["beta"].values[0]).reshape(40, 6)
    s2e = torch.as_tensor(post["sigma2_e"].values[0])
    X, group, _, y = args
    expected = dist.Normal(beta @ X.T + alpha[:, group], s2e.sqrt().unsqueeze(-1)).log_prob(y)
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["y"].values[0]), expected, atol=1e-4)


def test_hybrid_guide_refuses_vectorised_draws():
    _, args = _data(num_groups=10)
    guide, _, _ = _fit_nghvi(args, num_steps=5, average_last=1)
    with pytest.raises(ValueError, match="one theta at a time"):
        Predictive(linear_random_intercept, guide=guide, num_samples=4, parallel=True)(*args)


def test_logistic_random_intercept_runs_with_polya_gamma():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    from models.mixed import simulate_logistic_random_intercept

    train, _ = simulate_logistic_random_intercept(num_groups=50, sigma2_a=1.0)
    args = (train["X"], train["group"], train["num_groups"], train["y"])
    guide = HybridGuide(logistic_random_intercept, PolyaGammaGibbs("alpha"), rank=2)
    svi = SVI(logistic_random_intercept, guide, NGHVIOptim(), HybridELBO(guide.conditional))
    with pytest.warns(UserWarning, match="no log_prob"):
        svi.step(*args)
    with pyro.validation_enabled(False):
        for _ in range(300):
            svi.step(*args)
    beta = guide.global_guide.loc.detach()[:6]
    # 250 Bernoulli rows: the slopes' signs are identified
    assert (torch.sign(beta[1:5]) == torch.sign(torch.tensor([-1.3250, 0.9909, 1.6823, -1.7564]))).all()


def test_hybrid_elbo_rejects_local_site_in_guide_and_uncovered_latents():
    pyro.clear_param_store()
    _, args = _data(num_groups=5)
    with pytest.raises(ValueError, match="local site 'alpha' is drawn from its exact conditional"):
        HybridELBO("alpha").loss(linear_random_intercept, AutoNormal(linear_random_intercept), *args)
    partial = AutoLowRankMultivariateNormal(poutine.block(linear_random_intercept, hide=["alpha", "sigma2_e"]))
    with pytest.raises(ValueError, match="latent site 'sigma2_e'"):
        HybridELBO("alpha").loss(linear_random_intercept, partial, *args)
    with pytest.raises(TypeError, match="conditional sampler"):
        HybridELBO(3)


def test_named_guides_keep_separate_parameters():
    pyro.clear_param_store()
    _, args = _data(num_groups=10)
    optim = NGHVIOptim()
    guides = [HybridGuide(linear_random_intercept, "alpha", name=n) for n in ("first", "second")]
    svi = [SVI(linear_random_intercept, g, optim, HybridELBO(g.conditional)) for g in guides]
    svi[0].step(*args)
    svi[0].step(*args)
    svi[1].step(*args)
    store = pyro.get_param_store()
    assert {"first.loc", "second.loc"} <= set(store.keys())
    assert not torch.equal(pyro.param("first.loc"), pyro.param("second.loc"))
    kinds = sorted(store.param_name(k) for k, v in optim.optim_objs.items() if type(v).__name__ == "NaturalGradientAdadelta")
    assert kinds == ["first.loc", "second.loc"]
    with pytest.raises(ValueError, match="non-empty string"):
        HybridGuide(linear_random_intercept, "alpha", name="")


def test_sg_hvi_optimiser_has_no_natural_gradient():
    optim = SGHVIOptim()
    assert optim.pt_optim_args["natural_gradient"] is False
    assert optim.pt_optim_args["clip_norm"] is None and optim.pt_optim_args["momentum"] == 0.0


def _gaussian_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(theta, 0.5).to_event(1), obs=torch.tensor([1.0, 2.0, 3.0]))


class _PriorDraw:
    """A conditional sampler for the model above (z is independent of everything)."""

    sites = ("z",)

    def __call__(self, model, theta, *args, **kwargs):
        return {"z": torch.randn(())}


def _gaussian_guide_at(loc, sd, cov_factor_scale=0.0, rank=1):
    guide = AutoLowRankMultivariateNormal(poutine.block(_gaussian_model, hide=["z"]), rank=rank)
    guide()
    with torch.no_grad():
        guide.loc.copy_(loc)
        guide.cov_factor.fill_(cov_factor_scale)
        guide.scale_unconstrained.copy_(torch.log(torch.expm1(sd)))
    return guide


def _grads(guide, path_gradient, seed, covariance_gradient="reparameterization"):
    pyro.set_rng_seed(seed)
    for p in (guide.loc, guide.cov_factor, guide.scale_unconstrained):
        p.grad = None
    loss = HybridELBO(_PriorDraw(), path_gradient=path_gradient, covariance_gradient=covariance_gradient)
    loss.differentiable_loss(_gaussian_model, guide).backward()
    return torch.cat([guide.loc.grad, guide.cov_factor.grad.reshape(-1), guide.scale_unconstrained.grad])


def test_path_gradient_vanishes_at_the_exact_gaussian_posterior():
    """theta | y ~ N(0.8 y, 0.2 I): with q equal to it, every draw's path gradient is zero
    (Roeder et al. 2017), while the total derivative is not."""
    pyro.clear_param_store()
    guide = _gaussian_guide_at(torch.tensor([0.8, 1.6, 2.4]), torch.full((3,), 0.2**0.5))
    for seed in range(3):
        assert _grads(guide, True, seed).abs().max() < 1e-5
    assert _grads(guide, False, 0).abs().max() > 1e-2


def test_path_gradient_is_unbiased():
    """Away from the optimum the three estimators (total derivative, path derivative, path
    derivative with the Stein covariance gradient) average to the gradient of the closed-form ELBO."""
    pyro.clear_param_store()
    loc0, sd0 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.3])
    guide = _gaussian_guide_at(loc0, sd0, cov_factor_scale=0.2)

    def closed_form(loc, W, u):
        s = torch.nn.functional.softplus(u)
        cov = torch.diag(s) @ (W @ W.T + torch.eye(3)) @ torch.diag(s)
        y = torch.tensor([1.0, 2.0, 3.0])
        # E_q log N(y; theta, 0.25 I) + E_q log N(theta; 0, I) + H(q)
        e_lik = dist.Normal(loc, 0.5).log_prob(y).sum() - 0.5 * cov.diagonal().sum() / 0.25
        e_prior = dist.Normal(0.0, 1.0).log_prob(loc).sum() - 0.5 * cov.diagonal().sum()
        return -(e_lik + e_prior + dist.MultivariateNormal(loc, cov).entropy())

    params = [guide.loc.detach().clone().requires_grad_(), guide.cov_factor.detach().clone().requires_grad_(),
              guide.scale_unconstrained.detach().clone().requires_grad_()]
    closed_form(*params).backward()
    exact = torch.cat([params[0].grad, params[1].grad.reshape(-1), params[2].grad])
    for path_gradient, estimator in ((True, "reparameterization"), (False, "reparameterization"), (True, "stein")):
        draws = torch.stack([_grads(guide, path_gradient, seed, estimator) for seed in range(1500)])
        mean, se = draws.mean(0), draws.std(0) / 1500**0.5
        assert ((mean - exact).abs() <= 4 * se + 1e-4).all(), (path_gradient, estimator, mean, exact, se)


def test_hybrid_guide_starts_where_the_authors_code_starts():
    pyro.clear_param_store()
    _, args = _data(num_groups=5)
    guide = HybridGuide(linear_random_intercept, "alpha", rank=3)
    guide(*args)
    g = guide.global_guide
    assert isinstance(g, AutoLowRankMultivariateNormal)
    assert torch.allclose(g.scale, torch.ones(8))
    expected = torch.full((8, 3), 0.01).tril()
    assert torch.allclose(g.scale.unsqueeze(-1) * g.cov_factor, expected)
    assert sorted(pyro.get_param_store().keys()) == [
        "AutoLowRankMultivariateNormal.cov_factor", "AutoLowRankMultivariateNormal.loc", "AutoLowRankMultivariateNormal.scale"
    ]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro_default = HybridGuide(linear_random_intercept, "alpha", rank=3, init_scale=None)
    pyro_default(*args)
    assert torch.allclose(pyro_default.global_guide.scale, torch.full((8,), 0.1 * 0.5**0.5))
    with pytest.raises(ValueError, match="init_scale"):
        HybridGuide(linear_random_intercept, "alpha", init_scale=-1.0)
    with pytest.raises(TypeError, match="path_gradient"):
        HybridELBO("alpha", path_gradient="yes")


def _paper_gradient(guide):
    """The guide's gradient pulled into the paper's (B, d) (B = diag(s) W, d = s), as NGHVIOptim does."""
    s = guide.scale.detach()
    t = torch.sigmoid(guide.scale_unconstrained.detach())  # ds/du for the softplus constraint
    g_W, g_u, W = guide.cov_factor.grad, guide.scale_unconstrained.grad, guide.cov_factor.detach()
    return g_W / s[:, None], g_u / t - (g_W * W).sum(-1) / s


def _sigma_jacobian(B, d):
    """d vech(Sigma) / d (vec B, d) of Sigma = B B^T + diag(d)^2, in float64."""
    M, p = B.shape
    iu = torch.triu_indices(M, M)

    def vech(x):
        B_, d_ = x[: M * p].reshape(M, p), x[M * p :]
        S = B_ @ B_.T + torch.diag(d_ * d_)
        return S[iu[0], iu[1]]

    return torch.autograd.functional.jacobian(vech, torch.cat([B.reshape(-1), d]).double())


def test_stein_covariance_gradient_has_no_part_that_leaves_sigma_unchanged():
    """With p = dim theta = 3, twelve (B, d) describe six entries of Sigma: (B, d) -> Sigma has a
    six-dimensional null space.  The exact gradient has no component in it (the ELBO depends on
    Sigma only); the reparameterisation estimate has, pure noise there; the Stein estimate has
    none, draw by draw."""
    pyro.clear_param_store()
    guide = _gaussian_guide_at(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.3]), cov_factor_scale=0.4, rank=3)
    with torch.no_grad():
        guide.cov_factor.add_(0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    B = (guide.scale[:, None] * guide.cov_factor).detach()
    J = _sigma_jacobian(B, guide.scale.detach())
    _, sv, vt = torch.linalg.svd(J)
    null = vt[int((sv > 1e-10 * sv[0]).sum()) :]
    assert null.shape[0] == 6
    for seed in range(3):
        fractions = {}
        for estimator in ("reparameterization", "stein"):
            _grads(guide, True, seed, estimator)
            g_B, g_d = _paper_gradient(guide)
            g = torch.cat([g_B.reshape(-1), g_d]).double()
            fractions[estimator] = float((null @ g).norm() / g.norm())
        assert fractions["stein"] < 1e-5, fractions
        assert fractions["reparameterization"] > 1e-2, fractions


def test_stein_gradient_of_d_vanishes_with_d():
    """Sigma depends on d_i only through d_i^2, so the exact gradient in d_i is 2 d_i dELBO/dSigma_ii
    -> 0 as d_i -> 0 (where the Fisher information of d_i vanishes too).  With d_0 = 1e-4 and the
    variance of theta_0 carried by B, the reparameterisation estimate g_0 eps_0 stays of order one;
    the Stein estimate is of order d_0."""
    pyro.clear_param_store()
    d0 = 1e-4
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # W_0 = B_0 / d_0 = 5000: the chain rule to d needs float64
    try:
        guide = _gaussian_guide_at(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([d0, 1.0, 0.3]), cov_factor_scale=0.2)
        with torch.no_grad():
            guide.cov_factor[0] = 0.5 / d0  # B_0 = 0.5
        reparameterization, stein = [], []
        for seed in range(20):
            _grads(guide, True, seed, "reparameterization")
            reparameterization.append(abs(float(_paper_gradient(guide)[1][0])))
            _grads(guide, True, seed, "stein")
            stein.append(abs(float(_paper_gradient(guide)[1][0])))
    finally:
        torch.set_default_dtype(default_dtype)
    assert sum(reparameterization) / 20 > 0.1, reparameterization
    assert max(stein) < 100 * d0, stein


def test_stein_covariance_gradient_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="path_gradient=True"):
        HybridELBO("alpha", path_gradient=False, covariance_gradient="stein")
    with pytest.raises(ValueError, match="covariance_gradient"):
        HybridELBO("alpha", covariance_gradient="price")
    pyro.clear_param_store()
    guide = AutoNormal(poutine.block(_gaussian_model, hide=["z"]))
    with pytest.raises(ValueError, match="one Gaussian draw.*AutoNormal"):
        HybridELBO(_PriorDraw(), covariance_gradient="stein").differentiable_loss(_gaussian_model, guide)


def test_nghvi_with_stein_gradient_converges_with_as_many_factors_as_parameters():
    """NG-HVI in the paper's coordinates with p = dim theta = 8 (B lower triangular can carry all
    of Sigma; (B, d) -> Sigma has an eight-dimensional null space) on a Gaussian target: with the
    Stein covariance gradient the smoothed ELBO stays within a nat of its maximum 0 after step 500
    and q recovers the target.  (With the reparameterisation gradient the same run makes large
    excursions below 0, which is not asserted: how large depends on the draws; the rank table in
    benchmarks/results/nghvi.md measures the same on the linear model.)"""
    M = 8
    A = torch.randn(M, M, generator=torch.Generator().manual_seed(1))
    precision = A @ A.T * 50 + 100 * torch.eye(M)
    cov = torch.linalg.inv(precision)

    def model():
        pyro.sample("theta", dist.MultivariateNormal(torch.zeros(M), covariance_matrix=cov))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    class Prior(_PriorDraw):
        def log_prob(self, model, theta, z, *args, **kwargs):
            return dist.Normal(0.0, 1.0).log_prob(z["z"])

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = HybridGuide(model, Prior(), rank=M)
    svi = SVI(model, guide, NGHVIOptim(), HybridELBO(guide.conditional, covariance_gradient="stein"))
    elbos = torch.tensor([-svi.step() for _ in range(1500)])
    smoothed = elbos.unfold(0, 100, 1).mean(-1)
    assert smoothed[400:].min() > -1.0, smoothed[400:].min()
    q = guide.global_guide.get_posterior()
    sd = cov.diagonal().sqrt()
    assert (q.loc.detach() / sd).abs().max() < 1e-2
    assert ((q.covariance_matrix.detach() - cov) / sd[:, None] / sd).abs().max() < 1e-2


def test_stein_gradient_with_a_full_covariance_guide_is_unbiased():
    """AutoMultivariateNormal (Sigma = L L^T): the Stein estimate averages to the gradient of the
    closed-form ELBO of the Gaussian model above."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(poutine.block(_gaussian_model, hide=["z"]), init_scale=0.5)
    guide()
    with torch.no_grad():
        guide.loc.copy_(torch.tensor([0.0, 1.0, -1.0]))
    params = [p for p in guide.parameters()]
    y = torch.tensor([1.0, 2.0, 3.0])
    q = guide.get_posterior()
    cov = q.covariance_matrix
    e_lik = dist.Normal(q.loc, 0.5).log_prob(y).sum() - 0.5 * cov.diagonal().sum() / 0.25
    e_prior = dist.Normal(0.0, 1.0).log_prob(q.loc).sum() - 0.5 * cov.diagonal().sum()
    exact = torch.autograd.grad(-(e_lik + e_prior + q.entropy()), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    loss = HybridELBO(_PriorDraw(), covariance_gradient="stein")
    draws = []
    for seed in range(1500):
        pyro.set_rng_seed(seed)
        grads = torch.autograd.grad(loss.differentiable_loss(_gaussian_model, guide), params)
        draws.append(torch.cat([g.reshape(-1) for g in grads]))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / 1500**0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-4).all(), (mean, exact, se)
