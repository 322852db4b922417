"""ForwardKL: posterior vs closed form, unbiased loss, vectorised simulations, clear errors."""

import math

import pytest
import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist
from pyro.infer import Predictive

from pyro_cavi.forward_kl import (
    AmortisedPosterior,
    DiagonalNormalHead,
    ForwardKL,
    MultivariateNormalHead,
    NTKMLP,
)

TAU, SIGMA, N = 2.0, 1.0, 5


def normal_normal(x):
    theta = pyro.sample("theta", dist.Normal(0.0, TAU))
    with pyro.plate("data", N):
        pyro.sample("x", dist.Normal(theta, SIGMA), obs=x)


def exact_normal_normal(x):
    """p(θ | x) for θ ~ N(0, τ²), x_i ~ N(θ, σ²): precision 1/τ² + n/σ²."""
    precision = 1 / TAU**2 + x.shape[-1] / SIGMA**2
    return x.sum(-1) / SIGMA**2 / precision, 1 / precision


def linear_guide():
    return AmortisedPosterior(nn.Linear(N, 2), {"theta": DiagonalNormalHead()})


def fit(model, guide, data, steps, lr=0.02, num_simulations=256, **kwargs):
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    engine = ForwardKL(model, guide, optim, num_simulations=num_simulations, **kwargs)
    for _ in range(steps):
        engine.step(data)
    return engine


@pytest.fixture(autouse=True)
def clear_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_normal_normal_exact_posterior():
    """A linear Gaussian head can represent p(θ | x) exactly (η₁ = Σx/σ², η₂ = -precision/2),
    so the forward-KL optimum is the exact posterior at every data set.
    Tolerance: |mean error| < 0.03 (posterior sd 0.44), relative variance error < 5%."""
    pyro.set_rng_seed(0)
    x_obs = torch.tensor([1.3, 0.2, 2.1, 0.7, 1.6])
    engine = fit(normal_normal, linear_guide(), x_obs, steps=2500, num_simulations=1024)
    for x in (x_obs, torch.tensor([-3.0, -2.0, -2.5, -4.0, -1.0]), torch.zeros(N)):
        q = engine.posterior(x)["theta"]
        mean, variance = exact_normal_normal(x)
        assert abs(q.mean.item() - mean.item()) < 0.03
        assert abs(q.variance.item() / variance - 1) < 0.05
    # the guide for Predictive draws from the same q
    samples = Predictive(normal_normal, guide=engine.guide, num_samples=4000, parallel=True)(x_obs)
    mean, variance = exact_normal_normal(x_obs)
    assert abs(samples["theta"].mean().item() - mean.item()) < 0.05
    assert samples["x"].shape == (4000, N)


def test_bivariate_normal_full_covariance_head():
    """θ ~ N(0, Σ₀) in ℝ², x_i ~ N(θ, Σ): posterior precision Σ₀⁻¹ + nΣ⁻¹, mean
    Λ⁻¹ Σ⁻¹ Σx_i (correlated), learned by a linear MultivariateNormalHead."""
    pyro.set_rng_seed(1)
    prior_cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    noise_cov = torch.tensor([[1.0, -0.3], [-0.3, 0.5]])
    n = 3

    def model(x):
        theta = pyro.sample("theta", dist.MultivariateNormal(torch.zeros(2), prior_cov))
        with pyro.plate("data", n):
            pyro.sample("x", dist.MultivariateNormal(theta, noise_cov), obs=x)

    class Flatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2 * n, MultivariateNormalHead(2).num_outputs)

        def forward(self, x):
            return self.linear(x.flatten(-2))

    guide = AmortisedPosterior(Flatten(), {"theta": MultivariateNormalHead(2)})
    x_obs = torch.tensor([[0.5, 1.0], [1.5, 0.2], [0.9, 0.4]])
    engine = fit(model, guide, x_obs, steps=1200, lr=0.05, num_simulations=128)
    precision = prior_cov.inverse() + n * noise_cov.inverse()
    covariance = precision.inverse()
    mean = covariance @ noise_cov.inverse() @ x_obs.sum(0)
    q = engine.posterior(x_obs)["theta"]
    assert torch.allclose(q.mean, mean, atol=0.05)
    assert torch.allclose(q.covariance_matrix, covariance, atol=0.1 * covariance.diag().max().item())


def _fixed_linear_guide(weight, bias, raw_scale):
    guide = linear_guide()
    with torch.no_grad():
        guide.encoder.weight.zero_()
        guide.encoder.bias.zero_()
        # η₁ = w·x + b, raw₂ fixed => σ² = 1 / (2 softplus(raw₂)), μ = η₁ σ²
        guide.encoder.weight[0] = weight
        guide.encoder.bias[0] = bias
        guide.encoder.bias[1] = raw_scale
    return guide


def _expected_loss(weight, bias, raw_scale):
    """Closed form E_{p(θ,x)}[-log q(θ | x)] for q = N(m(x), s²), m = s²(w·x + b):
    θ - m = θ(1 - s² Σw) - s² w·ε - s² b, so E(θ - m)² = τ²(1 - s²Σw)² + σ² s⁴ |w|² + s⁴ b²."""
    s2 = 1 / (2 * torch.nn.functional.softplus(torch.tensor(raw_scale)).item())
    w = torch.as_tensor(weight)
    second_moment = TAU**2 * (1 - s2 * w.sum().item()) ** 2 + SIGMA**2 * s2**2 * (w**2).sum().item()
    second_moment += s2**2 * bias**2
    return 0.5 * math.log(2 * math.pi * s2) + second_moment / (2 * s2)


def test_loss_is_unbiased():
    pyro.set_rng_seed(2)
    weight, bias, raw_scale = torch.full((N,), 0.7), 0.4, 1.5
    guide = _fixed_linear_guide(weight, bias, raw_scale)
    engine = ForwardKL(normal_normal, guide, pyro.optim.Adam({"lr": 0.0}), num_simulations=4)
    x = torch.zeros(N)
    expected = _expected_loss(weight, bias, raw_scale)
    # a large-sample value agrees with the closed form
    large = engine.evaluate_loss(x, num_simulations=200_000)
    assert abs(large - expected) < 0.01 * abs(expected)
    # the mean of many 4-simulation estimates is within 4 standard errors of it
    estimates = torch.tensor([engine.evaluate_loss(x) for _ in range(1500)])
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - expected) < 4 * standard_error.item()
    # and so is the mean of step() values (the step's loss is the same estimator)
    steps = torch.tensor([engine.step(x) for _ in range(1500)])
    assert abs(steps.mean().item() - expected) < 4 * steps.std().item() / math.sqrt(len(steps))


def test_loss_on_matches_reference():
    pyro.set_rng_seed(3)
    guide = _fixed_linear_guide(torch.linspace(-1, 1, N), -0.3, 0.2)
    engine = ForwardKL(normal_normal, guide, pyro.optim.Adam({"lr": 0.0}), num_simulations=16)
    latents, observations = engine.simulate(16, torch.zeros(N))
    s2 = 1 / (2 * torch.nn.functional.softplus(torch.tensor(0.2)))
    mean = s2 * (observations["x"] @ torch.linspace(-1, 1, N) - 0.3)
    reference = -torch.distributions.Normal(mean, s2.sqrt()).log_prob(latents["theta"]).mean()
    assert torch.allclose(engine.loss_on(latents, observations), reference, atol=1e-5)


def test_simulations_are_one_vectorised_call():
    calls = []

    def model(x):
        calls.append(1)
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.Gamma(2.0, 2.0))
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            pyro.sample("x", dist.Normal(theta, scale), obs=x)

    heads = {"theta": DiagonalNormalHead(), "scale": DiagonalNormalHead()}
    guide = AmortisedPosterior(nn.Sequential(nn.Flatten(-2), nn.Linear(12, 4)), heads)
    engine = ForwardKL(model, guide, pyro.optim.Adam({"lr": 1e-3}), num_simulations=37)
    x = torch.randn(3, 4)
    latents, observations = engine.simulate(37, x)
    calls.clear()
    engine.step(x)
    assert len(calls) == 1  # one model call for all 37 simulations
    assert latents["theta"].shape == (37,) and latents["scale"].shape == (37,)
    assert observations["x"].shape == (37, 3, 4)
    assert latents["theta"].unique().numel() == 37  # fresh draws, not copies
    # each simulated data set is centred on its own θ
    residual = observations["x"] - latents["theta"][:, None, None]
    assert residual.abs().mean() < observations["x"].abs().mean()
    assert engine.structure(x).max_plate_nesting == 2


def test_marginalised_nuisance_latent():
    """θ, z ~ N(0, 1), x_i ~ N(θ + z, 1): with z marginalised, q targets p(θ | x), which
    is Gaussian with Cov(θ, x̄) = 1, Var(x̄) = 2 + 1/n: mean x̄ / (2 + 1/n), var 1 - 1/(2 + 1/n)."""
    pyro.set_rng_seed(4)

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            pyro.sample("x", dist.Normal(theta + z, 1.0), obs=x)

    x = torch.tensor([0.5, 1.5, 1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"\['z'\] have no head"):
        ForwardKL(model, linear_guide(), pyro.optim.Adam({"lr": 0.01})).step(x)
    engine = fit(model, linear_guide(), x, steps=1500, lr=0.03, num_simulations=512, marginalise=["z"])
    q = engine.posterior(x)["theta"]
    var_xbar = 2 + 1 / N
    assert abs(q.mean.item() - x.mean().item() / var_xbar) < 0.03
    assert abs(q.variance.item() / (1 - 1 / var_xbar) - 1) < 0.05


def test_local_latent_is_refused():
    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(theta, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = AmortisedPosterior(nn.Linear(N, 4 + 2 * N), {"theta": DiagonalNormalHead(), "z": DiagonalNormalHead(N)})
    engine = ForwardKL(model, guide, pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(ValueError, match="'z' is local: it sits in plate 'data'"):
        engine.step(torch.zeros(N))
    # marginalising the local latent is fine
    engine = ForwardKL(model, linear_guide(), pyro.optim.Adam({"lr": 0.01}), marginalise=["z"])
    assert math.isfinite(engine.step(torch.zeros(N)))


def test_clear_errors():
    x = torch.zeros(N)
    adam = pyro.optim.Adam({"lr": 0.01})
    with pytest.raises(ValueError, match="num_simulations must be a positive int, got 0"):
        ForwardKL(normal_normal, linear_guide(), adam, num_simulations=0)
    with pytest.raises(TypeError, match="AmortisedPosterior"):
        ForwardKL(normal_normal, nn.Linear(N, 2), adam)
    with pytest.raises(TypeError, match="PyroOptim"):
        ForwardKL(normal_normal, linear_guide(), torch.optim.Adam)
    with pytest.raises(ValueError, match=r"observed=\['y'\] names \['y'\]"):
        ForwardKL(normal_normal, linear_guide(), adam, observed=["y"]).step(x)
    wrong_site = AmortisedPosterior(nn.Linear(N, 2), {"mu": DiagonalNormalHead()})
    with pytest.raises(ValueError, match="'mu' is not a latent site"):
        ForwardKL(normal_normal, wrong_site, adam).step(x)
    wrong_shape = AmortisedPosterior(nn.Linear(N, 4), {"theta": DiagonalNormalHead(2)})
    with pytest.raises(ValueError, match=r"models shape \(2,\), but the site has shape \(\)"):
        ForwardKL(normal_normal, wrong_shape, adam).step(x)
    wrong_width = AmortisedPosterior(nn.Linear(N, 3), {"theta": DiagonalNormalHead()})
    with pytest.raises(ValueError, match=r"encoder returned features of shape \(256, 3\).*need 2"):
        ForwardKL(normal_normal, wrong_width, adam).step(x)

    def not_vectorised(x):
        theta = pyro.sample("theta", dist.Normal(0.0, TAU))
        pyro.sample("x", dist.Normal(theta, SIGMA).expand([N]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="vectorised plate"):
        ForwardKL(not_vectorised, linear_guide(), adam).step(x)

    def no_data(x):
        pyro.sample("theta", dist.Normal(0.0, TAU))

    with pytest.raises(ValueError, match="no observed site"):
        ForwardKL(no_data, linear_guide(), adam).step(x)


def test_ntk_guide_validation_loss_decreases():
    pyro.set_rng_seed(5)
    guide = AmortisedPosterior(NTKMLP(N, 2, width=64), {"theta": DiagonalNormalHead()})
    engine = ForwardKL(normal_normal, guide, pyro.optim.Adam({"lr": 0.01}), num_simulations=128)
    x = torch.ones(N)
    before = engine.validation_loss(x)
    assert engine.validation_loss(x) == before  # fixed validation set
    for _ in range(300):
        engine.step(x)
    after = engine.validation_loss(x)
    # the zero-initialised network starts at N(0, 0.72); the optimum is the exact posterior,
    # whose expected NLL is ½ log(2πe · 1/(1/τ² + n/σ²))
    optimum = 0.5 * math.log(2 * math.pi * math.e / (1 / TAU**2 + N / SIGMA**2))
    assert after < before - 1.0
    assert after < optimum + 0.15


def test_set_encoder_serves_data_sets_of_any_size():
    """One engine, data sets of different sizes: the model is read once per size and a
    mean-pool encoder takes any n."""
    from pyro_cavi.forward_kl import MeanPoolEncoder

    def model(x, n):
        theta = pyro.sample("theta", dist.Normal(0.0, TAU))
        with pyro.plate("data", n):
            pyro.sample("x", dist.Normal(theta, SIGMA), obs=x)

    encoder = MeanPoolEncoder(nn.Linear(1, 4), nn.Linear(4, 2))
    engine = ForwardKL(model, AmortisedPosterior(encoder, {"theta": DiagonalNormalHead()}),
                       pyro.optim.Adam({"lr": 0.01}), num_simulations=8)
    for n in (5, 20, 5):
        latents, observations = engine.simulate(8, torch.zeros(n), n)
        assert observations["x"].shape == (8, n)
        engine.step(torch.zeros(n), n)
        assert engine.posterior(torch.zeros(n), n)["theta"].batch_shape == ()


def test_discrete_latent_categorical_head():
    """k ~ Categorical(p), x_i ~ N(μ_k, 1): the posterior logits log p_k + μ_k Σx - n μ_k²/2
    are linear in x, so a linear CategoricalHead reaches p(k | x) exactly.
    Tolerance: 0.03 on each probability."""
    from pyro_cavi.forward_kl import CategoricalHead

    pyro.set_rng_seed(6)
    prior = torch.tensor([0.2, 0.3, 0.5])
    means = torch.tensor([-1.0, 0.0, 1.0])
    n = 4

    def model(x):
        k = pyro.sample("k", dist.Categorical(prior))
        with pyro.plate("data", n):
            pyro.sample("x", dist.Normal(means[k], 1.0), obs=x)

    guide = AmortisedPosterior(nn.Linear(n, 3), {"k": CategoricalHead(3)})
    engine = fit(model, guide, torch.zeros(n), steps=1500, lr=0.03)
    for x in (torch.zeros(n), torch.tensor([0.5, 1.5, 1.0, 0.2]), torch.tensor([-1.0, -2.0, 0.0, -0.5])):
        logits = prior.log() + means * x.sum() - n * means**2 / 2
        assert torch.allclose(engine.posterior(x)["k"].probs, logits.softmax(-1), atol=0.03)


def test_to_inference_data_reads_the_amortised_posterior():
    """ArviZ export draws from ForwardKL.guide: posterior draws match q(θ | x_obs) and the
    pointwise log likelihood is the model's density at each draw."""
    to_inference_data = pytest.importorskip("pyro_cavi.arviz_export").to_inference_data
    pyro.set_rng_seed(7)
    guide = _fixed_linear_guide(torch.full((N,), 0.9), 0.2, 1.0)
    engine = ForwardKL(normal_normal, guide, pyro.optim.Adam({"lr": 0.0}))
    x = torch.tensor([1.3, 0.2, 2.1, 0.7, 1.6])
    idata = to_inference_data(engine, normal_normal, x, num_samples=3000)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert hasattr(idata, group), group
    q = engine.posterior(x)["theta"]
    draws = torch.as_tensor(idata.posterior["theta"].values).reshape(-1)
    assert draws.numel() == 3000
    assert abs(draws.mean().item() - q.mean.item()) < 5 * q.stddev.item() / math.sqrt(3000)
    ll = torch.as_tensor(idata.log_likelihood["x"].values).reshape(3000, N)
    reference = dist.Normal(draws.unsqueeze(-1), SIGMA).log_prob(x)
    assert torch.allclose(ll.to(reference.dtype), reference, atol=1e-4)
    assert idata.posterior_predictive["x"].values.reshape(3000, N).shape == (3000, N)
