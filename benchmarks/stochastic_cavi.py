"""Stochastic CAVI on data streamed from disk, against full-batch CAVI and Pyro SVI.

Bayesian linear regression (Gamma noise precision) on N rows written to a memory-mapped
file in chunks; every step reads one minibatch of B rows from disk (the data-loader
pattern: the model indexes the memmap with the plate's subsample indices), so memory
stays O(B·D) however large N is. Reports the held-out log predictive density against
passes over the data, wall time and peak traced memory.

    python benchmarks/stochastic_cavi.py               # N = 10^6 (about 2 minutes here)
    python benchmarks/stochastic_cavi.py --n 10000000  # the issue's N = 10^7 (about 800 MB on disk)
"""

from __future__ import annotations

import argparse
import math
import os
import time
import tracemalloc

import numpy as np
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_cavi import CAVI

OUT = os.path.join(os.path.dirname(__file__), "out")


def write_data(path: str, n: int, d: int, chunk: int = 200_000, seed: int = 0):
    """Write X (n, d) and y (n,) to .npy memmaps chunk by chunk; return the true w."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = np.lib.format.open_memmap(path + "_X.npy", mode="w+", dtype=np.float32, shape=(n, d))
    y = np.lib.format.open_memmap(path + "_y.npy", mode="w+", dtype=np.float32, shape=(n,))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        xs = rng.normal(size=(stop - start, d)).astype(np.float32)
        X[start:stop] = xs
        y[start:stop] = xs @ w + 0.5 * rng.normal(size=stop - start)
    X.flush()
    y.flush()
    return w


def make_model(X_disk: np.ndarray, y_disk: np.ndarray, d: int):
    n = X_disk.shape[0]

    def model(batch_size: int | None = None):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", n, subsample_size=batch_size) as idx:
            rows = np.sort(idx.numpy())  # read the minibatch from disk
            X = torch.from_numpy(np.asarray(X_disk[rows], dtype=np.float64))
            y = torch.from_numpy(np.asarray(y_disk[rows], dtype=np.float64))
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    return model


def heldout_lpd(w_mean, w_cov, noise_var, X, y) -> float:
    """Mean log predictive density of held-out rows under the Gaussian predictive."""
    mean = X @ w_mean
    var = noise_var + ((X @ w_cov) * X).sum(-1)
    return float(dist.Normal(mean, var.sqrt()).log_prob(y).mean())


def main(n: int, d: int, batch: int, passes: float, seed: int) -> None:
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"stream_{n}_{d}")
    t0 = time.perf_counter()
    w_true = write_data(path, n, d, seed=seed)
    print(f"wrote {n} x {d} rows in {time.perf_counter() - t0:.1f} s")
    X_disk = np.load(path + "_X.npy", mmap_mode="r")
    y_disk = np.load(path + "_y.npy", mmap_mode="r")
    rng = np.random.default_rng(seed + 1)
    Xt = torch.from_numpy(rng.normal(size=(10_000, d)))
    yt = Xt @ torch.from_numpy(w_true) + 0.5 * torch.randn(10_000, dtype=torch.float64)
    model = make_model(X_disk, y_disk, d)
    steps = int(math.ceil(passes * n / batch))
    rows = []

    pyro.set_rng_seed(seed)
    cavi = CAVI(model, seed=seed, step_size=(1.0, 0.7))
    tracemalloc.start()
    start = time.perf_counter()
    checkpoints = sorted({max(1, int(steps * f)) for f in (0.01, 0.1, 0.25, 0.5, 1.0)})
    for step in range(1, steps + 1):
        cavi.step(batch)
        if step in checkpoints:
            q = cavi.posterior
            lpd = heldout_lpd(q["w"].mean, q["w"].covariance_matrix, float(1 / q["tau"].mean), Xt, yt)
            rows.append(("stochastic CAVI", step * batch / n, time.perf_counter() - start, lpd))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    start = time.perf_counter()
    for step in range(1, steps + 1):
        svi.step(batch)
        if step in checkpoints:
            with torch.no_grad():
                med = guide.median()
                scale = guide.quantiles([0.8413])["w"][0] - med["w"]
            lpd = heldout_lpd(med["w"], torch.diag(scale ** 2), float(1 / med["tau"]), Xt, yt)
            rows.append(("Pyro SVI (AutoNormal, Adam 0.01)", step * batch / n, time.perf_counter() - start, lpd))

    full_n = min(n, 1_000_000)
    X = torch.from_numpy(np.asarray(X_disk[:full_n], dtype=np.float64))
    y = torch.from_numpy(np.asarray(y_disk[:full_n], dtype=np.float64))

    def full_model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)

    full = CAVI(full_model)
    start = time.perf_counter()
    result = full.run(X, y, tol=1e-10, progress=False)
    q = full.posterior
    lpd = heldout_lpd(q["w"].mean, q["w"].covariance_matrix, float(1 / q["tau"].mean), Xt, yt)
    rows.append((f"full-batch CAVI on {full_n} rows in memory ({result.num_steps} sweeps)", 1.0, time.perf_counter() - start, lpd))

    print(f"\nN = {n}, D = {d}, B = {batch}, {steps} steps; held-out rows 10,000; torch threads 1\n")
    print("| method | passes over the data | wall s | held-out LPD |")
    print("|---|---:|---:|---:|")
    for name, p, s, l in rows:
        print(f"| {name} | {p:.3g} | {s:.1f} | {l:.4f} |")
    print(f"\npeak traced memory of the stochastic CAVI loop: {peak / 2**20:.1f} MiB "
          f"(the data on disk: {n * d * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--passes", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(a.n, a.d, a.batch, a.passes, a.seed)
