"""Export any pyro_cavi fit (or any Pyro guide) to ArviZ.

``to_inference_data(fit, model, *args, num_samples=1000, **kwargs)`` draws latent
values from the fitted posterior (``fit.guide``, or ``fit`` itself when it is a guide
callable), replays the model on them with Pyro's effect handlers and collects

* ``posterior``: every latent site (and ``pyro.deterministic`` site),
* ``posterior_predictive``: every observed site re-drawn given the latent draw,
* ``log_likelihood``: the pointwise log density of each observed datum (masked data
  get 0), one variable per observed site, so ``az.loo`` / ``az.waic`` / ``az.compare``
  work (pass ``var_name=`` when a model has several observed sites),
* ``observed_data``: the data,
* ``sample_stats``: the engine's ELBO trace (``elbo_trace``, dimension ``sweep``) when
  it has one.

Latent sites are drawn jointly from the variational posterior; local discrete sites
are drawn too, so the pointwise log likelihood is conditional on them.

ArviZ 0.x returns ``InferenceData``; ArviZ 1.x's ``from_dict`` returns a ``DataTree``
with the same groups. Both are built through ``az.from_dict``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict

import numpy as np
import torch

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _pointwise_log_prob(site) -> torch.Tensor:
    lp = site["fn"].log_prob(site["value"])
    mask = site["mask"]
    if mask is False:
        return torch.zeros_like(lp)
    if isinstance(mask, torch.Tensor):
        lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return lp.expand(site["fn"].batch_shape) if lp.shape != site["fn"].batch_shape else lp


def _sites(tr):
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site, site["is_observed"] and not site["infer"].get("_deterministic")


def _plate_nesting(tr) -> int:
    dims = [-f.dim for _, s, _ in _sites(tr) for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims + [len(s["fn"].batch_shape) for _, s, _ in _sites(tr)] + [0])


def _latent_draws(guide, model, args, kwargs, num_samples):
    """Latent draws of shape ``(num_samples,) + site shape``: the guide vectorised over a plate
    of draws when it broadcasts (Pyro's autoguides and CAVI's guide do), one call per draw if not."""
    plain = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs))).get_trace(
        *args, **kwargs
    )
    latent = {name: site["value"].shape for name, site, is_obs in _sites(plain) if not is_obs}
    draws = pyro.plate("_num_draws", num_samples, dim=-_plate_nesting(plain) - 1)
    try:
        tr = poutine.trace(draws(guide)).get_trace(*args, **kwargs)
        out = {}
        for name, shape in latent.items():
            if name in tr.nodes:
                v = tr.nodes[name]["value"]
                out[name] = v.reshape((num_samples,) + shape)
        return out, plain
    except Exception:  # guide does not broadcast over draws
        rows = [poutine.trace(guide).get_trace(*args, **kwargs) for _ in range(num_samples)]
        return {n: torch.stack([r.nodes[n]["value"] for r in rows]) for n in latent if n in rows[0].nodes}, plain


def _draw(guide, model, args, kwargs, num_samples):
    posterior: Dict[str, list] = defaultdict(list)
    predictive: Dict[str, list] = defaultdict(list)
    log_lik: Dict[str, list] = defaultdict(list)
    with torch.no_grad():
        values, plain = _latent_draws(guide, model, args, kwargs, num_samples)
        for i in range(num_samples):
            tr = poutine.trace(poutine.condition(model, data={k: v[i] for k, v in values.items()})).get_trace(
                *args, **kwargs
            )
            for name, site, is_obs in _sites(tr):
                if name in values or not is_obs:
                    posterior[name].append(_numpy(site["value"]))
                else:
                    log_lik[name].append(_numpy(_pointwise_log_prob(site)))
                    predictive[name].append(_numpy(site["fn"].sample()))
    observed = {name: _numpy(site["value"]) for name, site, is_obs in _sites(plain) if is_obs}
    return posterior, predictive, log_lik, observed


def to_inference_data(fit: Any, model: Callable, *args, num_samples: int = 1000, **kwargs):
    """ArviZ ``InferenceData`` for a fitted engine (``CAVI``, ``ForwardKL``, ...) or a guide.

    :param fit: an object with a ``.guide`` attribute, or a Pyro guide callable taking the
        model's arguments.
    :param model: the Pyro model, called with ``*args, **kwargs`` (with the observed data).
    :param num_samples: number of posterior draws.
    """
    import arviz as az

    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    guide = getattr(fit, "guide", fit)
    if not callable(guide):
        raise TypeError(f"to_inference_data: {type(fit).__name__} has no guide to draw from")
    posterior, predictive, log_lik, observed = _draw(guide, model, args, kwargs, num_samples)

    def stack(d):
        return {k: np.asarray(v)[None] for k, v in d.items()}

    sample_stats = {}
    dims = {}
    trace = getattr(fit, "elbo_trace", None)
    if trace:
        sample_stats["elbo_trace"] = np.asarray(trace, dtype=float)[None, None]
        dims["elbo_trace"] = ["sweep"]
    return az.from_dict(
        posterior=stack(posterior),
        posterior_predictive=stack(predictive),
        log_likelihood=stack(log_lik),
        observed_data=observed,
        sample_stats=sample_stats or None,
        dims=dims or None,
        attrs={"inference_library": "pyro_cavi", "engine": type(fit).__name__},
    )
