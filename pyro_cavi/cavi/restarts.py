r"""Independent CAVI restarts fitted together, in one vectorised sweep.

Mean-field CAVI converges to a local optimum that depends on the initialisation, so a
user fits several restarts and keeps the one with the highest ELBO (CAVI-CMN, Heins et
al. 2024, runs 32 models in parallel). Restarts :math:`r = 1..R` are independent: their
joint objective

.. math::
    \mathcal{L}(q^{(1)}, \dots, q^{(R)}) = \sum_{r=1}^R \mathrm{ELBO}(q^{(r)})

separates, so the gradient of :math:`\sum_r E_{q^{(r)}}[\log p]` with respect to the mean
parameters :math:`\mu_i^{(r)}` of restart :math:`r` is that restart's own natural-parameter
update :math:`\eta_i^{(r)*} = \partial E_{q^{(r)}}[\log p] / \partial \mu_i^{(r)}`, and
coordinate ascent on :math:`\mathcal{L}` is exactly :math:`R` independent CAVI runs.

Here every factor's tensors (natural or mean parameters) carry a leading restart dimension
of size :math:`R`. The updates of the common families are elementwise or batched linear
algebra, so they run on the stacked tensors unchanged (other families, e.g. joint
Normal-Gamma factors, are updated restart by restart); :math:`E_q[\log p]` and the entropies
are written for one restart and evaluated for all of them with :func:`torch.func.vmap`,
which gives each restart's ELBO as one entry of a vector (:mod:`.batching` keeps the costly
products efficient under vmap). The model is traced once, in its own shapes: it need not be
written to broadcast over an extra batch dimension.

Restarts converge at different sweeps; a converged restart is taken out of the batch (its
factors are kept as they were at convergence), so each restart stops exactly where a
separate fit from the same initialisation would stop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .factors import (BetaFactor, CategoricalFactor, DirichletFactor, GammaFactor, GaussianFactor,
                      InverseGammaFactor, PolyaGammaFactor)
from .categorical_gaussian import CategoricalGaussianFactor

Tensor = torch.Tensor

__all__ = ["RestartBatch", "stack_factors", "select_factors"]

# factor families whose ``update`` runs unchanged on tensors with a leading restart dimension
_STACKABLE_UPDATES = (GaussianFactor, GammaFactor, InverseGammaFactor, BetaFactor, DirichletFactor,
                      CategoricalFactor, PolyaGammaFactor, CategoricalGaussianFactor)


def _state_attrs(copies: Sequence[object]) -> List[str]:
    """Names of the tensor attributes (and tuples of tensors, e.g. ``mean_params``) of a
    factor that differ between restarts; attributes that are one shared object in every
    restart (a discrete site's support) stay unstacked."""
    first = copies[0]
    out = []
    for attr, value in vars(first).items():
        values = [vars(c).get(attr) for c in copies]
        if isinstance(value, Tensor):
            if not all(v is value for v in values):
                out.append(attr)
        elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            out.append(attr)
    return out


def _stack(values: Sequence[object]) -> object:
    if isinstance(values[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*values))
    return torch.stack(list(values))


def _index(value: object, index) -> object:
    if isinstance(value, tuple):
        return tuple(v[index] for v in value)
    return value[index]


def stack_factors(restarts: Sequence[Dict[str, object]]) -> Tuple[Dict[str, object], Dict[str, List[str]]]:
    """Stack the factors of ``R`` restarts (dicts ``name -> factor`` with the same structure)
    into one dict of factors whose state tensors have a leading dimension of size ``R``.

    Returns the stacked factors and, per factor, the names of the stacked attributes."""
    names = list(restarts[0])
    for r, factors in enumerate(restarts[1:], 1):
        if list(factors) != names:
            raise RuntimeError(f"restart {r} has factors {list(factors)}, restart 0 has {names}")
    stacked, attrs = {}, {}
    for name in names:
        copies = [factors[name] for factors in restarts]
        attrs[name] = _state_attrs(copies)
        f = copy.copy(copies[0])
        for attr in attrs[name]:
            setattr(f, attr, _stack([getattr(c, attr) for c in copies]))
        stacked[name] = f
    return stacked, attrs


def select_factors(stacked: Dict[str, object], attrs: Dict[str, List[str]], index) -> Dict[str, object]:
    """The factors of restart ``index`` (an int: a single restart's factors, with their
    tensors cloned) or of several restarts (a long tensor: still stacked)."""
    out = {}
    for name, f in stacked.items():
        g = copy.copy(f)
        for attr in attrs[name]:
            value = _index(getattr(f, attr), index)
            if isinstance(index, int):
                value = tuple(v.clone() for v in value) if isinstance(value, tuple) else value.clone()
            setattr(g, attr, value)
        out[name] = g
    return out


def _view(f: object, attrs: List[str], values: Sequence[object]) -> object:
    g = copy.copy(f)
    for attr, value in zip(attrs, values):
        setattr(g, attr, value)
    return g


@dataclass
class RestartBatch:
    """The restarts still being swept: which they are and the attributes stacked per factor."""

    ids: List[int]
    attrs: Dict[str, List[str]]

    @property
    def size(self) -> int:
        return len(self.ids)

    def expected_log_joint(self, single: Callable, terms, mu) -> Tensor:
        """:math:`E_{q^{(r)}}[\\log p]` for every restart in the batch, a vector of size R:
        ``single(terms, mu)`` (written for one restart) vectorised over the leading
        dimension of every mean parameter."""
        return torch.func.vmap(lambda m: single(terms, m))(mu)

    def update(self, name: str, f: object, grads: Tuple[Tensor, ...]) -> object:
        """The coordinate update of factor ``name`` in every restart: on the stacked tensors
        for the families whose updates are elementwise or batched linear algebra (checked in
        the tests), restart by restart for any other family."""
        if type(f) in _STACKABLE_UPDATES:
            f.update(grads)
            return f
        attrs = self.attrs[name]
        views = []
        for r in range(self.size):
            v = _view(f, attrs, [_index(getattr(f, a), r) for a in attrs])
            v.update(tuple(g[r] for g in grads))
            views.append(v)
        return _view(f, attrs, [_stack([getattr(v, a) for v in views]) for a in attrs])

    def entropies(self, factors: Dict[str, object]) -> Tensor:
        """Each restart's total entropy :math:`\\sum_i \\mathbb{H}[q_i^{(r)}]`, a vector of size R."""
        total = None
        for name, f in factors.items():
            attrs = self.attrs[name]
            values = tuple(getattr(f, a) for a in attrs)
            h = torch.func.vmap(lambda *v: _view(f, attrs, v).entropy())(*values)
            total = h if total is None else total + h
        return total


def run_batched(cavi, args, kwargs, num_steps: int, tol: float, progress: bool, fresh: bool):
    """:meth:`CAVI.run` for ``num_restarts > 1``, all restarts swept together.

    The initialisations are drawn one after another in the order a sequential run draws
    them (restart 0 continues from the engine's current fit if it has one, as in
    :meth:`CAVI.run`), then stacked. Each restart stops on its own convergence test
    :math:`|\\Delta \\mathrm{ELBO}_r| \\le \\mathrm{tol} \\cdot \\max(1, |\\mathrm{ELBO}_r|)`
    and leaves the batch; the one with the highest final ELBO becomes the engine's fit.
    """
    from tqdm.auto import tqdm

    from .cavi import CAVIResult

    R = cavi.num_restarts
    inits, traces = [], []
    for r in range(R):
        if r > 0 or fresh:
            cavi._reset()
        cavi._ensure_initialised()
        inits.append(cavi.factors)
        traces.append(list(cavi.elbo_trace))
    stacked, attrs = stack_factors(inits)
    del inits
    tol = max(tol, 8 * torch.finfo(cavi.dtype).eps)
    batch = RestartBatch(list(range(R)), attrs)
    prev: List[Optional[float]] = [None] * R
    converged = [False] * R
    finals: List[Optional[dict]] = [None] * R
    cavi.factors, cavi._batch = stacked, batch
    bar = tqdm(range(num_steps), disable=not progress, desc=f"CAVI x{R} restarts")
    try:
        for _ in bar:
            cavi._sweep()
            elbos = cavi._elbo().tolist()
            done = []
            for j, (r, elbo) in enumerate(zip(batch.ids, elbos)):
                if not math.isfinite(elbo):
                    raise FloatingPointError(f"the ELBO of restart {r} became {elbo}; check the model's priors and data")
                traces[r].append(elbo)
                if prev[r] is not None and abs(elbo - prev[r]) <= tol * max(1.0, abs(elbo)):
                    converged[r] = True
                    done.append(j)
                prev[r] = elbo
            bar.set_postfix(best=f"{max(t[-1] for t in traces if t):.6g}", running=batch.size - len(done), refresh=False)
            if not done:
                continue
            for j in done:
                finals[batch.ids[j]] = select_factors(cavi.factors, attrs, j)
            keep = [j for j in range(batch.size) if j not in done]
            if not keep:
                break
            cavi.factors = select_factors(cavi.factors, attrs, torch.tensor(keep, device=cavi.device))
            batch.ids = [batch.ids[j] for j in keep]
    finally:
        cavi._batch = None
        bar.close()
    for j, r in enumerate(batch.ids):
        if finals[r] is None:
            finals[r] = select_factors(cavi.factors, attrs, j)
    final_elbos = [t[-1] for t in traces]
    best = max(range(R), key=lambda r: final_elbos[r])
    cavi._restart_states = [(finals[r], list(traces[r])) for r in range(R)]
    cavi.factors, cavi.elbo_trace = copy.deepcopy(finals[best]), list(traces[best])
    return CAVIResult(final_elbos[best], list(traces[best]), len(traces[best]), converged[best], best,
                      restart_elbos=final_elbos, restart_traces=[list(t) for t in traces])
