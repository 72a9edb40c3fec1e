"""Tolerances that hold on any CPU: what float64 summation in any order guarantees.

Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed., 2002), section 4.2: a float64 sum
of n terms, in any order (recursive, pairwise, blocked, vectorised), is within (n - 1)·u·Σ|x_i| of the
exact sum, u = 2^-53 the unit roundoff. Two computations of the same sum in different orders (the
code under test and a reference, or two CPUs with different SIMD widths) then differ by at most
twice that. A test compares them with that bound, never with a fixed 1e-14: a float64 sum of 90,000
terms legitimately differs by ~1e-14 relative between an Intel and an AMD machine.
"""

from __future__ import annotations

import torch

#: unit roundoff of float64
U64 = 2.0**-53
#: unit roundoff of float32
U32 = 2.0**-24


def sum_tol(n: int, abs_sum: float, sums: int = 2, ulps_per_term: float = 0.0, u_term: float = U64) -> float:
    """Largest difference between ``sums`` float64 evaluations (summed in any order) of a sum of ``n``
    terms with Σ|x_i| = ``abs_sum``: sums·(n + ulps_per_term·u_term/U64)·2^-53·Σ|x_i|.

    ``ulps_per_term`` roundings of unit ``u_term`` in forming each term (a product, a quotient, a
    square root) add ulps_per_term·u_term·|x_i| per term and evaluation.
    """
    return sums * (n * U64 + ulps_per_term * u_term) * abs_sum


def rel_sum_tol(n: int, sums: int = 2) -> float:
    """:func:`sum_tol` relative to the sum itself, for sums of non-negative terms (Σ|x_i| = Σx_i),
    e.g. squared norms made of exact float64 squares of float32 values: sums·n·2^-53."""
    return sums * n * U64


def abs_sum(*factors: torch.Tensor) -> float:
    """Σ|x_i| of the element-wise product of ``factors``, in float64 (for :func:`sum_tol`)."""
    prod = factors[0].double().abs()
    for f in factors[1:]:
        prod = prod * f.double().abs()
    return float(prod.sum())
