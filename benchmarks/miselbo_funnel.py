"""The 2-D toy of Hotti et al. (ICML 2024, Sec. 5.1): a funnel prior and an autoregressive
Bernoulli likelihood, fitted with mixtures of A Gaussians (``MixtureGuide`` of ``AutoNormal`` s)
by MISELBO with the S2S and S2A estimators.

    z1 ~ N(0, 3²),  z2 | z1 ~ N(0, exp(z1 / 4)²),  u = z1 θ_1 + z2 θ_2  (θ ∈ R^{2×20}, θ_ij = exp(N(0, 0.1²)))
    x_n1 ~ Bernoulli(σ(u_1)),  x_ni ~ Bernoulli(σ(u_i + d_ni)),  d_ni = 0.1 (d_n,i-1 + x_n,i-1)

with five observed sequences x_n drawn from the model. After training, every fit is scored by
the same A2A MISELBO estimate (about 2000 draws) and by the MIS bound on log p(x).

    python benchmarks/miselbo_funnel.py            # a few minutes on 2 CPU cores
"""

import argparse
import itertools
import math
import os
import sys
import time

import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyro_cavi.miselbo import MISELBO, MixtureGuide, mis_log_likelihood  # noqa: E402

DECAY = 0.1


def ar_offsets(x):
    """The autoregressive offsets d_ni, computed from the observed sequences."""
    offsets = torch.zeros_like(x)
    for i in range(1, x.shape[-1]):
        offsets[..., i] = DECAY * (offsets[..., i - 1] + x[..., i - 1])
    return offsets


def funnel_model(x, theta):
    z1 = pyro.sample("z1", dist.Normal(0.0, 3.0))
    z2 = pyro.sample("z2", dist.Normal(0.0, torch.exp(z1 / 4)))
    u = z1.unsqueeze(-1) * theta[0] + z2.unsqueeze(-1) * theta[1]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Bernoulli(logits=u + ar_offsets(x)).to_event(1), obs=x)


def simulate(num_sequences=5, length=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.exp(0.1 * torch.randn(2, length, generator=generator))
    z1 = 3.0 * torch.randn((), generator=generator)
    z2 = torch.exp(z1 / 4) * torch.randn((), generator=generator)
    u = z1 * theta[0] + z2 * theta[1]
    x = torch.zeros(num_sequences, length)
    d = torch.zeros(num_sequences)
    for i in range(length):
        x[:, i] = torch.bernoulli(torch.sigmoid(u[i] + d), generator=generator)
        d = DECAY * (d + x[:, i])
    return x, theta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--sampled", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, theta = simulate(seed=args.seed)
    configs = [(1, 1, "s2a")] + [(A, S, est) for A, S, est in itertools.product(args.components, args.sampled, ("s2s", "s2a")) if S < A]
    print(f"{args.steps} Adam steps (lr 0.01), L = {args.particles} draws per sampled component; "
          f"scores: A2A MISELBO with ceil(2000 / A) draws per component, MIS log p(x) bound with the same draws\n")
    print("| A | S | estimator | MISELBO (A2A) | MIS log p(x) | CPU s / 100 steps |")
    print("|---:|---:|---|---:|---:|---:|")
    for A, S, est in configs:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = MixtureGuide.from_autoguide(funnel_model, A, init_scale=0.5)
        elbo = MISELBO(num_components=A, num_sampled=S, estimator=est, num_particles=args.particles,
                       vectorize_particles=True)
        svi = SVI(funnel_model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
        start = time.process_time()  # CPU time (one thread): robust to other load on the machine
        for _ in range(args.steps):
            svi.step(x, theta)
        seconds = (time.process_time() - start) / args.steps * 100
        L = math.ceil(2000 / A)
        score = MISELBO(estimator="a2a", num_particles=L, vectorize_particles=True)
        pyro.set_rng_seed(args.seed + 1)
        miselbo = -score.loss(funnel_model, guide, x, theta)
        log_px = mis_log_likelihood(funnel_model, guide, x, theta, num_samples_per_component=L).item()
        print(f"| {A} | {S} | {'-' if A == 1 else est.upper()} | {miselbo:.3f} | {log_px:.3f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
