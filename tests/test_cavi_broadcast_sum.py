"""The engine's broadcast-aware sums against the obvious reference: materialise the
broadcast product, then sum. Sufficient statistics of every Gaussian likelihood go
through these, so any slip here would be a wrong posterior."""

import itertools

import pytest
import torch

from pyro_cavi.cavi.expectations import broadcast_sum
from pyro_cavi.cavi.symbolic import broadcast_op, compact


def _reference(operands, full, out):
    prod = torch.ones(full, dtype=torch.float64)
    for o in operands:
        prod = prod * o.expand(full)
    out = torch.Size((1,) * (len(full) - len(out)) + tuple(out))
    dims = [d for d in range(len(full)) if out[d] == 1 and full[d] > 1]
    if dims:
        prod = prod.sum(dims, keepdim=True)
    return prod.reshape(out)


CASES = [
    # responsibilities (K, N, 1), precision (K, 1, D) broadcast over N, data (N, D) broadcast over K
    ((5, 7, 1), (5, 1, 3), (7, 3)),
    ((5, 7, 1), (1, 1, 1), (7, 3), (7, 3)),
    ((), (4,), (3, 4)),
    ((2, 1, 4), (1, 3, 1)),
    ((6,),),
    ((), ()),
]


@pytest.mark.parametrize("shapes", CASES)
def test_broadcast_sum_matches_materialised_sum(shapes):
    g = torch.Generator().manual_seed(len(shapes))
    operands = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    full = torch.broadcast_shapes(*(o.shape for o in operands))
    rank = len(full)
    # every "out" that keeps a subset of full's dimensions
    for keep in itertools.product([False, True], repeat=rank):
        out = torch.Size(n if k else 1 for n, k in zip(full, keep))
        got = broadcast_sum(operands, full, out)
        assert got.shape == out
        torch.testing.assert_close(got, _reference(operands, full, out), rtol=1e-12, atol=1e-12)


def test_broadcast_sum_over_a_dimension_no_operand_has():
    # the batch has N = 6 rows that no operand varies along: the sum counts each row
    w = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(2, 1)
    full = torch.Size([2, 6])
    assert float(broadcast_sum((w,), full)) == pytest.approx(6 * 3.0)
    torch.testing.assert_close(broadcast_sum((w,), full, torch.Size([2, 1])), 6 * w)
    torch.testing.assert_close(broadcast_sum((w,), full, full), w.expand(full))


def test_broadcast_sum_of_expanded_operands_and_gradients():
    # expanded (stride-0) views give the same value and the same gradients as materialised ones
    r = torch.rand(4, 9, 1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 2, dtype=torch.float64)
    lam = torch.rand(4, 1, 2, dtype=torch.float64, requires_grad=True)
    full = torch.Size([4, 9, 2])
    got = broadcast_sum((r, lam, y.expand(full), y.expand(full)), full)
    ref = (r * lam * y * y).sum()
    torch.testing.assert_close(got, ref)
    g_got = torch.autograd.grad(got, (r, lam))
    g_ref = torch.autograd.grad(ref, (r, lam))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_compact_keeps_values_and_broadcast_op_keeps_broadcasting():
    y = torch.randn(7, 3, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64).expand(5, 1, 3)
    z = broadcast_op(torch.sub, y, zero)
    assert z.shape == (5, 7, 3)
    assert z.stride()[0] == 0  # data not copied once per component
    torch.testing.assert_close(z, (y - torch.zeros(5, 1, 3, dtype=torch.float64)))
    c = compact(z)
    assert c.shape == (1, 7, 3)
    torch.testing.assert_close(c.expand(z.shape), z)
    probs = torch.ones(1, dtype=torch.float64).expand(4)  # a stride-0 category dimension is kept
    assert compact(probs, keep_last=1).shape == (4,)


@pytest.mark.parametrize("shapes", [((5, 1, 2), (7, 2), ()), ((3,), (1,), (4, 1)), ((0, 1), (1, 3))])
def test_fast_broadcast_shapes_equals_torch(shapes):
    from pyro_cavi.cavi.symbolic import broadcast_shapes

    assert broadcast_shapes(*map(torch.Size, shapes)) == torch.broadcast_shapes(*shapes)


def test_fast_broadcast_shapes_refuses_what_torch_refuses():
    from pyro_cavi.cavi.symbolic import broadcast_shapes

    with pytest.raises(RuntimeError):
        torch.broadcast_shapes((3, 2), (4, 2))
    with pytest.raises(RuntimeError, match=r"\(4, 2\)"):
        broadcast_shapes(torch.Size([3, 2]), torch.Size([4, 2]))


class _Blocks:
    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size


def _gaussian_moments(nb, ne, g):
    m = torch.randn(nb, ne, generator=g, dtype=torch.float64)
    a = torch.randn(nb, ne, ne, generator=g, dtype=torch.float64)
    cov = a @ a.mT + 0.1 * torch.eye(ne, dtype=torch.float64)
    return m, cov, cov + m.unsqueeze(-1) * m.unsqueeze(-2)


@pytest.mark.parametrize("order", ["aligned", "permuted"])
def test_block_indexed_products_keep_data_broadcast_and_exact_moments(order):
    """``X @ G.T`` (one block per row of G) and ``A[z] @ x`` (z over all experts, as under
    enumeration): the coefficients stay X's rows broadcast over the blocks (no (N, K, D) copy)
    and the mean, variance and weighted second moment equal the formulas written out here,
    whether the block of each entry is its position (``aligned``) or shuffled."""
    from pyro_cavi.cavi import expectations as ex
    from pyro_cavi.cavi.symbolic import Sym, identity_lin

    g = torch.Generator().manual_seed(3)
    N, D, K, h = 7, 4, 5, 2
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    G = Sym(torch.zeros(K, D, dtype=torch.float64), identity_lin("G", torch.Size([K, D]), 1, False, torch.float64, "cpu"))
    A = Sym(torch.zeros(K, h, D, dtype=torch.float64), identity_lin("A", torch.Size([K, h, D]), 1, False, torch.float64, "cpu"))
    perm = torch.arange(K) if order == "aligned" else torch.tensor([2, 0, 4, 1, 3])
    mG, cG, MG = _gaussian_moments(K, D, g)
    mA, cA, MA = _gaussian_moments(K * h, D, g)
    mu = {"G": (mG, MG), "A": (mA, MA)}
    factors = {"G": _Blocks(K, D), "A": _Blocks(K * h, D)}

    gate = X @ G.T  # (N, K)
    (coef, _), = gate._expr.terms.values()
    assert compact(coef).shape == (N, 1, D)  # X's rows, broadcast over the K blocks
    loc = (A[perm.reshape(K, 1)] @ X.unsqueeze(-1)).squeeze(-1)  # (K, N, h)
    (coef, _), = loc._expr.terms.values()
    assert compact(coef).numel() == N * D

    torch.testing.assert_close(ex.mean(gate, factors, mu), X @ mG.T)
    torch.testing.assert_close(ex.variance(gate, factors, mu), torch.einsum("nd,kde,ne->nk", X, cG, X))
    mA_k = mA.reshape(K, h, D)[perm]
    torch.testing.assert_close(ex.mean(loc, factors, mu), torch.einsum("khd,nd->knh", mA_k, X))
    cA_k = cA.reshape(K, h, D, D)[perm]
    var = torch.einsum("nd,khde,ne->knh", X, cA_k, X)
    torch.testing.assert_close(ex.variance(loc, factors, mu), var)
    w = torch.rand(K, N, 1, generator=g, dtype=torch.float64)  # responsibilities, broadcast over h
    expected = (w * (torch.einsum("khd,nd->knh", mA_k, X) ** 2 + var)).sum()
    torch.testing.assert_close(ex.weighted_second_moment(loc, w, factors, mu), expected)


@pytest.mark.parametrize("num_blocks, ne", [(3, 2), (3, 5), (3, 12), (2, 13)])
@pytest.mark.parametrize("batched", [False, True])
def test_blocked_quadratic_with_shared_rows_equals_the_sum_over_data(num_blocks, ne, batched):
    """:math:`\\sum_{n,b} w_{nb}\\, x_nᵀ \\Sigma_b x_n`, the gating layer's quadratic term
    (every block sees the same rows), by both of ``_blocked_quadratic``'s paths (the Gram
    matrices of all blocks as one product with the rows' outer products, chosen while
    these are at most 4x the gathered rows, and the batched ``Aᵀ W A`` beyond), one restart and
    three restarts under ``vmap``, against the sum written out."""
    from pyro_cavi.cavi.expectations import _blocked_quadratic

    g = torch.Generator().manual_seed(ne)
    n, R = 7, 3
    x = torch.randn(n, 1, ne, generator=g, dtype=torch.float64)
    idx = torch.arange(num_blocks).expand(n, num_blocks)
    shape = torch.Size((n, num_blocks))
    L = torch.randn(R, num_blocks, ne, ne, generator=g, dtype=torch.float64)
    cov = L @ L.mT
    w = torch.rand(R, n, num_blocks, generator=g, dtype=torch.float64)
    reference = torch.einsum("rnb,nbi,rbij,nbj->r", w, x.expand(n, num_blocks, ne), cov, x.expand(n, num_blocks, ne))
    if batched:
        got = torch.func.vmap(lambda w_, c_: _blocked_quadratic(x, idx, shape, shape, w_, c_, {}))(w, cov)
    else:
        got = torch.stack([_blocked_quadratic(x, idx, shape, shape, w[r], cov[r], {}) for r in range(R)])
    assert torch.allclose(got, reference, rtol=1e-12, atol=0)
