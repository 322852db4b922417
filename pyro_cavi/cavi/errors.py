"""Errors raised by the CAVI engine."""

from __future__ import annotations


class NonConjugateError(ValueError):
    """The model is not conditionally conjugate where CAVI needs it to be.

    The message names the latent site, the site where conjugacy fails and the
    operation that breaks it, e.g. ``rate of 'y' is exp(...) of 'log_rate'``.
    """


class _Densify(Exception):
    """Internal signal: a Gaussian site's plate elements are coupled, so its factor
    must be one joint Gaussian over the whole site. The tracer retries."""

    def __init__(self, site: str):
        super().__init__(site)
        self.site = site
