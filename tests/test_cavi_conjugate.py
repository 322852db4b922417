"""CAVI on fully conjugate models: the posterior and the ELBO against closed forms.

On a model with a single latent site whose prior is conjugate to the likelihood, the
mean-field family contains the exact posterior, so CAVI must return it to float
precision and the ELBO must equal the log evidence log p(y). The log evidence is
computed independently in each test, through Bayes' rule at an arbitrary point:
log p(y) = log p(y | θ) + log p(θ) - log p(θ | y).
"""


import pytest
import torch

import pyro
import pyro.distributions as dist
from conftest import fit

from pyro_cavi import CAVI, NonConjugateError


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def log_evidence(log_lik, prior, posterior, theta):
    return float(log_lik(theta) + prior.log_prob(theta).sum() - posterior.log_prob(theta).sum())


def assert_exact(cavi, name, exact, *args, log_lik, prior, theta=None):
    losses = fit(cavi, *args, num_steps=20)
    q = cavi.posterior[name]
    assert type(q) is type(exact) or isinstance(q, type(exact))
    for attr in ("mean", "variance"):
        assert torch.allclose(getattr(q, attr), getattr(exact, attr), rtol=1e-10, atol=1e-12), attr
    theta = exact.mean if theta is None else theta
    assert -losses[-1] == pytest.approx(log_evidence(log_lik, prior, exact, theta), rel=1e-10, abs=1e-10)


# ------------------------------------------------------------------- Beta family
Y01 = torch.tensor([1.0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float64)


def test_beta_bernoulli():
    def model(y):
        p = pyro.sample("p", dist.Beta(2.0, 3.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(probs=p), obs=y)

    k, n = Y01.sum(), len(Y01)
    exact = dist.Beta(2.0 + k, 3.0 + n - k)
    assert_exact(CAVI(model), "p", exact, Y01, prior=dist.Beta(2.0, 3.0),
                 log_lik=lambda p: dist.Bernoulli(p).log_prob(Y01).sum())


def test_beta_binomial():
    counts, trials = torch.tensor([3.0, 7, 2, 9]), torch.tensor([10.0, 10, 5, 12])

    def model(k):
        p = pyro.sample("p", dist.Beta(1.5, 1.5))
        with pyro.plate("data", len(k)):
            pyro.sample("k", dist.Binomial(trials, probs=p), obs=k)

    exact = dist.Beta(1.5 + counts.sum(), 1.5 + (trials - counts).sum())
    assert_exact(CAVI(model), "p", exact, counts, prior=dist.Beta(1.5, 1.5),
                 log_lik=lambda p: dist.Binomial(trials, probs=p).log_prob(counts).sum())


def test_beta_geometric():
    fails = torch.tensor([0.0, 3, 1, 5, 2])

    def model(y):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Geometric(probs=p), obs=y)

    exact = dist.Beta(2.0 + len(fails), 2.0 + fails.sum())
    assert_exact(CAVI(model), "p", exact, fails, prior=dist.Beta(2.0, 2.0),
                 log_lik=lambda p: dist.Geometric(probs=p).log_prob(fails).sum())


# ------------------------------------------------------------------- Gamma family
COUNTS = torch.tensor([3.0, 4, 2, 6, 0, 1], dtype=torch.float64)
POSITIVE = torch.tensor([0.3, 1.7, 0.9, 2.2, 0.05], dtype=torch.float64)


def test_gamma_poisson_with_exposure():
    exposure = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0])

    def model(y):
        lam = pyro.sample("lam", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(exposure * lam), obs=y)

    exact = dist.Gamma(2.0 + COUNTS.sum(), 1.0 + exposure.sum())
    assert_exact(CAVI(model), "lam", exact, COUNTS, prior=dist.Gamma(2.0, 1.0),
                 log_lik=lambda lam: dist.Poisson(exposure * lam).log_prob(COUNTS).sum())


def test_gamma_exponential():
    def model(y):
        rate = pyro.sample("rate", dist.Gamma(3.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Exponential(rate), obs=y)

    exact = dist.Gamma(3.0 + len(POSITIVE), 2.0 + POSITIVE.sum())
    assert_exact(CAVI(model), "rate", exact, POSITIVE, prior=dist.Gamma(3.0, 2.0),
                 log_lik=lambda r: dist.Exponential(r).log_prob(POSITIVE).sum())


def test_gamma_rate_of_gamma():
    shape = 2.5

    def model(y):
        beta = pyro.sample("beta", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Gamma(shape, beta), obs=y)

    exact = dist.Gamma(1.0 + shape * len(POSITIVE), 1.0 + POSITIVE.sum())
    assert_exact(CAVI(model), "beta", exact, POSITIVE, prior=dist.Gamma(1.0, 1.0),
                 log_lik=lambda b: dist.Gamma(shape, b).log_prob(POSITIVE).sum())


Y = torch.tensor([0.3, -1.2, 2.1, 0.7, 1.1, -0.4], dtype=torch.float64)


@pytest.mark.parametrize("form", ["rsqrt", "one_over_sqrt", "pow", "scaled"])
def test_gamma_precision_of_normal(form):
    mu = 0.5

    def scale_of(tau):
        return {"rsqrt": lambda: tau.rsqrt(), "one_over_sqrt": lambda: 1 / tau.sqrt(),
                "pow": lambda: tau ** -0.5, "scaled": lambda: 2.0 * tau.rsqrt()}[form]()

    c = 2.0 if form == "scaled" else 1.0

    def model(y):
        tau = pyro.sample("tau", dist.Gamma(2.0, 3.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, scale_of(tau)), obs=y)

    exact = dist.Gamma(2.0 + len(Y) / 2, 3.0 + ((Y - mu) ** 2).sum() / (2 * c * c))
    assert_exact(CAVI(model), "tau", exact, Y, prior=dist.Gamma(2.0, 3.0),
                 log_lik=lambda t: dist.Normal(mu, c * t.rsqrt()).log_prob(Y).sum())


def test_inverse_gamma_variance_of_normal():
    mu = 0.5

    def model(y):
        var = pyro.sample("var", dist.InverseGamma(3.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, var.sqrt()), obs=y)

    exact = dist.InverseGamma(3.0 + len(Y) / 2, 2.0 + ((Y - mu) ** 2).sum() / 2)
    cavi = CAVI(model)
    losses = fit(cavi, Y, num_steps=20)
    q = cavi.posterior["var"]
    assert torch.allclose(q.concentration, exact.concentration, rtol=1e-12)
    assert torch.allclose(q.rate, exact.rate, rtol=1e-12)
    theta = torch.tensor(1.3)
    expected = log_evidence(lambda v: dist.Normal(mu, v.sqrt()).log_prob(Y).sum(), dist.InverseGamma(3.0, 2.0), exact, theta)
    assert -losses[-1] == pytest.approx(expected, rel=1e-10)


def test_gamma_precision_indexed_by_group():
    group = torch.tensor([0, 1, 1, 0, 2, 2])

    def model(y):
        with pyro.plate("groups", 3):
            tau = pyro.sample("tau", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, tau[group].rsqrt()), obs=y)

    cavi = CAVI(model)
    fit(cavi, Y, num_steps=10)
    q = cavi.posterior["tau"]
    for g in range(3):
        yg = Y[group == g]
        assert q.concentration[g] == pytest.approx(2.0 + len(yg) / 2, rel=1e-12)
        assert float(q.rate[g]) == pytest.approx(float(1.0 + (yg ** 2).sum() / 2), rel=1e-12)


# ------------------------------------------------------------------- Dirichlet family
def test_dirichlet_categorical():
    y = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    alpha = torch.tensor([1.0, 2.0, 0.5, 1.0])

    def model(y):
        pi = pyro.sample("pi", dist.Dirichlet(alpha))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Categorical(probs=pi), obs=y)

    counts = torch.bincount(y, minlength=4).to(alpha)
    exact = dist.Dirichlet(alpha + counts)
    assert_exact(CAVI(model), "pi", exact, y, prior=dist.Dirichlet(alpha),
                 log_lik=lambda p: dist.Categorical(probs=p).log_prob(y).sum())


def test_dirichlet_multinomial():
    y = torch.tensor([[3.0, 1, 0], [2, 2, 2], [0, 5, 1]])
    alpha = torch.tensor([1.0, 1.0, 2.0])

    def model(y):
        pi = pyro.sample("pi", dist.Dirichlet(alpha))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Multinomial(6, probs=pi), obs=y)

    exact = dist.Dirichlet(alpha + y.sum(0))
    assert_exact(CAVI(model), "pi", exact, y, prior=dist.Dirichlet(alpha),
                 log_lik=lambda p: dist.Multinomial(6, probs=p).log_prob(y).sum())


# ------------------------------------------------------------------- Gaussian family
def test_normal_normal_scalar():
    sigma, m0, s0 = 0.7, 1.0, 2.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(m0, s0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    prec = 1 / s0 ** 2 + len(Y) / sigma ** 2
    exact = dist.Normal((m0 / s0 ** 2 + Y.sum() / sigma ** 2) / prec, prec ** -0.5)
    assert_exact(CAVI(model), "mu", exact, Y, prior=dist.Normal(m0, s0),
                 log_lik=lambda m: dist.Normal(m, sigma).log_prob(Y).sum())


def _regression_data(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = X @ w + 0.3 * torch.randn(n, generator=g)
    return X, y


def _exact_regression(X, y, m0, S0, sigma):
    prec = torch.linalg.inv(S0) + X.T @ X / sigma ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ (torch.linalg.solve(S0, m0) + X.T @ y / sigma ** 2)
    return dist.MultivariateNormal(mean, covariance_matrix=0.5 * (cov + cov.T))


LOC_FORMS = {
    "matmul": lambda X, w: X @ w,
    "mul_sum": lambda X, w: (X * w).sum(-1),
    "rmatmul": lambda X, w: (w.unsqueeze(0) @ X.T).squeeze(0),
    "einsum_like_transpose": lambda X, w: (X.T * w.unsqueeze(-1)).sum(0),
    "sum_of_columns": lambda X, w: sum(X[:, j] * w[j] for j in range(X.shape[1])),
}


@pytest.mark.parametrize("form", sorted(LOC_FORMS))
def test_linear_regression_known_noise_is_exact(form):
    X, y = _regression_data()
    d, sigma = X.shape[1], 0.3
    m0, S0 = torch.zeros(d), 4.0 * torch.eye(d)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 2.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(LOC_FORMS[form](X, w), sigma), obs=y)

    exact = _exact_regression(X, y, m0, S0, sigma)
    cavi = CAVI(model)
    assert_exact(cavi, "w", exact, X, y, prior=dist.MultivariateNormal(m0, S0),
                 log_lik=lambda w: dist.Normal(X @ w, sigma).log_prob(y).sum())
    assert isinstance(cavi.posterior["w"], dist.MultivariateNormal)
    assert torch.allclose(cavi.posterior["w"].covariance_matrix, exact.covariance_matrix, rtol=1e-9, atol=1e-12)


def test_mvn_prior_and_plate_of_coefficients():
    X, y = _regression_data()
    d, sigma = X.shape[1], 0.3
    A = torch.randn(d, d)
    S0 = A @ A.T + torch.eye(d)
    m0 = torch.linspace(-1, 1, d)

    def mvn_model(X, y):
        w = pyro.sample("w", dist.MultivariateNormal(m0, S0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)

    exact = _exact_regression(X, y, m0, S0, sigma)
    assert_exact(CAVI(mvn_model), "w", exact, X, y, prior=dist.MultivariateNormal(m0, S0),
                 log_lik=lambda w: dist.Normal(X @ w, sigma).log_prob(y).sum())

    # coefficients declared in a plate are coupled by the likelihood: the engine fits them
    # jointly (one block over the plate), which is exact here
    def plate_model(X, y):
        with pyro.plate("features", d):
            w = pyro.sample("w", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)

    cavi = CAVI(plate_model)
    fit(cavi, X, y, num_steps=10)
    exact = _exact_regression(X, y, torch.zeros(d), 4.0 * torch.eye(d), sigma)
    q = cavi.posterior["w"]
    assert q.sample().shape == (d,)
    assert torch.allclose(q.mean, exact.mean, rtol=1e-10)
    assert "joint over plate" in cavi.summary()


def test_gaussian_mean_field_recovers_exact_means_and_conditional_precisions():
    """Intercept + slope + group effects u[group] with known noise. The posterior is Gaussian;
    mean-field CAVI converges to the exact posterior means, and each factor's precision is the
    corresponding block of the joint posterior precision (a closed-form property of mean-field VI
    on Gaussians)."""
    g = torch.Generator().manual_seed(1)
    n, G, sigma = 60, 4, 0.5
    x = torch.randn(n, generator=g)
    group = torch.randint(0, G, (n,), generator=g)
    y = 1.0 + 2.0 * x + torch.randn(G, generator=g)[group] + sigma * torch.randn(n, generator=g)

    def model(x, group, y):
        b0 = pyro.sample("b0", dist.Normal(0.0, 3.0))
        b1 = pyro.sample("b1", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", G):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(b0 + b1 * x + u[group], sigma), obs=y)

    cavi = CAVI(model)
    fit(cavi, x, group, y, num_steps=3000, tol=1e-15)
    # exact joint posterior over (b0, b1, u)
    Z = torch.cat([torch.ones(n, 1), x[:, None], torch.nn.functional.one_hot(group, G).double()], 1)
    prior_prec = torch.diag(torch.tensor([1 / 9, 1 / 9] + [1.0] * G))
    prec = prior_prec + Z.T @ Z / sigma ** 2
    mean = torch.linalg.solve(prec, Z.T @ y / sigma ** 2)
    q = cavi.posterior
    fitted = torch.cat([q["b0"].mean[None], q["b1"].mean[None], q["u"].mean])
    assert torch.allclose(fitted, mean, atol=1e-6)
    assert float(q["b0"].variance) == pytest.approx(float(1 / prec[0, 0]), rel=1e-10)
    assert torch.allclose(q["u"].variance, 1 / prec.diagonal()[2:], rtol=1e-10)


def test_hierarchical_normal_loc_is_a_gaussian_latent():
    """mu ~ N(0, 5), theta_j ~ N(mu, 1), y_ij ~ N(theta_j, 0.5): Gaussian, so mean-field means are exact."""
    J, per = 3, 4
    g = torch.Generator().manual_seed(2)
    y = torch.randn(J, per, generator=g) + torch.tensor([[-1.0], [0.5], [2.0]])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("schools", J, dim=-2):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            with pyro.plate("obs", per, dim=-1):
                pyro.sample("y", dist.Normal(theta, 0.5), obs=y)

    cavi = CAVI(model)
    fit(cavi, y, num_steps=2000, tol=1e-15)
    # exact joint posterior of (mu, theta_1..J)
    P = torch.zeros(J + 1, J + 1)
    P[0, 0] = 1 / 25 + J
    P[0, 1:] = P[1:, 0] = -1.0
    P[1:, 1:] = torch.eye(J) * (1 + per / 0.25)
    b = torch.cat([torch.zeros(1), y.sum(1) / 0.25])
    mean = torch.linalg.solve(P, b)
    assert cavi.posterior["mu"].mean == pytest.approx(float(mean[0]), abs=1e-8)
    assert torch.allclose(cavi.posterior["theta"].mean.reshape(-1), mean[1:], atol=1e-8)
    assert cavi.posterior["theta"].mean.shape == (J, 1)


def test_joint_gaussian_group_is_exact_and_fast():
    """With joint=[("b0", "b1", "u")] the three sites share one Gaussian factor: on a model with
    known noise that family contains the posterior, so CAVI is exact (means and the full joint
    covariance) in a couple of sweeps, where mean-field needs thousands."""
    from pyro.infer import Predictive

    g = torch.Generator().manual_seed(1)
    n, G, sigma = 60, 4, 0.5
    x = torch.randn(n, generator=g)
    group = torch.randint(0, G, (n,), generator=g)
    y = 1.0 + 2.0 * x + torch.randn(G, generator=g)[group] + sigma * torch.randn(n, generator=g)

    def model(x, group, y=None):
        b0 = pyro.sample("b0", dist.Normal(0.0, 3.0))
        b1 = pyro.sample("b1", dist.Normal(0.0, 3.0))
        with pyro.plate("groups", G):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            return pyro.sample("y", dist.Normal(b0 + b1 * x + u[group], sigma), obs=y)

    cavi = CAVI(model, joint=[("b0", "b1", "u")])
    losses = fit(cavi, x, group, y, num_steps=20, tol=1e-13)
    assert len(losses) <= 4
    Z = torch.cat([torch.ones(n, 1), x[:, None], torch.nn.functional.one_hot(group, G).double()], 1)
    prec = torch.diag(torch.tensor([1 / 9, 1 / 9] + [1.0] * G)) + Z.T @ Z / sigma ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ Z.T @ y / sigma ** 2
    q = cavi.posterior
    assert float(q["b0"].mean) == pytest.approx(float(mean[0]), rel=1e-10)
    assert float(q["b1"].stddev) == pytest.approx(float(cov[1, 1].sqrt()), rel=1e-10)
    assert torch.allclose(q["u"].mean, mean[2:], rtol=1e-10)
    assert torch.allclose(q["u"].covariance_matrix, cov[2:, 2:], rtol=1e-9)
    log_evidence = dist.MultivariateNormal(torch.zeros(n), sigma ** 2 * torch.eye(n) + Z @ torch.diag(torch.tensor([9.0, 9.0] + [1.0] * G)) @ Z.T).log_prob(y)
    assert -losses[-1] == pytest.approx(float(log_evidence), rel=1e-10)
    assert "part of the joint Gaussian factor 'b0+b1+u'" in repr(cavi)
    draws = Predictive(model, guide=cavi.guide, num_samples=3000)(x, group)
    assert draws["u"].shape == (3000, G)
    emp = torch.cov(torch.cat([draws["b0"].reshape(-1, 1), draws["u"]], 1).T)
    assert abs(float(emp[0, 1]) - float(cov[0, 2])) < 0.1 * float(cov[0, 0])


def test_joint_groups_are_validated():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        t = pyro.sample("t", dist.Gamma(1.0, 1.0))
        pyro.sample("y", dist.Normal(a, t.rsqrt()), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match="two or more distinct"):
        CAVI(model, joint=[("a",)])
    with pytest.raises(ValueError, match="'zz' is not a latent site"):
        CAVI(model, joint=[("a", "zz")]).step()
    # a Gaussian and a Gamma site form a Normal-Gamma pair only if t scales a's precision everywhere
    with pytest.raises(NonConjugateError, match=r"whose scale is not c \* t.rsqrt\(\)"):
        CAVI(model, joint=[("a", "t")]).step()

    def three(X=None):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        t = pyro.sample("t", dist.Gamma(1.0, 1.0))
        pyro.sample("y", dist.Normal(a + b, t.rsqrt()), obs=torch.tensor(0.5))

    with pytest.raises(ValueError, match="site 't' has a Gamma factor"):
        CAVI(three, joint=[("a", "b", "t")]).step()
