"""Seconds per epoch of MISVAE training against the number of components A at a fixed number
S of sampled components (Hotti et al., ICML 2024, Fig. 3 in miniature), S2S against S2A, all
measured in one run on the 8x8 digits (1500 images, batch 100, 15 SVI steps per epoch).

S2S evaluates S x S component densities per datum, so its cost should not depend on A; S2A
evaluates S x A. All configurations are built first and then timed round-robin (one epoch each
per round, ``--rounds`` rounds after a warm-up round), so load from other processes on a shared
machine hits every configuration alike; each point is the median over rounds. Both wall-clock
and process CPU seconds are reported (one torch thread, so CPU time excludes time spent waiting
for a core).

    python benchmarks/miselbo_cost.py     # writes benchmarks/results/miselbo_cost.png
"""

import argparse
import os
import statistics
import sys
import time

import torch

import pyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models.misvae import MISVAE, load_digits, make_svi, train_epoch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100, 200])
    parser.add_argument("--sampled", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--plot", default=os.path.join(RESULTS, "miselbo_cost.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train_probs, _ = load_digits()
    S = args.sampled
    components = [A for A in args.components if A >= S]
    configs = [(A, est) for A in components for est in ("s2s", "s2a")]
    svis = {}
    for A, est in configs:
        vae = MISVAE(train_probs.shape[1], args.latent_dim, A, args.hidden_dim, name=f"vae_{A}_{est}")
        svis[A, est] = make_svi(vae, estimator=est, num_sampled=S)
    wall = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    for round_ in range(args.rounds + 1):
        for c in configs:
            w0, c0 = time.perf_counter(), time.process_time()
            train_epoch(svis[c], train_probs)
            if round_ > 0:  # round 0 warms up
                wall[c].append(time.perf_counter() - w0)
                cpu[c].append(time.process_time() - c0)
    med = {name: {c: statistics.median(v[c]) for c in configs} for name, v in (("wall", wall), ("cpu", cpu))}
    print(f"S = {S}, median of {args.rounds} epochs per point, torch threads = 1\n")
    print("| A | S2S wall s / epoch | S2A wall s / epoch | S2S CPU s / epoch | S2A CPU s / epoch |")
    print("|---:|---:|---:|---:|---:|")
    for A in components:
        print(f"| {A} | {med['wall'][A, 's2s']:.3f} | {med['wall'][A, 's2a']:.3f} "
              f"| {med['cpu'][A, 's2s']:.3f} | {med['cpu'][A, 's2a']:.3f} |")
    first, last = components[0], components[-1]
    for name in ("wall", "cpu"):
        print(f"\n{name}: S2S at A={last} / A={first} = {med[name][last, 's2s'] / med[name][first, 's2s']:.2f}; "
              f"S2A at A={last} / A={first} = {med[name][last, 's2a'] / med[name][first, 's2a']:.2f}", end="")
    print()
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
        for est, marker in (("s2s", "o"), ("s2a", "s")):
            ax.plot(components, [med["cpu"][A, est] for A in components], marker=marker, label=est.upper())
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("number of components A")
        ax.set_ylabel("CPU seconds per epoch")
        ax.set_title(f"MISVAE on 8x8 digits, S = {S}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
    main()
