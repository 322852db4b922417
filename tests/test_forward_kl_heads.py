"""Exponential-family heads vs the density written in natural parameters; networks."""

import math

import pytest
import torch

from pyro_cavi.forward_kl import (
    AmortisedPosterior,
    CategoricalHead,
    DiagonalNormalHead,
    DirichletHead,
    GammaHead,
    MeanPoolEncoder,
    MultivariateNormalHead,
    NTKLinear,
    NTKMLP,
    SetTransformer,
    VonMisesHead,
)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_diagonal_normal_head_is_natural_parameterised():
    head = DiagonalNormalHead((3,))
    raw = torch.randn(4, head.num_outputs)
    eta1, eta2 = head.natural_parameters(raw)
    assert (eta2 < 0).all()
    theta = torch.randn(4, 3)
    # log q = η₁θ + η₂θ² - A(η) - ½ log 2π,  A(η) = -η₁²/(4η₂) - ½ log(-2η₂)
    log_normaliser = -(eta1**2) / (4 * eta2) - 0.5 * torch.log(-2 * eta2)
    expected = (eta1 * theta + eta2 * theta**2 - log_normaliser - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(head(raw).log_prob(theta), expected, atol=1e-4)
    # raw[:3] is η₁ itself
    assert torch.equal(eta1, raw[:, :3])


def test_multivariate_normal_head_is_natural_parameterised():
    head = MultivariateNormalHead(3)
    raw = torch.randn(5, head.num_outputs)
    eta1, eta2 = head.natural_parameters(raw)
    assert (torch.linalg.eigvalsh(eta2) < 0).all()
    theta = torch.randn(5, 3)
    # log q = η₁ᵀθ + θᵀη₂θ - A(η) - (d/2) log 2π,  A = -¼ η₁ᵀ η₂⁻¹ η₁ - ½ log det(-2η₂)
    quad = torch.einsum("bi,bij,bj->b", theta, eta2, theta)
    a = -0.25 * torch.einsum("bi,bij,bj->b", eta1, torch.linalg.inv(eta2), eta1)
    a = a - 0.5 * torch.logdet(-2 * eta2)
    expected = (eta1 * theta).sum(-1) + quad - a - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(head(raw).log_prob(theta), expected, atol=1e-3)


def test_von_mises_head():
    head = VonMisesHead()
    raw = torch.randn(6, 2) * 3
    theta = torch.rand(6) * 2 * math.pi
    kappa = raw.norm(dim=-1)
    # log q = η·(cos θ, sin θ) - log(2π I₀(‖η‖))
    expected = raw[:, 0] * theta.cos() + raw[:, 1] * theta.sin() - torch.log(2 * math.pi * torch.special.i0(kappa))
    assert torch.allclose(head(raw).log_prob(theta), expected, atol=1e-4)
    # zero output: the uniform law on the circle
    assert torch.allclose(head(torch.zeros(2)).log_prob(theta), torch.full((6,), -math.log(2 * math.pi)), atol=1e-5)


def test_gamma_head():
    head = GammaHead((2,))
    raw = torch.randn(3, head.num_outputs)
    q = head(raw)
    alpha, beta = q.base_dist.concentration, q.base_dist.rate
    theta = torch.rand(3, 2) + 0.1
    # log q = (α-1) log θ - βθ - (log Γ(α) - α log β)
    expected = ((alpha - 1) * theta.log() - beta * theta - torch.lgamma(alpha) + alpha * beta.log()).sum(-1)
    assert torch.allclose(q.log_prob(theta), expected, atol=1e-4)
    assert (alpha > 0).all() and (beta > 0).all()


def test_dirichlet_and_categorical_heads():
    head = DirichletHead(4)
    q = head(torch.randn(2, 4))
    theta = torch.distributions.Dirichlet(torch.ones(4)).sample((2,))
    alpha = q.concentration
    expected = ((alpha - 1) * theta.log()).sum(-1) - torch.lgamma(alpha).sum(-1) + torch.lgamma(alpha.sum(-1))
    assert torch.allclose(q.log_prob(theta), expected, atol=1e-4)

    head = CategoricalHead(3, shape=(2,))
    raw = torch.randn(5, head.num_outputs)
    q = head(raw)
    assert q.batch_shape == (5,) and q.event_shape == (2,)
    value = torch.randint(3, (5, 2))
    logits = raw.reshape(5, 3, 2).transpose(-1, -2)  # statistics first, then the site shape
    expected = logits.log_softmax(-1).gather(-1, value.unsqueeze(-1)).squeeze(-1).sum(-1)
    assert torch.allclose(q.log_prob(value), expected, atol=1e-5)


def test_head_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"needs 6 network outputs, got a tensor of shape \(2, 5\)"):
        DiagonalNormalHead(3)(torch.zeros(2, 5))


def test_ntk_mlp_starts_at_zero_and_scales_by_fan_in():
    net = NTKMLP(3, 4, width=512, depth=2)
    x = torch.randn(10, 3)
    assert torch.equal(net(x), torch.zeros(10, 4))
    layer = NTKLinear(512, 7)
    h = torch.randn(20, 512)
    assert torch.allclose(layer(h), h @ layer.weight.T / math.sqrt(512) + layer.bias, atol=1e-5)
    # with N(0, 1) weights and 1/√fan_in scaling, pre-activations stay O(1) at any width
    for width in (64, 4096):
        wide = NTKLinear(width, 200)
        assert 0.8 < wide(torch.randn(50, width)).std().item() < 1.2


def test_set_encoders_are_permutation_invariant_and_size_free():
    mean_pool = MeanPoolEncoder(NTKMLP(1, 16, width=32, zero_init_last=False), NTKMLP(16, 5, width=32, zero_init_last=False))
    transformer = SetTransformer(0, 5, width=16, num_heads=2, num_inducing=4)
    with torch.no_grad():
        transformer.readout.weight.normal_()  # the zero-initialised readout would hide the check
    x = torch.randn(3, 40)
    perm = torch.randperm(40)
    for encoder in (mean_pool, transformer):
        out = encoder(x)
        assert out.shape == (3, 5)
        assert torch.allclose(encoder(x[:, perm]), out, atol=1e-5)
        assert encoder(torch.randn(3, 7)).shape == (3, 5)
        assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match=r"expects inputs of shape \(..., set size, 2\)"):
        MeanPoolEncoder(torch.nn.Identity(), torch.nn.Identity(), element_dim=2)(torch.randn(3, 5))


def test_amortised_posterior_at_one_data_set():
    heads = {"a": DiagonalNormalHead(), "b": GammaHead((2,))}
    guide = AmortisedPosterior(torch.nn.Linear(3, 6), heads)
    x = torch.randn(3)
    batched = guide(x.unsqueeze(0))
    single = guide.at(x)
    assert single["a"].batch_shape == () and single["b"].event_shape == (2,)
    assert torch.allclose(single["b"].mean, batched["b"].mean[0])
    with pytest.raises(TypeError, match="head for site 'c'"):
        AmortisedPosterior(torch.nn.Linear(3, 2), {"c": torch.nn.Linear(2, 2)})


def test_von_mises_head_gradient_is_finite_at_zero():
    raw = torch.zeros(4, 2, requires_grad=True)
    VonMisesHead()(raw).log_prob(torch.rand(4)).sum().backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


def test_two_posteriors_keep_their_own_parameters():
    import pyro

    pyro.clear_param_store()
    first = AmortisedPosterior(torch.nn.Linear(3, 2), {"a": DiagonalNormalHead()})
    second = AmortisedPosterior(torch.nn.Linear(3, 2), {"a": DiagonalNormalHead()})
    x = torch.randn(1, 3)
    assert not torch.allclose(first(x)["a"].mean, second(x)["a"].mean)
    assert first.name != second.name
