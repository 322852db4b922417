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


def stick_uniform_bias(num_categories: int, dtype=None) -> torch.Tensor:
    """Stick logits whose stick-breaking probabilities are uniform: ψ_k = −log(C − 1 − k) for
    the C − 1 sticks, since σ(−log(C − 1 − k)) = 1 / (C − k) is the uniform share of what the
    earlier sticks left. The authors' MNLR prior mean (VersesTech/cavi-cmn, MultinomialRegression:
    bias −log(K − k) over its K = C − 1 sticks)."""
    return -torch.log(torch.arange(num_categories - 1, 0, -1, dtype=dtype or torch.get_default_dtype()))


def cmn(X, y=None, num_experts: int = 20, num_classes: int | None = None, hidden: int | None = None,
        gate_scale: float = 5.0, out_scale: float = 5.0, expert_prior_prec: float = 0.1,
        precision_shape: float = 2.0, precision_rate: float = 1.0, normal_gamma: bool = True,
        prior_scale: float | None = None):
    """The CMN as a Pyro model. ``X``: (N, D) features; ``y``: (N,) integer labels.

    Priors (defaults are the paper's, as set in the authors' code VersesTech/cavi-cmn,
    ``cavi_cmn_eval_uci.py`` / ``model_utils.py``):

    * gating weights, one row per stick: ``Γ_k ~ Normal(m_k, gate_scale²·I)`` with
      ``gate_scale = 5`` (``--scale_mnlr_betas 5``) and ``m_k`` zero except the bias entry
      −log(K − 1 − k), which makes the prior gating uniform over the K experts
      (:func:`stick_uniform_bias`);
    * expert precisions: ``γ_kj ~ Gamma(2, 1)`` (shape 1 + ``dof_offset`` = 2, rate
      ``scale_likelihood²`` = 1 of their matrix-normal-gamma);
    * expert rows: ``A_kj | γ_kj ~ Normal(0, (0.1·γ_kj)^(-1)·I)`` (``--inv_v_scale 0.1``, the
      prior precision V⁻¹ of the matrix normal, scaled by the row's precision). The authors'
      posterior keeps A and γ jointly Normal-Gamma; here q(A) q(γ) is mean-field, which the
      CAVI engine fits in closed form (E[γ] enters A's precision, E[‖A‖²] enters γ's rate).
      ``normal_gamma=False`` drops the γ scaling: ``A_kj ~ Normal(0, expert_prior_prec^(-1/2))``;
    * output weights: ``B_l ~ Normal(m_l, out_scale²·I)`` with ``out_scale = 5`` and the same
      uniform-prior bias over the L classes.

    ``prior_scale`` (optional) overrides ``gate_scale`` and ``out_scale`` and sets the expert
    rows to ``Normal(0, prior_scale)`` without the γ scaling, the zero-mean unit-scale model
    this file used before (``prior_scale=1, precision_rate=2``).
    """
    N, D = X.shape
    L = num_classes or int(y.max()) + 1
    h = hidden or L - 1
    K = num_experts
    dtype = X.dtype
    Xt = _tilde(X)
    if prior_scale is not None:
        gate_scale = out_scale = prior_scale
        normal_gamma, expert_prior_prec = False, prior_scale ** -2.0
    zero = torch.zeros(D + 1, dtype=dtype)
    gate_loc = torch.cat([torch.zeros(K - 1, D, dtype=dtype), stick_uniform_bias(K, dtype).unsqueeze(-1)], -1)
    out_loc = torch.cat([torch.zeros(L - 1, h, dtype=dtype), stick_uniform_bias(L, dtype).unsqueeze(-1)], -1)
    if prior_scale is not None:  # the earlier zero-mean model
        gate_loc, out_loc = torch.zeros_like(gate_loc), torch.zeros_like(out_loc)
    with pyro.plate("gate_sticks", K - 1):
        gate = pyro.sample("gate", dist.Normal(gate_loc, gate_scale).to_event(1))
    # rows of each expert's matrix are independent a posteriori (the likelihood has a diagonal
    # precision), so A is sampled row by row in a plate: one Gaussian factor per (expert, row)
    with pyro.plate("experts", K, dim=-2), pyro.plate("hidden", h, dim=-1):
        prec = pyro.sample("prec", dist.Gamma(torch.tensor(precision_shape, dtype=dtype), precision_rate))
        if normal_gamma:
            A = pyro.sample("A", dist.Normal(zero, (expert_prior_prec * prec).rsqrt().unsqueeze(-1)).to_event(1))
        else:
            A = pyro.sample("A", dist.Normal(zero, expert_prior_prec ** -0.5).to_event(1))
    with pyro.plate("class_sticks", L - 1):
        out = pyro.sample("out", dist.Normal(out_loc, out_scale).to_event(1))
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
