"""CAVI: conjugacy-detecting coordinate-ascent variational inference for Pyro models."""

from .cavi import CAVI, CAVIResult
from .conditional import CAVIConditional
from .errors import NonConjugateError

__all__ = ["CAVI", "CAVIConditional", "CAVIResult", "NonConjugateError"]
