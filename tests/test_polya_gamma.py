"""Pólya-Gamma augmented CAVI and the stick-breaking categorical distribution."""

import math

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal
from conftest import fit

from pyro_cavi import CAVI, NonConjugateError
from pyro_cavi.cavi.factors import log_cosh, polya_gamma_mean
from pyro_cavi.distributions import StickBreakingCategorical


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


# ------------------------------------------------------------------ Pólya-Gamma quantities
@pytest.mark.parametrize("b,c", [(1.0, 0.0), (1.0, 0.5), (1.0, 3.0), (3.0, 1.2), (0.7, 8.0)])
def test_polya_gamma_mean_and_kl_against_monte_carlo(b, c):
    polyagamma = pytest.importorskip("polyagamma")
    rng = np.random.default_rng(0)
    draws = polyagamma.random_polyagamma(h=b, z=c, size=200_000, random_state=rng)
    mean = float(polya_gamma_mean(torch.tensor(b), torch.tensor(c)))
    assert mean == pytest.approx(draws.mean(), abs=4 * draws.std() / math.sqrt(len(draws)))
    # E_{PG(b,0)}[exp(-c² w / 2)] = cosh(c/2)^-b: the log-normaliser used in the ELBO
    base = polyagamma.random_polyagamma(h=b, z=0.0, size=200_000, random_state=rng)
    mc = np.log(np.mean(np.exp(-0.5 * c * c * base)))
    assert -b * float(log_cosh(torch.tensor(c / 2))) == pytest.approx(mc, abs=5e-3 * max(1.0, abs(mc)))


def test_polya_gamma_mean_small_c_limit():
    b = torch.tensor(2.0)
    assert float(polya_gamma_mean(b, torch.tensor(1e-6))) == pytest.approx(0.5, rel=1e-10)
    assert float(polya_gamma_mean(b, torch.tensor(1e-3))) == pytest.approx(float(b / 2e-3 * math.tanh(5e-4)), rel=1e-10)


# ------------------------------------------------------------------ logistic regression vs Jaakkola-Jordan
def _jaakkola_jordan(X, y, prior_var=1.0, iters=500):
    """Independent reference: the Jaakkola-Jordan variational bound for Bayesian logistic
    regression (Jaakkola & Jordan 2000; Bishop PRML 10.6), with its value at the optimum."""
    n, d = X.shape
    xi = torch.ones(n)
    for _ in range(iters):
        lam = torch.tanh(xi / 2) / (4 * xi)
        prec = torch.eye(d) / prior_var + 2 * (X.T * lam) @ X
        cov = torch.linalg.inv(prec)
        m = cov @ (X.T @ (y - 0.5))
        xi = ((X @ m) ** 2 + ((X @ cov) * X).sum(-1)).sqrt()
    lam = torch.tanh(xi / 2) / (4 * xi)
    e_psi, e_psi2 = X @ m, (X @ m) ** 2 + ((X @ cov) * X).sum(-1)
    bound = (torch.nn.functional.logsigmoid(xi) + (y - 0.5) * e_psi - xi / 2 - lam * (e_psi2 - xi ** 2)).sum()
    prior = dist.MultivariateNormal(torch.zeros(d), prior_var * torch.eye(d))
    q = dist.MultivariateNormal(m, cov)
    return m, cov, float(bound - torch.distributions.kl_divergence(q, prior))


def _logistic_data(n=200, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.5, -2.0, 0.5][:d])), generator=g)
    return X, y


def test_logistic_regression_equals_jaakkola_jordan():
    X, y = _logistic_data()

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    cavi = CAVI(model)
    losses = fit(cavi, X, y, num_steps=500, tol=1e-14)
    m, cov, bound = _jaakkola_jordan(X, y)
    q = cavi.posterior["w"]
    assert torch.allclose(q.mean, m, atol=1e-7)
    assert torch.allclose(q.covariance_matrix, cov, atol=1e-7)
    assert -losses[-1] == pytest.approx(bound, rel=1e-9)
    assert "y.omega: PolyaGamma factor" in repr(cavi)


def test_binomial_logits_equals_replicated_bernoulli():
    X, _ = _logistic_data(n=40)
    g = torch.Generator().manual_seed(1)
    n_trials = 3.0
    k = torch.binomial(torch.full((40,), n_trials), torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5])), generator=g)

    def binomial(X, k):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(k)):
            pyro.sample("k", dist.Binomial(n_trials, logits=X @ w), obs=k)

    # the same likelihood as three Bernoulli trials per row, k of them successes
    Xr = X.repeat_interleave(3, 0)
    yr = (torch.arange(3).repeat(40) < k.repeat_interleave(3)).double()
    cavi = CAVI(binomial)
    losses = fit(cavi, X, k, num_steps=500, tol=1e-14)
    m, cov, bound = _jaakkola_jordan(Xr, yr)
    assert torch.allclose(cavi.posterior["w"].mean, m, atol=1e-7)
    log_choose = float((torch.lgamma(torch.tensor(n_trials + 1)) - torch.lgamma(k + 1) - torch.lgamma(n_trials - k + 1)).sum())
    assert -losses[-1] == pytest.approx(bound + log_choose, rel=1e-9)


# ------------------------------------------------------------------ stick-breaking distribution
def test_stick_breaking_normalises_and_matches_its_definition():
    logits = torch.randn(5, 3)
    d = StickBreakingCategorical(logits)
    p = d.probs
    assert torch.allclose(p.sum(-1), torch.ones(5))
    s = torch.sigmoid(logits)
    manual = torch.stack([s[:, 0], s[:, 1] * (1 - s[:, 0]), s[:, 2] * (1 - s[:, 0]) * (1 - s[:, 1]),
                          (1 - s[:, 0]) * (1 - s[:, 1]) * (1 - s[:, 2])], -1)
    assert torch.allclose(p, manual, rtol=1e-12)
    v = torch.tensor([0, 1, 2, 3, 3])
    assert torch.allclose(d.log_prob(v), manual.log().gather(-1, v[:, None])[:, 0], rtol=1e-12)
    assert d.enumerate_support().shape == (4, 5)
    assert d.expand((2, 5)).sample().shape == (2, 5)
    counts = torch.bincount(StickBreakingCategorical(logits[0]).sample((40000,)), minlength=4).double() / 40000
    assert torch.allclose(counts, p[0], atol=0.015)


def test_stick_breaking_log_prob_gradients():
    logits = torch.randn(4, 2, requires_grad=True)
    v = torch.tensor([0, 1, 2, 1])
    assert torch.autograd.gradcheck(lambda x: StickBreakingCategorical(x).log_prob(v), (logits,))


def test_stick_breaking_validation_and_shapes():
    with pytest.raises(ValueError, match="K - 1 >= 1"):
        StickBreakingCategorical(torch.zeros(3, 0))
    with pytest.raises(ValueError):
        StickBreakingCategorical(torch.zeros(2), validate_args=True).log_prob(torch.tensor(5))


def test_stick_breaking_works_in_svi_with_enumeration():
    """The same distribution serves Pyro's own inference: a latent stick-breaking site enumerated by TraceEnum_ELBO."""
    y = torch.cat([torch.randn(30) - 3, torch.randn(30) + 3])

    @config_enumerate
    def model(y):
        psi = pyro.sample("psi", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        with pyro.plate("comp", 2):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", StickBreakingCategorical(psi))
            pyro.sample("y", dist.Normal(loc[z], 1.0), obs=y)

    guide = AutoNormal(pyro.poutine.block(model, hide=["z"]))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = [svi.step(y) for _ in range(300)]
    assert np.isfinite(losses[-1]) and losses[-1] < losses[0]


# ------------------------------------------------------------------ stick-breaking in CAVI
def test_stick_breaking_likelihood_is_independent_logistic_sticks():
    """With coefficients per stick, an observed stick-breaking likelihood factorises into one
    logistic regression per stick on the rows that reach it: compare with Jaakkola-Jordan."""
    g = torch.Generator().manual_seed(2)
    n, d, K = 300, 2, 3
    X = torch.randn(n, d, generator=g)
    y = StickBreakingCategorical(X @ torch.tensor([[2.0, -1.0], [-1.0, 1.5]]).T).sample()

    def model(X, y):
        with pyro.plate("sticks", K - 1):
            beta = pyro.sample("beta", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("data", n):
            pyro.sample("y", StickBreakingCategorical(X @ beta.T), obs=y)

    cavi = CAVI(model)
    losses = fit(cavi, X, y, num_steps=500, tol=1e-14)
    total = 0.0
    for j in range(K - 1):
        rows = y >= j
        m, cov, bound = _jaakkola_jordan(X[rows], (y[rows] == j).double())
        assert torch.allclose(cavi.posterior["beta"].mean[j], m, atol=1e-6)
        total += bound
    assert -losses[-1] == pytest.approx(total, rel=1e-8)


def test_latent_stick_breaking_gating_monotone_and_recovers_regimes():
    g = torch.Generator().manual_seed(3)
    n = 300
    X = torch.cat([torch.ones(n, 1), torch.randn(n, 1, generator=g)], -1)
    z = (X[:, 1] > 0).long()
    y = torch.tensor([-3.0, 3.0])[z] + torch.randn(n, generator=g)

    def model(X, y):
        gamma = pyro.sample("gamma", dist.Normal(torch.zeros(1, 2), 3.0).to_event(2))
        with pyro.plate("comp", 2):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", n):
            k = pyro.sample("k", StickBreakingCategorical(X @ gamma.T))
            pyro.sample("y", dist.Normal(loc[k], 1.0), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, X, y, num_steps=300, tol=1e-12)
    q = cavi.posterior
    assert isinstance(q["k"], dist.Categorical) and q["k"].probs.shape == (n, 2)
    hard = q["k"].probs.argmax(-1)
    agreement = (hard == z).double().mean()
    assert max(agreement, 1 - agreement) > 0.95


def test_latent_bernoulli_with_logits():
    g = torch.Generator().manual_seed(4)
    n = 200
    x = torch.randn(n, generator=g)
    b = torch.bernoulli(torch.sigmoid(3 * x), generator=g)
    y = torch.where(b > 0, 2.0, -2.0) + 0.5 * torch.randn(n, generator=g)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        with pyro.plate("data", n):
            s = pyro.sample("s", dist.Bernoulli(logits=a * x))
            pyro.sample("y", dist.Normal(4 * s - 2, 0.5), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, x, y, num_steps=300, tol=1e-12)
    assert float(cavi.posterior["a"].mean) == pytest.approx(3.0, abs=1.0)


def test_softmax_categorical_points_to_stick_breaking():
    def model(X, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3, 2), 1.0).to_event(2))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Categorical(logits=X @ beta.T), obs=y)

    with pytest.raises(NonConjugateError, match="StickBreakingCategorical"):
        CAVI(model).step(torch.randn(5, 2), torch.tensor([0, 1, 2, 1, 0]))


def test_integer_labels_keep_the_models_float64():
    # the only observed site holds integer labels: the factors take the dtype of the model's
    # latents (float64 here), not torch's default dtype
    from pyro_cavi.distributions import StickBreakingCategorical

    torch.set_default_dtype(torch.float32)  # restored by conftest's fixture
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.randint(3, (60,), generator=g)

    def classifier(X, y):
        with pyro.plate("sticks", 2):
            w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("y", StickBreakingCategorical(X @ w.T), obs=y)

    cavi = CAVI(classifier, seed=0)
    losses = [cavi.step(X, y) for _ in range(5)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))
    assert cavi.posterior["w"].loc.dtype == torch.float64


def test_float32_labels_in_a_float64_model_fit_in_float64():
    # labels stored as float32 (as read from a CSV) in a model whose latents are float64: the
    # factors take the wider dtype, and the fit equals the one with float64 labels (before, the
    # factors took float32 from the labels and X @ w failed with a dtype error inside torch)
    torch.set_default_dtype(torch.float32)  # restored by conftest's fixture
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = (X[:, 0] - X[:, 1] + 0.5 * torch.randn(60, generator=g, dtype=torch.float64) > 0).double()

    def logistic(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    fits = []
    for labels in (y.float(), y):
        cavi = CAVI(logistic)
        fit(cavi, X, labels)
        fits.append(cavi.posterior["w"])
    assert fits[0].loc.dtype == torch.float64
    torch.testing.assert_close(fits[0].loc, fits[1].loc)
    torch.testing.assert_close(fits[0].covariance_matrix, fits[1].covariance_matrix)
