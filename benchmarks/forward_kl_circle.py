"""Circle toy (McNamara, Loper & Regier, NeurIPS 2024): ForwardKL with a von Mises head
against the exact posterior, for NTK MLPs of several widths.

    θ ~ U[0, 2π),  z ~ N(0, 0.5²),  x = (cos(θ + z), sin(θ + z))

Reports the test NLL E[-log q(θ | x)] on held-out simulations next to the exact
posterior's NLL E[-log p(θ | x)] (wrapped normal; its normalisation is checked on a
grid). The gap is the expected KL(p(θ | x) ‖ q(θ | x)) >= 0, and cannot reach 0
because the wrapped normal is not a von Mises.

    python benchmarks/forward_kl_circle.py                 # widths 64 256 1024
"""

import argparse
import math
import os
import sys
import time

import torch

import pyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
import circle  # noqa: E402

from pyro_cavi.forward_kl import AmortisedPosterior, ForwardKL, NTKMLP, VonMisesHead  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def fit_width(width: int, steps: int, num_simulations: int, lr: float, seed: int):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = AmortisedPosterior(NTKMLP(2, 2, width=width, depth=2), {"theta": VonMisesHead()})
    fit = ForwardKL(circle.model, guide, pyro.optim.Adam({"lr": lr}), num_simulations=num_simulations,
                    marginalise=["z"])
    x_obs = torch.tensor([0.0, 1.0])
    start = time.perf_counter()
    for _ in range(steps):
        fit.step(x_obs)
    return fit, time.perf_counter() - start


def best_von_mises_gap() -> float:
    """The smallest possible gap: KL(p(θ | x) ‖ q*) for the von Mises q* that matches
    E_p[cos(θ - mode)] = exp(-0.5²/2) (the forward-KL optimum within the family); the
    same for every x by rotation symmetry. Computed on a grid."""
    from scipy.optimize import brentq
    from scipy.special import i0e, i1e

    mean_resultant = math.exp(-(circle.NOISE_SD**2) / 2)
    kappa = brentq(lambda k: i1e(k) / i0e(k) - mean_resultant, 1e-6, 1e3)
    theta = torch.linspace(-math.pi, math.pi, 200001, dtype=torch.float64)[:-1]
    log_p = circle.exact_log_posterior(theta, torch.tensor([1.0, 0.0], dtype=torch.float64))
    log_q = kappa * torch.cos(theta) - math.log(2 * math.pi) - math.log(i0e(kappa)) - kappa
    return ((log_p - log_q) * log_p.exp()).mean().item() * 2 * math.pi


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num-simulations", type=int, default=256)
    parser.add_argument("--num-test", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=os.path.join(RESULTS, "forward_kl_circle.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    # exact posterior: normalised on the circle (grid check) and its expected NLL on test pairs
    grid = torch.linspace(0, 2 * math.pi, 20001)[:-1]
    mass = circle.exact_log_posterior(grid, torch.tensor([0.6, 0.8])).exp().mean() * 2 * math.pi
    assert abs(mass.item() - 1) < 1e-4, mass
    floor = best_von_mises_gap()
    print(f"smallest possible gap (moment-matched von Mises): {floor:.4f}")
    pyro.set_rng_seed(12345)
    fits = {}
    rows = []
    test = None
    for width in args.widths:
        fit, seconds = fit_width(width, args.steps, args.num_simulations, args.lr, args.seed)
        if test is None:
            pyro.set_rng_seed(12345)
            test = fit.simulate(args.num_test, torch.tensor([0.0, 1.0]))
            exact_nll = -circle.exact_log_posterior(test[0]["theta"], test[1]["x"]).mean().item()
        with torch.no_grad():
            nll = fit.loss_on(*test).item()
        fits[width] = fit
        rows.append((width, nll, exact_nll, seconds))
        print(f"width {width}: test NLL {nll:.4f}, exact {exact_nll:.4f} ({seconds:.0f} s)", flush=True)

    if not rows:
        return
    print(f"\n{args.steps} steps x {args.num_simulations} simulations, Adam lr {args.lr}, "
          f"{args.num_test} test pairs, seed {args.seed}\n")
    print("| width | test NLL -log q(θ given x) | exact posterior NLL | gap (expected KL) | "
          "smallest gap for a von Mises q | fit time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for width, nll, exact, seconds in rows:
        print(f"| {width} | {nll:.4f} | {exact:.4f} | {nll - exact:.4f} | {floor:.4f} | {seconds:.0f} |")

    if args.figure and fits:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
        theta = torch.linspace(0, 2 * math.pi, 400)
        for ax, angle in zip(axes, (math.pi / 2, 4.0)):
            x = torch.tensor([math.cos(angle), math.sin(angle)])
            ax.plot(theta, circle.exact_log_posterior(theta, x).exp(), "k", lw=2, label="exact")
            for width, fit in fits.items():
                q = fit.posterior(x)["theta"]
                ax.plot(theta, q.log_prob(theta).exp(), "--", label=f"q, width {width}")
            ax.set_xlabel("θ")
            ax.set_title(f"p(θ | x), x at angle {angle:.2f}")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
