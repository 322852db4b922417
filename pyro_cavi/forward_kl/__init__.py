"""ForwardKL: amortised inference by the expected forward KL (McNamara et al., NeurIPS 2024)."""

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
