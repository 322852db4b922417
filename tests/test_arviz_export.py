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
