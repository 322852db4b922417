"""Stochastic CAVI re-traces each minibatch against the cached structural analysis
(:func:`pyro_cavi.cavi.stochastic.rebind_minibatch`): the fits must equal those of a full
re-analysis on every minibatch, and any structural change must fall back to one."""

import pytest
import torch

import pyro
import pyro.distributions as dist

import pyro_cavi.cavi.cavi as cavi_module
from pyro_cavi import CAVI


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


N, D, K = 600, 3, 3


def _data(seed=0):
    g, f64 = torch.Generator().manual_seed(seed), torch.float64
    X = torch.randn(N, D, generator=g, dtype=f64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    y = X @ w + 0.5 * torch.randn(N, generator=g, dtype=f64)
    yb = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    centres = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -1.0]], dtype=f64)
    Y = centres[torch.randint(0, K, (N,), generator=g)] + torch.randn(N, D, generator=g, dtype=f64)
    return X, y, yb, Y


X, Y_LIN, Y_BIN, Y_MIX = _data()


def linear(idx):
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("y", dist.Normal(X[idx] @ w, tau.rsqrt()), obs=Y_LIN[idx])


def logistic(idx):
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=Y_BIN[idx])


def mixture(idx):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(K)))
    with pyro.plate("comp", K):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(D), 10.0).to_event(1))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=Y_MIX[idx])


def offsets(idx):
    """Two coupled local factors (a Gaussian offset and the Polya-Gamma variables)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", N, subsample=idx):
        u = pyro.sample("u", dist.Normal(0.0, 0.5))
        pyro.sample("y", dist.Bernoulli(logits=X[idx] @ w + u), obs=Y_BIN[idx])


def _batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N, generator=g)[:b] for b in sizes]


def _fit(model, batches, reuse, monkeypatch=None):
    calls = []
    if monkeypatch is not None:
        original = cavi_module.prior_structure

        def counting(*a, **k):
            calls.append(1)
            return original(*a, **k)

        monkeypatch.setattr(cavi_module, "prior_structure", counting)
    cavi = CAVI(model, seed=0, step_size=(1.0, 0.6))
    cavi.reuse_structure = reuse
    losses = [cavi.step(idx) for idx in batches]
    return cavi, losses, len(calls)


def _assert_same_fit(a, b, la, lb):
    assert torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=1e-12, atol=0)
    for name in a.factors:
        for x, y in zip(a.factors[name].mean_params, b.factors[name].mean_params):
            assert torch.allclose(x, y, rtol=1e-11, atol=1e-13), name


@pytest.mark.parametrize("model", [linear, logistic, mixture, offsets], ids=lambda m: m.__name__)
def test_reused_structure_equals_a_full_analysis_of_every_minibatch(model, monkeypatch):
    batches = _batches([50] * 15)
    fast, lf, fast_calls = _fit(model, batches, True, monkeypatch)
    slow, ls, slow_calls = _fit(model, batches, False, monkeypatch)
    assert fast.stochastic and slow.stochastic
    _assert_same_fit(fast, slow, lf, ls)
    # the full analysis ran once with reuse (the first minibatch), on every step without
    assert fast_calls == 1 and slow_calls == 15


def test_a_smaller_last_minibatch_falls_back_to_a_full_analysis(monkeypatch):
    batches = _batches([50, 50, 17, 50, 50])
    fast, lf, calls = _fit(mixture, batches, True, monkeypatch)
    slow, ls, _ = _fit(mixture, batches, False)
    _assert_same_fit(fast, slow, lf, ls)
    assert calls == 3  # the first batch, the batch of 17, and the next batch of 50
    assert fast.posterior["z"].probs.shape == (50, K)


def test_a_data_dependent_branch_is_detected():
    """The minibatch decides whether the offset 'b' enters the likelihood: the cached analysis
    of one minibatch does not hold for the other, so the structure is analysed again."""

    def branching(idx):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N, subsample=idx):
            loc = X[idx] @ w + (b if bool(idx[0] % 2) else 0.0)
            pyro.sample("y", dist.Normal(loc, 0.5), obs=Y_LIN[idx])

    odd = [i for i in _batches([40] * 40) if i[0] % 2][:3]
    even = [i for i in _batches([40] * 40) if not i[0] % 2][:3]
    batches = [odd[0], even[0], odd[1], even[1], odd[2], even[2]]
    fast, lf, _ = _fit(branching, batches, True)
    slow, ls, _ = _fit(branching, batches, False)
    _assert_same_fit(fast, slow, lf, ls)
    # 'b' is only updated by the odd batches: with kappa = 0.6 its precision moved off the prior
    assert float(fast.posterior["b"].stddev) < 0.5


def test_bad_data_in_a_later_minibatch_is_refused_naming_the_site():
    bad = Y_LIN.clone()
    bad[7] = float("nan")

    def model(idx):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", dist.Normal(X[idx] @ w, 0.5), obs=bad[idx])

    cavi = CAVI(model, seed=0)
    cavi.step(torch.arange(100, 150))
    with pytest.raises(ValueError, match="observed site 'y' contains 1 NaN"):
        cavi.step(torch.arange(0, 50))


def test_a_batch_of_every_row_is_full_cavi_exactly():
    """B = N (by subsample_size or by a subsample of every index) is ordinary CAVI: the same
    losses and posterior as the model without subsampling, to the last bit."""

    def model(B=None, idx=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", N, subsample_size=B, subsample=idx) as i:
            pyro.sample("y", dist.Normal(X[i] @ w, tau.rsqrt()), obs=Y_LIN[i])

    full = CAVI(model, seed=0)
    losses = [full.step() for _ in range(8)]
    for kwargs in ({"B": N}, {"idx": torch.arange(N)}):
        c = CAVI(model, seed=0)
        assert [c.step(**kwargs) for _ in range(8)] == losses
        assert not c.stochastic
        assert torch.equal(c.posterior["w"].mean, full.posterior["w"].mean)
        assert torch.equal(c.posterior["w"].covariance_matrix, full.posterior["w"].covariance_matrix)


def test_a_single_local_factor_is_exact_after_one_pass():
    """Why one pass over a lone local factor suffices: its update depends on the globals only,
    so with the globals fixed a second update changes nothing."""
    cavi = CAVI(mixture, seed=0)
    for idx in _batches([50] * 5):
        cavi.step(idx)
    cavi._update("z")  # fitted to the globals as they are after the last step
    before = cavi.factors["z"].probs.clone()
    cavi._update("z")
    assert torch.equal(cavi.factors["z"].probs, before)
