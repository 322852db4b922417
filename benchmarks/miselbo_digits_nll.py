"""MISVAE on scikit-learn's 8x8 digits (Hotti et al., ICML 2024, Table 1 in miniature): test NLL
of mixture encoders trained with the S2S and S2A estimators of MISELBO, against a plain VAE of
the same size (A = 1) and SEMVAE (A separate encoders), with parameter counts.

Train images are binarised afresh every epoch; the 297 test images once. The test NLL is the
MIS importance-sampling bound with about 1000 draws per image (ceil(1000 / A) per component).

    python benchmarks/miselbo_digits_nll.py               # about 10 minutes on 2 CPU cores
    python benchmarks/miselbo_digits_nll.py --epochs 5    # smoke run
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models.misvae import MISVAE, evaluate_nll, load_digits, train  # noqa: E402


def configurations(components, sampled, vae_particles):
    """(name, encoder, A, S, L, estimator); VAEs get L draws per step, mixtures one per component."""
    for L in vae_particles:
        yield "VAE", "shared", 1, 1, L, "s2a"
    for encoder, name in (("shared", "MISVAE"), ("separate", "SEMVAE")):
        for A in components:
            for S in sampled:
                if S > A or (encoder == "separate" and S != 2):
                    continue
                for estimator in ("s2s", "s2a"):
                    yield name, encoder, A, S, 1, estimator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--components", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--sampled", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--vae-particles", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train_probs, x_test = load_digits(seed=args.seed)
    print(f"8x8 digits: {len(train_probs)} train / {len(x_test)} test, {args.epochs} epochs, "
          f"latent {args.latent_dim}, hidden {args.hidden_dim}, Adam 1e-3, batch 100\n")
    print("| model | A | S | L | estimator | parameters | train -MISELBO (last epoch) | test NLL (nats) | s / epoch |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, encoder, A, S, L, estimator in configurations(args.components, args.sampled, args.vae_particles):
        torch.manual_seed(args.seed)
        vae = MISVAE(train_probs.shape[1], args.latent_dim, A, args.hidden_dim, encoder)
        losses, seconds = train(vae, train_probs, epochs=args.epochs, estimator=estimator, num_sampled=S,
                                num_particles=L, seed=args.seed)
        nll = evaluate_nll(vae, x_test)
        per_epoch = sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2]
        est = "-" if A == 1 else estimator.upper()
        print(f"| {name} | {A} | {S} | {L} | {est} | {vae.num_parameters()} | {losses[-1]:.2f} | {nll:.2f} "
              f"| {per_epoch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
