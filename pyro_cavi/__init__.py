"""pyro_cavi: closed-form, mixture, natural-gradient and amortised inference engines for Pyro models.

- :class:`CAVI` -- conjugacy-detecting coordinate-ascent VI (no guide, no optimiser).
- :class:`MISELBO` -- an ELBO for mixture guides (A2A, S2A, S2S estimators).
- :mod:`pyro_cavi.nghvi` -- natural-gradient hybrid VI (:class:`NGHVIOptim`, :class:`HybridELBO`).
- :class:`ForwardKL` -- amortised inference by the expected forward KL.
- :func:`to_inference_data` -- export any fit to ArviZ; :mod:`pyro_cavi.diagnostics` -- PSIS, VSBC.
"""

from . import diagnostics
from .arviz_export import to_inference_data
from .cavi import CAVI, CAVIConditional, CAVIResult, NonConjugateError
from .distributions import StickBreakingCategorical
from .forward_kl import AmortisedPosterior, ForwardKL
from .miselbo import MISELBO, AmortizedMixtureGuide, MixtureEncoder, MixtureGuide, mis_log_likelihood
from .diagnostics import PSISResult, VSBCResult, chain_summary, plot_vsbc, psis, vsbc
from .nghvi import GaussianConditional, HybridELBO, HybridGuide, NGHVIOptim, PolyaGammaGibbs, SGHVIOptim

__all__ = [
    "AmortisedPosterior",
    "AmortizedMixtureGuide",
    "CAVI",
    "CAVIConditional",
    "CAVIResult",
    "ForwardKL",
    "GaussianConditional",
    "HybridELBO",
    "HybridGuide",
    "MISELBO",
    "MixtureEncoder",
    "MixtureGuide",
    "NGHVIOptim",
    "NonConjugateError",
    "PSISResult",
    "PolyaGammaGibbs",
    "SGHVIOptim",
    "VSBCResult",
    "chain_summary",
    "diagnostics",
    "StickBreakingCategorical",
    "mis_log_likelihood",
    "plot_vsbc",
    "psis",
    "to_inference_data",
    "vsbc",
]
__version__ = "0.1.0"
