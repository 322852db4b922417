"""CAVI where the posterior is not in the mean-field family: the engine against
independent, hand-written closed-form coordinate-ascent updates written in this file
(Bishop, PRML 10.1.3 and 10.2; Blei et al. 2017), and the mixture models of issue 3."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from conftest import fit

from pyro_cavi import CAVI


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


# ------------------------------------------------------------------ regression with unknown noise
def _reference_regression(X, y, s0, a0, b0, sweeps=500):
    """Mean-field q(w) q(tau) for w ~ N(0, s0² I), tau ~ Gamma(a0, b0), y ~ N(Xw, 1/tau)."""
    n, d = X.shape
    XtX, Xty = X.T @ X, X.T @ y
    e_tau = a0 / b0
    a = a0 + n / 2
    for _ in range(sweeps):
        prec = torch.eye(d) / s0 ** 2 + e_tau * XtX
        cov = torch.linalg.inv(prec)
        m = cov @ (e_tau * Xty)
        resid = ((y - X @ m) ** 2).sum() + torch.trace(XtX @ cov)
        b = b0 + 0.5 * resid
        e_tau = a / b
    # ELBO written out independently
    e_log_tau = torch.digamma(torch.tensor(a)) - torch.log(b)
    e_ll = 0.5 * n * (e_log_tau - math.log(2 * math.pi)) - 0.5 * e_tau * resid
    e_prior_w = dist.MultivariateNormal(torch.zeros(d), s0 ** 2 * torch.eye(d)).log_prob(m) - 0.5 * torch.trace(cov) / s0 ** 2
    e_prior_tau = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * e_log_tau - b0 * e_tau
    h = dist.MultivariateNormal(m, cov).entropy() + dist.Gamma(a, b).entropy()
    return m, cov, a, b, float(e_ll + e_prior_w + e_prior_tau + h)


def test_regression_with_gamma_precision_matches_reference():
    g = torch.Generator().manual_seed(3)
    n, d = 80, 5
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 2.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    cavi = CAVI(model)
    losses = fit(cavi, X, y, num_steps=200, tol=1e-14)
    m, cov, a, b, elbo = _reference_regression(X, y, 2.0, 1.0, 1.0)
    q = cavi.posterior
    assert torch.allclose(q["w"].mean, m, rtol=1e-9)
    assert torch.allclose(q["w"].covariance_matrix, cov, rtol=1e-8)
    assert float(q["tau"].concentration) == pytest.approx(a, rel=1e-12)
    assert float(q["tau"].rate) == pytest.approx(float(b), rel=1e-9)
    assert -losses[-1] == pytest.approx(elbo, rel=1e-10)
    assert len(losses) < 30  # closed-form sweeps converge in a handful of steps


def test_gamma_rate_hierarchy_matches_reference():
    """beta ~ Gamma(1, 1); lam_j ~ Gamma(2, beta); y_ij ~ Poisson(lam_j)."""
    y = torch.tensor([[3.0, 5, 4], [0, 1, 2], [8, 7, 9], [1, 1, 0]])
    J = y.shape[0]

    def model(y):
        beta = pyro.sample("beta", dist.Gamma(1.0, 1.0))
        with pyro.plate("units", J, dim=-2):
            lam = pyro.sample("lam", dist.Gamma(2.0, beta))
            with pyro.plate("obs", y.shape[1], dim=-1):
                pyro.sample("y", dist.Poisson(lam), obs=y)

    cavi = CAVI(model)
    fit(cavi, y, num_steps=500, tol=1e-15)
    # reference: q(lam_j) = Gamma(2 + sum_i y_ij, E[beta] + n_j); q(beta) = Gamma(1 + 2J, 1 + sum_j E[lam_j])
    e_beta = 1.0
    for _ in range(500):
        a_l, b_l = 2.0 + y.sum(1), e_beta + y.shape[1]
        a_b, b_b = 1.0 + 2.0 * J, 1.0 + (a_l / b_l).sum()
        e_beta = a_b / b_b
    q = cavi.posterior
    assert torch.allclose(q["lam"].concentration.reshape(-1), a_l, rtol=1e-10)
    assert torch.allclose(q["lam"].rate.reshape(-1), b_l, rtol=1e-9)
    assert float(q["beta"].rate) == pytest.approx(float(b_b), rel=1e-7)


# ------------------------------------------------------------------ mixtures
def _gmm_data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    z = torch.randint(0, 3, (n,), generator=g)
    return centres[z] + torch.randn(n, 2, generator=g), z, centres


def gmm(Y, K=3):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(K)))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("data", len(Y)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=Y)


def _gmm_reference_update(Y, r, K=3, s0=10.0):
    """Bishop-style updates for known unit variance: q(weights), q(locs) from r, then new r."""
    nk = r.sum(0)
    alpha = 1.0 + nk
    prec = 1 / s0 ** 2 + nk  # per component, isotropic
    m = (r.T @ Y) / prec[:, None]
    e_log_w = torch.digamma(alpha) - torch.digamma(alpha.sum())
    e_sq = ((Y[:, None, :] - m[None]) ** 2).sum(-1) + 2 / prec[None]  # E||y - mu_k||²
    log_r = e_log_w - 0.5 * e_sq
    return alpha, m, prec, torch.softmax(log_r, -1)


def test_gaussian_mixture_fixed_point_and_recovery():
    Y, z_true, centres = _gmm_data()
    cavi = CAVI(gmm, seed=0, num_restarts=3)
    result = cavi.run(Y, num_steps=300, tol=1e-15, progress=False)
    assert result.converged
    trace = result.elbo_trace
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(trace, trace[1:]))
    q = cavi.posterior
    r = q["z"].probs
    assert r.shape == (len(Y), 3) and isinstance(q["z"], dist.Categorical)
    # independent reference: one hand-written sweep from the engine's responsibilities is a fixed point
    alpha, m, prec, r_new = _gmm_reference_update(Y, r)
    assert torch.allclose(q["weights"].concentration, alpha, rtol=1e-8)
    assert torch.allclose(q["locs"].mean, m, atol=1e-7)
    assert torch.allclose(q["locs"].covariance_matrix, torch.diag_embed((1 / prec)[:, None].expand(3, 2)), rtol=1e-8)
    assert torch.allclose(r_new, r, atol=1e-7)
    # and the clusters are found (up to label switching)
    err = torch.cdist(q["locs"].mean, centres).min(1).values
    assert (err < 0.3).all()
    assert max(result.restart_elbos) == pytest.approx(result.elbo)


def test_mixture_seed_reproducible():
    Y, _, _ = _gmm_data(n=120, seed=4)
    a = CAVI(gmm, seed=7).run(Y, num_steps=50, progress=False)
    b = CAVI(gmm, seed=7).run(Y, num_steps=50, progress=False)
    assert a.elbo_trace == b.elbo_trace
    pyro.set_rng_seed(3)
    c = CAVI(gmm).run(Y, num_steps=50, progress=False)
    pyro.set_rng_seed(3)
    d = CAVI(gmm).run(Y, num_steps=50, progress=False)
    assert c.elbo_trace == d.elbo_trace


def test_mixture_with_component_precisions_indexed_by_z():
    """scales[z] with Gamma precisions per component (a Normal-Gamma mixture, mean-field)."""
    g = torch.Generator().manual_seed(5)
    y = torch.cat([torch.randn(150, generator=g) * 0.5 - 3, torch.randn(150, generator=g) * 2 + 4])

    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
        with pyro.plate("comp", 2):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
            prec = pyro.sample("prec", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Normal(loc[z], prec[z].rsqrt()), obs=y)

    cavi = CAVI(model, seed=1)
    fit(cavi, y, num_steps=150, tol=0.0)
    q = cavi.posterior
    r = q["z"].probs
    # reference updates from the engine's responsibilities
    nk = r.sum(0)
    e_prec = q["prec"].mean
    lam = 1 / 100 + e_prec * nk
    m = e_prec * (r * y[:, None]).sum(0) / lam
    assert torch.allclose(q["loc"].mean, m, atol=1e-6)
    sq = (r * ((y[:, None] - m) ** 2 + 1 / lam)).sum(0)
    assert torch.allclose(q["prec"].rate, 1.0 + 0.5 * sq, rtol=1e-6)
    order = torch.argsort(q["loc"].mean)
    assert torch.allclose(q["loc"].mean[order], torch.tensor([-3.0, 4.0]), atol=0.4)
    assert torch.allclose(q["prec"].mean[order].rsqrt(), torch.tensor([0.5, 2.0]), rtol=0.2)


def test_mixture_of_poissons():
    g = torch.Generator().manual_seed(6)
    y = torch.cat([torch.poisson(torch.full((200,), 2.0), generator=g), torch.poisson(torch.full((200,), 15.0), generator=g)])

    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
        with pyro.plate("comp", 2):
            rate = pyro.sample("rate", dist.Gamma(1.0, 0.1))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Poisson(rate[z]), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, y, num_steps=150, tol=0.0)
    q = cavi.posterior
    r = q["z"].probs
    assert torch.allclose(q["rate"].concentration, 1.0 + (r * y[:, None]).sum(0), rtol=1e-8)
    assert torch.allclose(q["rate"].rate, 0.1 + r.sum(0), rtol=1e-8)
    e_log_rate = torch.digamma(q["rate"].concentration) - q["rate"].rate.log()
    e_log_w = torch.digamma(q["w"].concentration) - torch.digamma(q["w"].concentration.sum())
    r_ref = torch.softmax(e_log_w + y[:, None] * e_log_rate - q["rate"].mean, -1)
    assert torch.allclose(r_ref, r, atol=1e-8)
    assert torch.allclose(q["rate"].mean.sort().values, torch.tensor([2.0, 15.0]), rtol=0.15)


def test_mixture_of_regressions():
    g = torch.Generator().manual_seed(8)
    n = 300
    x = torch.rand(n, generator=g) * 4 - 2
    z = torch.randint(0, 2, (n,), generator=g)
    slopes = torch.tensor([2.0, -2.0])
    y = slopes[z] * x + 0.2 * torch.randn(n, generator=g)
    X = torch.stack([torch.ones(n), x], -1)

    def model(X, y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
        with pyro.plate("comp", 2):
            beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", n):
            k = pyro.sample("k", dist.Categorical(w))
            pyro.sample("y", dist.Normal((X * beta[k]).sum(-1), tau.rsqrt()), obs=y)

    cavi = CAVI(model, seed=2, num_restarts=3)
    cavi.run(X, y, num_steps=300, tol=1e-12, progress=False)
    q = cavi.posterior
    r = q["k"].probs
    e_tau = q["tau"].mean
    for j in range(2):
        prec = torch.eye(2) / 25 + e_tau * (X * r[:, j:j + 1]).T @ X
        mean = torch.linalg.solve(prec, e_tau * X.T @ (r[:, j] * y))
        assert torch.allclose(q["beta"].mean[j], mean, atol=1e-6)
    assert torch.allclose(q["beta"].mean[:, 1].sort().values, torch.tensor([-2.0, 2.0]), atol=0.1)


def test_bernoulli_latent_indexing_parameters():
    """A two-component mixture written with a Bernoulli site whose value indexes the locs."""
    g = torch.Generator().manual_seed(9)
    y = torch.cat([torch.randn(100, generator=g) - 3, torch.randn(100, generator=g) + 3])

    def model(y):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("comp", 2):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            b = pyro.sample("b", dist.Bernoulli(p))
            pyro.sample("y", dist.Normal(loc[b.long()], 1.0), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, y, num_steps=200, tol=1e-12)
    with torch.no_grad():
        cavi._update("p")  # q(p) given the current responsibilities
    q = cavi.posterior
    assert isinstance(q["b"], dist.Bernoulli) and q["b"].probs.shape == (200,)
    r1 = q["b"].probs
    assert float(q["p"].concentration1) == pytest.approx(1.0 + float(r1.sum()), rel=1e-8)
    assert torch.allclose(q["loc"].mean.sort().values, torch.tensor([-3.0, 3.0]), atol=0.3)


def test_kmeans_plus_plus_seeding_finds_the_optimum_more_often_than_forgy():
    """Five clusters, ten seeds each: k-means++ seeding reaches the best ELBO at least as often."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 2, generator=g) * 4
    Y = centres[torch.randint(0, 5, (400,), generator=g)] + torch.randn(400, 2, generator=g)
    hits = {}
    for init in ("forgy", "kmeans++"):
        elbos = [CAVI(lambda Y: gmm(Y, K=5), seed=s, init=init).run(Y, num_steps=200, tol=1e-10, progress=False).elbo
                 for s in range(6)]
        hits[init] = elbos
    best = max(max(v) for v in hits.values())
    count = {k: sum(e > best - 1 for e in v) for k, v in hits.items()}
    assert count["kmeans++"] >= count["forgy"] and count["kmeans++"] >= 3, count
    with pytest.raises(ValueError, match="init must be"):
        CAVI(gmm, init="random")
