"""The amortised posterior ``q(θ | x) = Π_site q_site(θ_site; η_site(f(x)))``."""

from __future__ import annotations

import itertools
from typing import Mapping

import torch
import torch.nn as nn
from torch.distributions import Distribution

import pyro

from .heads import ExponentialFamilyHead

__all__ = ["AmortisedPosterior"]

_instances = itertools.count()


class AmortisedPosterior(nn.Module):
    """An encoder ``f`` shared by one exponential-family head per latent site.

    ``f`` maps the observed values (one tensor per observed site, each with a
    leading batch dimension of data sets) to a feature vector of size
    ``sum(head.num_outputs)``; that vector is cut into consecutive chunks, one
    per head in the order of ``heads``, and each head reads its chunk as
    natural parameters.

    :param encoder: ``encoder(*observations) -> (batch, num_outputs)``.
    :param heads: latent site name -> :class:`ExponentialFamilyHead`.
    :param name: the name under which the parameters enter Pyro's param store
        (default: ``amortised_posterior_<n>``, distinct for each instance).
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, ExponentialFamilyHead],
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("AmortisedPosterior needs at least one head")
        for site, head in heads.items():
            if not isinstance(head, ExponentialFamilyHead):
                raise TypeError(
                    f"head for site '{site}' must be an ExponentialFamilyHead, got {type(head).__name__}"
                )
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        # a distinct default name per instance: two posteriors must not share param-store entries
        self.name = name if name is not None else f"amortised_posterior_{next(_instances)}"

    @property
    def num_outputs(self) -> int:
        return sum(head.num_outputs for head in self.heads.values())

    def forward(self, *observations: torch.Tensor) -> dict[str, Distribution]:
        """``q(θ | x)`` for a batch of data sets: each distribution has batch shape
        ``(batch,)`` and the site's shape as event shape."""
        return self.distributions(self.encode(*observations))

    def at(self, *observations: torch.Tensor) -> dict[str, Distribution]:
        """``q(θ | x)`` for one data set (no batch dimension): batch shape ``()``."""
        return self.distributions(self.encode(*(obs.unsqueeze(0) for obs in observations))[0])

    def encode(self, *observations: torch.Tensor) -> torch.Tensor:
        """The encoder's raw outputs, checked against the heads' sizes."""
        pyro.module(self.name, self)
        features = self.encoder(*observations)
        if features.dim() < 1 or features.shape[-1] != self.num_outputs:
            sizes = ", ".join(f"'{s}' ({h.num_outputs})" for s, h in self.heads.items())
            raise ValueError(
                f"encoder returned features of shape {tuple(features.shape)}, "
                f"but the heads {sizes} need {self.num_outputs} outputs in the last dimension"
            )
        return features

    def distributions(self, features: torch.Tensor) -> dict[str, Distribution]:
        """Cut ``features`` into one chunk per head and read each as natural parameters."""
        chunks = features.split([head.num_outputs for head in self.heads.values()], dim=-1)
        return {site: head(chunk) for (site, head), chunk in zip(self.heads.items(), chunks)}
