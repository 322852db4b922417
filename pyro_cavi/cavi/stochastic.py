r"""Stochastic CAVI for models that subsample a plate (Hoffman, Blei, Wang & Paisley 2013).

With a plate of :math:`N` elements of which a minibatch :math:`B` is drawn
(``pyro.plate("data", N, subsample_size=B)`` or ``subsample=idx``), Pyro scales the
minibatch's log densities by :math:`N / |B|`, so the expected log joint is an unbiased
estimate of the full one. One step of stochastic variational inference then

1. fits the *local* factors (latents inside the subsampled plate, and the Pólya-Gamma
   variables of its logistic likelihoods) exactly to the minibatch, holding the global
   factors fixed (``local_iters`` passes of coordinate ascent);
2. computes for every *global* factor the update :math:`\hat\eta` that CAVI would make if
   the minibatch, rescaled, were the whole data set, and moves the natural parameters a
   Robbins-Monro step towards it:

.. math::
    \eta_{t+1} = (1 - \rho_t)\,\eta_t + \rho_t\,\hat\eta_t, \qquad \rho_t = (t + \tau)^{-\kappa},

which is a natural-gradient step of size :math:`\rho_t` on the ELBO (Hoffman et al. 2013,
eq. 25); :math:`\kappa \in (0.5, 1]` gives convergence to a local optimum.

Every step sees a new minibatch, so the model has to be traced again for its data. The
*structure* of the model (latent sites, their factors, which terms involve which latents
through which parameters, the Pólya-Gamma augmentation) does not depend on the minibatch;
:func:`rebind_minibatch` re-runs only the symbolic pass of the model and keeps the
analysis, falling back to a full analysis whenever a shape, site or expression changes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import _Densify
from .rules import _params, unwrap
from .symbolic import Pos, Sym
from .tracing import StructureChanged, Term, symbolic_retrace


def robbins_monro(t: int, tau: float, kappa: float) -> float:
    """The step size :math:`\\rho_t = (t + \\tau)^{-\\kappa}` (1 when :math:`t + \\tau = 0`)."""
    return (t + tau) ** (-kappa) if (t + tau) > 0 else 1.0


def stochastic_step(cavi) -> None:
    """One step of stochastic CAVI on the minibatch the model was last traced on: local
    factors get their exact update; each global factor moves its natural parameters a step
    :math:`\\rho_t` towards the update the minibatch (rescaled to the full data) implies:
    :math:`\\eta \\leftarrow (1 - \\rho_t)\\eta + \\rho_t \\hat\\eta`."""
    rho = robbins_monro(cavi._t, *cavi.step_size)
    local = [n for n in cavi.factors if cavi._is_local(n)]
    fit_locals(cavi, local)
    for name, f in cavi.factors.items():
        if name in local:
            continue
        target = cavi._natural_grads(name)
        if rho >= 1.0:
            f.update(target)
        else:
            f.update(tuple((1 - rho) * a + rho * b for a, b in zip(f.natural(), target)))
    cavi._t += 1


def fit_locals(cavi, local: Optional[list] = None) -> None:
    """``local_iters`` passes of coordinate ascent over the local factors, globals held fixed.

    A single local factor is exact after one pass (its update depends on the globals only),
    so it gets one."""
    if local is None:
        local = [n for n in cavi.factors if cavi._is_local(n)]
    for _ in range(cavi.local_iters if len(local) > 1 else min(1, cavi.local_iters)):
        for name in local:
            cavi._update(name)


# ----------------------------------------------------------------------------- structure reuse
def _expr_signature(x) -> Optional[Tuple]:
    """What of a traced value decides the rule and the factors it touches: the kind of
    expression and the latents in it (for monomials of positive latents also the powers)."""
    if not isinstance(x, Sym):
        return None
    e = x._expr
    if isinstance(e, Pos):
        return ("Pos", tuple((f.site, f.power, f.complement) for f in e.factors), e.simplex)
    return (type(e).__name__, tuple(sorted(e.sites())))


def term_signature(term: Term) -> Tuple:
    """The structure of one traced ``pyro.sample`` statement, without its data: two terms
    with equal signatures involve the same latents through the same parameters, so the
    analysis of one (conjugacy, which factors it updates) holds for the other."""
    base, event_dims, mask = unwrap(term.fn)
    value = term.value
    return (
        term.name, type(base), event_dims, mask is None, term.mask is None, term.is_observed,
        tuple(term.fn.batch_shape), tuple(term.fn.event_shape),
        tuple(value.shape) if isinstance(value, torch.Tensor) else None,
        _expr_signature(value),
        tuple((k, _expr_signature(v)) for k, v in _params(base).items()),
        term.plates,
    )


def remember_structure(cavi, subsampled: set) -> None:
    """Record what :func:`rebind_minibatch` compares a new minibatch's trace against."""
    cavi._subsampled = set(subsampled)
    cavi._signatures = [term_signature(t) for t in cavi.terms]


def rebind_minibatch(cavi, args, kwargs) -> bool:
    """Trace the model on a new minibatch and reuse the cached structural analysis.

    Local factors start afresh (they belong to the previous minibatch's data), the model is
    run once under the symbolic messenger, and each new term takes over the analysis of the
    cached term with the same signature. Returns ``False`` (having changed nothing the full
    analysis relies on) when anything structural differs: a latent site's shape (e.g. a
    last, smaller minibatch), the set of sites, the subsampled plates, an expression's
    kind or latents, or the data's dtype or device."""
    signatures = getattr(cavi, "_signatures", None)
    if not signatures or not cavi.terms:
        return False
    for name, site in cavi.latents.items():
        if site.local and name not in cavi._group_of:
            cavi.factors[name] = cavi._make_factor(site, None)
    shapes = {name: site.shape for name, site in cavi.latents.items()}
    try:
        terms, subsampled = symbolic_retrace(cavi.model, args, kwargs, cavi._stand_ins(), shapes)
    except (StructureChanged, _Densify):
        return False
    if subsampled != cavi._subsampled or len(terms) != len(signatures):
        return False
    if any(term_signature(t) != sig for t, sig in zip(terms, signatures)):
        return False
    for new, old in zip(terms, cavi.terms):
        if isinstance(new.value, torch.Tensor) and (new.value.dtype, new.value.device) != (old.value.dtype, old.value.device):
            return False
    for new, old in zip(terms, cavi.terms):
        new.latent, new.discrete, new.uses = old.latent, old.discrete, old.uses
    cavi.terms = terms
    cavi._memo, cavi._cache = {}, {}  # both are keyed on the previous minibatch's tensors
    cavi._augment()
    cavi._terms_of = {
        name: [t for t in terms if name in t.latent or name in t.discrete or t.name == name]
        for name in cavi.factors
    }
    return True
