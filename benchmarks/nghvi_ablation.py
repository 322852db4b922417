"""
Ablation of NG-HVI on the linear or logistic random-intercept model (models/mixed.py): which
part of NG-HVI's update makes it reach the plateau in fewer iterations than SG-HVI.

Variants (all in the paper's coordinates (mu, B lower triangular, d), from the authors' start):

- ``ng``: NG-HVI as in the paper (exact Fisher, damping 10, clipping 50, momentum 0.6, ADADELTA);
- ``ng-authors-fisher``: the same with the authors' approximate (B, B) Fisher block
  ``2 (B^T P B) kron P`` (``Hessian_ong_deepglmm.m``);
- ``sg+momentum+clip``: natural gradient off, momentum and clipping kept;
- ``sg``: SG-HVI as in the paper (ADADELTA on the gradient only);
- ``ng-stein``: NG-HVI as in the paper with HybridELBO's Stein covariance gradient
  (``covariance_gradient="stein"``) in place of the reparameterisation gradient of (B, d).

Prints, per variant, the plateau (mean smoothed ELBO over the last 10% of steps) and the first
iteration at which the smoothed ELBO is within 1 nat of the best plateau of all variants.

    python benchmarks/nghvi_ablation.py --model lmm --sigma2-a 1 --steps 4000
"""

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import nghvi_mixed as bench  # noqa: E402
from pyro_cavi.nghvi import NGHVIOptim, SGHVIOptim  # noqa: E402

VARIANTS = {
    "ng": lambda: NGHVIOptim(),
    "ng-authors-fisher": lambda: NGHVIOptim(fisher="authors"),
    "sg+momentum+clip": lambda: NGHVIOptim(natural_gradient=False),
    "sg": lambda: SGHVIOptim(),
    "ng-stein": lambda: NGHVIOptim(),
}
COVARIANCE_GRADIENT = {"ng-stein": "stein"}  # HybridELBO's estimator; "reparameterization" otherwise


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lmm", choices=["lmm", "logistic"])
    parser.add_argument("--sigma2-a", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    simulate = bench.simulate_linear_random_intercept if args.model == "lmm" else bench.simulate_logistic_random_intercept
    train, _ = simulate(num_groups=1000, sigma2_a=args.sigma2_a, seed=args.seed)
    data = bench._args(train)
    window = 5 if args.model == "logistic" else 100
    runs = {}
    for variant in args.variants:
        bench.NGHVIOptim = VARIANTS[variant]  # fit() builds NGHVIOptim() for "NG-HVI"
        t0 = time.process_time()
        _, iters, elbos, seconds = bench.fit(args.model, "NG-HVI", data, args.steps, args.seed, eval_every=20,
                                             covariance_gradient=COVARIANCE_GRADIENT.get(variant, "reparameterization"))
        runs[variant] = (iters, elbos, seconds, bench.plateau_of(elbos, window), time.process_time() - t0)
    best = max(r[3] for r in runs.values())
    print(f"\n{args.model}, sigma2_a = {args.sigma2_a}, {args.steps} steps, seed {args.seed}; best plateau {best:.1f}\n")
    print("| variant | plateau ELBO | iters to best plateau - 1 nat | CPU s |")
    print("|---|---:|---:|---:|")
    for variant, (iters, elbos, seconds, plateau, cpu) in runs.items():
        it, _ = bench.time_to(iters, elbos, seconds, window, best - 1.0)
        print(f"| {variant} | {plateau:.1f} | {'not reached' if it is None else it} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
