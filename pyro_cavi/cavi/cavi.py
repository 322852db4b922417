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
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist

from .errors import NonConjugateError, _Densify
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
from . import categorical_gaussian, normal_gamma
from .rules import expected_log_prob, has_latent_logits, pg_name, unwrap
from .symbolic import Lin, Sym, identity_lin, identity_pos, memoize
from .restarts import RestartBatch, run_batched
from .overrelax import check_growth, overrelaxed_sweep
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
    restart_traces: List[List[float]] = field(default_factory=list)


class CAVI:
    """Closed-form coordinate-ascent VI for an ordinary Pyro model; a drop-in for ``SVI``.

    :param model: a Pyro model with observed sites given through ``obs=``.
    :param seed: seed of the initialisation (responsibility seeding of discrete sites);
        ``None`` uses Pyro's global RNG, so results follow ``pyro.set_rng_seed``.
    :param num_restarts: :meth:`run` fits from this many initialisations and keeps the
        one with the best ELBO.
    :param batch_restarts: fit the restarts together, every sweep vectorised over them
        (:mod:`.restarts`; the same fits as one after another, at a fraction of the cost).
        ``None`` (default) batches them whenever ``num_restarts > 1`` and the model has no
        subsampled plate and no ``shard_plate``; ``False`` runs them one after another;
        ``True`` insists (and runs even a single restart through the batched sweep).
    :param step_size: ``(tau, kappa)`` of the Robbins-Monro step size
        :math:`\\rho_t = (t + \\tau)^{-\\kappa}` used when the model subsamples a plate
        (stochastic CAVI, Hoffman et al. 2013).
    :param local_iters: passes over the local factors per minibatch in stochastic CAVI.
    :param shard_plate: data-parallel CAVI with ``torch.distributed``: every process calls the
        model on its own shard of this plate's data; the expected sufficient statistics
        (gradients with respect to global mean parameters) of the sharded sites are summed by
        an all-reduce, so every process applies the same global update. Sites outside the
        plate (priors of global latents) must be identical on every process.
    :param init: how the fit starts: ``"kmeans++"`` (default) or ``"forgy"`` seed the discrete
        sites from data points (see :meth:`_initialise`); or a callable
        ``init(cavi, generator) -> names`` that sets the starting factors itself. It is called
        once the model is traced (and again for every restart), with every factor at its default
        value and ``generator`` the engine's seeded ``torch.Generator`` (``None`` without
        ``seed``: Pyro's global RNG); it sets factors through ``cavi.factors[name].set(...)`` and
        returns the names of factors (keys of ``cavi.factors``) to update first, in that order,
        each after a refit of the augmentation (Pólya-Gamma) factors. Returning the local latents
        makes the fit start with an E-step from the parameters it set, as EM does.
    :param joint: groups of latent sites fitted with one joint factor (structured mean-field):
        Gaussian sites with one joint Gaussian factor, e.g. ``joint=[("intercept", "slope", "u")]``
        (exact for jointly Gaussian posteriors, far fewer sweeps when the sites are correlated a
        posteriori); or a Gaussian site and a Gamma site that scales its precision,
        ``joint=[("w", "tau")]``, with one Normal-Gamma factor per block
        (:mod:`.normal_gamma`); or a discrete site and a Gaussian site whose prior it indexes,
        ``joint=[("z", "x")]``, with one factor :math:`q(z)\,q(x \mid z)` (a Gaussian per
        category) per block (:mod:`.categorical_gaussian`).
    :param overrelax: ``None`` (default): ordinary sweeps. A growth factor :math:`\gamma > 1`
        (e.g. ``2.0``, the best of 1.1 / 1.5 / 2 on the CMN fits of ``benchmarks/cmn_overrelax.py``): adaptive over-relaxed sweeps (Salakhutdinov & Roweis, ICML 2003;
        :mod:`.overrelax`). From natural parameters :math:`\eta_t`, an ordinary sweep gives
        :math:`\eta^{\rm cavi}`; the sweep then tries
        :math:`\eta_t + \alpha(\eta^{\rm cavi} - \eta_t)` for every non-auxiliary factor (the
        Pólya-Gamma factors refitted to it) and keeps it, with :math:`\alpha \leftarrow \gamma\alpha`,
        if its ELBO is higher than the ordinary sweep's; otherwise it keeps the ordinary sweep and
        resets :math:`\alpha = 1`. The ELBO still never decreases and is never below the ordinary
        sweep's from the same factors; each sweep costs one more ELBO evaluation.
        ``overrelax_trace`` records the step of each sweep (positive: kept, negative: refused).
        Not combined with batched restarts, stochastic CAVI or ``shard_plate`` (``ValueError``).

    Example::

        cavi = CAVI(model)
        for step in range(10):
            loss = cavi.step(X, y)          # = -ELBO, never increases
        cavi.posterior["w"]                 # MultivariateNormal
        Predictive(model, guide=cavi.guide, num_samples=1000)(X)
    """

    def __init__(self, model, *, seed: Optional[int] = None, num_restarts: int = 1,
                 batch_restarts: Optional[bool] = None,
                 joint: Sequence[Sequence[str]] = (), init: Union[str, Callable] = "kmeans++",
                 step_size: tuple = (1.0, 0.7), local_iters: int = 3, shard_plate: Optional[str] = None,
                 overrelax: Optional[float] = None):
        check_growth(overrelax)
        if overrelax is not None and shard_plate is not None:
            raise ValueError("overrelax cannot be combined with shard_plate (data-parallel CAVI); use overrelax=None")
        if overrelax is not None and batch_restarts:
            raise ValueError("overrelax cannot be combined with batch_restarts=True (the step size and the "
                             "acceptance test are per fit); use batch_restarts=False")
        self.overrelax = None if overrelax is None else float(overrelax)
        self._alpha = 1.0
        self.overrelax_trace: List[float] = []
        if not callable(init) and init not in ("kmeans++", "forgy"):
            raise ValueError(f"init must be 'kmeans++', 'forgy' or a callable init(cavi, generator), got {init!r}")
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
        if isinstance(num_restarts, bool) or not isinstance(num_restarts, int) or num_restarts < 1:
            raise ValueError(f"num_restarts must be an integer >= 1, got {num_restarts!r}")
        if batch_restarts not in (None, True, False):
            raise ValueError(f"batch_restarts must be None, True or False, got {batch_restarts!r}")
        if batch_restarts and shard_plate is not None:
            raise ValueError("batch_restarts=True cannot be combined with shard_plate; use batch_restarts=False")
        self.batch_restarts = batch_restarts
        self._batch: Optional[RestartBatch] = None  # set while restarts are swept together
        self._restart_states: list = []
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
        self._normal_gamma: Dict[str, tuple] = {}  # group -> (w, tau) of joint Normal-Gamma factors
        self._structured: Dict[str, tuple] = {}  # group -> (z, x) of joint discrete-Gaussian factors
        self._views: Dict[str, ExpFamilyFactor] = {}  # layout of the members of joint factors
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
                self.terms = self._trace(args, kwargs)
                self._augment()
                self._analyse_terms()
                break
            except _Densify as e:
                grouped = [g for g, (z, x) in self._structured.items()
                           if e.site in (x, categorical_gaussian.conditional_key(z, x))]
                if grouped:
                    raise NonConjugateError(
                        f"a term of the model couples different blocks of {e.site.split('|')[0]!r} (e.g. sums it over "
                        f"a plate); the joint discrete-Gaussian factor {grouped[0]!r} needs every term to read one "
                        "block of it per element"
                    ) from None
                if e.site in self._dense:
                    raise
                self._dense.add(e.site)
                self.factors[e.site] = self._make_factor(self.latents[e.site], None)
        if self._structured and (self.stochastic or self.shard_plate is not None):
            raise NotImplementedError(
                f"joint discrete-Gaussian factors {sorted(self._structured)} are not supported with "
                + ("a subsampled plate (stochastic CAVI)" if self.stochastic else "shard_plate")
                + "; fit without subsampling, or leave the pair out of joint="
            )
        remember_structure(self, subsampled)
        self._key = key
        if not old:
            self._initialised = False

    def _trace(self, args, kwargs) -> List[Term]:
        """The model's terms, traced with the current stand-ins. With joint discrete-Gaussian
        factors the model is traced twice: with each Gaussian member enumerated along its discrete
        site, and as an ordinary site; a term is taken from the second trace unless it depends on
        the discrete site there (:mod:`.categorical_gaussian`)."""
        terms = symbolic_trace(self.model, args, kwargs, self._stand_ins())
        if not self._structured:
            return terms
        mixed = symbolic_trace(self.model, args, kwargs, self._stand_ins(mixture=True))
        if [t.name for t in mixed] != [t.name for t in terms]:
            raise NonConjugateError("the model's sample sites changed between two traces; CAVI needs a fixed structure")
        discrete = [self.latents[z] for z, _ in self._structured.values()]
        return [m if not any(categorical_gaussian.depends_on(m, z) for z in discrete) else t
                for t, m in zip(terms, mixed)]

    def _check_groups(self) -> None:
        for name, group in self._group_of.items():
            if name not in self.latents:
                raise ValueError(f"joint: {name!r} is not a latent site of the model (sites: {sorted(self.latents)})")
        self._normal_gamma, self._structured = {}, {}
        for g in self.joint:
            pair = categorical_gaussian.members(g, self.latents)
            if pair is not None:
                self._structured["+".join(g)] = pair
                continue
            pair = normal_gamma.members(g, self.latents)
            if pair is not None:
                self._normal_gamma["+".join(g)] = pair
                continue
            for name in g:
                site = self.latents[name]
                if site.family != "Gaussian":
                    raise ValueError(
                        f"joint: site {name!r} has a {site.family} factor; a joint group is Gaussian sites only, "
                        "one Gaussian site and one Gamma site (Normal-Gamma), or one discrete site and one "
                        "Gaussian site"
                    )

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
        self.factors, self._views = {}, {}
        for name, site in self.latents.items():
            group = self._group_of.get(name)
            if group is None:
                # local factors belong to the previous minibatch's data: start them afresh
                self.factors[name] = self._make_factor(site, None if site.local else old.get(name))
            elif group in self.factors:
                continue
            elif (kind := self._own_kind(group)) is not None:
                module, members = kind
                a, b = (self.latents[n] for n in members)
                prev = old.get(group)
                fresh = module.make_factor(group, a, b, self.dtype, self.device)
                self.factors[group] = prev if prev is not None and prev.shape == fresh.shape else fresh
                self._views.update(module.views(a, b, self.dtype, self.device))
            else:
                size = sum(k for _, _, k in self._group_layout(group))
                prev = old.get(group)
                self.factors[group] = prev if prev is not None and prev.shape == (size,) else GaussianFactor(
                    group, torch.Size([size]), 1, self.dtype, self.device
                )

    def _own_kind(self, group: str) -> Optional[tuple]:
        """``(module, member names)`` of a joint group whose factor is of a kind of its own, a
        discrete-Gaussian pair (:mod:`.categorical_gaussian`) or a Normal-Gamma pair
        (:mod:`.normal_gamma`), both modules with ``make_factor(group, a, b, dtype, device)`` and
        ``views(a, b, dtype, device)``; None for a joint Gaussian group."""
        for module, groups in ((categorical_gaussian, self._structured), (normal_gamma, self._normal_gamma)):
            if group in groups:
                return module, groups[group]
        return None

    def _make_factor(self, site: LatentSite, old: Optional[ExpFamilyFactor]) -> ExpFamilyFactor:
        if old is not None and old.shape == site.shape and getattr(old, "dense", False) == (site.name in self._dense):
            return old
        args = (site.name, site.shape, site.event_dim, self.dtype, self.device)
        if site.family == "Gaussian":
            return GaussianFactor(*args, dense=site.name in self._dense)
        if site.family == "Categorical":
            return CategoricalFactor(*args, support=site.support, bernoulli=site.support.is_floating_point())
        return _POSITIVE_FACTORS[site.family](*args)

    def _stand_ins(self, mixture: bool = False) -> Dict[str, Tensor]:
        """Symbolic stand-ins of the latent sites; ``mixture``: the Gaussian members of joint
        discrete-Gaussian factors as ordinary sites rather than enumerated along their discrete site."""
        values = {}
        for group, (w, tau) in self._normal_gamma.items():
            vw, vt = normal_gamma.stand_ins(self.factors[group], self.latents[w], self.latents[tau])
            sw, st = self.latents[w], self.latents[tau]
            values[w] = Sym(vw, identity_lin(w, sw.shape, sw.event_dim, False, self.dtype, self.device))
            values[tau] = Sym(vt, identity_pos(tau, st.shape, False, self.dtype, self.device))
        for group, (z, x) in self._structured.items():
            sz, sx = self.latents[z], self.latents[x]
            k = sz.support.shape[0]
            values[z] = sz.support.reshape((k,) + (1,) * (-sz.enum_dim - 1))
            if mixture:
                values[x] = categorical_gaussian.mixture_stand_in(self.factors[group], sx, self.dtype, self.device)
            else:
                values[x] = categorical_gaussian.stand_in(self.factors[group], sz, sx, self.dtype, self.device)
        for name, site in self.latents.items():
            group = self._group_of.get(name)
            if group in self._normal_gamma or group in self._structured:
                continue
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
                expected_log_prob(term.name, term.fn, term.value, self._expect_factors(), mu, used,
                                  weight=self._weight(term), cache=self._cache)
            term.latent = set(used)
            for group, (w, tau) in self._normal_gamma.items():
                if w in used:
                    normal_gamma.check_term(term, group, w, tau)
                for member in (w, tau):
                    if member in used or term.name == member:
                        term.latent.add(group)
            for group, (z, x) in self._structured.items():
                if x in used or categorical_gaussian.conditional_key(z, x) in used or z in term.discrete or term.name in (z, x):
                    term.latent.add(group)
            term.uses = {s: f"{p} of {term.name!r} ({type(unwrap(term.fn)[0]).__name__})" for s, p in used.items()}
        for group, (z, x) in self._structured.items():
            categorical_gaussian.check_prior(self.terms, group, self.latents[z], self.latents[x])
        self._terms_of = {
            name: [t for t in self.terms if name in t.latent or name in t.discrete or t.name == name]
            for name in self.factors
        }

    # ------------------------------------------------------------------ the objective
    def _moments(self) -> Dict[str, tuple]:
        mu = {name: f.mean_params for name, f in self.factors.items()}
        self._add_member_moments(mu)
        return mu

    def _add_member_moments(self, mu: Dict[str, tuple], batched: bool = False) -> None:
        """The members of joint Normal-Gamma factors, read off the joint mean parameters
        (with restarts swept together: per restart, inside the vectorised evaluation)."""
        if self._batch is not None and not batched:
            return
        for group, (w, tau) in self._normal_gamma.items():
            normal_gamma.add_member_moments(mu, group, self.latents[w], self.latents[tau])
        for group, (z, x) in self._structured.items():
            categorical_gaussian.add_member_moments(mu, group, self.latents[z], self.latents[x])

    def _expect_factors(self) -> Dict[str, ExpFamilyFactor]:
        return {**self.factors, **self._views} if self._views else self.factors

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
        return expected_log_prob(term.name, term.fn, term.value, self._expect_factors(), mu, weight=weight, cache=self._cache)

    def _expected_log_joint(self, terms, mu) -> Tensor:
        if self._batch is not None:  # summed over restarts: its gradient is each restart's own
            return self._batch.expected_log_joint(self._restart_expected_log_joint, terms, mu).sum()
        return self._expected_log_joint_one(terms, mu)

    def _restart_expected_log_joint(self, terms, mu) -> Tensor:
        """One restart's expected log joint (evaluated under vmap, :mod:`.restarts`)."""
        mu = dict(mu)
        self._add_member_moments(mu, batched=True)
        return self._expected_log_joint_one(terms, mu)

    def _expected_log_joint_one(self, terms, mu) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        # the expectations' einsums are written in a good contraction order; opt_einsum's path
        # search would cost more than the contractions themselves (with restarts swept together
        # the search is paid once for all of them, and the restart dimension changes the best order)
        with memoize(self._memo), torch.backends.opt_einsum.flags(enabled=self._batch is not None):
            for t in terms:
                total = total + self._contract(t, mu)
        return total

    def _elbo(self) -> Tensor:
        """The exact ELBO (with subsampled plates: its unbiased minibatch estimate, local
        entropies scaled like their data)."""
        with torch.no_grad():
            mu = self._moments()
            if self._batch is not None:  # one ELBO per restart
                return (self._batch.expected_log_joint(self._restart_expected_log_joint, self.terms, mu)
                        + self._batch.entropies(self.factors))
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
        if self._batch is not None:  # restarts swept together
            self.factors[name] = self._batch.update(name, self.factors[name], self._natural_grads(name))
            return
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
        if name in self._structured:
            # the expected log joint is sum_k r_k f_k(E[x|k], E[xx'|k]) with f_k affine: at r = 1 and
            # zero conditional moments its gradient is the natural parameters (a_k, b_k, C_k)
            # (.categorical_gaussian)
            r, m, M = mu[name]
            own = (torch.ones_like(r).requires_grad_(True), torch.zeros_like(m).requires_grad_(True),
                   torch.zeros_like(M).requires_grad_(True))
        else:
            own = tuple(t.detach().clone().requires_grad_(True) for t in mu[name])
        mu[name] = own
        with torch.enable_grad():
            if name in self._normal_gamma or name in self._structured:
                self._add_member_moments(mu)  # differentiable functions of the joint mean parameters
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
        its own, chosen as greedy k-means++ does (Arthur & Vassilvitskii 2007; scikit-learn's
        default): the first at random; for each next one, :math:`2 + \lfloor\log K\rfloor`
        candidates drawn with probability proportional to how badly the current seeds explain
        them (the gap in expected log likelihood, half the squared distance for a unit
        Gaussian), keeping the candidate under which the batch's best expected log
        likelihoods sum highest. ``init="forgy"`` picks all seeds at random. The continuous factors are then fitted to
        the seeds alone, and the discrete factors to them.
        """
        gen = self._generator
        if callable(self.init):
            self._initialise_with(self.init, gen)
            return
        # random means for Gaussian factors break the symmetry of bilinear terms (x1 @ B = 0 is a
        # saddle point of mean-field CAVI); conjugate models converge from anywhere
        for name, f in self.factors.items():
            # shard-local factors start at zero, so the fit does not depend on how data are sharded
            if isinstance(f, GaussianFactor) and not (self.shard_plate and self._is_sharded(name)):
                loc = torch.randn(f.loc.shape, generator=gen).to(dtype=self.dtype, device=self.device)
                f.set(loc, f.scale_tril)
            elif name in self._normal_gamma:
                loc = torch.randn(f.loc.shape, generator=gen).to(dtype=self.dtype, device=self.device)
                f.set(loc, f.scale_tril, f.concentration, f.rate)
            elif name in self._structured:  # the draw a mean-field factor of the Gaussian site would take
                loc = torch.randn(f.loc.shape[:-2] + f.loc.shape[-1:], generator=gen).to(dtype=self.dtype, device=self.device)
                f.set(f.probs, loc.unsqueeze(-2).expand_as(f.loc).clone(), f.scale_tril)
        discrete = [n for n, s in self.latents.items() if s.family == "Categorical"]
        for name in discrete:
            self._seed(name, gen, plus_plus=False)
        if self.init == "kmeans++":
            for name in discrete:
                self._seed(name, gen, plus_plus=True)
        if discrete:
            self._update_continuous(seeding=True)
            for name in discrete:
                self._update(self._group_of.get(name, name))
        self._initialised = True

    def _initialise_with(self, init: Callable, gen) -> None:
        """A user's initialiser (``CAVI(init=callable)``): it sets the factors, then the factors it
        names are updated in its order, each after the augmentation factors."""
        first = init(self, gen)
        first = [] if first is None else [first] if isinstance(first, str) else list(first)
        unknown = [n for n in first if n not in self.factors]
        if unknown:
            raise ValueError(f"init returned {unknown[0]!r}, which is not a factor of the model "
                             f"(factors: {sorted(n for n in self.factors if not self.factors[n].auxiliary)})")
        for name in first:
            for aux, f in self.factors.items():
                if f.auxiliary:
                    self._update(aux)
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

    def _discrete_factor(self, name: str):
        """The factor holding a discrete site's responsibilities (``probs``, ``set(probs)``)."""
        group = self._group_of.get(name)
        if group in self._structured:
            return categorical_gaussian.ProbsView(self.factors[group], self.latents[name])
        return self.factors[name]

    def _seed_scores(self, name: str) -> Tensor:
        """Each batch element's unnormalised log responsibility per category (k-means++ seeding)."""
        group = self._group_of.get(name)
        if group in self._structured:  # with the Gaussian member integrated out
            return self.factors[group].log_weights(self._natural_grads(group))
        return self._natural_grads(name)[0]

    def _seed(self, name: str, gen, plus_plus: bool) -> None:
        f = self._discrete_factor(name)
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
        num_trials = 2 + int(math.log(k))
        best_score = None  # each batch element's best expected log likelihood under the seeds so far
        for j in range(1, k):
            if best_score is None:
                f.set(probs.reshape(f.shape + (k,)))
                self._update_continuous(seeding=True)
                best_score = self._seed_scores(name).reshape(n, k)[:, :j].max(-1).values
            gap = (best_score.max() - best_score).clamp_min(0)
            gap[chosen] = 0
            if not bool(gap.sum() > 0):
                gap = torch.ones(n, dtype=self.dtype, device=self.device)
                gap[chosen] = 0
            candidates = torch.multinomial(gap.cpu().double(), num_trials, replacement=True, generator=gen).unique().tolist()
            pick, best_total = None, None
            # greedy k-means++: try each candidate in a free category (several at once while
            # categories j, j+1, ... are still unseeded) and keep the one that raises the
            # total of the batch's best scores most (lowers the k-means potential most)
            free = k - j
            for start in range(0, len(candidates), free):
                trial = probs.clone()
                batch = candidates[start:start + free]
                for i, c in enumerate(batch):
                    trial[c, j + i] = 1.0
                f.set(trial.reshape(f.shape + (k,)))
                self._update_continuous(seeding=True)
                scores = self._seed_scores(name).reshape(n, k)
                current = scores[:, :j].max(-1).values
                for i, c in enumerate(batch):
                    with_c = torch.maximum(current, scores[:, j + i])
                    total = float(with_c.sum())
                    if best_total is None or total > best_total:
                        pick, best_total, best_score = c, total, with_c
            chosen.append(pick)
            probs[pick, j] = 1.0
        f.set(probs.reshape(f.shape + (k,)))

    def _reset(self) -> None:
        self._build_factors({})
        self._t = 0
        self._augment()
        self._initialised = False
        self.elbo_trace = []
        self._alpha, self.overrelax_trace = 1.0, []

    def _ensure_initialised(self) -> None:
        if not self._initialised:
            if self.seed is not None and self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            self._initialise()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, *args, **kwargs) -> float:
        """One sweep over every factor; returns ``-ELBO`` (exact, closed form)."""
        self._prepare(args, kwargs)
        self._ensure_initialised()
        if self.stochastic:
            if self.overrelax is not None:
                raise ValueError("overrelax cannot be combined with a subsampled plate (stochastic CAVI); "
                                 "use overrelax=None")
            self._stochastic_step()
            elbo = float(self._elbo())
        elif self.overrelax is not None:
            elbo = float(overrelaxed_sweep(self))
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
        one with the highest ELBO is kept (:meth:`select_restart` switches to another);
        the restarts are swept together, vectorised, unless ``batch_restarts=False``
        (see :mod:`.restarts`). Restart ``r`` starts from the same initialisation either way.
        """
        if self.overrelax is not None and self.num_restarts > 1 and self.batch_restarts is None:
            raise ValueError("overrelax cannot be combined with batched restarts (the step size and the acceptance "
                             "test are per fit); pass batch_restarts=False to run the restarts one after another")
        if self.batch_restarts or (self.num_restarts > 1 and self.batch_restarts is None):
            fresh = self._key is None
            self._prepare(args, kwargs)
            if not self.stochastic and self.shard_plate is None:
                return run_batched(self, args, kwargs, num_steps, tol, progress, fresh)
            if self.batch_restarts:
                raise ValueError("batch_restarts=True: a model with a subsampled plate (stochastic CAVI) "
                                 "cannot batch its restarts; use batch_restarts=False")
            # (a model prepared just now has fresh factors: restart 0 below needs no reset)
        best, best_state, elbos, traces, states = None, None, [], [], []
        for restart in range(self.num_restarts):
            if restart > 0 or self._key is None:
                self._prepare(args, kwargs)
                self._reset()
            result = self._run_once(args, kwargs, num_steps, tol, progress, restart)
            elbos.append(result.elbo)
            traces.append(result.elbo_trace)
            if self.num_restarts > 1:
                states.append(self._state())
            if best is None or result.elbo > best.elbo:
                best, best_state = result, states[-1] if states else None
        if self.num_restarts > 1:
            self._load_state(best_state)
            self._restart_states = states
        best.restart_elbos = elbos
        best.restart_traces = traces
        return best

    def select_restart(self, restart: int) -> None:
        """Make restart ``restart`` of the last :meth:`run` the current fit (``run`` keeps the
        one with the highest ELBO): ``posterior``, ``guide``, ``summary`` and further
        ``step`` calls then follow it."""
        if not self._restart_states:
            if restart == 0 and self.factors:
                return
            raise RuntimeError("select_restart: call run() with num_restarts > 1 first")
        if isinstance(restart, bool) or not isinstance(restart, int) or not 0 <= restart < len(self._restart_states):
            raise ValueError(f"select_restart: restart must be an integer in [0, {len(self._restart_states)}), got {restart!r}")
        import copy

        factors, trace = self._restart_states[restart]
        self._load_state((copy.deepcopy(factors), list(trace)))

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

    def restart_fits(self) -> List["CAVI"]:
        """Every restart of the last :meth:`run` as an engine of its own (sharing this one's
        model structure), e.g. ``to_inference_data(cavi.restart_fits(), model, *args)`` for
        the restarts as chains."""
        import copy

        if not self._restart_states:
            raise RuntimeError("restart_fits: call run() with num_restarts > 1 first")
        fits = []
        for factors, trace in self._restart_states:
            fit = copy.copy(self)
            fit.factors, fit.elbo_trace, fit._restart_states = copy.deepcopy(factors), list(trace), []
            fits.append(fit)
        return fits

    @property
    def posterior(self) -> Dict[str, torch.distributions.Distribution]:
        """Latent site name -> the fitted factor as a torch distribution with the site's shape."""
        return {name: self._marginal(name) for name in self.latents}

    def _marginal(self, name: str) -> torch.distributions.Distribution:
        group = self._group_of.get(name)
        if group is None:
            return self.factors[name].distribution()
        if group in self._normal_gamma:
            w, tau = (self.latents[n] for n in self._normal_gamma[group])
            return normal_gamma.marginal(self.factors[group], self.latents[name], w, tau)
        if group in self._structured:
            z, x = (self.latents[n] for n in self._structured[group])
            return categorical_gaussian.marginal(self.factors[group], self.latents[name], z, x)
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

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, sites: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``num_samples`` draws of each latent site (shape ``(num_samples,) + site shape``) from the
        fitted posterior, jointly within structured factors (a joint Gaussian group, a
        Normal-Gamma pair, a discrete-Gaussian pair), in the order of ``sites`` (default: every latent site)."""
        if not self.factors:
            raise RuntimeError("CAVI.sample_posterior: call step() or run() before drawing from the posterior")
        names = list(self.latents) if sites is None else list(sites)
        unknown = [n for n in names if n not in self.latents]
        if unknown:
            raise ValueError(f"sample_posterior: {unknown[0]!r} is not a latent site (sites: {sorted(self.latents)})")
        return self._draw(names, lambda site, d, given: d.sample() if given else d.sample((num_samples,)),
                          lambda site, value: value)

    def guide(self, *args, **kwargs) -> Dict[str, Tensor]:
        """A Pyro guide drawing every latent site from its fitted factor (for ``Predictive``)."""
        if not self.factors:
            raise RuntimeError("CAVI.guide: call step() or run() before using the guide")
        # each site keeps its batch (plate) dimensions, so the guide also runs inside a
        # vectorising plate of draws (``Predictive(..., parallel=True)``); a structured factor is
        # drawn once as auxiliary sites, its members are Delta sites at their part of the draw
        def sample(site, d, given):
            return pyro.sample(site, d, infer={} if site in self.latents else {"is_auxiliary": True})

        def member(site, value):
            return pyro.sample(site, dist.Delta(value, event_dim=len(self.latents[site].shape)))

        return self._draw(list(self.latents), sample, member)

    def _draw(self, names: Sequence[str], sample, member) -> Dict[str, Tensor]:
        """One draw of each site in ``names``, jointly within structured factors (a joint
        Gaussian group, a Normal-Gamma pair, a discrete-Gaussian pair), each factor drawn once: ``sample(site,
        distribution, given)`` draws (``given``: conditional on an earlier draw of the same
        factor), ``member(site, value)`` turns a structured draw's part into the site's value."""
        out, joint = {}, {}
        for name in names:
            group = self._group_of.get(name)
            if group is None:
                out[name] = sample(name, self.factors[name].distribution(), False)
                continue
            if group not in joint:
                f = self.factors[group]
                if group in self._normal_gamma:
                    w, tau = (self.latents[n] for n in self._normal_gamma[group])
                    joint[group] = normal_gamma.draw(f, w, tau, lambda part, d, given: sample(f"_joint_{group}.{part}", d, given))
                elif group in self._structured:
                    z, x = (self.latents[n] for n in self._structured[group])
                    joint[group] = categorical_gaussian.draw(f, z, x, lambda part, d, given: sample(f"_joint_{group}.{part}", d, given))
                else:
                    v = sample(f"_joint_{group}", dist.MultivariateNormal(f.loc[0], scale_tril=f.scale_tril[0]), False)
                    joint[group] = {m: v[..., o:o + k].reshape(v.shape[:-1] + self.latents[m].shape)
                                    for m, o, k in self._group_layout(group)}
            out[name] = member(name, joint[group][name])
        return out

    def summary(self) -> str:
        lines = [f"CAVI over {len(self.factors)} factor(s)" + (f", ELBO {self.elbo_trace[-1]:.6f}" if self.elbo_trace else "")]
        for name in self.latents:
            if self._group_of.get(name) in self._normal_gamma:
                group = self._group_of[name]
                rules = sorted({t.uses[name] for t in self.terms if name in t.uses and t.name != name})
                lines.append(f"  {name}: part of the joint Normal-Gamma factor {group!r}; conjugate through {', '.join(rules) or 'its prior only'}")
                continue
            if self._group_of.get(name) in self._structured:
                group = self._group_of[name]
                rules = sorted({f"{t.name!r} ({type(unwrap(t.fn)[0]).__name__})" for t in self.terms if group in t.latent and t.name != name})
                lines.append(f"  {name}: part of the joint discrete-Gaussian factor {group!r} (a Gaussian per category); "
                             f"conjugate through {', '.join(rules)}")
                continue
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
