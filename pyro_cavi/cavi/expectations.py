r"""Expectations of traced expressions under the mean-field factors.

Each function takes an expression (a plain tensor, or the :class:`~.symbolic.Expr`
of a :class:`~.symbolic.Sym`), the factors and their current mean parameters
``mu`` and returns a tensor of the expression's shape. They are written in terms of
the mean parameters only, so :math:`E_q[\log p]` is a differentiable, multilinear
function of every factor's :math:`\mu` and autograd yields the natural parameters.

For an affine expression :math:`d = c + \sum_s A_s x_s`:

.. math::
    E[d] = c + \sum_s A_s m_s, \qquad
    E[d^2] = E[d]^2 + \sum_s A_s (M_s - m_s m_sᵀ) A_sᵀ

(distinct sites are independent under the mean-field posterior). For a monomial
:math:`c \prod_j x_j^{p_j}` of positive latents, :math:`E[\log \cdot] = \log c +
\sum_j p_j E[\log x_j]` and :math:`E[\cdot] = c \prod_j E[x_j^{p_j}]`, where every
:math:`x^{p}` must be a sufficient statistic of its factor (``x`` for a Gamma,
``1/x`` for an InverseGamma).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import torch
from torch.overrides import has_torch_function

from .factors import ExpFamilyFactor, _NotASufficientStatistic
from . import symbolic
from .batching import const_matmul, is_batched as _is_batched
from .symbolic import Bil, Expr, Lin, Poison, Pos, broadcast_shapes, compact, describe

Tensor = torch.Tensor
Moments = Dict[str, Tuple[Tensor, ...]]


class NotConjugate(Exception):
    """Raised by an expectation that the factors cannot give in closed form."""


@functools.lru_cache(maxsize=4096)
def _contraction_path(equation: str, shapes: tuple) -> Optional[list]:
    oe = torch.backends.opt_einsum.get_opt_einsum()
    if oe is None:
        return None
    path = oe.contract_path(equation, *shapes, shapes=True, optimize=torch.backends.opt_einsum.strategy)[0]
    return [i for pair in path for i in pair]


def _einsum(equation: str, *operands: Tensor) -> Tensor:
    """``torch.einsum`` with the contraction path of three or more operands cached per equation
    and operand shapes. ``torch.einsum`` asks opt_einsum for the path on every call, which costs
    more than the contraction itself for the small operands of a sweep (about a tenth of a
    CMN sweep); the shapes repeat from sweep to sweep, so the path is found once. Same path,
    same result."""
    if len(operands) <= 2 or not torch.backends.opt_einsum.enabled or has_torch_function(operands):
        return torch.einsum(equation, *operands)
    path = _contraction_path(equation, tuple(tuple(o.shape) for o in operands))
    if path is None:
        return torch.einsum(equation, *operands)
    return torch._VF.einsum(equation, operands, path=path)  # what torch.einsum calls with its path


def expr_of(x):
    return getattr(x, "_expr", x)


def _poison(e: Poison):
    raise NotConjugate(e.reason)


def _lin_terms(e: Lin, factors, mu):
    for s, (coef, idx) in e.terms.items():
        f = factors[s]
        m, M = mu[s]
        yield s, coef, idx, f, m, M


def _block_mean(site, idx, mu):
    m = mu[site][0]
    return m[0].expand(idx.shape + m.shape[-1:]) if m.shape[0] == 1 else m[idx]


def _block_second(site, idx_a, idx_b, mu):
    """E[x_a x_bᵀ] for elements in blocks idx_a and idx_b of one Gaussian site."""
    m, M = mu[site]
    if m.shape[0] == 1:
        return M[0].expand(broadcast_shapes(idx_a.shape, idx_b.shape) + M.shape[-2:])
    if idx_a is idx_b or (idx_a.shape == idx_b.shape and torch.equal(idx_a, idx_b)):  # same elements
        return M[idx_a]
    same = (idx_a == idx_b).unsqueeze(-1).unsqueeze(-1)
    return torch.where(same, M[idx_a], m[idx_a].unsqueeze(-1) * m[idx_b].unsqueeze(-2))


def _pair_mean(site_a, site_b, coef, ia, ib, mu):
    return _einsum("...ef,...e,...f->...", coef, _block_mean(site_a, ia, mu), _block_mean(site_b, ib, mu))


def _bil_mean(e: Bil, factors, mu) -> Tensor:
    out = mean(e.lin, factors, mu)
    for (sa, sb), (coef, ia, ib) in e.pairs.items():
        out = out + _pair_mean(sa, sb, coef, ia, ib, mu)
    return out


def _bil_second_moment(e: Bil, factors, mu) -> Tensor:
    r"""E[B²] for B = lin + sum_p x_aᵀ C_p x_b, with sites independent under q: each site's
    occurrences are contracted with its first moment (once) or second moment (twice)."""
    lin = e.lin
    out = second_moment(lin, factors, mu)
    pairs = list(e.pairs.items())
    # cross terms 2 E[lin * pair]
    for (sa, sb), (coef, ia, ib) in pairs:
        cross = lin.const.expand(e.shape) * _pair_mean(sa, sb, coef, ia, ib, mu)
        for s, (a, idx) in lin.terms.items():
            a = a.expand(e.shape + a.shape[-1:])
            if s == sa:
                cross = cross + _einsum("...g,...ge,...ef,...f->...", a, _block_second(s, idx.expand(e.shape), ia, mu), coef, _block_mean(sb, ib, mu))
            elif s == sb:
                cross = cross + _einsum("...g,...gf,...ef,...e->...", a, _block_second(s, idx.expand(e.shape), ib, mu), coef, _block_mean(sa, ia, mu))
            else:
                cross = cross + (a * _block_mean(s, idx.expand(e.shape), mu)).sum(-1) * _pair_mean(sa, sb, coef, ia, ib, mu)
        out = out + 2 * cross
    # pair x pair terms
    for (key1, (c1, i1a, i1b)) in pairs:
        for (key2, (c2, i2a, i2b)) in pairs:
            slots = [(key1[0], i1a, "e"), (key1[1], i1b, "f"), (key2[0], i2a, "g"), (key2[1], i2b, "h")]
            operands, subs = [c1, c2], ["...ef", "...gh"]
            done = set()
            for i, (site, idx, letter) in enumerate(slots):
                if i in done:
                    continue
                partner = next((j for j in range(i + 1, 4) if slots[j][0] == site), None)
                if partner is None:
                    operands.append(_block_mean(site, idx, mu))
                    subs.append("..." + letter)
                else:
                    done.add(partner)
                    operands.append(_block_second(site, idx, slots[partner][1], mu))
                    subs.append("..." + letter + slots[partner][2])
            out = out + _einsum(",".join(subs) + "->...", *operands)
    return out


def mean(x, factors: Dict[str, ExpFamilyFactor], mu: Moments) -> Tensor:
    """:math:`E_q[x]` for a constant, an affine or a bilinear expression of Gaussian latents."""
    e = expr_of(x)
    if not isinstance(e, Expr):
        return e
    if isinstance(e, Poison):
        _poison(e)
    if isinstance(e, Bil):
        return _bil_mean(e, factors, mu)
    if isinstance(e, Pos):
        raise NotConjugate(f"the positive latent {describe(e)} (only Gaussian latents may enter affinely here)")
    out = e.const.expand(e.shape)
    for s, coef, idx, f, m, M in _lin_terms(e, factors, mu):
        if f.num_blocks == 1:
            out = out + (const_matmul(coef, m[0].unsqueeze(-1)).squeeze(-1) if _is_batched(m) else coef @ m[0])
            continue
        blocks = _aligned_blocks(idx, m.shape[0])
        if blocks is not None:  # block b(n) read off the position n: one contraction, nothing gathered
            m_b = m.reshape(blocks + m.shape[-1:])
            out = out + broadcast_sum((coef, m_b), e.shape + m.shape[-1:], e.shape + (1,)).reshape(e.shape)
            continue
        layout = _mean_layout(coef, idx, e.shape, m.shape[0])
        if layout is None:
            out = out + (coef * m[idx]).sum(-1)
        elif _is_batched(m):  # restarts swept together (.restarts): fold them into one product
            rows, unsort = layout
            out = out + const_matmul(rows, m.unsqueeze(-1)).reshape(-1).index_select(0, unsort).reshape(e.shape)
        else:  # rows grouped by block: one batched product instead of a gather of block means
            rows, unsort = layout
            out = out + (rows @ m.unsqueeze(-1)).reshape(-1)[unsort].reshape(e.shape)
    return out


def _memoized(key: tuple, anchors: tuple, compute):
    """``compute()``, cached in the engine's evaluation memo (``symbolic._MEMO``, when one is
    active) under ``key``; a hit counts only while ``anchors`` are the very same objects (the
    key holds their ids, which may be reused once they are freed)."""
    store = symbolic._MEMO
    if store is not None:
        hit = store.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], anchors)):
            return hit[1]
    value = compute()
    if store is not None:
        store[key] = (anchors, value)
    return value


def _aligned_blocks(idx: Tensor, num_blocks: int) -> Optional[torch.Size]:
    """When the block index is the position itself (``idx`` = ``arange(num_blocks)`` laid out
    over the dimensions it varies along, as for ``A[z]`` with z enumerated), the shape to view
    the block means as so they broadcast against the expression; else None (cached)."""

    def compute():
        c = compact(idx)
        aligned = c.numel() == num_blocks and torch.equal(c.reshape(-1), torch.arange(num_blocks, device=c.device))
        return c.shape if aligned else None

    return _memoized(("aligned-blocks", id(idx), num_blocks), (idx,), compute)


def _mean_layout(coef: Tensor, idx: Tensor, shape: torch.Size, num_blocks: int):
    """Coefficient rows sorted by block, as ``(num_blocks, rows_per_block, n_e)``, and the
    permutation back; cached for the engine's evaluations (None when blocks differ in size)."""

    def compute():
        flat_idx = idx.expand(shape).reshape(-1)
        counts = torch.bincount(flat_idx, minlength=num_blocks)
        if not (bool((counts == counts[0]).all()) and counts[0] > 0):
            return None
        perm = torch.argsort(flat_idx, stable=True)
        ne = coef.shape[-1]
        rows = coef.expand(shape + (ne,)).reshape(-1, ne)[perm].reshape(num_blocks, -1, ne)
        return rows, torch.argsort(perm)

    return _memoized(("mean-layout", id(coef), id(idx), tuple(shape)), (coef, idx), compute)


def variance(x, factors, mu) -> Tensor:
    """:math:`\\mathrm{Var}_q[x]` elementwise, for an affine expression."""
    e = expr_of(x)
    if not isinstance(e, Expr):
        return torch.zeros_like(e)
    if not isinstance(e, Lin):
        mean(x, factors, mu)  # raises
    out = torch.zeros((), dtype=e.const.dtype, device=e.const.device)
    for s, coef, idx, f, m, M in _lin_terms(e, factors, mu):
        cov = M - m.unsqueeze(-1) * m.unsqueeze(-2)
        if f.block_size == 1:
            c = coef[..., 0]
            out = out + c * c * (cov[0, 0, 0] if f.num_blocks == 1 else cov[idx, 0, 0])
        elif f.num_blocks == 1:
            out = out + ((coef @ cov[0]) * coef).sum(-1)
        else:
            out = out + _einsum("...i,...ij,...j->...", coef, cov[idx], coef)
    return out


def second_moment(x, factors, mu) -> Tensor:
    """:math:`E_q[x^2]` elementwise."""
    if isinstance(expr_of(x), Bil):
        return _bil_second_moment(expr_of(x), factors, mu)
    m = mean(x, factors, mu)
    return m * m + variance(x, factors, mu)


def weighted_second_moment(x, weight, factors, mu, cache: Optional[dict] = None) -> Tensor:
    """:math:`\\sum_n w_n E_q[x_n^2]`, summed over the broadcast shape of ``w`` and ``x``;
    ``weight`` is a tensor or a tuple of tensors whose product is the weight (kept apart so
    broadcast factors are never multiplied out).

    For a site with a single block (a global coefficient vector) the variance part is
    :math:`\\langle \\Sigma, \\sum_n w_n a_n a_nᵀ \\rangle`: with a weight that is the same for
    every datum, the Gram matrix :math:`\\sum_n a_n a_nᵀ` is computed once and cached, so a
    sweep costs O(N D) instead of O(N D²) (the sufficient statistics XᵀX of a regression).
    """
    e = expr_of(x)
    shape = e.shape if isinstance(e, Expr) else e.shape
    if isinstance(e, Lin) and e.terms:
        small = _coefficient_shape(e)
        if small.numel() * 2 <= e.shape.numel():
            return _reduced_second_moment(e, small, weight, factors, mu, cache)
    if isinstance(weight, tuple):  # summed down to x's shape as one einsum, never multiplied out
        weight = _sum_product_to_shape(weight, shape)
    else:
        weight = _sum_to_shape(weight, shape)
    if isinstance(e, Bil):
        sq = second_moment(x, factors, mu)
        return (weight * sq).expand(broadcast_shapes(weight.shape, sq.shape)).sum()
    m = mean(x, factors, mu)
    total = (weight * m * m).sum()
    if not isinstance(e, Lin):
        return total
    full = broadcast_shapes(weight.shape, e.shape)
    reps = full.numel() // max(e.shape.numel(), 1)
    for s, coef, idx, f, mm, M in _lin_terms(e, factors, mu):
        cov = M - mm.unsqueeze(-1) * mm.unsqueeze(-2)
        if f.num_blocks != 1:
            total = total + _blocked_quadratic(coef, idx, e.shape, full, weight, cov, cache)
            continue
        w = weight.detach()
        # (restarts swept together: a batched weight's values cannot steer control flow under vmap)
        if reps == 1 and (w.numel() == 1 or (not _is_batched(w) and bool((w == w.reshape(-1)[0]).all()))):
            gram = _gram(coef, e.shape, cache)
            total = total + weight.reshape(-1)[0] * (gram * cov[0]).sum()
        else:
            a = coef.expand(full + coef.shape[-1:]).reshape(-1, coef.shape[-1])
            wa = weight.expand(full).reshape(-1, 1) * a
            total = total + ((wa.mT @ a) * cov[0]).sum()
    return total


def _coefficient_shape(e: Lin) -> torch.Size:
    """The shape over which the latent part of ``e`` varies (its coefficients and block indices,
    as stored, before broadcasting against the constant part)."""
    # broadcast (stride-0) dimensions count as 1: the shape of the distinct elements
    shapes = [compact(coef).shape[:-1] for coef, _ in e.terms.values()]
    shapes += [compact(idx).shape for _, idx in e.terms.values()]
    small = broadcast_shapes(*shapes)
    return torch.Size((1,) * (len(e.shape) - len(small)) + tuple(small))


def compact_apply(fn, t: Tensor) -> Tensor:
    """``fn(t)`` evaluated once per distinct element of a broadcast (expanded) tensor."""
    if not isinstance(t, Tensor) or 0 not in t.stride():
        return fn(t)
    return fn(symbolic.compact(t)).expand(t.shape)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def broadcast_sum(operands: Tuple[Tensor, ...], full: torch.Size, out: torch.Size = torch.Size()) -> Tensor:
    r"""The product of ``operands`` broadcast to ``full``, summed down to ``out`` (right-aligned,
    sizes 1 or equal to ``full``'s), as one ``einsum`` over the operands' distinct elements.

    Broadcast (stride-0) dimensions are never materialised: for responsibilities ``r`` (K, N),
    a precision (K, 1, D) and data ``y`` (1, N, D), :math:`\sum_{knd} r_{kn} \lambda_{kd} y_{nd}^2`
    costs one pass over the data instead of K copies of it."""
    n = len(full)
    # distinct elements, left-padded to ``full``'s rank; an operand that varies along a subset
    # of another's dimensions is multiplied into it first (elementwise, no larger tensor)
    items = []
    for o in operands:
        c = symbolic.compact(o)
        c = c.reshape((1,) * (n - c.dim()) + tuple(c.shape))
        items.append((frozenset(d for d in range(n) if c.shape[d] != 1), c))
    items.sort(key=lambda item: len(item[0]))
    scalar = [c.reshape(()) for dims, c in items if not dims]  # applied to the (small) result
    merged = []
    for dims, c in items:  # ascending number of dimensions
        if not dims:
            continue
        for i in [i for i, (sub, _) in enumerate(merged) if sub <= dims][::-1]:
            c = c * merged.pop(i)[1]
        merged.append((dims, c))
    subs, ops, seen = [], [], set()
    for dims, c in merged:
        keep = sorted(dims)
        ops.append(c.reshape([c.shape[d] for d in keep]))
        subs.append("".join(_LETTERS[d] for d in keep))
        seen.update(keep)
    target, out = torch.Size(out), torch.Size((1,) * (n - len(out)) + tuple(out))
    out_dims = [d for d in range(n) if out[d] != 1 and d in seen]
    # dimensions no operand varies along: each summed one multiplies the result by its size
    repeats = math.prod(full[d] for d in range(n) if d not in seen and out[d] == 1)
    if ops:
        res = _contract(ops, [set(m) for m, _ in merged], out_dims, full)
    else:
        res = torch.ones((), dtype=scalar[0].dtype, device=scalar[0].device)
    res = res.reshape([full[d] if d in out_dims else 1 for d in range(n)])
    for c in scalar:
        res = res * c
    res = res.expand(out).reshape(target)
    return res * repeats if repeats != 1 else res


def _contract(ops, dims, out_dims, full) -> Tensor:
    """Sum of the product of ``ops`` (with dimension sets ``dims``, positions in ``full``) over
    every dimension not in ``out_dims``, as a sequence of two-operand einsums: at each step the
    pair with the smallest result (dimensions still needed later kept). Cheaper than one
    many-operand ``torch.einsum``, which asks opt_einsum for a contraction path on every call."""
    ops, dims = list(ops), [sorted(d) for d in dims]
    keep_out = set(out_dims)
    while len(ops) > 1:
        best = None
        for i in range(len(ops)):
            for j in range(i + 1, len(ops)):
                later = keep_out.union(*(dims[k] for k in range(len(ops)) if k not in (i, j)))
                res = sorted((set(dims[i]) | set(dims[j])) & later)
                size = math.prod(full[d] for d in res)
                if best is None or size < best[0]:
                    best = (size, i, j, res)
        _, i, j, res = best
        spec = ",".join("".join(_LETTERS[d] for d in dims[k]) for k in (i, j)) + "->" + "".join(_LETTERS[d] for d in res)
        merged = torch.einsum(spec, ops[i], ops[j])
        ops = [o for k, o in enumerate(ops) if k not in (i, j)] + [merged]
        dims = [d for k, d in enumerate(dims) if k not in (i, j)] + [res]
    (d0,) = dims
    spec = "".join(_LETTERS[d] for d in d0) + "->" + "".join(_LETTERS[d] for d in out_dims)
    return torch.einsum(spec, ops[0]) if d0 != list(out_dims) else ops[0]


def _shrink(t: Tensor, shape: torch.Size, trailing: int = 0) -> Tensor:
    """View of a broadcast tensor restricted to ``shape`` (+ ``trailing`` dims kept)."""
    lead = t.dim() - trailing - len(shape)
    if lead > 0:
        t = t.reshape(t.shape[lead:]) if all(n == 1 for n in t.shape[:lead]) else t[(0,) * lead]
    for d, n in enumerate(shape):
        if n == 1 and t.shape[d] != 1:
            t = t.narrow(d, 0, 1)
    return t


def _latent_part(e: Lin, small: torch.Size) -> Lin:
    """The latent terms of ``e`` restricted to the shape they vary over (cached per expression)."""

    def compute():
        terms = {}
        for s, (coef, idx) in e.terms.items():
            coef = coef.expand(e.shape + coef.shape[-1:])
            idx = idx.expand(e.shape)
            terms[s] = (_shrink(coef, small, 1), _shrink(idx, small))
        return Lin(torch.zeros((), dtype=e.const.dtype, device=e.const.device), terms, small)

    return _memoized(("latent-part", id(e)), (e,), compute)


def _reduced_second_moment(e: Lin, small, weight, factors, mu, cache) -> Tensor:
    r"""Weighted second moment when the latent part varies over fewer dimensions than the
    constant part (``y_n - locs[z]``: data along n, latents along k only). With
    :math:`d = c + \mu` and :math:`\mu, \mathrm{Var}(d)` constant along the data dimensions,
    :math:`\sum w (c + \mu)^2 = \sum w c^2 + 2 \sum \bar{(wc)} \mu + \sum \bar w \mu^2`, where the
    bars sum over those dimensions first: O(N K D) instead of O(N K D²) and no gathers."""
    ws = weight if isinstance(weight, tuple) else (weight,)
    full = broadcast_shapes(e.shape, *(w.shape for w in ws))
    c = e.const.expand(e.shape)
    total = broadcast_sum(ws + (c, c), full)
    small_full = torch.Size((1,) * (len(full) - len(small)) + tuple(small))
    w_small = broadcast_sum(ws, full, small_full)
    wc_small = broadcast_sum(ws + (c,), full, small_full)
    latent = _latent_part(e, small)
    mu_small = mean(latent, factors, mu)
    total = total + 2 * (wc_small * mu_small).sum() + (w_small * mu_small * mu_small).sum()
    for s, coef, idx, f, mm, M in _lin_terms(latent, factors, mu):
        cov = M - mm.unsqueeze(-1) * mm.unsqueeze(-2)
        if f.num_blocks == 1:
            a = coef.expand(small + coef.shape[-1:])
            total = total + (w_small * ((const_matmul(a, cov[0]) * a).sum(-1))).sum()
        else:
            total = total + _blocked_quadratic(coef, idx, small, small, w_small, cov, cache)
    return total


def _sum_product_to_shape(weights: Tuple[Tensor, ...], shape: torch.Size) -> Tensor:
    """The product of ``weights`` summed to ``shape`` as :func:`_sum_to_shape` sums one weight,
    by :func:`broadcast_sum`: for stick-breaking responsibilities (K, N, 1), stick masks
    (K, 1, K − 1) and Pólya-Gamma means (N, K − 1), O(N K) work and memory, not O(N K²).
    When the product is no larger than the sum's result (nothing to sum away, e.g. a regression's
    weights and precision), it is simply multiplied out: cheaper than an einsum call."""
    full = broadcast_shapes(*(w.shape for w in weights))
    if math.prod(full) <= math.prod(shape):
        return _sum_to_shape(math.prod(weights[1:], start=weights[0]), shape)
    return broadcast_sum(weights, broadcast_shapes(shape, full), shape)


def _sum_to_shape(weight: Tensor, shape: torch.Size) -> Tensor:
    """Sum a weight over the dimensions along which the expression is constant (broadcast):
    e.g. responsibilities over enumerated values that a parameter does not depend on."""
    full = broadcast_shapes(weight.shape, shape)
    lead = len(full) - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and full[lead + i] > 1]
    dims = [d for d in dims if d >= len(full) - weight.dim() and weight.shape[d - (len(full) - weight.dim())] > 1]
    if not dims:
        return weight
    w = weight.reshape((1,) * (len(full) - weight.dim()) + weight.shape)
    w = w.sum(dims, keepdim=True)
    return w.reshape(w.shape[lead:]) if lead else w


def _blocked_quadratic(coef, idx, shape, full, weight, cov, cache) -> Tensor:
    """:math:`\\sum_n w_n a_nᵀ \\Sigma_{b(n)} a_n` for a site with several blocks, as
    :math:`\\sum_b \\langle \\Sigma_b, A_bᵀ W_b A_b \\rangle` with the rows of each block
    gathered once (cached) so the work is batched matrix products, not a gather of
    covariance matrices per datum."""
    key = ("blocks", id(coef), id(idx), tuple(full))
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit[0] is coef and hit[1] is idx:
        _, _, perm, rows, counts = hit
    else:
        ne = coef.shape[-1]
        flat_idx = idx.expand(shape).expand(full).reshape(-1)
        perm = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=cov.shape[0])
        a = coef.expand(shape + (ne,)).expand(full + (ne,)).reshape(-1, ne)[perm]
        if bool((counts == counts[0]).all()):
            rows = a.reshape(cov.shape[0], -1, ne)
        else:
            rows = (a, flat_idx[perm])
        if cache is not None:
            cache[key] = (coef, idx, perm, rows, counts)
    w = weight.expand(full).reshape(-1)[perm]
    if not isinstance(rows, tuple):
        outer = _shared_outer(rows, key, cache)
        if outer is not None:  # every block sees the same rows: all Gram matrices are one GEMM
            gram = (w.reshape(rows.shape[:-1]) @ outer).reshape(cov.shape)
            return (gram * cov).sum()
    if isinstance(rows, tuple):  # blocks of unequal sizes: scatter the weighted outer products
        a, block = rows
        gram = torch.zeros_like(cov).index_add_(0, block, (w.unsqueeze(-1) * a).unsqueeze(-1) * a.unsqueeze(-2))
    else:
        wa = w.reshape(rows.shape[:-1]).unsqueeze(-1) * rows
        gram = wa.mT @ rows
    return (gram * cov).sum()


def _shared_outer(rows: Tensor, key, cache: Optional[dict]) -> Optional[Tensor]:
    """When every block has the same coefficient rows :math:`a_1..a_n` (``A[z] @ x`` with the
    same ``x`` for each expert and output row), the outer products :math:`a_j a_jᵀ` flattened,
    shape ``(n, n_e²)``, so that the Gram matrices of all blocks are one matrix product
    :math:`G = W O`; None otherwise, or when ``O`` (``n_e²`` per row) would be more than four
    times the gathered rows (``n_e`` per row and block). Both products cost the same
    arithmetic, ``n_b n n_e²``; under :func:`torch.func.vmap` this one folds the restarts into
    its rows, where the batched ``Aᵀ W A`` of :func:`_blocked_quadratic` copies the rows once
    per restart (the gating layer of a CMN with more inputs than sticks, e.g. waveform's 22
    inputs and 19 sticks: that copy made its batched restarts dearer than sequential ones)."""
    okey = ("shared-outer",) + key[1:]
    hit = cache.get(okey) if cache is not None else None
    if hit is not None and hit[0] is rows:
        return hit[1]
    num_blocks, n, ne = rows.shape
    outer = None
    if ne <= 4 * num_blocks and torch.equal(rows, rows[:1].expand_as(rows)):
        outer = (rows[0].unsqueeze(-1) * rows[0].unsqueeze(-2)).reshape(n, ne * ne)
    if cache is not None:
        cache[okey] = (rows, outer)
    return outer


def _gram(coef: Tensor, shape: torch.Size, cache: Optional[dict]) -> Tensor:
    if cache is not None:
        hit = cache.get(id(coef))
        if hit is not None and hit[0] is coef:
            return hit[1]
    a = coef.expand(shape + coef.shape[-1:]).reshape(-1, coef.shape[-1])
    gram = a.mT @ a
    if cache is not None:
        cache[id(coef)] = (coef, gram)
    return gram


def quadratic_form(x, precision: Tensor, factors, mu) -> Tensor:
    """:math:`E_q[xᵀ P x]` over the last dimension of an affine expression."""
    e = expr_of(x)
    m = mean(x, factors, mu)
    out = (m.unsqueeze(-1) * precision * m.unsqueeze(-2)).sum((-1, -2))
    if not isinstance(e, Lin):
        return out
    for s, coef, idx, f, mm, M in _lin_terms(e, factors, mu):
        cov = M - mm.unsqueeze(-1) * mm.unsqueeze(-2)
        coef = coef.expand(e.shape + coef.shape[-1:])
        if f.num_blocks == 1:
            q = coef @ cov[0] @ coef.mT
        else:
            idx = idx.expand(e.shape)
            q = _einsum("...ie,...ief,...jf->...ij", coef, cov[idx], coef)
            q = q * (idx.unsqueeze(-1) == idx.unsqueeze(-2)).to(q.dtype)
        out = out + (precision * q).sum((-1, -2))
    return out


def _pos(x):
    e = expr_of(x)
    if isinstance(e, Poison):
        _poison(e)
    if isinstance(e, Lin):
        raise NotConjugate(f"affine in the Gaussian latent {describe(e)} (it must be a positive latent here)")
    return e


def mean_log(x, factors, mu) -> Tensor:
    """:math:`E_q[\\log x]`."""
    e = _pos(x)
    if not isinstance(e, Expr):
        return compact_apply(torch.log, e)
    out = compact_apply(torch.log, e.scale.expand(e.shape))
    for g in e.factors:
        f = factors[g.site]
        try:
            t = f.mean_log1m(mu[g.site], g.index) if g.complement else f.mean_log(mu[g.site], g.index)
        except _NotASufficientStatistic as err:
            raise NotConjugate(f"{err} of the {f.family} latent {g.site!r}, which is not one of its sufficient statistics")
        out = symbolic.broadcast_op(torch.add, out, symbolic.times(t, g.power))
    return out


def mean_log1m(x, factors, mu) -> Tensor:
    """:math:`E_q[\\log(1 - x)]` (a Beta latent's second statistic)."""
    e = _pos(x)
    if not isinstance(e, Expr):
        return compact_apply(lambda t: torch.log1p(-t), e)
    if len(e.factors) == 1 and not e.factors[0].complement and e.factors[0].power == 1.0 and torch.all(e.scale == 1):
        g = e.factors[0]
        f = factors[g.site]
        try:
            return f.mean_log1m(mu[g.site], g.index)
        except _NotASufficientStatistic:
            pass
    if len(e.factors) == 1 and e.factors[0].complement and torch.all(e.scale == 1):
        g = e.factors[0]
        return factors[g.site].mean_log(mu[g.site], g.index)
    raise NotConjugate(f"1 - x of {describe(e)}, which is not a Beta latent")


def mean_pow(x, power: float, factors, mu) -> Tensor:
    """:math:`E_q[x^{q}]` for a monomial of independent positive latents."""
    e = _pos(x)
    if not isinstance(e, Expr):
        return compact_apply(lambda t: t ** power, e)
    out = compact_apply(lambda t: t ** power, e.scale.expand(e.shape))
    for g in e.factors:
        f = factors[g.site]
        if g.complement:
            raise NotConjugate(f"a power of (1 - x) of {g.site!r}")
        try:
            t = f.mean_pow(mu[g.site], g.index, g.power * power)
        except _NotASufficientStatistic as err:
            raise NotConjugate(f"{err} of the {f.family} latent {g.site!r}, which is not one of its sufficient statistics")
        out = symbolic.broadcast_op(torch.mul, out, t)
    return out


def is_constant(x) -> bool:
    return not isinstance(expr_of(x), Expr)


def latent_sites(x) -> set:
    e = expr_of(x)
    return e.sites() if isinstance(e, Expr) else set()
