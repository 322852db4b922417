"""
Exact conditional samplers p(z | theta, y) of NG-HVI against closed forms and quadrature.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from models.mixed import (
    deep_mixed_model,
    linear_random_intercept,
    logistic_random_intercept,
    relu_features,
    simulate_deep_mixed,
    simulate_linear_random_intercept,
)
from pyro_cavi.nghvi import GaussianConditional, PolyaGammaGibbs


def _lmm_data(num_groups=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (num_groups,), generator=g)  # unequal group sizes
    group = torch.arange(num_groups).repeat_interleave(sizes)
    X = torch.cat([torch.ones(len(group), 1), torch.randn(len(group), 2, generator=g)], -1)
    y = torch.randn(len(group), generator=g) * 2 + 1
    return X, group, num_groups, y


def test_gaussian_conditional_linear_random_intercept_closed_form():
    X, group, G, y = _lmm_data()
    theta = {"beta": torch.tensor([0.5, -1.0, 2.0]), "sigma2_a": torch.tensor(0.7), "sigma2_e": torch.tensor(1.3)}
    q = GaussianConditional("alpha").distribution(linear_random_intercept, theta, X, group, G, y)
    n_i = torch.bincount(group, minlength=G).float()
    resid_sum = torch.zeros(G).index_add_(0, group, y - X @ theta["beta"])
    var = 1.0 / (n_i / theta["sigma2_e"] + 1.0 / theta["sigma2_a"])
    mean = var * resid_sum / theta["sigma2_e"]
    assert torch.allclose(q.mean.squeeze(-1), mean, atol=1e-5)
    assert torch.allclose(q.covariance_matrix[..., 0, 0], var, atol=1e-6)


def test_gaussian_conditional_keeps_the_model_dtype():
    X, group, G, y = _lmm_data()
    theta = {"beta": torch.tensor([0.5, -1.0, 2.0]).double(), "sigma2_a": torch.tensor(0.7).double(), "sigma2_e": torch.tensor(1.3).double()}
    z = GaussianConditional("alpha")(linear_random_intercept, theta, X.double(), group, G, y.double())
    assert z["alpha"].dtype == torch.float64


def test_gaussian_conditional_samples_have_the_conditional_moments():
    pyro.set_rng_seed(0)
    X, group, G, y = _lmm_data(num_groups=50)
    theta = {"beta": torch.tensor([0.5, -1.0, 2.0]), "sigma2_a": torch.tensor(0.7), "sigma2_e": torch.tensor(1.3)}
    sampler = GaussianConditional("alpha")
    draws = torch.stack([sampler(linear_random_intercept, theta, X, group, G, y)["alpha"] for _ in range(400)])
    n_i = torch.bincount(group, minlength=G).float()
    var = 1.0 / (n_i / 1.3 + 1.0 / 0.7)
    mean = var * torch.zeros(G).index_add_(0, group, y - X @ theta["beta"]) / 1.3
    standardized = (draws - mean) / var.sqrt()  # 400 x 50 draws, N(0, 1) if exact
    assert standardized.mean().abs() < 4 / math.sqrt(standardized.numel())
    assert (standardized.var() - 1).abs() < 4 * math.sqrt(2 / standardized.numel())


def test_gaussian_conditional_vector_random_effects_deep_model():
    train, _, _ = simulate_deep_mixed(num_groups=20, group_size=10, seed=1)
    X, group, G, y = train["X"], train["group"], train["num_groups"], train["y"]
    g = torch.Generator().manual_seed(2)
    theta = {
        "W1": torch.randn(5, 6, generator=g),
        "W2": torch.randn(5, 6, generator=g),
        "beta": torch.randn(6, generator=g),
        "tau2": torch.rand(6, generator=g) + 0.2,
        "sigma2_e": torch.tensor(3.0),
    }
    q = GaussianConditional("alpha").distribution(deep_mixed_model, theta, X, group, G, y)
    Z = relu_features(X, [theta["W1"], theta["W2"]])
    for i in [0, 7, 19]:
        Zi, yi = Z[group == i], y[group == i]
        precision = torch.diag(1 / theta["tau2"]) + Zi.T @ Zi / theta["sigma2_e"]
        mean = torch.linalg.solve(precision, Zi.T @ (yi - Zi @ theta["beta"]) / theta["sigma2_e"])
        assert torch.allclose(q.precision_matrix[i], precision, rtol=1e-4, atol=1e-4)
        assert torch.allclose(q.mean[i], mean, rtol=1e-4, atol=1e-4)


def _logistic_posterior_moments(X, y, beta, sigma2_a):
    """p(alpha | beta, sigma2_a, y) for one group by quadrature on a fine grid."""
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    eta = (X.double() @ beta.double()).unsqueeze(0) + grid.unsqueeze(1)
    log_lik = (y.double() * eta - torch.nn.functional.softplus(eta)).sum(1)
    log_post = log_lik - 0.5 * grid**2 / sigma2_a
    w = torch.softmax(log_post, 0)
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum()


def test_polya_gamma_gibbs_matches_quadrature():
    pyro.set_rng_seed(1)
    X1 = torch.tensor([[1.0, 0.3], [1.0, -1.2], [1.0, 0.8], [1.0, 2.0], [1.0, -0.4]])
    y1 = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    G = 4000  # identical groups = independent Gibbs chains, run in parallel
    X, y = X1.repeat(G, 1), y1.repeat(G)
    group = torch.arange(G).repeat_interleave(5)
    theta = {"beta": torch.tensor([0.4, 1.1]), "sigma2_a": torch.tensor(2.0)}
    sampler = PolyaGammaGibbs("alpha", num_sweeps=25)
    alpha = sampler(logistic_random_intercept, theta, X, group, G, y)["alpha"].double()
    mean, var = _logistic_posterior_moments(X1, y1, theta["beta"], 2.0)
    assert (alpha.mean() - mean).abs() < 4 * (var / G).sqrt()
    assert (alpha.var() - var).abs() < 4 * var * math.sqrt(2 / G)
    # warm start: a further call keeps drawing from the same stationary distribution
    alpha2 = sampler(logistic_random_intercept, theta, X, group, G, y)["alpha"].double()
    assert (alpha2.mean() - mean).abs() < 4 * (var / G).sqrt()


def test_gaussian_conditional_rejects_non_gaussian_conditional():
    X1 = torch.tensor([[1.0, 0.3], [1.0, -1.2]])
    y = torch.tensor([1.0, 0.0])
    theta = {"beta": torch.tensor([0.4, 1.1]), "sigma2_a": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="not quadratic in local site 'alpha'"):
        GaussianConditional("alpha")(logistic_random_intercept, theta, X1, torch.tensor([0, 1]), 2, y)


def test_gaussian_conditional_rejects_coupled_groups():
    def coupled(y=None):
        with pyro.plate("groups", 4):
            alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(alpha.sum(), 1.0), obs=y)

    with pytest.raises(ValueError, match="coupled across its batch"):
        GaussianConditional("alpha")(coupled, {}, torch.tensor(1.0))


def test_samplers_reject_bad_sites():
    X, group, G, y = _lmm_data()
    theta = {"beta": torch.zeros(3), "sigma2_a": torch.tensor(1.0), "sigma2_e": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="'gamma' is not a sample site"):
        GaussianConditional("gamma")(linear_random_intercept, theta, X, group, G, y)
    with pytest.raises(ValueError, match="'y' is observed"):
        GaussianConditional("y")(linear_random_intercept, theta, X, group, G, y)
    with pytest.raises(ValueError, match="'sigma2_a' has support"):
        GaussianConditional("sigma2_a")(linear_random_intercept, {"beta": torch.zeros(3), "sigma2_e": torch.tensor(1.0)}, X, group, G, y)
    with pytest.raises(ValueError, match="no observed Bernoulli or Binomial"):
        PolyaGammaGibbs("alpha")(linear_random_intercept, theta, X, group, G, y)
    with pytest.raises(TypeError, match="site name"):
        GaussianConditional(["alpha"])
    with pytest.raises(ValueError, match="num_sweeps"):
        PolyaGammaGibbs("alpha", num_sweeps=0)


def test_models_validate_their_inputs():
    train, _ = simulate_linear_random_intercept(num_groups=5, group_size=4)
    with pytest.raises(ValueError, match=r"group indices must lie in \[0, 3\)"):
        linear_random_intercept(train["X"], train["group"], 3, train["y"])
    with pytest.raises(TypeError, match="integer group indices"):
        linear_random_intercept(train["X"], train["group"].float(), 5, train["y"])
    with pytest.raises(ValueError, match="y must have shape"):
        linear_random_intercept(train["X"], train["group"], 5, train["y"][:-1])


def test_cavi_conditional_plugs_in_and_agrees_with_gaussian_conditional():
    """The CAVI engine's automatic conditional (same sampler interface) gives the same density."""
    from pyro_cavi.cavi.conditional import CAVIConditional

    X, group, G, y = _lmm_data(num_groups=12)
    theta = {"beta": torch.tensor([0.5, -1.0, 2.0]), "sigma2_a": torch.tensor(0.7), "sigma2_e": torch.tensor(1.3)}
    ours, cavi = GaussianConditional("alpha"), CAVIConditional(["alpha"])
    for _ in range(3):
        z = cavi(linear_random_intercept, theta, X, group, G, y)
        assert z["alpha"].shape == (G,)
        lp_cavi = cavi.log_prob(linear_random_intercept, theta, z, X, group, G, y)
        lp_ours = ours.log_prob(linear_random_intercept, theta, z, X, group, G, y)
        assert torch.allclose(lp_cavi, lp_ours, rtol=1e-4, atol=1e-3)


def test_simulators_follow_the_paper_designs():
    train, test = simulate_linear_random_intercept(num_groups=40, group_size=10, sigma2_a=1.0)
    assert train["X"].shape == (200, 6) and test["X"].shape == (200, 6)
    assert torch.equal(train["X"][:, 0], torch.ones(200))
    assert torch.equal(torch.bincount(train["group"]), torch.full((40,), 5))
    # the covariates have the paper's correlation matrix (sampling error ~ 1/sqrt(400))
    from models.mixed import RHO

    X = torch.cat([train["X"], test["X"]])[:, 1:]
    assert (torch.corrcoef(X.T) - RHO).abs().max() < 0.2
    tr, val, te = simulate_deep_mixed(num_groups=30, group_size=10)
    assert [len(d["y"]) for d in (tr, val, te)] == [180, 60, 60]
    assert tr["alpha"].shape == (30, 6)
    # the deep model's trace has the paper's global sites and a (groups x 6) local site
    trace = pyro.poutine.trace(deep_mixed_model).get_trace(tr["X"], tr["group"], 30, tr["y"])
    shapes = {n: tuple(s["value"].shape) for n, s in trace.nodes.items() if s["type"] == "sample" and n not in ("data", "groups")}
    assert shapes == {"W1": (5, 6), "W2": (5, 6), "beta": (6,), "tau2": (6,), "sigma2_e": (), "alpha": (30, 6), "y": (180,)}


def _masked_logistic(how):
    """The logistic random-intercept model with the observations masked by ``poutine.mask``,
    by ``.mask(...)`` or by ``.mask(...)`` under ``.to_event(1)`` (one group's rows as one event)."""

    def model(X, group, num_groups, y, mask):
        beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 10.0).to_event(1))
        sigma2_a = pyro.sample("sigma2_a", dist.InverseGamma(X.new_tensor(1.01), 1.01))
        with pyro.plate("groups", num_groups):
            alpha = pyro.sample("alpha", dist.Normal(0.0, sigma2_a.sqrt()))
        logits = X @ beta + alpha[group]
        if how == "event":  # rows grouped (num_groups, rows per group), the rows an event
            with pyro.plate("groups_y", num_groups):
                rows = logits.reshape(num_groups, -1)
                pyro.sample("y", dist.Bernoulli(logits=rows).mask(mask.reshape(rows.shape)).to_event(1), obs=y.reshape(rows.shape))
            return
        with pyro.plate("data", X.shape[0]):
            if how == "poutine":
                with pyro.poutine.mask(mask=mask):
                    pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
            else:
                pyro.sample("y", dist.Bernoulli(logits=logits).mask(mask), obs=y)

    return model


@pytest.mark.parametrize("how", ["poutine", "method", "event"])
def test_polya_gamma_gibbs_masked_observations_match_quadrature(how):
    """Masked-out rows (holding NaN) drop out of the conditional: the draws match quadrature
    on the unmasked rows alone."""
    pyro.set_rng_seed(2)
    X1 = torch.tensor([[1.0, 0.3], [1.0, -1.2], [1.0, 0.8], [1.0, 2.0], [1.0, -0.4], [1.0, 5.0], [1.0, -3.0]])
    y1 = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, float("nan"), 0.0])
    keep = torch.tensor([True, True, True, True, True, False, False])
    G = 4000
    X, y, mask = X1.repeat(G, 1), y1.repeat(G), keep.repeat(G)
    group = torch.arange(G).repeat_interleave(7)
    theta = {"beta": torch.tensor([0.4, 1.1]), "sigma2_a": torch.tensor(2.0)}
    alpha = PolyaGammaGibbs("alpha", num_sweeps=25)(_masked_logistic(how), theta, X, group, G, y, mask)["alpha"].double()
    mean, var = _logistic_posterior_moments(X1[keep], y1[keep], theta["beta"], 2.0)
    assert (alpha.mean() - mean).abs() < 4 * (var / G).sqrt()
    assert (alpha.var() - var).abs() < 4 * var * math.sqrt(2 / G)


def test_polya_gamma_gibbs_rejects_bad_observations():
    X, group, G, _ = _lmm_data()
    theta = {"beta": torch.zeros(3), "sigma2_a": torch.tensor(1.0)}
    y = (torch.arange(len(group)) % 2).float()
    sampler = PolyaGammaGibbs("alpha")
    for bad, shown in ((float("nan"), "nan"), (2.0, "2.0"), (0.5, "0.5")):
        y_bad = y.clone()
        y_bad[3] = bad
        with pytest.raises(ValueError, match=rf"observed site 'y'.* 1 value\(s\) outside .*e\.g\. {shown}"):
            sampler(logistic_random_intercept, theta, X, group, G, y_bad)
