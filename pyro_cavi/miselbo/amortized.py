"""Amortised mixture encoders: one network, ``A`` components (the MISVAE construction)."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import pyro
import pyro.distributions as dist

from .base import BaseMixtureGuide, ComponentSamples, check_components


class MixtureEncoder(nn.Module):
    """Shared encoder with a one-hot component code (MISVAE, Hotti et al., ICML 2024):

        h_a(x) = MLP(W_x x + W_c e_a + b),   q_a(z | x) = Normal(mu(h_a), softplus(sigma(h_a)))

    The one-hot product ``W_c e_a`` is a lookup (``nn.Embedding``), so the first layer costs
    ``W_x x`` once plus one bias row per component, and ``forward`` returns every requested
    component's parameters in one batched pass.

    :param input_dim: size of a datum ``x``.
    :param latent_dim: size of ``z``.
    :param num_components: ``A``.
    :param hidden_dims: widths of the hidden layers.
    """

    def __init__(self, input_dim: int, latent_dim: int, num_components: int, hidden_dims: Sequence[int] = (128,)):
        super().__init__()
        if not hidden_dims:
            raise ValueError("MixtureEncoder needs at least one hidden layer")
        self.num_components = num_components
        self.input_layer = nn.Linear(input_dim, hidden_dims[0])
        self.component_code = nn.Embedding(num_components, hidden_dims[0])
        nn.init.normal_(self.component_code.weight, std=1.0 / hidden_dims[0] ** 0.5)
        layers = []
        for d_in, d_out in zip(hidden_dims[:-1], hidden_dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.body = nn.Sequential(nn.ReLU(), *layers)
        self.loc = nn.Linear(hidden_dims[-1], latent_dim)
        self.scale = nn.Linear(hidden_dims[-1], latent_dim)

    def forward(self, x: Tensor, components: Tensor):
        """Returns ``loc, scale`` of shape ``(J, N, latent_dim)`` for ``components`` of shape ``(J,)``."""
        h = self.body(self.input_layer(x) + self.component_code(components).unsqueeze(-2))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-5


class AmortizedMixtureGuide(nn.Module, BaseMixtureGuide):
    """Per-datum uniform mixture guide from an amortised encoder,

        q(z_n | x_n) = (1/A) sum_{a=1}^{A} Normal(z_n; mu_a(x_n), sigma_a(x_n)),

    for a model with one latent site ``site`` (event dim 1) inside the data plate ``plate``.
    ``encoder(*args, components=idx, **kwargs)`` receives the model's arguments and must return
    ``loc, scale`` of shape ``(J, N, latent_dim)`` for ``J = len(idx)`` components in one pass
    (:class:`MixtureEncoder` does). All density evaluations across components are one broadcast
    ``Normal.log_prob`` of shape ``(J, K, N)``.

    Called as a guide it samples from the mixture with
    :class:`~pyro.distributions.MixtureSameFamily` (so ``Predictive`` works).
    """

    def __init__(self, encoder: nn.Module, site: str = "z", plate: str = "data",
                 num_components: Optional[int] = None, name: str = "mixture_encoder"):
        super().__init__()
        self.encoder = encoder
        self.site = site
        self.local_plate = plate
        self.name = name
        if num_components is None:
            num_components = getattr(encoder, "num_components", None)
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(
                "AmortizedMixtureGuide needs num_components (a positive int), either as an argument "
                f"or as encoder.num_components; got {num_components!r}"
            )
        self.num_components = num_components

    def _params(self, components: Tensor, args, kwargs):
        pyro.module(self.name, self.encoder)
        loc, scale = self.encoder(*args, components=components, **kwargs)
        if loc.shape != scale.shape or loc.dim() != 3 or loc.shape[0] != len(components):
            raise ValueError(
                f"encoder must return loc and scale of shape (J={len(components)}, N, latent_dim); "
                f"got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        return loc, scale

    def sample_components(self, components, num_particles, particle_dim, *args, **kwargs):
        components = check_components(components, self.num_components)
        loc, scale = self._params(components, args, kwargs)
        z = dist.Normal(loc, scale).rsample((num_particles,))  # (L, S, N, d)
        z = z.transpose(0, 1).reshape((-1,) + loc.shape[1:])  # (S * L, N, d), component-major
        z = z.reshape(z.shape[:1] + (1,) * (-particle_dim - 2) + z.shape[1:])
        return ComponentSamples({self.site: z}, {self.site: 1}, components, num_particles)

    def log_prob_components(self, samples, components, particle_dim, *args, **kwargs):
        components = check_components(components, self.num_components)
        loc, scale = self._params(components, args, kwargs)
        z = samples.values[self.site].reshape((samples.size,) + loc.shape[1:])  # (K, N, d)
        return dist.Normal(loc.unsqueeze(1), scale.unsqueeze(1)).log_prob(z).sum(-1)  # (J, K, N)

    def forward(self, *args, **kwargs):
        components = torch.arange(self.num_components)
        loc, scale = self._params(components, args, kwargs)
        loc, scale = loc.transpose(0, 1), scale.transpose(0, 1)  # (N, A, d)
        mixture = dist.MixtureSameFamily(
            dist.Categorical(logits=torch.zeros(loc.shape[:2])),
            dist.Normal(loc, scale).to_event(1),
        )
        with pyro.plate(self.local_plate, loc.shape[0], dim=-1):
            return pyro.sample(self.site, mixture)
