"""Trace plumbing shared by :class:`MISELBO` and the MIS evaluation bound.

Every estimator here works on a block of ``K`` particles stacked along one
vectorised plate at ``particle_dim`` (left of all the model's plates), so the
model and the guide densities are evaluated once for all particles.
"""
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import prune_subsample_sites

PARTICLE_PLATE = "_mixture_particles"


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The number of plate dims used by ``model`` and ``guide``, found by one unvectorised run
    (as :meth:`pyro.infer.ELBO._guess_max_plate_nesting`); the run also initialises autoguides."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        frame.dim
        for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def sum_to_particles(
    log_prob: Tensor, particle_dim: int, num_particles: int, keep_dim: Optional[int] = None
) -> Tensor:
    """Sums a site's ``log_prob`` (batch dims only) over every dim except the particle dim
    (and ``keep_dim``, a negative batch dim, when given); returns shape ``(K,)`` or ``(K, n)``."""
    if not torch.is_tensor(log_prob):
        log_prob = torch.as_tensor(log_prob)
    while log_prob.dim() < -particle_dim:
        log_prob = log_prob.unsqueeze(0)
    n = log_prob.dim()
    keep = [n + particle_dim] + ([] if keep_dim is None else [n + keep_dim])
    summed = [d for d in range(n) if d not in keep]
    out = log_prob.sum(summed) if summed else log_prob
    if keep_dim is None:
        return out.expand(num_particles)
    return out


def particle_axis(value: Tensor, event_dim: int, particle_dim: int) -> int:
    """Position of the particle dim inside a sampled ``value`` with ``event_dim`` event dims."""
    return value.dim() - event_dim + particle_dim


def latent_sites(trace) -> Dict[str, dict]:
    """The non-observed sample sites of a trace, in execution order."""
    return {
        name: site
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def model_log_joint(
    model: Callable,
    values: Dict[str, Tensor],
    num_particles: int,
    particle_dim: int,
    args: tuple,
    kwargs: dict,
    local_plate: Optional[str] = None,
) -> Tensor:
    """``log p(x, z_k)`` for the ``K`` particles ``values`` (stacked along ``particle_dim``).

    Returns shape ``(K,)``; with ``local_plate`` the dim of that plate is kept, shape ``(K, n)``,
    and every model site must lie inside the plate.
    """
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    total: Tensor = torch.zeros(())
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"]:
            raise ValueError(
                f"model site '{name}' is latent but the mixture guide does not sample it; "
                f"the guide samples {sorted(values)}"
            )
        keep_dim = None
        if local_plate is not None:
            frames = [f for f in site["cond_indep_stack"] if f.name == local_plate]
            if not frames:
                raise ValueError(
                    f"model site '{name}' is outside plate '{local_plate}'; a per-datum mixture "
                    f"guide needs every model site inside that plate"
                )
            keep_dim = frames[0].dim
        total = total + sum_to_particles(site["log_prob"], particle_dim, num_particles, keep_dim)
    return total
