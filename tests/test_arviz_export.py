import warnings

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_cavi import CAVI, to_inference_data

warnings.filterwarnings("ignore", module="arviz")
az = pytest.importorskip("arviz")


def regression(X, y=None, keep=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=X.dtype), 1.0))
    with pyro.plate("data", X.shape[0]):
        with poutine.mask(mask=True if keep is None else keep):
            return pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
    return X, y


def test_cavi_export_groups_and_values(data):
    X, y = data
    cavi = CAVI(regression)
    result = cavi.run(X, y, progress=False)
    idata = to_inference_data(cavi, regression, X, y, num_samples=2000)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        assert hasattr(idata, group), group
    w = idata.posterior["w"].values
    assert w.shape == (1, 2000, 2)
    q = cavi.posterior["w"]
    se = q.stddev.numpy() / np.sqrt(2000)
    assert np.all(np.abs(w[0].mean(0) - q.mean.numpy()) < 5 * se)
    # pointwise log likelihood equals the Normal density at each draw, recomputed here
    tau = idata.posterior["tau"].values[0]
    ll = idata.log_likelihood["y"].values[0]
    ref = dist.Normal(torch.as_tensor(w[0]) @ X.T, torch.as_tensor(tau)[:, None].rsqrt()).log_prob(y)
    assert np.allclose(ll, ref.numpy(), rtol=1e-10)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    # posterior predictive: mean X E[w], with the noise of 1/E-ish tau
    yrep = idata.posterior_predictive["y"].values[0]
    assert np.allclose(yrep.mean(0), (X @ q.mean).numpy(), atol=0.12)
    assert np.allclose(idata.sample_stats["elbo_trace"].values.ravel(), result.elbo_trace)
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)


def test_masked_data_have_zero_log_likelihood(data):
    X, y = data
    keep = torch.ones(40, dtype=torch.bool)
    keep[:5] = False
    cavi = CAVI(regression)
    cavi.run(X, y, keep=keep, progress=False)
    idata = to_inference_data(cavi, regression, X, y, keep=keep, num_samples=50)
    ll = idata.log_likelihood["y"].values[0]
    assert np.all(ll[:, :5] == 0) and np.all(ll[:, 5:] != 0)


def test_export_of_a_plain_svi_autoguide(data):
    X, y = data
    guide = AutoNormal(regression)
    svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(X, y)
    idata = to_inference_data(guide, regression, X, y, num_samples=300)
    assert idata.posterior["w"].shape == (1, 300, 2)
    assert idata.log_likelihood["y"].shape == (1, 300, 40)
    assert "sample_stats" not in idata.groups()


def test_mixture_export_has_local_sites():
    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.randn(50, generator=g) - 3, torch.randn(50, generator=g) + 3]).double()

    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2, dtype=y.dtype)))
        with pyro.plate("comp", 2):
            loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Normal(loc[z], 1.0), obs=y)

    cavi = CAVI(model, seed=0)
    cavi.run(y, progress=False)
    idata = to_inference_data(cavi, model, y, num_samples=100)
    assert idata.posterior["z"].shape == (1, 100, 100)
    assert idata.posterior["loc"].shape == (1, 100, 2)
    assert idata.log_likelihood["y"].shape == (1, 100, 100)


def four_clusters():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(25, generator=g) + c for c in (-9.0, -3.0, 3.0, 9.0)]).double()


def three_component_mixture(y):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
    with pyro.plate("comp", 3):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("y", dist.Normal(loc[z], 1.0), obs=y)


def test_fits_from_several_seeds_become_chains():
    """Seeds 0 and 1 end in different optima of a 3-component mixture of 4 clusters; seeds 4 and
    7 in the same one (same labelling): R-hat flags the former and not the latter."""
    y = four_clusters()
    fits = {}
    for seed in (0, 1, 4, 7):
        fits[seed] = CAVI(three_component_mixture, seed=seed, init="forgy")
        fits[seed].run(y, progress=False)
    elbos = {s: f.elbo_trace[-1] for s, f in fits.items()}
    assert abs(elbos[0] - elbos[1]) > 1.0 and abs(elbos[4] - elbos[7]) < 1e-4

    mixed = to_inference_data([fits[0], fits[1], fits[4]], three_component_mixture, y, num_samples=200)
    assert mixed.posterior["loc"].shape == (3, 200, 3)
    assert mixed.posterior["z"].shape == (3, 200, 100)
    assert float(az.rhat(mixed, var_names=["loc"])["loc"].max()) > 1.5
    order = [elbos[0], elbos[1], elbos[4]]
    assert mixed.attrs["chain_elbo"] == order
    assert mixed.attrs["best_chain"] == int(np.argmax(order))
    assert mixed.attrs["best_elbo"] == max(order)
    traces = mixed.sample_stats["elbo_trace"].values[:, 0]  # padded with NaN to the longest
    for c, f in enumerate([fits[0], fits[1], fits[4]]):
        n = len(f.elbo_trace)
        np.testing.assert_allclose(traces[c, :n], f.elbo_trace)
        assert np.isnan(traces[c, n:]).all()
    # chain c holds fit c's posterior
    np.testing.assert_allclose(
        mixed.posterior["loc"].values[1].mean(0), fits[1].posterior["loc"].mean.numpy(), atol=0.1
    )

    same = to_inference_data([fits[4], fits[7]], three_component_mixture, y, num_samples=200)
    assert float(az.rhat(same, var_names=["loc"])["loc"].max()) < 1.05


def test_empty_list_of_fits_is_refused(data):
    X, y = data
    with pytest.raises(ValueError, match="empty"):
        to_inference_data([], regression, X, y)


RHO = 0.95


def correlated():
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    pyro.sample("b", dist.Normal(RHO * a, (1 - RHO**2) ** 0.5))


def test_psis_weights_in_sample_stats_and_attrs():
    cavi = CAVI(correlated)
    cavi.run(progress=False)
    idata = to_inference_data(cavi, correlated, num_samples=1000, psis=True)
    lw = idata.sample_stats["log_weight"].values[0]
    lr = idata.sample_stats["log_ratio"].values[0]
    assert lw.shape == (1000,)
    # the stored weights are PSIS of the stored ratios, and the ratios belong to the stored draws
    ref_lw, ref_k = az.psislw(lr)
    np.testing.assert_allclose(lw, ref_lw, rtol=1e-10)
    assert idata.attrs["psis_khat"] == [pytest.approx(float(ref_k))]
    assert idata.attrs["psis_khat"][0] > 0.7 and idata.attrs["psis_reading"] == ["bad"]
    a, b = idata.posterior["a"].values[0], idata.posterior["b"].values[0]
    q = cavi.posterior
    ref_lr = (
        dist.Normal(0.0, 1.0).log_prob(torch.as_tensor(a))
        + dist.Normal(RHO * torch.as_tensor(a), (1 - RHO**2) ** 0.5).log_prob(torch.as_tensor(b))
        - q["a"].log_prob(torch.as_tensor(a))
        - q["b"].log_prob(torch.as_tensor(b))
    )
    np.testing.assert_allclose(lr, ref_lr.numpy(), atol=1e-6)
    assert idata.attrs["psis_ess"][0] == pytest.approx(1 / np.exp(2 * lw).sum())


def test_psis_resampled_posterior_is_wider_than_mean_field():
    cavi = CAVI(correlated)
    cavi.run(progress=False)
    plain = to_inference_data(cavi, correlated, num_samples=2000)
    resampled = to_inference_data(cavi, correlated, num_samples=2000, psis="resample")
    assert "log_weight" not in resampled.sample_stats
    assert resampled.attrs["psis_khat"][0] > 0.7
    a_plain = plain.posterior["a"].values.ravel()
    a_res = resampled.posterior["a"].values.ravel()
    assert np.var(a_res) > 1.5 * np.var(a_plain)  # exact variance is 1, mean-field 1 - rho^2
    # correlation comes back: the mean-field draws are independent
    b_res = resampled.posterior["b"].values.ravel()
    assert np.corrcoef(a_res, b_res)[0, 1] > 0.3
    with pytest.raises(ValueError, match="psis must be"):
        to_inference_data(cavi, correlated, num_samples=10, psis="yes")


def test_svi_guides_as_chains_get_psis_elbo_estimates(data):
    X, y = data
    guides = []
    with pyro.settings.context(module_local_params=True):  # two AutoNormals, two sets of parameters
        for seed in range(2):
            pyro.set_rng_seed(seed)
            guide = AutoNormal(regression)
            svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
            for _ in range(100 * (seed + 1)):
                svi.step(X, y)
            guides.append(guide)
        idata = to_inference_data(guides, regression, X, y, num_samples=300, psis=True)
    assert idata.posterior["w"].shape == (2, 300, 2)
    est = idata.attrs["psis_elbo_estimate"]
    lr = idata.sample_stats["log_ratio"].values
    np.testing.assert_allclose(est, lr.mean(1))
    assert idata.attrs["chain_elbo"] == est and idata.attrs["best_chain"] == int(np.argmax(est))


def test_psis_export_of_an_nghvi_hybrid_guide():
    """The exported draws of alpha are the ones the PSIS weights belong to."""
    from models.mixed import linear_random_intercept, simulate_linear_random_intercept
    from pyro_cavi.nghvi import HybridELBO, HybridGuide

    train, _ = simulate_linear_random_intercept(num_groups=6, group_size=4, sigma2_a=1.0, seed=0)
    args = (train["X"], train["group"], train["num_groups"], train["y"])
    guide = HybridGuide(linear_random_intercept, "alpha", rank=1)
    HybridELBO(guide.conditional).loss(linear_random_intercept, guide, *args)  # creates the parameters
    idata = to_inference_data(guide, linear_random_intercept, *args, num_samples=12, psis=True)
    assert idata.posterior["alpha"].shape == (1, 12, 6)
    lr = idata.sample_stats["log_ratio"].values[0]
    # the ratio is p(theta, y) / q(theta): recompute log p(theta, alpha, y) - log p(alpha | theta, y) - log q(theta)
    post = idata.posterior
    for s in range(2):
        theta = {k: torch.as_tensor(post[k].values[0, s]) for k in ("beta", "sigma2_a", "sigma2_e")}
        alpha = torch.as_tensor(post["alpha"].values[0, s])
        joint = poutine.trace(poutine.condition(linear_random_intercept, data={**theta, "alpha": alpha})).get_trace(*args)
        with torch.no_grad():
            cond = guide.conditional.log_prob(linear_random_intercept, theta, {"alpha": alpha}, *args)
            u = torch.cat([theta["beta"], theta["sigma2_a"].log()[None], theta["sigma2_e"].log()[None]])
            log_q = guide.global_guide.get_posterior().log_prob(u) - u[-2:].sum()
        ref = joint.log_prob_sum() - cond - log_q
        assert lr[s] == pytest.approx(ref.item(), abs=1e-3)
