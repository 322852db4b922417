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

from conftest import gaussian_mixture

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
    early = None
    for step in range(400):
        svi.step(y)
        if step == 20:
            early = psis(guide, normal_gamma, y, num_samples=1000)
    assert early.khat > 0.7  # 20 steps from the prior-ish initialisation: flagged
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


def test_mixture_guide_is_weighed_by_its_mixture_density():
    from pyro_cavi.miselbo import MixtureGuide

    def model(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    locs = torch.tensor([[0.5, 0.0], [-0.3, 0.8]])
    scales = torch.tensor([[0.6, 0.7], [0.9, 0.5]])

    def component(a):
        def guide(y):
            return pyro.sample("z", dist.Normal(locs[a], scales[a]).to_event(1))

        return guide

    mixture = MixtureGuide([component(0), component(1)])
    y = torch.tensor(1.0)
    res = psis(mixture, model, y, num_samples=200)
    z = res.draws["z"]
    assert z.shape == (200, 2)
    log_q = torch.logsumexp(dist.Normal(locs, scales).log_prob(z[:, None]).sum(-1), -1) - math.log(2)
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z.sum(-1), 1.0).log_prob(y)
    assert torch.allclose(res.log_ratios, log_p - log_q, atol=1e-5)


def test_hybrid_guide_ratio_integrates_the_local_sites():
    """NG-HVI draws alpha from p(alpha | theta, y): the ratio is p(theta, y) / q(theta), with the
    marginal likelihood written in closed form here."""
    from models.mixed import linear_random_intercept, simulate_linear_random_intercept
    from pyro_cavi.nghvi import HybridELBO, HybridGuide

    train, _ = simulate_linear_random_intercept(num_groups=10, group_size=5, sigma2_a=1.0, seed=0)
    X, group, G, y = train["X"], train["group"], train["num_groups"], train["y"]
    guide = HybridGuide(linear_random_intercept, "alpha", rank=2)
    HybridELBO(guide.conditional).loss(linear_random_intercept, guide, X, group, G, y)  # creates the parameters
    res = psis(guide, linear_random_intercept, X, group, G, y, num_samples=20)
    assert res.draws["alpha"].shape == (20, 10) and res.draws["beta"].shape == (20, X.shape[1])
    with torch.no_grad():
        post = guide.global_guide.get_posterior()
    n = X.shape[0] // G
    for s in range(3):
        beta, s2a, s2e = res.draws["beta"][s], res.draws["sigma2_a"][s], res.draws["sigma2_e"][s]
        u = torch.cat([beta, s2a.log()[None], s2e.log()[None]])
        log_q = post.log_prob(u).detach() - s2a.log() - s2e.log()  # q(theta) through theta = (beta, exp u)
        cov = s2e * torch.eye(n) + s2a * torch.ones(n, n)
        log_p = (
            dist.MultivariateNormal(torch.zeros(n), cov).log_prob((y - X @ beta).reshape(G, n)).sum()
            + dist.Normal(0.0, 10.0).log_prob(beta).sum()
            + dist.InverseGamma(1.01, 1.01).log_prob(s2a)
            + dist.InverseGamma(1.01, 1.01).log_prob(s2e)
        )
        assert float(res.log_ratios[s]) == pytest.approx((log_p - log_q).item(), abs=1e-3)


def test_hybrid_guide_without_conditional_density_is_refused():
    from models.mixed import logistic_random_intercept
    from pyro_cavi.nghvi import HybridGuide, PolyaGammaGibbs

    X = torch.randn(12, 2)
    group = torch.arange(12) % 3
    y = torch.bernoulli(torch.full((12,), 0.5))
    guide = HybridGuide(logistic_random_intercept, PolyaGammaGibbs("alpha"), rank=1)
    with pytest.raises(ValueError, match="PolyaGammaGibbs, which has no log_prob"):
        psis(guide, logistic_random_intercept, X, group, 3, y, num_samples=5)


def test_forward_kl_amortised_posterior():
    """ForwardKL's guide q(theta | x): the ratio uses the amortised density at the observed x."""
    import torch.nn as nn

    from pyro_cavi.forward_kl import AmortisedPosterior, DiagonalNormalHead, ForwardKL

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        with pyro.plate("data", 5):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x)

    guide = AmortisedPosterior(nn.Linear(5, 2), {"theta": DiagonalNormalHead()})
    engine = ForwardKL(model, guide, pyro.optim.Adam({"lr": 0.02}), num_simulations=128)
    x = torch.tensor([1.3, 0.2, 2.1, 0.7, 1.6])
    for _ in range(200):
        engine.step(x)
    res = psis(engine, model, x, num_samples=500)
    theta = res.draws["theta"]
    with torch.no_grad():
        q = engine.posterior(x)["theta"]
    log_p = dist.Normal(0.0, 2.0).log_prob(theta) + dist.Normal(theta[:, None], 1.0).log_prob(x).sum(-1)
    assert torch.allclose(res.log_ratios, log_p - q.log_prob(theta), atol=1e-4)


mixture = gaussian_mixture(2)


def test_discrete_local_sites_sampled_or_enumerated():
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.randn(15, generator=g) - 2, torch.randn(15, generator=g) + 2]).double()
    cavi = CAVI(mixture, seed=0)
    cavi.run(y, progress=False)
    q = cavi.posterior
    one = torch.tensor(1.0, dtype=torch.float64)

    joint = psis(cavi, mixture, y, num_samples=200)
    w, loc, z = joint.draws["w"], joint.draws["loc"], joint.draws["z"]
    assert z.shape == (200, 30)
    log_prior = dist.Dirichlet(torch.ones(2, dtype=y.dtype)).log_prob(w) + dist.Normal(0 * one, 10 * one).log_prob(loc).sum(-1)
    log_p = log_prior + (w.gather(-1, z).log() + dist.Normal(loc.gather(-1, z), one).log_prob(y)).sum(-1)
    log_q = q["w"].log_prob(w) + q["loc"].log_prob(loc).sum(-1) + q["z"].log_prob(z).sum(-1)
    assert torch.allclose(joint.log_ratios, log_p - log_q, rtol=1e-10)

    marginal = psis(cavi, mixture, y, num_samples=40, discrete="enumerate")
    assert set(marginal.draws) == {"w", "loc"}
    w, loc = marginal.draws["w"], marginal.draws["loc"]
    log_prior = dist.Dirichlet(torch.ones(2, dtype=y.dtype)).log_prob(w) + dist.Normal(0 * one, 10 * one).log_prob(loc).sum(-1)
    log_lik = torch.logsumexp(w.log()[:, None, :] + dist.Normal(loc[:, None, :], one).log_prob(y[:, None]), -1).sum(-1)
    log_q = q["w"].log_prob(w) + q["loc"].log_prob(loc).sum(-1)
    assert torch.allclose(marginal.log_ratios, log_prior + log_lik - log_q, rtol=1e-10)
    with pytest.raises(ValueError, match="discrete must be"):
        psis(cavi, mixture, y, num_samples=10, discrete="sum")


def test_chain_summary_names_the_best_restart():
    from pyro_cavi import to_inference_data
    from pyro_cavi.diagnostics import chain_summary

    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.randn(25, generator=g) + c for c in (-9.0, -3.0, 3.0, 9.0)]).double()

    three = gaussian_mixture(3)
    fits = [CAVI(three, seed=s) for s in (0, 1)]
    for f in fits:
        f.run(y, progress=False)
    idata = to_inference_data(fits, three, y, num_samples=100, psis=True)
    table = chain_summary(idata, var_names=["loc"])
    elbos = [f.elbo_trace[-1] for f in fits]
    assert list(table["elbo"]) == elbos
    assert list(table["best"]) == [e == max(elbos) for e in elbos]
    assert list(table["psis_khat"]) == idata.attrs["psis_khat"]
    assert table.attrs["max_rhat"] == pytest.approx(float(az.rhat(idata, var_names=["loc"])["loc"].max()))
    assert table.attrs["max_rhat"] > 1.5
