"""MISELBO: mixture guides trained with the multiple importance sampling ELBO (Kviman et al.
2022) and its efficient S2A / S2S estimators (Hotti et al., ICML 2024)."""
from .amortized import AmortizedMixtureGuide, MixtureEncoder
from .base import BaseMixtureGuide, ComponentSamples
from .evaluation import mis_log_likelihood
from .miselbo import MISELBO
from .mixture_guide import MixtureGuide

__all__ = [
    "AmortizedMixtureGuide",
    "BaseMixtureGuide",
    "ComponentSamples",
    "MISELBO",
    "MixtureEncoder",
    "MixtureGuide",
    "mis_log_likelihood",
]
