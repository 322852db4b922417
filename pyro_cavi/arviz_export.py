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

``psis=True`` weighs the same draws by PSIS (:func:`pyro_cavi.diagnostics.psis`): the
smoothed log weights and raw log ratios go to ``sample_stats`` (``log_weight``,
``log_ratio``), k-hat, its reading and the ESS to ``attrs`` (``psis_khat``, ...);
``psis="resample"`` instead puts importance-resampled draws in ``posterior``.

``heldout=(predictive, data)`` scores held-out data instead of the model's observed sites.
``predictive(draw)`` receives one posterior draw (a dict: every latent site of the model, global
and local, at that draw) and returns the predictive distribution of the held-out observations
given the draw's global parameters, with the held-out points' own local latents marginalised,

.. math:: p(y_\star \mid x_\star, \theta_s) = \int p(y_\star \mid u_\star, x_\star, \theta_s)\,
          p(u_\star \mid x_\star, \theta_s)\, du_\star ,

as a ``torch.distributions.Distribution`` whose ``batch_shape + event_shape`` is the shape of
``data`` (or a dict ``name -> Distribution`` with ``data`` a dict ``name -> tensor``). Then
``log_likelihood`` holds ``log p(y_star | x_star, theta_s)`` per held-out point and draw,
``posterior_predictive`` a draw from each distribution and ``observed_data`` the held-out data, so
``az.loo`` / ``az.compare`` rank fits by their held-out predictive density (a model whose local
latents cannot be summed out exactly, e.g. a conditional mixture network's hidden units, passes a
Monte Carlo average over them). The ``posterior`` group is unchanged.

A Pyro ``MCMC`` run (e.g. NUTS on the same model) exports its own draws, one ArviZ chain per
MCMC chain and every draw of each, so ``az.compare`` ranks a variational fit against the
sampler on the same points. Discrete sites that the sampler enumerated out (``z`` of a mixture
run with ``config_enumerate``) are drawn from their conditional posterior given each draw by
:func:`pyro.infer.infer_discrete`; the log likelihood of each draw is then computed as for
any other fit.

A list of fits (e.g. CAVI from several seeds) gives one chain per fit, so ``az.rhat`` /
``az.plot_trace`` flag fits that ended in different optima; ``attrs`` hold each chain's
ELBO (``chain_elbo``), the best one (``best_elbo``) and its chain (``best_chain``).

ArviZ 0.x returns ``InferenceData``; ArviZ 1.x's ``from_dict`` returns a ``DataTree``
with the same groups. Both are built through ``az.from_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

import pyro
import pyro.poutine as poutine
from pyro.infer import config_enumerate, infer_discrete
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


def _heldout_names(heldout, model_observed) -> Dict[str, torch.Tensor]:
    """The held-out data as a dict ``name -> tensor``; a bare tensor takes the name of the
    model's observed site, so the log likelihood lines up with fits exported without ``heldout``."""
    data = heldout[1]
    if isinstance(data, dict):
        bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"heldout data must be tensors, got {type(data[bad[0]]).__name__} for {bad[0]!r}")
        if not data:
            raise ValueError("heldout data is an empty dict")
        return dict(data)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"heldout data must be a tensor or a dict of tensors, got {type(data).__name__}")
    if len(model_observed) != 1:
        raise ValueError(
            f"heldout data is one tensor but the model has observed sites {sorted(model_observed)}; "
            "pass a dict name -> tensor and have the predictive return a dict name -> Distribution"
        )
    return {model_observed[0]: data}


def _heldout_draw(predictive, draw, data):
    """Log likelihood and one predictive draw of the held-out data for one posterior draw."""
    out = predictive(draw)
    if isinstance(out, torch.distributions.Distribution):
        if len(data) != 1:
            raise ValueError(f"heldout predictive returned one Distribution, but the held-out data are {sorted(data)}")
        out = {next(iter(data)): out}
    if not isinstance(out, dict) or not all(isinstance(d, torch.distributions.Distribution) for d in out.values()):
        raise TypeError(f"heldout predictive must return a Distribution or a dict of them, got {type(out).__name__}")
    if out.keys() != data.keys():
        raise ValueError(f"heldout predictive returned {sorted(out)} but the held-out data are {sorted(data)}")
    log_lik, yrep = {}, {}
    for name, d in out.items():
        shape = d.batch_shape + d.event_shape
        if shape != data[name].shape:
            raise ValueError(
                f"heldout predictive for {name!r} has batch_shape + event_shape {tuple(shape)}, "
                f"but the held-out data have shape {tuple(data[name].shape)}"
            )
        lp = d.log_prob(data[name])
        if lp.dim() == 0:
            raise ValueError(
                f"heldout predictive for {name!r} gives one log density for all held-out data; "
                "give it a batch dimension per point (no .to_event over the points)"
            )
        log_lik[name], yrep[name] = _numpy(lp), _numpy(d.sample())
    return log_lik, yrep


def _draw(guide, model, args, kwargs, num_samples, values=None, heldout=None, discrete_dim=None):
    """Replay ``model`` on each posterior draw (``values``, or draws of ``guide``) and collect the
    posterior, predictive and pointwise log likelihood. With ``discrete_dim``, the latent sites
    missing from ``values`` (discrete sites enumerated out by the sampler) are first drawn from
    their conditional posterior by :func:`pyro.infer.infer_discrete` (the model's discrete sites
    marked for enumeration, whether or not the model passed marks them)."""
    posterior: Dict[str, list] = defaultdict(list)
    predictive: Dict[str, list] = defaultdict(list)
    log_lik: Dict[str, list] = defaultdict(list)
    with torch.no_grad():
        if values is None:
            values, plain = _latent_draws(guide, model, args, kwargs, num_samples)
        else:
            plain = poutine.trace(model).get_trace(*args, **kwargs)
        if heldout is not None:
            data = _heldout_names(heldout, [name for name, _, is_obs in _sites(plain) if is_obs])
        latent = set(values) | ({name for name, _, is_obs in _sites(plain) if not is_obs} if discrete_dim else set())
        for i in range(num_samples):
            draw = {k: v[i] for k, v in values.items()}
            if discrete_dim is not None:
                inferred = poutine.trace(
                    infer_discrete(poutine.condition(config_enumerate(model), data=draw), first_available_dim=discrete_dim)
                ).get_trace(*args, **kwargs)
                draw.update({n: inferred.nodes[n]["value"] for n in latent - set(draw)})
            tr = poutine.trace(poutine.condition(model, data=draw)).get_trace(*args, **kwargs)
            for name, site, is_obs in _sites(tr):
                if name in latent or not is_obs:
                    posterior[name].append(_numpy(site["value"]))
                elif heldout is None:
                    log_lik[name].append(_numpy(_pointwise_log_prob(site)))
                    predictive[name].append(_numpy(site["fn"].sample()))
            if heldout is not None:
                draw = {name: site["value"] for name, site, is_obs in _sites(tr) if name in latent or not is_obs}
                ll, yrep = _heldout_draw(heldout[0], draw, data)
                for name in data:
                    log_lik[name].append(ll[name])
                    predictive[name].append(yrep[name])
    if heldout is not None:
        return posterior, predictive, log_lik, {name: _numpy(v) for name, v in data.items()}
    observed = {name: _numpy(site["value"]) for name, site, is_obs in _sites(plain) if is_obs}
    return posterior, predictive, log_lik, observed


def _is_mcmc(fit) -> bool:
    """A Pyro ``MCMC`` run (or anything with its ``get_samples(group_by_chain=...)``)."""
    return callable(getattr(fit, "get_samples", None)) and hasattr(fit, "kernel")


def _mcmc_chains(mcmc, model, args, kwargs, heldout):
    """One exported chain per MCMC chain, holding every draw of it. Latent sites of ``model``
    that have no MCMC draws must be discrete (enumerated out by the sampler); they are drawn
    given each draw by :func:`pyro.infer.infer_discrete`."""
    samples = mcmc.get_samples(group_by_chain=True)
    with torch.no_grad():
        plain = poutine.trace(model).get_trace(*args, **kwargs)
    latent = {name: site for name, site, is_obs in _sites(plain) if not is_obs}
    unknown = sorted(set(samples) - set(latent))
    if unknown:
        raise ValueError(f"to_inference_data: the MCMC run has draws of {unknown}, which are not latent sites of "
                         f"the model given (its latent sites: {sorted(latent)}); pass the model that was sampled")
    missing = [name for name in latent if name not in samples]
    continuous = [name for name in missing if not latent[name]["fn"].has_enumerate_support]
    if continuous:
        raise ValueError(f"to_inference_data: the MCMC run has no draws of the model's continuous latent sites "
                         f"{continuous}; pass the model that was sampled")
    discrete_dim = -1 - _plate_nesting(plain) if missing else None
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    return [(_draw(None, model, args, kwargs, num_draws, {k: v[c] for k, v in samples.items()}, heldout, discrete_dim), {})
            for c in range(num_chains)]


def _final_elbo(fit) -> Optional[float]:
    trace = getattr(fit, "elbo_trace", None)
    return float(trace[-1]) if trace else None


def _chain(fit, model, args, kwargs, num_samples, psis, heldout=None):
    """One chain: posterior draws, predictive, log likelihood, observed data and its statistics."""
    guide = getattr(fit, "guide", fit)
    if not callable(guide):
        raise TypeError(f"to_inference_data: {type(fit).__name__} has no guide to draw from")
    stats, values = {}, None
    if psis:
        from .diagnostics.psis import psis as run_psis

        res = run_psis(fit, model, *args, num_samples=num_samples, **kwargs)
        stats = {"khat": res.khat, "reading": res.reading, "ess": res.ess, "elbo_estimate": float(res.log_ratios.mean())}
        if psis == "resample":
            values = res.resample(num_samples)
        else:
            values = res.draws
            stats["log_weight"] = _numpy(res.log_weights)
            stats["log_ratio"] = _numpy(res.log_ratios)
    return _draw(guide, model, args, kwargs, num_samples, values, heldout), stats


def _stack(chains: List[Dict[str, list]]) -> Dict[str, np.ndarray]:
    names = chains[0].keys()
    for c, chain in enumerate(chains[1:], 1):
        if chain.keys() != names:
            raise ValueError(f"fit {c} has sites {sorted(chain)} but fit 0 has {sorted(names)}; chains must agree")
    return {k: np.stack([np.asarray(chain[k]) for chain in chains]) for k in names}


def _elbo_traces(fits) -> Optional[np.ndarray]:
    """ELBO traces, one row per chain, padded with NaN to the longest; ``(chain, 1, sweep)``."""
    traces = [np.asarray(getattr(f, "elbo_trace", None) or [], dtype=float) for f in fits]
    if not any(len(t) for t in traces):
        return None
    out = np.full((len(traces), 1, max(len(t) for t in traces)), np.nan)
    for c, t in enumerate(traces):
        out[c, 0, : len(t)] = t
    return out


def to_inference_data(
    fit: Any,
    model: Callable,
    *args,
    num_samples: int = 1000,
    psis: Union[bool, str] = False,
    heldout: Optional[Tuple[Callable[[Dict[str, torch.Tensor]], Any], Any]] = None,
    **kwargs,
):
    """ArviZ ``InferenceData`` for a fitted engine (``CAVI``, ``ForwardKL``, ...) or a guide.

    :param fit: an object with a ``.guide`` attribute, or a Pyro guide callable taking the
        model's arguments; or a list of them (e.g. CAVI fits from different seeds): one
        chain per fit; or a Pyro ``MCMC`` run: its own chains and draws.
    :param model: the Pyro model, called with ``*args, **kwargs`` (with the observed data).
    :param num_samples: number of posterior draws (per chain); an MCMC run exports all its draws.
    :param psis: ``True`` to store PSIS k-hat, ESS (``attrs``) and the smoothed log weights
        (``sample_stats.log_weight``) of the draws; ``"resample"`` to put importance-resampled
        draws in ``posterior`` instead (k-hat and ESS still in ``attrs``).
    """
    import arviz as az

    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if psis not in (False, True, "resample"):
        raise ValueError(f"psis must be False, True or 'resample', got {psis!r}")
    fits = list(fit) if isinstance(fit, (list, tuple)) else [fit]
    if not fits:
        raise ValueError("to_inference_data: the list of fits is empty")
    if heldout is not None and not (isinstance(heldout, (tuple, list)) and len(heldout) == 2 and callable(heldout[0])):
        raise TypeError(f"heldout must be a pair (predictive callable, data), got {heldout!r:.80}")
    if any(_is_mcmc(f) for f in fits):
        if len(fits) > 1:
            raise ValueError("to_inference_data: pass one MCMC run (its chains become the export's chains), not a list")
        if psis:
            raise ValueError("to_inference_data: psis needs a variational posterior q to weigh; an MCMC run has none")
        chains = _mcmc_chains(fits[0], model, args, kwargs, heldout)
    else:
        chains = [_chain(f, model, args, kwargs, num_samples, psis, heldout) for f in fits]
    posterior, predictive, log_lik = (_stack([c[0][i] for c in chains]) for i in range(3))
    observed = chains[0][0][3]

    sample_stats: Dict[str, np.ndarray] = {}
    dims = {}
    traces = _elbo_traces(fits)
    if traces is not None:
        sample_stats["elbo_trace"] = traces
        dims["elbo_trace"] = ["sweep"]
    attrs: Dict[str, Any] = {"inference_library": "pyro_cavi", "engine": type(fits[0]).__name__}
    for key in ("log_weight", "log_ratio"):
        if key in chains[0][1]:
            sample_stats[key] = np.stack([c[1][key] for c in chains])
    if psis:
        for key in ("khat", "reading", "ess", "elbo_estimate"):
            attrs[f"psis_{key}"] = [c[1][key] for c in chains]
    elbos = [_final_elbo(f) for f in fits]
    if all(e is None for e in elbos) and psis:
        elbos = attrs["psis_elbo_estimate"]  # Monte Carlo ELBO, E_q[log p - log q], of each chain
    if any(e is not None for e in elbos):
        attrs["chain_elbo"] = [math.nan if e is None else e for e in elbos]
        best = int(np.nanargmax(attrs["chain_elbo"]))
        attrs["best_chain"], attrs["best_elbo"] = best, attrs["chain_elbo"][best]
    with warnings.catch_warnings():  # elbo_trace has one "draw" per chain, by design
        warnings.filterwarnings("ignore", message="More chains", category=UserWarning)
        return az.from_dict(
            posterior=posterior,
            posterior_predictive=predictive,
            log_likelihood=log_lik,
            observed_data=observed,
            sample_stats=sample_stats or None,
            dims=dims or None,
            attrs=attrs,
        )
