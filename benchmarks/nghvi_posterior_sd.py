"""
Why NG-HVI's posterior sds of theta on the linear random-intercept model (Example 1 of Zhang et
al. 2023, arXiv:2302.13536; ``models.mixed.linear_random_intercept``) differ from the exact
Gibbs sampler's: iterate averaging, or the variational family?

The hybrid family is q(theta) p(alpha | theta, y) with q(theta) = N(mu, Sigma),
Sigma = B B^T + diag(d)^2, B of rank p, over theta = (beta[0..5], log sigma2_a, log sigma2_e)
(the guide's unconstrained coordinates).  With alpha drawn from its exact conditional, the
hybrid ELBO is log p(y) - KL(q(theta) || p(theta | y)), so the best q is the KL(q || p)-optimal
member of the family for the *marginal* posterior of theta.  For each fit the script reports,
per coordinate, sd under q / sd under the posterior (all in the unconstrained coordinates, where
a Gaussian q's sds are exact: sqrt(diag Sigma)), for

(a) the averaged iterate: the mean of (mu, B, |d|) over the last 10% of steps
    (``nghvi_mixed.py``'s final parameters, the authors' practice);
(a100) the same over the last 100 steps (the authors' window);
(b) the last iterate alone;
(c) the average of the iterates' covariances, sd = sqrt(diag(mean_t Sigma_t));
(d) the best member of the family, found deterministically: (d-gauss) the closed-form
    KL(q || N(m, S)) minimised over (B, d) with (m, S) the mean and covariance of the Gibbs
    draws; (d-exact) the exact ELBO of q(theta) -- alpha integrated out in closed form,
    y_i ~ N(X_i beta, sigma2_a 11^T + sigma2_e I) per group -- as a quasi-Monte Carlo average over
    fixed antithetic scrambled-Sobol draws, maximised with L-BFGS in float64;
(e) all of the above with p = 8 = dim theta (full rank), which isolates the rank restriction.

Also the exact ELBO (same fixed draws) of (a), (b) and the optimum, so the gap is in nats.
Reference sds: the benchmark's Gibbs run (3000 draws after 500, seed as ``nghvi_mixed.py``) and
a long run (``--long-gibbs`` draws) of a Gibbs sampler that draws beta with alpha integrated out
(``gibbs_collapsed``; the ratios are against it), with effective sample sizes.

    python benchmarks/nghvi_posterior_sd.py [--sigma2-a 1] [--steps 8000] [--methods NG-HVI SG-HVI] [--ranks 3 8]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from models.mixed import simulate_linear_random_intercept  # noqa: E402
from nghvi_mixed import _args, fit, gibbs_lmm  # noqa: E402

LABELS = [f"beta[{j}]" for j in range(6)] + ["log s2a", "log s2e"]


# ---- the exact marginal posterior of theta ---------------------------------------------------
class ExactLogJoint:
    """log p(y, theta) + log |d theta / d phi| at unconstrained phi = (beta, log s2a, log s2e),
    alpha integrated out: per group, ``r_i = y_i - X_i beta`` has covariance
    ``s2e I + s2a 11^T`` with determinant ``s2e^(n_i - 1) (s2e + n_i s2a)`` and inverse
    ``(I - s2a / (s2e + n_i s2a) 11^T) / s2e``.  Uses sufficient statistics only."""

    def __init__(self, X, group, G, y):
        X, y = X.double(), y.double()
        self.n = X.shape[0]
        self.n_g = torch.bincount(group, minlength=G).double()
        self.yy, self.Xy, self.XX = y @ y, X.T @ y, X.T @ X
        self.sy = torch.zeros(G, dtype=torch.float64).index_add_(0, group, y)  # per-group sum of y
        self.sX = torch.zeros(G, X.shape[1], dtype=torch.float64).index_add_(0, group, X)

    def __call__(self, phi):
        beta, la, le = phi[..., :6], phi[..., 6], phi[..., 7]
        s2a, s2e = la.exp(), le.exp()
        rr = self.yy - 2 * beta @ self.Xy + ((beta @ self.XX) * beta).sum(-1)
        s1 = self.sy - beta @ self.sX.T  # (..., G)
        denom = s2e.unsqueeze(-1) + self.n_g * s2a.unsqueeze(-1)
        quad = (rr - (s2a.unsqueeze(-1) / denom * s1 * s1).sum(-1)) / s2e
        logdet = ((self.n_g - 1) * le.unsqueeze(-1) + denom.log()).sum(-1)
        ll = -0.5 * (self.n * math.log(2 * math.pi) + logdet + quad)
        lp_beta = (-0.5 * beta * beta / 100.0 - 0.5 * math.log(2 * math.pi * 100.0)).sum(-1)
        a, b = 1.01, 1.01

        def inv_gamma_log_u(lv):  # log density of an InverseGamma(a, b) at exp(lv), plus log-Jacobian lv
            return a * math.log(b) - math.lgamma(a) - (a + 1) * lv - b * torch.exp(-lv) + lv

        return ll + lp_beta + inv_gamma_log_u(la) + inv_gamma_log_u(le)


def gaussian_entropy(cov):
    return 0.5 * torch.logdet(2 * math.pi * math.e * cov)


def factor_cov(B, d):
    return B @ B.T + torch.diag(d * d)


class FixedDraws:
    """Fixed antithetic standard-normal draws (eps_B, eps_d) from a scrambled Sobol sequence: the
    exact ELBO as a deterministic function of (mu, B, d) (a quasi-Monte Carlo sample average)."""

    def __init__(self, M, p, num, seed):
        u = torch.quasirandom.SobolEngine(p + M, scramble=True, seed=seed).draw(num // 2, dtype=torch.float64)
        e = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(1e-12, 1 - 1e-12) - 1)
        e = torch.cat([e, -e])
        self.eB, self.ed = e[:, :p], e[:, p:]

    def elbo(self, log_joint, mu, B, d):
        if self.eB.shape[1] < B.shape[1]:
            raise ValueError(f"draws were made for rank {self.eB.shape[1]}, got B with {B.shape[1]} columns")
        phi = mu + self.eB[:, : B.shape[1]] @ B.T + self.ed * d
        return log_joint(phi).mean() + gaussian_entropy(factor_cov(B, d))


def _lbfgs(params, loss_fn, iters):
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-13,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn())


def best_gaussian_kl(m, S, p, seed=0):
    """argmin over (B, d) of KL(N(m, BB^T + D^2) || N(m, S)) = tr(S^-1 Sigma) - log|Sigma| + const
    (the mean is m at the optimum).  Returns Sigma and the KL at the optimum."""
    M = len(m)
    P = torch.linalg.inv(S)
    g = torch.Generator().manual_seed(seed)
    B = (0.1 * S.diagonal().sqrt().unsqueeze(-1) * torch.randn(M, p, generator=g, dtype=torch.float64)).requires_grad_()
    d = (0.5 * S.diagonal().sqrt()).clone().requires_grad_()
    _lbfgs([B, d], lambda: (P * factor_cov(B, d)).sum() - torch.logdet(factor_cov(B, d)), 2000)
    sig = factor_cov(B, d).detach()
    kl = 0.5 * float((P * sig).sum() - M - torch.logdet(sig) + torch.logdet(S))
    return sig, kl


def best_exact(log_joint, draws, m, S, p, seed=0):
    """argmax over (mu, B, d) of the exact ELBO (fixed draws), started at the Gibbs moments."""
    M = len(m)
    g = torch.Generator().manual_seed(seed)
    mu = m.clone().requires_grad_()
    B = (0.1 * S.diagonal().sqrt().unsqueeze(-1) * torch.randn(M, p, generator=g, dtype=torch.float64)).requires_grad_()
    d = (0.5 * S.diagonal().sqrt()).clone().requires_grad_()
    elbo = -_lbfgs([mu, B, d], lambda: -draws.elbo(log_joint, mu, B, d), 3000)
    return mu.detach(), B.detach(), d.detach(), elbo


# ---- references --------------------------------------------------------------------------------
def gibbs_collapsed(X, group, G, y, num_samples, burn_in, seed=0):
    """A Gibbs sampler that mixes on the intercept: (beta, alpha) drawn jointly given the variances
    -- beta from its conditional with alpha integrated out (precision
    (X^T X - sum_g c_g sX_g sX_g^T) / s2e + I / 100, c_g = s2a / (s2e + n_g s2a), sX_g the
    group's column sums), then alpha | beta -- then s2a | alpha and s2e | beta, alpha.  The
    benchmark's blocked sampler (beta | alpha, alpha | beta) mixes slowly on beta[0] when s2a is
    large (effective sample size 54 of 3000 at s2a = 10).  Returns the unconstrained draws
    (beta, log s2a, log s2e), float64."""
    torch.manual_seed(seed)
    st = ExactLogJoint(X, group, G, y)
    k, n = st.XX.shape[0], st.n
    eye = torch.eye(k, dtype=torch.float64)
    s2a, s2e = 1.0, 1.0
    out = torch.empty(num_samples, k + 2, dtype=torch.float64)
    for it in range(num_samples + burn_in):
        c = s2a / (s2e + st.n_g * s2a)
        prec = (st.XX - st.sX.T @ (c.unsqueeze(-1) * st.sX)) / s2e + eye / 100.0
        rhs = (st.Xy - st.sX.T @ (c * st.sy)) / s2e
        chol = torch.linalg.cholesky(prec)
        beta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
        beta = beta + torch.linalg.solve_triangular(chol.T, torch.randn(k, 1, dtype=torch.float64), upper=True).squeeze(-1)
        s1 = st.sy - st.sX @ beta
        var = 1.0 / (st.n_g / s2e + 1.0 / s2a)
        alpha = var * s1 / s2e + var.sqrt() * torch.randn(G, dtype=torch.float64)
        s2a = float(1.01 + 0.5 * (alpha @ alpha)) / float(torch._standard_gamma(torch.tensor(1.01 + G / 2, dtype=torch.float64)))
        rr = st.yy - 2 * beta @ st.Xy + beta @ st.XX @ beta
        sse = rr - 2 * alpha @ s1 + st.n_g @ (alpha * alpha)
        s2e = float(1.01 + 0.5 * sse) / float(torch._standard_gamma(torch.tensor(1.01 + n / 2, dtype=torch.float64)))
        if it >= burn_in:
            out[it - burn_in, :k] = beta
            out[it - burn_in, k] = math.log(s2a)
            out[it - burn_in, k + 1] = math.log(s2e)
    return out


def unconstrained(samples):
    return torch.cat(
        [samples["beta"].double(), samples["sigma2_a"].double().log().unsqueeze(-1), samples["sigma2_e"].double().log().unsqueeze(-1)], -1
    )


def ess(x):
    import arviz as az

    return np.array([float(az.ess(x[:, j].numpy()[None, :])) for j in range(x.shape[1])])


# ---- fits ---------------------------------------------------------------------------------------
def fit_variants(method, args, steps, seed, rank, num_particles=1):
    """Runs ``nghvi_mixed.fit`` and returns {variant: (mu, Sigma)} from its recorded iterates."""
    record = []
    t0 = time.process_time()
    guide, iters, elbos, seconds = fit("lmm", method, args, steps, seed, 20, rank=rank, record=record, num_particles=num_particles)
    cpu = time.process_time() - t0
    keys = list(record[0])
    prefix = next(k[: -len(".loc")] for k in keys if k.endswith(".loc"))
    mus = torch.stack([r[f"{prefix}.loc"] for r in record]).double()
    Bs = torch.stack([r[f"{prefix}.cov_factor"] for r in record]).double()
    ds = torch.stack([r[f"{prefix}.scale"] for r in record]).double()
    sigmas = Bs @ Bs.transpose(-1, -2) + torch.diag_embed(ds * ds)
    out = {
        "(a) averaged iterate": (mus.mean(0), factor_cov(Bs.mean(0), ds.mean(0)), Bs.mean(0), ds.mean(0)),
        "(a100) averaged, last 100": (mus[-100:].mean(0), factor_cov(Bs[-100:].mean(0), ds[-100:].mean(0)), Bs[-100:].mean(0), ds[-100:].mean(0)),
        "(b) last iterate": (mus[-1], sigmas[-1], Bs[-1], ds[-1]),
        "(c) mean of Sigma_t": (mus.mean(0), sigmas.mean(0), None, None),
    }
    per_iter_sd = sigmas.diagonal(dim1=-2, dim2=-1).sqrt()  # (T, M)
    return out, per_iter_sd, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma2-a", type=float, nargs="+", default=[1.0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="data, Gibbs and fit seed (as nghvi_mixed.py)")
    parser.add_argument("--fit-seeds", type=int, nargs="+", default=None, help="optimiser seeds (default: --seed)")
    parser.add_argument("--methods", nargs="*", default=["NG-HVI", "SG-HVI"], choices=["NG-HVI", "SG-HVI"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--long-gibbs", type=int, default=50000, help="draws of the collapsed Gibbs reference (0: none)")
    parser.add_argument("--particles", type=int, default=1, help="draws of (theta, alpha) per step of NG-HVI / SG-HVI")
    parser.add_argument("--elbo-draws", type=int, default=4096, help="fixed draws of the exact-ELBO optimisation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="the conditional sampler has no log_prob")
    fit_seeds = args.fit_seeds or [args.seed]

    for s2a in args.sigma2_a:
        train, _ = simulate_linear_random_intercept(num_groups=args.groups, sigma2_a=s2a, seed=args.seed)
        data = _args(train)
        log_joint = ExactLogJoint(*data)
        gibbs = unconstrained(gibbs_lmm(*data, num_samples=3000, burn_in=500, seed=args.seed))
        m, S = gibbs.mean(0), torch.cov(gibbs.T)
        ref = {"Gibbs 3000 (benchmark)": S.diagonal().sqrt()}
        print(f"\n### sigma2_a = {s2a}: {args.steps} steps, data seed {args.seed}\n")
        print("Gibbs (3000 draws) ESS per coordinate: " + ", ".join(f"{e:.0f}" for e in ess(gibbs)))
        if args.long_gibbs:
            long = gibbs_collapsed(*data, num_samples=args.long_gibbs, burn_in=500, seed=args.seed + 1)
            ref[f"collapsed Gibbs {args.long_gibbs}"] = long.std(0)
            print(f"collapsed Gibbs ({args.long_gibbs} draws, seed {args.seed + 1}) ESS: " + ", ".join(f"{e:.0f}" for e in ess(long)))
            m, S = long.mean(0), torch.cov(long.T)  # the better reference for the Gaussian optimum
        ref_name, ref_sd = list(ref.items())[-1]
        draws = FixedDraws(8, max(args.ranks), args.elbo_draws, seed=12345)

        rows = []  # (name, sd, elbo or None)
        for name, sd in ref.items():
            rows.append((name, sd, None))
        best = {}
        for p in args.ranks:
            sig, kl = best_gaussian_kl(m, S, p)
            rows.append((f"(d-gauss) p={p}: argmin KL(q || N(m_Gibbs, S_Gibbs)) (KL {kl:.1e} nats)", sig.diagonal().sqrt(), None))
            mu, B, d, elbo = best_exact(log_joint, draws, m, S, p)
            best[p] = elbo
            rows.append((f"(d-exact) p={p}: argmax exact ELBO", factor_cov(B, d).diagonal().sqrt(), elbo))
        sds_iter = {}
        for method in args.methods:
            for p in args.ranks:
                for fs in fit_seeds:
                    variants, per_iter, cpu = fit_variants(method, data, args.steps, fs, p, args.particles)
                    tag = f"{method} p={p}" + (f" seed {fs}" if len(fit_seeds) > 1 else "") + (f" {args.particles} particles" if args.particles > 1 else "")
                    print(f"  {tag}: {cpu:.0f} CPU s", file=sys.stderr)
                    sds_iter[tag] = per_iter
                    for vname, (mu, sig, B, d) in variants.items():
                        elbo = float(draws.elbo(log_joint, mu, B, d)) if B is not None else None
                        rows.append((f"{tag} {vname}", sig.diagonal().sqrt(), elbo))

        print(f"\nsd under q / sd under the posterior ({ref_name}), unconstrained coordinates; exact ELBO "
              f"(alpha integrated out, {args.elbo_draws} fixed antithetic scrambled-Sobol draws) minus the best rank-{min(args.ranks)} ELBO:\n")
        print("| q | " + " | ".join(LABELS) + " | min-max | ELBO - best |")
        print("|---|" + "---:|" * (len(LABELS) + 2))
        for name, sd, elbo in rows:
            r = (sd / ref_sd).numpy()
            gap = "-" if elbo is None else f"{elbo - best[min(args.ranks)]:+.2f}"
            print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in r) + f" | {r.min():.2f}-{r.max():.2f} | {gap} |")
        print(f"\nposterior sds ({ref_name}): " + ", ".join(f"{x:.4f}" for x in ref_sd.numpy()))
        print("\nspread of the per-iterate sd over the averaging window (sd_t / posterior sd, 5%-95% range, worst coordinate):")
        for tag, per in sds_iter.items():
            r = per / ref_sd
            lo, hi = torch.quantile(r, 0.05, dim=0), torch.quantile(r, 0.95, dim=0)
            j = int(torch.argmax(hi - lo))
            print(f"  {tag}: {LABELS[j]} {float(lo[j]):.2f}-{float(hi[j]):.2f}; mean over coordinates of the range "
                  f"{float(lo.mean()):.2f}-{float(hi.mean()):.2f}")


if __name__ == "__main__":
    main()
