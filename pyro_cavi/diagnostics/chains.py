"""A table of the chains of an InferenceData built from several fits (restarts as chains)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def chain_summary(idata: Any, var_names: Optional[Sequence[str]] = None):
    """One row per chain of ``to_inference_data([fit, fit, ...], ...)``: its ELBO (the engine's
    own, or the PSIS Monte Carlo estimate for guides without one), a ``best`` flag on the chain
    with the highest ELBO, and PSIS k-hat, reading and ESS when ``psis=True`` was used.

    ``attrs["max_rhat"]`` of the returned :class:`pandas.DataFrame` is the largest
    :func:`arviz.rhat` over the posterior variables (``var_names``): far above 1 when the fits
    ended in different optima.
    """
    import arviz as az
    import pandas as pd

    attrs = dict(getattr(idata, "attrs", {}) or {})
    num_chains = idata.posterior.sizes["chain"]
    table = pd.DataFrame(index=pd.RangeIndex(num_chains, name="chain"))
    if "chain_elbo" in attrs:
        table["elbo"] = np.asarray(attrs["chain_elbo"], dtype=float)
        table["best"] = table.index == int(attrs["best_chain"])
    for key in ("khat", "reading", "ess"):
        if f"psis_{key}" in attrs:
            table[f"psis_{key}"] = list(attrs[f"psis_{key}"])
    if num_chains > 1:
        rhat = az.rhat(idata, var_names=list(var_names) if var_names is not None else None)
        table.attrs["max_rhat"] = float(max(float(rhat[v].max()) for v in rhat.data_vars))
    return table
