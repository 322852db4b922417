"""Can I trust this fit? Diagnostics of variational posteriors for every engine and any Pyro guide.

- :func:`psis` -- Pareto k-hat, PSIS-smoothed weights, ESS and importance-corrected moments
  (Yao, Vehtari, Simpson & Gelman, "Yes, but did it work? Evaluating variational inference", 2018).
"""

from .psis import PSISResult, khat_reading, psis
from .ratios import log_importance_ratios

__all__ = ["PSISResult", "khat_reading", "log_importance_ratios", "psis"]
