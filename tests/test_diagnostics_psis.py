import math
import warnings

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal

from pyro_cavi import CAVI
from pyro_cavi.diagnostics import khat_reading, psis

warnings.filterwarnings("ignore", module="arviz")
az = pytest.importorskip("arviz")

RHO = 0.95


def correlated():
    """p(a, b) = N(0, [[1, rho], [rho, 1]]) written as a then b given a."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    pyro.sample("b", dist.Normal(RHO * a, math.sqrt(1 - RHO**2)))


def normal_normal(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def normal_gamma(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=y.dtype), 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=X.dtype), 2.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)


def normal_gamma_log_joint(mu, tau, y):
    """log p(mu, tau, y) of ``normal_gamma``, written with float64 constants."""
    c = {v: torch.tensor(v, dtype=torch.float64) for v in (0.0, 2.0, 10.0)}
    return (
        dist.Normal(c[0.0], c[10.0]).log_prob(mu)
        + dist.Gamma(c[2.0], c[2.0]).log_prob(tau)
        + dist.Normal(mu[:, None], tau[:, None].rsqrt()).log_prob(y).sum(-1)
    )


def data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randn(n, generator=g, dtype=torch.float64)


def test_exact_cavi_has_constant_ratios_equal_to_log_evidence():
    y = data()
    cavi = CAVI(normal_normal)
    cavi.run(y, progress=False)
    res = psis(cavi, normal_normal, y, num_samples=500)
    # closed-form evidence: y ~ N(0, I + 100 11^T)
    n = len(y)
    cov = torch.eye(n, dtype=y.dtype) + 100.0 * torch.ones(n, n, dtype=y.dtype)
    log_evidence = dist.MultivariateNormal(torch.zeros(n, dtype=y.dtype), cov).log_prob(y)
    assert torch.allclose(res.log_ratios, log_evidence.expand(500), rtol=1e-10)
    assert res.khat < 0.5 and res.reading == "good"
    assert res.ess == pytest.approx(500, rel=1e-6)
    assert res.log_evidence == pytest.approx(float(log_evidence), rel=1e-10)
    q = cavi.posterior["mu"]
    assert float(res.mean["mu"]) == pytest.approx(float(res.draws["mu"].mean()), rel=1e-10)
    assert abs(float(res.mean["mu"] - q.mean)) < 4 * float(q.stddev) / math.sqrt(500)


def test_exact_multivariate_cavi_regression():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
    cavi = CAVI(regression)
    cavi.run(X, y, progress=False)
    res = psis(cavi, regression, X, y, num_samples=400)
    assert res.khat < 0.5
    assert res.ess > 0.99 * 400
    assert res.draws["w"].shape == (400, 3)


def test_log_ratios_match_hand_written_densities_and_arviz():
    """Mean-field CAVI on normal-gamma is close but not exact: ratios against a reference."""
    y = data(n=50)
    cavi = CAVI(normal_gamma)
    cavi.run(y, progress=False)
    res = psis(cavi, normal_gamma, y, num_samples=2000)
    mu, tau = res.draws["mu"], res.draws["tau"]
    log_p = normal_gamma_log_joint(mu, tau, y)
    log_q = cavi.posterior["mu"].log_prob(mu) + cavi.posterior["tau"].log_prob(tau)
    assert torch.allclose(res.log_ratios, log_p - log_q, rtol=1e-10)
    lw, khat = az.psislw((log_p - log_q).numpy())
    assert res.khat == pytest.approx(float(khat))
    np.testing.assert_allclose(res.log_weights.numpy(), lw, rtol=1e-10)
    assert res.ess > 0.9 * 2000
    w = np.exp(lw)
    assert float(res.mean["tau"]) == pytest.approx(float((w * tau.numpy()).sum()), rel=1e-10)
    sd = np.sqrt((w * (tau.numpy() - (w * tau.numpy()).sum()) ** 2).sum())
    assert float(res.sd["tau"]) == pytest.approx(sd, rel=1e-10)


def test_mean_field_on_correlated_gaussian_is_flagged_and_corrected():
    cavi = CAVI(correlated)
    cavi.run(progress=False)
    raw_var = {k: float(cavi.posterior[k].variance) for k in "ab"}
    assert raw_var["a"] == pytest.approx(1 - RHO**2, rel=1e-6)  # mean-field under-covers
    res = psis(cavi, correlated, num_samples=4000)
    assert res.khat > 0.7 and res.reading == "bad"
    assert res.ess < 0.5 * 4000
    for k in "ab":  # exact variance 1
        corrected = float(res.sd[k]) ** 2
        assert abs(corrected - 1.0) < abs(raw_var[k] - 1.0)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal])
def test_plain_svi_autoguide(guide_class):
    y = data(n=50)
    guide = guide_class(normal_gamma)
    svi = SVI(normal_gamma, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(400):
        svi.step(y)
    res = psis(guide, normal_gamma, y, num_samples=1000)
    assert res.draws["tau"].shape == (1000,) and bool((res.draws["tau"] > 0).all())
    assert np.isfinite(res.khat) and res.khat < 0.7
    assert 100 < res.ess <= 1000


def test_autonormal_log_q_is_the_constrained_density():
    """AutoNormal's q(tau) is a LogNormal in the constrained space: check the ratio against it."""
    y = data(n=50)
    guide = AutoNormal(normal_gamma)
    svi = SVI(normal_gamma, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(200):
        svi.step(y)
    res = psis(guide, normal_gamma, y, num_samples=300)
    loc, scale = guide.locs.tau.detach(), guide.scales.tau.detach()
    mu, tau = res.draws["mu"], res.draws["tau"]
    log_q = dist.Normal(guide.locs.mu.detach(), guide.scales.mu.detach()).log_prob(mu) + dist.LogNormal(loc, scale).log_prob(tau)
    log_p = normal_gamma_log_joint(mu, tau, y)
    assert torch.allclose(res.log_ratios, log_p - log_q, rtol=1e-6)


def test_resample_follows_the_weights():
    cavi = CAVI(correlated)
    cavi.run(progress=False)
    res = psis(cavi, correlated, num_samples=2000)
    draws = res.resample(5000, generator=torch.Generator().manual_seed(0))
    assert draws["a"].shape == (5000,)
    # resampled draws are a subset of the draws, with mean close to the weighted mean
    assert bool(torch.isin(draws["a"], res.draws["a"]).all())
    assert float(draws["a"].var()) > float(res.draws["a"].var())


def test_khat_reading_thresholds():
    assert [khat_reading(k) for k in (-math.inf, 0.49, 0.5, 0.69, 0.7, math.nan)] == ["good", "good", "ok", "ok", "bad", "bad"]


def test_point_estimate_guide_is_refused():
    y = data()
    guide = AutoDelta(normal_normal)
    guide(y)
    with pytest.raises(ValueError, match="'mu' is a Delta"):
        psis(guide, normal_normal, y, num_samples=10)


def test_bad_arguments():
    y = data()
    cavi = CAVI(normal_normal)
    cavi.run(y, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        psis(cavi, normal_normal, y, num_samples=1)
    with pytest.raises(TypeError, match="neither a Pyro guide"):
        psis(object(), normal_normal, y)

    def other_guide(y):
        pyro.sample("nu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'nu' is not a sample site of the model"):
        psis(other_guide, normal_normal, y, num_samples=10)
