"""Bilinear expressions (products of two latents) and the conditional mixture network."""

import pathlib
import sys

import pytest
import torch

import pyro
import pyro.distributions as dist
from conftest import fit

from pyro_cavi import CAVI
from pyro_cavi.cavi import expectations as ex
from pyro_cavi.cavi.symbolic import Bil, Sym, identity_lin

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import cmn  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


class _Blocks:
    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size


def test_bilinear_moments_against_monte_carlo():
    """E[psi] and E[psi²] for psi = [x, 1] @ [b, c]ᵀ + 0.3 sum(x), x and b independent Gaussians."""
    g = torch.Generator().manual_seed(0)
    N, H, J = 4, 3, 2
    x = Sym(torch.zeros(N, H), identity_lin("x", torch.Size([N, H]), 1, False, torch.float64, "cpu"))
    b = Sym(torch.zeros(J, H), identity_lin("b", torch.Size([J, H]), 1, False, torch.float64, "cpu"))
    c = torch.randn(J, 1, generator=g)
    psi = torch.cat([x, torch.ones(N, 1)], -1) @ torch.cat([b, c], -1).T + 0.3 * x.sum(-1, keepdim=True)
    assert isinstance(psi._expr, Bil) and psi.shape == (N, J)

    def moments(nb, ne):
        m = torch.randn(nb, ne, generator=g)
        a = torch.randn(nb, ne, ne, generator=g)
        return m, a @ a.mT + 0.1 * torch.eye(ne)

    mx, Cx = moments(N, H)
    mb, Cb = moments(J, H)
    mu = {"x": (mx, Cx + mx[..., None] * mx[..., None, :]), "b": (mb, Cb + mb[..., None] * mb[..., None, :])}
    factors = {"x": _Blocks(N, H), "b": _Blocks(J, H)}
    e1, e2 = ex.mean(psi, factors, mu), ex.second_moment(psi, factors, mu)
    S = 200_000
    xs = torch.distributions.MultivariateNormal(mx, Cx).sample((S,))
    bs = torch.distributions.MultivariateNormal(mb, Cb).sample((S,))
    vals = torch.cat([xs, torch.ones(S, N, 1)], -1) @ torch.cat([bs, c.expand(S, J, 1)], -1).mT + 0.3 * xs.sum(-1, keepdim=True)
    z1 = (e1 - vals.mean(0)) / (vals.std(0) / S ** 0.5)
    z2 = (e2 - (vals ** 2).mean(0)) / ((vals ** 2).std(0) / S ** 0.5)
    assert z1.abs().max() < 4.5 and z2.abs().max() < 4.5


def test_bilinear_regression_monotone_and_fixed_point():
    """y_n ~ N(u_n * v, 0.1) with local u_n and global v: the v update is a closed-form
    regression on E[u], E[u²] (checked against the formula written here)."""
    g = torch.Generator().manual_seed(1)
    n = 50
    y = 2.0 * torch.randn(n, generator=g) + 0.1 * torch.randn(n, generator=g)

    def model(y):
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(u * v, 0.1), obs=y)

    cavi = CAVI(model, seed=0)
    fit(cavi, y, num_steps=50, tol=0.0)
    with torch.no_grad():
        cavi._update("v")  # one more coordinate update of v given the current q(u)
    qu, qv = cavi.posterior["u"], cavi.posterior["v"]
    Eu, Eu2 = qu.mean, qu.variance + qu.mean ** 2
    prec = 1.0 + Eu2.sum() / 0.01
    assert float(qv.mean) == pytest.approx(float((Eu * y).sum() / 0.01 / prec), rel=1e-10)
    assert float(qv.variance) == pytest.approx(float(1 / prec), rel=1e-10)


def test_cmn_on_pinwheels_learns_and_elbo_never_decreases():
    X, y = cmn.pinwheels(60, seed=0)  # 300 points, 5 classes
    X = (X - X.mean(0)) / X.std(0)
    Xtr, ytr, Xte, yte = X[:150], y[:150], X[150:], y[150:]
    cavi = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=5), seed=1, init="forgy")
    losses = fit(cavi, Xtr, ytr, num_steps=60, tol=1e-8)
    assert losses[-1] < losses[0]
    p = cmn.predict_proba(cavi, Xte, num_samples=100)
    assert torch.allclose(p.sum(-1), torch.ones(len(yte)))
    accuracy = (p.argmax(-1) == yte).double().mean()
    assert accuracy > 0.45  # chance is 0.2
    assert "x1: Gaussian factor" in repr(cavi) and "y.omega: PolyaGamma" in repr(cavi)
