"""CAVIConditional: exact Gaussian conditionals p(z | theta, y) found by the CAVI engine."""

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import NonConjugateError
from pyro_cavi.cavi.conditional import CAVIConditional


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def random_intercepts(x, group, y=None, G=5):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.0))
    with pyro.plate("groups", G):
        a = pyro.sample("a", dist.Normal(0.0, sigma_a))
    with pyro.plate("data", len(x)):
        return pyro.sample("y", dist.Normal(beta[0] + beta[1] * x + a[group], 0.5), obs=y)


def _data(n=40, G=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    group = torch.arange(n) % G
    y = 1.0 + 0.5 * x + torch.randn(G, generator=g)[group] + 0.5 * torch.randn(n, generator=g)
    return x, group, y


def test_random_intercepts_conditional_is_exact():
    """Given theta the intercepts are independent Gaussians: precision 1/sigma_a² + n_g/0.25,
    mean (sum of residuals in the group / 0.25) / precision. Non-conjugate global priors
    (HalfNormal on sigma_a) do not matter: they are conditioned on."""
    x, group, y = _data()
    theta = {"beta": torch.tensor([1.0, 0.5]), "sigma_a": torch.tensor(0.8)}
    sampler = CAVIConditional(["a"])
    cavi = sampler.fit(random_intercepts, theta, x, group, y)
    q = cavi.posterior["a"]
    resid = y - 1.0 - 0.5 * x
    n_g = torch.bincount(group).double()
    prec = 1 / 0.64 + n_g / 0.25
    mean = torch.zeros(5).index_add_(0, group, resid) / 0.25 / prec
    assert torch.allclose(q.mean, mean, rtol=1e-10)
    assert torch.allclose(q.variance, 1 / prec, rtol=1e-10)
    draws = torch.stack([sampler(random_intercepts, theta, x, group, y)["a"] for _ in range(400)])
    assert torch.allclose(draws.mean(0), mean, atol=4 * (1 / prec).sqrt().max() / 20)
    z = {"a": mean}
    expected = dist.Normal(mean, prec.rsqrt()).log_prob(mean).sum()
    assert float(sampler.log_prob(random_intercepts, theta, z, x, group, y)) == pytest.approx(float(expected), rel=1e-10)


def test_missing_theta_and_non_gaussian_conditionals_are_refused():
    x, group, y = _data()
    with pytest.raises(ValueError, match=r"theta lacks \['sigma_a'\]"):
        CAVIConditional(["a"]).fit(random_intercepts, {"beta": torch.zeros(2)}, x, group, y)

    def logistic(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Bernoulli(logits=w * x + u), obs=y)

    with pytest.raises(NonConjugateError, match="PolyaGammaGibbs"):
        CAVIConditional(["u"]).fit(logistic, {"w": torch.tensor(1.0)}, x, (y > 1).double())

    def discrete(x, group, y):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 5):
            a = pyro.sample("a", dist.Bernoulli(0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(b + a[group], 1.0), obs=y)

    # before: an IndexError from tracing the model with 'a' enumerated
    with pytest.raises(NonConjugateError, match=r"local site 'a' is discrete \(Bernoulli\)"):
        CAVIConditional(["a"]).fit(discrete, {"b": torch.tensor(0.0)}, x, group, y)


def test_cavi_conditional_agrees_with_nghvi_gaussian_conditional_and_drives_hybrid_vi():
    """The CAVI-derived conditional of the random intercepts in the paper's Example 1 model equals
    NG-HVI's own autodiff-derived GaussianConditional (an independent derivation), and plugs into
    SVI with the NG-HVI optimiser and hybrid loss."""
    import pathlib
    import sys

    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from pyro_cavi.nghvi import GaussianConditional, HybridELBO, NGHVIOptim

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
    import mixed

    train, _ = mixed.simulate_linear_random_intercept(num_groups=30, group_size=6, seed=0)
    X, y, group, G = train["X"].double(), train["y"].double(), train["group"], train["num_groups"]
    model = mixed.linear_random_intercept
    theta = {"beta": torch.tensor([0.8, -1.3, 1.0, 1.7, -1.8, 0.06], dtype=torch.float64),
             "sigma2_a": torch.tensor(0.9, dtype=torch.float64), "sigma2_e": torch.tensor(1.1, dtype=torch.float64)}
    ours, theirs = CAVIConditional(["alpha"]), GaussianConditional("alpha")
    z = {"alpha": torch.randn(G, dtype=torch.float64)}
    a = ours.log_prob(model, theta, z, X, group, G, y)
    b = theirs.log_prob(model, theta, z, X, group, G, y)
    assert float(a) == pytest.approx(float(b), rel=1e-9)

    pyro.clear_param_store()
    guide = AutoLowRankMultivariateNormal(pyro.poutine.block(model, hide=["alpha"]), rank=2)
    svi = SVI(model, guide, NGHVIOptim(), loss=HybridELBO(ours))
    losses = [svi.step(X, group, G, y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_hybrid_guide_with_cavi_conditional_runs_and_exports():
    import pathlib
    import sys

    from pyro.infer import SVI

    from pyro_cavi import HybridELBO, HybridGuide, NGHVIOptim, to_inference_data

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
    import mixed

    train, _ = mixed.simulate_linear_random_intercept(num_groups=20, group_size=4, seed=1)
    X, y, group, G = train["X"].double(), train["y"].double(), train["group"], train["num_groups"]
    pyro.clear_param_store()
    guide = HybridGuide(mixed.linear_random_intercept, CAVIConditional(["alpha"]), rank=2)
    svi = SVI(mixed.linear_random_intercept, guide, NGHVIOptim(), loss=HybridELBO(guide.conditional))
    losses = [svi.step(X, group, G, y) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    idata = to_inference_data(guide, mixed.linear_random_intercept, X, group, G, y, num_samples=20)
    assert idata.posterior["alpha"].shape == (1, 20, G)
