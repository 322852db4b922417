"""Adaptive over-relaxed sweeps (``CAVI(model, overrelax=γ)``, Salakhutdinov & Roweis 2003):
sweep by sweep the ELBO never decreases and is never below the ordinary sweep's from the same
factors (checked against an ordinary sweep run from a copy of the factors), invalid
extrapolations fall back to the ordinary sweep, conjugate fits still reach the closed-form
posterior, the default is untouched, and unsupported combinations are refused."""

import copy
import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from conftest import fit, gaussian_mixture
from pyro_cavi import CAVI
from models import cmn


def _ordinary_elbo_from_here(cavi, *args, factors_out=None) -> float:
    """ELBO after one ordinary sweep from ``cavi``'s current factors (and the factors, into
    ``factors_out``); leaves ``cavi`` as it was."""
    factors, trace, growth = copy.deepcopy(cavi.factors), list(cavi.elbo_trace), cavi.overrelax
    cavi.overrelax = None
    elbo = -cavi.step(*args)
    if factors_out is not None:
        factors_out.update(cavi.factors)
    cavi.overrelax, cavi.factors, cavi.elbo_trace = growth, factors, trace
    return elbo


def _check_invariant(cavi, *args, num_sweeps: int):
    cavi.step(*args)  # traces the model and initialises
    prev = cavi.elbo_trace[-1]
    for _ in range(num_sweeps):
        ordinary = _ordinary_elbo_from_here(cavi, *args)
        elbo = -cavi.step(*args)
        # (at convergence a sweep can move the float64 ELBO by one rounding step either way)
        assert elbo >= ordinary - 1e-12 * abs(ordinary), (elbo, ordinary)
        assert elbo >= prev - 1e-12 * abs(prev)
        prev = elbo
    kept = [a for a in cavi.overrelax_trace if a > 1]
    assert kept, "no extrapolated step was ever kept: the test would not exercise over-relaxation"
    return cavi


def test_cmn_pinwheels_elbo_never_below_ordinary_sweep():
    X, y = cmn.pinwheels(30, num_classes=3, seed=0)
    X = X.double()
    cavi = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=4), seed=0, init="forgy", overrelax=1.2)
    _check_invariant(cavi, X, y, num_sweeps=40)
    # the extrapolated steps grew past 1.2 (several kept in a row)
    assert max(cavi.overrelax_trace) > 1.2 ** 2


def test_gaussian_mixture_elbo_never_below_ordinary_sweep():
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.randn(40, generator=g) - 3, torch.randn(40, generator=g) + 0.5, torch.randn(40, generator=g) + 4])
    y = y.double()
    _check_invariant(CAVI(gaussian_mixture(3), seed=1, overrelax=1.1), y, num_sweeps=30)


def test_invalid_extrapolation_falls_back_to_the_ordinary_sweep():
    """A huge step makes the extrapolated Gamma rate / Gaussian precision invalid: the sweep must be
    the ordinary one, and the step resets to 1."""
    g = torch.Generator().manual_seed(0)
    y = (1.0 + 0.5 * torch.randn(30, generator=g)).double()

    def model(y):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=y.dtype), 1.0))
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 3.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)

    cavi = CAVI(model, seed=0, overrelax=1.1)
    cavi.step(y)
    cavi._alpha = 1e6
    swept = {}
    ordinary = _ordinary_elbo_from_here(cavi, y, factors_out=swept)
    elbo = -cavi.step(y)
    assert elbo == ordinary
    assert torch.equal(cavi.factors["tau"].rate, swept["tau"].rate)
    assert torch.equal(cavi.factors["mu"].loc, swept["mu"].loc)
    assert cavi._alpha == 1.0 and cavi.overrelax_trace[-1] == -1e6
    # and the fit carries on to the same fixed point as ordinary sweeps
    fit(cavi, y, num_steps=200, tol=1e-14)
    plain = CAVI(model, seed=0)
    fit(plain, y, num_steps=400, tol=1e-14)
    assert float(cavi.posterior["mu"].mean) == pytest.approx(float(plain.posterior["mu"].mean), rel=1e-8)
    assert float(cavi.posterior["tau"].rate) == pytest.approx(float(plain.posterior["tau"].rate), rel=1e-8)


def test_mean_field_gaussian_reaches_exact_means_in_fewer_sweeps():
    """Mean-field CAVI on a Gaussian posterior converges to the exact means (a closed-form
    property); over-relaxed sweeps reach the same point, with fewer sweeps."""
    g = torch.Generator().manual_seed(1)
    n, G, sigma = 60, 4, 0.5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    group = torch.randint(0, G, (n,), generator=g)
    y = 1.0 + 2.0 * x + torch.randn(G, generator=g, dtype=torch.float64)[group] + sigma * torch.randn(n, generator=g, dtype=torch.float64)

    def model(x, group, y):
        b0 = pyro.sample("b0", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 3.0))
        b1 = pyro.sample("b1", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 3.0))
        with pyro.plate("groups", G):
            u = pyro.sample("u", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(b0 + b1 * x + u[group], sigma), obs=y)

    Z = torch.cat([torch.ones(n, 1, dtype=torch.float64), x[:, None], torch.nn.functional.one_hot(group, G).double()], 1)
    prior_prec = torch.diag(torch.tensor([1 / 9, 1 / 9] + [1.0] * G, dtype=torch.float64))
    prec = prior_prec + Z.T @ Z / sigma ** 2
    mean = torch.linalg.solve(prec, Z.T @ y / sigma ** 2)
    sweeps = {}
    for growth in (None, 1.1):
        cavi = CAVI(model, overrelax=growth)
        sweeps[growth] = len(fit(cavi, x, group, y, num_steps=3000, tol=1e-15))
        q = cavi.posterior
        fitted = torch.cat([q["b0"].mean[None], q["b1"].mean[None], q["u"].mean])
        assert torch.allclose(fitted, mean, atol=1e-6)
        assert torch.allclose(q["u"].variance, 1 / prec.diagonal()[2:], rtol=1e-10)
    assert sweeps[1.1] < sweeps[None]


def test_normal_gamma_regression_stays_exact():
    """Normal-Gamma regression with a joint factor: one sweep is exact; over-relaxation must not
    move it off the closed-form posterior (log evidence)."""
    g = torch.Generator().manual_seed(1)
    N, D = 60, 3
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    lam0, a0, b0 = 0.5, 2.0, 1.5

    def model(X, y):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(a0, dtype=X.dtype), b0))
        w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=X.dtype), (lam0 * tau).rsqrt()).to_event(1))
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    L0 = lam0 * torch.eye(D, dtype=torch.float64)
    Ln = L0 + X.T @ X
    mn = torch.linalg.solve(Ln, X.T @ y)
    an = a0 + N / 2
    bn = b0 + 0.5 * float(y @ y - mn @ Ln @ mn)
    log_evidence = (math.lgamma(an) - math.lgamma(a0) + a0 * math.log(b0) - an * math.log(bn)
                    + 0.5 * float(torch.logdet(L0) - torch.logdet(Ln)) - 0.5 * N * math.log(2 * math.pi))
    cavi = CAVI(model, joint=[("w", "tau")], seed=0, overrelax=1.5)
    trace = [-l for l in fit(cavi, X, y, num_steps=10)]
    assert trace[-1] == pytest.approx(float(log_evidence), abs=1e-8)
    assert torch.allclose(cavi.factors["w+tau"].loc[0], mn, rtol=1e-9)
    assert float(cavi.factors["w+tau"].rate[0]) == pytest.approx(bn, rel=1e-9)


def test_default_sweeps_unchanged():
    """``overrelax=None`` is the ordinary sweep: the same trace as updating every factor by hand."""
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.randn(30, generator=g) - 3, torch.randn(30, generator=g) + 3]).double()
    a = CAVI(gaussian_mixture(2), seed=4)
    b = CAVI(gaussian_mixture(2), seed=4)
    a.step(y), b.step(y)
    for _ in range(10):
        a.step(y)
        b._sweep()
        b.elbo_trace.append(float(b._elbo()))
    assert a.elbo_trace == b.elbo_trace and a.overrelax_trace == []


def test_sequential_restarts_and_refusals():
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.randn(30, generator=g) - 3, torch.randn(30, generator=g) + 3]).double()
    model = gaussian_mixture(2)
    for bad in (1.0, 0.9, True, float("inf"), "1.1"):
        with pytest.raises(ValueError, match="overrelax must be None"):
            CAVI(model, overrelax=bad)
    with pytest.raises(ValueError, match="batch_restarts=True"):
        CAVI(model, overrelax=1.1, num_restarts=2, batch_restarts=True)
    with pytest.raises(ValueError, match="shard_plate"):
        CAVI(model, overrelax=1.1, shard_plate="data")
    with pytest.raises(ValueError, match="batch_restarts=False"):
        CAVI(model, overrelax=1.1, num_restarts=2).run(y, progress=False)
    cavi = CAVI(model, overrelax=1.1, num_restarts=3, batch_restarts=False, seed=0)
    result = cavi.run(y, num_steps=200, tol=1e-10, progress=False)
    assert result.elbo == max(result.restart_elbos)
    for trace in result.restart_traces:
        assert all(b >= a for a, b in zip(trace, trace[1:]))


def test_subsampled_plate_is_refused():
    y = torch.randn(40, dtype=torch.float64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 3.0))
        with pyro.plate("data", len(y), subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match="subsampled plate"):
        CAVI(model, overrelax=1.1).step(y)
