"""
A Pyro guide for the hybrid variational family ``q(theta) p(z | theta, y)``.
"""

from __future__ import annotations

import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, init_to_feasible

from .hybrid_elbo import _as_conditional


class _PaperInitLowRankMVN(AutoLowRankMultivariateNormal):
    """``AutoLowRankMultivariateNormal`` started where the authors' code starts NG-HVI and SG-HVI
    (``Hybrid_LMM_initialize.m``): ``d = init_scale`` (1) for every coordinate and a small lower
    triangular factor ``B = init_factor`` (0.01), i.e. ``scale = d`` and ``cov_factor = B / d``."""

    def __init__(self, model, rank: int, init_scale: float, init_factor: float, **kwargs):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        super().__init__(model, rank=rank, **kwargs)
        self._pyro_name = "AutoLowRankMultivariateNormal"  # the parameter names of the parent
        self._paper_scale, self._paper_factor = float(init_scale), float(init_factor)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        with torch.no_grad():
            M, p = self.cov_factor.shape
            self.cov_factor.data.copy_(self.cov_factor.new_full((M, p), self._paper_factor / self._paper_scale).tril())
            self.scale = self.loc.new_full((M,), self._paper_scale)


class HybridGuide:
    r"""
    The guide of hybrid variational inference: :math:`\theta \sim q_\lambda(\theta)` from
    ``global_guide`` (by default an :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`
    with covariance :math:`BB^T + D^2` over every latent site except the local ones), then the
    local latents :math:`z \sim p(z \mid \theta, y)` from the exact conditional, recorded as
    ``Delta`` sites.  Train it with :class:`~pyro_cavi.nghvi.HybridELBO` (which uses only
    ``global_guide``); use it as the guide of :class:`~pyro.infer.Predictive` or
    ``pyro_cavi.to_inference_data`` to get posterior draws of both ``theta`` and ``z``.
    The conditional of ``z`` depends on the data, so call the guide with the observations
    (the same arguments as in training); without them it conditions on data simulated by the model.

    :param model: the Pyro model.
    :param local_sites: a local site name or a conditional sampler (as in ``HybridELBO``).
    :param int rank: number of factors ``p`` of the covariance (the paper uses ``p = 3``).
    :param global_guide: an existing guide over the global sites (then ``rank``, ``name`` and
        ``guide_kwargs`` are ignored).
    :param str name: prefix of the default guide's parameter names in Pyro's param store
        (``"<name>.loc"`` ...); give each of several live guides its own name.
    :param float init_scale: initial ``d`` of the default guide (every coordinate).  The default
        1 and ``init_factor = 0.01`` are the authors' starting point, from which the paper's
        comparisons of NG-HVI and SG-HVI run; ``init_scale=None`` keeps Pyro's initialisation of
        ``AutoLowRankMultivariateNormal`` (``scale`` about 0.07, random ``cov_factor``).
    :param float init_factor: initial entries of the lower triangle of ``B``.
    :param guide_kwargs: passed to ``AutoLowRankMultivariateNormal`` (default
        ``init_loc_fn=init_to_feasible``).
    """

    def __init__(
        self,
        model,
        local_sites,
        rank: int = 3,
        global_guide=None,
        name: str | None = None,
        init_scale: float | None = 1.0,
        init_factor: float = 0.01,
        **guide_kwargs,
    ):
        self.model = model
        self.conditional = _as_conditional(local_sites)
        if global_guide is None:
            guide_kwargs.setdefault("init_loc_fn", init_to_feasible)
            global_model = poutine.block(model, hide=list(self.conditional.sites))
            if init_scale is None:
                global_guide = AutoLowRankMultivariateNormal(global_model, rank=rank, **guide_kwargs)
            else:
                global_guide = _PaperInitLowRankMVN(global_model, rank, init_scale, init_factor, **guide_kwargs)
            if name is not None:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"name must be a non-empty string, got {name!r}")
                global_guide._pyro_name = name  # PyroModule's name: the param-store prefix
        self.global_guide = global_guide

    def __call__(self, *args, **kwargs) -> dict:
        theta = self.global_guide(*args, **kwargs)
        theta = {name: value.detach() for name, value in theta.items()}
        prototype = getattr(self.global_guide, "prototype_trace", None)
        if prototype is not None:
            for name, value in theta.items():
                expected = prototype.nodes[name]["value"].shape
                if value.shape != expected:
                    raise ValueError(
                        f"HybridGuide draws one theta at a time, but site '{name}' has shape "
                        f"{tuple(value.shape)} instead of {tuple(expected)} (is the guide run under a "
                        "vectorising plate, e.g. Predictive(parallel=True)? use parallel=False)"
                    )
        z = self.conditional(self.model, theta, *args, **kwargs)
        for name, value in z.items():
            pyro.sample(name, dist.Delta(value, event_dim=value.dim()))
        return {**theta, **z}
