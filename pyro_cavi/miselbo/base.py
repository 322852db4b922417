"""The interface between :class:`MISELBO` and a uniform mixture guide."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor


@dataclass
class ComponentSamples:
    """Reparameterised draws ``z_{s,l} ~ q_{a_s}``, ``l = 1..L``, for the components ``a_s``.

    Each value stacks its ``K = S * L`` particles along the particle dim, component-major
    (particle ``k = s * L + l``).
    """

    values: Dict[str, Tensor]
    event_dims: Dict[str, int]
    components: Tensor
    num_particles: int

    @property
    def size(self) -> int:
        return len(self.components) * self.num_particles


class BaseMixtureGuide:
    """What :class:`MISELBO` needs from a uniform mixture guide of ``num_components`` components.

    ``local_plate`` is ``None`` for a mixture over the joint of all latent sites, or the name of
    a data plate when each datum has its own mixture (amortised encoders): then
    ``log_prob_components`` keeps that plate's dim.
    """

    num_components: int
    local_plate: Optional[str] = None

    def sample_components(
        self, components: Tensor, num_particles: int, particle_dim: int, *args, **kwargs
    ) -> ComponentSamples:
        """Draw ``num_particles`` reparameterised samples from each component in ``components``."""
        raise NotImplementedError

    def log_prob_components(
        self, samples: ComponentSamples, components: Tensor, particle_dim: int, *args, **kwargs
    ) -> Tensor:
        """``log q_j(z_k)`` for every ``j`` in ``components`` and every particle ``k``, as one
        tensor of shape ``(J, K)`` (``(J, K, n)`` with a ``local_plate``)."""
        raise NotImplementedError


def check_components(components: Tensor, num_components: int) -> Tensor:
    """Validates a 1-d tensor of component indices in ``[0, num_components)``."""
    components = torch.as_tensor(components, dtype=torch.long)
    if components.dim() != 1 or components.numel() == 0:
        raise ValueError(f"components must be a non-empty 1-d index tensor, got shape {tuple(components.shape)}")
    if components.min() < 0 or components.max() >= num_components:
        raise ValueError(f"component indices must lie in [0, {num_components}), got {components.tolist()}")
    return components
