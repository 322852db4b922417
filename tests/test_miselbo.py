"""Correctness tests of MISELBO, its estimators and the mixture guides (issue 5)."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_cavi.miselbo import MISELBO, AmortizedMixtureGuide, MixtureEncoder, MixtureGuide, mis_log_likelihood

PRIOR_SCALE, NOISE_SCALE, D = 1.5, 1.0, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threading only adds overhead on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedNoiseNormal(dist.Normal):
    """Normal whose reparameterised draw uses a fixed standard-normal ``noise``."""

    def __init__(self, loc, scale, noise, validate_args=None):
        self.noise = noise
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return FixedNoiseNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.noise)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return (self.loc + self.scale * self.noise).expand(shape)


def gaussian_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(D), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, NOISE_SCALE).to_event(1), obs=x)


def fixed_noise_component(loc, scale, noise):
    def guide(x):
        pyro.sample("z", FixedNoiseNormal(loc, scale, noise).to_event(1))

    return guide


def normal_component(loc, scale):
    def guide(x):
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


@pytest.fixture
def data():
    pyro.set_rng_seed(0)
    return torch.randn(5, D) + torch.tensor([1.0, -0.5])


@pytest.fixture
def fixed_mixture():
    """A = 4 components with fixed locs, scales and noise (so z_a is deterministic)."""
    pyro.set_rng_seed(1)
    A = 4
    locs, scales, noise = torch.randn(A, D), 0.3 + torch.rand(A, D), torch.randn(A, D)
    guide = MixtureGuide([fixed_noise_component(locs[a], scales[a], noise[a]) for a in range(A)])
    return guide, locs.numpy(), scales.numpy(), noise.numpy()


def brute_force_terms(x, locs, scales, noise, subset, denominator):
    """Per-sampled-component MIS terms log p(x, z_a) - log mean_{j in denominator} q_j(z_a)."""
    x = x.numpy()
    terms = []
    for a in subset:
        z = locs[a] + scales[a] * noise[a]
        log_p = norm.logpdf(z, 0.0, PRIOR_SCALE).sum() + norm.logpdf(x, z, NOISE_SCALE).sum()
        log_qs = [norm.logpdf(z, locs[j], scales[j]).sum() for j in denominator]
        terms.append(log_p - (logsumexp(log_qs) - math.log(len(denominator))))
    return np.array(terms)


def test_a2a_equals_brute_force(data, fixed_mixture):
    guide, locs, scales, noise = fixed_mixture
    A = guide.num_components
    expected = brute_force_terms(data, locs, scales, noise, range(A), range(A)).mean()
    loss = MISELBO(num_components=A, estimator="a2a").loss(gaussian_model, guide, data)
    assert loss == pytest.approx(-expected, rel=1e-5)


@pytest.mark.parametrize("S", [1, 2, 3])
def test_s2a_over_all_subsets_equals_a2a(data, fixed_mixture, S):
    guide, locs, scales, noise = fixed_mixture
    A = guide.num_components
    a2a = MISELBO(num_components=A, estimator="a2a").loss(gaussian_model, guide, data)
    s2a = MISELBO(num_components=A, num_sampled=S, estimator="s2a")
    subsets = list(itertools.combinations(range(A), S))
    losses = [s2a.subset_loss(gaussian_model, guide, torch.tensor(c), data).item() for c in subsets]
    assert np.mean(losses) == pytest.approx(a2a, rel=1e-5)
    # each subset's value is itself the brute-force S2A estimate, and they differ from each other
    for c, loss in zip(subsets, losses):
        assert loss == pytest.approx(-brute_force_terms(data, locs, scales, noise, c, range(A)).mean(), rel=1e-5)
    assert np.std(losses) > 1e-3


def test_s2a_gradient_over_all_subsets_equals_a2a_gradient(data):
    pyro.set_rng_seed(12)
    A, S = 4, 2
    locs = torch.randn(A, D, requires_grad=True)
    log_scales = (0.3 * torch.randn(A, D)).requires_grad_()
    noise = torch.randn(A, D)
    def component(a):  # reads the leaf tensors on every call, like a guide reading pyro.params
        def guide(x):
            pyro.sample("z", FixedNoiseNormal(locs[a], log_scales[a].exp(), noise[a]).to_event(1))

        return guide

    guide = MixtureGuide([component(a) for a in range(A)])
    a2a = MISELBO(estimator="a2a").differentiable_loss(gaussian_model, guide, data)
    expected = torch.autograd.grad(a2a, [locs, log_scales])
    s2a = MISELBO(num_sampled=S, estimator="s2a")
    subsets = list(itertools.combinations(range(A), S))
    mean = sum(s2a.subset_loss(gaussian_model, guide, torch.tensor(c), data) for c in subsets) / len(subsets)
    actual = torch.autograd.grad(mean, [locs, log_scales])
    for g_actual, g_expected in zip(actual, expected):
        assert torch.allclose(g_actual, g_expected, rtol=1e-4, atol=1e-5)
    assert expected[0].abs().min() > 0


def test_particle_loop_averages_particles(data, fixed_mixture):
    guide, *_ = fixed_mixture  # fixed noise: every particle is the same draw
    one = MISELBO(estimator="a2a").loss(gaussian_model, guide, data)
    looped = MISELBO(estimator="a2a", num_particles=3).loss(gaussian_model, guide, data)
    vectorised = MISELBO(estimator="a2a", num_particles=3, vectorize_particles=True).loss(gaussian_model, guide, data)
    assert looped == pytest.approx(one, rel=1e-6) and vectorised == pytest.approx(one, rel=1e-6)


def test_s2s_uses_only_sampled_components(data, fixed_mixture):
    guide, locs, scales, noise = fixed_mixture
    s2s = MISELBO(num_components=4, num_sampled=2, estimator="s2s")
    loss = s2s.subset_loss(gaussian_model, guide, torch.tensor([3, 1]), data).item()
    assert loss == pytest.approx(-brute_force_terms(data, locs, scales, noise, [3, 1], [3, 1]).mean(), rel=1e-5)


def test_s2s_is_below_miselbo_on_average(data):
    pyro.set_rng_seed(2)
    A, S, L = 4, 2, 4000
    locs = torch.tensor([[0.0, 0.0], [0.6, 0.0], [0.0, 0.6], [0.6, 0.6]])
    guide = MixtureGuide([normal_component(locs[a], torch.full((D,), 0.5)) for a in range(A)])
    a2a = MISELBO(estimator="a2a", num_particles=L, vectorize_particles=True)
    s2s = MISELBO(num_sampled=S, estimator="s2s", num_particles=L, vectorize_particles=True)
    subsets = list(itertools.combinations(range(A), S))
    miselbo = -np.mean([a2a.loss(gaussian_model, guide, data) for _ in subsets])
    s2s_mean = -np.mean([s2s.subset_loss(gaussian_model, guide, torch.tensor(c), data).item() for c in subsets])
    # Monte Carlo error of each mean is about 0.01 nats here; the entropy gap is about 0.1
    assert s2s_mean < miselbo - 0.04
    # and it stays above the average single-component ELBO (S2S with S = 1)
    s1 = MISELBO(num_sampled=1, estimator="s2s", num_particles=L, vectorize_particles=True)
    elbo_mean = -np.mean([s1.subset_loss(gaussian_model, guide, torch.tensor([a]), data).item() for a in range(A)])
    assert elbo_mean < s2s_mean


def constrained_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, scale), obs=x)


@pytest.mark.parametrize("num_particles,vectorize", [(1, False), (3, True)])
def test_single_component_equals_trace_elbo(num_particles, vectorize):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    x = torch.randn(7) * 2 + 1
    guide = MixtureGuide([AutoNormal(constrained_model)])
    component = guide.components[0]
    trace_elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize)
    miselbo = MISELBO(num_components=1, estimator="s2a", num_particles=num_particles, vectorize_particles=vectorize)
    trace_elbo.loss(constrained_model, component, x)  # set up plate nesting (consumes randomness)
    miselbo.loss(constrained_model, guide, x)
    params = [p for p in component.parameters()]
    pyro.set_rng_seed(4)
    expected = trace_elbo.differentiable_loss(constrained_model, component, x)
    expected_grads = torch.autograd.grad(expected, params)
    pyro.set_rng_seed(4)
    actual = miselbo.differentiable_loss(constrained_model, guide, x)
    actual_grads = torch.autograd.grad(actual, params)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    for g_actual, g_expected in zip(actual_grads, expected_grads):
        assert torch.allclose(g_actual, g_expected, rtol=1e-5, atol=1e-6)


def hierarchical_model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", x.shape[0]):
        theta = pyro.sample("theta", dist.Normal(loc, scale.unsqueeze(-1)).to_event(1))
        pyro.sample("x", dist.Normal(theta, 1.0).to_event(1), obs=x)


def test_stacked_autonormal_densities_equal_one_replay_per_component():
    pyro.set_rng_seed(13)
    x = torch.randn(4, 2)
    guide = MixtureGuide.from_autoguide(hierarchical_model, 3, init_scale=0.7)
    elbo = MISELBO(num_sampled=2, estimator="s2a", num_particles=5, vectorize_particles=True)
    elbo.loss(hierarchical_model, guide, x)
    particle_dim = -elbo.max_plate_nesting - 1
    samples = guide.sample_components(torch.tensor([2, 0]), 5, particle_dim, x)
    fast = guide.log_prob_components(samples, torch.arange(3), particle_dim, x)
    assert fast.shape == (3, 10)
    loop = torch.stack([guide._replay_log_prob(a, samples, particle_dim, (x,), {}) for a in range(3)])
    assert torch.allclose(fast, loop, rtol=1e-5, atol=1e-4)
    # and against log densities written out by hand for component 1 at the first particle
    c = guide.components[1]
    z = {name: samples.values[name][0].squeeze() for name in ("loc", "scale", "theta")}
    ref = (dist.Normal(c.locs.loc, c.scales.loc).log_prob(z["loc"]).sum()
           + dist.LogNormal(c.locs.scale, c.scales.scale).log_prob(z["scale"])
           + dist.Normal(c.locs.theta, c.scales.theta).log_prob(z["theta"]).sum())
    assert fast[1, 0].item() == pytest.approx(ref.item(), rel=1e-5)


def _component_grads(guide, loss):
    grads = []
    for component in guide.components:
        params = list(component.parameters())
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append(sum(0.0 if gi is None else gi.abs().sum().item() for gi in g))
    return grads


def test_s2a_gradient_reaches_every_component(data):
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    guide = MixtureGuide.from_autoguide(gaussian_model, 5, init_scale=1.0)
    s2a = MISELBO(num_components=5, num_sampled=1, estimator="s2a")
    s2a.loss(gaussian_model, guide, data)
    grads = _component_grads(guide, s2a.subset_loss(gaussian_model, guide, torch.tensor([2]), data))
    assert all(g > 0 for g in grads)
    # and one SVI step moves every component (SVI sees all their parameters)
    before = [c.locs.z.detach().clone() for c in guide.components]
    SVI(gaussian_model, guide, pyro.optim.Adam({"lr": 0.01}), loss=s2a).step(data)
    assert all(not torch.equal(c.locs.z.detach(), b) for c, b in zip(guide.components, before))
    # S2S with S = 1 is the ELBO of the sampled component: only that component moves
    s2s = MISELBO(num_components=5, num_sampled=1, estimator="s2s")
    grads = _component_grads(guide, s2s.subset_loss(gaussian_model, guide, torch.tensor([2]), data))
    assert grads[2] > 0 and all(g == 0 for a, g in enumerate(grads) if a != 2)


def bimodal_model(y):
    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z**2, 1.0), obs=y)


def _fit(guide, loss, y, steps=300):
    svi = SVI(bimodal_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    for _ in range(steps):
        svi.step(y)


def test_mixture_covers_both_modes_where_one_gaussian_cannot():
    y = torch.full((4,), 4.0)  # posterior modes at z = +2 and z = -2, equal mass
    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    single = AutoNormal(bimodal_model)
    _fit(single, Trace_ELBO(), y)
    # two components started on either side of the saddle at z = 0 (symmetry broken by the init,
    # as for the single Gaussian, which starts at the prior median z = 0)
    pyro.set_rng_seed(6)
    mixture = MixtureGuide([AutoNormal(bimodal_model, init_loc_fn=init_to_value(values={"z": torch.tensor(v)}))
                            for v in (-0.3, 0.2)])
    _fit(mixture, MISELBO(num_components=2, num_sampled=1, estimator="s2a", num_particles=4, vectorize_particles=True), y)

    single_mean = single.locs.z.item()
    assert abs(abs(single_mean) - 2.0) < 0.1  # one mode, one sign only
    means = torch.stack([c.locs.z.detach() for c in mixture.components])
    assert means.max() > 1.8 and means.min() < -1.8
    assert torch.all((means.abs() - 2.0).abs() < 0.15)

    # the mixture's posterior mass on z > 0, from Predictive draws, is 1/2 (the true value by
    # symmetry); the single Gaussian puts all its mass on one side
    pyro.set_rng_seed(7)
    mix_draws = Predictive(bimodal_model, guide=mixture, num_samples=3000, parallel=True)(y)["z"]
    single_draws = Predictive(bimodal_model, guide=single, num_samples=3000, parallel=True)(y)["z"]
    assert (mix_draws > 0).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (single_draws > 0).float().mean().item() in (0.0, 1.0)

    # ArviZ export draws from the mixture too, with a pointwise log likelihood for az.loo
    import arviz as az

    from pyro_cavi import to_inference_data

    idata = to_inference_data(mixture, bimodal_model, y, num_samples=120)
    z = idata.posterior["z"].values.ravel()
    assert z.shape == (120,) and (z > 0).mean() == pytest.approx(0.5, abs=0.15)
    assert idata.log_likelihood["y"].shape == (1, 120, 4)
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_predictive_draws_from_the_mixture(data, fixed_mixture):
    guide, locs, scales, noise = fixed_mixture
    pyro.set_rng_seed(8)
    # sequential: these plain-function components declare no plates, so Pyro's parallel
    # Predictive cannot align their event dims with the model's plate (AutoNormal ones can, above)
    draws = Predictive(gaussian_model, guide=guide, num_samples=800)(data)["z"].reshape(800, D)
    atoms = torch.as_tensor(locs + scales * noise, dtype=draws.dtype)  # fixed-noise components are atoms
    distance = (draws[:, None] - atoms).norm(dim=-1)
    assert distance.min(-1).values.max() < 1e-5
    frequencies = torch.bincount(distance.argmin(-1), minlength=4).float() / 800
    assert torch.allclose(frequencies, torch.full((4,), 0.25), atol=0.05)


def test_mis_log_likelihood_is_exact_with_the_exact_posterior(data):
    n = len(data)
    precision = 1 / PRIOR_SCALE**2 + n / NOISE_SCALE**2
    post_loc = (data.sum(0) / NOISE_SCALE**2) / precision
    post_scale = torch.full((D,), precision**-0.5)
    guide = MixtureGuide([normal_component(post_loc, post_scale) for _ in range(3)])
    # log p(x) in closed form: per coordinate, x ~ N(0, noise^2 I + prior^2 11^T)
    cov = NOISE_SCALE**2 * np.eye(n) + PRIOR_SCALE**2 * np.ones((n, n))
    from scipy.stats import multivariate_normal

    expected = sum(multivariate_normal(np.zeros(n), cov).logpdf(data[:, d].numpy()) for d in range(D))
    pyro.set_rng_seed(9)
    estimate = mis_log_likelihood(gaussian_model, guide, data, num_samples_per_component=10)
    assert estimate.item() == pytest.approx(expected, abs=1e-4)


def test_mis_log_likelihood_matches_brute_force_importance_weights(data, fixed_mixture):
    guide, locs, scales, noise = fixed_mixture
    A = guide.num_components
    terms = brute_force_terms(data, locs, scales, noise, range(A), range(A))
    expected = logsumexp(terms) - math.log(A)  # L = 1 draw per component (fixed noise)
    estimate = mis_log_likelihood(gaussian_model, guide, data, num_samples_per_component=1)
    assert estimate.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------- amortised encoder


def vae_model(x, decoder):
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


class _IgnoreDecoder(torch.nn.Module):
    """The guide receives the model's arguments ``(x, decoder)``; the encoder needs only ``x``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.num_components = encoder.num_components

    def forward(self, x, decoder, components):
        return self.encoder(x, components)


@pytest.fixture
def vae():
    pyro.clear_param_store()
    pyro.set_rng_seed(10)
    decoder = torch.nn.Linear(3, 6)
    encoder = MixtureEncoder(6, 3, num_components=4, hidden_dims=(8,))
    guide = AmortizedMixtureGuide(_IgnoreDecoder(encoder))
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    return decoder, encoder, guide, x


def test_amortized_cross_densities_match_a_loop(vae):
    decoder, encoder, guide, x = vae
    samples = guide.sample_components(torch.tensor([1, 3]), 2, -2, x, decoder)
    z = samples.values["z"]
    assert z.shape == (4, 5, 3)
    log_q = guide.log_prob_components(samples, torch.arange(4), -2, x, decoder)
    assert log_q.shape == (4, 4, 5)
    for j in range(4):
        loc, scale = encoder(x, torch.tensor([j]))
        for k in range(4):
            for n in range(5):
                ref = dist.Normal(loc[0, n], scale[0, n]).log_prob(z[k, n]).sum()
                assert log_q[j, k, n].item() == pytest.approx(ref.item(), rel=1e-5)
    # component-major particles: particles 0, 1 come from component 1
    loc, scale = encoder(x, torch.tensor([1, 3]))
    assert torch.all(log_q[1, :2] > log_q[1, 2:].min() - 50)


def test_amortized_a2a_equals_per_datum_brute_force(vae):
    decoder, encoder, guide, x = vae
    elbo = MISELBO(num_components=4, estimator="a2a")
    elbo.loss(vae_model, guide, x, decoder)
    pyro.set_rng_seed(11)
    loss = elbo.loss(vae_model, guide, x, decoder)
    pyro.set_rng_seed(11)
    z = guide.sample_components(torch.arange(4), 1, -2, x, decoder).values["z"]  # (A, N, 3)
    with torch.no_grad():
        loc, scale = encoder(x, torch.arange(4))
        total = 0.0
        for a in range(4):
            for n in range(x.shape[0]):
                zn = z[a, n]
                log_p = dist.Normal(0.0, 1.0).log_prob(zn).sum() + dist.Bernoulli(logits=decoder(zn)).log_prob(x[n]).sum()
                log_q = torch.logsumexp(
                    torch.stack([dist.Normal(loc[j, n], scale[j, n]).log_prob(zn).sum() for j in range(4)]), 0
                ) - math.log(4)
                total += (log_p - log_q).item()
    assert loss == pytest.approx(-total / 4, rel=1e-5)


def test_amortized_guide_trains_and_predicts(vae):
    decoder, encoder, guide, x = vae
    elbo = MISELBO(num_components=4, num_sampled=2, estimator="s2s", num_particles=2, vectorize_particles=True)
    svi = SVI(vae_model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    before = mis_log_likelihood(vae_model, guide, x, decoder, num_samples_per_component=50).sum().item()
    for _ in range(200):
        svi.step(x, decoder)
    after = mis_log_likelihood(vae_model, guide, x, decoder, num_samples_per_component=50)
    assert after.shape == (5,)
    assert after.sum().item() > before + 1.0
    draws = Predictive(vae_model, guide=guide, num_samples=7, parallel=True)(x, decoder)
    assert draws["z"].shape == (7, 5, 3) and draws["x"].shape == (7, 5, 6)


# ----------------------------------------------------------------- bad input


def test_bad_input_is_named(data, fixed_mixture):
    guide, *_ = fixed_mixture
    with pytest.raises(ValueError, match="estimator must be one of"):
        MISELBO(estimator="s3a")
    with pytest.raises(ValueError, match="num_sampled=5 exceeds num_components=4"):
        MISELBO(num_components=4, num_sampled=5)
    with pytest.raises(ValueError, match="a2a estimator samples all components"):
        MISELBO(num_components=4, num_sampled=2, estimator="a2a")
    with pytest.raises(ValueError, match="num_components=3\\) but the guide has 4"):
        MISELBO(num_components=3).loss(gaussian_model, guide, data)
    with pytest.raises(TypeError, match="got AutoNormal"):
        MISELBO().loss(gaussian_model, AutoNormal(gaussian_model), data)
    used = AutoNormal(gaussian_model)
    used(data)
    with pytest.raises(ValueError, match="component 1 \\(AutoNormal\\) has already been run on its own"):
        MixtureGuide([AutoNormal(gaussian_model), used])
    with pytest.raises(ValueError, match="component indices must lie in \\[0, 4\\)"):
        MISELBO().subset_loss(gaussian_model, guide, torch.tensor([0, 7]), data)


def test_mismatched_or_discrete_components_are_named(data):
    def other_site(x):
        pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    guide = MixtureGuide([normal_component(torch.zeros(D), torch.ones(D)), other_site])
    with pytest.raises(ValueError, match="component 1 samples sites \\['w'\\] but component 0 samples \\['z'\\]"):
        MISELBO(estimator="a2a", max_plate_nesting=1).loss(gaussian_model, guide, data)

    def discrete(x):
        pyro.sample("z", dist.Bernoulli(torch.full((D,), 0.5)).to_event(1))

    with pytest.raises(ValueError, match="site 'z' of component 0 draws from .*Independent.*not reparameterisable"):
        MISELBO(estimator="a2a", max_plate_nesting=1).loss(gaussian_model, MixtureGuide([discrete]), data)

    def two_latents(x):
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    guide = MixtureGuide([normal_component(torch.zeros(D), torch.ones(D))])
    with pytest.raises(ValueError, match="model site 'extra' is latent but the mixture guide does not sample it"):
        MISELBO(max_plate_nesting=1).loss(two_latents, guide, data)


def test_subsampled_local_latents_are_refused():
    def local_model(x):
        with pyro.plate("data", len(x), subsample_size=2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:2])

    guide = MixtureGuide.from_autoguide(local_model, 2)
    with pytest.raises(ValueError, match="guide site 'z_unconstrained' of component 0 lies in a subsampled plate"):
        MISELBO(estimator="a2a").loss(local_model, guide, torch.zeros(5))
