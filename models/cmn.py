"""Conditional mixture networks (CMN) in plain Pyro, fitted gradient-free by CAVI.

Heins et al., "Gradient-free variational learning with conditional mixture networks"
(2024, arXiv 2408.16429). A CMN is a probabilistic mixture of linear experts:

    x̃ = [x, 1]
    z_n   ~ StickBreakingCategorical(Γ x̃_n)                  gating over K experts
    x1_n  ~ Normal(A_{z_n} x̃_n, diag(γ_{z_n})^(-1/2))        the chosen expert's output (width h)
    y_n   ~ StickBreakingCategorical(B [x1_n, 1])            output layer over L classes

with the paper's priors (see :func:`cmn`): Gaussian Γ and B with uniform-prior stick biases,
Normal-Gamma experts (A | γ, γ). Every
likelihood is either Gaussian-linear or a stick-breaking logistic with linear logits,
so with Pólya-Gamma augmentation every complete conditional is conjugate; pyro_cavi's
CAVI finds these updates from the model below (the output logits are bilinear in the
latent x1 and B, handled with mean-field second moments). The same function runs under
Pyro SVI and NUTS (z enumerated; ``benchmarks/cmn_baselines.py``). Two predictives:
:func:`predict_proba` (Monte Carlo posterior predictive) and :func:`predict_proba_bound` (the
authors' deterministic bound-based one).

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


def _prior_locs(D: int, K: int, L: int, h: int, dtype, zero_mean: bool = False):
    """Prior means of the gating (K−1, D+1) and output (L−1, h+1) weights: zero but for the
    uniform-prior stick biases (:func:`stick_uniform_bias`); all zero for ``zero_mean``."""
    gate_loc = torch.cat([torch.zeros(K - 1, D, dtype=dtype), stick_uniform_bias(K, dtype).unsqueeze(-1)], -1)
    out_loc = torch.cat([torch.zeros(L - 1, h, dtype=dtype), stick_uniform_bias(L, dtype).unsqueeze(-1)], -1)
    if zero_mean:  # the earlier zero-mean model
        gate_loc, out_loc = torch.zeros_like(gate_loc), torch.zeros_like(out_loc)
    return gate_loc, out_loc


def authors_init(num_classes: int, hidden: int | None = None, precision_shape: float = 2.0,
                 precision_rate: float = 1.0, prior_scale: float | None = None, posterior_precision: float = 1e2,
                 **_):
    """The authors' starting posterior (VersesTech/cavi-cmn), as ``CAVI(init=...)``:

    * gating Γ and output B: mean at the prior mean, covariance ``posterior_precision⁻¹·I``
      (their ``init_posterior_scale = 1e2``, ``sample_initial_betas = False``);
    * experts: rows of A with mean Uniform(−3s, 3s), s = scale/√(D+1) (scale² = the Gamma prior's
      rate, their ``scale_likelihood``), column covariance V = I and precisions at their prior
      Gamma(precision_shape, precision_rate) (theirs: ``a = 2, b = 1``, the defaults);
      mean-field q(A) gets covariance I / E[γ];
    * then the E-step first: the fit starts by updating the assignments z and hidden units x1
      (or the joint q(z) q(x1 | z)) from these parameters, as their ``fit_vmp`` starts with a
      forward pass and a backward smoothing pass before the first parameter update.
    """

    def init(cavi, generator):
        f = cavi.factors
        dtype, device = cavi.dtype, cavi.device
        gate_f, out_f = f["gate"], f["out"]
        K, Dt = gate_f.loc.shape[0] + 1, gate_f.loc.shape[-1]
        L = num_classes
        h = hidden or L - 1
        gate_loc, out_loc = _prior_locs(Dt - 1, K, L, h, dtype, zero_mean=prior_scale is not None)
        for fac, loc in ((gate_f, gate_loc), (out_f, out_loc)):
            eye = torch.eye(loc.shape[-1], dtype=dtype, device=device) * posterior_precision ** -0.5
            fac.set(loc.to(device), eye.expand(loc.shape[:-1] + eye.shape).clone())
        s = precision_rate ** 0.5 / Dt ** 0.5
        eye = torch.eye(Dt, dtype=dtype, device=device)
        conc = torch.full((K, h), precision_shape, dtype=dtype, device=device)
        rate = torch.full((K, h), precision_rate, dtype=dtype, device=device)
        loc = ((torch.rand(K * h, Dt, generator=generator, dtype=torch.float64) * 2 - 1) * 3 * s).to(dtype).to(device)
        if "A+prec" in f:  # joint Normal-Gamma experts: scale_tril is that of V (τ = 1)
            f["A+prec"].set(loc, eye.expand(K * h, Dt, Dt).clone(), conc.reshape(-1), rate.reshape(-1))
        else:
            f["prec"].set(conc, rate)
            f["A"].set(loc, (eye * (rate / conc).sqrt().reshape(-1, 1, 1)).clone())
        return ["z+x1"] if "z+x1" in f else ["z", "x1"]

    return init


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
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(
            "cmn: num_experts must be an int >= 2 (the gating is a stick-breaking categorical with "
            f"num_experts - 1 sticks), got {num_experts!r}"
        )
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"cmn: hidden must be None or an int >= 1, got {hidden!r}")
    L = num_classes or int(y.max()) + 1
    if L < 2:
        raise ValueError(
            "cmn: a classifier needs at least 2 classes (the output layer has num_classes - 1 sticks), "
            f"got num_classes={L}" + (" (inferred from y.max() + 1)" if num_classes is None else "")
        )
    h = hidden or L - 1
    K = num_experts
    dtype = X.dtype
    Xt = _tilde(X)
    if prior_scale is not None:
        gate_scale = out_scale = prior_scale
        normal_gamma, expert_prior_prec = False, prior_scale ** -2.0
    zero = torch.zeros(D + 1, dtype=dtype)
    gate_loc, out_loc = _prior_locs(D, K, L, h, dtype, zero_mean=prior_scale is not None)
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


def fit_cavi(X, y, num_experts: int = 20, num_steps: int = 200, tol: float = 1e-6, seed: int = 0,
             joint_experts: bool = False, structured_hidden: bool = False, num_restarts: int = 1,
             init: str = "forgy", **kwargs):
    """Fit a CMN by CAVI; returns the engine (its ``posterior`` holds every factor).

    ``joint_experts=True`` fits each expert row and its precision with one Normal-Gamma factor
    (``CAVI(..., joint=[("A", "prec")])``), as the authors' matrix-normal-gamma posterior does;
    the default is mean-field q(A) q(γ). ``structured_hidden=True`` fits each datum's expert
    assignment and hidden vector with one factor q(z_n) q(x1_n | z_n), a Gaussian per expert
    (``joint=[("z", "x1")]``), as the authors do; the default is mean-field q(z_n) q(x1_n).
    ``num_restarts > 1`` sweeps that many initialisations together (vectorised) and keeps the
    best ELBO; ``cavi.restart_fits()`` gives all of them.

    ``init="forgy"`` (default): random Gaussian means, experts seeded from random data points;
    ``init="authors"``: the authors' start (:func:`authors_init`): Γ and B tight at their prior
    means, random experts, and the assignments fitted to these first.

    Convergence: the ELBO keeps rising long after the predictive has settled (on the UCI sets
    of ``benchmarks/cmn_convergence.py`` test accuracy moves by at most 0.012 and the log predictive
    density by at most 0.025 after sweep 50, except sonar's LPD), largely while experts the data do not need are emptied one by one, each
    raising the ELBO; a relative ``tol`` of 1e-5 and a few hundred sweeps is what the benchmarks
    use."""
    if init not in ("forgy", "authors"):
        raise ValueError(f"fit_cavi: init must be 'forgy' or 'authors', got {init!r}")
    # experts start from random data points (Forgy); k-means++ seeding over-fits the experts'
    # precisions to single points before the hidden layer has settled
    joint = ([("A", "prec")] if joint_experts else []) + ([("z", "x1")] if structured_hidden else [])
    if init == "authors":
        init = authors_init(**{**kwargs, "num_classes": kwargs.get("num_classes") or int(y.max()) + 1})
    cavi = CAVI(lambda X, y: cmn(X, y, num_experts=num_experts, **kwargs), seed=seed, init=init, joint=joint,
                num_restarts=num_restarts)
    cavi.run(X, y, num_steps=num_steps, tol=tol, progress=False)
    return cavi


@torch.no_grad()
def predict_proba(cavi: CAVI, X_new: torch.Tensor, num_samples: int = 200, ensemble: bool = False) -> torch.Tensor:
    """Posterior predictive class probabilities p(y | x_new, data), by Monte Carlo over the
    global factors (Γ, A, γ, B) and exact sums over experts.

    ``ensemble=True`` (after ``run`` with ``num_restarts = R > 1``) is the predictive of the
    equal-weight mixture of the R restarts' posteriors, :math:`\frac1R \sum_r p(y \mid x, q_r)`
    (``num_samples`` draws from each), instead of the best-ELBO restart's alone. Mean-field CAVI
    restarts end in different local optima; their uniform mixture is itself a variational
    posterior, a deep ensemble of variational approximations, whose bound is at least the
    restarts' average ELBO (Kviman et al., "Multiple importance sampling ELBO and deep ensembles
    of variational approximations", AISTATS 2022)."""
    if ensemble:  # restart_fits() refuses an engine that was not run with restarts
        return torch.stack([predict_proba(fit, X_new, num_samples) for fit in cavi.restart_fits()]).mean(0)
    draws = cavi.sample_posterior(num_samples, ["gate", "A", "prec", "out"])  # A and γ jointly if fitted so
    gate, A, prec, out = draws["gate"], draws["A"], draws["prec"], draws["out"]  # (S, K-1, D+1), (S, K, h, D+1), (S, K, h), (S, L-1, h+1)
    Xt = _tilde(X_new)
    log_w = StickBreakingCategorical(Xt @ gate.mT).log_probs  # (S, N, K)
    loc = torch.einsum("skhd,nd->snkh", A, Xt)
    x1 = loc + prec.rsqrt().unsqueeze(1) * torch.randn_like(loc)
    logits = torch.einsum("snkh,slh->snkl", _tilde(x1), out)
    log_p = StickBreakingCategorical(logits).log_probs  # (S, N, K, L)
    return torch.logsumexp(log_w.unsqueeze(-1) + log_p, dim=-2).exp().mean(0)


def _stick_bound_log_probs(phi: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-category log of the Pólya-Gamma (Jaakkola-Jordan) lower bound on E_q[log p(category)]
    under a stick-breaking likelihood, for stick logits with mean ``phi`` and root second
    moment ``c`` (shape (..., S)): log σ(ψ) ≥ φ/2 − log 2cosh(c/2) and log(1 − σ(ψ)) ≥
    −φ/2 − log 2cosh(c/2); category k takes "stop" at stick k after passing sticks 0..k−1.
    Returns (..., S + 1), unnormalised."""
    lc = torch.logaddexp(c / 2, -c / 2)  # log 2cosh(c/2)
    stop, go = phi / 2 - lc, -phi / 2 - lc
    passed = torch.cat([torch.zeros_like(go[..., :1]), go.cumsum(-1)], -1)  # sticks 0..k−1 passed
    return passed + torch.cat([stop, torch.zeros_like(stop[..., :1])], -1)


def _output_bound(mu: torch.Tensor, prec: torch.Tensor, Bm: torch.Tensor, BC: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """For hidden units x1 ~ N(mu, diag(prec)⁻¹) (``mu``: (N, K, h), ``prec``: (K, h)) and output
    weights B_s ~ N(Bm_s, BC_s) over [x1, 1], a lower bound on log ∫ p(y | x1) N(x1) dx1 for
    every class y (the authors' backward smoothing): q(x1 | y) Gaussian, Pólya-Gamma bounds on
    the sticks with ξ refitted ``iters`` times, bound = E_q[Σ_s κ_s ψ_s − b_s log 2cosh(c_s/2)] −
    KL(q(x1 | y) || N(mu, diag(prec)⁻¹)). Returns (N, K, L), unnormalised."""
    BB = BC + Bm.unsqueeze(-1) * Bm.unsqueeze(-2)  # E[B_s B_sᵀ]
    L, h = Bm.shape[0] + 1, Bm.shape[1] - 1
    dtype = mu.dtype
    eye = torch.eye(L, dtype=dtype)
    b = (eye.flip(-1).cumsum(-1).flip(-1))[:, :-1]  # b[y, s] = 1 for sticks s <= y
    kappa = eye[:, :-1] - 0.5 * b  # (L, S')
    P = torch.diag_embed(prec).unsqueeze(1).expand(-1, L, -1, -1)  # (K, L, h, h)
    Pmu = (prec.unsqueeze(0) * mu).unsqueeze(2)  # (N, K, 1, h)
    Bxx, Bx1, B11 = BB[:, :h, :h], BB[:, :h, h], BB[:, h, h]
    c = torch.full((1, 1, L, L - 1), 1e-6, dtype=dtype)
    for _ in range(iters):
        w = b * torch.where(c > 1e-4, torch.tanh(c / 2) / (2 * c), 0.25 - c ** 2 / 48)  # E[ω], b = 0 or 1
        Lam = P + torch.einsum("nkys,sij->nkyij", w, Bxx)
        eta = Pmu + torch.einsum("ys,si->yi", kappa, Bm[:, :h]) - torch.einsum("nkys,si->nkyi", w, Bx1)
        S = torch.linalg.inv(Lam)
        m = (S @ eta.unsqueeze(-1)).squeeze(-1)  # (N, K, L, h)
        MM = S + m.unsqueeze(-1) * m.unsqueeze(-2)
        c = (torch.einsum("sij,nkyji->nkys", Bxx, MM) + 2 * torch.einsum("si,nkyi->nkys", Bx1, m) + B11).clamp_min(0).sqrt()
    Epsi = m @ Bm[:, :h].T + Bm[:, h]  # (N, K, L, S')
    bound = (kappa * Epsi - b * torch.logaddexp(c / 2, -c / 2)).sum(-1)
    d = m - mu.unsqueeze(2)
    Pd = P.unsqueeze(0)
    kl = 0.5 * ((Pd * S).sum((-1, -2)) + (d.unsqueeze(-2) @ Pd @ d.unsqueeze(-1)).squeeze((-1, -2))
                - h - torch.logdet(Pd.expand_as(S)) - torch.logdet(S))
    return bound - kl


@torch.no_grad()
def predict_proba_bound(cavi: CAVI, X_new: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """The authors' deterministic predictive (VersesTech/cavi-cmn, ``model.predict``), for the
    mean-field factors fitted here. Each stick-breaking layer gives every category
    exp(lower bound on E_q[log p(category)]), normalised over categories (the Pólya-Gamma bound
    at its optimal ξ, :func:`_stick_bound_log_probs`):

    * gating p̃(z = k | x) ∝ exp(bound) × exp(E_q log N(x1 | A_k x̃, γ_k⁻¹)) integrated over x1,
      i.e. the experts' forward message carries −½E[γ] x̃ᵀΣ_A x̃ + ½(E log γ − log E γ);
    * for each expert and each class y, q(x1 | z = k, y) is the Gaussian that maximises the bound
      on log ∫ p(y | x1) N(x1 | E[A_k] x̃, E[γ_k]⁻¹) dx1 (``iters`` Pólya-Gamma fixed-point
      iterations), and p̃(y | z = k) ∝ exp(that bound);
    * p(y | x) = Σ_k p̃(z = k | x) p̃(y | z = k, x).
    """
    q = cavi.posterior
    Xt = _tilde(X_new)
    # gating
    gm, gC = q["gate"].mean, q["gate"].covariance_matrix  # (S, D+1), (S, D+1, D+1)
    phi = Xt @ gm.T
    c = (phi ** 2 + torch.einsum("nd,sde,ne->ns", Xt, gC, Xt)).clamp_min(0).sqrt()
    log_pz = _stick_bound_log_probs(phi, c)  # (N, K)
    # experts: forward message N(x1 | mu, P^-1) times exp(residual)
    g = q["prec"]
    Eg, Elog = g.mean, torch.digamma(g.concentration) - torch.log(g.rate)  # (K, h)
    if "A+prec" in cavi.factors:  # joint Normal-Gamma experts: A's γ-tilted moments, so Eg·var_a = E[γ (a·x - m·x)²]
        f = cavi.factors["A+prec"]
        Am = f.loc.reshape(Eg.shape + f.loc.shape[-1:])
        AC = (f.scale_tril @ f.scale_tril.mT).reshape(Eg.shape + f.scale_tril.shape[-2:]) / Eg[..., None, None]
    else:
        Am, AC = q["A"].mean, q["A"].covariance_matrix  # (K, h, D+1), (K, h, D+1, D+1)
    mu = torch.einsum("khd,nd->nkh", Am, Xt)  # (N, K, h)
    var_a = torch.einsum("nd,khde,ne->nkh", Xt, AC, Xt)
    log_pz = log_pz + (-0.5 * Eg * var_a + 0.5 * (Elog - Eg.log())).sum(-1)
    log_pz = log_pz - log_pz.logsumexp(-1, keepdim=True)
    # output layer, smoothed per expert and candidate class
    log_py = _output_bound(mu, Eg, q["out"].mean, q["out"].covariance_matrix, iters)  # (N, K, L)
    log_py = log_py - log_py.logsumexp(-1, keepdim=True)
    return (log_pz.unsqueeze(-1) + log_py).logsumexp(1).exp()


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
    torch.set_default_dtype(torch.float32)  # as the authors
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
