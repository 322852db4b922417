"""Stochastic CAVI at N = 10^7 rows, against full-batch CAVI at N = 10^6 and Pyro SVI.

Three models from ``models/stochastic_data_loader.py`` (Bayesian linear regression with a
Gamma noise precision, logistic regression, a K = 5 Gaussian mixture), each on a synthetic
data set of N rows that is never in memory: a :class:`SeededShards` loader regenerates
shard ``c`` from a seeded RNG whenever it is asked for, and the minibatches (B rows, with
their indices passed as ``pyro.plate(..., subsample=idx)``) are cut from one shard at a time.

For each model, in a process of its own each (so that peak memory is its own):

* stochastic CAVI (``step_size=(1, 0.7)``) on B-row minibatches of the N rows;
* Pyro SVI (``AutoNormal``, Adam lr 0.01, ``Trace_ELBO``; ``TraceEnum_ELBO`` with the
  mixture's assignments enumerated) on the very same minibatches, with the same model code;
* full-batch CAVI on the first 10^6 rows held in memory, run to ``|ΔELBO| < 1e-10 |ELBO|``.

Reported against passes over the data: the held-out log predictive density per row on
10,000 fresh rows (linear: exact Gaussian predictive with E[1/τ] plugged in; logistic: 256
draws from q(w); mixture: posterior means plugged in), the ELBO per row (for the stochastic
methods: the mean of the last 50 minibatch estimates, each an unbiased estimate of the
full data's ELBO), CPU seconds, and the peak resident memory the fit added (VmHWM reset
after the setup, minus the resident size then).

    python benchmarks/stochastic_cavi.py                      # N = 10^7, 0.3 passes, B = 1000
    python benchmarks/stochastic_cavi.py --models linear --passes 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))

D = {"linear": 20, "logistic": 20, "mixture": 10}
K = 5


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Reset the peak resident size (Linux ``clear_refs``); return the resident size now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def make_data(model: str, n: int, shard_size: int, seed: int = 0):
    """The loader of N rows and the model's true parameters (fixed by ``seed``)."""
    import torch

    from stochastic_data_loader import SeededShards

    f64 = torch.float64
    g = torch.Generator().manual_seed(10_000 + seed)
    d = D[model]
    if model == "mixture":
        centres = 3.0 * torch.randn(K, d, generator=g, dtype=f64)
        weights = torch.distributions.Dirichlet(torch.full((K,), 5.0, dtype=f64)).sample()

        def make(gen, rows):
            z = torch.multinomial(weights, rows, replacement=True, generator=gen)
            return (centres[z] + torch.randn(rows, d, generator=gen, dtype=f64),)

        truth = {"centres": centres, "weights": weights}
    else:
        w = torch.randn(d, generator=g, dtype=f64) * (0.5 if model == "logistic" else 1.0)

        def make(gen, rows):
            X = torch.randn(rows, d, generator=gen, dtype=f64)
            if model == "linear":
                return X, X @ w + 0.5 * torch.randn(rows, generator=gen, dtype=f64)
            return X, torch.bernoulli(torch.sigmoid(X @ w), generator=gen)

        truth = {"w": w}
    return SeededShards(n, shard_size, make, seed=seed), SeededShards(10_000, 10_000, make, seed=seed + 777).shard(0), truth


def call(model: str, batch, n: int):
    """(model function, args) for a minibatch ``(idx, *rows)`` of the loader."""
    import stochastic_data_loader as m

    fn = {"linear": m.linear_regression, "logistic": m.logistic_regression, "mixture": m.gaussian_mixture}[model]
    return fn, tuple(batch) + (n,)


def heldout_lpd(model: str, params: dict, test) -> float:
    import torch
    import pyro.distributions as dist

    if model == "linear":
        X, y = test
        mean = X @ params["w_loc"]
        var = params["noise_var"] + ((X @ params["w_cov"]) * X).sum(-1)
        return float(dist.Normal(mean, var.sqrt()).log_prob(y).mean())
    if model == "logistic":
        X, y = test
        draws = params["w_draws"]  # (S, D)
        logp = dist.Bernoulli(logits=X @ draws.T).log_prob(y[:, None])  # (n, S)
        return float((torch.logsumexp(logp, -1) - math.log(draws.shape[0])).mean())
    (Y,) = test
    comp = dist.Normal(params["locs"], 1.0).to_event(1).log_prob(Y[:, None, :])  # (n, K)
    return float(torch.logsumexp(comp + params["weights"].log(), -1).mean())


def cavi_params(model: str, cavi) -> dict:

    q = cavi.posterior
    if model == "linear":
        return {"w_loc": q["w"].mean, "w_cov": q["w"].covariance_matrix, "noise_var": float(1 / q["tau"].mean)}
    if model == "logistic":
        return {"w_draws": q["w"].sample((256,))}
    c = q["weights"].concentration
    return {"weights": c / c.sum(), "locs": q["locs"].mean}


def svi_params(model: str, guide) -> dict:
    import torch

    with torch.no_grad():
        if model == "linear":
            loc, scale = guide._get_loc_and_scale("w")
            med = guide.median()
            return {"w_loc": loc, "w_cov": torch.diag(scale ** 2), "noise_var": float(1 / med["tau"])}
        if model == "logistic":
            loc, scale = guide._get_loc_and_scale("w")
            return {"w_draws": loc + scale * torch.randn(256, loc.shape[0], dtype=loc.dtype)}
        med = guide.median()
        return {"weights": med["weights"], "locs": med["locs"]}


def worker(model: str, method: str, n: int, batch: int, shard_size: int, passes: float, full_n: int, seed: int,
           full_sweeps: int = 500) -> dict:
    import torch

    import pyro
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_cavi import CAVI
    from stochastic_data_loader import minibatches

    torch.set_num_threads(1)
    pyro.set_rng_seed(seed)
    data, test, truth = make_data(model, n, shard_size, seed)
    rows = []
    base = _reset_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if method == "full":
        shards = [data.shard(c) for c in range(full_n // shard_size)]
        batch_all = (None,) + tuple(torch.cat([s[i] for s in shards]) for i in range(len(shards[0])))
        del shards
        fn, args = call(model, batch_all, full_n)
        cavi = CAVI(fn, seed=seed)
        result = cavi.run(*args, num_steps=full_sweeps, tol=1e-10, progress=False)
        peak = _status("VmHWM") - base
        rows.append({"passes": result.num_steps, "cpu": time.process_time() - cpu0, "wall": time.perf_counter() - wall0,
                     "lpd": heldout_lpd(model, cavi_params(model, cavi), test), "elbo": result.elbo / full_n,
                     "sweeps": result.num_steps, "converged": result.converged})
        return {"rows": rows, "peak": peak}
    steps = int(round(passes * n / batch))
    checkpoints = sorted({s for s in (round(f * n / batch) for f in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)) if 0 < s <= steps} | {steps})
    window, peak = [], 0
    engine = guide = None
    pyro.clear_param_store()
    for step, mb in enumerate(minibatches(data, batch, torch.Generator().manual_seed(seed + 1), passes), 1):
        fn, args = call(model, mb, n)
        if method == "cavi":
            if engine is None:
                engine = CAVI(fn, seed=seed, step_size=(1.0, 0.7))
            loss = engine.step(*args)
        else:
            if guide is None:
                hidden = poutine.block(fn, hide=["z"]) if model == "mixture" else fn
                guide = AutoNormal(hidden)
                elbo = TraceEnum_ELBO(max_plate_nesting=1) if model == "mixture" else Trace_ELBO()
                svi = SVI(fn, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
            loss = svi.step(*args)
        window = (window + [-loss / n])[-50:]
        if step in checkpoints:
            peak = max(peak, _status("VmHWM") - base)  # the fit's peak, not the evaluation's
            params = cavi_params(model, engine) if method == "cavi" else svi_params(model, guide)
            rows.append({"passes": step * batch / n, "cpu": time.process_time() - cpu0,
                         "wall": time.perf_counter() - wall0, "lpd": heldout_lpd(model, params, test),
                         "elbo": sum(window) / len(window), "steps": step})
            _reset_peak()
    return {"rows": rows, "peak": peak}


def run(model, method, a) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {model} {method}", file=sys.stderr, flush=True)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([model, method, a.n, a.batch, a.shard_size,
                                                                            a.passes, a.full_n, a.seed, a.full_sweeps])],
        check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(a) -> None:
    import pyro
    import torch

    print(f"N = {a.n:,}, B = {a.batch}, shards of {a.shard_size:,} rows, {a.passes} passes; full batch on "
          f"{a.full_n:,} rows; held-out rows 10,000; torch threads 1; float64; load average {os.getloadavg()[0]:.2f}\n")
    for model in a.models:
        results = {m: run(model, m, a) for m in ("cavi", "svi", "full")}
        print(f"### {model} (D = {D[model]}{', K = 5' if model == 'mixture' else ''})\n")
        print("| method | passes over the data | CPU s | held-out LPD / row | ELBO / row | peak memory added, MiB |")
        print("|---|---:|---:|---:|---:|---:|")
        names = {"cavi": "stochastic CAVI", "svi": "Pyro SVI (AutoNormal, Adam 0.01)"}
        for method in ("cavi", "svi"):
            res = results[method]
            for r in res["rows"]:
                last = r is res["rows"][-1]
                print(f"| {names[method]} | {r['passes']:.4g} | {r['cpu']:.1f} | {r['lpd']:.4f} | {r['elbo']:.4f} | "
                      f"{res['peak'] / 2**20:.0f} |" if last else
                      f"| {names[method]} | {r['passes']:.4g} | {r['cpu']:.1f} | {r['lpd']:.4f} | {r['elbo']:.4f} | |")
        r = results["full"]["rows"][0]
        print(f"| full-batch CAVI, {a.full_n:,} rows in memory ({r['sweeps']} sweeps{'' if r['converged'] else ', not converged'}) "
              f"| {r['sweeps']} over {a.full_n / a.n:.2g} of the data | {r['cpu']:.1f} | {r['lpd']:.4f} | {r['elbo']:.4f} | "
              f"{results['full']['peak'] / 2**20:.0f} |")
        pyro.set_rng_seed(a.seed)  # make_data draws the mixture weights from the global RNG, as the workers do
        _, test, truth = make_data(model, a.shard_size, a.shard_size, a.seed)
        if model == "linear":
            ref = {"w_loc": truth["w"], "w_cov": 0 * torch.eye(D[model], dtype=torch.float64), "noise_var": 0.25}
        elif model == "logistic":
            ref = {"w_draws": truth["w"][None]}
        else:
            ref = {"weights": truth["weights"], "locs": truth["centres"]}
        print(f"| the true parameters (reference) | | | {heldout_lpd(model, ref, test):.4f} | | |")
        print(f"\nload average after {model}: {os.getloadavg()[0]:.2f}\n", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--passes", type=float, default=0.3)
    parser.add_argument("--full-n", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-sweeps", type=int, default=500, help="at most this many full-batch CAVI sweeps")
    parser.add_argument("--models", nargs="+", default=["linear", "logistic", "mixture"])
    main(parser.parse_args())
