"""Model structure checks and vectorised simulation of ``(θ, x) ~ p(θ, x)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

import pyro
import pyro.poutine as poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

__all__ = ["ModelStructure", "read_structure", "simulate"]


@dataclass
class ModelStructure:
    """What ForwardKL needs to know about a model, read from one trace at the real data."""

    observed: list[str]
    latent: list[str]
    shapes: dict[str, torch.Size]
    local: dict[str, str] = field(default_factory=dict)  # latent -> plate it shares with data
    max_plate_nesting: int = 0


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def read_structure(model: Callable, *args, **kwargs) -> tuple[ModelStructure, Trace]:
    """Trace ``model`` once at the real data and classify its sample sites."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    sites = [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site) and not _is_deterministic(site)
    ]
    observed = [site["name"] for site in sites if site["is_observed"]]
    latent = [site["name"] for site in sites if not site["is_observed"]]
    shapes = {site["name"]: site["value"].shape for site in sites}
    data_plates = {
        frame.name
        for site in sites
        if site["is_observed"]
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    }
    local = {}
    for site in sites:
        if site["is_observed"]:
            continue
        shared = [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name in data_plates]
        if shared:
            local[site["name"]] = shared[0]
    dims = [
        -frame.dim
        for site in sites
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    structure = ModelStructure(observed, latent, shapes, local, max(dims, default=0))
    return structure, trace


def simulate(
    model: Callable,
    structure: ModelStructure,
    sites: Sequence[str],
    num_simulations: int,
    *args,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Draw ``num_simulations`` joint samples of ``model`` with every observation
    unconditioned, in one vectorised ``pyro.plate`` outside the model's own plates.

    :returns: site name -> tensor of shape ``(num_simulations,) + site shape`` for
        each name in ``sites``.
    """
    dim = -structure.max_plate_nesting - 1
    try:
        with torch.no_grad(), poutine.block():
            with pyro.plate("forward_kl_simulations", num_simulations, dim=dim):
                trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(
            f"the model could not be run under a plate of {num_simulations} simulations at "
            f"dim={dim} (left of its own plates). ForwardKL runs all simulations in one "
            "vectorised plate, so the model must broadcast: put data dimensions in "
            "pyro.plate, declare event dimensions with .to_event, and index tensors from "
            f"the right (x[..., i], not x[i]). The error was: {error}"
        ) from error
    values = {}
    for name in sites:
        value = trace.nodes[name]["value"]
        shape = structure.shapes[name]
        if value.numel() != num_simulations * shape.numel() or value.shape[0] != num_simulations:
            raise ValueError(
                f"site '{name}' has shape {tuple(shape)} at the data but {tuple(value.shape)} under "
                f"a plate of {num_simulations} simulations at dim={dim}; expected "
                f"{num_simulations} copies of the site's shape. Write the model so that it "
                "broadcasts over batch dimensions on the left"
            )
        values[name] = value.reshape((num_simulations,) + shape)
    return values
