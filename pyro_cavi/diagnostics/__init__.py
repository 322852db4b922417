"""Can I trust this fit? Diagnostics of variational posteriors for every engine and any Pyro guide
(Yao, Vehtari, Simpson & Gelman, "Yes, but did it work? Evaluating variational inference", ICML 2018).

- :func:`psis` -- Pareto k-hat, PSIS-smoothed weights, ESS and importance-corrected moments.
- :func:`vsbc` -- simulation-based calibration of a variational method, with :func:`plot_vsbc`.
- :func:`chain_summary` -- one row per restart of ``to_inference_data([fit, ...])``: ELBO, best
  chain, PSIS k-hat, and the largest R-hat across chains.
"""

from .chains import chain_summary
from .psis import PSISResult, khat_reading, psis
from .ratios import log_importance_ratios
from .vsbc import VSBCResult, calibration_tests, plot_vsbc, vsbc

__all__ = [
    "PSISResult",
    "VSBCResult",
    "calibration_tests",
    "chain_summary",
    "khat_reading",
    "log_importance_ratios",
    "plot_vsbc",
    "psis",
    "vsbc",
]
