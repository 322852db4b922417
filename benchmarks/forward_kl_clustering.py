"""Amortised clustering (McNamara, Loper & Regier, NeurIPS 2024): ForwardKL vs an
ELBO-trained guide of the same architecture, over many seeds.

Model (models/amortised_clustering.py): shift S ~ N(0, 100²), centres
Z_k ~ N(μ_k + S, 0.5²) with μ = (-20, -10, 0, 10, 20), 1000 points from the equal
mixture of N(Z_k, 0.1²); the observed data set is drawn at S = 100 (a new one per seed).

Each seed trains, from a fresh random initialisation,
  * ForwardKL: an AmortisedPosterior (mean-pool Deep Sets encoder, NTK MLPs,
    diagonal Gaussian heads for S and Z in natural parameters) on fresh simulations;
  * ELBO: the same network, evaluated at the observed data, as the guide of
    pyro.infer.SVI with Trace_ELBO (the guide is ``ForwardKL(...).guide``),
and records whether the mode of q(Z | x_obs) is in increasing order (the labelling the
prior picks), and the largest error |E_q Z_k - Z_k| against the true centres.

    python benchmarks/forward_kl_clustering.py                 # 100 seeds (long)
    python benchmarks/forward_kl_clustering.py --seeds 20      # what fits in a session here

Per-seed results are appended to --out (JSON lines); seeds already there are skipped,
so the run can be resumed.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

import pyro
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
import amortised_clustering as ac  # noqa: E402

from pyro_cavi.forward_kl import (  # noqa: E402
    AmortisedPosterior,
    DiagonalNormalHead,
    ForwardKL,
    MeanPoolEncoder,
    NTKMLP,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Standardise(nn.Module):
    """Divide the points by the prior scale of the shift, so the encoder sees O(1) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / ac.SHIFT_SD


def make_guide(width: int = 64) -> AmortisedPosterior:
    heads = {
        "shift": DiagonalNormalHead(scale=ac.SHIFT_SD),
        "centres": DiagonalNormalHead(len(ac.PRIOR_CENTRES), scale=ac.SHIFT_SD),
    }
    num_outputs = sum(head.num_outputs for head in heads.values())
    phi = NTKMLP(1, 32, width=32, depth=1, zero_init_last=False)
    rho = NTKMLP(32, num_outputs, width=width, depth=1)
    return AmortisedPosterior(nn.Sequential(Standardise(), MeanPoolEncoder(phi, rho)), heads)


def summarise(fit: ForwardKL, x: torch.Tensor, centres: torch.Tensor) -> dict:
    q = fit.posterior(x)["centres"]
    mode = q.mean
    return {
        "ordered": bool((mode[1:] > mode[:-1]).all()),
        "max_error": (mode - centres).abs().max().item(),
        "mode": [round(v, 3) for v in mode.tolist()],
    }


def run_seed(seed: int, args) -> dict:
    centres, x = ac.observed_data(seed)
    result = {"seed": seed, "true": [round(v, 3) for v in centres.tolist()]}

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    fit = ForwardKL(ac.model, make_guide(args.width), pyro.optim.Adam({"lr": args.lr_forward_kl}),
                    num_simulations=args.num_simulations)
    start = time.perf_counter()
    for _ in range(args.steps_forward_kl):
        fit.step(x)
    result["forward_kl"] = summarise(fit, x, centres) | {"seconds": time.perf_counter() - start}

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    fit = ForwardKL(ac.model, make_guide(args.width), pyro.optim.Adam({"lr": args.lr_elbo}))
    elbo = Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(ac.model, fit.guide, pyro.optim.Adam({"lr": args.lr_elbo}), elbo)
    start = time.perf_counter()
    for _ in range(args.steps_elbo):
        svi.step(x)
    result["elbo"] = summarise(fit, x, centres) | {"seconds": time.perf_counter() - start}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps-forward-kl", type=int, default=2000)
    parser.add_argument("--steps-elbo", type=int, default=3000)
    parser.add_argument("--num-simulations", type=int, default=16)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--lr-forward-kl", type=float, default=3e-3)
    parser.add_argument("--lr-elbo", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(RESULTS, "forward_kl_clustering.jsonl"))
    parser.add_argument("--figure", default=os.path.join(RESULTS, "forward_kl_clustering.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                record = json.loads(line)
                done[record["seed"]] = record
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        if seed in done:
            continue
        record = run_seed(seed, args)
        done[seed] = record
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"seed {seed}: ForwardKL ordered={record['forward_kl']['ordered']} "
              f"({record['forward_kl']['seconds']:.0f} s), ELBO ordered={record['elbo']['ordered']} "
              f"({record['elbo']['seconds']:.0f} s)", flush=True)

    records = [done[s] for s in seeds]
    n = len(records)
    print(f"\n{n} seeds; ForwardKL {args.steps_forward_kl} steps x {args.num_simulations} simulations "
          f"(Adam {args.lr_forward_kl}); ELBO {args.steps_elbo} steps x {args.num_particles} particles "
          f"(Adam {args.lr_elbo})\n")
    print("| method | runs with q(Z) mode in increasing order | median max abs error of E_q Z | median fit time (s) |")
    print("|---|---:|---:|---:|")
    for key, name in (("forward_kl", "ForwardKL"), ("elbo", "ELBO (same network)")):
        ordered = sum(r[key]["ordered"] for r in records)
        error = torch.tensor([r[key]["max_error"] for r in records]).median().item()
        seconds = torch.tensor([r[key]["seconds"] for r in records]).median().item()
        print(f"| {name} | {ordered}/{n} ({100 * ordered / n:.0f}%) | {error:.2f} | {seconds:.0f} |")

    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90, sharey=True)
        for ax, (key, name) in zip(axes, (("forward_kl", "ForwardKL"), ("elbo", "ELBO"))):
            for r in records:
                offset = torch.tensor(r[key]["mode"]) - torch.tensor(r["true"]).mean()
                ax.plot(range(1, 6), offset, "-o", ms=3, alpha=0.5,
                        color="tab:blue" if r[key]["ordered"] else "tab:red")
            ax.set_title(f"{name} (blue: ordered, red: not)", fontsize=9)
            ax.set_xlabel("k")
        axes[0].set_ylabel("mode of q(Z_k | x) - mean true centre", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
