r"""PSIS k-hat and VSBC for mean-field CAVI as the posterior correlation grows (issue 9).

Two experiments, both with closed-form references:

1. **PSIS on a correlated Gaussian.** ``a ~ N(0, 1)``, ``b | a ~ N(rho a, 1 - rho^2)``, so
   ``p(a, b) = N(0, [[1, rho], [rho, 1]])``. Mean-field CAVI gives ``q(a) q(b)`` with variances
   ``1 - rho^2`` (the exact marginal variances are 1). For each ``rho``: k-hat, the relative ESS,
   and the mean-field and PSIS-corrected variances of ``a`` (mean ± sd over ``--seeds`` seeds of
   ``--draws`` draws each).
2. **VSBC on a regression.** ``y_i ~ N(a + b x_i, 1)``, ``a, b ~ N(0, 1)``, ``n = 10``, with
   ``x_i = shift + N(0, 1)``: the posterior correlation of ``(a, b)`` grows with ``shift``. For
   each shift: the dispersion statistic z of the PIT values of ``a`` (≈ N(0, 1) when calibrated;
   large and positive when q is too narrow), the KS uniformity and signed-rank symmetry
   p-values, and the flags at level 0.01, over ``--datasets`` simulated data sets, for
   ``--vsbc-seeds`` seeds.

3. **Pólya-Gamma CAVI on logistic regression** (``n = 100``, two weights, ``N(0, 1)`` prior):
   k-hat and the sds of q, PSIS-corrected and exact (quadrature on a 500 x 500 grid).
4. **Level of the symmetry tests.** Under a symmetric PIT distribution (uniform, and a
   U-shaped Beta(0.3, 0.3)), how often Yao et al.'s two-sample KS test of ``u`` vs ``1 - u`` and
   the Wilcoxon signed-rank test of ``u - 1/2`` (used by ``vsbc``) reject at level 5 %
   (``--replicates`` samples of ``--datasets`` PIT values).

Run::

    python benchmarks/diagnostics_khat.py              # about 2 minutes on 2 busy cores
    python benchmarks/diagnostics_khat.py --seeds 10 --datasets 200
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI
from pyro_cavi.diagnostics import psis, vsbc

warnings.filterwarnings("ignore")


def correlated(rho: float):
    def model():
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.sample("b", dist.Normal(rho * a, math.sqrt(1 - rho**2)))

    return model


def line(x, y=None):
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


def fit_cavi(model, *args):
    cavi = CAVI(model)
    cavi.run(*args, progress=False, tol=1e-6)
    return cavi


def psis_table(rhos, seeds, draws):
    print(f"\n### PSIS, mean-field CAVI on a 2-D Gaussian with correlation rho ({draws} draws, {seeds} seeds)\n")
    print("| rho | k-hat | ESS / S | var(a), mean-field | var(a), PSIS-corrected | exact var(a) | seconds per psis call |")
    print("|---|---|---|---|---|---|---|")
    for rho in rhos:
        model = correlated(rho)
        cavi = CAVI(model)
        cavi.run(progress=False)
        khat, ess, var, secs = [], [], [], []
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            t = time.perf_counter()
            res = psis(cavi, model, num_samples=draws)
            secs.append(time.perf_counter() - t)
            khat.append(res.khat)
            ess.append(res.ess / draws)
            var.append(float(res.sd["a"]) ** 2)
        khat = np.array(khat)
        shown = "-inf (constant ratios)" if np.isneginf(khat).all() else f"{khat.mean():.2f} ± {khat.std():.2f}"
        print(
            f"| {rho} | {shown} | {np.mean(ess):.3f} ± {np.std(ess):.3f} | "
            f"{float(cavi.posterior['a'].variance):.3f} | {np.mean(var):.3f} ± {np.std(var):.3f} | 1 | "
            f"{np.median(secs):.3f} |"
        )


def vsbc_table(shifts, datasets, seeds):
    print(f"\n### VSBC, mean-field CAVI on y ~ N(a + b x, 1), x = shift + N(0, 1), n = 10 ({datasets} data sets)\n")
    print("| shift | posterior corr(a, b) | VSBC seed | z (dispersion) of a | KS uniform p | symmetry p (signed rank) | flags of a at 0.01 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(10, generator=g)
    for shift in shifts:
        x = shift + noise
        design = torch.stack([torch.ones_like(x), x], -1)
        cov = torch.linalg.inv(torch.eye(2) + design.T @ design)
        corr = float(cov[0, 1] / cov.diag().sqrt().prod())
        for seed in range(seeds):
            t = time.perf_counter()
            res = vsbc(line, fit_cavi, x, torch.zeros(10), num_datasets=datasets, num_draws=500, seed=seed)
            secs = time.perf_counter() - t
            print(
                f"| {shift} | {corr:+.3f} | {seed} | {float(res.dispersion_z['a']):.2f} | "
                f"{float(res.uniform_pvalue['a']):.3g} | {float(res.symmetry_pvalue['a']):.3g} | "
                f"{', '.join(res.flags()['a']) or 'calibrated'} | {secs:.1f} |"
            )


def logistic(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def logistic_table(seeds, draws):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 2, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.5, -1.0])), generator=g)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 4, 500), torch.linspace(-3, 2, 500), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    log_post = dist.Normal(0.0, 1.0).log_prob(grid).sum(-1) + dist.Bernoulli(logits=grid @ X.T).log_prob(y).sum(-1)
    p = (log_post - log_post.max()).exp()
    p = p / p.sum()
    mean = (p[:, None] * grid).sum(0)
    sd = (p[:, None] * (grid - mean) ** 2).sum(0).sqrt()
    cavi = CAVI(logistic)
    cavi.run(X, y, progress=False)
    q_sd = cavi.posterior["w"].stddev
    khat, corrected = [], []
    for seed in range(seeds):
        pyro.set_rng_seed(seed)
        res = psis(cavi, logistic, X, y, num_samples=draws)
        khat.append(res.khat)
        corrected.append(res.sd["w"].numpy())
    corrected = np.array(corrected)
    print(f"\n### Pólya-Gamma CAVI, logistic regression, n = 100 ({draws} draws, {seeds} seeds)\n")
    print("| weight | exact sd (quadrature) | sd of q (CAVI) | PSIS-corrected sd | k-hat |")
    print("|---|---|---|---|---|")
    for k in range(2):
        print(
            f"| w[{k}] | {sd[k]:.3f} | {q_sd[k]:.3f} | {corrected[:, k].mean():.3f} ± {corrected[:, k].std():.3f} | "
            f"{np.mean(khat):.2f} ± {np.std(khat):.2f} |"
        )


def level_table(datasets, replicates):
    from scipy.stats import ks_2samp, wilcoxon

    print(f"\n### Rejection rate at level 5 % of symmetry tests on symmetric PIT values ({replicates} samples of {datasets})\n")
    print("| PIT distribution | KS of u vs 1 - u (Yao et al. 2018) | Wilcoxon signed-rank of u - 1/2 (vsbc) |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for name, draw in [("Uniform(0, 1)", lambda: rng.uniform(size=datasets)), ("Beta(0.3, 0.3)", lambda: rng.beta(0.3, 0.3, size=datasets))]:
        samples = [draw() for _ in range(replicates)]
        ks = np.mean([ks_2samp(u, 1 - u).pvalue < 0.05 for u in samples])
        wx = np.mean([wilcoxon(u - 0.5).pvalue < 0.05 for u in samples])
        print(f"| {name} | {ks:.3f} | {wx:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--datasets", type=int, default=100)
    parser.add_argument("--vsbc-seeds", type=int, default=3)
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    psis_table([0.0, 0.5, 0.8, 0.9, 0.95, 0.99], args.seeds, args.draws)
    vsbc_table([0.0, 1.0, 2.0, 5.0], args.datasets, args.vsbc_seeds)
    logistic_table(args.seeds, args.draws)
    level_table(args.datasets, args.replicates)


if __name__ == "__main__":
    main()
