"""Joint discrete-Gaussian factors q(z) q(x | z): ``CAVI(model, joint=[("z", "x")])``.

With the globals fixed, q(z, x) = p(z, x | y) is in the family, so one update makes the ELBO
the log evidence; checked against the closed-form mixture posterior written here."""

import math
import sys
import pathlib

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import Predictive

from pyro_cavi import CAVI
from pyro_cavi.cavi.errors import NonConjugateError
from pyro_cavi.distributions import StickBreakingCategorical

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
import cmn  # noqa: E402

D64 = torch.float64


def _problem(event: bool, seed: int = 0, N: int = 9, K: int = 3, d: int = 2, p: int = 3):
    g = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(K, d, generator=g, dtype=D64)
    sig = torch.rand(K, d, generator=g, dtype=D64) + 0.4
    W = torch.randn(p, d, generator=g, dtype=D64)
    y = 2 * torch.randn(N, p, generator=g, dtype=D64)
    if not event:  # scalar x and y per datum
        mu, sig, W, y = mu[:, 0], sig[:, 0], W[0, 0], y[:, 0]
    return mu, sig, W, y


def _make_model(prior, mu, sig, W, s, event: bool):
    def model(y):
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", prior)
            if event:
                x = pyro.sample("x", dist.Normal(mu[z], sig[z]).to_event(1))
                pyro.sample("y", dist.Normal(x @ W.T, s).to_event(1), obs=y)
            else:
                x = pyro.sample("x", dist.Normal(mu[z], sig[z]))
                pyro.sample("y", dist.Normal(W * x, s), obs=y)
    return model


def _exact_posterior(log_pi, mu, sig, W, s, y, event: bool):
    """log p(y), p(z | y), E[x | z, y], Cov[x | z, y] of the linear-Gaussian mixture."""
    if not event:
        mu, sig, W, y = mu.unsqueeze(-1), sig.unsqueeze(-1), W.reshape(1, 1), y.unsqueeze(-1)
    p = W.shape[0]
    Sigma = torch.diag_embed(sig ** 2)  # (K, d, d)
    marg = W @ Sigma @ W.T + s ** 2 * torch.eye(p, dtype=D64)
    lp = dist.MultivariateNormal(mu @ W.T, marg).log_prob(y.unsqueeze(1)) + log_pi  # (N, K)
    log_ev = lp.logsumexp(-1).sum()
    r = (lp - lp.logsumexp(-1, keepdim=True)).exp()
    prec = torch.linalg.inv(Sigma) + W.T @ W / s ** 2  # (K, d, d)
    cov = torch.linalg.inv(prec)
    rhs = (mu / sig ** 2).unsqueeze(0) + (y @ W / s ** 2).unsqueeze(1)  # (N, K, d)
    mean = (cov.unsqueeze(0) @ rhs.unsqueeze(-1)).squeeze(-1)
    return log_ev, r, mean, cov


@pytest.mark.parametrize("event", [True, False])
@pytest.mark.parametrize("stick", [False, True])
def test_exact_posterior_with_fixed_globals(event, stick):
    mu, sig, W, y = _problem(event)
    K, s = mu.shape[0], 0.7
    if stick:
        logits = torch.tensor([0.3, -0.8], dtype=D64)
        prior = StickBreakingCategorical(logits)
        log_pi = prior.log_probs
    else:
        pi = torch.tensor([0.5, 0.3, 0.2], dtype=D64)
        prior, log_pi = dist.Categorical(pi), pi.log()
    model = _make_model(prior, mu, sig, W, s, event)
    cavi = CAVI(model, joint=[("z", "x")], seed=0)
    losses = [cavi.step(y) for _ in range(3)]
    log_ev, r, mean, cov = _exact_posterior(log_pi, mu, sig, W, s, y, event)
    # one update of the joint factor is the exact posterior: ELBO = log evidence
    for loss in losses:
        assert -loss == pytest.approx(float(log_ev), abs=1e-10, rel=1e-12)
    f = cavi.factors["z+x"]
    d = f.block_size
    assert torch.allclose(f.probs, r, atol=1e-12)
    assert torch.allclose(f.loc, mean.reshape(f.loc.shape), atol=1e-10)
    got_cov = f.scale_tril @ f.scale_tril.mT
    assert torch.allclose(got_cov, cov.reshape(1, K, d, d).expand_as(got_cov), atol=1e-12)
    # marginals: z Categorical(r), x the mixture
    q = cavi.posterior
    assert torch.allclose(q["z"].probs, r, atol=1e-12)
    mix_mean = (r.unsqueeze(-1) * mean).sum(-2)
    assert torch.allclose(q["x"].mean, mix_mean.reshape(q["x"].mean.shape), atol=1e-10)


def test_mean_field_is_below_the_evidence_and_structured_matches_it():
    """The same model, mean-field q(z) q(x): a strict lower bound (x's posterior depends on z)."""
    mu, sig, W, y = _problem(True)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=D64)
    model = _make_model(dist.Categorical(pi), mu, sig, W, 0.7, True)
    log_ev = float(_exact_posterior(pi.log(), mu, sig, W, 0.7, y, True)[0])
    mf = CAVI(model, seed=0)
    mf.run(y, num_steps=300, tol=1e-12, progress=False)
    st = CAVI(model, joint=[("z", "x")], seed=0)
    st.run(y, num_steps=5, progress=False)
    assert mf.elbo_trace[-1] < log_ev - 1e-3
    assert st.elbo_trace[-1] == pytest.approx(log_ev, abs=1e-10)


def _latent_means_model(sig, W, s, tau0):
    K, d = sig.shape

    def model(y):
        with pyro.plate("experts", K):
            mu = pyro.sample("mu", dist.Normal(torch.zeros(d, dtype=D64), tau0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.full((K,), 1.0 / K, dtype=D64)))
            x = pyro.sample("x", dist.Normal(mu[z], sig[z]).to_event(1))
            pyro.sample("y", dist.Normal(x @ W.T, s).to_event(1), obs=y)
    return model


def test_latent_global_monotone_and_weighted_update():
    _, sig, W, y = _problem(True, seed=1, N=30)
    tau0, s = 3.0, 0.5
    cavi = CAVI(_latent_means_model(sig, W, s, tau0), joint=[("z", "x")], seed=0)
    elbos = [-cavi.step(y) for _ in range(25)]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbos, elbos[1:]))
    assert elbos[-1] > elbos[0]
    # the update of mu from the structured factor, by hand: per expert k and coordinate j,
    # precision 1/tau0² + sum_n r_nk / sig_kj², mean = (sum_n r_nk m_nkj / sig_kj²) / precision
    f = cavi.factors["z+x"]
    r, m = f.probs, f.loc
    cavi._update("mu")
    prec = 1 / tau0 ** 2 + r.sum(0).unsqueeze(-1) / sig ** 2
    mean = (r.unsqueeze(-1) * m).sum(0) / sig ** 2 / prec
    q = cavi.factors["mu"]
    assert torch.allclose(q.loc, mean, atol=1e-10)
    assert torch.allclose(q.covariance, torch.diag_embed(1 / prec), atol=1e-12)
    # and it beats mean-field q(z) q(x) from the same initialisation
    mf = CAVI(_latent_means_model(sig, W, s, tau0), seed=0)
    mf_elbos = [-mf.step(y) for _ in range(25)]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(mf_elbos, mf_elbos[1:]))
    assert elbos[-1] > mf_elbos[-1]


def test_batched_restarts_match_sequential():
    _, sig, W, y = _problem(True, seed=2, N=20)
    model = _latent_means_model(sig, W, 0.5, 3.0)
    runs = []
    for batch in (True, False):
        cavi = CAVI(model, joint=[("z", "x")], seed=0, num_restarts=3, batch_restarts=batch)
        runs.append(cavi.run(y, num_steps=15, tol=0.0, progress=False))
    for a, b in zip(runs[0].restart_traces, runs[1].restart_traces):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-9, atol=1e-8)


def test_sampling_and_guide():
    mu, sig, W, y = _problem(True)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=D64)
    cavi = CAVI(_make_model(dist.Categorical(pi), mu, sig, W, 0.7, True), joint=[("z", "x")], seed=0)
    cavi.step(y)
    f = cavi.factors["z+x"]
    draws = cavi.sample_posterior(4000, ["z", "x"])
    assert draws["z"].shape == (4000, 9) and draws["x"].shape == (4000, 9, 2)
    # joint draws: x given z = k has mean m_k (checked for the most probable expert of datum 0)
    k = int(f.probs[0].argmax())
    sel = draws["z"][:, 0] == k
    se = (f.scale_tril[0, k].diagonal() / sel.sum().sqrt()).max()
    assert torch.allclose(draws["x"][sel, 0].mean(0), f.loc[0, k], atol=5 * float(se))
    pred = Predictive(cavi.model, guide=cavi.guide, num_samples=3, return_sites=["z", "x"])(y)
    assert pred["x"].shape[-2:] == (9, 2)


def _pinwheels():
    X, y = cmn.pinwheels(20, num_classes=3, seed=0)
    X = X.double()
    return (X - X.mean(0)) / X.std(0), y


def _cmn_model(X, y):
    return cmn.cmn(X, y, num_experts=4)


def test_cmn_structured_hidden_monotone():
    X, y = _pinwheels()
    engine = CAVI(_cmn_model, seed=0, init="forgy", joint=[("z", "x1")])
    elbos = [-engine.step(X, y) for _ in range(40)]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbos, elbos[1:]))
    assert elbos[-1] > elbos[0] + 1.0
    assert "joint discrete-Gaussian factor 'z+x1'" in engine.summary()
    # the model file's recipe
    fit = cmn.fit_cavi(X, y, num_experts=4, num_steps=3, structured_hidden=True)
    assert "z+x1" in fit.factors and "x1" not in fit.factors


def test_cmn_structured_contains_mean_field():
    """The mean-field fit q(z) q(x1) is a point of the structured family (q(x1 | z) the same for
    every z): evaluated there, the structured engine's ELBO is the mean-field ELBO, and its
    sweeps from there only raise it. (From the same cold start the two fits reach different
    local optima, either one higher.)"""
    import copy

    X, y = _pinwheels()
    mf = CAVI(_cmn_model, seed=0, init="forgy")
    mf.run(X, y, num_steps=60, tol=0.0, progress=False)
    st = CAVI(_cmn_model, seed=0, init="forgy", joint=[("z", "x1")])
    st.step(X, y)
    for name, f in mf.factors.items():
        if name not in ("z", "x1"):
            st.factors[name] = copy.deepcopy(f)
    g, qz, qx = st.factors["z+x1"], mf.factors["z"], mf.factors["x1"]
    K = g.num_categories
    g.set(qz.probs.clone(), qx.loc.unsqueeze(-2).expand(-1, K, -1).clone(),
          qx.scale_tril.unsqueeze(-3).expand(-1, K, -1, -1).clone())
    base = -mf.evaluate_loss(X, y)
    assert -st.evaluate_loss(X, y) == pytest.approx(base, abs=1e-8, rel=1e-12)
    elbos = [-st.step(X, y) for _ in range(20)]
    assert elbos[0] > base
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbos, elbos[1:]))
    # mean-field from the same point gains less: its sweeps keep q(x1) shared by the experts
    mf_more = [-mf.step(X, y) for _ in range(20)]
    assert elbos[-1] > mf_more[-1]


def test_errors_name_the_sites():
    def gamma_model(y):
        tau = pyro.sample("tau", dist.Gamma(2.0, 1.0).expand([y.shape[0]]).to_event(1))
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("y", dist.Normal(torch.tensor([-1.0, 1.0])[z], tau.rsqrt()), obs=y)

    y = torch.randn(5)
    with pytest.raises(ValueError, match=r"'z'.*'tau'.*Gamma"):
        CAVI(gamma_model, joint=[("z", "tau")]).step(y)

    def unindexed(y):  # z does not enter the prior of x
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(x + torch.tensor([-1.0, 1.0])[z], 1.0), obs=y)

    with pytest.raises(ValueError, match=r"prior of 'x' does not depend on 'z'"):
        CAVI(unindexed, joint=[("z", "x")]).step(y)

    def shared_x(y):  # one x for all data: not one z per block of x
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("y", dist.Normal(x + torch.tensor([-1.0, 1.0])[z], 1.0), obs=y)

    with pytest.raises(ValueError, match=r"'z' must have one element per block of 'x'"):
        CAVI(shared_x, joint=[("z", "x")]).step(y)

    def subsampled(y):
        with pyro.plate("data", y.shape[0], subsample_size=3) as idx:
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            x = pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0))
            pyro.sample("y", dist.Normal(x, 1.0), obs=y[idx])

    with pytest.raises(NotImplementedError, match=r"z\+x.*stochastic"):
        CAVI(subsampled, joint=[("z", "x")]).step(y)

    def coupled(y):  # a term reads every block of x at once
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            x = pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0))
        pyro.sample("total", dist.Normal(x.sum(), 1.0), obs=y.sum())

    with pytest.raises(NonConjugateError, match=r"couples different blocks of 'x'.*'z\+x'"):
        CAVI(coupled, joint=[("z", "x")]).step(y)


def test_factor_natural_parameters_round_trip():
    """``update(natural())`` reproduces the factor: the log-partition in the responsibilities and
    the Gaussian part agree (float64; blocks of size 1 and 3)."""
    from pyro_cavi.cavi.categorical_gaussian import CategoricalGaussianFactor

    g = torch.Generator().manual_seed(0)
    for d in (1, 3):
        f = CategoricalGaussianFactor("z+x", 5, 4, d, D64, "cpu")
        probs = torch.softmax(torch.randn(5, 4, generator=g, dtype=D64), -1)
        A = torch.randn(5, 4, d, d, generator=g, dtype=D64)
        tril = torch.linalg.cholesky(A @ A.mT + 0.5 * torch.eye(d, dtype=D64))
        f.set(probs, torch.randn(5, 4, d, generator=g, dtype=D64), tril)
        probs, loc, cov = f.probs.clone(), f.loc.clone(), f.scale_tril @ f.scale_tril.mT
        h = f.entropy()
        f.update(f.natural())
        assert torch.allclose(f.probs, probs, atol=1e-12)
        assert torch.allclose(f.loc, loc, atol=1e-10)
        assert torch.allclose(f.scale_tril @ f.scale_tril.mT, cov, atol=1e-10)
        # entropy: H[r] + sum_k r_k H[N(m_k, S_k)]
        ref = dist.Categorical(probs=probs).entropy().sum() + (
            probs * dist.MultivariateNormal(loc, cov).entropy()).sum()
        assert float(h) == pytest.approx(float(ref), rel=1e-12)
