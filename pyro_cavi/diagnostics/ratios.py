r"""Log importance ratios :math:`\log p(\theta, y) - \log q(\theta)` from Pyro traces.

Draws :math:`\theta_s \sim q` by tracing the guide (vectorised over a plate of draws
when the guide broadcasts, one call per draw when it does not), replays the model on
each draw and sums the log densities of both traces per draw.

Which sites enter the ratio:

* every latent site the guide draws, with its guide density in :math:`\log q` and its
  model density in :math:`\log p`; discrete local sites that the guide draws (e.g. the
  responsibilities of CAVI's Categorical factors) are part of :math:`\theta`, so the
  ratio is the one of the joint :math:`q(\theta, z) = q(\theta) q(z)` that the engine fits
  (``discrete="sample"``); ``discrete="enumerate"`` sums them out of the model instead
  (:mod:`.marginal`) and leaves them out of :math:`q`;
* every observed site (likelihood, with Pyro's masks and scales);
* a model latent site that the guide does not draw is sampled from its prior by the
  replayed model: its density would appear in both :math:`p` and :math:`q`, so it is left
  out of both (the ratio is the one of the sites the guide draws);
* a guide site recorded as a ``Delta`` (a value the engine draws by other means, e.g.
  NG-HVI's exact conditional :math:`p(z \mid \theta, y)` or a mixture guide's component
  draw) has no density in the trace; the guides that carry it another way are handled in
  :mod:`.guides`, others are refused with an error naming the site.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.util import prune_subsample_sites

from .marginal import marginal_log_joint

Tensor = torch.Tensor

DRAW_PLATE = "_psis_draws"


def _sample_sites(trace):
    return [(n, s) for n, s in trace.nodes.items() if s["type"] == "sample"]


def _is_delta(fn) -> bool:
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _plate_nesting(trace) -> int:
    dims = [0]
    for _, site in _sample_sites(trace):
        dims += [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
        dims.append(len(site["fn"].batch_shape))
    return max(dims)


def _per_draw(log_prob: Tensor, draw_dim: int, num_samples: int) -> Tensor:
    """Sums a site's log density over everything but the dim of draws."""
    if log_prob.dim() < -draw_dim:
        log_prob = log_prob.reshape((1,) * (-draw_dim - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.movedim(draw_dim, 0)
    return log_prob.expand((num_samples,) + log_prob.shape[1:]).reshape(num_samples, -1).sum(-1)


def _prototype(guide, model, args, kwargs):
    guide_tr = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
    model_tr = prune_subsample_sites(
        poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    )
    return guide_tr, model_tr


def _is_auxiliary(site) -> bool:
    return bool(site["infer"].get("is_auxiliary"))


def _check_sites(guide_tr, model_tr) -> Dict[str, torch.Size]:
    """The latent sites the ratio covers, with their shapes; refuses what it cannot weigh."""
    shapes = {}
    for name, site in _sample_sites(guide_tr):
        if _is_auxiliary(site):
            continue
        if name not in model_tr.nodes:
            raise ValueError(
                f"guide site {name!r} is not a sample site of the model: the importance ratio "
                "p(theta, y) / q(theta) needs the same latent sites in both"
            )
        if model_tr.nodes[name]["is_observed"]:
            raise ValueError(f"guide site {name!r} is observed in the model; the guide must draw latent sites only")
        shapes[name] = site["value"].shape
    return shapes


def _check_densities(guide, guide_tr) -> None:
    """A guide whose latent sites are ``Delta`` s holds their density only through an auxiliary
    site (as Pyro's ``AutoContinuous`` guides do: the Delta carries the log-Jacobian); without
    one (``AutoDelta``, values drawn outside the trace) there is no ``log q`` to weigh by."""
    if any(_is_auxiliary(site) for _, site in _sample_sites(guide_tr)):
        return
    for name, site in _sample_sites(guide_tr):
        if _is_delta(site["fn"]) and not site["infer"].get("exact_conditional"):
            raise ValueError(
                f"guide site {name!r} is a Delta with no auxiliary site behind it (a point estimate, or a "
                f"value drawn outside the trace), so {type(guide).__name__} has no density log q(theta) "
                "to weigh draws by"
            )


def _vectorised(guide, model, args, kwargs, num_samples, nesting):
    draws = pyro.plate(DRAW_PLATE, num_samples, dim=-nesting - 1)
    guide_tr = prune_subsample_sites(poutine.trace(draws(guide)).get_trace(*args, **kwargs))
    model_tr = prune_subsample_sites(
        poutine.trace(poutine.replay(draws(model), trace=guide_tr)).get_trace(*args, **kwargs)
    )
    return guide_tr, model_tr


def log_importance_ratios(
    guide: Callable,
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    log_q_fn: Optional[Callable] = None,
    discrete: str = "sample",
) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    r"""Draws ``num_samples`` latent values from ``guide`` and returns ``(values, log_p, log_q)``.

    ``values[name]`` has shape ``(num_samples,) + site shape``; ``log_p[s]`` is
    :math:`\log p(\theta_s, y)` and ``log_q[s]`` is :math:`\log q(\theta_s)`, both summed over
    the sites described in the module docstring. ``log_q_fn(values)``, when given,
    replaces the guide trace's own density (for guides that record ``Delta`` sites).

    ``discrete="enumerate"`` leaves the guide's discrete sites out of :math:`\theta`: ``log_q``
    is the density of the continuous sites alone (the marginal when, as in CAVI's mean-field
    guide, they do not depend on the discrete draws) and ``log_p`` is
    :math:`\log \sum_z p(\theta, z, y)` by enumeration (:mod:`.marginal`), one draw at a time.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if discrete not in ("sample", "enumerate"):
        raise ValueError(f"discrete must be 'sample' or 'enumerate', got {discrete!r}")
    with torch.no_grad():
        guide_proto, model_proto = _prototype(guide, model, args, kwargs)
        shapes = _check_sites(guide_proto, model_proto)
        if log_q_fn is None:
            _check_densities(guide, guide_proto)
        summed = set()
        if discrete == "enumerate":
            summed = {n for n in shapes if guide_proto.nodes[n]["fn"].support.is_discrete}
            shapes = {n: shape for n, shape in shapes.items() if n not in summed}
        guide_names = [n for n, s in _sample_sites(guide_proto) if n in shapes or _is_auxiliary(s)]
        nesting = _plate_nesting(model_proto)
        draw_dim = -nesting - 1
        try:
            guide_tr, model_tr = _vectorised(guide, model, args, kwargs, num_samples, nesting)
            values = {n: guide_tr.nodes[n]["value"].reshape((num_samples,) + shape) for n, shape in shapes.items()}
            rows = None
        except (ValueError, RuntimeError):  # the guide does not broadcast over a plate of draws
            rows = [_prototype(guide, model, args, kwargs) for _ in range(num_samples)]
            values = {n: torch.stack([g.nodes[n]["value"] for g, _ in rows]) for n in shapes}

        def total(trace, names, dim, n):
            trace.compute_log_prob(site_filter=lambda name, site: name in names)
            lps = [trace.nodes[name]["log_prob"] for name in names]
            return sum(_per_draw(lp, dim, n) if dim is not None else lp.sum().expand(n) for lp in lps)

        model_names = [n for n, s in _sample_sites(model_proto) if s["is_observed"] or n in shapes]
        if summed:
            log_p = torch.stack(
                [marginal_log_joint(model, {n: v[s] for n, v in values.items()}, args, kwargs, nesting) for s in range(num_samples)]
            )
        elif rows is None:
            log_p = total(model_tr, model_names, draw_dim, num_samples)
        else:
            log_p = torch.stack([total(m, model_names, None, 1)[0] for _, m in rows])
        if rows is None:
            log_q = None if log_q_fn is not None else total(guide_tr, guide_names, draw_dim, num_samples)
        else:
            log_q = None if log_q_fn is not None else torch.stack([total(g, guide_names, None, 1)[0] for g, _ in rows])
        if log_q_fn is not None:
            log_q = log_q_fn(values)
    bad = ~torch.isfinite(log_p) | ~torch.isfinite(log_q)
    if bad.any() and not (torch.isneginf(log_p) & torch.isfinite(log_q))[bad].all():
        s = int(bad.nonzero()[0])
        raise ValueError(
            f"log importance ratio of draw {s} is not finite (log p = {float(log_p[s])}, log q = {float(log_q[s])})"
        )
    return values, log_p, log_q


__all__ = ["log_importance_ratios"]
