r"""Symbolic tracing of latent values through unmodified Pyro models.

A :class:`Sym` is a ``torch.Tensor`` subclass (in the spirit of
``pyro.ops.provenance.ProvenanceTensor``) that carries, beside a concrete stand-in
value, an *expression* saying how it depends on the model's latent sites. It rides
through ordinary model code (``X @ w``, ``locs[z]``, ``tau.rsqrt()``, ``pyro.plate``
broadcasting, distribution constructors) and lets the engine read off exactly the
coefficients conjugate updates need. Three kinds of expression exist:

* :class:`Lin` -- affine in Gaussian latents:
  :math:`d = c + \sum_s \sum_e A_s[\ldots, e]\, x_s[\mathrm{idx}_s[\ldots], e]`,
  where ``idx`` picks the *block* (an independent plate element) of site ``s``
  that each output element depends on, and ``e`` runs over the block's elements.
* :class:`Pos` -- a monomial of positive latents (Gamma, InverseGamma, Beta,
  Dirichlet): :math:`c \prod_j x_{s_j}[\mathrm{idx}_j]^{p_j}`, or :math:`1 - x` for a
  Beta latent.
* :class:`Poison` -- anything else; it remembers which operation left the
  conjugate family so that the error can name it, and only raises when such a
  value reaches a parameter of a distribution.

Expectations under the mean-field factors are computed in
:mod:`pyro_cavi.cavi.expectations`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .errors import _Densify

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- expressions
class Expr:
    shape: torch.Size

    def sites(self) -> set:
        raise NotImplementedError


@dataclass
class Lin(Expr):
    """Affine function of Gaussian latents. ``terms[site] = (coef, index)`` with
    ``coef`` broadcastable to ``shape + (n_e,)`` and ``index`` to ``shape``."""

    const: Tensor
    terms: Dict[str, Tuple[Tensor, Tensor]]
    shape: torch.Size

    def sites(self) -> set:
        return set(self.terms)


@dataclass(frozen=True)
class Factor:
    site: str
    index: Tensor
    power: float = 1.0
    complement: bool = False  # the factor is (1 - x) instead of x


@dataclass
class Pos(Expr):
    """``scale * prod_j factor_j ** power_j`` of positive latents."""

    scale: Tensor
    factors: Tuple[Factor, ...]
    shape: torch.Size
    simplex: bool = False  # last dim is a whole Dirichlet event (so it sums to one)

    def sites(self) -> set:
        return {f.site for f in self.factors}


@dataclass
class Bil(Expr):
    """Bilinear in two independent Gaussian latents (as a product of two affine expressions):
    ``lin + sum_pairs sum_{e,f} C[..., e, f] x_a[idx_a, e] x_b[idx_b, f]``. Under the
    mean-field posterior its first two moments are multilinear in the factors' moments."""

    lin: Lin
    pairs: Dict[Tuple[str, str], Tuple[Tensor, Tensor, Tensor]]
    shape: torch.Size

    def sites(self) -> set:
        out = set(self.lin.sites())
        for a, b in self.pairs:
            out |= {a, b}
        return out


@dataclass
class Poison(Expr):
    """A value that is no longer in a conjugate family. ``reason`` names the operation."""

    reason: str
    latent: set = field(default_factory=set)
    shape: torch.Size = torch.Size()

    def sites(self) -> set:
        return set(self.latent)


def describe(expr: Expr) -> str:
    names = ", ".join(repr(s) for s in sorted(expr.sites()))
    return names or "a latent"


# ----------------------------------------------------------------------------- memoisation
_MEMO: Optional[dict] = None


@contextmanager
def memoize(store: dict):
    """Within this context, an operation on the same Sym arguments returns the same result
    object. The engine evaluates the same symbolic expressions every sweep; memoising keeps
    them (and the coefficient tensors that cached sufficient statistics are keyed on) stable."""
    global _MEMO
    old, _MEMO = _MEMO, store
    try:
        yield
    finally:
        _MEMO = old


def _memo_key(func, args, kwargs):
    parts = [func]
    for a in _flatten((args, kwargs)):
        parts.append(("id", id(a)) if isinstance(a, torch.Tensor) or not isinstance(a, (int, float, str, type(None))) else a)
    return tuple(parts)


# ----------------------------------------------------------------------------- the tensor
class Sym(torch.Tensor):
    """A tensor holding a stand-in value and the expression of latents behind it."""

    _expr: Expr

    @staticmethod
    def __new__(cls, data: Tensor, expr: Expr):
        ret = torch.Tensor._make_subclass(cls, data)
        ret._expr = expr
        return ret

    def __init__(self, data: Tensor, expr: Expr):
        pass

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Sym({type(self._expr).__name__} of {describe(self._expr)}, shape={tuple(self.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _MEMO is not None:
            key = _memo_key(func, args, kwargs)
            hit = _MEMO.get(key)
            if hit is not None and all(x is y for x, y in zip(hit[0], _flatten((args, kwargs)))):
                return hit[1]
            result = cls._dispatch(func, args, kwargs)
            _MEMO[key] = (list(_flatten((args, kwargs))), result)
            return result
        return cls._dispatch(func, args, kwargs)

    @classmethod
    def _dispatch(cls, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if (name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))) and args and isinstance(args[0], Sym):
            from .errors import NonConjugateError

            raise NonConjugateError(
                f"the model modifies the latent value of {describe(args[0]._expr)} in place ({name}); "
                "CAVI needs latent values used through ordinary (out-of-place) tensor operations"
            )
        raw_args = _unwrap(args)
        raw_kwargs = _unwrap(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*raw_args, **raw_kwargs)
        name = getattr(func, "__name__", str(func))
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _TO_PYTHON:
            syms = [a for a in _flatten(args) if isinstance(a, Sym)]
            from .errors import NonConjugateError

            raise NonConjugateError(
                f"the model converts the latent value of {describe(syms[0]._expr)} to a Python "
                f"number ({name}); control flow cannot depend on a latent site under CAVI"
            )
        if isinstance(result, (tuple, list)) and name == "broadcast_tensors":
            shape = result[0].shape if result else torch.Size()
            return type(result)(_wrap(r, _expand(_expr_of(a), shape)) for a, r in zip(args, result))
        if not isinstance(result, torch.Tensor):
            return result
        if name in _PASSTHROUGH:
            return result
        rule = _RULES.get(name)
        try:
            expr = rule(result.shape, *args, **kwargs) if rule is not None else None
        except _Densify:
            raise
        except _Unsupported as e:
            expr = Poison(str(e), _sites_in(args), result.shape)
        if expr is None:
            expr = Poison(f"{name.strip('_')}(...) of {_describe_args(args)}", _sites_in(args), result.shape)
        return _wrap(result, expr)


_TO_PYTHON = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__len__", "numpy", "__array__"}
_PASSTHROUGH = {"size", "dim", "numel", "stride", "data_ptr", "__repr__", "__format__", "is_contiguous"}


class _Unsupported(Exception):
    pass


def _flatten(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _unwrap(x):
    if isinstance(x, Sym):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    if isinstance(x, tuple):
        return tuple(_unwrap(y) for y in x)
    if isinstance(x, list):
        return [_unwrap(y) for y in x]
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _sites_in(args) -> set:
    out = set()
    for a in _flatten(args):
        if isinstance(a, Sym):
            out |= a._expr.sites()
    return out


def _describe_args(args) -> str:
    for a in _flatten(args):
        if isinstance(a, Sym):
            if isinstance(a._expr, Poison):
                return a._expr.reason
            return describe(a._expr)
    return "a latent"


def _expr_of(x):
    """The expression of ``x``: an :class:`Expr` for a Sym, else ``x`` itself."""
    return x._expr if isinstance(x, (Sym, _FakeSym)) else x


def _wrap(data: Tensor, expr) -> Tensor:
    if isinstance(expr, Expr):
        return Sym(data, expr)
    return data


def _as_tensor(x, like: Tensor) -> Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- shape plumbing
def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _map_shape(expr: Expr, out_shape: torch.Size, f: Callable[[Tensor], Tensor], fc: Callable[[Tensor], Tensor]):
    """Apply a shape operation ``f`` to every shape-``S`` tensor of ``expr`` and ``fc``
    to its ``S + (n_e,)`` coefficient tensors."""
    shape = expr.shape
    if isinstance(expr, Lin):
        c = compact(expr.const)
        # a uniform constant (typically the zero of a bare latent) stays a broadcast scalar
        const = c.reshape(()).expand(out_shape) if c.numel() == 1 else f(expr.const.expand(shape))
        terms = {}
        for s, (coef, idx) in expr.terms.items():
            terms[s] = (fc(coef.expand(shape + coef.shape[-1:])), f(idx.expand(shape)))
        return Lin(const, terms, torch.Size(out_shape))
    if isinstance(expr, Pos):
        factors = tuple(Factor(g.site, f(g.index.expand(shape)), g.power, g.complement) for g in expr.factors)
        return Pos(f(expr.scale.expand(shape)), factors, torch.Size(out_shape), False)
    if isinstance(expr, Bil):
        out_shape = torch.Size(out_shape)
        lin = _map_shape(expr.lin, out_shape, f, fc)
        pairs = {}
        for key, (coef, ia, ib) in expr.pairs.items():
            n1, n2 = coef.shape[-2:]
            flat = fc(coef.expand(shape + (n1, n2)).reshape(shape + (n1 * n2,)))
            pairs[key] = (flat.reshape(out_shape + (n1, n2)), f(ia.expand(shape)), f(ib.expand(shape)))
        return Bil(lin, pairs, out_shape)
    if isinstance(expr, Poison):
        return Poison(expr.reason, expr.latent, torch.Size(out_shape))
    raise TypeError(expr)


def _dim_op(expr, out_shape, op: Callable[[Tensor, Sequence[int]], Tensor], dims: Sequence[int]):
    """A shape operation that takes dimension arguments (transpose, movedim, ...)."""
    nd = len(expr.shape)
    d = [_norm_dim(x, nd) for x in dims]
    return _map_shape(expr, out_shape, lambda t: op(t, d), lambda t: op(t, d))


def _expand(expr, shape):
    if not isinstance(expr, Expr):
        return None
    shape = torch.Size(shape)
    if expr.shape == shape:
        return expr
    out = _map_shape(
        expr, shape, lambda t: t.expand(shape), lambda t: t.expand(shape + t.shape[-1:])
    )
    if isinstance(expr, Pos):
        out.simplex = expr.simplex and shape[-1:] == expr.shape[-1:]
    return out


# ----------------------------------------------------------------------------- algebra
def _lin_from_const(c: Tensor) -> Lin:
    return Lin(c, {}, c.shape)


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` without its per-call overhead (the engine calls it for every
    term of every update)."""
    n = max(map(len, shapes), default=0)
    out = [1] * n
    for s in shapes:
        off = n - len(s)
        for i, d in enumerate(s):
            o = out[off + i]
            if d != o:
                if o == 1:
                    out[off + i] = d
                elif d != 1:
                    raise RuntimeError(f"shape {tuple(s)} cannot be broadcast with {tuple(out)}")
    return torch.Size(out)


def compact(t: Tensor, keep_last: int = 0) -> Tensor:
    """The distinct elements of a broadcast tensor: every expanded (stride-0) dimension
    (except the last ``keep_last``) narrowed to size 1, so ``compact(t).expand(t.shape)``
    is ``t`` again."""
    base = t
    for d, st in enumerate(t.stride()[: t.dim() - keep_last]):
        if st == 0 and base.shape[d] != 1:
            base = base.narrow(d, 0, 1)
    return base


def times(t: Tensor, factor: float) -> Tensor:
    """``t * factor`` that keeps broadcast (stride-0) dimensions broadcast instead of materialising them."""
    if factor == 1.0:
        return t
    return (compact(t) * factor).expand(t.shape)


def broadcast_op(op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``op(a, b)`` for an elementwise ``op``, computed on the distinct elements only and
    expanded: data ``y`` (N, D) minus the constant part of ``locs[z]`` (K, 1, D) stays an
    (N, D) tensor seen as (K, N, D) instead of K copies of the data."""
    shape = broadcast_shapes(a.shape, b.shape)
    return op(compact(a), compact(b)).expand(shape)


def _lin_add(a: Lin, b: Lin, shape: torch.Size, sign: float = 1.0) -> Lin:
    terms = dict()
    for s, (coef, idx) in a.terms.items():
        terms[s] = (coef, idx)
    for s, (coef, idx) in b.terms.items():
        coef = times(coef, sign)
        if s in terms:
            ca, ia = terms[s]
            ia_, ib_ = torch.broadcast_tensors(ia, idx)
            if not torch.equal(ia_, ib_):
                raise _Densify(s)
            terms[s] = (ca + coef, ia_)
        else:
            terms[s] = (coef, idx)
    const = broadcast_op(torch.add, a.const, b.const) if sign == 1.0 else broadcast_op(torch.sub, a.const, b.const)
    return Lin(const, terms, shape)


def _lin_scale(a: Lin, c: Tensor, shape: torch.Size) -> Lin:
    c = c.to(a.const.dtype) if c.is_floating_point() or not a.const.is_floating_point() else c.to(a.const.dtype)
    terms = {s: (coef * c.unsqueeze(-1), idx.expand(shape) if idx.dim() else idx) for s, (coef, idx) in a.terms.items()}
    return Lin(a.const * c, terms, shape)


def _pos_scale(a: Pos, c: Tensor, shape: torch.Size) -> Pos:
    out = Pos(a.scale * c, tuple(Factor(g.site, g.index, g.power, g.complement) for g in a.factors), shape)
    out.simplex = a.simplex and c.shape[-1:] in (torch.Size(), torch.Size([1]))
    return out


def _pos_pow(a: Pos, q: float) -> Pos:
    if any(g.complement for g in a.factors) and q != 1:
        raise _Unsupported(f"a power of (1 - x) of {describe(a)}")
    return Pos(a.scale ** q, tuple(Factor(g.site, g.index, g.power * q, g.complement) for g in a.factors), a.shape)


def _pos_mul(a: Pos, b: Pos, shape: torch.Size) -> Pos:
    factors = list(a.factors)
    for g in b.factors:
        for i, h in enumerate(factors):
            if h.site == g.site:
                ih, ig = torch.broadcast_tensors(h.index, g.index)
                if not torch.equal(ih, ig) or h.complement or g.complement:
                    raise _Unsupported(f"a product of two elements of {g.site!r}")
                factors[i] = Factor(h.site, ih, h.power + g.power)
                break
        else:
            factors.append(g)
    return Pos(a.scale * b.scale, tuple(factors), shape)


def _bil_product(a: Lin, b: Lin, shape: torch.Size) -> "Bil":
    """(c_a + A x) * (c_b + B y) for affine expressions in disjoint Gaussian latents."""
    shared = a.sites() & b.sites()
    if shared:
        raise _Unsupported(f"a product of the Gaussian latent {sorted(shared)[0]!r} with itself")
    ca, cb = a.const, b.const
    lin = _lin_add(_lin_scale(_strip(a), cb, shape), _lin_scale(_strip(b), ca, shape), shape)
    lin = Lin(lin.const + ca * cb, lin.terms, shape)
    pairs = {}
    for sa, (coef_a, ia) in a.terms.items():
        for sb, (coef_b, ib) in b.terms.items():
            coef = coef_a.unsqueeze(-1) * coef_b.unsqueeze(-2)
            coef = coef.expand(shape + coef.shape[-2:])
            ia_, ib_ = ia.expand(shape), ib.expand(shape)
            if sb < sa:
                pairs[(sb, sa)] = (coef.transpose(-1, -2), ib_, ia_)
            else:
                pairs[(sa, sb)] = (coef, ia_, ib_)
    return Bil(lin, pairs, shape)


def _strip(a: Lin) -> Lin:
    return Lin(torch.zeros((), dtype=a.const.dtype, device=a.const.device), a.terms, a.shape)


def _as_bil(e, like: Tensor) -> "Bil":
    if isinstance(e, Bil):
        return e
    lin = e if isinstance(e, Lin) else _lin_from_const(_as_tensor(e, like))
    return Bil(lin, {}, lin.shape)


def _bil_add(a: "Bil", b: "Bil", shape: torch.Size, sign: float) -> "Bil":
    lin = _lin_add(a.lin, b.lin, shape, sign)
    pairs = dict(a.pairs)
    for key, (coef, ia, ib) in b.pairs.items():
        coef = coef * sign
        if key in pairs:
            c0, ia0, ib0 = pairs[key]
            i1, i2 = torch.broadcast_tensors(ia0, ia)
            j1, j2 = torch.broadcast_tensors(ib0, ib)
            if not (torch.equal(i1, i2) and torch.equal(j1, j2)):
                raise _Unsupported(f"a sum of bilinear terms of {key[0]!r} and {key[1]!r} over different plate elements")
            pairs[key] = (c0 + coef, i1, j1)
        else:
            pairs[key] = (coef, ia, ib)
    return Bil(lin, pairs, shape)


def _bil_scale(a: "Bil", c: Tensor, shape: torch.Size) -> "Bil":
    lin = _lin_scale(a.lin, c, shape)
    pairs = {k: (coef * c.unsqueeze(-1).unsqueeze(-1), ia, ib) for k, (coef, ia, ib) in a.pairs.items()}
    return Bil(lin, pairs, shape)


def _binary(shape, x, y, op: str):
    """Rules for +, -, *, / between expressions and constants."""
    ex, ey = _expr_of(x), _expr_of(y)
    if isinstance(ex, Poison) or isinstance(ey, Poison):
        return ex if isinstance(ex, Poison) else ey
    if not isinstance(ex, Expr) and not isinstance(ey, Expr):
        return None
    like = x if isinstance(x, torch.Tensor) else y
    if not isinstance(ex, Expr):
        ex = _as_tensor(ex, like)
    if not isinstance(ey, Expr):
        ey = _as_tensor(ey, like)
    if isinstance(ex, Bil) or isinstance(ey, Bil):
        if isinstance(ex, Pos) or isinstance(ey, Pos):
            raise _Unsupported("a bilinear expression combined with a positive latent")
        if op in ("add", "sub", "rsub"):
            if op == "rsub":
                return _bil_add(_as_bil(ey, like), _as_bil(ex, like), shape, -1.0)
            return _bil_add(_as_bil(ex, like), _as_bil(ey, like), shape, -1.0 if op == "sub" else 1.0)
        if op == "mul" and not (isinstance(ex, Expr) and isinstance(ey, Expr)):
            e, c = (ex, ey) if isinstance(ex, Expr) else (ey, ex)
            return _bil_scale(e, c, shape)
        if op == "div" and not isinstance(ey, Expr):
            return _bil_scale(ex, 1.0 / ey, shape)
        raise _Unsupported("a product of more than two Gaussian latents")
    if op in ("add", "sub", "rsub"):
        sign = -1.0 if op == "sub" else 1.0
        if op == "rsub":
            ex, ey, sign = ey, ex, -1.0
        if isinstance(ex, Pos) or isinstance(ey, Pos):
            pos, other = (ex, ey) if isinstance(ex, Pos) else (ey, ex)
            # 1 - x for a Beta latent x
            if (
                sign == -1.0 and isinstance(ey, Pos) and isinstance(ex, torch.Tensor)
                and len(pos.factors) == 1 and pos.factors[0].power == 1.0
                and not pos.factors[0].complement and torch.all(ex == 1) and torch.all(pos.scale == 1)
            ):
                g = pos.factors[0]
                return Pos(torch.ones((), dtype=ex.dtype, device=ex.device), (Factor(g.site, g.index, 1.0, True),), shape)
            raise _Unsupported(
                f"a sum of the positive latent {describe(pos)} and another term "
                "(positive latents enter only as products and powers)"
            )
        a = ex if isinstance(ex, Lin) else _lin_from_const(ex)
        b = ey if isinstance(ey, Lin) else _lin_from_const(ey)
        return _lin_add(a, b, shape, sign)
    if op == "mul":
        if isinstance(ex, Expr) and isinstance(ey, Expr):
            if isinstance(ex, Pos) and isinstance(ey, Pos):
                return _pos_mul(ex, ey, shape)
            if isinstance(ex, Lin) and isinstance(ey, Lin):
                if ex.sites() & ey.sites():
                    raise _Unsupported(f"a product of the Gaussian latents {describe(ex)} and {describe(ey)}")
                return _bil_product(ex, ey, shape)
            raise _Unsupported(f"a product of the Gaussian latent and the positive latent ({describe(ex)}, {describe(ey)})")
        e, c = (ex, ey) if isinstance(ex, Expr) else (ey, ex)
        return _lin_scale(e, c, shape) if isinstance(e, Lin) else _pos_scale(e, c, shape)
    if op == "div":
        if isinstance(ey, Expr):
            if isinstance(ey, Pos):
                inv = _pos_pow(ey, -1.0)
                if isinstance(ex, Pos):
                    return _pos_mul(ex, inv, shape)
                if isinstance(ex, Lin):
                    raise _Unsupported(f"a Gaussian latent divided by a positive latent ({describe(ex)}/{describe(ey)})")
                return _pos_scale(inv, ex, shape)
            raise _Unsupported(f"division by the Gaussian latent {describe(ey)}")
        return _lin_scale(ex, 1.0 / ey, shape) if isinstance(ex, Lin) else _pos_scale(ex, 1.0 / ey, shape)
    raise AssertionError(op)


def _rule_binary(op, swap=False):
    def rule(shape, x, y, *, alpha=None, out=None, rounding_mode=None):
        if rounding_mode is not None:
            return None
        if alpha is not None:
            y = y * alpha
        if swap:
            x, y = y, x
        return _binary(shape, x, y, op)

    return rule


def _rule_neg(shape, x):
    e = _expr_of(x)
    if isinstance(e, Bil):
        return _bil_scale(e, torch.tensor(-1.0, dtype=e.lin.const.dtype, device=e.lin.const.device), shape)
    if isinstance(e, Lin):
        return _lin_scale(e, torch.tensor(-1.0, dtype=e.const.dtype, device=e.const.device), shape)
    raise _Unsupported(f"the negative of the positive latent {describe(e)}")


def _pow_value(q):
    if isinstance(q, torch.Tensor):
        if q.numel() != 1 or isinstance(q, Sym):
            return None
        return float(q)
    return float(q)


def _rule_pow(shape, x, q):
    e = _expr_of(x)
    if isinstance(e, Pos):
        qv = _pow_value(q)
        if qv is None:
            raise _Unsupported(f"a tensor power of {describe(e)}")
        return _pos_pow(e, qv)
    if isinstance(e, Lin):
        raise _Unsupported(f"a power of the Gaussian latent {describe(e)}")
    return None


def _unary_pow(q):
    def rule(shape, x):
        e = _expr_of(x)
        if isinstance(e, Pos):
            return _pos_pow(e, q)
        raise _Unsupported(f"{ {-0.5: 'rsqrt', 0.5: 'sqrt', -1.0: 'reciprocal', 2.0: 'square'}[q] }(...) of the Gaussian latent {describe(e)}")

    return rule


def _rule_sum(shape, x, dim=None, keepdim=False, dtype=None):
    e = _expr_of(x)
    if isinstance(e, Poison):
        return Poison(e.reason, e.latent, shape)
    nd = len(e.shape)
    if dim is None:
        dims = list(range(nd))
    elif isinstance(dim, (tuple, list)):
        dims = [_norm_dim(d, nd) for d in dim]
    else:
        dims = [_norm_dim(dim, nd)]
    if isinstance(e, Pos):
        if e.simplex and dims == [nd - 1] and len(e.factors) == 1 and e.factors[0].power == 1.0:
            # a Dirichlet latent sums to one over its event
            s = e.scale.expand(e.shape).select(-1, 0)
            return s.unsqueeze(-1) if keepdim else s
        raise _Unsupported(f"a sum over elements of the positive latent {describe(e)}")
    if isinstance(e, Bil):
        lin = _rule_sum(shape, _FakeSym(e.lin), dim, keepdim)
        pairs = {}
        for key, (coef, ia, ib) in e.pairs.items():
            coef = coef.expand(e.shape + coef.shape[-2:])
            ia, ib = ia.expand(e.shape), ib.expand(e.shape)
            for d in sorted(dims, reverse=True):
                for idx in (ia, ib):
                    first = idx.select(d, 0).unsqueeze(d)
                    if idx.shape[d] > 1 and not torch.equal(idx, first.expand_as(idx)):
                        raise _Unsupported(f"a sum of bilinear terms of {key[0]!r} and {key[1]!r} over different plate elements")
                ia = ia.select(d, 0).unsqueeze(d) if keepdim else ia.select(d, 0)
                ib = ib.select(d, 0).unsqueeze(d) if keepdim else ib.select(d, 0)
                coef = coef.sum(d, keepdim=keepdim)
            pairs[key] = (coef, ia, ib)
        return Bil(lin, pairs, shape)
    dims = sorted(dims, reverse=True)
    const = e.const.expand(e.shape).sum(dim=dims, keepdim=keepdim)
    terms = {}
    for s, (coef, idx) in e.terms.items():
        coef = coef.expand(e.shape + coef.shape[-1:])
        idx = idx.expand(e.shape)
        for d in dims:
            first = idx.select(d, 0).unsqueeze(d)
            if idx.shape[d] > 1 and not torch.equal(idx, first.expand_as(idx)):
                raise _Densify(s)
            idx = first if keepdim else first.squeeze(d)
            coef = coef.sum(d, keepdim=keepdim)
        terms[s] = (coef, idx)
    return Lin(const, terms, shape)


def _rule_mean(shape, x, dim=None, keepdim=False, dtype=None):
    e = _expr_of(x)
    out = _rule_sum(shape, x, dim, keepdim)
    n = e.shape.numel() // max(shape.numel(), 1)
    if isinstance(out, Lin):
        return _lin_scale(out, torch.tensor(1.0 / n, dtype=out.const.dtype, device=out.const.device), shape)
    return out


def _rule_getitem(shape, x, key):
    e = _expr_of(x)
    if any(isinstance(k, Sym) for k in _flatten(key if isinstance(key, tuple) else (key,))):
        raise _Unsupported(f"indexing by the latent value {_describe_args(key)}")
    key = _unwrap(key)
    tkey = key if isinstance(key, tuple) else (key,)
    has_ellipsis = any(k is Ellipsis for k in tkey)
    ckey = tkey + (slice(None),) if has_ellipsis else tkey
    out = _map_shape(e, shape, lambda t: t[key], lambda t: t[ckey])
    if isinstance(e, Pos) and e.simplex and not has_ellipsis and len(tkey) < len(e.shape) - 0 and all(
        not isinstance(k, type(None)) for k in tkey
    ):
        out.simplex = shape[-1:] == e.shape[-1:] and len(tkey) <= len(e.shape) - 1
    return out


def _rule_expand(shape, x, *sizes, **kw):
    return _expand(_expr_of(x), shape)


def _rule_broadcast_to(shape, x, size):
    return _expand(_expr_of(x), shape)


def _rule_expand_as(shape, x, other):
    return _expand(_expr_of(x), shape)


def _rule_reshape(shape, x, *args, **kw):
    e = _expr_of(x)
    out = _map_shape(
        e, shape, lambda t: t.reshape(shape), lambda t: t.reshape(shape + t.shape[-1:])
    )
    if isinstance(e, Pos):
        out.simplex = e.simplex and shape[-1:] == e.shape[-1:]
    return out


def _rule_squeeze(shape, x, dim=None):
    e = _expr_of(x)
    nd = len(e.shape)
    if dim is None:
        dims = [i for i, n in enumerate(e.shape) if n == 1]
    elif isinstance(dim, (tuple, list)):
        dims = [_norm_dim(d, nd) for d in dim if e.shape[d] == 1]
    else:
        dims = [_norm_dim(dim, nd)] if e.shape[dim] == 1 else []

    def f(t):
        for d in sorted(dims, reverse=True):
            t = t.squeeze(d)
        return t

    out = _map_shape(e, shape, f, f)
    if isinstance(e, Pos):
        out.simplex = e.simplex and (nd - 1) not in dims
    return out


def _rule_transpose(shape, x, d0, d1):
    return _dim_op(_expr_of(x), shape, lambda t, d: t.transpose(d[0], d[1]), (d0, d1))


def _rule_permute(shape, x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return _dim_op(_expr_of(x), shape, lambda t, d: t.permute(*d, *range(len(d), t.dim())), dims)


def _rule_movedim(shape, x, source, destination):
    src = source if isinstance(source, (tuple, list)) else (source,)
    dst = destination if isinstance(destination, (tuple, list)) else (destination,)
    e = _expr_of(x)
    nd = len(e.shape)
    src = [_norm_dim(s, nd) for s in src]
    dst = [_norm_dim(s, nd) for s in dst]
    return _map_shape(e, shape, lambda t: t.movedim(src, dst), lambda t: t.movedim(src, dst))


def _rule_T(shape, x):
    e = _expr_of(x)
    nd = len(e.shape)
    return _dim_op(e, shape, lambda t, d: t.permute(*reversed(d), *range(len(d), t.dim())), range(nd))


def _rule_mT(shape, x):
    return _dim_op(_expr_of(x), shape, lambda t, d: t.transpose(d[0], d[1]), (-2, -1))


def _rule_flatten(shape, x, start_dim=0, end_dim=-1):
    return _rule_reshape(shape, x)


def _rule_identity(shape, x, *args, **kwargs):
    e = _expr_of(x)
    if isinstance(e, Lin):
        dtype = kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            if isinstance(a, torch.Tensor):
                dtype = a.dtype
        if dtype is not None and dtype.is_floating_point:
            return Lin(e.const.to(dtype), {s: (c.to(dtype), i) for s, (c, i) in e.terms.items()}, shape)
    return e


def _rule_cast(dtype):
    def rule(shape, x):
        e = _expr_of(x)
        if isinstance(e, Lin):
            return Lin(e.const.to(dtype), {s: (c.to(dtype), i) for s, (c, i) in e.terms.items()}, shape)
        return e

    return rule


def _promote(x, like: Tensor) -> Lin:
    e = _expr_of(x)
    if isinstance(e, Lin):
        return e
    if isinstance(e, Expr):
        raise _Unsupported(f"concatenating the positive latent {describe(e)}")
    t = _as_tensor(e, like)
    return _lin_from_const(t)


def _rule_cat(shape, tensors, dim=0, *, out=None):
    like = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if like is None:
        like = next(_expr_of(t).const for t in tensors if isinstance(_expr_of(t), Lin))
    items = [_promote(t, like) for t in tensors]
    nd = len(shape)
    d = _norm_dim(dim, nd)
    sites = {}
    for it in items:
        for s, (coef, _) in it.terms.items():
            sites[s] = coef.shape[-1]
    const = torch.cat([it.const.expand(it.shape) for it in items], d)
    terms = {}
    for s, ne in sites.items():
        coefs, idxs = [], []
        # pieces without the site get zero coefficients and a neighbour's block index, so that
        # concatenating a constant column (a bias) keeps rows within one block
        ref = next(it for it in items if s in it.terms)
        ref_idx = ref.terms[s][1].expand(ref.shape).narrow(d, 0, 1)
        for it in items:
            if s in it.terms:
                c, i = it.terms[s]
                coefs.append(c.expand(it.shape + (ne,)))
                idxs.append(i.expand(it.shape))
            else:
                coefs.append(const.new_zeros(it.shape + (ne,)))
                idxs.append(ref_idx.expand(it.shape))
        terms[s] = (torch.cat(coefs, d), torch.cat(idxs, d))
    return Lin(const, terms, shape)


def _rule_stack(shape, tensors, dim=0, *, out=None):
    d = _norm_dim(dim, len(shape))
    like = next(t for t in tensors if isinstance(t, torch.Tensor))
    pieces = []
    for t in tensors:
        e = _expr_of(t)
        if isinstance(e, Expr):
            pieces.append(_FakeSym(_generic_unsqueeze(e, e.shape[:d] + (1,) + e.shape[d:], d)))
        else:
            pieces.append(_as_tensor(t, like).unsqueeze(d))
    return _rule_cat(shape, pieces, d)


class _FakeSym:
    """Carrier used internally by ``stack``: only its expression is read."""

    def __init__(self, expr):
        self._expr = expr


def _matmul(shape, a, b):
    ea, eb = _expr_of(a), _expr_of(b)
    if isinstance(ea, Poison) or isinstance(eb, Poison):
        return ea if isinstance(ea, Poison) else eb
    if isinstance(ea, Expr) and isinstance(eb, Expr):
        if isinstance(ea, Lin) and isinstance(eb, Lin) and not (ea.sites() & eb.sites()):
            return _lin_lin_matmul(shape, ea, eb)
        raise _Unsupported(f"a matrix product of two latents ({describe(ea)} @ {describe(eb)})")
    if isinstance(ea, Pos) or isinstance(eb, Pos):
        raise _Unsupported(f"a matrix product with the positive latent {describe(ea if isinstance(ea, Pos) else eb)}")
    if isinstance(eb, Lin):
        X, W, left = a, eb, True
    else:
        X, W, left = b, ea, False
    X = torch.as_tensor(X).to(W.const.dtype)
    if left:
        out = _const_matmul_lin(X, W)
    else:
        # W @ X = (X' @ W')ᵀ with ' transposing matrices (vectors stay as they are)
        Xt = X.mT if X.dim() >= 2 else X
        Wt = _dim_op(W, W.shape[:-2] + W.shape[-2:][::-1], lambda t, d: t.transpose(d[0], d[1]), (-2, -1)) if len(W.shape) >= 2 else W
        out = _const_matmul_lin(Xt, Wt)
        if X.dim() >= 2 and len(W.shape) >= 2:
            out = _dim_op(out, out.shape[:-2] + out.shape[-2:][::-1], lambda t, d: t.transpose(d[0], d[1]), (-2, -1))
    if out.shape != shape:
        out = _expand(out, shape)
    return out


def _selects_own_row(coef: Tensor) -> bool:
    """Whether coefficients of shape (..., k, m, k) pick coordinate i of a block at every entry
    (i, j) of ``W``: a vector site made a column (m = 1), or ``W`` made of the rows or columns of
    a site's blocks (``gate.T``, ``A[z].mT``). Then ``X @ W`` has X's row as the coefficient of
    every output entry, kept broadcast over j and over the blocks (no copy per block)."""
    if coef.dim() < 3 or coef.shape[-3] != coef.shape[-1]:
        return False
    eye = torch.eye(coef.shape[-1], dtype=coef.dtype, device=coef.device).unsqueeze(-2)
    return torch.equal(coef, eye.expand(coef.shape))


def _const_matmul_lin(X: Tensor, W: Lin) -> Lin:
    """X @ W for a constant X and an affine W, with torch.matmul's promotion of vectors."""
    w_vec, x_vec = len(W.shape) == 1, X.dim() == 1
    Wm = _unsqueeze_expr(W, -1) if w_vec else W
    Xm = X.unsqueeze(0) if x_vec else X
    # X (..., n, k) @ W (..., k, m): every output element must read one block of each site
    const = Xm @ Wm.const.expand(Wm.shape)
    terms = {}
    for s, (coef, idx) in Wm.terms.items():
        coef = coef.expand(Wm.shape + coef.shape[-1:])
        idx = idx.expand(Wm.shape)
        first = idx.narrow(-2, 0, 1)
        if idx.shape[-2] > 1 and not torch.equal(idx, first.expand_as(idx)):
            raise _Densify(s)
        if _selects_own_row(coef):  # the coefficients are X itself
            c = Xm.unsqueeze(-2).to(coef.dtype)
            c = c.expand(broadcast_shapes(c.shape[:-3], coef.shape[:-3]) + (Xm.shape[-2], coef.shape[-2], Xm.shape[-1]))
        else:
            c = torch.einsum("...nk,...kme->...nme", Xm, coef)
        terms[s] = (c, first.expand(c.shape[:-1]))
    out = Lin(const, terms, const.shape)
    if w_vec:
        out = _squeeze_expr(out, -1)
    if x_vec:
        out = _squeeze_expr(out, -2 if not w_vec else -1)
    return out


def _lin_lin_matmul(shape, a: Lin, b: Lin):
    """a @ b for two affine expressions of disjoint Gaussian latents: a bilinear expression."""
    a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
    A = _generic_unsqueeze(a, a.shape[:0] + (1,) + a.shape, 0) if a_vec else a
    B = _generic_unsqueeze(b, b.shape + (1,), -1) if b_vec else b
    # (..., n, k, 1) * (..., 1, k, m) summed over k
    A3 = _generic_unsqueeze(A, A.shape + (1,), -1)
    B3 = _generic_unsqueeze(B, B.shape[:-2] + (1,) + B.shape[-2:], -3)
    prod_shape = broadcast_shapes(A3.shape, B3.shape)
    prod = _bil_product(_expand(A3, prod_shape), _expand(B3, prod_shape), prod_shape)
    out_shape = prod_shape[:-2] + prod_shape[-1:]
    out = _rule_sum(out_shape, _FakeSym(prod), -2)
    if b_vec:
        out = _map_shape(out, out.shape[:-1], lambda t: t.squeeze(-1), lambda t: t.squeeze(-2))
    if a_vec:
        nd = len(out.shape)
        d = nd - (1 if b_vec else 2)
        out = _map_shape(out, out.shape[:d] + out.shape[d + 1:], lambda t: t.squeeze(d), lambda t: t.squeeze(d))
    return out


def _squeeze_expr(e: Lin, dim: int) -> Lin:
    nd = len(e.shape)
    d = _norm_dim(dim, nd)
    new_shape = e.shape[:d] + e.shape[d + 1:]
    return _map_shape(e, new_shape, lambda t: t.squeeze(d), lambda t: t.squeeze(d))


def _unsqueeze_expr(e: Lin, dim: int) -> Lin:
    nd = len(e.shape) + 1
    d = _norm_dim(dim, nd)
    new_shape = e.shape[:d] + (1,) + e.shape[d:]
    return _map_shape(e, new_shape, lambda t: t.unsqueeze(d), lambda t: t.unsqueeze(d))


def _rule_unsqueeze(shape, x, dim):
    e = _expr_of(x)
    return _unsqueeze_expr(e, dim) if isinstance(e, Lin) else _generic_unsqueeze(e, shape, dim)


def _generic_unsqueeze(e, shape, dim):
    d = _norm_dim(dim, len(e.shape) + 1)
    out = _map_shape(e, shape, lambda t: t.unsqueeze(d), lambda t: t.unsqueeze(d))
    if isinstance(e, Pos):
        out.simplex = e.simplex and d < len(e.shape)
    return out


def _rule_matmul(shape, a, b):
    return _matmul(shape, a, b)


def _rule_rmatmul(shape, a, b):
    return _matmul(shape, b, a)


def _rule_setitem(shape, *args):
    raise _Unsupported("in-place assignment into a latent value")


_RULES: Dict[str, Callable[..., Any]] = {
    "add": _rule_binary("add"),
    "__add__": _rule_binary("add"),
    "__radd__": _rule_binary("add", swap=True),
    "__iadd__": _rule_binary("add"),
    "sub": _rule_binary("sub"),
    "subtract": _rule_binary("sub"),
    "__sub__": _rule_binary("sub"),
    "__rsub__": _rule_binary("rsub"),
    "rsub": _rule_binary("rsub"),
    "mul": _rule_binary("mul"),
    "multiply": _rule_binary("mul"),
    "__mul__": _rule_binary("mul"),
    "__rmul__": _rule_binary("mul", swap=True),
    "div": _rule_binary("div"),
    "divide": _rule_binary("div"),
    "true_divide": _rule_binary("div"),
    "__truediv__": _rule_binary("div"),
    "__rtruediv__": _rule_binary("div", swap=True),
    "__div__": _rule_binary("div"),
    "__rdiv__": _rule_binary("div", swap=True),
    "neg": _rule_neg,
    "negative": _rule_neg,
    "__neg__": _rule_neg,
    "__pos__": _rule_identity,
    "pow": _rule_pow,
    "__pow__": _rule_pow,
    "rsqrt": _unary_pow(-0.5),
    "sqrt": _unary_pow(0.5),
    "reciprocal": _unary_pow(-1.0),
    "square": _unary_pow(2.0),
    "sum": _rule_sum,
    "mean": _rule_mean,
    "__getitem__": _rule_getitem,
    "expand": _rule_expand,
    "broadcast_to": _rule_broadcast_to,
    "expand_as": _rule_expand_as,
    "reshape": _rule_reshape,
    "view": _rule_reshape,
    "view_as": _rule_reshape,
    "reshape_as": _rule_reshape,
    "flatten": _rule_flatten,
    "unsqueeze": _rule_unsqueeze,
    "squeeze": _rule_squeeze,
    "transpose": _rule_transpose,
    "swapaxes": _rule_transpose,
    "swapdims": _rule_transpose,
    "permute": _rule_permute,
    "movedim": _rule_movedim,
    "moveaxis": _rule_movedim,
    "T": _rule_T,
    "mT": _rule_mT,
    "t": _rule_T,
    "matmul": _rule_matmul,
    "__matmul__": _rule_matmul,
    "__rmatmul__": _rule_rmatmul,
    "mm": _rule_matmul,
    "mv": _rule_matmul,
    "cat": _rule_cat,
    "concat": _rule_cat,
    "concatenate": _rule_cat,
    "stack": _rule_stack,
    "clone": _rule_identity,
    "contiguous": _rule_identity,
    "detach": _rule_identity,
    "to": _rule_identity,
    "type_as": _rule_identity,
    "float": _rule_cast(torch.float32),
    "double": _rule_cast(torch.float64),
    "__setitem__": _rule_setitem,
}


def identity_lin(site: str, shape: torch.Size, event_dim: int, dense: bool, dtype, device) -> Lin:
    """The expression of a Gaussian site's own value.

    In block mode every batch element (plate element) is an independent block of
    ``n_e = prod(event_shape)`` elements; in dense mode the whole site is one block.
    """
    shape = torch.Size(shape)
    batch_shape = shape[: len(shape) - event_dim]
    event_shape = shape[len(shape) - event_dim:]
    if dense:
        n = shape.numel()
        coef = torch.eye(n, dtype=dtype, device=device).reshape(shape + (n,))
        idx = torch.zeros((), dtype=torch.long, device=device)
    else:
        ne = event_shape.numel()
        coef = torch.eye(ne, dtype=dtype, device=device).reshape(event_shape + (ne,))
        nb = batch_shape.numel()
        idx = torch.arange(nb, device=device).reshape(batch_shape + (1,) * event_dim)
    return Lin(torch.zeros((), dtype=dtype, device=device), {site: (coef, idx)}, shape)


def identity_pos(site: str, shape: torch.Size, simplex: bool, dtype, device) -> Pos:
    """The expression of a positive site's own value; elements indexed in flat order."""
    shape = torch.Size(shape)
    idx = torch.arange(shape.numel(), device=device).reshape(shape)
    return Pos(torch.ones((), dtype=dtype, device=device), (Factor(site, idx),), shape, simplex)
