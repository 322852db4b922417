"""
NG-HVI vs SG-HVI vs Pyro SVI (AutoLowRankMultivariateNormal over theta and z, Adam) vs MCMC on
the mixed models of Zhang et al. (2023), arXiv:2302.13536 (models/mixed.py):

- ``lmm``: linear random intercept, Example 1 (1000 groups x 10 rows, half for training),
  reference: an exact blocked Gibbs sampler;
- ``logistic``: logistic random intercept (same design), reference: a Polya-Gamma Gibbs sampler;
- ``deep``: deep mixed model, Example 2a (1000 groups x 10 rows, 60% training, layers [5, 5]),
  no MCMC reference.

Reports, per model: iterations and seconds until the smoothed ELBO is within 1 nat of its
plateau, mean seconds per step, posterior means/sds of the global parameters against MCMC, and
test-set R^2 / log score; writes ELBO trace plots to benchmarks/results/nghvi_<model>*.png.
Every variational method's final parameters are the average of its iterates over the last 10%
of steps (the authors average the last 100), in the coordinates (mu, B, |d|) of the low-rank
Gaussian.

    python benchmarks/nghvi_mixed.py [--models lmm logistic deep] [--sigma2-a 1.0] [--steps 3000]

The default runs the linear model only (a few minutes); benchmarks/results/nghvi.md lists the
commands behind the reported numbers.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from torch.distributions import transform_to
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, init_to_feasible, init_to_value
from pyro.optim import Adam

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.mixed import (  # noqa: E402
    deep_mixed_globals,
    deep_mixed_model,
    linear_random_intercept,
    logistic_random_intercept,
    relu_features,
    simulate_deep_mixed,
    simulate_linear_random_intercept,
    simulate_logistic_random_intercept,
)
from pyro_cavi.nghvi import GaussianConditional, HybridELBO, HybridGuide, NGHVIOptim, PolyaGammaGibbs, SGHVIOptim  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GLOBALS = {
    "lmm": ["beta", "sigma2_a", "sigma2_e"],
    "logistic": ["beta", "sigma2_a"],
    "deep": ["beta", "tau2", "sigma2_e"],
}
MODEL_FNS = {"lmm": linear_random_intercept, "logistic": logistic_random_intercept, "deep": deep_mixed_model}


def _args(d):
    return (d["X"], d["group"], d["num_groups"], d["y"])


# ---- exact references ------------------------------------------------------------------------
def _inv_gamma(shape, rate, g):
    return rate / torch._standard_gamma(torch.tensor(float(shape), dtype=torch.float64)).item()


def gibbs_lmm(X, group, G, y, num_samples, burn_in, seed=0):
    """Blocked Gibbs sampler for the linear random-intercept model (exact full conditionals)."""
    torch.manual_seed(seed)
    X, y = X.double(), y.double()
    n, k = X.shape
    n_i = torch.bincount(group, minlength=G).double()
    XtX = X.T @ X
    beta, alpha, s2a, s2e = torch.zeros(k, dtype=torch.float64), torch.zeros(G, dtype=torch.float64), 1.0, 1.0
    out = {"beta": [], "sigma2_a": [], "sigma2_e": [], "alpha": []}
    for it in range(num_samples + burn_in):
        chol = torch.linalg.cholesky(XtX / s2e + torch.eye(k, dtype=torch.float64) / 100.0)
        mean = torch.cholesky_solve((X.T @ (y - alpha[group]) / s2e).unsqueeze(-1), chol).squeeze(-1)
        beta = mean + torch.linalg.solve_triangular(chol.T, torch.randn(k, 1, dtype=torch.float64), upper=True).squeeze(-1)
        resid = y - X @ beta
        var = 1.0 / (n_i / s2e + 1.0 / s2a)
        alpha = var * torch.zeros(G, dtype=torch.float64).index_add_(0, group, resid) / s2e + var.sqrt() * torch.randn(G, dtype=torch.float64)
        s2a = _inv_gamma(1.01 + G / 2, 1.01 + 0.5 * alpha.pow(2).sum().item(), None)
        s2e = _inv_gamma(1.01 + n / 2, 1.01 + 0.5 * (resid - alpha[group]).pow(2).sum().item(), None)
        if it >= burn_in:
            for name, v in (("beta", beta), ("sigma2_a", s2a), ("sigma2_e", s2e), ("alpha", alpha)):
                out[name].append(torch.as_tensor(v, dtype=torch.float64))
    return {k: torch.stack(v).float() for k, v in out.items()}


def gibbs_logistic(X, group, G, y, num_samples, burn_in, seed=0):
    """Polya-Gamma Gibbs sampler for the logistic random-intercept model (Polson et al. 2013)."""
    from polyagamma import random_polyagamma

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X, y = X.double(), y.double()
    n, k = X.shape
    kappa = y - 0.5
    beta, alpha, s2a = torch.zeros(k, dtype=torch.float64), torch.zeros(G, dtype=torch.float64), 1.0
    out = {"beta": [], "sigma2_a": [], "alpha": []}
    for it in range(num_samples + burn_in):
        eta = X @ beta + alpha[group]
        omega = torch.as_tensor(random_polyagamma(1.0, eta.numpy(), random_state=rng))
        prec = X.T @ (omega.unsqueeze(-1) * X) + torch.eye(k, dtype=torch.float64) / 100.0
        chol = torch.linalg.cholesky(prec)
        rhs = X.T @ (kappa - omega * alpha[group])
        beta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        beta = beta + torch.linalg.solve_triangular(chol.T, torch.randn(k, 1, dtype=torch.float64), upper=True).squeeze(-1)
        prec_a = torch.zeros(G, dtype=torch.float64).index_add_(0, group, omega) + 1.0 / s2a
        rhs_a = torch.zeros(G, dtype=torch.float64).index_add_(0, group, kappa - omega * (X @ beta))
        alpha = rhs_a / prec_a + torch.randn(G, dtype=torch.float64) / prec_a.sqrt()
        s2a = _inv_gamma(1.01 + G / 2, 1.01 + 0.5 * alpha.pow(2).sum().item(), None)
        if it >= burn_in:
            for name, v in (("beta", beta), ("sigma2_a", s2a), ("alpha", alpha)):
                out[name].append(torch.as_tensor(v, dtype=torch.float64))
    return {k: torch.stack(v).float() for k, v in out.items()}


def deep_mixed_collapsed(X, group, num_groups, y, hidden=(5, 5)):
    """The deep mixed model with the random effects integrated out: per group,
    ``y_i ~ N(Z_i beta, Z_i diag(tau2) Z_i^T + sigma2_e I)`` (``Z_i`` the ReLU features of the
    group's rows).  Same priors as ``models.mixed.deep_mixed_model``; needs equal group sizes
    with rows sorted by group."""
    counts = torch.bincount(group, minlength=num_groups)
    n_i = int(counts[0])
    if not bool((counts == n_i).all()) or not bool((group == torch.arange(num_groups).repeat_interleave(n_i)).all()):
        raise ValueError("deep_mixed_collapsed needs equal group sizes with rows sorted by group")
    weights, beta, tau2, sigma2_e = deep_mixed_globals(X, hidden)
    r = beta.shape[-1]
    Z = relu_features(X, weights).reshape(num_groups, n_i, r)
    cov = (Z * tau2) @ Z.transpose(-1, -2) + sigma2_e * torch.eye(n_i, dtype=X.dtype)
    with pyro.plate("groups", num_groups):
        pyro.sample("y", dist.MultivariateNormal(Z @ beta, covariance_matrix=cov), obs=y.reshape(num_groups, n_i))


def nuts_deep(args, init_values, num_samples, warmup, seed=0, max_tree_depth=7):
    """NUTS on the collapsed deep mixed model (73 parameters) started at ``init_values``; the
    random effects are then drawn from their exact conditional given each draw.  The posterior
    is multimodal (permutations and rescalings of hidden units), so a chain describes one mode."""
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    kernel = NUTS(
        deep_mixed_collapsed, init_strategy=init_to_value(values=init_values), max_tree_depth=max_tree_depth,
        jit_compile=True, ignore_jit_warnings=True,
    )
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(*args)
    return {k: v.detach() for k, v in mcmc.get_samples().items()}


def with_locals(samples, args):
    """Add ``alpha`` drawn from its exact conditional given each NUTS draw of theta."""
    num_samples = len(samples["sigma2_e"])
    alphas = []
    cond = GaussianConditional("alpha")
    for i in range(num_samples):
        theta = {k: v[i] for k, v in samples.items()}
        alphas.append(cond(deep_mixed_model, theta, *args)["alpha"])
    samples["alpha"] = torch.stack(alphas)
    return samples


def logistic_marginal_elbo(global_guide, args, num_draws=4, nodes=48):
    """ELBO of q(theta) with alpha integrated out by Gauss-Hermite quadrature (per group)."""
    X, group, G, y = args
    x, w = np.polynomial.hermite.hermgauss(nodes)
    x, logw = torch.tensor(x, dtype=torch.float32), torch.tensor(np.log(w) - 0.5 * np.log(np.pi), dtype=torch.float32)
    values = []
    with torch.no_grad():
        for _ in range(num_draws):
            tr = poutine.trace(global_guide).get_trace(*args)
            beta, s2a = tr.nodes["beta"]["value"], tr.nodes["sigma2_a"]["value"]
            eta = (X @ beta).unsqueeze(-1) + (2 * s2a).sqrt() * x
            ll = y.unsqueeze(-1) * eta - torch.nn.functional.softplus(eta)
            per_group = torch.zeros(G, nodes).index_add_(0, group, ll)
            log_lik = torch.logsumexp(per_group + logw, -1).sum()
            log_prior = dist.Normal(0.0, 10.0).log_prob(beta).sum() + dist.InverseGamma(1.01, 1.01).log_prob(s2a)
            values.append(float(log_lik + log_prior - tr.log_prob_sum()))
    return sum(values) / len(values)


# ---- fitting ---------------------------------------------------------------------------------
def _conditional(name):
    return PolyaGammaGibbs("alpha") if name == "logistic" else GaussianConditional("alpha")


def _init_to_unconstrained(value):
    """Every site at ``value`` in unconstrained space."""

    def init(site):
        fn = site["fn"]
        return transform_to(fn.support)(torch.full(fn.shape(), value))

    return init


def _init_loc_fn(name, seed):
    """The linear and logistic models start at mu = 0.01 in unconstrained space (beta, log
    sigma2), as the authors' code (``Hybrid_LMM_initialize.m``).  For the deep model, zero network
    weights give zero ReLU features and no gradient: start them at random values (as the authors'
    code does); everything else at the unconstrained origin."""
    if name != "deep":
        return _init_to_unconstrained(0.01)
    g = torch.Generator().manual_seed(seed)
    values = {"W1": 0.5 * torch.randn(5, 6, generator=g), "W2": 0.5 * torch.randn(5, 6, generator=g)}
    return init_to_value(values=values, fallback=init_to_feasible)


def fit(name, method, args, steps, seed, eval_every, path_gradient=True, init="paper", rank=3, record=None, num_particles=1,
        covariance_gradient="reparameterization"):
    """Returns (guide, iterations, elbo trace, per-step seconds).  With a list ``record``, the
    coordinates of every iterate in the averaging window (``_averaged_coordinates``) are appended
    to it (used by ``nghvi_posterior_sd.py``).  ``covariance_gradient``: HybridELBO's estimator
    ("reparameterization", the authors', or "stein")."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = MODEL_FNS[name]
    init_loc = _init_loc_fn(name, seed)
    if method == "Pyro SVI":
        guide = AutoLowRankMultivariateNormal(model, rank=rank, init_loc_fn=init_loc)
        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    else:
        # init "paper": d = 1, B = 0.01 (the authors' start, HybridGuide's default); "pyro":
        # AutoLowRankMultivariateNormal's own (scale ~0.07, random cov_factor)
        guide = HybridGuide(model, _conditional(name), rank=rank, init_loc_fn=init_loc, init_scale=1.0 if init == "paper" else None)
        optim = NGHVIOptim() if method == "NG-HVI" else SGHVIOptim()
        loss = HybridELBO(guide.conditional, path_gradient=path_gradient, num_particles=num_particles,
                          covariance_gradient=covariance_gradient)
        svi = SVI(model, guide, optim, loss)
    iters, elbos, seconds = [], [], []
    store = pyro.get_param_store()
    average_from, sums = steps - max(1, steps // 10), {}
    for step in range(steps):
        t0 = time.perf_counter()
        with pyro.validation_enabled(False):
            loss = svi.step(*args)
        seconds.append(time.perf_counter() - t0)
        if step >= average_from:  # iterate averaging over the last 10% of steps, as the paper does
            coords = _averaged_coordinates(store)
            for k, v in coords.items():
                sums[k] = sums.get(k, 0.0) + v
            if record is not None:
                record.append(coords)
        if name == "logistic" and method != "Pyro SVI":
            if step % eval_every == 0 or step == steps - 1:
                iters.append(step)
                elbos.append(logistic_marginal_elbo(guide.global_guide, args))
        else:
            iters.append(step)
            elbos.append(-loss)
    _set_averaged_coordinates(store, {k: v / (steps - average_from) for k, v in sums.items()})
    return guide, np.array(iters), np.array(elbos), np.array(seconds)


def _averaged_coordinates(store):
    """The coordinates in which iterates are averaged: the paper's (mu, B, |d|) for a low-rank
    Gaussian guide (``<prefix>.loc``, ``.cov_factor``, ``.scale``; the authors average mu, B and d),
    the unconstrained value for any other parameter.  Averaging the stored cov_factor = B / d
    instead would blow up whenever an iterate's d is near zero."""
    out = {}
    with torch.no_grad():
        for k, v in store._params.items():
            prefix, _, role = k.rpartition(".")
            if role in ("cov_factor", "scale") and f"{prefix}.loc" in store._params:
                s = store[f"{prefix}.scale"].detach()
                out[k] = s[:, None] * v.detach() if role == "cov_factor" else s
            else:
                out[k] = v.detach().clone()
    return out


def _set_averaged_coordinates(store, means):
    with torch.no_grad():
        for k, v in means.items():
            prefix, _, role = k.rpartition(".")
            if role == "cov_factor" and f"{prefix}.loc" in store._params:
                store._params[k].copy_(v / means[f"{prefix}.scale"][:, None])
            elif role == "scale" and f"{prefix}.loc" in store._params:
                store._params[k].copy_(transform_to(store._constraints[k]).inv(v))
            else:
                store._params[k].copy_(v)


def smooth(values, window):
    window = max(1, min(window, len(values)))
    c = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty(len(values))
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plateau_of(elbos, window):
    """The plateau: mean smoothed ELBO over the last 10% of iterations."""
    s = smooth(elbos, window)
    return float(s[-max(1, len(s) // 10) :].mean())


def time_to(iters, elbos, seconds, window, target):
    """First iteration (and cumulative seconds) at which the smoothed ELBO reaches ``target``."""
    s = smooth(elbos, window)
    if not (s >= target).any():
        return None, None
    it = int(iters[int(np.argmax(s >= target))])
    return it, float(np.sum(seconds[: it + 1]))


# ---- posterior summaries and prediction --------------------------------------------------------
def draws(name, method, guide, args, num):
    out = {}
    with torch.no_grad():
        for _ in range(num):
            values = guide(*args)
            for k in GLOBALS[name] + ["alpha"] + (["W1", "W2"] if name == "deep" else []):
                out.setdefault(k, []).append(values[k].detach().reshape(values[k].shape))
    return {k: torch.stack(v) for k, v in out.items()}


def predict(name, d, X, group):
    """Per-draw linear predictor (mean or logits) on rows X."""
    if name == "deep":
        feats = torch.stack([relu_features(X, [w1, w2]) for w1, w2 in zip(d["W1"], d["W2"])])
        return (feats * (d["beta"].unsqueeze(1) + d["alpha"][:, group])).sum(-1)
    return d["beta"] @ X.T + d["alpha"][:, group]


def test_metrics(name, d, test):
    eta = predict(name, d, test["X"], test["group"])
    y = test["y"]
    S = eta.shape[0]
    if name == "logistic":
        ll = y * eta - torch.nn.functional.softplus(eta)
        log_score = (torch.logsumexp(ll, 0) - math.log(S)).mean()
        acc = ((torch.sigmoid(eta).mean(0) > 0.5).float() == y).float().mean()
        return {"log score": float(log_score), "accuracy": float(acc)}
    sigma = d["sigma2_e"].sqrt().reshape(S, 1)
    ll = dist.Normal(eta, sigma).log_prob(y)
    log_score = (torch.logsumexp(ll, 0) - math.log(S)).mean()
    r2 = 1 - ((y - eta.mean(0)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"log score": float(log_score), "R2": float(r2)}


def summary(d, names):
    out = {}
    for k in names:
        v = d[k].reshape(d[k].shape[0], -1)
        for j in range(v.shape[1]):
            label = k if v.shape[1] == 1 else f"{k}[{j}]"
            out[label] = (float(v[:, j].mean()), float(v[:, j].std()))
    return out


# ---- main --------------------------------------------------------------------------------------
def warm_up(name, seed):
    """A few steps of every method on a tiny data set, so one-time costs (library loading, first
    linear-algebra calls) are not charged to the first timed run."""
    small = {"lmm": simulate_linear_random_intercept, "logistic": simulate_logistic_random_intercept}
    data = small[name](num_groups=5, seed=seed) if name in small else simulate_deep_mixed(num_groups=5, seed=seed)
    for method in ("NG-HVI", "SG-HVI", "Pyro SVI"):
        fit(name, method, _args(data[0]), 5, seed, eval_every=2)


def deep_nuts_samples(args, opts):
    """NUTS draws of theta for the deep model, from ``opts.nuts_cache`` when it exists."""
    from models.mixed import DEEP_BETA, DEEP_TAU2, DEEP_WEIGHTS

    cache = pathlib.Path(opts.nuts_cache)
    lock = cache.with_name(cache.name + ".lock")
    while lock.exists() and not cache.exists():  # another process (--nuts-only) is sampling
        time.sleep(30)
    if cache.exists():
        out = torch.load(cache)
        print(f"  deep: NUTS draws loaded from {cache}", file=sys.stderr)
        return out["samples"], out["cpu_seconds"]
    init = {"W1": DEEP_WEIGHTS[0], "W2": DEEP_WEIGHTS[1], "beta": DEEP_BETA, "tau2": DEEP_TAU2, "sigma2_e": torch.tensor(20.0)}
    lock.touch()
    try:
        t0 = time.process_time()
        samples = nuts_deep(args, init, opts.nuts_samples, opts.nuts_warmup, seed=opts.seed)
        cpu = time.process_time() - t0
        torch.save({"samples": samples, "cpu_seconds": cpu}, cache)
    finally:
        lock.unlink(missing_ok=True)
    return samples, cpu


def run(name, sigma2_a, steps, groups, seed, num_draws, mcmc_samples, plot, opts=None):
    warm_up(name, seed)
    if name == "lmm":
        train, test = simulate_linear_random_intercept(num_groups=groups, sigma2_a=sigma2_a, seed=seed)
    elif name == "logistic":
        train, test = simulate_logistic_random_intercept(num_groups=groups, sigma2_a=sigma2_a, seed=seed)
    else:
        train, _, test = simulate_deep_mixed(num_groups=groups, seed=seed)
    args = _args(train)
    eval_every = 20
    results = {}
    for method in ("NG-HVI", "SG-HVI", "Pyro SVI"):
        guide, iters, elbos, seconds = fit(name, method, args, steps, seed, eval_every)
        w = 5 if (name == "logistic" and method != "Pyro SVI") else 100
        plateau = plateau_of(elbos, w)
        it, secs = time_to(iters, elbos, seconds, w, plateau - 1.0)
        d = draws(name, method, guide, args, num_draws)
        results[method] = dict(
            iters=iters, elbos=elbos, seconds=seconds, window=w, plateau=plateau, it=it, secs=secs,
            step_ms=1e3 * float(np.mean(seconds[10:])), summary=summary(d, GLOBALS[name]), test=test_metrics(name, d, test),
        )
        print(f"  {name}: {method} done ({1e3 * np.mean(seconds[10:]):.1f} ms/step)", file=sys.stderr)
    # NG-HVI and SG-HVI optimise the same objective: time both to the better plateau - 1 nat
    common = max(results["NG-HVI"]["plateau"], results["SG-HVI"]["plateau"]) - 1.0
    for method in ("NG-HVI", "SG-HVI"):
        r = results[method]
        r["it_common"], r["secs_common"] = time_to(r["iters"], r["elbos"], r["seconds"], r["window"], common)
    if name in ("lmm", "logistic"):
        t0 = time.perf_counter()
        sampler = gibbs_lmm if name == "lmm" else gibbs_logistic
        d = sampler(*args, num_samples=mcmc_samples, burn_in=500, seed=seed)
        mcmc_secs = time.perf_counter() - t0
        thin = {k: v[:: max(1, mcmc_samples // num_draws)] for k, v in d.items()}
        results["MCMC (Gibbs)"] = dict(summary=summary(d, GLOBALS[name]), test=test_metrics(name, thin, test), secs=mcmc_secs)
    elif opts is not None and opts.nuts_samples > 0:
        samples, cpu = deep_nuts_samples(args, opts)
        d = with_locals(samples, args)
        results["MCMC (NUTS)"] = dict(summary=summary(d, GLOBALS[name]), test=test_metrics(name, d, test), secs=cpu)
    report(name, sigma2_a, steps, groups, train, results)
    if plot:
        plot_traces(name, sigma2_a, results)
    return results


def report(name, sigma2_a, steps, groups, train, results):
    title = {"lmm": "Linear random intercept (Example 1)", "logistic": "Logistic random intercept", "deep": "Deep mixed model (Example 2a)"}[name]
    extra = f", sigma2_a = {sigma2_a}" if name != "deep" else ""
    print(f"\n### {title}: {groups} groups, {len(train['y'])} training rows{extra}, {steps} steps\n")
    test_keys = list(next(iter(results.values()))["test"])
    print(
        "| method | plateau ELBO | iters (s) to own plateau - 1 nat | iters (s) to best HVI plateau - 1 nat | ms / step | "
        + " | ".join(f"test {k}" for k in test_keys) + " |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * len(test_keys))

    def cell(it, secs):
        return "not reached" if it is None else f"{it} ({secs:.1f} s)"

    for method, r in results.items():
        tests = " | ".join(f"{r['test'][k]:.4f}" for k in test_keys)
        if "plateau" in r:
            common = cell(r["it_common"], r["secs_common"]) if "it_common" in r else "- (other objective)"
            print(f"| {method} | {r['plateau']:.1f} | {cell(r['it'], r['secs'])} | {common} | {r['step_ms']:.1f} | {tests} |")
        else:
            what = "CPU s sampling" if "NUTS" in method else "s sampling"
            print(f"| {method} | - | - | - | {r['secs']:.1f} {what} | {tests} |")
    labels = list(next(iter(results.values()))["summary"])
    methods = list(results)
    print("\nPosterior mean (sd) of the global parameters:\n")
    print("| parameter | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for label in labels:
        cells = " | ".join(f"{results[m]['summary'][label][0]:.4f} ({results[m]['summary'][label][1]:.4f})" for m in methods)
        print(f"| {label} | {cells} |")


def plot_traces(name, sigma2_a, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    styles = {"NG-HVI": "k-", "SG-HVI": "C0-.", "Pyro SVI": "C3:"}
    best = max(r["plateau"] for r in results.values() if "plateau" in r)
    for method, r in results.items():
        if "plateau" not in r:
            continue
        s = smooth(r["elbos"], r["window"])
        for ax in axes:
            ax.plot(r["iters"], s, styles[method], lw=1.2, label=f"{method}: {r['plateau']:.0f}")
    axes[0].set_ylim(best - 20 * max(10.0, abs(best) * 0.01), best + 0.02 * abs(best))
    axes[1].set_ylim(best - 30, best + 5)
    axes[1].set_title("zoom: 30 nats below the best plateau", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO (smoothed)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    suffix = f"_sigma2a_{sigma2_a:g}" if name != "deep" else ""
    path = RESULTS / f"nghvi_{name}{suffix}.png"
    fig.savefig(path)
    plt.close(fig)
    print(f"\n![ELBO traces]({path.name})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lmm"], choices=["lmm", "logistic", "deep"])
    parser.add_argument("--sigma2-a", type=float, nargs="+", default=[1.0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--mcmc-samples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--nuts-samples", type=int, default=300, help="deep model: NUTS draws (0: no MCMC)")
    parser.add_argument("--nuts-warmup", type=int, default=300)
    parser.add_argument("--nuts-cache", default="/tmp/nghvi_deep_nuts.pt", help="NUTS draws are loaded from / saved to this file")
    parser.add_argument("--nuts-only", action="store_true", help="only run (and cache) NUTS for the deep model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="the conditional sampler has no log_prob")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.nuts_only:
        train, _, _ = simulate_deep_mixed(num_groups=args.groups, seed=args.seed)
        samples, cpu = deep_nuts_samples(_args(train), args)
        print(f"NUTS: {len(samples['sigma2_e'])} draws, {cpu:.0f} CPU s, sigma2_e {float(samples['sigma2_e'].mean()):.3f}")
        return
    for name in args.models:
        for s2a in args.sigma2_a if name != "deep" else [None]:
            run(name, s2a if s2a is not None else 1.0, args.steps, args.groups, args.seed, args.draws, args.mcmc_samples, not args.no_plot, args)


if __name__ == "__main__":
    main()
