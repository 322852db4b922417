"""Uniform mixture guides ``q(z) = (1/A) sum_a q_a(z)`` for :class:`~pyro_cavi.miselbo.MISELBO`."""
from contextlib import ExitStack
from typing import Callable, Sequence, Type

import torch
from torch import Tensor

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.nn import PyroModule
from pyro.nn.module import PyroModuleList
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import prune_subsample_sites

from ._traces import PARTICLE_PLATE, latent_sites, particle_axis, sum_to_particles
from .base import BaseMixtureGuide, ComponentSamples, check_components


class MixtureGuide(PyroModule, BaseMixtureGuide):
    """Uniform mixture of component guides over the joint of all latent sites,

        q(z) = (1/A) sum_{a=1}^{A} q_a(z),

    the variational family of MISELBO (Kviman et al., "Multiple importance sampling ELBO and
    deep ensembles of variational approximations", AISTATS 2022; Hotti et al., "Efficient
    mixture learning in black-box variational inference", ICML 2024).

    Each component is any reparameterisable Pyro guide with the model's signature (e.g. an
    :class:`~pyro.infer.autoguide.AutoNormal`); all components must sample the same sites.
    Components that are :class:`~pyro.nn.PyroModule` s get distinct parameter names
    (``MixtureGuide.components.0.locs.z``, ...); like Pyro's autoguides, two mixtures alive at
    once need distinct ``name`` s or they share parameters through the param store.

    Called as a guide, it draws from the mixture (one component per draw, independently across
    any enclosing vectorised plate such as :class:`~pyro.infer.Predictive`'s), so
    ``Predictive(model, guide=mixture)`` and ``pyro_cavi.to_inference_data`` work; its sites are
    ``Delta`` s at the drawn values. Train it with :class:`MISELBO`: the mixture density is not a
    product over sites, so ``Trace_ELBO`` cannot.

    Evaluating ``log q_j`` at other components' samples replays each component once on the whole
    batch of particles (``J`` vectorised calls, never ``J x K`` calls).

    :param components: the ``A`` component guides.
    :param name: prefix of the components' parameter names in Pyro's param store.
    """

    def __init__(self, components: Sequence[Callable], name: str = "MixtureGuide"):
        super().__init__(name=name)
        components = list(components)
        if not components:
            raise ValueError("MixtureGuide needs at least one component guide")
        for a, component in enumerate(components):
            if not callable(component):
                raise TypeError(f"component {a} is not callable: {type(component).__name__}")
        for a, component in enumerate(components):
            context = getattr(component, "_pyro_context", None)
            if context is not None and context.used:
                raise ValueError(
                    f"component {a} ({type(component).__name__}) has already been run on its own; "
                    "build the MixtureGuide from fresh guides, so that each gets its own parameter names"
                )
        if all(isinstance(c, torch.nn.Module) for c in components):
            self.components = PyroModuleList(components)
        else:
            self.components = components
        self.num_components = len(components)

    @classmethod
    def from_autoguide(
        cls,
        model: Callable,
        num_components: int,
        autoguide_class: Type = AutoNormal,
        name: str = "MixtureGuide",
        **autoguide_kwargs,
    ) -> "MixtureGuide":
        """A mixture of ``num_components`` autoguides of ``model``. Unless ``init_loc_fn`` is
        given, each component starts at its own prior draw (``init_to_sample``), which breaks
        the symmetry between components."""
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}")
        autoguide_kwargs.setdefault("init_loc_fn", init_to_sample)
        return cls([autoguide_class(model, **autoguide_kwargs) for _ in range(num_components)], name=name)

    def _trace_component(self, a: int, size: int, particle_dim: int, data, args, kwargs):
        component = self.components[a]
        if data is not None:
            component = poutine.condition(component, data=data)
        with pyro.plate(PARTICLE_PLATE, size, dim=particle_dim):
            return poutine.trace(component).get_trace(*args, **kwargs)

    def sample_components(self, components, num_particles, particle_dim, *args, **kwargs):
        components = check_components(components, self.num_components)
        draws = []
        for a in components.tolist():
            trace = self._trace_component(a, num_particles, particle_dim, None, args, kwargs)
            sites = latent_sites(trace)
            for name, site in sites.items():
                if not (isinstance(site["scale"], (int, float)) and site["scale"] == 1.0):
                    raise ValueError(
                        f"guide site '{name}' of component {a} lies in a subsampled plate; the mixture is over "
                        "the joint of all latents, so its local latents cannot be subsampled"
                    )
                if not site["fn"].has_rsample:
                    raise ValueError(
                        f"site '{name}' of component {a} draws from {type(site['fn']).__name__}, "
                        "which is not reparameterisable; MISELBO needs rsample"
                    )
            if draws and set(sites) != set(draws[0]):
                raise ValueError(
                    f"component {a} samples sites {sorted(sites)} but component "
                    f"{components[0].item()} samples {sorted(draws[0])}; all components must agree"
                )
            draws.append(sites)
        values, event_dims = {}, {}
        for name, site in draws[0].items():
            event_dim = site["fn"].event_dim
            parts = []
            for sites in draws:
                value = sites[name]["value"]
                axis = particle_axis(value, event_dim, particle_dim)
                shape = list(value.shape)
                shape[axis] = num_particles
                parts.append(value.expand(shape))
            values[name] = torch.cat(parts, dim=axis)
            event_dims[name] = event_dim
        return ComponentSamples(values, event_dims, components, num_particles)

    def log_prob_components(self, samples, components, particle_dim, *args, **kwargs):
        components = check_components(components, self.num_components)
        if all(type(self.components[a]) is AutoNormal for a in components.tolist()):
            return self._log_prob_autonormals(samples, components, particle_dim, args, kwargs)
        return torch.stack([
            self._replay_log_prob(a, samples, particle_dim, args, kwargs, auxiliary=True)
            for a in components.tolist()
        ])

    def _replay_log_prob(self, a, samples, particle_dim, args, kwargs, auxiliary=True) -> Tensor:
        """``log q_a`` at all ``K`` particles by one vectorised replay of component ``a``
        (with ``auxiliary=False``, only the non-auxiliary sites' terms)."""
        size = samples.size
        trace = prune_subsample_sites(self._trace_component(a, size, particle_dim, samples.values, args, kwargs))
        trace.compute_log_prob()
        total = torch.zeros(size)
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name not in samples.values:
                raise ValueError(f"component {a} samples site '{name}', which the other components do not")
            if auxiliary or not site["infer"].get("is_auxiliary"):
                total = total + sum_to_particles(site["log_prob"], particle_dim, size)
        return total

    def _log_prob_autonormals(self, samples, components, particle_dim, args, kwargs) -> Tensor:
        """Fast path for ``AutoNormal`` components: ``log q_j(z) = log N(u; loc_j, scale_j) +
        log |du/dz|`` with ``u`` the unconstrained value. The Normal term is one broadcast over the
        stacked ``(J, ...)`` locs and scales; the Jacobian term does not depend on ``j`` and comes
        from a single replay."""
        log_jacobian = self._replay_log_prob(components[0].item(), samples, particle_dim, args, kwargs,
                                             auxiliary=False)
        guides = [self.components[a] for a in components.tolist()]
        total = log_jacobian.unsqueeze(0)
        for name in guides[0]._event_dims:
            u = samples.values[name + "_unconstrained"]
            u = u.movedim(particle_axis(u, samples.event_dims[name + "_unconstrained"], particle_dim), 0)
            with self._pyro_context:  # as in PyroModule.__call__: reads become pyro.param statements
                locs, scales = zip(*(guide._get_loc_and_scale(name) for guide in guides))
            locs, scales = torch.stack(locs), torch.stack(scales)
            shape = (len(guides),) + (1,) * (u.dim() - locs.dim() + 1) + locs.shape[1:]
            log_prob = dist.Normal(locs.reshape(shape), scales.reshape(shape)).log_prob(u.unsqueeze(0))
            total = total + log_prob.reshape(log_prob.shape[:2] + (-1,)).sum(-1)
        return total

    def forward(self, *args, **kwargs):
        """Draw ``z ~ (1/A) sum_a q_a``: every component is run (blocked), then each draw of any
        enclosing vectorised plate keeps the value of its own uniformly drawn component."""
        ambient = [f for f in get_plates() if f.vectorized and f.dim is not None]
        shape = [1] * max([-f.dim for f in ambient], default=0)
        for frame in ambient:
            shape[frame.dim] = frame.size
        choice = torch.randint(self.num_components, tuple(shape))
        traces = []
        for component in self.components:
            # blocked, so the component sites stay private; the enclosing plates' frames are
            # replayed inside the block so each component still draws one value per outer draw
            with poutine.block(), poutine.broadcast(), _AmbientPlates(ambient):
                traces.append(poutine.trace(component).get_trace(*args, **kwargs))
        ambient_names = {f.name for f in ambient}
        result = {}
        for name, site in latent_sites(traces[0]).items():
            if site["infer"].get("is_auxiliary"):
                continue
            event_dim = site["fn"].event_dim
            stacked = torch.stack(torch.broadcast_tensors(*[t.nodes[name]["value"] for t in traces]))
            batch_dims = stacked.dim() - 1 - event_dim
            index = choice.reshape((1,) * (batch_dims - choice.dim()) + choice.shape + (1,) * event_dim)
            value = stacked.gather(0, index.expand((1,) + stacked.shape[1:]).contiguous()).squeeze(0)
            plates = [f for f in site["cond_indep_stack"] if f.name not in ambient_names]
            with ExitStack() as stack:
                for frame in plates:
                    stack.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                result[name] = pyro.sample(name, dist.Delta(value, event_dim=event_dim))
        return result



class _AmbientPlates(Messenger):
    """Adds already-allocated plate frames to each sample site's ``cond_indep_stack`` (inside a
    ``poutine.block``, where the real enclosing plates cannot see the site)."""

    def __init__(self, frames):
        super().__init__()
        self.frames = tuple(frames)

    def _process_message(self, msg):
        if msg["type"] == "sample":
            msg["cond_indep_stack"] = msg["cond_indep_stack"] + self.frames
