"""Stochastic CAVI (Hoffman et al. 2013): the same model code with a subsampled plate."""

import copy

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def _regression_data(N=4000, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(N, generator=g)
    return X, y


def regression(X, y, B=None, record=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
    with pyro.plate("data", X.shape[0], subsample_size=B) as idx:
        if record is not None:
            record.append(idx)
        pyro.sample("y", dist.Normal(X[idx] @ w, tau.rsqrt()), obs=y[idx])


def test_full_step_on_a_minibatch_is_the_rescaled_closed_form_update():
    """With rho = 1 (kappa = 0) a step sets q(w) to the exact conditional update computed from the
    minibatch with its likelihood scaled by N/B (written out here)."""
    X, y = _regression_data(N=1000)
    seen = []

    def model(X, y, B=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0], subsample_size=B) as idx:
            seen.append(idx)
            pyro.sample("y", dist.Normal(X[idx] @ w, 0.5), obs=y[idx])

    cavi = CAVI(model, seed=0, step_size=(1.0, 0.0))
    cavi.step(X, y, B=100)
    assert cavi.stochastic
    idx = seen[-1]
    Xb, yb, scale = X[idx], y[idx], 1000 / 100
    prec = torch.eye(3) + scale * Xb.T @ Xb / 0.25
    mean = torch.linalg.solve(prec, scale * Xb.T @ yb / 0.25)
    q = cavi.posterior["w"]
    assert torch.allclose(q.mean, mean, rtol=1e-10)
    assert torch.allclose(q.covariance_matrix, torch.linalg.inv(prec), rtol=1e-9)


def test_converges_to_the_full_batch_posterior():
    X, y = _regression_data()
    full = CAVI(regression)
    full.run(X, y, progress=False)
    st = CAVI(regression, seed=0)
    for _ in range(300):
        st.step(X, y, B=200)
    qf, qs = full.posterior, st.posterior
    assert torch.allclose(qs["w"].mean, qf["w"].mean, atol=0.01)
    assert float(qs["tau"].mean) == pytest.approx(float(qf["tau"].mean), rel=0.05)
    assert torch.allclose(qs["w"].stddev, qf["w"].stddev, rtol=0.1)


def test_minibatch_loss_is_an_unbiased_estimate_of_the_full_loss():
    X, y = _regression_data(N=2000)
    st = CAVI(regression, seed=0)
    for _ in range(20):
        st.step(X, y, B=100)
    full = CAVI(regression)
    full.step(X, y)
    full.factors = copy.deepcopy(st.factors)
    exact = full.evaluate_loss(X, y)
    estimates = torch.tensor([st.evaluate_loss(X, y, B=100) for _ in range(300)])
    se = estimates.std() / 300 ** 0.5
    assert abs(float(estimates.mean()) - exact) < 4 * float(se)


def test_mixture_with_local_responsibilities():
    g = torch.Generator().manual_seed(1)
    N, K = 3000, 3
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    Y = centres[torch.randint(0, K, (N,), generator=g)] + torch.randn(N, 2, generator=g)

    def gmm(Y, B=None):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(K)))
        with pyro.plate("comp", K):
            locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", N, subsample_size=B) as idx:
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=Y[idx])

    st = CAVI(gmm, seed=0)
    for _ in range(150):
        st.step(Y, B=200)
    q = st.posterior
    assert q["z"].probs.shape == (200, K)  # responsibilities of the last minibatch
    err = torch.cdist(q["locs"].mean, centres).min(1).values
    assert (err < 0.15).all()
    assert torch.allclose(q["w"].concentration.sum(), torch.tensor(N + 3.0), rtol=0.01)


def test_step_size_is_validated():
    with pytest.raises(ValueError, match="step_size"):
        CAVI(regression, step_size=(1.0, 2.0))
