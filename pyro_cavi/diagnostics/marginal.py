r"""The log joint with the discrete latent sites summed out, :math:`\log \sum_z p(\theta, z, y)`.

The model is conditioned on the continuous draws :math:`\theta`, its remaining discrete sites
are enumerated in parallel (:func:`pyro.infer.config_enumerate`, :func:`pyro.poutine.enum`) and
the factors are contracted with Pyro's tensor-network contraction
(:func:`pyro.ops.contract.contract_to_tensor`), as :class:`~pyro.infer.TraceEnum_ELBO` does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict

import torch

import pyro.poutine as poutine
from pyro.infer import config_enumerate
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import prune_subsample_sites

Tensor = torch.Tensor


def marginal_log_joint(
    model: Callable,
    values: Dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int,
) -> Tensor:
    r""":math:`\log \sum_z p(\theta, z, y)` (a scalar) at one draw ``values`` of the continuous
    latent sites. One draw at a time: a model indexing with an enumerated site (``loc[z]``)
    stays correct only when ``loc`` has no extra batch dim of draws."""
    enumerated = poutine.enum(
        config_enumerate(poutine.condition(model, data=values), default="parallel"),
        first_available_dim=-max_plate_nesting - 1,
    )
    with poutine.block():
        trace = prune_subsample_sites(poutine.trace(enumerated).get_trace(*args, **kwargs))
    trace.compute_log_prob()
    trace.pack_tensors()
    symbols = trace.plate_to_symbol
    tree: "OrderedDict[frozenset, list]" = OrderedDict()
    sum_dims: set = set()
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and not site["fn"].support.is_discrete:
            raise ValueError(
                f"site {name!r} is continuous and not drawn by the guide; discrete='enumerate' needs the guide "
                "to draw every continuous latent site"
            )
        if isinstance(site["scale"], Tensor) or site["scale"] != 1.0:
            raise ValueError(f"site {name!r} is scaled (subsampled); discrete='enumerate' needs unscaled sites")
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized and f.size > 1)
        log_prob = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
        sum_dims.update(frozenset(log_prob._pyro_dims) - ordinal)
        tree.setdefault(ordinal, []).append(log_prob)
    return contract_to_tensor(tree, sum_dims)
