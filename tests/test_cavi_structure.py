"""CAVI on model structure (plates, masks, dtypes, devices), its public API, and its errors."""

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import Predictive
from conftest import fit

from pyro_cavi import CAVI, NonConjugateError


def _normal_posterior(y, sigma=1.0, s0=2.0):
    prec = 1 / s0 ** 2 + len(y) / sigma ** 2
    return (y.sum() / sigma ** 2) / prec, prec ** -0.5


# ------------------------------------------------------------------ masks, plates, data
@pytest.mark.parametrize("how", ["poutine.mask", "dist.mask"])
def test_masked_observations_contribute_nothing(how):
    torch.set_default_dtype(torch.float64)
    y = torch.tensor([0.5, 1.5, -0.3, 100.0, 2.0])
    keep = torch.tensor([True, True, True, False, True])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            if how == "poutine.mask":
                with poutine.mask(mask=keep):
                    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
            else:
                pyro.sample("y", dist.Normal(mu, 1.0).mask(keep), obs=y)

    def subset_model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    a, b = CAVI(model), CAVI(subset_model)
    la, lb = fit(a, y), fit(b, y[keep])
    m, s = _normal_posterior(y[keep])
    assert float(a.posterior["mu"].mean) == pytest.approx(float(m), rel=1e-12)
    assert float(a.posterior["mu"].stddev) == pytest.approx(float(s), rel=1e-12)
    assert la[-1] == pytest.approx(lb[-1], rel=1e-12)


def test_nested_plates_and_to_event():
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    A, B, D = 3, 4, 2
    y = torch.randn(A, B, D, generator=g)

    def model(y):
        with pyro.plate("a", A, dim=-2):
            mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            with pyro.plate("b", B, dim=-1):
                pyro.sample("y", dist.Normal(mu, 0.5).to_event(1), obs=y)

    cavi = CAVI(model)
    fit(cavi, y, num_steps=10)
    q = cavi.posterior["mu"]
    assert isinstance(q, dist.MultivariateNormal) and q.batch_shape == (A, 1) and q.event_shape == (D,)
    prec = 1.0 + B / 0.25
    assert torch.allclose(q.mean[:, 0], (y.sum(1) / 0.25) / prec, rtol=1e-12)
    assert torch.allclose(q.covariance_matrix, torch.eye(D) / prec, rtol=1e-12)


def test_observed_site_that_is_a_deterministic_function_of_data():
    torch.set_default_dtype(torch.float64)
    raw = torch.tensor([1.0, 2.0, 4.0, 8.0])

    def model(raw):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(raw)):
            pyro.sample("logy", dist.Normal(mu, 1.0), obs=raw.log())

    cavi = CAVI(model)
    fit(cavi, raw)
    m, _ = _normal_posterior(raw.log())
    assert float(cavi.posterior["mu"].mean) == pytest.approx(float(m), rel=1e-12)


def test_float32_matches_float64():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(50, generator=g, dtype=torch.float64)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=X.dtype), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=X.dtype), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    c64, c32 = CAVI(model), CAVI(model)
    l64 = fit(c64, X, y, num_steps=30)
    l32 = fit(c32, X.float(), y.float(), num_steps=30, tol=1e-6)
    assert c32.posterior["w"].mean.dtype == torch.float32
    assert c64.posterior["w"].mean.dtype == torch.float64
    assert l32[-1] == pytest.approx(l64[-1], rel=1e-5)
    assert torch.allclose(c32.posterior["w"].mean.double(), c64.posterior["w"].mean, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_tensors():
    X = torch.randn(100, 3, device="cuda")
    y = X @ torch.tensor([1.0, -1.0, 0.5], device="cuda")

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, device="cuda"), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, device="cuda"), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    cavi = CAVI(model)
    fit(cavi, X, y, num_steps=20, tol=1e-6)
    assert cavi.posterior["w"].mean.device.type == "cuda"


# ------------------------------------------------------------------ API
def _regression():
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 2, generator=g)
    y = X @ torch.tensor([1.0, -2.0]) + 0.5 * torch.randn(30, generator=g)

    def model(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    return model, X, y


def test_run_stops_on_tolerance_and_reports(capsys):
    model, X, y = _regression()
    cavi = CAVI(model)
    result = cavi.run(X, y, num_steps=500, tol=1e-10, progress=True)
    assert result.converged and result.num_steps < 500
    t = result.elbo_trace
    assert abs(t[-1] - t[-2]) <= 1e-10 * abs(t[-1])
    assert result.elbo == t[-1] == pytest.approx(-cavi.evaluate_loss(X, y), rel=1e-12)
    assert "CAVI" in capsys.readouterr().err  # the tqdm bar
    text = repr(cavi)
    assert "w: Gaussian factor" in text and "loc of 'y' (Normal)" in text and "scale of 'y'" in text


def test_guide_works_with_predictive():
    model, X, y = _regression()
    cavi = CAVI(model)
    cavi.run(X, y, progress=False)
    samples = Predictive(model, guide=cavi.guide, num_samples=4000)(X)
    assert samples["w"].shape == (4000, 1, 2) and samples["y"].shape == (4000, 30)  # Pyro keeps a plate dim
    samples["w"] = samples["w"][:, 0]
    q = cavi.posterior["w"]
    assert torch.allclose(samples["w"].mean(0), q.mean, atol=4 * q.stddev.max() / 4000 ** 0.5 * 3)
    assert torch.allclose(samples["tau"].mean(), cavi.posterior["tau"].mean, rtol=0.05)


def test_evaluate_loss_does_not_update():
    model, X, y = _regression()
    cavi = CAVI(model)
    cavi.step(X, y)
    a = cavi.evaluate_loss(X, y)
    b = cavi.evaluate_loss(X, y)
    assert a == b
    assert cavi.step(X, y) <= a


# ------------------------------------------------------------------ errors
def _poisson_data():
    return torch.tensor([1.0, 3.0, 2.0])


def test_exp_of_gaussian_is_named():
    def model(y):
        log_rate = pyro.sample("log_rate", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(log_rate.exp()), obs=y)

    with pytest.raises(NonConjugateError, match=r"'log_rate'.*site 'y'.*rate of 'y' is exp\(\.\.\.\) of 'log_rate'"):
        CAVI(model).step(_poisson_data())


def test_exp_in_normal_scale_is_named():
    def model(y):
        log_sd = pyro.sample("log_sd", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, log_sd.exp()), obs=y)

    with pytest.raises(NonConjugateError, match=r"scale of 'y' is exp\(\.\.\.\) of 'log_sd'"):
        CAVI(model).step(_poisson_data())


def test_softmax_logits_suggest_stick_breaking():
    def model(y):
        logits = pyro.sample("logits", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    with pytest.raises(NonConjugateError, match=r"logits of 'y'.*StickBreakingCategorical"):
        CAVI(model).step(torch.tensor([0, 2, 1]))


def test_square_of_a_gaussian_latent_is_refused():
    def model(y):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(a * a, 1.0), obs=y)

    with pytest.raises(NonConjugateError, match=r"loc of 'y' is a product of the Gaussian latents 'a' and 'a'"):
        CAVI(model).step(_poisson_data())


def test_gamma_in_the_loc_is_refused():
    def model(y):
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(tau, 1.0), obs=y)

    with pytest.raises(NonConjugateError, match=r"'tau'.*loc of 'y'"):
        CAVI(model).step(_poisson_data())


def test_wrong_power_of_precision_is_refused():
    def model(y):
        tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, tau), obs=y)

    with pytest.raises(NonConjugateError, match=r"scale of 'y'.*Gamma latent 'tau'"):
        CAVI(model).step(_poisson_data())


def test_unsupported_prior_is_named():
    def model(y):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, s), obs=y)

    with pytest.raises(NonConjugateError, match=r"latent site 's' has a LogNormal prior"):
        CAVI(model).step(_poisson_data())


def test_control_flow_on_a_latent_is_refused():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        loc = mu if mu > 0 else -mu
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    with pytest.raises(NonConjugateError, match=r"'mu'.*Python"):
        CAVI(model).step(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_data_is_named(bad):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match=r"observed site 'y' contains 1 NaN or infinite"):
        CAVI(model).step(y)


def _logistic_counts(y, n, keep=None):
    X = torch.tensor([[1.0, 0.5], [1.0, -1.0], [1.0, 2.0], [1.0, 0.0]])

    def model(y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 4), poutine.mask(mask=True if keep is None else keep):
            pyro.sample("y", dist.Binomial(total_count=n, logits=X @ beta), obs=y)

    return model


@pytest.mark.parametrize("bad, shown", [(5.0, "5.0"), (-1.0, "-1.0"), (1.5, "1.5")])
def test_data_outside_the_support_is_named(bad, shown):
    torch.set_default_dtype(torch.float64)
    n = torch.tensor([3.0, 4.0, 2.0, 6.0])
    y = torch.tensor([1.0, 2.0, 0.0, 6.0])
    y[2] = bad
    with pytest.raises(ValueError, match=rf"observed site 'y': 1 value\(s\) outside the support of its Binomial, e\.g\. {shown} at index \(2,\) \(support IntegerInterval\(0, 2\.0\) at that index\)"):
        CAVI(_logistic_counts(y, n)).step(y)
    # masked out, the same value is ignored: the fit equals the fit without that datum
    keep = torch.tensor([True, True, False, True])
    masked = CAVI(_logistic_counts(y, n, keep))
    fit(masked, y)
    clean = CAVI(_logistic_counts(torch.where(keep, y, 0.0), n, keep))
    fit(clean, torch.where(keep, y, 0.0))
    torch.testing.assert_close(masked.posterior["beta"].mean, clean.posterior["beta"].mean)


@pytest.mark.parametrize("where", ["prior scale", "prior concentration", "total_count"])
def test_invalid_constant_parameters_are_named(where):
    """The model is traced with Pyro's validation off; constant parameters are still checked
    (before: a NaN or -inf ELBO, a misleading NonConjugateError, or a silent fit)."""
    y = torch.tensor([1.0, 2.0, 0.0])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 0.0 if where == "prior scale" else 1.0))
        tau = pyro.sample("tau", dist.Gamma(-1.0 if where == "prior concentration" else 1.0, 1.0))
        n = torch.tensor([3.0, 2.5 if where == "total_count" else 2.0, 4.0])
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(mu, tau.rsqrt()), obs=y)
            pyro.sample("y", dist.Binomial(total_count=n, logits=mu), obs=y)

    expected = {
        "prior scale": r"site 'mu': parameter 'scale' of its Normal has 1 value\(s\) outside GreaterThan\(lower_bound=0\.0\) \(e\.g\. 0\.0 at index \(\)\)",
        "prior concentration": r"site 'tau': parameter 'concentration' of its Gamma has 1 value\(s\) outside .* \(e\.g\. -1\.0 at index \(\)\)",
        "total_count": r"site 'y': parameter 'total_count' of its Binomial has 1 value\(s\) outside IntegerGreaterThan\(lower_bound=0\) \(e\.g\. 2\.5 at index \(1,\)\)",
    }[where]
    with pytest.raises(ValueError, match=expected):
        CAVI(model).step(y)


def test_indexing_a_discrete_latent_itself_is_explained():
    # z[group] indexes the enumerated dimension: before, a bare "IndexError: index 2 is out of
    # bounds for dimension 0 with size 2" from inside the model
    group = torch.arange(4).repeat_interleave(3)

    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 4):
            z = pyro.sample("z", dist.Bernoulli(0.5))
        with pyro.plate("data", 12):
            pyro.sample("y", dist.Normal(loc + z[group], 1.0), obs=y)

    with pytest.raises(NonConjugateError, match=r"IndexError: index 2 is out of bounds.*discrete latent site\(s\) \['z'\] held at their enumerated values \(shapes \[\(2, 1\)\]"):
        CAVI(model).step(torch.randn(12))


@pytest.mark.parametrize("likelihood", ["normal", "bernoulli"])
def test_obs_mask_latent_is_refused(likelihood):
    """pyro.sample(..., obs_mask=m) makes a latent site 'y_unobserved' masked by ~m. Before: for a
    Normal, a NonConjugateError about a non-positive-definite precision; for a Bernoulli, a fit
    whose ELBO could exceed the log evidence, which is at most 0 for binary data."""
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g)
    y = (X[:, 0] > 0).double() if likelihood == "bernoulli" else X[:, 0] + 1.0
    keep = torch.arange(20) % 4 != 0  # 5 missing entries, 15 masked-out elements of y_unobserved
    y = torch.where(keep, y, torch.tensor(float("nan")))

    def model(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 20):
            fn = dist.Bernoulli(logits=X @ w) if likelihood == "bernoulli" else dist.Normal(X @ w, 1.0)
            pyro.sample("y", fn, obs=y, obs_mask=keep)

    with pytest.raises(NonConjugateError, match=r"latent site 'y_unobserved' is masked \(the missing entries of pyro\.sample\('y', \.\.\., obs_mask=\.\.\.\)\): 15 of its elements"):
        CAVI(model).step(y)


def test_wrong_data_shape_is_named():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"observed site 'y'.*shape \(4,\)"):
        CAVI(model).step(torch.ones(4))


def test_improper_structure_is_reported_not_silently_wrong():
    def model(y):
        # a latent with no prior information and no data dependence through a conjugate path
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu ** 2, 1.0), obs=y)

    with pytest.raises(NonConjugateError, match=r"loc of 'y' is a power of the Gaussian latent 'mu'"):
        CAVI(model).step(_poisson_data())


def test_nan_under_a_mask_is_allowed_and_ignored():
    torch.set_default_dtype(torch.float64)
    y = torch.tensor([0.5, float("nan"), 1.5])
    keep = ~torch.isnan(y)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)), poutine.mask(mask=keep):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    cavi = CAVI(model)
    fit(cavi, y)
    m, s = _normal_posterior(y[keep])
    assert float(cavi.posterior["mu"].mean) == pytest.approx(float(m), rel=1e-12)


def test_subsample_scale_weights_the_likelihood():
    """poutine.scale multiplies a site's log density: scaling by 2 equals duplicating the data."""
    torch.set_default_dtype(torch.float64)
    y = torch.tensor([0.5, 1.0, 1.5])

    def scaled(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)), poutine.scale(scale=2.0):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    cavi = CAVI(scaled)
    fit(cavi, y)
    m, s = _normal_posterior(torch.cat([y, y]))
    assert float(cavi.posterior["mu"].mean) == pytest.approx(float(m), rel=1e-12)
    assert float(cavi.posterior["mu"].stddev) == pytest.approx(float(s), rel=1e-12)


@pytest.mark.parametrize("how", ["setitem", "add_", "numpy"])
def test_in_place_or_numpy_use_of_a_latent_is_refused(how):
    def model(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if how == "setitem":
            w[0] = 0.0
            loc = w.sum()
        elif how == "add_":
            w.add_(1.0)
            loc = w.sum()
        else:
            loc = torch.as_tensor(w.numpy().sum())
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    with pytest.raises(NonConjugateError, match="'w'"):
        CAVI(model).step(torch.tensor(0.5))
