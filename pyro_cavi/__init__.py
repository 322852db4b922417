"""pyro_cavi: closed-form, mixture, natural-gradient and amortised inference engines for Pyro models.

- :class:`CAVI` -- conjugacy-detecting coordinate-ascent VI (no guide, no optimiser).
- :func:`to_inference_data` -- export any fit to ArviZ.
"""

from .arviz_export import to_inference_data
from .cavi import CAVI, CAVIResult, NonConjugateError

__all__ = ["CAVI", "CAVIResult", "NonConjugateError", "to_inference_data"]
__version__ = "0.1.0"
