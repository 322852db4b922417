r"""Pareto-smoothed importance sampling diagnostics of a variational fit.

With draws :math:`\theta_s \sim q`, :math:`s = 1, \dots, S`, and log importance ratios

.. math::
    \log r_s = \log p(\theta_s, y) - \log q(\theta_s),

PSIS (Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024) fits a generalised Pareto
distribution to the largest ratios and replaces them by its quantiles. The fitted shape
:math:`\hat k` says how heavy the tail of :math:`p/q` is (Yao, Vehtari, Simpson &
Gelman, "Yes, but did it work? Evaluating variational inference", ICML 2018):

* :math:`\hat k < 0.5`: :math:`q` is close to the posterior; the smoothed weights are reliable;
* :math:`0.5 \le \hat k < 0.7`: usable, PSIS-corrected estimates are still trustworthy;
* :math:`\hat k \ge 0.7`: :math:`q` is far from the posterior (typically too narrow);
  do not trust the fit, nor the corrected estimates.

The smoothing itself is ArviZ's :func:`arviz.psislw`; the ratios come from Pyro traces
(:mod:`.ratios`, where the treatment of discrete local sites, sites the guide does not
draw and ``Delta`` sites is stated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from .guides import guide_and_log_density
from .ratios import log_importance_ratios

Tensor = torch.Tensor

GOOD_KHAT = 0.5
OK_KHAT = 0.7


def khat_reading(khat: float) -> str:
    """``"good"`` (k̂ < 0.5), ``"ok"`` (0.5 ≤ k̂ < 0.7) or ``"bad"`` (k̂ ≥ 0.7 or not a number)."""
    if khat < GOOD_KHAT:
        return "good"
    if khat < OK_KHAT:
        return "ok"
    return "bad"


_MEANING = {
    "good": "q is close to the posterior",
    "ok": "q is usable; prefer the PSIS-corrected estimates",
    "bad": "q is far from the posterior (usually too narrow): do not trust the fit",
}


@dataclass
class PSISResult:
    r"""What :func:`psis` returns.

    :ivar khat: the Pareto shape :math:`\hat k` (``-inf`` when the ratios are constant to
        rounding, i.e. :math:`q` equals the posterior).
    :ivar log_weights: PSIS-smoothed, normalised log weights, shape ``(S,)``.
    :ivar log_ratios: the raw :math:`\log p(\theta_s, y) - \log q(\theta_s)`, shape ``(S,)``.
    :ivar draws: latent site name -> draws from :math:`q`, shape ``(S,) + site shape``.
    :ivar ess: effective sample size :math:`1 / \sum_s \tilde w_s^2` of the smoothed weights.
    :ivar mean: PSIS-corrected posterior means :math:`\sum_s \tilde w_s \theta_s` per site.
    :ivar sd: PSIS-corrected posterior standard deviations per site.
    """

    khat: float
    log_weights: Tensor
    log_ratios: Tensor
    draws: Dict[str, Tensor]
    ess: float
    mean: Dict[str, Tensor] = field(repr=False)
    sd: Dict[str, Tensor] = field(repr=False)

    @property
    def num_samples(self) -> int:
        return self.log_ratios.shape[0]

    @property
    def reading(self) -> str:
        """``"good"``, ``"ok"`` or ``"bad"`` (thresholds 0.5 and 0.7 of Yao et al. 2018)."""
        return khat_reading(self.khat)

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    @property
    def log_evidence(self) -> float:
        r"""The importance-sampling estimate :math:`\log \frac1S \sum_s r_s` of :math:`\log p(y)`
        (raw ratios; a lower bound in expectation, tight when :math:`q` is the posterior)."""
        return float(torch.logsumexp(self.log_ratios, 0) - math.log(self.num_samples))

    def resample(self, num_samples: Optional[int] = None, generator: Optional[torch.Generator] = None):
        """Importance-resampled draws (multinomial, with replacement, by the smoothed weights):
        site name -> tensor of shape ``(num_samples,) + site shape``."""
        n = self.num_samples if num_samples is None else num_samples
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return {name: v[idx] for name, v in self.draws.items()}

    def summary(self) -> str:
        lines = [
            f"PSIS over {self.num_samples} draws: k-hat = {self.khat:.3f} ({self.reading}: {_MEANING[self.reading]}), "
            f"ESS = {self.ess:.1f}"
        ]
        for name in self.draws:
            raw = self.draws[name].to(self.log_weights.dtype)
            lines.append(
                f"  {name}: mean {_fmt(self.mean[name])} (q: {_fmt(raw.mean(0))}), "
                f"sd {_fmt(self.sd[name])} (q: {_fmt(raw.std(0))})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _fmt(x: Tensor) -> str:
    if x.numel() == 1:
        return f"{float(x):.4g}"
    flat = x.flatten()
    body = ", ".join(f"{float(v):.4g}" for v in flat[:4])
    return f"[{body}{', ...' if flat.numel() > 4 else ''}]"


def smooth(log_ratios: Tensor):
    """``(log_weights, khat)``: ArviZ's PSIS on one vector of log ratios, with the ratios that
    are constant to rounding (q equals the posterior) given uniform weights and ``k̂ = -inf``."""
    import arviz as az

    lr = log_ratios.detach().cpu().double().numpy()
    finite = lr[np.isfinite(lr)]
    if finite.size == 0:
        raise ValueError("every draw has log p(theta, y) = -inf: q puts no mass on the model's support")
    spread = finite.max() - finite.min()
    eps = torch.finfo(log_ratios.dtype).eps
    if finite.size == lr.size and spread <= math.sqrt(eps) * max(1.0, float(np.abs(np.median(lr)))):
        lw = np.full(lr.shape, -math.log(lr.size))
        khat = -math.inf
    else:
        lw, khat = az.psislw(lr, reff=1.0)
        khat = float(khat)
    return torch.as_tensor(lw, dtype=log_ratios.dtype), khat


def weighted_moments(draws: Dict[str, Tensor], log_weights: Tensor):
    """Per-site weighted means and standard deviations of the draws."""
    w = log_weights.exp()
    mean, sd = {}, {}
    for name, v in draws.items():
        v = v.to(w.dtype)
        ww = w.reshape((-1,) + (1,) * (v.dim() - 1))
        m = (ww * v).sum(0)
        mean[name] = m
        sd[name] = (ww * (v - m) ** 2).sum(0).clamp(min=0).sqrt()
    return mean, sd


def psis(
    fit_or_guide: Any, model: Callable, *args, num_samples: int = 1000, discrete: str = "sample", **kwargs
) -> PSISResult:
    r"""PSIS diagnostic of a variational fit (Yao et al. 2018): Pareto :math:`\hat k`, smoothed
    weights, effective sample size and importance-corrected posterior means and sds.

    Works for every pyro_cavi engine (anything with a ``.guide``) and for any Pyro guide
    callable, e.g. an :class:`~pyro.infer.autoguide.AutoNormal` trained with
    :class:`~pyro.infer.SVI`. The ratio is over the latent sites the guide draws:

    * CAVI's discrete local sites (Categorical factors) are drawn from :math:`q(z)`, so the
      ratio :math:`p(\theta, z, y) / q(\theta) q(z)` diagnoses the joint mean-field fit
      (``discrete="sample"``, the default); with ``discrete="enumerate"`` they are summed out
      instead, :math:`\sum_z p(\theta, z, y) / q(\theta)`, which diagnoses :math:`q(\theta)`
      alone (exact enumeration, one draw at a time: slower; needs a model that runs under
      :class:`~pyro.infer.TraceEnum_ELBO` and a guide whose continuous sites do not depend on
      its discrete draws, as in CAVI's mean-field guide);
    * a site drawn from an exact conditional :math:`p(z \mid \theta, y)` (NG-HVI's
      :class:`~pyro_cavi.nghvi.HybridGuide`) enters as
      :math:`p(\theta, z, y) / q(\theta) p(z \mid \theta, y) = p(\theta, y) / q(\theta)`,
      i.e. the integrated site drops out and :math:`\hat k` is the one of :math:`q(\theta)`;
      this needs the conditional's ``log_prob`` (a Gibbs-type sampler without it is refused);
    * a mixture guide (:class:`~pyro_cavi.miselbo.MixtureGuide`) is weighed with its mixture
      density :math:`\frac1A \sum_a q_a(\theta)`, not the density of one component;
    * a model site the guide does not draw comes from its prior and cancels;
    * auxiliary variables an engine uses internally and that are not sites of the model
      (CAVI's Pólya-Gamma variables) never enter: the ratio is against the model's own
      :math:`p(\theta, y)`, so k-hat also judges the augmentation's mean-field error.

    Example::

        cavi = CAVI(model)
        cavi.run(X, y)
        res = psis(cavi, model, X, y, num_samples=2000)
        res.khat, res.reading          # e.g. (0.81, "bad")
        res.mean["w"], res.sd["w"]     # PSIS-corrected moments
        res.resample(1000)             # importance-resampled draws

    :param fit_or_guide: a fitted engine with a ``.guide``, or a guide callable.
    :param model: the model, called with ``*args, **kwargs`` (with the data).
    :param num_samples: number of draws :math:`S` from :math:`q` (``>= 2``).
    :param discrete: ``"sample"`` (discrete latent sites drawn by the guide are part of
        :math:`\theta`) or ``"enumerate"`` (they are summed out of the model).
    """
    guide, log_q_fn = guide_and_log_density(fit_or_guide, model, args, kwargs)
    draws, log_p, log_q = log_importance_ratios(guide, model, args, kwargs, num_samples, log_q_fn, discrete)
    log_ratios = log_p - log_q
    log_weights, khat = smooth(log_ratios)
    ess = float(1.0 / log_weights.mul(2).exp().sum())
    mean, sd = weighted_moments(draws, log_weights)
    return PSISResult(khat, log_weights, log_ratios, draws, ess, mean, sd)
