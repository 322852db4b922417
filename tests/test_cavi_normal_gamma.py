"""Joint Normal-Gamma factors (``joint=[("w", "tau")]``): exact on conjugate Normal-Gamma
models (the ELBO equals the log evidence, the marginals are the closed-form Student-t and
Gamma), the same update as a hand-written weighted Bayesian regression inside a mixture,
and clear errors where the structure does not hold."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import Predictive

from pyro_cavi import CAVI, NonConjugateError

from conftest import fit


def unknown_mean_model(y, m0=0.5, k0=2.0, a0=3.0, b0=2.0):
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(a0, dtype=y.dtype), b0))
    mu = pyro.sample("mu", dist.Normal(torch.tensor(m0, dtype=y.dtype), (k0 * tau).rsqrt()))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)


def test_normal_gamma_unknown_mean_and_precision_is_exact():
    g = torch.Generator().manual_seed(0)
    y = 1.3 + 0.7 * torch.randn(40, generator=g, dtype=torch.float64)
    m0, k0, a0, b0 = 0.5, 2.0, 3.0, 2.0
    n, ybar = len(y), float(y.mean())
    kn = k0 + n
    mn = (k0 * m0 + n * ybar) / kn
    an = a0 + n / 2
    bn = b0 + 0.5 * float(((y - ybar) ** 2).sum()) + k0 * n * (ybar - m0) ** 2 / (2 * kn)
    log_evidence = (math.lgamma(an) - math.lgamma(a0) + a0 * math.log(b0) - an * math.log(bn)
                    + 0.5 * math.log(k0 / kn) - 0.5 * n * math.log(2 * math.pi))

    cavi = CAVI(unknown_mean_model, joint=[("mu", "tau")], seed=0)
    trace = [-l for l in fit(cavi, y, num_steps=4)]
    assert trace[-1] == pytest.approx(log_evidence, abs=1e-9)
    q_mu, q_tau = cavi.posterior["mu"], cavi.posterior["tau"]
    assert isinstance(q_mu, dist.StudentT) and isinstance(q_tau, dist.Gamma)
    assert float(q_mu.df) == pytest.approx(2 * an)
    assert float(q_mu.loc) == pytest.approx(mn, rel=1e-10)
    assert float(q_mu.scale) == pytest.approx(math.sqrt(bn / (an * kn)), rel=1e-10)
    assert float(q_tau.concentration) == pytest.approx(an)
    assert float(q_tau.rate) == pytest.approx(bn, rel=1e-10)
    assert "joint Normal-Gamma factor 'mu+tau'" in cavi.summary()

    # mean-field on the same model is a strictly lower bound
    mf = CAVI(unknown_mean_model, seed=0)
    mf_trace = [-l for l in fit(mf, y, num_steps=50)]
    assert mf_trace[-1] < trace[-1] - 1e-6


def regression_model(X, y, lam0=0.5, a0=2.0, b0=1.5):
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(a0, dtype=X.dtype), b0))
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), (lam0 * tau).rsqrt()).to_event(1))
    with pyro.plate("data", len(X)):
        pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)


def test_normal_gamma_regression_is_exact_and_guide_draws_are_joint():
    g = torch.Generator().manual_seed(1)
    N, D = 60, 3
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    lam0, a0, b0 = 0.5, 2.0, 1.5
    L0 = lam0 * torch.eye(D, dtype=torch.float64)
    Ln = L0 + X.T @ X
    mn = torch.linalg.solve(Ln, X.T @ y)
    an = a0 + N / 2
    bn = b0 + 0.5 * float(y @ y - mn @ Ln @ mn)
    log_evidence = (-0.5 * N * math.log(2 * math.pi) + 0.5 * float(torch.logdet(L0) - torch.logdet(Ln))
                    + a0 * math.log(b0) - an * math.log(bn) + math.lgamma(an) - math.lgamma(a0))

    cavi = CAVI(regression_model, joint=[("w", "tau")], seed=0)
    trace = [-l for l in fit(cavi, X, y, num_steps=4)]
    assert trace[-1] == pytest.approx(log_evidence, abs=1e-8)
    q_w = cavi.posterior["w"]
    assert isinstance(q_w, dist.MultivariateStudentT)
    torch.testing.assert_close(q_w.loc, mn)
    torch.testing.assert_close(q_w.scale_tril @ q_w.scale_tril.mT, (bn / an) * torch.linalg.inv(Ln))

    # guide draws keep the dependence of w on tau: Cov(w | tau) = (tau Ln)^-1
    pyro.set_rng_seed(0)
    draws = Predictive(regression_model, guide=cavi.guide, num_samples=4000, return_sites=["w", "tau"])(X, None)
    tau, w = draws["tau"].reshape(4000), draws["w"].reshape(4000, D)  # Predictive adds a plate dim
    scaled = (w - mn) * tau.sqrt().unsqueeze(-1)  # ~ N(0, Ln^-1) whatever tau is
    cov = scaled.T @ scaled / len(scaled)
    torch.testing.assert_close(cov, torch.linalg.inv(Ln), atol=4 * float(torch.linalg.inv(Ln).diagonal().max()) / 4000 ** 0.5, rtol=0)
    assert float(tau.mean()) == pytest.approx(an / bn, rel=0.03)

    # sample_posterior draws the pair jointly too, with the site shapes
    draws = cavi.sample_posterior(4000, ["tau", "w"])
    assert draws["w"].shape == (4000, D) and draws["tau"].shape == (4000,)
    scaled = (draws["w"] - mn) * draws["tau"].sqrt().unsqueeze(-1)
    torch.testing.assert_close(scaled.T @ scaled / 4000, torch.linalg.inv(Ln), atol=4 * float(torch.linalg.inv(Ln).diagonal().max()) / 4000 ** 0.5, rtol=0)
    with pytest.raises(ValueError, match="'v' is not a latent site"):
        cavi.sample_posterior(3, ["v"])


def mixture_of_regressions(X, y, K=3, lam0=1.0):
    N, D = X.shape
    pi = pyro.sample("pi", dist.Dirichlet(torch.ones(K, dtype=X.dtype)))
    with pyro.plate("experts", K):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=X.dtype), (lam0 * tau.unsqueeze(-1)).rsqrt()).to_event(1))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Categorical(pi))
        pyro.sample("y", dist.Normal((X * w[z]).sum(-1), tau[z].rsqrt()), obs=y)


def _mixture_data(N=150, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.randn(N, 1, generator=g, dtype=torch.float64), torch.ones(N, 1, dtype=torch.float64)], -1)
    z = torch.randint(3, (N,), generator=g)
    W = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    y = (X * W[z]).sum(-1) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return X, y


def test_normal_gamma_experts_update_equals_weighted_bayesian_regression():
    X, y = _mixture_data()
    cavi = CAVI(mixture_of_regressions, joint=[("w", "tau")], seed=0)
    trace = [-l for l in fit(cavi, X, y, num_steps=30)]
    assert trace[-1] > trace[0]
    # one more update of the Normal-Gamma factor, checked against the closed form given q(z)
    r = cavi.factors["z"].probs  # (N, K)
    cavi._update("w+tau")
    f = cavi.factors["w+tau"]
    for k in range(3):
        Lk = torch.eye(2, dtype=torch.float64) + (r[:, k, None, None] * X[:, :, None] * X[:, None, :]).sum(0)
        mk = torch.linalg.solve(Lk, (r[:, k, None] * X * y[:, None]).sum(0))
        ak = 2.0 + 0.5 * float(r[:, k].sum())
        bk = 1.0 + 0.5 * float((r[:, k] * y * y).sum() - mk @ Lk @ mk)
        torch.testing.assert_close(f.loc[k], mk)
        torch.testing.assert_close(f.scale_tril[k] @ f.scale_tril[k].T, torch.linalg.inv(Lk))
        assert float(f.concentration[k]) == pytest.approx(ak, rel=1e-10)
        assert float(f.rate[k]) == pytest.approx(bk, rel=1e-10)


def test_normal_gamma_requires_precision_scaled_by_its_own_block():
    X, y = _mixture_data(N=30)

    def constant_prior_scale(X, y):
        with pyro.plate("experts", 3):
            tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
            w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((X * w[0]).sum(-1), tau[0].rsqrt()), obs=y)

    with pytest.raises(NonConjugateError, match=r"'w' enters site 'w' \(Normal\), whose scale is not c \* tau.rsqrt\(\)"):
        CAVI(constant_prior_scale, joint=[("w", "tau")]).step(X, y)

    def mismatched_blocks(X, y):
        with pyro.plate("experts", 3):
            tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
            w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), tau.unsqueeze(-1).rsqrt()).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((X * w[0]).sum(-1), tau[1].rsqrt()), obs=y)

    with pytest.raises(NonConjugateError, match="paired differently"):
        CAVI(mismatched_blocks, joint=[("w", "tau")]).step(X, y)

    def wrong_shape(X, y):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
        with pyro.plate("experts", 3):
            w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), tau.rsqrt()).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((X * w[0]).sum(-1), tau.rsqrt()), obs=y)

    with pytest.raises(ValueError, match=r"'tau' must have one element per block of 'w' \(shape \(3,\)"):
        CAVI(wrong_shape, joint=[("w", "tau")]).step(X, y)
