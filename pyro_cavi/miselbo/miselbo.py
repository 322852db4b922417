"""The multiple importance sampling ELBO with the A2A, S2A and S2S estimators."""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from ._traces import guess_max_plate_nesting, model_log_joint
from .base import BaseMixtureGuide

ESTIMATORS = ("a2a", "s2a", "s2s")


class MISELBO(ELBO):
    r"""
    The multiple importance sampling ELBO of a uniform mixture guide
    :math:`q(z) = \frac{1}{A}\sum_{a=1}^A q_a(z)` [1], estimated as in [2]:

    .. math::

        \mathrm{MISELBO} = \frac{1}{A}\sum_{a=1}^{A}
            \mathbb{E}_{z \sim q_a}\Big[\log p(x, z) - \log \frac{1}{A}\sum_{j=1}^{A} q_j(z)\Big].

    With ``L = num_particles`` reparameterised draws :math:`z_{s,l} \sim q_{a_s}` per sampled
    component, the estimators are

    * ``"a2a"``: every component is sampled (:math:`S = A`) and every component is in the
      denominator; :math:`A^2 L` density evaluations.
    * ``"s2a"``: :math:`S` components drawn uniformly without replacement each step, all :math:`A`
      in the denominator, :math:`\frac{1}{SL}\sum_{s,l}[\log p(x, z_{s,l})
      - \log\frac{1}{A}\sum_{j=1}^{A} q_j(z_{s,l})]`: unbiased for MISELBO, :math:`SAL`
      density evaluations, and the gradient reaches all :math:`A` components.
    * ``"s2s"``: the denominator keeps only the :math:`S` sampled components,
      :math:`\log\frac{1}{S}\sum_{s'} q_{a_{s'}}(z_{s,l})`: the MISELBO of a random sub-mixture,
      whose expectation is a lower bound on MISELBO (the entropy is concave); the cost
      :math:`S^2 L` does not depend on :math:`A`.

    With :math:`A = 1` all three equal :class:`~pyro.infer.Trace_ELBO`. Use as
    ``SVI(model, guide, optim, loss=MISELBO(...))`` with a
    :class:`~pyro_cavi.miselbo.MixtureGuide` or
    :class:`~pyro_cavi.miselbo.AmortizedMixtureGuide`; all guide sites must be reparameterisable.
    The cross-component densities :math:`\log q_j(z_k)` are computed as one ``(J, K)`` tensor.

    [1] O. Kviman, H. Melin, H. Koptagel, V. Elvira, J. Lagergren, "Multiple importance sampling
        ELBO and deep ensembles of variational approximations", AISTATS 2022.
    [2] A. Hotti, O. Kviman, R. Molén, V. Elvira, J. Lagergren, "Efficient mixture learning in
        black-box variational inference", ICML 2024.

    :param int num_components: :math:`A`; checked against the guide (inferred when ``None``).
    :param int num_sampled: :math:`S`, components sampled per step (default :math:`A`; must be
        :math:`A` for ``"a2a"``).
    :param str estimator: ``"a2a"``, ``"s2a"`` or ``"s2s"``.
    :param int num_particles: :math:`L`, draws per sampled component.
    :param bool vectorize_particles: draw the :math:`L` particles in one vectorised pass (one
        component subset per step) rather than a Python loop (one subset per particle).
    :param int max_plate_nesting: as in :class:`~pyro.infer.ELBO`; guessed when ``inf``.
    """

    def __init__(
        self,
        num_components: Optional[int] = None,
        num_sampled: Optional[int] = None,
        estimator: str = "s2a",
        num_particles: int = 1,
        vectorize_particles: bool = False,
        max_plate_nesting: float = float("inf"),
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for name, value in (("num_components", num_components), ("num_sampled", num_sampled)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_components is not None and num_sampled is not None and num_sampled > num_components:
            raise ValueError(f"num_sampled={num_sampled} exceeds num_components={num_components}")
        if estimator == "a2a" and num_components is not None and num_sampled not in (None, num_components):
            raise ValueError(
                f"the a2a estimator samples all components: num_sampled must be {num_components}, got {num_sampled}"
            )
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.vectorize_particles = vectorize_particles
        self.num_components = num_components
        self.num_sampled = num_sampled
        self.estimator = estimator

    # ------------------------------------------------------------------ setup
    def _check_guide(self, guide) -> int:
        if not isinstance(guide, BaseMixtureGuide):
            raise TypeError(
                f"MISELBO needs a mixture guide (MixtureGuide or AmortizedMixtureGuide), "
                f"got {type(guide).__name__}; wrap component guides as MixtureGuide([...])"
            )
        A = guide.num_components
        if self.num_components is not None and self.num_components != A:
            raise ValueError(f"MISELBO(num_components={self.num_components}) but the guide has {A} components")
        S = A if self.num_sampled is None else self.num_sampled
        if S > A:
            raise ValueError(f"num_sampled={S} exceeds the guide's {A} components")
        if self.estimator == "a2a" and S != A:
            raise ValueError(f"the a2a estimator samples all components: num_sampled must be {A}, got {S}")
        return A

    def _particle_dim(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return -int(self.max_plate_nesting) - 1

    def draw_components(self, num_components: int) -> Tensor:
        """The ``S`` components of one step, uniformly without replacement."""
        S = num_components if self.num_sampled is None else self.num_sampled
        if S == num_components:
            return torch.arange(num_components)
        return torch.randperm(num_components)[:S]

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("MISELBO evaluates all particles jointly; it yields no per-particle trace pairs")

    # -------------------------------------------------------------- estimator
    def _estimate(self, model, guide, components, num_particles, particle_dim, args, kwargs) -> Tensor:
        A = guide.num_components
        samples = guide.sample_components(components, num_particles, particle_dim, *args, **kwargs)
        log_p = model_log_joint(model, samples.values, samples.size, particle_dim, args, kwargs)
        denominator = components if self.estimator == "s2s" else torch.arange(A)
        log_q_cross = guide.log_prob_components(samples, denominator, particle_dim, *args, **kwargs)
        log_q = torch.logsumexp(log_q_cross, dim=0) - math.log(len(denominator))
        log_q = log_q.reshape(samples.size, -1).sum(-1)
        return (log_p - log_q).mean()

    def _loss(self, model, guide, draw: Callable[[], Tensor], args, kwargs) -> Tensor:
        particle_dim = self._particle_dim(model, guide, args, kwargs)
        if self.vectorize_particles:
            elbo = self._estimate(model, guide, draw(), self.num_particles, particle_dim, args, kwargs)
        else:  # one component subset per particle
            elbo = sum(
                self._estimate(model, guide, draw(), 1, particle_dim, args, kwargs)
                for _ in range(self.num_particles)
            ) / self.num_particles
        loss = -elbo
        warn_if_nan(loss, "loss")
        return loss

    def subset_loss(self, model, guide, components, *args, **kwargs) -> Tensor:
        """The differentiable loss (-MISELBO estimate) with the sampled components fixed to
        ``components`` (a 1-d index tensor) instead of drawn at random."""
        self._check_guide(guide)
        components = torch.as_tensor(components, dtype=torch.long)
        return self._loss(model, guide, lambda: components, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """A differentiable estimate of -MISELBO."""
        A = self._check_guide(guide)
        return self._loss(model, guide, lambda: self.draw_components(A), args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -MISELBO, as a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -MISELBO; backpropagates its gradient into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return torch_item(loss)
