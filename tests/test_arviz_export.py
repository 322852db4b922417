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

from conftest import gaussian_mixture, three_component_mixture

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

    model = gaussian_mixture(2)
    cavi = CAVI(model, seed=0)
    cavi.run(y, progress=False)
    idata = to_inference_data(cavi, model, y, num_samples=100)
    assert idata.posterior["z"].shape == (1, 100, 100)
    assert idata.posterior["loc"].shape == (1, 100, 2)
    assert idata.log_likelihood["y"].shape == (1, 100, 100)


def four_clusters():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(25, generator=g) + c for c in (-9.0, -3.0, 3.0, 9.0)]).double()


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


# ---------------------------------------------------------------------------------------------
# held-out data: log likelihood per held-out point, local latents marginalised by the caller


def test_heldout_log_likelihood_is_the_predictive_density_of_each_draw(data):
    X, y = data
    g = torch.Generator().manual_seed(5)
    X_new = torch.randn(15, 2, generator=g, dtype=torch.float64)
    y_new = X_new @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * torch.randn(15, generator=g, dtype=torch.float64)
    cavi = CAVI(regression)
    cavi.run(X, y, progress=False)
    seen = []

    def predictive(draw):
        seen.append(sorted(draw))
        return dist.Normal(X_new @ draw["w"], draw["tau"].rsqrt())

    idata = to_inference_data([cavi, cavi], regression, X, y, num_samples=300, heldout=(predictive, y_new))
    assert seen[0] == ["tau", "w"] and len(seen) == 600  # one call per draw and chain
    w, tau = (torch.as_tensor(idata.posterior[k].values) for k in ("w", "tau"))
    assert w.shape == (2, 300, 2)  # the posterior group is the usual one
    ll = idata.log_likelihood["y"].values
    assert ll.shape == (2, 300, 15)
    ref = dist.Normal(w @ X_new.T, tau.unsqueeze(-1).rsqrt()).log_prob(y_new)
    np.testing.assert_allclose(ll, ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y_new.numpy())
    yrep = idata.posterior_predictive["y"].values
    assert yrep.shape == (2, 300, 15)
    # replicated data: mean X_new E[w], spread (E[1/tau] + X_new Cov[w] X_new^T)^(1/2)
    q = cavi.posterior["w"]
    sd = np.sqrt(float((1 / tau).mean()) + ((X_new @ q.covariance_matrix) * X_new).sum(-1).numpy())
    assert np.all(np.abs(yrep.reshape(600, 15).mean(0) - (X_new @ q.mean).numpy()) < 5 * sd / np.sqrt(600))
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_heldout_errors_name_the_problem(data):
    X, y = data
    cavi = CAVI(regression)
    cavi.run(X, y, num_steps=5, progress=False)
    X_new, y_new = X[:7], y[:7]

    def good(draw):
        return dist.Normal(X_new @ draw["w"], 1.0)

    with pytest.raises(TypeError, match="pair"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=good)
    with pytest.raises(ValueError, match=r"batch_shape \+ event_shape \(7,\).*shape \(6,\)"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=(good, y_new[:6]))
    with pytest.raises(ValueError, match="one log density"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=(lambda d: good(d).to_event(1), y_new))
    with pytest.raises(TypeError, match="Distribution"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=(lambda d: X_new @ d["w"], y_new))
    with pytest.raises(ValueError, match=r"returned \['y'\].*\['y_test'\]"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=(lambda d: {"y": good(d)}, {"y_test": y_new}))
    with pytest.raises(TypeError, match="tensor"):
        to_inference_data(cavi, regression, X, y, num_samples=3, heldout=(good, y_new.tolist()))

    def two_outputs(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)
            pyro.sample("y2", dist.Normal(X @ w, 2.0), obs=y)

    fit2 = CAVI(two_outputs)
    fit2.run(X, y, num_steps=3, progress=False)
    with pytest.raises(ValueError, match=r"observed sites \['y', 'y2'\]"):
        to_inference_data(fit2, two_outputs, X, y, num_samples=3, heldout=(good, y_new))
    both = to_inference_data(
        fit2, two_outputs, X, y, num_samples=3, heldout=(lambda d: {"y": good(d), "y2": good(d)}, {"y": y_new, "y2": y_new})
    )
    assert set(both.log_likelihood.data_vars) == {"y", "y2"}


# a conditional mixture network: held-out log likelihood with the hidden units x1 and the
# gate z of each held-out point summed out


def _tilde(x):
    return torch.cat([x, torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)], -1)


def cmn_heldout_predictive(draw, X_new, num_x1=64):
    """p(y | x_new, theta) = sum_k pi_k(x_new) E_{x1 ~ N(A_k x~, 1/gamma_k)}[SB(y | B [x1, 1])],
    the expectation over x1 by ``num_x1`` Monte Carlo draws per expert and point."""
    from pyro_cavi.distributions import StickBreakingCategorical

    Xt = _tilde(X_new)
    log_w = StickBreakingCategorical(Xt @ draw["gate"].T).log_probs  # (N, K)
    loc = torch.einsum("khd,nd->nkh", draw["A"], Xt)  # (N, K, h)
    x1 = loc + draw["prec"].rsqrt() * torch.randn((num_x1,) + loc.shape, dtype=loc.dtype)
    log_p = StickBreakingCategorical(_tilde(x1) @ draw["out"].T).log_probs  # (M, N, K, L)
    log_p = torch.logsumexp(log_p, 0) - np.log(num_x1)
    return dist.Categorical(logits=torch.logsumexp(log_w.unsqueeze(-1) + log_p, -2))


class _Tiled:
    """Given posterior draws, dressed as a fitted engine for ``cmn.predict_proba``: asking
    for S samples returns the draws repeated S / len(draws) times."""

    class _Site:
        def __init__(self, value):
            self.value = value

        def sample(self, sample_shape):
            reps, rest = divmod(sample_shape[0], self.value.shape[0])
            assert rest == 0
            return self.value.repeat((reps,) + (1,) * (self.value.dim() - 1))

    def __init__(self, draws):
        self.posterior = {k: self._Site(v) for k, v in draws.items()}

    def sample_posterior(self, num_samples, sites):
        return {k: self.posterior[k].sample((num_samples,)) for k in sites}


@pytest.fixture(scope="module")
def cmn_fits():
    """CAVI (50 sweeps) and a short SVI run (150 steps) of one small CMN on pinwheels, both
    exported with the held-out log likelihood of 200 test points."""
    import functools
    import pathlib
    import sys

    from pyro.infer import config_enumerate

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
    import cmn
    from benchmarks.cmn_baselines import fit_bbvi

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(0)
        X, y = cmn.pinwheels(60, seed=1)
        X = (X - X[:100].mean(0)) / X[:100].std(0)
        Xtr, ytr, Xte, yte = X[:100], y[:100], X[100:], y[100:]
        K = 5
        cavi = cmn.fit_cavi(Xtr, ytr, num_experts=K, num_steps=50, seed=0)
        heldout = (lambda d: cmn_heldout_predictive(d, Xte), yte)
        model = functools.partial(cmn.cmn, num_experts=K)
        idata_cavi = to_inference_data(cavi, model, Xtr, ytr, num_samples=100, heldout=heldout)
        svi = fit_bbvi(Xtr, ytr, num_experts=K, num_steps=150, seed=0)
        idata_svi = to_inference_data(svi.guide, config_enumerate(model), Xtr, ytr, num_samples=100, heldout=heldout)
    finally:
        torch.set_default_dtype(old)
    return {"cmn": cmn, "Xte": Xte, "yte": yte, "cavi": idata_cavi, "svi": idata_svi}


def test_cmn_heldout_log_likelihood_matches_predict_proba(cmn_fits):
    cmn, Xte, yte, idata = cmn_fits["cmn"], cmn_fits["Xte"], cmn_fits["yte"], cmn_fits["cavi"]
    ll = idata.log_likelihood["y"].values[0]
    assert ll.shape == (100, 200) and idata.posterior_predictive["y"].shape == (1, 100, 200)
    np.testing.assert_array_equal(idata.observed_data["y"].values, yte.numpy())
    assert idata.posterior["x1"].shape == (1, 100, 100, 4)  # training-point locals stay in the posterior
    draws = {k: torch.as_tensor(idata.posterior[k].values[0]) for k in ("gate", "A", "prec", "out")}
    rows = torch.arange(len(yte))
    with torch.no_grad():
        # per draw: predict_proba on that one draw, x1 drawn 1000 times
        for s in range(3):
            ref = cmn.predict_proba(_Tiled({k: v[s : s + 1] for k, v in draws.items()}), Xte, num_samples=1000)
            other = cmn.predict_proba(_Tiled({k: v[s + 1 : s + 2] for k, v in draws.items()}), Xte, num_samples=1000)
            err = np.abs(np.exp(ll[s]) - ref[rows, yte].numpy()).mean()
            assert err < 0.03 and err < 0.5 * np.abs(np.exp(ll[s]) - other[rows, yte].numpy()).mean()
        # over the draws: the posterior predictive of the true class, draws repeated 20 times
        ref = cmn.predict_proba(_Tiled(draws), Xte, num_samples=100 * 20)[rows, yte].numpy()
    assert np.abs(np.exp(ll).mean(0) - ref).max() < 0.03
    # the posterior predictive draws are labels with the predicted class frequencies
    yrep = idata.posterior_predictive["y"].values[0]
    assert yrep.min() >= 0 and yrep.max() <= 4
    assert np.abs((yrep == yte.numpy()).mean() - ref.mean()) < 0.03


def test_az_compare_ranks_cavi_cmn_above_a_short_svi_fit(cmn_fits):
    fits = {"cavi": cmn_fits["cavi"], "svi": cmn_fits["svi"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = {name: az.loo(idata) for name, idata in fits.items()}
        table = az.compare(fits)
    assert all(np.isfinite(l.elpd_loo) for l in loo.values())
    assert list(table.index) == ["cavi", "svi"]
    for name in fits:
        assert table.loc[name, "elpd_loo"] == pytest.approx(loo[name].elpd_loo)
    # the SVI export has the same variable and points, so az.compare pairs them point by point
    assert fits["svi"].log_likelihood["y"].shape == (1, 100, 200)
    assert table.loc["svi", "elpd_diff"] > 2 * table.loc["svi", "dse"]


def _two_cluster_mixture(y):
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


@pytest.fixture(scope="module")
def nuts_mixture():
    from pyro.infer import MCMC, NUTS

    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(10, generator=g) - 4, torch.randn(10, generator=g) + 4])
    pyro.set_rng_seed(0)
    init = {"locs": torch.tensor([-4.0, 4.0])}  # one mode of the two label-switched ones
    mcmc = MCMC(NUTS(_two_cluster_mixture, max_plate_nesting=1, init_strategy=lambda site=None: init[site["name"]]),
                num_samples=30, warmup_steps=30, disable_progbar=True)
    mcmc.run(y)
    return mcmc, y


def test_mcmc_export_holds_its_draws_and_infers_enumerated_sites(nuts_mixture):
    """A NUTS run with the mixture's ``z`` enumerated out exports its own draws of ``locs``, and
    ``z`` drawn from p(z | locs, y): with clusters 8 standard deviations apart that is the nearer
    location for (almost) every point, where draws from the prior would agree half the time. The
    pointwise log likelihood is log N(y_n | locs[z_n], 1) of each draw, written out."""
    mcmc, y = nuts_mixture
    idata = to_inference_data(mcmc, _two_cluster_mixture, y)
    locs = mcmc.get_samples(group_by_chain=True)["locs"]
    np.testing.assert_array_equal(idata.posterior["locs"].values, locs.numpy())
    z = torch.as_tensor(idata.posterior["z"].values)
    assert z.shape == (1, 30, 20)
    nearer = ((y - locs[..., 1:2]).abs() < (y - locs[..., 0:1]).abs()).long()
    assert (z == nearer).double().mean() > 0.97
    chosen = torch.gather(locs, -1, z)
    expected = dist.Normal(chosen, 1.0).log_prob(y)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected.numpy(), rtol=1e-6)
    assert idata.attrs["engine"] == "MCMC"
    # the same export from the model written without the enumeration marker the sampler needed

    def unmarked(y):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)

    z2 = torch.as_tensor(to_inference_data(mcmc, unmarked, y).posterior["z"].values)
    assert (z2 == nearer).double().mean() > 0.97


def test_mcmc_export_scores_heldout_points_and_refuses_what_it_cannot_do(nuts_mixture):
    mcmc, y = nuts_mixture
    y_new = torch.tensor([-4.5, 0.0, 3.0])

    def predictive(draw):  # p(y* | locs): the two-component mixture, z* summed out
        mix = dist.Categorical(torch.ones(2) / 2)
        return dist.MixtureSameFamily(mix, dist.Normal(draw["locs"], 1.0)).expand([len(y_new)])

    idata = to_inference_data(mcmc, _two_cluster_mixture, y, heldout=(predictive, y_new))
    locs = mcmc.get_samples()["locs"]
    expected = torch.logsumexp(dist.Normal(locs.unsqueeze(-1), 1.0).log_prob(y_new) + np.log(0.5), -2)
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected.numpy(), rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(az.loo(idata).elpd_loo)
    with pytest.raises(ValueError, match="psis needs a variational posterior"):
        to_inference_data(mcmc, _two_cluster_mixture, y, psis=True)
    with pytest.raises(ValueError, match=r"draws of \['locs'\], which are not latent sites"):
        to_inference_data(mcmc, regression, torch.randn(20, 2), y)

    def wider(y):
        pyro.sample("scale", dist.Gamma(2.0, 2.0))
        _two_cluster_mixture(y)

    with pytest.raises(ValueError, match=r"no draws of the model's continuous latent sites \['scale'\]"):
        to_inference_data(mcmc, wider, y)
