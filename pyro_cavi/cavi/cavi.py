r"""Coordinate-ascent variational inference for conditionally conjugate Pyro models.

Given a model :math:`p(x, y)` with latent sites :math:`x_1, \dots, x_n`, CAVI fits
the mean-field posterior :math:`q(x) = \prod_i q_i(x_i)` by maximising

.. math::
    \mathrm{ELBO}(q) = E_q[\log p(x, y)] + \sum_i \mathbb{H}[q_i]

one factor at a time. When every complete conditional :math:`p(x_i \mid x_{-i}, y)`
is in the exponential family of :math:`q_i`, the optimal factor given the others is

.. math::
    q_i^*(x_i) \propto \exp E_{q_{-i}}[\log p(x, y)], \qquad
    \eta_i^* = \frac{\partial E_q[\log p(x, y)]}{\partial \mu_i},

in natural parameters :math:`\eta_i`, with :math:`\mu_i = E_{q_i}[T(x_i)]` its mean
parameters (Blei, Kucukelbir & McAuliffe 2017; Hoffman, Johnson & Tran, "Autoconj",
2018; Khan & Lin 2017). The engine finds the conjugate structure itself by tracing
the model symbolically (:mod:`.symbolic`), writes :math:`E_q[\log p]` as a torch
function of the :math:`\mu_i` (:mod:`.rules`, :mod:`.expectations`) and takes the
gradient with autograd. Every update is closed form, the ELBO is exact and never
decreases from one update to the next.

Discrete latent sites are enumerated (their factor is a Categorical with the site's
batch shape, the responsibilities), as in CAVI for Gaussian mixtures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist

from .errors import _Densify
from .factors import (
    PolyaGammaFactor,
    ReshapedMultivariateNormal,
    BetaFactor,
    CategoricalFactor,
    DirichletFactor,
    ExpFamilyFactor,
    GammaFactor,
    GaussianFactor,
    InverseGammaFactor,
)
from ..distributions.stick_breaking import StickBreakingCategorical
from .rules import expected_log_prob, has_latent_logits, pg_name, unwrap
from .symbolic import Lin, Sym, identity_lin, identity_pos, memoize
from .stochastic import fit_locals, rebind_minibatch, remember_structure, stochastic_step
from .tracing import LatentSite, Term, prior_structure, symbolic_trace

Tensor = torch.Tensor

_POSITIVE_FACTORS = {
    "Gamma": GammaFactor,
    "InverseGamma": InverseGammaFactor,
    "Beta": BetaFactor,
    "Dirichlet": DirichletFactor,
}


@dataclass
class CAVIResult:
    """What :meth:`CAVI.run` returns."""

    elbo: float
    elbo_trace: List[float]
    num_steps: int
    converged: bool
    restart: int = 0
    restart_elbos: List[float] = field(default_factory=list)


class CAVI:
    """Closed-form coordinate-ascent VI for an ordinary Pyro model; a drop-in for ``SVI``.

    :param model: a Pyro model with observed sites given through ``obs=``.
    :param seed: seed of the initialisation (responsibility seeding of discrete sites);
        ``None`` uses Pyro's global RNG, so results follow ``pyro.set_rng_seed``.
    :param num_restarts: :meth:`run` fits from this many initialisations and keeps the
        one with the best ELBO.
    :param step_size: ``(tau, kappa)`` of the Robbins-Monro step size
        :math:`\\rho_t = (t + \\tau)^{-\\kappa}` used when the model subsamples a plate
        (stochastic CAVI, Hoffman et al. 2013).
    :param local_iters: passes over the local factors per minibatch in stochastic CAVI.
    :param shard_plate: data-parallel CAVI with ``torch.distributed``: every process calls the
        model on its own shard of this plate's data; the expected sufficient statistics
        (gradients with respect to global mean parameters) of the sharded sites are summed by
        an all-reduce, so every process applies the same global update. Sites outside the
        plate (priors of global latents) must be identical on every process.
    :param init: how discrete sites are seeded: ``"kmeans++"`` (default) or ``"forgy"``.
    :param joint: groups of Gaussian latent sites to fit with one joint Gaussian factor
        (structured mean-field), e.g. ``joint=[("intercept", "slope", "u")]``: exact for
        jointly Gaussian posteriors and far fewer sweeps when the sites are correlated
        a posteriori.

    Example::

        cavi = CAVI(model)
        for step in range(10):
            loss = cavi.step(X, y)          # = -ELBO, never increases
        cavi.posterior["w"]                 # MultivariateNormal
        Predictive(model, guide=cavi.guide, num_samples=1000)(X)
    """

    def __init__(self, model, *, seed: Optional[int] = None, num_restarts: int = 1,
                 joint: Sequence[Sequence[str]] = (), init: str = "kmeans++",
                 step_size: tuple = (1.0, 0.7), local_iters: int = 3, shard_plate: Optional[str] = None):
        if init not in ("kmeans++", "forgy"):
            raise ValueError(f"init must be 'kmeans++' or 'forgy', got {init!r}")
        self.init = init
        tau, kappa = step_size
        if tau < 0 or not 0 <= kappa <= 1:
            raise ValueError(f"step_size=(tau, kappa) needs tau >= 0 and 0 <= kappa <= 1, got {step_size}")
        self.step_size = (float(tau), float(kappa))
        self.local_iters = local_iters
        self.shard_plate = shard_plate
        self.stochastic = False
        self.reuse_structure = True  # stochastic CAVI: re-trace minibatches against the cached analysis
        self._t = 0
        if num_restarts < 1:
            raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
        self.joint = [tuple(g) for g in joint]
        seen = set()
        for group in self.joint:
            if len(group) < 2 or len(set(group)) != len(group):
                raise ValueError(f"joint: each group needs two or more distinct site names, got {group}")
            if seen & set(group):
                raise ValueError(f"joint: site {sorted(seen & set(group))[0]!r} is in two groups")
            seen |= set(group)
        self._group_of = {name: "+".join(g) for g in self.joint for name in g}
        self.model = model
        self.seed = seed
        self.num_restarts = num_restarts
        self.factors: Dict[str, ExpFamilyFactor] = {}
        self.latents: Dict[str, LatentSite] = {}
        self.terms: List[Term] = []
        self.elbo_trace: List[float] = []
        self._key = None
        self._dense: set = set()
        self._initialised = False
        self._generator: Optional[torch.Generator] = None
        self._memo: dict = {}  # symbolic results, stable across sweeps
        self._cache: dict = {}  # sufficient statistics (Gram matrices) keyed on coefficients

    # ------------------------------------------------------------------ structure
    def _same_args(self, args, kwargs) -> bool:
        """Whether the model is called with the same data as when it was traced (the traced
        coefficients are functions of the data; a new slice with equal values is the same data)."""
        if self._key is None:
            return False
        old_args, old_kwargs = self._key
        if len(args) != len(old_args) or set(kwargs) != set(old_kwargs):
            return False
        for a, b in list(zip(args, old_args)) + [(kwargs[k], old_kwargs[k]) for k in kwargs]:
            if a is b:
                continue
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):
                    return False
            elif type(a) is not type(b) or not (a == b):
                return False
        return True

    def _prepare(self, args, kwargs) -> None:
        # a subsampling model draws a new minibatch on every call: always retrace it, keeping
        # the structural analysis when the structure is unchanged
        if not self.stochastic and self._same_args(args, kwargs):
            return
        if self.stochastic and self.reuse_structure and rebind_minibatch(self, args, kwargs):
            return
        key = (tuple(args), dict(kwargs))
        self._memo, self._cache = {}, {}
        (self.latents, self.observed, self.max_plate_nesting, self.dtype, self.device,
         subsampled) = prior_structure(self.model, args, kwargs)
        self.stochastic = bool(subsampled)
        if not self.latents:
            raise ValueError("the model has no latent sites: there is nothing to infer")
        self._check_groups()
        old = self.factors if self._key is not None else {}
        self._build_factors(old)
        while True:
            try:
                self.terms = symbolic_trace(self.model, args, kwargs, self._stand_ins())
                self._augment()
                self._analyse_terms()
                break
            except _Densify as e:
                if e.site in self._dense:
                    raise
                self._dense.add(e.site)
                self.factors[e.site] = self._make_factor(self.latents[e.site], None)
        remember_structure(self, subsampled)
        self._key = key
        if not old:
            self._initialised = False

    def _check_groups(self) -> None:
        for name, group in self._group_of.items():
            site = self.latents.get(name)
            if site is None:
                raise ValueError(f"joint: {name!r} is not a latent site of the model (sites: {sorted(self.latents)})")
            if site.family != "Gaussian":
                raise ValueError(f"joint: site {name!r} has a {site.family} factor; only Gaussian sites can be joined")

    def _group_layout(self, group: str):
        """(member name, offset, size) of each site of a joint Gaussian group."""
        out, offset = [], 0
        for g in self.joint:
            if "+".join(g) == group:
                for name in g:
                    k = self.latents[name].shape.numel()
                    out.append((name, offset, k))
                    offset += k
        return out

    def _build_factors(self, old: Dict[str, ExpFamilyFactor]) -> None:
        self.factors = {}
        for name, site in self.latents.items():
            group = self._group_of.get(name)
            if group is None:
                # local factors belong to the previous minibatch's data: start them afresh
                self.factors[name] = self._make_factor(site, None if site.local else old.get(name))
            elif group not in self.factors:
                size = sum(k for _, _, k in self._group_layout(group))
                prev = old.get(group)
                self.factors[group] = prev if prev is not None and prev.shape == (size,) else GaussianFactor(
                    group, torch.Size([size]), 1, self.dtype, self.device
                )

    def _make_factor(self, site: LatentSite, old: Optional[ExpFamilyFactor]) -> ExpFamilyFactor:
        if old is not None and old.shape == site.shape and getattr(old, "dense", False) == (site.name in self._dense):
            return old
        args = (site.name, site.shape, site.event_dim, self.dtype, self.device)
        if site.family == "Gaussian":
            return GaussianFactor(*args, dense=site.name in self._dense)
        if site.family == "Categorical":
            return CategoricalFactor(*args, support=site.support, bernoulli=site.support.is_floating_point())
        return _POSITIVE_FACTORS[site.family](*args)

    def _stand_ins(self) -> Dict[str, Tensor]:
        values = {}
        for name, site in self.latents.items():
            group = self._group_of.get(name)
            if group is not None:
                f = self.factors[group]
                _, offset, k = next(m for m in self._group_layout(group) if m[0] == name)
                n = f.block_size
                coef = torch.eye(n, dtype=self.dtype, device=self.device)[offset:offset + k].reshape(site.shape + (n,))
                idx = torch.zeros((), dtype=torch.long, device=self.device)
                expr = Lin(torch.zeros((), dtype=self.dtype, device=self.device), {group: (coef, idx)}, site.shape)
                values[name] = Sym(f.loc[0, offset:offset + k].reshape(site.shape).detach().clone(), expr)
                continue
            f = self.factors[name]
            if site.family == "Gaussian":
                expr = identity_lin(name, site.shape, site.event_dim, name in self._dense, self.dtype, self.device)
                values[name] = Sym(f.stand_in().detach().clone(), expr)
            elif site.family == "Categorical":
                k = site.support.shape[0]
                values[name] = site.support.reshape((k,) + (1,) * (-site.enum_dim - 1))
            else:
                expr = identity_pos(name, site.shape, site.family == "Dirichlet", self.dtype, self.device)
                values[name] = Sym(f.stand_in().detach().clone().to(self.dtype), expr)
        return values

    def _augment(self) -> None:
        """Add a Polya-Gamma factor for every logistic likelihood with latent logits."""
        for name in [n for n, f in self.factors.items() if f.auxiliary]:
            del self.factors[name]
        for term in self.terms:
            base, _, _ = unwrap(term.fn)
            if not isinstance(base, (dist.Bernoulli, dist.Binomial, StickBreakingCategorical)) or not has_latent_logits(base):
                continue
            batch = term.fn.batch_shape
            plates = batch[max(0, len(batch) - self.max_plate_nesting):] if self.max_plate_nesting else torch.Size()
            weight = self._weight(term).expand(plates) if self._weight(term).dim() <= len(plates) else self._weight(term)
            if isinstance(base, StickBreakingCategorical):
                shape = plates + base.logits.shape[-1:]
                b, weight = 1.0, weight.unsqueeze(-1)
            elif isinstance(base, dist.Binomial):
                shape, b = plates, base.total_count.expand(batch).reshape(batch)[(0,) * (len(batch) - len(plates))]
            else:
                shape, b = plates, 1.0
            self.factors[pg_name(term.name)] = PolyaGammaFactor(
                pg_name(term.name), shape, b, weight, self.dtype, self.device
            )

    def _analyse_terms(self) -> None:
        """Evaluate every term once: checks conjugacy now (errors name the sites) and records
        which latents each term involves."""
        mu = self._moments()
        for term in self.terms:
            # enumerated discrete sites show up as dimensions left of the plates in the batch shape
            value = term.value
            value_batch = value.shape[: value.dim() - term.fn.event_dim] if isinstance(value, torch.Tensor) else ()
            batch = torch.broadcast_shapes(term.fn.batch_shape, value_batch)
            term.discrete = [
                name for name, site in self.latents.items()
                if site.family == "Categorical" and len(batch) >= -site.enum_dim and batch[site.enum_dim] > 1
            ]
            used: Dict[str, str] = {}
            with memoize(self._memo):
                expected_log_prob(term.name, term.fn, term.value, self.factors, mu, used,
                                  weight=self._weight(term), cache=self._cache)
            term.latent = set(used)
            term.uses = {s: f"{p} of {term.name!r} ({type(unwrap(term.fn)[0]).__name__})" for s, p in used.items()}
        self._terms_of = {
            name: [t for t in self.terms if name in t.latent or name in t.discrete or t.name == name]
            for name in self.factors
        }

    # ------------------------------------------------------------------ the objective
    def _moments(self) -> Dict[str, tuple]:
        return {name: f.mean_params for name, f in self.factors.items()}

    def _weight(self, term: Term) -> Tensor:
        """The static weight of a term: its ``poutine.scale`` times its ``poutine.mask``."""
        w = torch.as_tensor(term.scale, dtype=self.dtype, device=self.device)
        if term.mask is not None:
            w = w * term.mask.to(device=self.device, dtype=self.dtype)
        return w

    def _arranged_probs(self, name: str, probs: Tensor) -> Tensor:
        site = self.latents[name]
        k = probs.shape[-1]
        batch = probs.shape[:-1]
        r = probs.movedim(-1, 0)
        lead = -site.enum_dim - 1 - len(batch)
        return r.reshape((k,) + (1,) * lead + batch)

    def _contract(self, term: Term, mu) -> Tensor:
        """:math:`E_q[\\log p(\\text{site})]` summed, with discrete sites weighted by their responsibilities."""
        weight = self._weight(term)
        for d in term.discrete:
            weight = weight * self._arranged_probs(d, mu[d][0])
        return expected_log_prob(term.name, term.fn, term.value, self.factors, mu, weight=weight, cache=self._cache)

    def _expected_log_joint(self, terms, mu) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with memoize(self._memo):
            for t in terms:
                total = total + self._contract(t, mu)
        return total

    def _elbo(self) -> Tensor:
        """The exact ELBO (with subsampled plates: its unbiased minibatch estimate, local
        entropies scaled like their data)."""
        with torch.no_grad():
            mu = self._moments()
            if self.shard_plate is None:
                h = sum(f.entropy() * self._entropy_scale(name) for name, f in self.factors.items())
                return self._expected_log_joint(self.terms, mu) + h
            import torch.distributed as tdist

            mine = self._expected_log_joint([t for t in self.terms if self.shard_plate in t.plates], mu)
            mine = mine + sum((f.entropy() for n, f in self.factors.items() if self._is_sharded(n)), torch.zeros_like(mine))
            if tdist.is_available() and tdist.is_initialized():
                tdist.all_reduce(mine)
            shared = self._expected_log_joint([t for t in self.terms if self.shard_plate not in t.plates], mu)
            return mine + shared + sum((f.entropy() for n, f in self.factors.items() if not self._is_sharded(n)), torch.zeros_like(mine))

    def _entropy_scale(self, name: str):
        site = self.latents.get(name)
        if site is None or not site.local:
            return 1.0
        return next((t.scale for t in self.terms if t.name == name), 1.0)

    def _is_local(self, name: str) -> bool:
        f = self.factors[name]
        if f.auxiliary:
            return True
        site = self.latents.get(name)
        return site is not None and site.local

    def _stochastic_step(self) -> None:
        """One step of stochastic CAVI (Hoffman et al. 2013); see :mod:`.stochastic`."""
        stochastic_step(self)

    # ------------------------------------------------------------------ updates
    def _update(self, name: str) -> None:
        self.factors[name].update(self._natural_grads(name))

    def _natural_grads(self, name: str):
        """Gradient of the expected log joint with respect to the factor's mean parameters
        (summed over every process's shard in data-parallel CAVI)."""
        terms = self._terms_of[name]
        if self.shard_plate is None or self._is_sharded(name):
            return self._grads(name, terms)
        import torch.distributed as tdist

        sharded = [t for t in terms if self.shard_plate in t.plates]
        replicated = [t for t in terms if self.shard_plate not in t.plates]
        grads = self._grads(name, sharded)
        if tdist.is_available() and tdist.is_initialized():
            for g in grads:
                tdist.all_reduce(g)
        return tuple(a + b for a, b in zip(grads, self._grads(name, replicated)))

    def _grads(self, name: str, terms) -> tuple:
        mu = self._moments()
        own = tuple(t.detach().clone().requires_grad_(True) for t in mu[name])
        mu[name] = own
        with torch.enable_grad():
            total = self._expected_log_joint(terms, mu)
            grads = torch.autograd.grad(total, own, allow_unused=True) if total.requires_grad else (None,) * len(own)
        return tuple(torch.zeros_like(t) if g is None else g.detach().clone() for g, t in zip(grads, own))

    def _is_sharded(self, name: str) -> bool:
        """A factor that belongs to this process's shard (a local latent of the shard plate, or
        the augmentation of a sharded likelihood)."""
        if self.factors[name].auxiliary:
            return True
        members = [m for m, g in self._group_of.items() if g == name] or [name]
        return any(self.shard_plate in self.latents[m].plates for m in members if m in self.latents)

    def _sweep(self) -> None:
        # augmentation variables first, so every sweep starts from bounds tight at the current factors
        for name, f in self.factors.items():
            if f.auxiliary:
                self._update(name)
        for name, f in self.factors.items():
            if not f.auxiliary:
                self._update(name)

    def _initialise(self) -> None:
        """Draw Gaussian means at random, then seed every discrete site from data points.

        Seeding (``init="kmeans++"``, the default) gives each category one batch element of
        its own, chosen as k-means++ does: the first at random, each next one with
        probability proportional to how badly the current seeds explain it (the gap in
        expected log likelihood, which is half the squared distance for a unit Gaussian).
        ``init="forgy"`` picks all seeds at random. The continuous factors are then fitted to
        the seeds alone, and the discrete factors to them.
        """
        gen = self._generator
        # random means for Gaussian factors break the symmetry of bilinear terms (x1 @ B = 0 is a
        # saddle point of mean-field CAVI); conjugate models converge from anywhere
        for name, f in self.factors.items():
            # shard-local factors start at zero, so the fit does not depend on how data are sharded
            if isinstance(f, GaussianFactor) and not (self.shard_plate and self._is_sharded(name)):
                loc = torch.randn(f.loc.shape, generator=gen).to(dtype=self.dtype, device=self.device)
                f.set(loc, f.scale_tril)
        discrete = [n for n, s in self.latents.items() if s.family == "Categorical"]
        for name in discrete:
            self._seed(name, gen, plus_plus=False)
        if self.init == "kmeans++":
            for name in discrete:
                self._seed(name, gen, plus_plus=True)
        if discrete:
            self._update_continuous(seeding=True)
            for name in discrete:
                self._update(name)
        self._initialised = True

    def _update_continuous(self, seeding: bool = False) -> None:
        """Update every continuous factor. While seeding, the discrete sites give weight to the
        seeds only, so continuous latents local to their plates (which would see no prior) keep
        their initial values."""
        local_plates = set()
        if seeding:
            for site in self.latents.values():
                if site.family == "Categorical":
                    local_plates |= site.plates
        for name, f in self.factors.items():
            if f.auxiliary:
                self._update(name)
        for name, f in self.factors.items():
            if f.auxiliary or f.discrete:
                continue
            site = self.latents.get(name)
            if seeding and site is not None and site.plates & local_plates:
                continue
            self._update(name)

    def _seed(self, name: str, gen, plus_plus: bool) -> None:
        f = self.factors[name]
        k, n = f.probs.shape[-1], f.shape.numel()
        if n < k:
            probs = torch.distributions.Dirichlet(torch.ones(k)).sample((n,)).to(self.dtype).to(self.device)
            f.set(probs.reshape(f.shape + (k,)))
            return
        probs = torch.zeros(n, k, dtype=self.dtype, device=self.device)
        if not plus_plus:
            seeds = torch.randperm(n, generator=gen)[:k].to(self.device)
            probs[seeds, torch.arange(k, device=self.device)] = 1.0
            f.set(probs.reshape(f.shape + (k,)))
            return
        chosen = [int(torch.randint(n, (1,), generator=gen))]
        probs[chosen[0], 0] = 1.0
        for j in range(1, k):
            f.set(probs.reshape(f.shape + (k,)))
            self._update_continuous(seeding=True)
            scores = self._natural_grads(name)[0].reshape(n, k)[:, :j].max(-1).values
            gap = (scores.max() - scores).clamp_min(0)
            gap[chosen] = 0
            if not bool(gap.sum() > 0):
                gap = torch.ones(n, dtype=self.dtype, device=self.device)
                gap[chosen] = 0
            pick = int(torch.multinomial(gap.cpu().double(), 1, generator=gen))
            chosen.append(pick)
            probs[pick, j] = 1.0
        f.set(probs.reshape(f.shape + (k,)))

    def _reset(self) -> None:
        self._build_factors({})
        self._t = 0
        self._augment()
        self._initialised = False
        self.elbo_trace = []

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, *args, **kwargs) -> float:
        """One sweep over every factor; returns ``-ELBO`` (exact, closed form)."""
        self._prepare(args, kwargs)
        if not self._initialised:
            if self.seed is not None and self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            self._initialise()
        if self.stochastic:
            self._stochastic_step()
        else:
            self._sweep()
        elbo = float(self._elbo())
        if not math.isfinite(elbo):
            raise FloatingPointError(f"the ELBO became {elbo}; check the model's priors and data")
        self.elbo_trace.append(elbo)
        return -elbo

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """``-ELBO`` of the current factors, without updating them. With a subsampled plate it
        is an unbiased estimate on a fresh minibatch, whose local factors are first fitted to
        the current global factors."""
        self._prepare(args, kwargs)
        if self.stochastic:
            fit_locals(self)
        return -float(self._elbo())

    def run(self, *args, num_steps: int = 1000, tol: float = 1e-8, progress: bool = True, **kwargs) -> CAVIResult:
        """Sweep until ``|ΔELBO| <= tol · max(1, |ELBO|)`` or ``num_steps`` sweeps.

        ``tol`` is floored at 8 machine epsilons of the factors' dtype, the resolution at
        which the ELBO of a float32 fit stops changing.

        With ``num_restarts > 1`` the fit is repeated from fresh initialisations and the
        one with the highest ELBO is kept.
        """
        best, best_state, elbos = None, None, []
        for restart in range(self.num_restarts):
            if restart > 0 or self._key is None:
                self._prepare(args, kwargs)
                self._reset()
            result = self._run_once(args, kwargs, num_steps, tol, progress, restart)
            elbos.append(result.elbo)
            if best is None or result.elbo > best.elbo:
                best, best_state = result, self._state()
        if self.num_restarts > 1:
            self._load_state(best_state)
        best.restart_elbos = elbos
        return best

    def _run_once(self, args, kwargs, num_steps, tol, progress, restart) -> CAVIResult:
        prev = None
        self._prepare(args, kwargs)
        tol = max(tol, 8 * torch.finfo(self.dtype).eps)
        converged = False
        bar = tqdm(range(num_steps), disable=not progress, desc="CAVI" if restart == 0 else f"CAVI restart {restart}")
        for i in bar:
            elbo = -self.step(*args, **kwargs)
            bar.set_postfix(elbo=f"{elbo:.6g}", refresh=False)
            if prev is not None and abs(elbo - prev) <= tol * max(1.0, abs(elbo)):
                converged = True
                break
            prev = elbo
        bar.close()
        return CAVIResult(self.elbo_trace[-1], list(self.elbo_trace), len(self.elbo_trace), converged, restart)

    def _state(self):
        import copy

        return copy.deepcopy(self.factors), list(self.elbo_trace)

    def _load_state(self, state) -> None:
        self.factors, self.elbo_trace = state

    @property
    def posterior(self) -> Dict[str, torch.distributions.Distribution]:
        """Latent site name -> the fitted factor as a torch distribution with the site's shape."""
        return {name: self._marginal(name) for name in self.latents}

    def _marginal(self, name: str) -> torch.distributions.Distribution:
        group = self._group_of.get(name)
        if group is None:
            return self.factors[name].distribution()
        f, site = self.factors[group], self.latents[name]
        _, offset, k = next(m for m in self._group_layout(group) if m[0] == name)
        loc = f.loc[0, offset:offset + k]
        cov = f.covariance[0, offset:offset + k, offset:offset + k]
        if site.shape == torch.Size():
            return dist.Normal(loc[0], cov[0, 0].sqrt())
        tril = torch.linalg.cholesky(cov)
        if site.event_dim == 1 and len(site.shape) == 1:
            return dist.MultivariateNormal(loc, scale_tril=tril)
        return ReshapedMultivariateNormal(loc, tril, site.shape)

    def guide(self, *args, **kwargs) -> Dict[str, Tensor]:
        """A Pyro guide drawing every latent site from its fitted factor (for ``Predictive``)."""
        if not self.factors:
            raise RuntimeError("CAVI.guide: call step() or run() before using the guide")
        # each site keeps its batch (plate) dimensions, so the guide also runs inside a
        # vectorising plate of draws (``Predictive(..., parallel=True)``)
        out, joint_draws = {}, {}
        for name in self.latents:
            group = self._group_of.get(name)
            if group is None:
                out[name] = pyro.sample(name, self.factors[name].distribution())
                continue
            if group not in joint_draws:
                f = self.factors[group]
                q = dist.MultivariateNormal(f.loc[0], scale_tril=f.scale_tril[0])
                joint_draws[group] = pyro.sample(f"_joint_{group}", q, infer={"is_auxiliary": True})
            _, offset, k = next(m for m in self._group_layout(group) if m[0] == name)
            v = joint_draws[group][..., offset:offset + k]
            site_shape = self.latents[name].shape
            out[name] = pyro.sample(name, dist.Delta(v.reshape(v.shape[:-1] + site_shape), event_dim=len(site_shape)))
        return out

    def summary(self) -> str:
        lines = [f"CAVI over {len(self.factors)} factor(s)" + (f", ELBO {self.elbo_trace[-1]:.6f}" if self.elbo_trace else "")]
        for name in self.latents:
            if name in self._group_of:
                group = self._group_of[name]
                members = {m for m, g in self._group_of.items() if g == group}
                rules = sorted({t.uses[group] for t in self.terms if group in t.uses and t.name not in members})
                lines.append(f"  {name}: part of the joint Gaussian factor {group!r}; conjugate through {', '.join(rules)}")
                continue
            f, site = self.factors[name], self.latents[name]
            rules = [t.uses[name] for t in self.terms if name in t.uses and t.name != name]
            if site.family == "Categorical":
                rules = [f"{t.name!r} ({type(unwrap(t.fn)[0]).__name__})" for t in self.terms if name in t.discrete and t.name != name]
            prior = next((type(unwrap(t.fn)[0]).__name__ for t in self.terms if t.name == name), "?")
            extra = " joint over plate" if getattr(f, "dense", False) else ""
            lines.append(
                f"  {name}: {f.family}{extra} factor, shape {tuple(f.shape)}, prior {prior}; "
                f"conjugate through {', '.join(rules) if rules else 'its prior only'}"
            )
        for name, f in self.factors.items():
            if f.auxiliary:
                site = name.rsplit(".", 1)[0]
                lines.append(f"  {name}: {f.family} factor, shape {tuple(f.shape)}, augmenting the logistic likelihood of {site!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary() if self.factors else f"CAVI({getattr(self.model, '__name__', self.model)!r}, not fitted)"
