"""
NG-HVI: natural-gradient hybrid variational inference (Zhang, Smith, Maneesoonthorn,
Loaiza-Maya 2023, arXiv:2302.13536).

Usage::

    guide = HybridGuide(model, GaussianConditional("alpha"), rank=3)
    svi = SVI(model, guide, NGHVIOptim(), loss=HybridELBO(guide.conditional))
"""

from .conditionals import GaussianConditional, PolyaGammaGibbs, gaussian_from_quadratic
from .guide import HybridGuide
from .hybrid_elbo import HybridELBO
from .natural_gradient import FactorGaussianFisher, conjugate_gradient, natural_gradient
from .optim import NaturalGradientAdadelta, NGHVIOptim, SGHVIOptim

__all__ = [
    "FactorGaussianFisher",
    "GaussianConditional",
    "HybridELBO",
    "HybridGuide",
    "NGHVIOptim",
    "NaturalGradientAdadelta",
    "PolyaGammaGibbs",
    "SGHVIOptim",
    "conjugate_gradient",
    "gaussian_from_quadratic",
    "natural_gradient",
]
