"""ForwardKL: amortised inference by the expected forward KL (McNamara et al., NeurIPS 2024).

Example::

    def model(x):
        theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        with pyro.plate("data", 5):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x)

    guide = AmortisedPosterior(NTKMLP(5, 2, width=256), {"theta": DiagonalNormalHead()})
    fit = ForwardKL(model, guide, pyro.optim.Adam({"lr": 1e-3}), num_simulations=256)
    for _ in range(2000):
        fit.step(x_obs)                  # B fresh (θ, x) ~ p(θ, x), one vectorised plate
    fit.posterior(x_obs)["theta"]        # q(θ | x_obs), a torch Distribution
    Predictive(model, guide=fit.guide, num_samples=1000)(x_obs)
"""

from .forward_kl import ForwardKL
from .guide import AmortisedPosterior
from .heads import (
    CategoricalHead,
    DiagonalNormalHead,
    DirichletHead,
    ExponentialFamilyHead,
    GammaHead,
    MultivariateNormalHead,
    VonMisesHead,
)
from .networks import MeanPoolEncoder, NTKLinear, NTKMLP, SetTransformer

__all__ = [
    "ForwardKL",
    "AmortisedPosterior",
    "ExponentialFamilyHead",
    "DiagonalNormalHead",
    "MultivariateNormalHead",
    "VonMisesHead",
    "GammaHead",
    "DirichletHead",
    "CategoricalHead",
    "NTKLinear",
    "NTKMLP",
    "MeanPoolEncoder",
    "SetTransformer",
]
