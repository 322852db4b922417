"""CAVI: conjugacy-detecting coordinate-ascent variational inference for Pyro models."""

from .cavi import CAVI, CAVIResult
from .errors import NonConjugateError

__all__ = ["CAVI", "CAVIResult", "NonConjugateError"]
