"""Conditional mixture networks (CMN) in plain Pyro, fitted gradient-free by CAVI.

Heins et al., "Gradient-free variational learning with conditional mixture networks"
(2024, arXiv 2408.16429). A CMN is a probabilistic mixture of linear experts:

    x̃ = [x, 1]
    z_n   ~ StickBreakingCategorical(Γ x̃_n)                  gating over K experts
    x1_n  ~ Normal(A_{z_n} x̃_n, diag(γ_{z_n})^(-1/2))        the chosen expert's output (width h)
    y_n   ~ StickBreakingCategorical(B [x1_n, 1])            output layer over L classes

with Gaussian priors on Γ, A and B and Gamma priors on the expert precisions γ. Every
likelihood is either Gaussian-linear or a stick-breaking logistic with linear logits,
so with Pólya-Gamma augmentation every complete conditional is conjugate; pyro_cavi's
CAVI finds these updates from the model below (the output logits are bilinear in the
latent x1 and B, handled with mean-field second moments). The same function runs under
Pyro SVI (z enumerated) and NUTS-free baselines.

Run:  python models/cmn.py  (a small pinwheels fit)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI
from pyro_cavi.distributions import StickBreakingCategorical


def _tilde(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)], -1)


def cmn(X, y=None, num_experts: int = 20, num_classes: int | None = None, hidden: int | None = None,
        prior_scale: float = 1.0, precision_shape: float = 2.0, precision_rate: float = 2.0):
    """The CMN as a Pyro model. ``X``: (N, D) features; ``y``: (N,) integer labels."""
    N, D = X.shape
    L = num_classes or int(y.max()) + 1
    h = hidden or L - 1
    K = num_experts
    dtype = X.dtype
    Xt = _tilde(X)
    with pyro.plate("gate_sticks", K - 1):
        gate = pyro.sample("gate", dist.Normal(torch.zeros(D + 1, dtype=dtype), prior_scale).to_event(1))
    # rows of each expert's matrix are independent a posteriori (the likelihood has a diagonal
    # precision), so A is sampled row by row in a plate: one Gaussian factor per (expert, row)
    with pyro.plate("experts", K, dim=-2), pyro.plate("hidden", h, dim=-1):
        A = pyro.sample("A", dist.Normal(torch.zeros(D + 1, dtype=dtype), prior_scale).to_event(1))
        prec = pyro.sample("prec", dist.Gamma(torch.tensor(precision_shape, dtype=dtype), precision_rate))
    with pyro.plate("class_sticks", L - 1):
        out = pyro.sample("out", dist.Normal(torch.zeros(h + 1, dtype=dtype), prior_scale).to_event(1))
    with pyro.plate("data", N):
        z = pyro.sample("z", StickBreakingCategorical(Xt @ gate.T))
        loc = (A[z] @ Xt.unsqueeze(-1)).squeeze(-1)
        x1 = pyro.sample("x1", dist.Normal(loc, prec[z].rsqrt()).to_event(1))
        return pyro.sample("y", StickBreakingCategorical(_tilde(x1) @ out.T), obs=y)


def fit_cavi(X, y, num_experts: int = 20, num_steps: int = 200, tol: float = 1e-6, seed: int = 0, **kwargs):
    """Fit a CMN by CAVI; returns the engine (its ``posterior`` holds every factor)."""
    # experts start from random data points (Forgy); k-means++ seeding over-fits the experts'
    # precisions to single points before the hidden layer has settled
    cavi = CAVI(lambda X, y: cmn(X, y, num_experts=num_experts, **kwargs), seed=seed, init="forgy")
    cavi.run(X, y, num_steps=num_steps, tol=tol, progress=False)
    return cavi


@torch.no_grad()
def predict_proba(cavi: CAVI, X_new: torch.Tensor, num_samples: int = 200) -> torch.Tensor:
    """Posterior predictive class probabilities p(y | x_new, data), by Monte Carlo over the
    global factors (Γ, A, γ, B) and exact sums over experts."""
    q = cavi.posterior
    gate = q["gate"].sample((num_samples,))  # (S, K-1, D+1)
    A = q["A"].sample((num_samples,))  # (S, K, h, D+1)
    prec = q["prec"].sample((num_samples,))  # (S, K, h)
    out = q["out"].sample((num_samples,))  # (S, L-1, h+1)
    Xt = _tilde(X_new)
    log_w = StickBreakingCategorical(Xt @ gate.mT).log_probs  # (S, N, K)
    loc = torch.einsum("skhd,nd->snkh", A, Xt)
    x1 = loc + prec.rsqrt().unsqueeze(1) * torch.randn_like(loc)
    logits = torch.einsum("snkh,slh->snkl", _tilde(x1), out)
    log_p = StickBreakingCategorical(logits).log_probs  # (S, N, K, L)
    return torch.logsumexp(log_w.unsqueeze(-1) + log_p, dim=-2).exp().mean(0)


def pinwheels(num_per_class: int, num_classes: int = 5, radial_std: float = 0.7, tangential_std: float = 0.3,
              rate: float = 0.2, seed: int = 0):
    """The pinwheel data set (Johnson et al. 2016), as used by CAVI-CMN."""
    g = torch.Generator().manual_seed(seed)
    rads = torch.linspace(0, 2 * math.pi, num_classes + 1)[:-1]
    feats = torch.randn(num_classes * num_per_class, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    angles = rads[labels] + rate * torch.exp(feats[:, 0])
    rot = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], -1).reshape(-1, 2, 2)
    X = 10 * (rot @ feats.unsqueeze(-1)).squeeze(-1) / 10
    perm = torch.randperm(len(labels), generator=g)
    return X[perm], labels[perm]


def main(num_train: int = 200, num_test: int = 1000, num_experts: int = 10, seed: int = 0) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # many small tensor ops: one thread avoids OpenMP oversubscription
    X, y = pinwheels((num_train + num_test) // 5, seed=seed)
    mean, std = X[:num_train].mean(0), X[:num_train].std(0)
    X = (X - mean) / std
    Xtr, ytr, Xte, yte = X[:num_train], y[:num_train], X[num_train:], y[num_train:]
    start = time.perf_counter()
    cavi = fit_cavi(Xtr, ytr, num_experts=num_experts, num_steps=200, seed=seed)
    seconds = time.perf_counter() - start
    p = predict_proba(cavi, Xte)
    acc = (p.argmax(-1) == yte).double().mean()
    lpd = p[torch.arange(len(yte)), yte].log().mean()
    print(f"CMN on pinwheels: {len(cavi.elbo_trace)} sweeps in {seconds:.1f} s, ELBO {cavi.elbo_trace[-1]:.2f}")
    print(f"test accuracy {acc:.3f}, test log predictive density {lpd:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fit a CMN to pinwheels with CAVI")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-experts", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(a.num_train, num_experts=a.num_experts, seed=a.seed)
