"""Exponential-family heads: network outputs -> natural parameters -> a distribution.

McNamara, Loper & Regier (NeurIPS 2024) show that the expected forward KL
``E_{p(θ, x)}[-log q(θ; η(x))]`` is convex in the natural parameters ``η`` of an
exponential family ``q(θ; η) = h(θ) exp(ηᵀ T(θ) - A(η))``, so the heads below
read the raw outputs of a network as (an unconstrained image of) ``η`` and
only then convert to the mean/scale form torch's distributions expect.

Every head is an :class:`torch.nn.Module` with ``num_outputs`` raw inputs per
data set. Calling it on ``raw`` of shape ``batch_shape + (num_outputs,)``
returns a distribution with that ``batch_shape`` and ``event_shape`` equal to
the latent site's shape ``shape``.
"""

from __future__ import annotations

import math


from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Distribution

import pyro.distributions as dist

__all__ = [
    "ExponentialFamilyHead",
    "DiagonalNormalHead",
    "MultivariateNormalHead",
    "VonMisesHead",
    "GammaHead",
    "DirichletHead",
    "CategoricalHead",
]


def _as_shape(shape: int | Sequence[int]) -> torch.Size:
    if isinstance(shape, int):
        shape = (shape,)
    shape = torch.Size(shape)
    if any(s <= 0 for s in shape):
        raise ValueError(f"site shape must have positive sizes, got {tuple(shape)}")
    return shape


class ExponentialFamilyHead(nn.Module):
    """Base class: maps ``raw`` of shape ``batch + (num_outputs,)`` to ``q(θ; η)``.

    :param shape: the shape of one value of the latent site this head models.
    :param num_statistics: natural parameters per scalar element of the site.
    """

    def __init__(self, shape: int | Sequence[int], num_statistics: int) -> None:
        super().__init__()
        self.shape = _as_shape(shape)
        self.num_statistics = num_statistics

    @property
    def num_outputs(self) -> int:
        return self.num_statistics * self.shape.numel()

    def _split(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reshape ``raw`` to ``batch + (num_statistics,) + shape`` and unbind the statistics."""
        if raw.shape[-1:] != (self.num_outputs,):
            raise ValueError(
                f"{type(self).__name__} for a site of shape {tuple(self.shape)} needs "
                f"{self.num_outputs} network outputs, got a tensor of shape {tuple(raw.shape)}"
            )
        raw = raw.reshape(raw.shape[:-1] + (self.num_statistics,) + self.shape)
        return raw.unbind(-len(self.shape) - 1)

    def forward(self, raw: torch.Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class DiagonalNormalHead(ExponentialFamilyHead):
    r"""Independent Gaussians in natural parameters ``η₁ = μ/σ²``, ``η₂ = -1/(2σ²) < 0``.

    ``η₁`` is the raw output and ``η₂ = -(softplus(raw₂) + min_precision / 2)``, so
    ``σ² = -1/(2η₂)`` and ``μ = η₁ σ²``. A zero network output gives
    ``N(0, 1/(2 log 2))``.

    ``loc`` and ``scale`` standardise the site: the natural parameters are those
    of ``(θ - loc) / scale`` (an affine map keeps ``q`` Gaussian and the loss
    convex in ``η``). Set them to the prior's location and scale when ``θ`` lives
    far from ``O(1)``.
    """

    def __init__(
        self,
        shape: int | Sequence[int] = (),
        min_precision: float = 1e-6,
        loc: float | torch.Tensor = 0.0,
        scale: float | torch.Tensor = 1.0,
    ) -> None:
        super().__init__(shape, 2)
        self.min_precision = min_precision
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if (scale <= 0).any():
            raise ValueError(f"DiagonalNormalHead scale must be positive, got {scale}")
        self.register_buffer("loc", torch.as_tensor(loc, dtype=torch.get_default_dtype()))
        self.register_buffer("scale", scale)

    def natural_parameters(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Natural parameters of the standardised site ``(θ - loc) / scale``."""
        eta1, raw2 = self._split(raw)
        eta2 = -(F.softplus(raw2) + 0.5 * self.min_precision)
        return eta1, eta2

    def forward(self, raw: torch.Tensor) -> Distribution:
        eta1, eta2 = self.natural_parameters(raw)
        variance = -0.5 / eta2
        mean = self.loc + self.scale * eta1 * variance
        return dist.Normal(mean, self.scale * variance.sqrt()).to_event(len(self.shape))


class MultivariateNormalHead(ExponentialFamilyHead):
    r"""Full-covariance Gaussian in natural parameters ``η₁ = Λμ``, ``η₂ = -Λ/2``.

    The precision ``Λ = L Lᵀ`` comes from a lower-triangular ``L`` with positive
    diagonal (``softplus``), which keeps ``η₂`` negative definite; ``μ = Λ⁻¹ η₁``.
    Raw outputs: ``d`` for ``η₁`` then ``d (d + 1) / 2`` for ``L`` (row-major).
    """

    def __init__(self, dim: int, min_diagonal: float = 1e-4) -> None:
        super().__init__((dim,), 1)
        self.dim = dim
        self.min_diagonal = min_diagonal
        self.register_buffer("_rows", torch.tril_indices(dim, dim)[0], persistent=False)
        self.register_buffer("_cols", torch.tril_indices(dim, dim)[1], persistent=False)

    @property
    def num_outputs(self) -> int:
        return self.dim + self.dim * (self.dim + 1) // 2

    def natural_parameters(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eta1, precision_tril = self._eta1_and_tril(raw)
        return eta1, -0.5 * precision_tril @ precision_tril.transpose(-1, -2)

    def _eta1_and_tril(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if raw.shape[-1:] != (self.num_outputs,):
            raise ValueError(
                f"MultivariateNormalHead of dimension {self.dim} needs {self.num_outputs} "
                f"network outputs, got a tensor of shape {tuple(raw.shape)}"
            )
        d = self.dim
        eta1, entries = raw[..., :d], raw[..., d:]
        tril = raw.new_zeros(raw.shape[:-1] + (d, d))
        tril[..., self._rows, self._cols] = entries
        diagonal = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + self.min_diagonal
        tril = tril.tril(-1) + torch.diag_embed(diagonal)
        return eta1, tril

    def forward(self, raw: torch.Tensor) -> Distribution:
        eta1, tril = self._eta1_and_tril(raw)
        loc = torch.cholesky_solve(eta1.unsqueeze(-1), tril).squeeze(-1)
        # Λ = L Lᵀ  =>  Σ = L⁻ᵀ L⁻¹; MultivariateNormal takes the precision directly.
        return dist.MultivariateNormal(loc, precision_matrix=tril @ tril.transpose(-1, -2))


class VonMisesHead(ExponentialFamilyHead):
    r"""Von Mises on the circle in natural parameters ``η = κ (cos μ, sin μ)``.

    The two raw outputs are ``η`` itself (unconstrained in ℝ²), so
    ``κ = ‖η‖`` and ``μ = atan2(η₂, η₁)``. A zero output is the uniform law.
    """

    def __init__(self, shape: int | Sequence[int] = (), min_concentration: float = 1e-6) -> None:
        super().__init__(shape, 2)
        self.min_concentration = min_concentration

    def forward(self, raw: torch.Tensor) -> Distribution:
        eta_cos, eta_sin = self._split(raw)
        return _NaturalVonMises(eta_cos, eta_sin, self.min_concentration).to_event(len(self.shape))


class GammaHead(ExponentialFamilyHead):
    r"""Gamma in natural parameters ``η₁ = α - 1 > -1``, ``η₂ = -β < 0``.

    ``α = softplus(raw₁) + min_value`` and ``β = softplus(raw₂) + min_value``.
    """

    def __init__(self, shape: int | Sequence[int] = (), min_value: float = 1e-4) -> None:
        super().__init__(shape, 2)
        self.min_value = min_value

    def forward(self, raw: torch.Tensor) -> Distribution:
        raw1, raw2 = self._split(raw)
        shape_param = F.softplus(raw1) + self.min_value
        rate = F.softplus(raw2) + self.min_value
        return dist.Gamma(shape_param, rate).to_event(len(self.shape))


class DirichletHead(ExponentialFamilyHead):
    r"""Dirichlet over the ``K``-simplex in natural parameters ``η = α - 1 > -1``.

    ``α = softplus(raw) + min_value``.
    """

    def __init__(self, num_categories: int, min_value: float = 1e-4) -> None:
        super().__init__((num_categories,), 1)
        self.min_value = min_value

    def forward(self, raw: torch.Tensor) -> Distribution:
        (raw1,) = self._split(raw)
        return dist.Dirichlet(F.softplus(raw1) + self.min_value)


class CategoricalHead(ExponentialFamilyHead):
    r"""Categorical in natural parameters ``η = log p`` (logits, defined up to a constant).

    :param num_categories: the number of values ``K``.
    :param shape: the shape of the site (independent categoricals), default scalar.
    """

    def __init__(self, num_categories: int, shape: int | Sequence[int] = ()) -> None:
        super().__init__(shape, num_categories)
        self.num_categories = num_categories

    def forward(self, raw: torch.Tensor) -> Distribution:
        logits = torch.stack(self._split(raw), dim=-1)
        return dist.Categorical(logits=logits).to_event(len(self.shape))


class _NaturalVonMises(dist.VonMises):
    """VonMises whose ``log_prob`` is written in ``η`` (``η·(cos θ, sin θ) - log 2π I₀(‖η‖)``),
    so that its gradient is finite at ``η = 0``, where that of ``atan2`` is not."""

    def __init__(
        self,
        eta_cos: torch.Tensor,
        eta_sin: torch.Tensor,
        min_concentration: float = 0.0,
        validate_args: bool | None = None,
    ) -> None:
        self.eta_cos, self.eta_sin = eta_cos, eta_sin
        self.min_concentration = min_concentration
        concentration = torch.sqrt(eta_cos**2 + eta_sin**2 + min_concentration**2)
        loc = torch.atan2(eta_sin.detach(), eta_cos.detach())
        super().__init__(loc, concentration, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        kappa = self.concentration
        log_normaliser = math.log(2 * math.pi) + torch.log(torch.special.i0e(kappa)) + kappa
        return self.eta_cos * torch.cos(value) + self.eta_sin * torch.sin(value) - log_normaliser

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return _NaturalVonMises(
            self.eta_cos.expand(batch_shape),
            self.eta_sin.expand(batch_shape),
            self.min_concentration,
            validate_args=self.__dict__.get("_validate_args"),
        )
