r"""Matrix products of constant coefficients with restart-batched moments.

When restarts are swept together (:mod:`.restarts`), :math:`E_q[\log p]` is written for
one restart and vectorised with :func:`torch.func.vmap`. Its costly products contract a
constant (data) matrix :math:`A` with a moment :math:`X^{(r)}` of every restart
:math:`r`. Left to vmap's generic batching rule, :math:`A X^{(r)}` copies :math:`A` once
per restart and multiplies the blocks one restart at a time. Here the restarts are folded
into the columns instead,

.. math::
    [A X^{(1)}, \dots, A X^{(R)}] = A\, [X^{(1)}, \dots, X^{(R)}],

one matrix product whose operand :math:`A` is read once.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["const_matmul", "is_batched"]


def is_batched(t) -> bool:
    """Whether ``t`` varies over a dimension hidden by :func:`torch.func.vmap`."""
    return isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t)


class _ConstMatmul(torch.autograd.Function):
    """``a @ x`` for a constant ``a``, with a batching rule that folds vmap's dimension of
    ``x`` into its columns."""

    @staticmethod
    def forward(a: Tensor, x: Tensor) -> Tensor:
        return a @ x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.x_shape = inputs[1].shape

    @staticmethod
    def backward(ctx, grad: Tensor):
        (a,) = ctx.saved_tensors
        g = a.mT @ grad
        # sum over the dimensions along which x was broadcast
        shape = ctx.x_shape
        lead = g.dim() - len(shape)
        if lead:
            g = g.sum(tuple(range(lead)))
        dims = tuple(i for i, n in enumerate(shape[:-2]) if n == 1 and g.shape[i] != 1)
        return None, g.sum(dims, keepdim=True) if dims else g

    @staticmethod
    def vmap(info, in_dims, a: Tensor, x: Tensor):
        a_dim, x_dim = in_dims
        if a_dim is not None or x_dim is None:  # not the case this rule is for: plain batched product
            a = a.movedim(a_dim, 0) if a_dim is not None else a
            x = x.movedim(x_dim, 0) if x_dim is not None else x
            if a_dim is not None and x_dim is None:
                x = x.unsqueeze(0)
            if x_dim is not None and a_dim is None:
                a = a.unsqueeze(0)
            return a @ x, 0 if (a_dim is not None or x_dim is not None) else None
        x = x.movedim(x_dim, -2)  # (..., k, R, m)
        r, m = x.shape[-2], x.shape[-1]
        out = a @ x.reshape(x.shape[:-2] + (r * m,))
        return out.reshape(out.shape[:-1] + (r, m)).movedim(-2, 0), 0


def const_matmul(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` where ``a`` holds constants; inside :func:`torch.func.vmap` over ``x`` one
    product for every restart (plain ``a @ x`` otherwise)."""
    if is_batched(x) and not is_batched(a):
        return _ConstMatmul.apply(a, x)
    return a @ x
