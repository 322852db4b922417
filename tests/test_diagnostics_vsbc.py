import warnings

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_cavi import CAVI
from pyro_cavi.diagnostics import VSBCResult, calibration_tests, plot_vsbc, vsbc

warnings.filterwarnings("ignore", module="arviz")


def normal_normal(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 2.0))
    pyro.deterministic("mu_squared", mu**2)  # neither data nor a latent to calibrate
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def line(x, y=None):
    """y ~ N(a + b x, 1) with x far from 0: a and b are strongly correlated a posteriori."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


def fit_cavi(model, *args, **kwargs):
    cavi = CAVI(model)
    cavi.run(*args, progress=False, tol=1e-6, **kwargs)
    return cavi


def test_exact_cavi_on_normal_normal_is_calibrated():
    """Stated test at seed 0: 100 data sets, exact CAVI, every test at the 5 % level passes."""
    y = torch.zeros(10, dtype=torch.float64)
    res = vsbc(normal_normal, fit_cavi, y, num_datasets=100, num_draws=1000, seed=0)
    assert res.pit["mu"].shape == (100,)
    assert set(res.pit) == {"mu"} and set(res.data) == {"y"}
    assert res.uniform_pvalue["mu"] > 0.05
    assert res.symmetry_pvalue["mu"] > 0.05
    assert abs(res.dispersion_z["mu"]) < 1.96
    assert res.flags() == {"mu": []}
    # each PIT is the exact posterior CDF at the truth, up to the Monte Carlo error of 1000 draws
    n = y.shape[0]
    post_var = 1 / (1 / 4 + n)
    post_mean = post_var * res.data["y"].sum(1)
    exact = dist.Normal(torch.as_tensor(post_mean), post_var**0.5).cdf(torch.as_tensor(res.truth["mu"])).numpy()
    assert np.abs(res.pit["mu"] - exact).max() < 0.06
    # the simulated data come from the prior predictive: y - mu has unit variance
    resid = res.data["y"] - res.truth["mu"][:, None]
    assert abs(resid.var() - 1.0) < 0.15


def test_mean_field_on_correlated_regression_is_flagged_under_dispersed():
    g = torch.Generator().manual_seed(0)
    x = 5.0 + torch.randn(10, generator=g, dtype=torch.float64)
    res = vsbc(line, fit_cavi, x, torch.zeros(10, dtype=torch.float64), num_datasets=40, num_draws=500, seed=0)
    flags = res.flags()
    assert flags["a"] == ["under-dispersed"] and flags["b"] == ["under-dispersed"]
    for site in "ab":  # the marginal means are right: no asymmetry
        assert res.symmetry_pvalue[site] > 0.01
        assert res.dispersion_z[site] > 3
    assert "under-dispersed" in res.summary()


def test_calibration_tests_against_known_shapes():
    rng = np.random.default_rng(0)
    m = 400
    pit = np.stack(
        [rng.uniform(size=m), rng.beta(0.4, 0.4, size=m), rng.beta(4, 4, size=m), rng.beta(2, 5, size=m)], axis=1
    )
    uniform_p, symmetry_p, z = calibration_tests(pit)
    assert uniform_p.shape == (4,)
    assert uniform_p[0] > 0.01 and (uniform_p[1:] < 1e-4).all()
    assert symmetry_p[:3].min() > 0.01 and symmetry_p[3] < 1e-6
    # z by hand: mean (u - 1/2)^2 against its uniform mean 1/12 and variance 1/(180 m)
    ref = (((pit - 0.5) ** 2).mean(0) - 1 / 12) / np.sqrt(1 / (180 * m))
    np.testing.assert_allclose(z, ref)
    assert abs(z[0]) < 3 and z[1] > 5 and z[2] < -5
    res = VSBCResult(
        pit={"u": pit}, truth={}, data={}, uniform_pvalue={"u": uniform_p}, symmetry_pvalue={"u": symmetry_p},
        dispersion_z={"u": z},
    )
    assert res.flags()["u"] == ["biased", "under-dispersed", "over-dispersed"]
    one = VSBCResult(
        pit={"u": pit[:, :1]}, truth={}, data={}, uniform_pvalue={"u": uniform_p[:1]},
        symmetry_pvalue={"u": symmetry_p[:1]}, dispersion_z={"u": z[:1]},
    )
    assert one.flags() == {"u": []}


def test_svi_guide_factory_and_plot():
    import matplotlib

    matplotlib.use("Agg")

    def fit_svi(model, y):
        guide = AutoNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
        for _ in range(50):
            svi.step(y)
        return guide

    y = torch.zeros(5)
    with pyro.settings.context(module_local_params=True):
        res = vsbc(normal_normal, fit_svi, y, num_datasets=8, num_draws=200, seed=1)
    assert res.pit["mu"].shape == (8,) and ((res.pit["mu"] >= 0) & (res.pit["mu"] <= 1)).all()
    axes = plot_vsbc(res)
    assert len(axes) == 1 and axes[0].get_title() == "mu"
    with pytest.raises(ValueError, match="'nu' is not in the VSBC result"):
        plot_vsbc(res, sites=["nu"])


def test_bad_arguments():
    y = torch.zeros(5)
    with pytest.raises(ValueError, match="num_datasets"):
        vsbc(normal_normal, fit_cavi, y, num_datasets=1)
    with pytest.raises(ValueError, match="'nu' is not a latent site"):
        vsbc(normal_normal, fit_cavi, y, sites=["nu"], num_datasets=2)

    def prior_only():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sites"):
        vsbc(prior_only, fit_cavi, num_datasets=2)

    def mixture(y):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("y", dist.Normal(z.float(), 1.0), obs=y)

    with pytest.raises(ValueError, match="'z' is discrete"):
        vsbc(mixture, fit_cavi, torch.tensor(0.0), sites=["z"], num_datasets=2)
    with pytest.raises(TypeError, match="neither a fit"):
        vsbc(normal_normal, lambda model, y: 3, y, num_datasets=2)


def test_tests_hold_their_level_on_calibrated_pit_values():
    """600 uniform PIT columns of 100 data sets: each test rejects about 5 % at level 5 %
    (binomial sd 0.9 %); a U-shaped but symmetric PIT is not called biased more often."""
    rng = np.random.default_rng(1)
    for pit in (rng.uniform(size=(100, 600)), rng.beta(0.3, 0.3, size=(100, 600))):
        uniform_p, symmetry_p, z = calibration_tests(pit)
        assert 0.025 < (symmetry_p < 0.05).mean() < 0.075
    uniform_p, symmetry_p, z = calibration_tests(rng.uniform(size=(100, 600)))
    assert 0.025 < (uniform_p < 0.05).mean() < 0.075
    assert 0.025 < (np.abs(z) > 1.96).mean() < 0.075
