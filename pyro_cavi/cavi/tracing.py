"""Reading a Pyro model's structure: latent sites, plates and the symbolic log joint.

Two passes, both through Pyro's effect handlers and the unmodified model:

1. an ordinary :func:`pyro.poutine.trace` of the prior, which gives every site's
   distribution, shape, plates and observed data (validated here: NaN, inf and
   shape mismatches are refused with the site's name);
2. a symbolic pass (:class:`SymbolicMessenger`) in which every continuous latent is
   replaced by a :class:`~.symbolic.Sym` holding its own identity expression and
   every discrete latent by its enumerated support in a dimension of its own, to
   the left of the plates (as in Pyro's parallel enumeration). What reaches each
   ``pyro.sample`` statement is recorded as a :class:`Term`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..distributions.stick_breaking import StickBreakingCategorical
from .errors import NonConjugateError
from .rules import _params, unwrap
from .symbolic import Sym

Tensor = torch.Tensor

GAUSSIAN = (dist.Normal, dist.MultivariateNormal)
POSITIVE = {dist.Gamma: "Gamma", dist.InverseGamma: "InverseGamma", dist.Beta: "Beta", dist.Dirichlet: "Dirichlet"}
DISCRETE = (dist.Categorical, dist.Bernoulli, StickBreakingCategorical)


@dataclass
class LatentSite:
    name: str
    family: str  # Gaussian | Gamma | InverseGamma | Beta | Dirichlet | Categorical
    shape: torch.Size
    event_dim: int
    support: Optional[Tensor] = None  # enumerated values of a discrete site
    enum_dim: Optional[int] = None
    local: bool = False  # inside a subsampled plate: refitted on every minibatch
    plates: frozenset = frozenset()  # names of the plates the site sits in

    @property
    def batch_shape(self) -> torch.Size:
        return self.shape[: len(self.shape) - self.event_dim]

    @property
    def event_shape(self) -> torch.Size:
        return self.shape[len(self.shape) - self.event_dim:]


def check_one_per_block(pair: str, group, blocked: "LatentSite", per_block: "LatentSite") -> None:
    """The checks a joint pair makes of its members: ``blocked`` (a Gaussian site) has blocks of
    at most one event dimension, and ``per_block`` has one element per block (its shape is
    ``blocked``'s batch shape). ``pair`` names the kind of pair in the error messages."""
    if blocked.event_dim > 1:
        raise ValueError(f"joint: in the {pair} pair {group}, {blocked.name!r} needs event_dim <= 1, got {blocked.event_dim}")
    if per_block.shape != blocked.batch_shape:
        raise ValueError(
            f"joint: in the {pair} pair {group}, {per_block.name!r} must have one element per block of {blocked.name!r} "
            f"(shape {tuple(blocked.batch_shape)}, the batch shape of {blocked.name!r}), got shape {tuple(per_block.shape)}"
        )


@dataclass
class Term:
    """One ``pyro.sample`` statement of the model, traced symbolically."""

    name: str
    fn: object
    value: object
    is_observed: bool
    scale: object = 1.0
    mask: Optional[Tensor] = None
    latent: set = field(default_factory=set)  # continuous latents it involves
    discrete: List[str] = field(default_factory=list)  # discrete latents it involves
    uses: Dict[str, str] = field(default_factory=dict)  # latent -> which parameter
    plates: frozenset = frozenset()  # names of the plates the statement sits in


def _family(name: str, fn) -> tuple[str, int]:
    base, _, _ = unwrap(fn)
    if isinstance(base, GAUSSIAN):
        return "Gaussian", fn.event_dim
    for cls, fam in POSITIVE.items():
        if isinstance(base, cls):
            return fam, fn.event_dim
    if isinstance(base, DISCRETE):
        if fn.event_dim:
            raise NonConjugateError(f"discrete latent site {name!r} has event dims; CAVI enumerates scalar discrete sites only")
        return "Categorical", 0
    raise NonConjugateError(
        f"latent site {name!r} has a {type(base).__name__} prior: CAVI has exponential-family factors for latent "
        "Normal / MultivariateNormal, Gamma, InverseGamma, Beta, Dirichlet, Categorical and Bernoulli sites"
    )


def _combined_mask(site) -> Optional[Tensor]:
    """The mask of a site from ``poutine.mask`` and ``.mask(...)`` together (None: unmasked)."""
    masks = []
    if isinstance(site["mask"], torch.Tensor):
        masks.append(site["mask"])
    elif site["mask"] is False:
        masks.append(torch.zeros((), dtype=torch.bool))
    _, _, fn_mask = unwrap(site["fn"])
    if fn_mask is not None:
        masks.append(fn_mask)
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    event_dims = site["fn"].event_dim
    return out.reshape(out.shape + (1,) * event_dims) if event_dims else out


def _check_observed(name: str, site) -> None:
    value = site["value"]
    fn = site["fn"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"observed site {name!r}: data must be a torch.Tensor, got {type(value).__name__}")
    bad_values = ~torch.isfinite(value) if value.is_floating_point() else torch.zeros((), dtype=torch.bool)
    mask = _combined_mask(site)
    if mask is not None:
        bad_values = bad_values & mask
    if bad_values.any():
        bad = bad_values.sum().item()
        raise ValueError(
            f"observed site {name!r} contains {bad} NaN or infinite value(s); remove them or mask them "
            "with poutine.mask / .mask(...)"
        )
    expected = fn.batch_shape + fn.event_shape
    try:
        torch.broadcast_shapes(value.shape, expected)
    except RuntimeError:
        raise ValueError(
            f"observed site {name!r}: data of shape {tuple(value.shape)} do not match the distribution's "
            f"shape {tuple(expected)} (batch {tuple(fn.batch_shape)}, event {tuple(fn.event_shape)})"
        ) from None
    if value.dim() > len(expected) or any(v > e for v, e in zip(value.shape[::-1], expected[::-1])):
        raise ValueError(
            f"observed site {name!r}: data of shape {tuple(value.shape)} are larger than the distribution's "
            f"shape {tuple(expected)}; wrap the site in a pyro.plate of the right size"
        )
    _check_support(name, site)


def _check_support(name: str, site) -> None:
    """Unmasked observed values must lie in the support of the site's distribution (an integer in
    {0, ..., total_count} for a Binomial, 0 or 1 for a Bernoulli, positive for a Gamma ...)."""
    value, fn = site["value"], site["fn"]
    ok = fn.support.check(value)
    mask = _combined_mask(site)
    if mask is not None:
        event_dim = fn.event_dim
        mask = mask.reshape(mask.shape[: mask.dim() - event_dim]) if event_dim else mask
        ok = ok | ~mask
    if ok.all():
        return
    bad = ~ok
    index, example = _first_bad(value, bad, fn.event_dim)
    support = repr(fn.support)
    if len(support) > 60:  # bounds that are tensors (a Binomial's total_count): show them at the index
        bounds = [getattr(fn.support, key, None) for key in ("lower_bound", "upper_bound")]
        bounds = [b.expand(bad.shape)[index].item() if isinstance(b, torch.Tensor) else b for b in bounds]
        support = f"{type(fn.support).__name__.lstrip('_')}({bounds[0]}, {bounds[1]}) at that index"
    base, _, _ = unwrap(fn)
    raise ValueError(
        f"observed site {name!r}: {int(bad.sum())} value(s) outside the support of its {type(base).__name__}, "
        f"e.g. {example.tolist()} at index {index} (support {support}); "
        "fix the data or mask them with poutine.mask / .mask(...)"
    )


def _first_bad(value: Tensor, bad: Tensor, event_dim: int):
    """The index of the first ``True`` in ``bad`` (over ``value``'s batch shape, broadcast) and
    ``value``'s element (or event) there, for an error message."""
    index = tuple(bad.nonzero()[0].tolist())
    event = value.shape[value.dim() - event_dim:] if event_dim else torch.Size()
    return index, value.expand(torch.broadcast_shapes(value.shape, bad.shape + event))[index]


def _check_params(name: str, fn) -> None:
    """A site's distribution parameters that are constants (no latent flows into them) must satisfy
    the distribution's argument constraints: a Normal's scale > 0, a Gamma's concentration > 0, a
    Binomial's total_count a non-negative integer. The model is traced with Pyro's validation off
    (symbolic stand-ins would trip it), so this check stands in for it."""
    base, _, _ = unwrap(fn)
    for key, value in _params(base).items():
        constraint = base.arg_constraints[key]
        if not isinstance(value, torch.Tensor) or isinstance(value, Sym) or dist.constraints.is_dependent(constraint):
            continue
        ok = constraint.check(value)
        if ok.all():
            continue
        bad = ~ok
        index, example = _first_bad(value, bad, value.dim() - bad.dim())
        raise ValueError(
            f"site {name!r}: parameter {key!r} of its {type(base).__name__} has {int(bad.sum())} value(s) "
            f"outside {constraint} (e.g. {example.tolist()} at index {index})"
        )


def _refuse_masked_latent(name: str, site) -> None:
    """A latent site with masked-out elements (``poutine.mask``, ``.mask(...)``, or the
    ``<name>_unobserved`` site of ``pyro.sample(..., obs_mask=...)``) is refused: its factor would
    cover every element, the masked-out ones with no prior (an improper Gaussian, or a Categorical
    whose entropy inflates the ELBO above the log evidence)."""
    mask = _combined_mask(site)
    if mask is None or bool(mask.all()):
        return
    hint = (
        f" (the missing entries of pyro.sample({name[: -len('_unobserved')]!r}, ..., obs_mask=...))"
        if name.endswith("_unobserved") else ""
    )
    raise NonConjugateError(
        f"latent site {name!r} is masked{hint}: {int((~mask).sum())} of its elements are masked out, and CAVI "
        "fits every element of a latent site, so those would have no prior and no likelihood. Mask only "
        "observed sites: to impute missing data, sample the missing entries as a latent site of their own "
        "(e.g. in a plate over the missing rows) and observe the rest"
    )


def prior_structure(model, args, kwargs):
    """Trace the prior once; return (latent sites in order, observed site names, max plate nesting,
    dtype, device, names of the subsampled plates)."""
    with pyro.validation_enabled(False):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    latents: Dict[str, LatentSite] = {}
    subsampled: set = set()
    observed = []
    nesting = 0
    dtype, device = None, None
    latent_dtype, latent_device = None, None
    for name, site in tr.nodes.items():
        if site_is_subsample(site):
            if site["value"].shape[0] != site["fn"].size:
                subsampled.add(name)
            continue
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if site["is_observed"]:
            if site["infer"].get("_deterministic"):
                continue
            _check_observed(name, site)
            observed.append(name)
            v = site["value"]
            if v.is_floating_point():
                dtype = v.dtype if dtype is None else torch.promote_types(dtype, v.dtype)
                device = v.device if device is None else device
            continue
        family, event_dim = _family(name, fn)
        _refuse_masked_latent(name, site)
        shape = site["value"].shape
        if site["value"].is_floating_point():
            # the model's latents decide as much as the data: float64 latents with float32 (or
            # integer) observations compute in float64, as the model itself would
            v = site["value"]
            latent_dtype = v.dtype if latent_dtype is None else torch.promote_types(latent_dtype, v.dtype)
            latent_device = v.device if latent_device is None else latent_device
        support = None
        if family == "Categorical":
            base, _, _ = unwrap(fn)
            if isinstance(base, dist.Bernoulli):
                support = torch.tensor([0.0, 1.0])
            elif isinstance(base, StickBreakingCategorical):
                support = torch.arange(base.num_categories)
            else:
                support = torch.arange(base._num_events)
        nesting = max(nesting, len(fn.batch_shape))
        local = any(f.name in subsampled for f in site["cond_indep_stack"])
        plates = frozenset(f.name for f in site["cond_indep_stack"])
        latents[name] = LatentSite(name, family, shape, event_dim, support, local=local, plates=plates)
    if device is None:
        for site in tr.nodes.values():
            if site["type"] == "sample" and isinstance(site["value"], torch.Tensor) and site["value"].is_floating_point():
                device = site["value"].device
                break
    if latent_dtype is not None:
        dtype = latent_dtype if dtype is None else torch.promote_types(dtype, latent_dtype)
        device = latent_device if device is None else device
    dtype = dtype or torch.get_default_dtype()
    device = device or torch.device("cpu")
    for i, site in enumerate(s for s in latents.values() if s.family == "Categorical"):
        site.enum_dim = -(nesting + 1 + i)
        site.support = site.support.to(device=device, dtype=dtype if site.support.is_floating_point() else torch.long)
    return latents, observed, nesting, dtype, device, subsampled


class StructureChanged(Exception):
    """A re-trace against a cached structure met a latent site that is new or has a new shape."""


class SymbolicMessenger(Messenger):
    """Replaces latent values by symbolic stand-ins and records every sample site as a :class:`Term`.

    With ``shapes`` (latent name -> shape of a cached structure) a latent site that is not
    there or whose shape differs raises :class:`StructureChanged` instead of being traced,
    and observed data are validated as :func:`prior_structure` does; ``subsampled`` collects
    the names of the plates that draw a proper subsample."""

    def __init__(self, values: Dict[str, Tensor], shapes: Optional[Dict[str, torch.Size]] = None):
        super().__init__()
        self.values = values
        self.shapes = shapes
        self.terms: List[Term] = []
        self.subsampled: set = set()

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        if self.shapes is not None:
            expected = self.shapes.get(msg["name"])
            shape = msg["fn"].shape()
            if expected is None or len(shape) < len(expected) or shape[len(shape) - len(expected):] != expected:
                raise StructureChanged(msg["name"])
        if msg["name"] not in self.values:
            raise NonConjugateError(f"site {msg['name']!r} appeared in the model after tracing; its structure changed")
        msg["value"] = self.values[msg["name"]]
        msg["done"] = True
        msg["infer"] = dict(msg["infer"], _cavi=True)

    def _postprocess_message(self, msg):
        if site_is_subsample(msg):
            if msg["value"].shape[0] != msg["fn"].size:
                self.subsampled.add(msg["name"])
            return
        if msg["type"] != "sample" or msg["infer"].get("_deterministic"):
            return
        _check_params(msg["name"], msg["fn"])
        if self.shapes is not None and msg["is_observed"]:
            _check_observed(msg["name"], msg)
        mask = msg["mask"] if isinstance(msg["mask"], torch.Tensor) else None
        if msg["mask"] is False:
            mask = torch.zeros((), dtype=torch.bool)
        value = msg["value"]
        full_mask = _combined_mask(msg)
        if msg["is_observed"] and full_mask is not None and value.is_floating_point():
            value = torch.where(full_mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
        plates = frozenset(f.name for f in msg["cond_indep_stack"])
        self.terms.append(Term(msg["name"], msg["fn"], value, msg["is_observed"], msg["scale"], mask, plates=plates))


def _run_symbolically(messenger: "SymbolicMessenger", model, args, kwargs, values: Dict[str, Tensor]) -> None:
    """Run ``model`` under ``messenger``; an indexing or shape error with discrete latents held at
    their enumerated values is re-raised saying so (the model's own line is in the traceback)."""
    try:
        with pyro.validation_enabled(False), messenger:
            model(*args, **kwargs)
    except (IndexError, RuntimeError) as e:
        discrete = {name: tuple(v.shape) for name, v in values.items() if not isinstance(v, Sym)}
        if not discrete:
            raise
        raise NonConjugateError(
            f"tracing the model failed ({type(e).__name__}: {e}) with the discrete latent site(s) "
            f"{sorted(discrete)} held at their enumerated values (shapes {[discrete[n] for n in sorted(discrete)]}: "
            "the values in a dimension of their own left of the plates, as in Pyro's parallel enumeration). "
            "CAVI lets a discrete latent index parameters (locs[z]) in the plate it is drawn in; indexing, "
            "gathering or reshaping the discrete latent itself (e.g. z[group]) is not supported: lay the data "
            "out along the discrete latent's plate (e.g. rows as (groups, rows per group), the rows' plate nested in it)"
        ) from e


def symbolic_trace(model, args, kwargs, values: Dict[str, Tensor]) -> List[Term]:
    messenger = SymbolicMessenger(values)
    _run_symbolically(messenger, model, args, kwargs, values)
    return messenger.terms


def symbolic_retrace(model, args, kwargs, values: Dict[str, Tensor], shapes: Dict[str, torch.Size]):
    """:func:`symbolic_trace` against a cached structure (for a new minibatch): returns the terms
    and the names of the subsampled plates, or raises :class:`StructureChanged`."""
    messenger = SymbolicMessenger(values, shapes)
    _run_symbolically(messenger, model, args, kwargs, values)
    return messenger.terms, messenger.subsampled
