"""Distributions shipped with pyro_cavi."""

from .stick_breaking import StickBreakingCategorical, stick_breaking_log_probs

__all__ = ["StickBreakingCategorical", "stick_breaking_log_probs"]
