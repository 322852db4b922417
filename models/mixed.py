"""
Mixed models with many group-level random effects, as in Zhang, Smith, Maneesoonthorn,
Loaiza-Maya (2023), "Natural Gradient Hybrid Variational Inference with Application to Deep
Mixed Models" (arXiv:2302.13536):

- ``linear_random_intercept``: Example 1, ``y_ij = x_ij^T beta + alpha_i + e_ij``;
- ``logistic_random_intercept``: ``y_ij ~ Bernoulli(sigmoid(x_ij^T beta + alpha_i))``;
- ``deep_mixed_model``: Example 2a, a ReLU network whose output-layer coefficients carry group
  random effects, ``y_ij = z(x_ij; W)^T (beta + alpha_i) + e_ij``.

Data sets are flat: ``X`` is ``(n, 1 + m)`` with a leading column of ones, ``group`` is ``(n,)``
holding each row's group index in ``0..num_groups-1``.  The simulators reproduce the paper's
designs (five covariates with the correlation matrix ``RHO`` below).

Run ``python models/mixed.py`` for a short NG-HVI fit of Example 1.
"""

from __future__ import annotations

import torch

import pyro
import pyro.distributions as dist

#: correlation of the five covariates in Examples 1 and 2 of the paper
RHO = torch.tensor(
    [
        [1.0, 0.0, -0.5, 0.2, 0.0],
        [0.0, 1.0, 0.0, -0.5, 0.2],
        [-0.5, 0.0, 1.0, 0.0, -0.5],
        [0.2, -0.5, 0.0, 1.0, 0.0],
        [0.0, 0.2, -0.5, 0.0, 1.0],
    ]
)
#: fixed effects of Example 1 (intercept first)
BETA_EXAMPLE1 = torch.tensor([0.8292, -1.3250, 0.9909, 1.6823, -1.7564, 0.0580])


def _check_design(X, group, num_groups, y):
    if X.dim() != 2:
        raise ValueError(f"X must be (n, num_covariates), got shape {tuple(X.shape)}")
    if group.shape != X.shape[:1]:
        raise ValueError(f"group must have shape ({X.shape[0]},), got {tuple(group.shape)}")
    if group.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group must hold integer group indices, got dtype {group.dtype}")
    if len(group) and (int(group.min()) < 0 or int(group.max()) >= num_groups):
        raise ValueError(f"group indices must lie in [0, {num_groups}), got [{int(group.min())}, {int(group.max())}]")
    if y is not None and y.shape != X.shape[:1]:
        raise ValueError(f"y must have shape ({X.shape[0]},), got {tuple(y.shape)}")


def linear_random_intercept(X, group, num_groups: int, y=None):
    """
    Example 1: ``y_ij ~ N(x_ij^T beta + alpha_i, sigma2_e)``, ``alpha_i ~ N(0, sigma2_a)``,
    ``beta ~ N(0, 100 I)``, ``sigma2_a, sigma2_e ~ InverseGamma(1.01, 1.01)``.
    Global: ``beta``, ``sigma2_a``, ``sigma2_e``; local: ``alpha`` (one per group).
    """
    _check_design(X, group, num_groups, y)
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 10.0).to_event(1))
    sigma2_a = pyro.sample("sigma2_a", dist.InverseGamma(X.new_tensor(1.01), 1.01))
    sigma2_e = pyro.sample("sigma2_e", dist.InverseGamma(X.new_tensor(1.01), 1.01))
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(0.0, sigma2_a.sqrt()))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ beta + alpha[group], sigma2_e.sqrt()), obs=y)


def logistic_random_intercept(X, group, num_groups: int, y=None):
    """
    ``y_ij ~ Bernoulli(logits = x_ij^T beta + alpha_i)``, ``alpha_i ~ N(0, sigma2_a)``,
    ``beta ~ N(0, 100 I)``, ``sigma2_a ~ InverseGamma(1.01, 1.01)``.
    """
    _check_design(X, group, num_groups, y)
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 10.0).to_event(1))
    sigma2_a = pyro.sample("sigma2_a", dist.InverseGamma(X.new_tensor(1.01), 1.01))
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(0.0, sigma2_a.sqrt()))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ beta + alpha[group]), obs=y)


def relu_features(X, weights):
    """Last hidden layer ``[1, relu(W_L [1, ... relu(W_1 x)])]`` of a ReLU network; ``X`` has its ones column."""
    h = X
    for W in weights:
        h = torch.cat([h.new_ones(h.shape[:-1] + (1,)), torch.relu(h @ W.transpose(-1, -2))], -1)
    return h


def deep_mixed_globals(X, hidden=(5, 5)):
    """The global sites of the deep mixed model and their priors: ReLU weights ``W{l}`` and
    ``beta`` ~ N(0, 100), ``tau2_k``, ``sigma2_e`` ~ InverseGamma(1.01, 1.01)."""
    sizes = [X.shape[1] - 1] + list(hidden)
    weights = [
        pyro.sample(f"W{l + 1}", dist.Normal(X.new_zeros(sizes[l + 1], sizes[l] + 1), 10.0).to_event(2))
        for l in range(len(hidden))
    ]
    r = sizes[-1] + 1
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(r), 10.0).to_event(1))
    tau2 = pyro.sample("tau2", dist.InverseGamma(X.new_full((r,), 1.01), 1.01).to_event(1))
    sigma2_e = pyro.sample("sigma2_e", dist.InverseGamma(X.new_tensor(1.01), 1.01))
    return weights, beta, tau2, sigma2_e


def deep_mixed_model(X, group, num_groups: int, y=None, hidden=(5, 5)):
    """
    Example 2a: ``y_ij ~ N(z(x_ij; W)^T (beta + alpha_i), sigma2_e)`` with ``z`` the ReLU
    features of ``hidden`` layers (plus a bias), ``alpha_i ~ N(0, diag(tau2))``,
    ``W, beta ~ N(0, 100)``, ``tau2_k, sigma2_e ~ InverseGamma(1.01, 1.01)``.
    (The paper puts an inverse-Wishart prior on a full random-effect covariance; here it is
    diagonal.)  Global: ``W{l}``, ``beta``, ``tau2``, ``sigma2_e``; local: ``alpha`` (``num_groups x r``).
    """
    _check_design(X, group, num_groups, y)
    weights, beta, tau2, sigma2_e = deep_mixed_globals(X, hidden)
    r = beta.shape[-1]
    with pyro.plate("groups", num_groups):
        alpha = pyro.sample("alpha", dist.Normal(X.new_zeros(r), tau2.sqrt()).to_event(1))
    features = relu_features(X, weights)
    with pyro.plate("data", X.shape[0]):
        mean = (features * (beta + alpha[group])).sum(-1)
        return pyro.sample("y", dist.Normal(mean, sigma2_e.sqrt()), obs=y)


# ---- simulators -----------------------------------------------------------------------------
def _covariates(n: int, generator: torch.Generator) -> torch.Tensor:
    chol = torch.linalg.cholesky(RHO)
    x = torch.randn(n, 5, generator=generator) @ chol.T  # Gaussian copula with N(0,1) margins
    return torch.cat([torch.ones(n, 1), x], -1)


def _split(X, y, group, group_size, fractions, alpha):
    """Per group: first rows train, then the next rows for each later split, as in the paper."""
    within = torch.arange(X.shape[0]) % group_size
    bounds = torch.tensor([0.0] + list(fractions)).cumsum(0).mul(group_size).round().long()
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keep = (within >= lo) & (within < hi)
        out.append({"X": X[keep], "y": y[keep], "group": group[keep], "num_groups": int(group.max()) + 1})
    out[0]["alpha"] = alpha
    return out


def simulate_linear_random_intercept(
    num_groups: int = 1000,
    group_size: int = 10,
    sigma2_a: float = 1.0,
    sigma2_e: float = 1.0,
    train_fraction: float = 0.5,
    seed: int = 0,
):
    """Example 1 data: ``num_groups x group_size`` rows, the first half of each group for training.

    Returns ``(train, test)`` dicts with ``X, y, group, num_groups`` (train also the true ``alpha``).
    """
    g = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    X = _covariates(n, g)
    group = torch.arange(num_groups).repeat_interleave(group_size)
    alpha = torch.randn(num_groups, generator=g) * sigma2_a**0.5
    y = X @ BETA_EXAMPLE1 + alpha[group] + torch.randn(n, generator=g) * sigma2_e**0.5
    return tuple(_split(X, y, group, group_size, (train_fraction, 1 - train_fraction), alpha))


def simulate_logistic_random_intercept(
    num_groups: int = 1000, group_size: int = 10, sigma2_a: float = 1.0, train_fraction: float = 0.5, seed: int = 0
):
    """Logistic random-intercept data with Example 1's covariates and fixed effects."""
    g = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    X = _covariates(n, g)
    group = torch.arange(num_groups).repeat_interleave(group_size)
    alpha = torch.randn(num_groups, generator=g) * sigma2_a**0.5
    y = torch.bernoulli(torch.sigmoid(X @ BETA_EXAMPLE1 + alpha[group]), generator=g)
    return tuple(_split(X, y, group, group_size, (train_fraction, 1 - train_fraction), alpha))


#: true network of Example 2 (the authors' ``data_sim.m``): rows are units, first column the bias
DEEP_WEIGHTS = (
    torch.tensor(
        [
            [-0.1707, 0.1172, -0.1895, -0.2492, 0.0248, -0.0832],
            [0.1504, -0.1364, 1.2092, 0.1060, 0.1503, -0.1479],
            [0.2405, 0.0685, -0.9980, -0.1831, -0.5280, -0.1237],
            [-0.0778, 0.1822, -0.1251, 1.0701, -0.1563, 0.0894],
            [0.1122, -0.1326, 0.1913, -0.1283, -0.1156, 0.1055],
        ]
    ),
    torch.tensor(
        [
            [2.0222, -0.4532, 0.5586, -1.2149, -0.6363, 1.0118],
            [1.0507, 0.5432, 1.1082, -1.2565, 0.2018, 0.5704],
            [-0.0383, -0.3346, 1.0881, -0.5966, 1.0482, -0.9536],
            [1.0308, 0.2975, 1.0769, 1.4464, -0.5461, 0.1874],
            [1.9315, 1.0029, -1.2876, -0.1965, -0.4191, 0.9219],
        ]
    ),
)
DEEP_BETA = torch.tensor([0.8292, -1.3250, 3.9909, 1.6823, -1.7564, 0.5580])
DEEP_TAU2 = torch.tensor([0.9576, 0.1105, 2.1886, 1.9268, 3.4999, 0.3630])


def simulate_deep_mixed(num_groups: int = 1000, group_size: int = 10, sigma2_e: float = 20.0, seed: int = 0):
    """Example 2a data (n = num_groups x group_size; per group 60% train, 20% validation, 20% test)."""
    g = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    X = _covariates(n, g)
    group = torch.arange(num_groups).repeat_interleave(group_size)
    alpha = torch.randn(num_groups, 6, generator=g) * DEEP_TAU2.sqrt()
    features = relu_features(X, DEEP_WEIGHTS)
    y = (features * (DEEP_BETA + alpha[group])).sum(-1) + torch.randn(n, generator=g) * sigma2_e**0.5
    return tuple(_split(X, y, group, group_size, (0.6, 0.2, 0.2), alpha))


if __name__ == "__main__":
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from pyro.infer import SVI

    from pyro_cavi.nghvi import GaussianConditional, HybridELBO, HybridGuide, NGHVIOptim

    pyro.set_rng_seed(0)
    train, _ = simulate_linear_random_intercept(num_groups=200)
    args = (train["X"], train["group"], train["num_groups"], train["y"])
    guide = HybridGuide(linear_random_intercept, GaussianConditional("alpha"), rank=3)
    svi = SVI(linear_random_intercept, guide, NGHVIOptim(), HybridELBO(guide.conditional))
    for step in range(1501):
        loss = svi.step(*args)
        if step % 300 == 0:
            print(f"step {step:5d}  ELBO {-loss:10.2f}")
    theta = guide.global_guide.median(*args)
    print("beta:", [round(v, 3) for v in theta["beta"].tolist()])
    print("true:", [round(v, 3) for v in BETA_EXAMPLE1.tolist()])
