"""Amortised inference by the expected forward KL (neural posterior estimation)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.distributions import Distribution

import pyro
import pyro.poutine as poutine
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroOptim

from .guide import AmortisedPosterior
from .simulate import ModelStructure, read_structure, simulate

__all__ = ["ForwardKL"]


class ForwardKL:
    r"""Fit an amortised posterior ``q(θ | x)`` by minimising the expected forward KL

    .. math::

        L_P(φ) = E_{p(x)} KL(p(θ | x) ‖ q(θ; f(x; φ))) + const
               = E_{p(θ, x)} [-\log q(θ; f(x; φ))],

    estimated without bias at every step from ``B`` fresh joint simulations
    ``(θ_b, x_b) ~ p(θ, x)`` (the model run with its observations unconditioned,
    all ``B`` at once in one ``pyro.plate``):
    ``\hat L = -(1/B) Σ_b \log q(θ_b; f(x_b; φ))``.

    With ``q`` an exponential family in natural parameters the objective is
    convex in ``f``'s outputs, and gradient descent on a wide (NTK) network
    reaches its unique global optimum ``q(θ; f*(x)) ≈ p(θ | x)``, where the
    ELBO can get stuck in local optima (McNamara, Loper & Regier, "Globally
    Convergent Variational Inference", NeurIPS 2024). Pyro's
    :class:`~pyro.infer.csis.CSIS` minimises the same loss one trace at a time.

    The loss needs only simulations, never the likelihood, so models with
    implicit (``Delta``) observations are fine. Latent sites without a head
    must be listed in ``marginalise``: ``q`` then targets the marginal
    posterior of the covered sites (they are simulated and integrated out).
    Local latents (sharing a plate with the data) cannot have a head.

    :param model: a Pyro model; its observed sites are the data ``x``.
    :param guide: an :class:`AmortisedPosterior` with one head per latent site learned.
    :param optim: a :class:`pyro.optim.PyroOptim`.
    :param observed: names of the observed sites, in the order the guide's
        encoder takes them (default: the model's observed sites in trace order).
    :param num_simulations: ``B``, the number of fresh simulations per step.
    :param marginalise: latent sites not in the guide, integrated out.
    :param num_validation: size of the fixed validation set of :meth:`validation_loss`.
    """

    def __init__(
        self,
        model: Callable,
        guide: AmortisedPosterior,
        optim: PyroOptim,
        observed: Sequence[str] | None = None,
        num_simulations: int = 256,
        marginalise: Sequence[str] = (),
        num_validation: int = 1024,
    ) -> None:
        if not callable(getattr(guide, "distributions", None)) or not hasattr(guide, "heads"):
            raise TypeError(
                "ForwardKL needs an AmortisedPosterior guide (an encoder with exponential-family "
                f"heads), got {type(guide).__name__}"
            )
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"optim must be a pyro.optim.PyroOptim, got {type(optim).__name__}")
        for name, value in (("num_simulations", num_simulations), ("num_validation", num_validation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.amortised_posterior = guide
        self.optim = optim
        self.observed = None if observed is None else list(observed)
        self.num_simulations = num_simulations
        self.marginalise = list(marginalise)
        self.num_validation = num_validation
        self._structures: dict[tuple, ModelStructure] = {}
        self._validation_set: tuple[dict, dict] | None = None

    # ------------------------------------------------------------------ structure
    @property
    def latent_sites(self) -> list[str]:
        """The latent sites ``q`` covers, in the guide's head order."""
        return list(self.amortised_posterior.heads.keys())

    def structure(self, *args, **kwargs) -> ModelStructure:
        """Read and check the model's sites, once per shape of the arguments (a set
        encoder serves data sets of any size; each size is traced once)."""
        key = _signature(args, kwargs)
        if key not in self._structures:
            structure, _ = read_structure(self.model, *args, **kwargs)
            self._check(structure)
            if self.observed is None:
                self.observed = list(structure.observed)
            self._structures[key] = structure
        return self._structures[key]

    def _check(self, structure: ModelStructure) -> None:
        if not structure.observed:
            raise ValueError("the model has no observed site (obs=...): there is no data x to amortise over")
        if self.observed is not None:
            unknown = [s for s in self.observed if s not in structure.observed]
            if unknown:
                raise ValueError(
                    f"observed={self.observed} names {unknown}, which are not observed sites of the "
                    f"model (observed sites: {structure.observed}; latent sites: {structure.latent})"
                )
            missing = [s for s in structure.observed if s not in self.observed]
            if missing:
                raise ValueError(
                    f"the model observes {missing}, which are not in observed={self.observed}; "
                    "q(θ | x) must condition on every observation"
                )
        covered = self.latent_sites
        for name in covered + self.marginalise:
            if name not in structure.latent:
                raise ValueError(
                    f"'{name}' is not a latent site of the model (latent sites: {structure.latent})"
                )
        both = set(covered) & set(self.marginalise)
        if both:
            raise ValueError(f"sites {sorted(both)} have a head and are also in marginalise")
        uncovered = [s for s in structure.latent if s not in covered and s not in self.marginalise]
        if uncovered:
            raise ValueError(
                f"latent sites {uncovered} have no head in the guide. Add a head for each, or "
                f"pass marginalise={uncovered} to learn the marginal posterior of "
                f"{covered} with them integrated out"
            )
        for name in covered:
            if name in structure.local:
                raise ValueError(
                    f"latent site '{name}' is local: it sits in plate '{structure.local[name]}' "
                    "with the data, so its size grows with the data set. ForwardKL amortises "
                    "global latents; marginalise it (marginalise=[...]) or sum it out in the model"
                )
            head_shape = self.amortised_posterior.heads[name].shape
            if head_shape != structure.shapes[name]:
                raise ValueError(
                    f"the head for '{name}' models shape {tuple(head_shape)}, but the site has "
                    f"shape {tuple(structure.shapes[name])}"
                )

    # ----------------------------------------------------------------- simulation
    def simulate(self, num_simulations: int, *args, **kwargs) -> tuple[dict, dict]:
        """``num_simulations`` fresh pairs: (latents, observations), each a dict of
        tensors of shape ``(num_simulations,) + site shape``."""
        structure = self.structure(*args, **kwargs)
        values = simulate(
            self.model, structure, self.latent_sites + self.observed, num_simulations, *args, **kwargs
        )
        latents = {name: values[name] for name in self.latent_sites}
        observations = {name: values[name] for name in self.observed}
        return latents, observations

    # ----------------------------------------------------------------------- loss
    def loss_on(self, latents: dict, observations: dict) -> torch.Tensor:
        """``-(1/B) Σ_b log q(θ_b | x_b)`` on given simulations (differentiable)."""
        q = self.amortised_posterior(*(observations[name] for name in self.observed))
        num = next(iter(latents.values())).shape[0]
        log_q = 0.0
        for name in self.latent_sites:
            log_prob = q[name].log_prob(latents[name])
            if log_prob.shape != (num,):
                raise ValueError(
                    f"the head for '{name}' gave log q of shape {tuple(log_prob.shape)} for "
                    f"{num} simulations; expected ({num},)"
                )
            log_q = log_q + log_prob
        return -log_q.mean()

    def step(self, *args, **kwargs) -> float:
        """One gradient step on fresh simulations; returns the loss estimate."""
        latents, observations = self.simulate(self.num_simulations, *args, **kwargs)
        with poutine.trace(param_only=True) as param_capture:
            loss = self.loss_on(latents, observations)
        loss.backward()
        params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
        self.optim(params)
        zero_grads(params)
        return torch_item(loss)

    def evaluate_loss(self, *args, num_simulations: int | None = None, **kwargs) -> float:
        """The loss on fresh simulations, without a gradient step."""
        latents, observations = self.simulate(num_simulations or self.num_simulations, *args, **kwargs)
        with torch.no_grad():
            return torch_item(self.loss_on(latents, observations))

    def validation_loss(self, *args, **kwargs) -> float:
        """The loss on a validation set simulated once (``num_validation`` pairs) and
        reused on later calls, so that values are comparable across steps."""
        if self._validation_set is None:
            self._validation_set = self.simulate(self.num_validation, *args, **kwargs)
        with torch.no_grad():
            return torch_item(self.loss_on(*self._validation_set))

    # ------------------------------------------------------------------ posterior
    def _observations_at(self, *args, **kwargs) -> list[torch.Tensor]:
        self.structure(*args, **kwargs)
        _, trace = read_structure(self.model, *args, **kwargs)
        return [trace.nodes[name]["value"] for name in self.observed]

    def posterior(self, *args, **kwargs) -> dict[str, Distribution]:
        """``q(θ | x)`` at the data in ``args``/``kwargs``: site -> distribution with
        batch shape ``()`` and the site's shape as event shape."""
        observations = self._observations_at(*args, **kwargs)
        with torch.no_grad():
            return self.amortised_posterior.at(*observations)

    def guide(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """A Pyro guide with the model's signature: samples every covered site from
        ``q(θ | x)`` at the data in ``args``/``kwargs``. Works with
        :class:`~pyro.infer.Predictive` and as the guide of an ELBO. Sites in
        ``marginalise`` are not in it (Predictive draws them from the prior)."""
        q = self.amortised_posterior.at(*self._observations_at(*args, **kwargs))
        return {name: pyro.sample(name, q[name]) for name in self.latent_sites}


def _signature(args: tuple, kwargs: dict) -> tuple:
    """A hashable key for the model's arguments: tensor shapes, scalar values, else identities."""

    def key(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape))
        if value is None or isinstance(value, (bool, int, float, str)):
            return (type(value).__name__, value)
        return (type(value).__name__, id(value))

    return tuple(key(a) for a in args) + tuple((name, key(v)) for name, v in sorted(kwargs.items()))
