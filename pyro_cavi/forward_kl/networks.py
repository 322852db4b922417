"""Networks for amortised posteriors: an NTK-parameterised MLP and set encoders.

* :class:`NTKMLP` follows the neural-tangent-kernel parameterisation used by
  McNamara, Loper & Regier (NeurIPS 2024): weights drawn from ``N(0, 1)``, each
  layer's output scaled by ``1/√fan_in`` (so the readout is scaled by
  ``1/√width``), and a zero-initialised last layer, so that the network starts
  at ``f(x) = 0`` and wide networks train in the lazy (kernel) regime where the
  convexity of the expected forward KL in function space carries over.
* :class:`MeanPoolEncoder` (Deep Sets, Zaheer et al. 2017) and
  :class:`SetTransformer` (Lee et al., ICML 2019) are permutation invariant, so
  one network serves data sets of any size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NTKLinear", "NTKMLP", "MeanPoolEncoder", "SetTransformer"]


class NTKLinear(nn.Module):
    """``y = W x / √fan_in + b`` with ``W ~ N(0, 1)`` (or ``W = 0``) and ``b = 0``."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.zeros(out_features, in_features)
        if not zero_init:
            weight.normal_()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / math.sqrt(self.in_features), self.bias)


class NTKMLP(nn.Sequential):
    """Multilayer perceptron in the NTK parameterisation.

    :param in_features: input size.
    :param out_features: output size (e.g. the ``num_outputs`` of the heads).
    :param width: hidden width; the readout is scaled by ``1/√width``.
    :param depth: number of hidden layers.
    :param activation: activation module class.
    :param zero_init_last: zero the last layer so the network starts at 0.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int = 256,
        depth: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init_last: bool = True,
    ) -> None:
        if depth < 1:
            raise ValueError(f"NTKMLP needs depth >= 1 hidden layer, got depth={depth}")
        layers: list[nn.Module] = []
        fan_in = in_features
        for _ in range(depth):
            layers += [NTKLinear(fan_in, width), activation()]
            fan_in = width
        layers.append(NTKLinear(width, out_features, zero_init=zero_init_last))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features


def _as_set(x: torch.Tensor, element_dim: int) -> torch.Tensor:
    """Return ``x`` as ``batch + (set size, element features)``."""
    if element_dim == 0:
        return x.unsqueeze(-1)
    if x.dim() < 2 or x.shape[-1] != element_dim:
        raise ValueError(
            f"set encoder expects inputs of shape (..., set size, {element_dim}), "
            f"got {tuple(x.shape)}"
        )
    return x


class MeanPoolEncoder(nn.Module):
    r"""Deep Sets: ``f(x₁..x_N) = ρ( (1/N) Σᵢ φ(xᵢ) )``.

    :param phi: element network, ``(..., element_dim) -> (..., features)``.
    :param rho: readout, ``(..., features) -> (..., outputs)``.
    :param element_dim: features per element; ``0`` for scalar elements, so an
        input of shape ``(batch, N)`` is read as ``N`` scalars.
    """

    def __init__(self, phi: nn.Module, rho: nn.Module, element_dim: int = 0) -> None:
        super().__init__()
        self.phi = phi
        self.rho = rho
        self.element_dim = element_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rho(self.phi(_as_set(x, self.element_dim)).mean(-2))


class _AttentionBlock(nn.Module):
    """Multihead attention block ``MAB(Q, K) = LN(H + relu(W H))``, ``H = LN(Q + Attn(Q, K, K))``."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm0 = nn.LayerNorm(width)
        self.norm1 = nn.LayerNorm(width)
        self.feedforward = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        h = self.norm0(query + self.attention(query, key, key, need_weights=False)[0])
        return self.norm1(h + F.relu(self.feedforward(h)))


class _InducedSetAttention(nn.Module):
    """ISAB: attend from ``m`` learned inducing points, then back, in ``O(N m)``."""

    def __init__(self, width: int, num_heads: int, num_inducing: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, num_inducing, width) / math.sqrt(width))
        self.to_inducing = _AttentionBlock(width, num_heads)
        self.from_inducing = _AttentionBlock(width, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.to_inducing(self.inducing.expand(x.shape[0], -1, -1), x)
        return self.from_inducing(x, h)


class SetTransformer(nn.Module):
    """A small set transformer (Lee et al., ICML 2019): embed, induced self-attention
    blocks, pooling by attention from one learned seed, then an NTK readout
    (zero-initialised) to ``out_features``.

    :param in_features: features per element (``0`` for scalar elements).
    :param out_features: output size.
    :param width: embedding width (a multiple of ``num_heads``).
    :param num_blocks: induced self-attention blocks.
    :param num_inducing: inducing points per block.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int = 64,
        num_heads: int = 4,
        num_blocks: int = 2,
        num_inducing: int = 16,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width={width} must be a multiple of num_heads={num_heads}")
        self.element_dim = in_features
        self.embed = nn.Linear(max(in_features, 1), width)
        self.blocks = nn.ModuleList(
            _InducedSetAttention(width, num_heads, num_inducing) for _ in range(num_blocks)
        )
        self.seed = nn.Parameter(torch.randn(1, 1, width) / math.sqrt(width))
        self.pool = _AttentionBlock(width, num_heads)
        self.readout = NTKLinear(width, out_features, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_set(x, self.element_dim)
        batch_shape = x.shape[:-2]
        h = self.embed(x.reshape((-1,) + x.shape[-2:]))
        for block in self.blocks:
            h = block(h)
        pooled = self.pool(self.seed.expand(h.shape[0], -1, -1), h).squeeze(-2)
        return self.readout(pooled).reshape(batch_shape + (-1,))
