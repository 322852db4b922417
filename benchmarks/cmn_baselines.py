r"""Baselines for the conditional mixture network (CMN) benchmarks of issue 4.

Three baselines, all on the architecture of ``models/cmn.py``:

* :class:`MixtureMLE`: maximum likelihood for the *deterministic* mixture of linear experts
  (no priors, no expert noise),

  .. math:: p(y \mid x) = \sum_{k=1}^K \pi_k(x)\, \mathrm{SB}\big(y \mid B\,[A_k \tilde x, 1]\big),
            \qquad \pi(x) = \mathrm{SB}(\Gamma \tilde x),

  where SB is the stick-breaking categorical, fitted by full-batch Adam on the mean negative
  log likelihood; optionally with early stopping on a stratified validation split (the best
  validation-NLL parameters are kept). The CAVI-CMN paper (Heins et al. 2024, arXiv 2408.16429)
  uses the same baseline without early stopping.

* :func:`fit_bbvi`: black-box VI (Pyro SVI) on the very model ``models/cmn.py:cmn``, with the
  gating assignments ``z`` enumerated exactly (``TraceEnum_ELBO``, parallel enumeration by
  :func:`~pyro.infer.config_enumerate`) and an :class:`~pyro.infer.autoguide.AutoNormal`
  guide on every other latent (Γ, A, γ, B and the local hidden units ``x1``). It maximises

  .. math:: \mathcal L(\phi) = \mathbb E_{q_\phi(\theta, x_1)}\Big[\log \textstyle\sum_z p(y, x_1, z, \theta \mid X)
            - \log q_\phi(\theta, x_1)\Big].

* :func:`fit_nuts`: NUTS (Hoffman & Gelman 2014; Pyro's ``MCMC(NUTS(...))``, one chain) on the
  same model, with ``z`` enumerated, so the chain moves on the continuous latents
  θ = (Γ, A, γ, B) and the local hidden units ``x1`` (N·h of them) with the potential

  .. math:: U(\theta, x_1) = -\log p(\theta) - \sum_n \Big[\log \textstyle\sum_k
            p(z_n = k \mid \Gamma, x_n)\, p(x_{1n} \mid A_k, \gamma_k, x_n)\Big]
            - \sum_n \log p(y_n \mid x_{1n}, B)

  (γ on the log scale, with its Jacobian). The posterior predictive pushes the draws of θ
  through ``cmn.predict_proba`` as for BBVI (:func:`nuts_predict_proba`).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import pyro
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_uniform

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import cmn as cmn_model  # noqa: E402

from pyro_cavi.distributions import StickBreakingCategorical  # noqa: E402


def _tilde(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)], -1)


class MixtureMLE(nn.Module):
    """The CMN as a deterministic mixture of linear experts (see the module docstring)."""

    def __init__(self, num_features: int, num_classes: int, num_experts: int = 20, hidden: Optional[int] = None,
                 init_scale: float = 0.1, seed: int = 0):
        super().__init__()
        if num_experts < 2 or num_classes < 2:
            raise ValueError(f"need num_experts >= 2 and num_classes >= 2, got {num_experts} and {num_classes}")
        h = hidden or num_classes - 1
        g = torch.Generator().manual_seed(seed)
        dtype = torch.get_default_dtype()
        D1 = num_features + 1
        self.gate = nn.Parameter(init_scale * torch.randn(num_experts - 1, D1, generator=g, dtype=dtype))
        self.A = nn.Parameter(init_scale * torch.randn(num_experts, h, D1, generator=g, dtype=dtype))
        self.out = nn.Parameter(init_scale * torch.randn(num_classes - 1, h + 1, generator=g, dtype=dtype))

    def log_proba(self, X: torch.Tensor) -> torch.Tensor:
        """``log p(y = l | x)`` for every row of ``X``, shape ``(N, L)``."""
        if X.dim() != 2 or X.shape[1] + 1 != self.gate.shape[1]:
            raise ValueError(f"X must have shape (N, {self.gate.shape[1] - 1}), got {tuple(X.shape)}")
        Xt = _tilde(X)
        log_w = StickBreakingCategorical(Xt @ self.gate.T).log_probs  # (N, K)
        x1 = torch.einsum("khd,nd->nkh", self.A, Xt)
        log_p = StickBreakingCategorical(_tilde(x1) @ self.out.T).log_probs  # (N, K, L)
        return torch.logsumexp(log_w.unsqueeze(-1) + log_p, -2)

    def nll(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.log_proba(X).gather(-1, y.unsqueeze(-1)).mean()

    @torch.no_grad()
    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return self.log_proba(X).exp()


def fit_mle(X: torch.Tensor, y: torch.Tensor, num_experts: int = 20, num_classes: Optional[int] = None,
            num_steps: int = 5000, lr: float = 5e-3, X_val: Optional[torch.Tensor] = None,
            y_val: Optional[torch.Tensor] = None, eval_every: int = 20, patience: int = 25,
            seed: int = 0) -> MixtureMLE:
    """Full-batch Adam on the mean NLL. With a validation set, stop once the validation NLL has not
    improved for ``patience`` evaluations and return the best-validation parameters."""
    L = num_classes or int(y.max()) + 1
    model = MixtureMLE(X.shape[1], L, num_experts, seed=seed)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, bad = float("inf"), None, 0
    model.steps_run = num_steps
    for step in range(num_steps):
        optim.zero_grad()
        loss = model.nll(X, y)
        loss.backward()
        optim.step()
        if X_val is not None and (step + 1) % eval_every == 0:
            with torch.no_grad():
                val = float(model.nll(X_val, y_val))
            if val < best:
                best, bad = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    model.steps_run = step + 1
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


@dataclass
class BBVIFit:
    guide: AutoNormal
    elbo_trace: List[float] = field(default_factory=list)  # -loss per step (one-particle estimates)
    time_trace: List[float] = field(default_factory=list)  # wall seconds since the start, per step

    def time_to_final_elbo(self, rel: float = 0.01, window: int = 100) -> float:
        """Wall seconds until the moving-average ELBO (``window`` steps) first comes within
        ``rel · |final|`` of its final value (the mean of the last ``window`` steps)."""
        trace = torch.tensor(self.elbo_trace, dtype=torch.float64)
        w = min(window, len(trace))
        smooth = trace.unfold(0, w, 1).mean(-1)
        final = float(smooth[-1])
        hit = int((smooth >= final - rel * abs(final)).nonzero()[0])
        return self.time_trace[hit + w - 1]


class _Draws:
    """Posterior draws of the global sites, dressed as a fitted engine for ``cmn.predict_proba``."""

    class _Site:
        def __init__(self, value: torch.Tensor):
            self.value = value

        def sample(self, sample_shape=torch.Size()):
            if tuple(sample_shape) != self.value.shape[:1]:
                raise ValueError(f"have {self.value.shape[0]} draws, asked for {tuple(sample_shape)}")
            return self.value

    def __init__(self, draws: Dict[str, torch.Tensor]):
        self.posterior = {name: self._Site(v) for name, v in draws.items()}

    def sample_posterior(self, num_samples: int, sites) -> Dict[str, torch.Tensor]:
        return {name: self.posterior[name].sample((num_samples,)) for name in sites}


def fit_bbvi(X: torch.Tensor, y: torch.Tensor, num_experts: int = 20, num_steps: int = 3000, lr: float = 0.01,
             seed: int = 0, **model_kwargs) -> BBVIFit:
    """Pyro SVI on ``cmn`` with ``z`` enumerated and an AutoNormal guide on the other latents."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = config_enumerate(functools.partial(cmn_model.cmn, num_experts=num_experts, **model_kwargs))
    guide = AutoNormal(poutine.block(model, hide=["z"]))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=2))
    fit = BBVIFit(guide)
    start = time.perf_counter()
    for _ in range(num_steps):
        fit.elbo_trace.append(-svi.step(X, y))
        fit.time_trace.append(time.perf_counter() - start)
    return fit


@torch.no_grad()
def bbvi_predict_proba(fit: BBVIFit, X_train: torch.Tensor, y_train: torch.Tensor, X_new: torch.Tensor,
                       num_samples: int = 200) -> torch.Tensor:
    """Posterior predictive p(y | x_new) under the SVI guide: draws of Γ, A, γ, B from the guide,
    then the same Monte Carlo over x1 and exact sum over experts as ``cmn.predict_proba``."""
    sites = ("gate", "A", "prec", "out")
    draws = [fit.guide(X_train, y_train) for _ in range(num_samples)]
    stacked = {s: torch.stack([d[s] for d in draws]) for s in sites}
    return cmn_model.predict_proba(_Draws(stacked), X_new, num_samples=num_samples)


def init_outside_enumeration(init_strategy: Callable = init_to_uniform) -> Callable:
    """An MCMC ``init_strategy`` that drops the enumeration dimensions from continuous sites.

    Pyro's ``initialize_model`` takes the shape of every continuous latent from a prototype run
    of the model *under parallel enumeration*. A continuous site whose distribution depends on
    an enumerated site (the CMN's hidden units ``x1 ~ N(A[z] x̃, γ[z]^(-1/2))``) then gets a
    prototype value with the enumeration dimension, (K, 1, N, h) instead of (N, h): the chain
    would carry one ``x1`` per expert, each with a prior only in its own expert's term of the
    sum over ``z`` and free in the others (an improper posterior; on a 40-point toy set NUTS
    took 3× longer with it). This wrapper keeps only the batch dimensions of the site's own
    plates (index 0 along the dimensions to their left), so ``x1`` has one value per datum and
    its density is summed over ``z`` by the enumeration, as the model means."""

    def init(site):
        value = init_strategy(site)
        plates = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
        extra = value.dim() - site["fn"].event_dim - max(plates, default=0)
        return value[(0,) * extra] if extra > 0 else value

    return init


class _CountingNUTS(NUTS):
    """NUTS that counts potential-energy evaluations (one per leapfrog step, plus one per
    iteration): ``num_grads``, and ``num_grads_warmup`` at the end of warm-up."""

    def setup(self, warmup_steps, *args, **kwargs):
        super().setup(warmup_steps, *args, **kwargs)
        self.num_grads, self.num_grads_warmup, self._warmup = 0, None, warmup_steps
        potential_fn = self.potential_fn

        def counted(params):
            self.num_grads += 1
            return potential_fn(params)

        self.potential_fn = counted

    def sample(self, params):
        if self._t == self._warmup:
            self.num_grads_warmup = self.num_grads
        return super().sample(params)


@dataclass
class NUTSFit:
    mcmc: MCMC
    samples: Dict[str, torch.Tensor]  # constrained draws, each (num_samples, ...)
    num_grads: int  # potential-energy (and gradient) evaluations, warm-up included
    num_grads_warmup: int
    divergences: int  # divergent transitions after warm-up
    step_size: float  # adapted step size
    wall_warmup: float  # wall seconds of warm-up (the rest of the fit is sampling)


def fit_nuts(X: torch.Tensor, y: torch.Tensor, num_experts: int = 20, num_warmup: int = 200,
             num_samples: int = 200, seed: int = 0, max_tree_depth: int = 10, target_accept_prob: float = 0.8,
             jit_compile: bool = True, **model_kwargs) -> NUTSFit:
    """One NUTS chain on ``cmn`` with ``z`` enumerated (``max_plate_nesting=2``: the experts and
    hidden plates nest two deep; the data plate is one), diagonal mass matrix and step size
    adapted in warm-up, starting from :func:`init_outside_enumeration` (uniform on (−2, 2) in
    the unconstrained space, Pyro's default). No change to the model is needed.

    Convergence diagnostics per parameter (r-hat, ESS) are not meaningful here: one chain, and
    the experts (and gating sticks) can switch labels; the predictive is label-invariant."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = config_enumerate(functools.partial(cmn_model.cmn, num_experts=num_experts, **model_kwargs))
    kernel = _CountingNUTS(model, max_plate_nesting=2, jit_compile=jit_compile, ignore_jit_warnings=True,
                           max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
                           init_strategy=init_outside_enumeration(init_to_uniform))
    times = {}

    def hook(kernel_, params, stage, i):
        if stage == "Warmup" and i == num_warmup - 1:
            times["warmup"] = time.perf_counter() - start
        if stage == "Sample":  # the kernel's counters are reset when the run ends
            times["divergences"] = len(kernel_.diagnostics()["divergences"])

    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, disable_progbar=True, hook_fn=hook)
    start = time.perf_counter()
    mcmc.run(X, y)
    samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
    return NUTSFit(mcmc, samples, kernel.num_grads, kernel.num_grads_warmup or kernel.num_grads, times.get("divergences", 0),
                   float(kernel.step_size), times.get("warmup", 0.0))


@torch.no_grad()
def nuts_predict_proba(fit: NUTSFit, X_new: torch.Tensor) -> torch.Tensor:
    """Posterior predictive p(y | x_new) from the NUTS draws of Γ, A, γ, B: one x1 per draw and
    an exact sum over experts, through ``cmn.predict_proba``."""
    draws = {s: fit.samples[s] for s in ("gate", "A", "prec", "out")}
    return cmn_model.predict_proba(_Draws(draws), X_new, num_samples=draws["gate"].shape[0])
