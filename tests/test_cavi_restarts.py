"""Batched restarts of CAVI (issue 4, item 6): R restarts swept together in one vectorised
sweep are R independent fits.

The reference in every test is R separate single fits, written here with the public ``step``
loop: one engine, re-initialised between fits (``_reset``) so that fit r starts from the
initialisation that restart r of ``run(num_restarts=R)`` draws (the engine's seeded generator
runs on from one initialisation to the next, as in a sequential run).
"""

import pathlib
import sys

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI, to_inference_data

from conftest import three_component_mixture

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

import cmn as cmn_model  # noqa: E402
import conjugate_zoo as zoo  # noqa: E402


def _moments(q):
    """What identifies a fitted factor: responsibilities, or mean and variance."""
    if isinstance(q, (dist.Categorical, dist.Bernoulli)):
        return (q.probs,)
    return q.mean, q.variance


def separate_fits(model, args, R, seed, num_steps, tol, **opts):
    """R single fits with the public step() loop and run()'s stopping rule."""
    engine = CAVI(model, seed=seed, **opts)
    fits = []
    for r in range(R):
        if r:
            engine._reset()  # next initialisation from the same generator, as restart r of run()
        trace = []
        for _ in range(num_steps):
            trace.append(-engine.step(*args))
            floor = max(tol, 8 * torch.finfo(engine.dtype).eps)
            if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= floor * max(1.0, abs(trace[-1])):
                break
        fits.append((trace, {k: _moments(q) for k, q in engine.posterior.items()}))
    return fits


def assert_same_fits(batched: CAVI, result, fits, rtol=1e-10, atol=1e-8):
    R = len(fits)
    assert len(result.restart_traces) == R and len(result.restart_elbos) == R
    for r, (trace, moments) in enumerate(fits):
        got = result.restart_traces[r]
        assert len(got) == len(trace), f"restart {r}: {len(got)} sweeps batched, {len(trace)} alone"
        for a, b in zip(got, trace):
            assert a == pytest.approx(b, rel=rtol, abs=1e-9)
        assert result.restart_elbos[r] == pytest.approx(trace[-1], rel=rtol)
        # each restart's ELBO never decreases
        assert all(b >= a - 1e-9 * abs(a) for a, b in zip(got, got[1:])), f"restart {r}: ELBO decreased"
        batched.select_restart(r)
        for name, values in moments.items():
            for x, y in zip(_moments(batched.posterior[name]), values):
                assert torch.allclose(x, y, rtol=1e-7, atol=atol), f"restart {r}, site {name!r}"


def _gmm_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0], [0.5, 1.0]], dtype=torch.float64)
    z = torch.randint(0, 4, (n,), generator=g)
    return centres[z] + torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_gaussian_mixture_batched_restarts_are_separate_fits():
    Y = _gmm_data()
    R, seed, steps, tol = 5, 3, 200, 1e-9
    fits = separate_fits(zoo.gaussian_mixture, (Y,), R, seed, steps, tol)
    cavi = CAVI(zoo.gaussian_mixture, seed=seed, num_restarts=R)  # batched by default
    result = cavi.run(Y, num_steps=steps, tol=tol, progress=False)
    lengths = [len(t) for t, _ in fits]
    assert len(set(lengths)) > 1, "restarts should stop at different sweeps for this test to bite"
    assert_same_fits(cavi, result, fits)
    # and the sequential run agrees with both
    seq = CAVI(zoo.gaussian_mixture, seed=seed, num_restarts=R, batch_restarts=False)
    res_seq = seq.run(Y, num_steps=steps, tol=tol, progress=False)
    assert_same_fits(seq, res_seq, fits)


def _four_clusters():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(25, generator=g, dtype=torch.float64) + c for c in (-9.0, -3.0, 3.0, 9.0)])


def test_best_restart_is_kept():
    """Three components for four clusters: restarts end in different optima."""
    Y = _four_clusters()
    R = 6
    cavi = CAVI(three_component_mixture, seed=0, num_restarts=R, init="forgy", batch_restarts=True)
    result = cavi.run(Y, num_steps=300, tol=1e-10, progress=False)
    elbos = result.restart_elbos
    best = max(range(R), key=lambda r: elbos[r])
    assert max(elbos) - min(elbos) > 1e-3, "the restarts should reach different optima"
    assert result.restart == best and result.elbo == elbos[best]
    assert result.elbo_trace == result.restart_traces[best] and cavi.elbo_trace == result.elbo_trace
    assert result.num_steps == len(result.elbo_trace)
    kept = {k: _moments(q) for k, q in cavi.posterior.items()}
    # the kept fit is the best restart's: its ELBO re-evaluated, and the same factors as select_restart(best)
    assert -cavi.evaluate_loss(Y) == pytest.approx(elbos[best], rel=1e-12)
    worst = min(range(R), key=lambda r: elbos[r])
    cavi.select_restart(worst)
    assert -cavi.evaluate_loss(Y) == pytest.approx(elbos[worst], rel=1e-12)
    assert f"ELBO {elbos[worst]:.6f}" in cavi.summary()
    cavi.select_restart(best)
    for name, values in kept.items():
        for x, y in zip(_moments(cavi.posterior[name]), values):
            assert torch.equal(x, y)
    # the engine goes on from the kept restart like a single fit
    before = cavi.elbo_trace[-1]
    assert -cavi.step(Y) >= before - 1e-9 * abs(before)
    idata = to_inference_data(cavi, three_component_mixture, Y, num_samples=20)
    assert idata.posterior["loc"].shape == (1, 20, 3)


def test_conditional_mixture_network_batched_restarts_are_separate_fits():
    """Polya-Gamma factors, stick-breaking gating and output, bilinear output logits."""
    torch.set_default_dtype(torch.float64)  # as models/cmn.py runs it (conftest restores it)
    X, y = cmn_model.pinwheels(12, seed=0)
    X = ((X - X.mean(0)) / X.std(0)).double()

    def model(X, y):
        return cmn_model.cmn(X, y, num_experts=3)

    R, seed, steps, tol = 3, 0, 12, 1e-12
    fits = separate_fits(model, (X, y), R, seed, steps, tol, init="forgy")
    cavi = CAVI(model, seed=seed, num_restarts=R, init="forgy")
    result = cavi.run(X, y, num_steps=steps, tol=tol, progress=False)
    assert {"y.omega", "z.omega"} <= set(cavi.factors)  # Polya-Gamma augmentation of output and gating
    assert len({round(t[-1], 6) for t, _ in fits}) == R, "different initialisations should give different fits"
    assert_same_fits(cavi, result, fits, atol=1e-7)


def _mixture_of_regressions(X, y, K=3):
    """Normal-Gamma experts: each expert's weights have prior precision scaled by its own noise precision."""
    with pyro.plate("experts", K):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), tau.rsqrt().unsqueeze(-1)).to_event(1))
    with pyro.plate("data", X.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.ones(K, dtype=X.dtype) / K))
        pyro.sample("y", dist.Normal((X * w[z]).sum(-1), tau[z].rsqrt()), obs=y)


@pytest.mark.parametrize("problem", ["regression", "joint", "poisson", "normal-gamma"])
def test_other_families_batched(problem):
    """Gaussian with a Gamma precision, a joint Gaussian group, Gamma-Gamma-Poisson, a joint
    Normal-Gamma factor (updated restart by restart) in a mixture of regressions."""
    g = torch.Generator().manual_seed(4)
    if problem == "normal-gamma":
        X = torch.stack([torch.ones(150, dtype=torch.float64), torch.randn(150, generator=g, dtype=torch.float64)], -1)
        k = torch.randint(0, 3, (150,), generator=g)
        y = (X * torch.tensor([[0.0, 2.0], [3.0, -1.0], [-3.0, 0.5]], dtype=torch.float64)[k]).sum(-1)
        y = y + 0.3 * torch.randn(150, generator=g, dtype=torch.float64)
        model, args, opts = _mixture_of_regressions, (X, y), {"joint": [("w", "tau")]}
    elif problem == "regression":
        X = torch.randn(200, 3, generator=g, dtype=torch.float64)
        y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
        model, args, opts = zoo.bayesian_regression, (X, y), {}
    elif problem == "joint":
        group = torch.randint(0, 8, (120,), generator=g)
        x = torch.randn(120, generator=g, dtype=torch.float64)
        yg = 1.0 + 2.0 * x + torch.randn(8, generator=g, dtype=torch.float64)[group] + 0.3 * torch.randn(120, generator=g, dtype=torch.float64)
        model, args, opts = zoo.random_intercepts, (x, group, yg), {"joint": [("b0", "b1", "u")]}
    else:
        exposure = torch.rand(20, generator=g, dtype=torch.float64) * 4 + 1
        counts = torch.poisson(3 * exposure, generator=g)
        model, args, opts = zoo.poisson_rates, (counts, exposure), {}
    fits = separate_fits(model, args, 3, 1, 60, 1e-11, **opts)
    cavi = CAVI(model, seed=1, num_restarts=3, **opts)
    result = cavi.run(*args, num_steps=60, tol=1e-11, progress=False)
    assert_same_fits(cavi, result, fits)


def test_restart_zero_continues_a_started_fit():
    """As in a sequential run, restart 0 goes on from the engine's current fit."""
    Y = _gmm_data()
    runs = []
    for batch in (True, False):
        cavi = CAVI(zoo.gaussian_mixture, seed=2, num_restarts=3, batch_restarts=batch)
        first = [-cavi.step(Y) for _ in range(3)]
        result = cavi.run(Y, num_steps=50, tol=1e-9, progress=False)
        assert result.restart_traces[0][:3] == first
        assert all(len(t) >= 2 for t in result.restart_traces[1:])
        runs.append(result)
    for a, b in zip(runs[0].restart_traces, runs[1].restart_traces):
        assert a == pytest.approx(b, rel=1e-10)


def _subsampled(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=20) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


def test_subsampled_model_runs_restarts_one_after_another():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 2, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    result = CAVI(_subsampled, num_restarts=2).run(X, y, num_steps=5, progress=False)
    assert len(result.restart_traces) == 2
    with pytest.raises(ValueError, match="subsampled plate.*batch_restarts=False"):
        CAVI(_subsampled, num_restarts=2, batch_restarts=True).run(X, y, num_steps=5, progress=False)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_num_restarts(bad):
    with pytest.raises(ValueError, match=f"num_restarts must be an integer >= 1, got {bad!r}"):
        CAVI(zoo.gaussian_mixture, num_restarts=bad)


def test_bad_batch_restarts_and_select_restart():
    with pytest.raises(ValueError, match="batch_restarts must be None, True or False, got 'yes'"):
        CAVI(zoo.gaussian_mixture, num_restarts=2, batch_restarts="yes")
    with pytest.raises(ValueError, match="batch_restarts=True cannot be combined with shard_plate"):
        CAVI(zoo.gaussian_mixture, num_restarts=2, batch_restarts=True, shard_plate="data")
    Y = _gmm_data(n=60)
    cavi = CAVI(zoo.gaussian_mixture, seed=0, num_restarts=2)
    with pytest.raises(RuntimeError, match="call run\\(\\) with num_restarts > 1 first"):
        cavi.select_restart(1)
    cavi.run(Y, num_steps=20, progress=False)
    for bad in (2, -1, 1.0):
        with pytest.raises(ValueError, match=f"restart must be an integer in \\[0, 2\\), got {bad!r}"):
            cavi.select_restart(bad)


def test_one_restart_through_the_batched_sweep_is_the_single_fit():
    Y = _gmm_data(n=120)
    single = CAVI(zoo.gaussian_mixture, seed=5)
    a = single.run(Y, num_steps=80, tol=1e-10, progress=False)
    batched = CAVI(zoo.gaussian_mixture, seed=5, batch_restarts=True)
    b = batched.run(Y, num_steps=80, tol=1e-10, progress=False)
    assert len(a.elbo_trace) == len(b.elbo_trace) and a.converged and b.converged
    assert b.elbo_trace == pytest.approx(a.elbo_trace, rel=1e-12)
    assert b.restart_elbos == pytest.approx(a.restart_elbos, rel=1e-12)
    for name in ("weights", "locs"):
        for x, y in zip(_moments(batched.posterior[name]), _moments(single.posterior[name])):
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-10)


def test_restarts_as_chains():
    Y = _four_clusters()
    cavi = CAVI(three_component_mixture, seed=0, num_restarts=4, init="forgy")
    result = cavi.run(Y, num_steps=300, tol=1e-10, progress=False)
    fits = cavi.restart_fits()
    assert [f.elbo_trace for f in fits] == result.restart_traces
    for r, f in enumerate(fits):
        assert -f.evaluate_loss(Y) == pytest.approx(result.restart_elbos[r], rel=1e-12)
    idata = to_inference_data(fits, three_component_mixture, Y, num_samples=30)
    assert idata.posterior["loc"].shape == (4, 30, 3)
    assert idata.attrs["chain_elbo"] == pytest.approx(result.restart_elbos)
    assert idata.attrs["best_chain"] == result.restart
    # the engine itself still holds the best restart
    assert cavi.elbo_trace == result.elbo_trace
    with pytest.raises(RuntimeError, match="call run\\(\\) with num_restarts > 1 first"):
        CAVI(three_component_mixture).restart_fits()
