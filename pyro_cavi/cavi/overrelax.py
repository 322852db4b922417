r"""Adaptive over-relaxed CAVI sweeps: ``CAVI(model, overrelax=2.0)``.

Coordinate ascent crawls where the factors are strongly coupled (e.g. mixture components being
emptied one by one): each sweep moves the parameters a little, in nearly the same direction.
Adaptive over-relaxed bound optimisation (Salakhutdinov & Roweis, "Adaptive overrelaxed bound
optimization methods", ICML 2003) extrapolates along that direction. With :math:`\eta_t` the
natural parameters of every (non-auxiliary) factor before the sweep and :math:`\eta^{\rm cavi}`
the result of one ordinary sweep from :math:`\eta_t`, it tries

.. math::
    \eta^{\rm new} = \eta_t + \alpha\,(\eta^{\rm cavi} - \eta_t), \qquad \alpha \ge 1,

keeps :math:`\eta^{\rm new}` and grows :math:`\alpha \leftarrow \gamma\alpha` (``gamma`` =
``overrelax``) if :math:`\mathcal L(\eta^{\rm new}) > \mathcal L(\eta^{\rm cavi})`, and
otherwise keeps the ordinary sweep's :math:`\eta^{\rm cavi}` and resets :math:`\alpha = 1`.
Extrapolating natural parameters of exponential-family factors is the VB form of the idea
(Honkela, Valpola & Karhunen, "Accelerating cyclic update algorithms for parameter estimation
by pattern searches", Neural Processing Letters 2003, do the line search along the
sweep's direction; natural parameters are the coordinates in which a CAVI update is a
unit natural-gradient step, Hoffman et al. 2013).

Details here:

* Extrapolated are the natural parameters of every factor as :meth:`~.factors.ExpFamilyFactor.natural`
  gives them (Gaussian :math:`(\Lambda m, -\Lambda/2)`, Gamma :math:`(-b, a-1)`, log
  responsibilities, the joint factors' own); the extrapolated factor is built by the factor's
  own ``update``, so a point that is not a distribution (precision not positive definite,
  non-positive Gamma shape or rate, non-finite values) is refused there, and counts as a
  failure.
* The Pólya-Gamma auxiliaries are not extrapolated: they are refitted to the extrapolated
  factors (their optimal update, as at the start of every sweep), so the trial ELBO is the
  exact ELBO of the factors it is reported for, and the bound is tight at them.
* Guarantee: the ELBO after a sweep is at least the one the ordinary sweep from the same
  factors gives (the trial is kept only if strictly higher), which is at least the ELBO before
  the sweep. So the ELBO never decreases (in exact arithmetic: in float32 a trial can be kept
  on an ELBO difference at the evaluation's rounding level, and the next sweep's ELBO can then
  read a few thousandths of a nat lower at convergence, below ``CAVI.run``'s tolerance).
* Cost per sweep: one more ELBO evaluation, one update of every factor from the extrapolated
  natural parameters and one refit of the augmentation factors.
"""

from __future__ import annotations

import copy
import math

import torch

from .errors import NonConjugateError

Tensor = torch.Tensor


def check_growth(overrelax) -> None:
    if overrelax is None:
        return
    if isinstance(overrelax, bool) or not isinstance(overrelax, (int, float)) or not overrelax > 1 or not math.isfinite(overrelax):
        raise ValueError(f"overrelax must be None (ordinary sweeps) or a finite growth factor > 1 of the "
                         f"extrapolation step, e.g. 2.0, got {overrelax!r}")


def overrelaxed_sweep(cavi) -> Tensor:
    """One adaptive over-relaxed sweep of ``cavi`` (its step size in ``cavi._alpha``); returns the
    ELBO of the factors it leaves."""
    alpha = cavi._alpha
    if alpha == 1.0:  # the trial would be the ordinary sweep itself: accepted, grow the step
        cavi._sweep()
        cavi._alpha = cavi.overrelax
        cavi.overrelax_trace.append(1.0)
        return cavi._elbo()
    before = {name: f.natural() for name, f in cavi.factors.items() if not f.auxiliary}
    cavi._sweep()
    elbo = cavi._elbo()
    plain = dict(cavi.factors)
    try:
        for name, old in before.items():
            new = cavi.factors[name].natural()
            trial = copy.copy(cavi.factors[name])  # updates rebind tensors, the plain factor is untouched
            eta = tuple(o + alpha * (n - o) for o, n in zip(old, new))
            if not all(bool(torch.isfinite(e).all()) for e in eta):
                raise NonConjugateError("non-finite extrapolated natural parameters")
            trial.update(eta)
            cavi.factors[name] = trial
        for name, f in plain.items():
            if f.auxiliary:
                cavi.factors[name] = copy.copy(f)
                cavi._update(name)
        trial_elbo = cavi._elbo()
        accepted = bool(torch.isfinite(trial_elbo)) and bool(trial_elbo > elbo)
    except (NonConjugateError, RuntimeError):
        accepted = False
    if accepted:
        cavi._alpha = alpha * cavi.overrelax
        cavi.overrelax_trace.append(alpha)
        return trial_elbo
    cavi.factors.clear()
    cavi.factors.update(plain)
    cavi._alpha = 1.0
    cavi.overrelax_trace.append(-alpha)
    return elbo
