r"""The two CAVI benchmark problems and their closed-form mean-field updates written by hand.

Two problems from the CAVI engine's issue (and ``shared/anchors/svi-baseline.md``):

* **Bayesian linear regression**, ``N = 10⁴``, ``D = 50``: rows of ``X`` drawn from
  :math:`N(0, \Sigma)`, :math:`\Sigma_{ij} = 0.5^{|i-j|}`, :math:`w \sim N(0, I)`,
  noise precision :math:`\tau \sim \mathrm{Gamma}(1, 1)`, :math:`y \sim N(Xw, \tau^{-1/2})`,
  true noise sd 0.5 (NumPy ``default_rng(seed)``; seed 0 reproduces the anchors' data).
* **Gaussian mixture**, ``K = 5``, ``N = 10⁴``, 2-D, known unit sd:
  :math:`\pi \sim \mathrm{Dir}(1)`, :math:`\mu_k \sim N(0, 10^2 I)`,
  :math:`z_n \sim \mathrm{Cat}(\pi)`, :math:`x_n \sim N(\mu_{z_n}, I)`; the data have
  locations drawn from that prior and equal true weights (NumPy ``default_rng(seed)``).

:class:`RegressionCAVI` and :class:`MixtureCAVI` are the textbook coordinate-ascent
updates (Bishop 2006, §10.1.3 and §10.2; Blei, Kucukelbir & McAuliffe 2017) in plain
NumPy float64, written independently of ``pyro_cavi``. They give the mean-field
optimum and the "hand-written loop" the engine's overhead is measured against. They
start where :class:`pyro_cavi.CAVI` starts and update the factors in the same order
(the order of the sample sites), so the two give the same ELBO after every sweep.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy.special import digamma, gammaln, logsumexp

import pyro
import pyro.distributions as dist

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------- problems
def regression_data(num_data: int = 10_000, dim: int = 50, rho: float = 0.5, noise_sd: float = 0.5,
                    seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Correlated design ``X`` (``num_data × dim``) and responses ``y``, float64."""
    rng = np.random.default_rng(seed)
    i = np.arange(dim)
    chol = np.linalg.cholesky(rho ** np.abs(i[:, None] - i[None, :]))
    X = rng.standard_normal((num_data, dim)) @ chol.T
    w = rng.standard_normal(dim)
    y = X @ w + noise_sd * rng.standard_normal(num_data)
    return X, y


def regression_model(X: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """Bayesian linear regression with a Gamma prior on the noise precision (plain Pyro)."""
    N, D = X.shape
    w = pyro.sample("w", dist.Normal(X.new_zeros(D), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(X.new_tensor(1.0), 1.0))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)


def mixture_data(num_components: int = 5, num_data: int = 10_000, dim: int = 2, prior_scale: float = 10.0,
                 seed: int = 0) -> np.ndarray:
    """``num_data × dim`` points, float64: component locations drawn from the prior
    :math:`N(0, 10^2 I)`, equal true weights, unit noise."""
    rng = np.random.default_rng(seed)
    locs = prior_scale * rng.standard_normal((num_components, dim))
    z = rng.choice(num_components, size=num_data)
    return locs[z] + rng.standard_normal((num_data, dim))


def make_mixture_model(num_components: int = 5, prior_scale: float = 10.0):
    """The K-component Gaussian mixture with unit noise, as a Pyro model ``model(x)``."""

    def mixture_model(x: torch.Tensor) -> None:
        N, D = x.shape
        weights = pyro.sample("weights", dist.Dirichlet(x.new_ones(num_components)))
        with pyro.plate("components", num_components):
            locs = pyro.sample("locs", dist.Normal(x.new_zeros(D), prior_scale).to_event(1))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    return mixture_model


# ---------------------------------------------------------------------------- helpers
def gamma_entropy(a: float, b: float) -> float:
    return a - math.log(b) + gammaln(a) + (1.0 - a) * digamma(a)


def dirichlet_entropy(alpha: np.ndarray) -> float:
    a0 = alpha.sum()
    k = alpha.size
    log_b = gammaln(alpha).sum() - gammaln(a0)
    return log_b + (a0 - k) * digamma(a0) - ((alpha - 1.0) * digamma(alpha)).sum()


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` seeds chosen by k-means++ (Arthur & Vassilvitskii 2007)."""
    idx = [int(rng.integers(len(x)))]
    d2 = ((x - x[idx[0]]) ** 2).sum(-1)
    for _ in range(1, k):
        idx.append(int(rng.choice(len(x), p=d2 / d2.sum())))
        d2 = np.minimum(d2, ((x - x[idx[-1]]) ** 2).sum(-1))
    return np.array(idx)


# ---------------------------------------------------------------------------- regression
class RegressionCAVI:
    r"""Mean-field CAVI for Bayesian linear regression, :math:`q(w)\,q(\tau)`.

    .. math::
        q(w) = N(m, S),\quad S = (\Lambda_0 + E[\tau] XᵀX)^{-1},\quad m = E[\tau]\, S Xᵀy;
        \qquad q(\tau) = \mathrm{Gamma}\big(a_0 + N/2,\; b_0 + \tfrac12 E\|y - Xw\|^2\big)

    with :math:`E\|y - Xw\|^2 = yᵀy - 2 mᵀXᵀy + \mathrm{tr}(XᵀX (S + m mᵀ))`. ``XᵀX``,
    ``Xᵀy`` and ``yᵀy`` are formed once, so a sweep costs :math:`O(D^3)` and the set-up
    :math:`O(N D^2)`. Starts from :math:`q(w) = N(0, I)`, :math:`q(\tau) = \mathrm{Gamma}(1, 1)`.

    With ``diagonal=True`` the factor of ``w`` is fully factorised (the family of
    ``AutoNormal``): its optimum keeps the same mean and has variances
    :math:`1 / \mathrm{diag}(\Lambda_0 + E[\tau] XᵀX)`.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, prior_var: float = 1.0, a0: float = 1.0, b0: float = 1.0,
                 diagonal: bool = False):
        self.N, self.D = X.shape
        self.prior_var, self.a0, self.b0 = prior_var, a0, b0
        self.diagonal = diagonal
        self.XtX = X.T @ X
        self.Xty = X.T @ y
        self.yty = float(y @ y)
        self.m = np.zeros(self.D)
        self.S = np.eye(self.D)
        self.a, self.b = 1.0, 1.0

    def expected_sq_residual(self) -> float:
        return self.yty - 2.0 * self.m @ self.Xty + float(np.sum(self.XtX * (self.S + np.outer(self.m, self.m))))

    def update_w(self) -> None:
        e_tau = self.a / self.b
        precision = np.eye(self.D) / self.prior_var + e_tau * self.XtX
        chol = np.linalg.cholesky(precision)
        inv_chol = np.linalg.inv(chol)
        cov = inv_chol.T @ inv_chol
        self.m = e_tau * (cov @ self.Xty)
        self.S = np.diag(1.0 / np.diag(precision)) if self.diagonal else cov

    def update_tau(self) -> None:
        self.a = self.a0 + 0.5 * self.N
        self.b = self.b0 + 0.5 * self.expected_sq_residual()

    def elbo(self) -> float:
        a, b, m, S, D = self.a, self.b, self.m, self.S, self.D
        e_tau, e_log_tau = a / b, digamma(a) - math.log(b)
        logdet_S = np.linalg.slogdet(S)[1]
        lik = 0.5 * self.N * (e_log_tau - LOG_2PI) - 0.5 * e_tau * self.expected_sq_residual()
        prior_w = -0.5 * D * math.log(2 * math.pi * self.prior_var) - 0.5 * (m @ m + np.trace(S)) / self.prior_var
        prior_tau = self.a0 * math.log(self.b0) - gammaln(self.a0) + (self.a0 - 1.0) * e_log_tau - self.b0 * e_tau
        entropy = 0.5 * D * (1.0 + LOG_2PI) + 0.5 * logdet_S + gamma_entropy(a, b)
        return float(lik + prior_w + prior_tau + entropy)

    def step(self) -> float:
        """One sweep (``w`` then ``tau``, the engine's order); returns the ELBO."""
        self.update_w()
        self.update_tau()
        return self.elbo()

    def run(self, num_steps: int = 1000, tol: float = 1e-8) -> List[float]:
        """Sweep until ``|ΔELBO| <= tol · max(1, |ELBO|)`` (the engine's rule); the ELBO trace."""
        return _run(self.step, num_steps, tol)


def log_evidence_regression(X: np.ndarray, y: np.ndarray, prior_var: float = 1.0, a0: float = 1.0,
                            b0: float = 1.0) -> float:
    r"""Exact :math:`\log p(y)` by 1-D quadrature over :math:`\log\tau` (an upper bound on any ELBO)."""
    N, D = X.shape
    XtX, Xty, yty = X.T @ X, X.T @ y, float(y @ y)

    def log_joint_tau(log_tau: float) -> float:
        tau = math.exp(log_tau)
        precision = np.eye(D) / prior_var + tau * XtX
        chol = np.linalg.cholesky(precision)
        half = np.linalg.solve(chol, tau * Xty)
        log_lik = (0.5 * N * (log_tau - LOG_2PI) - 0.5 * tau * yty + 0.5 * half @ half
                   - np.log(np.diag(chol)).sum() - 0.5 * D * math.log(prior_var))
        log_prior = a0 * math.log(b0) - gammaln(a0) + a0 * log_tau - b0 * tau  # includes the Jacobian
        return log_lik + log_prior

    grid = np.linspace(-6.0, 6.0, 2001)
    vals = np.array([log_joint_tau(t) for t in grid])
    centre = grid[vals.argmax()]
    grid = np.linspace(centre - 0.5, centre + 0.5, 4001)
    vals = np.array([log_joint_tau(t) for t in grid])
    return float(logsumexp(vals) + math.log(grid[1] - grid[0]))


# ---------------------------------------------------------------------------- mixture
class MixtureCAVI:
    r"""Mean-field CAVI for a K-component Gaussian mixture with unit noise,
    :math:`q(\pi)\prod_k q(\mu_k)\prod_n q(z_n)`.

    .. math::
        q(\pi) = \mathrm{Dir}(\alpha_0 + N_k),\quad
        q(\mu_k) = N\Big(\frac{\sum_n r_{nk} x_n}{1/s_0^2 + N_k}, \frac{I}{1/s_0^2 + N_k}\Big),\quad
        r_{nk} \propto \exp\big(E[\log\pi_k] - \tfrac12 E\|x_n - \mu_k\|^2\big)

    with :math:`N_k = \sum_n r_{nk}` (Bishop 2006, §10.2, with known noise). A sweep
    costs :math:`O(N K D)`. Initialisation sets the responsibilities, then updates
    ``weights``, ``locs`` and ``z`` once, like the engine.
    """

    def __init__(self, x: np.ndarray, num_components: int = 5, prior_scale: float = 10.0, alpha0: float = 1.0):
        self.x = x
        self.N, self.D = x.shape
        self.K = num_components
        self.prior_var = prior_scale ** 2
        self.alpha0 = alpha0
        self.r = np.full((self.N, self.K), 1.0 / self.K)
        self.alpha = np.full(self.K, alpha0)
        self.m = np.zeros((self.K, self.D))
        self.v = np.full(self.K, self.prior_var)  # isotropic variance of q(mu_k)

    # -- initialisation
    def init_forgy(self, seed: int) -> "MixtureCAVI":
        """The engine's ``init="forgy"`` seeding: from a ``torch.Generator`` seeded with
        ``seed``, the engine first draws random means for its Gaussian factors (``K × D``
        normals, overwritten before use), then ``K`` data points by ``torch.randperm``;
        one-hot responsibilities on them and zero elsewhere, then one update of every factor."""
        return self._init_from(self.forgy_points(seed))

    def forgy_points(self, seed: int) -> np.ndarray:
        """Indices of the data points :meth:`init_forgy` seeds from."""
        gen = torch.Generator().manual_seed(seed)
        torch.randn((self.K, self.D), generator=gen)
        return torch.randperm(self.N, generator=gen)[: self.K].numpy()

    def init_kmeans_pp(self, seed: int) -> "MixtureCAVI":
        """k-means++ seeds (NumPy ``default_rng(seed)``), then as :meth:`init_forgy`."""
        return self._init_from(kmeans_plus_plus(self.x, self.K, np.random.default_rng(seed)))

    def _init_from(self, seeds: np.ndarray) -> "MixtureCAVI":
        self.r = np.zeros((self.N, self.K))
        self.r[seeds, np.arange(self.K)] = 1.0
        self.update_weights()
        self.update_locs()
        self.update_z()
        return self

    # -- updates
    def update_weights(self) -> None:
        self.alpha = self.alpha0 + self.r.sum(0)

    def update_locs(self) -> None:
        precision = 1.0 / self.prior_var + self.r.sum(0)
        self.v = 1.0 / precision
        self.m = (self.r.T @ self.x) * self.v[:, None]

    def _expected_sq_dist(self) -> np.ndarray:
        x, m = self.x, self.m
        sq = (x * x).sum(1)[:, None] - 2.0 * x @ m.T + (m * m).sum(1)[None, :]
        return sq + self.D * self.v[None, :]

    def _e_log_weights(self) -> np.ndarray:
        return digamma(self.alpha) - digamma(self.alpha.sum())

    def update_z(self) -> None:
        logits = self._e_log_weights()[None, :] - 0.5 * self._expected_sq_dist()
        logits -= logits.max(1, keepdims=True)
        r = np.exp(logits)
        self.r = r / r.sum(1, keepdims=True)

    def elbo(self) -> float:
        r, K, D = self.r, self.K, self.D
        e_log_w = self._e_log_weights()
        lik = (r * (e_log_w[None, :] - 0.5 * D * LOG_2PI - 0.5 * self._expected_sq_dist())).sum()
        prior_w = gammaln(self.alpha0 * K) - K * gammaln(self.alpha0) + ((self.alpha0 - 1.0) * e_log_w).sum()
        prior_locs = (-0.5 * D * math.log(2 * math.pi * self.prior_var)
                      - 0.5 * ((self.m ** 2).sum(1) + D * self.v) / self.prior_var).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            h_z = -np.where(r > 0, r * np.log(r), 0.0).sum()
        h_locs = (0.5 * D * (1.0 + LOG_2PI) + 0.5 * D * np.log(self.v)).sum()
        return float(lik + prior_w + prior_locs + h_z + h_locs + dirichlet_entropy(self.alpha))

    def step(self) -> float:
        """One sweep (``weights``, ``locs``, ``z``: the engine's order); returns the ELBO."""
        self.update_weights()
        self.update_locs()
        self.update_z()
        return self.elbo()

    def run(self, num_steps: int = 1000, tol: float = 1e-8) -> List[float]:
        return _run(self.step, num_steps, tol)


def _run(step, num_steps: int, tol: float) -> List[float]:
    trace: List[float] = []
    for _ in range(num_steps):
        trace.append(step())
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * max(1.0, abs(trace[-1])):
            break
    return trace


def mixture_optimum(x: np.ndarray, num_components: int = 5, num_starts: int = 10,
                    num_steps: int = 5000) -> Tuple[float, List[float]]:
    """Best ELBO over ``num_starts`` k-means++ starts and as many engine-style (Forgy)
    starts, each run to 1e-8 relative convergence, the best then polished to 1e-14;
    returns it and every start's final ELBO."""
    finals, best = [], None
    for s in range(num_starts):
        for init in ("init_kmeans_pp", "init_forgy"):
            fit = getattr(MixtureCAVI(x, num_components), init)(s)
            finals.append(fit.run(num_steps, 1e-8)[-1])
            if best is None or finals[-1] > best[0]:
                best = (finals[-1], fit)
    return best[1].run(num_steps, 1e-14)[-1], finals
