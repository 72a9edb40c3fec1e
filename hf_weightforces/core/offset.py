"""From the force budget to the Weibull scale: the RMS-to-Weibull offset (docs/weibull.md).

σ(t) is the RMS of a group, σ(t)² = ||w(t)||² / n.  The forces predict it by integration from a
known start:

    σ_pred(t)² = (||w(t0)||² + Σ_{s<t} (A + I + D)_s) / n

and two bridges carry σ to the Weibull scale λ:

* Γ bridge: an exact Weibull has σ = λ sqrt(Γ(1 + 2/k)), so λ_Γ = σ / sqrt(Γ(1 + 2/k));
* k-lock bridge (the paper's): the ratio λ/σ measured at a reference time is held fixed,
  λ_lock = σ · (λ/σ)_ref.  The live keys lock it at the run's start fit and log it as
  ``offset_klock_ratio``; ``hf-weightforces lambda`` uses the same one by default (``--lock start``),
  or the first fit after its anchor, or the research code's mean over the run (``--lock first|mean``).

Each component is a relative error against the fitted λ (or against σ for the integration):

    integration = σ_pred / σ - 1
    bridge      = bridge(σ) / λ - 1
    total       = bridge(σ_pred) / λ - 1

Integrating every step leaves only the dropped rest R in the integration component; integrating
forces recorded every N steps (rectangle rule, each sample standing for the N steps up to it: the
right-point rule) shows what sparse recording costs.  Reference: Ding, arXiv:2606.19367.
"""

from __future__ import annotations

import math

__all__ = ["gamma_bridge", "offset_components", "predicted_rms"]


def gamma_bridge(sigma: float, k: float) -> float:
    """λ_Γ = σ / sqrt(Γ(1 + 2/k))."""
    if not (k > 0 and math.isfinite(k)):
        return math.nan
    return sigma / math.sqrt(math.gamma(1.0 + 2.0 / k))


def predicted_rms(norm2_start: float, integrated_forces: float, numel: float) -> float:
    """σ_pred = sqrt((||w(t0)||² + Σ(A + I + D)) / n); NaN if the prediction goes negative."""
    value = (norm2_start + integrated_forces) / numel if numel > 0 else math.nan
    return math.sqrt(value) if value >= 0 else math.nan


def offset_components(
    sigma: float, sigma_pred: float, k: float, scale: float, lock_ratio: float
) -> dict[str, float]:
    """The offset split for one group: integration, both bridges and both totals.

    ``lock_ratio`` is (λ/σ) at the reference time (train start) for the k-lock bridge.
    """
    def rel(a: float, b: float) -> float:
        return a / b - 1.0 if b and math.isfinite(a) and math.isfinite(b) else math.nan

    return {
        "offset_integration": rel(sigma_pred, sigma),
        "offset_bridge_gamma": rel(gamma_bridge(sigma, k), scale),
        "offset_bridge_klock": rel(sigma * lock_ratio, scale),
        "offset_total_gamma": rel(gamma_bridge(sigma_pred, k), scale),
        "offset_total_klock": rel(sigma_pred * lock_ratio, scale),
    }
