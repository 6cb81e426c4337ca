"""Security estimate of LWE/GLWE parameters from Zama's lattice-estimator security curves.

No lattice-estimator is installed here, so we use the curves Zama fitted with it for
TFHE parameters (concrete-optimizer / Concrete compiler ``V0Curves``): for a target
security level lambda, an LWE instance with dimension ``n``, modulus ``q = 2^64``,
uniform binary secret and Gaussian noise of standard deviation ``sigma`` (as a fraction
of q) reaches lambda bits when

    log2(sigma) >= max(a_lambda * n + b_lambda, 2 - log2(q))   and   n >= n_min(lambda).

The curves were fitted by running the lattice-estimator (BKZ sieve cost model, usvp /
dual / mitm attacks) over n = 128..2048 and checking each fit stays above lambda there.
We report the largest of the four fitted levels a parameter set satisfies: a certified
lower bound, not an interpolation. A GLWE(k, N) key is an LWE key of dimension k*N.
Beyond n = 2048 the linear fit is extrapolated; the result is flagged so, and the
Homomorphic Encryption Standard (Albrecht et al. 2018, ternary secrets, classical
cost) table agrees for the one such set we ship (docs/privtuner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# lambda -> (slope a, intercept b, minimal n), q = 2^64, binary secret. Source: Concrete's
# security curves (V0Curves.h; the sage script that fitted them reports min security
# 80.36 / 128.02 / 192.19 / 256.25 bits over n in [n_min, 2048]).
CURVES: dict[int, tuple[float, float, int]] = {
    80: (-0.04047677865612648, 1.1433465085639063, 128),
    128: (-0.026374888765705498, 2.012143923330495, 211),
    192: (-0.018504919354426233, 2.6634073426215843, 432),
    256: (-0.014327640360322604, 2.899270827311091, 781),
}
FITTED_MAX_N = 2048
CURVE_LOG2_Q = 64


@dataclass(frozen=True)
class SecurityEstimate:
    bits: int  # largest curve level met (0: below 80 bits)
    n: int
    log2_sigma: float  # noise std as a fraction of q, log2
    extrapolated: bool  # n beyond the curves' fitted range


def min_log2_sigma(level: int, n: int, log2_q: int = CURVE_LOG2_Q) -> float:
    """Smallest log2(sigma / q) that gives ``level`` bits at dimension ``n``."""
    a, b, _ = CURVES[level]
    return max(a * n + b, 2.0 - log2_q)


def lwe_security(n: int, sigma: float, log2_q: int = CURVE_LOG2_Q) -> SecurityEstimate:
    """Certified security level of LWE(n, q, sigma); ``sigma`` is the std as a fraction of q."""
    if log2_q != CURVE_LOG2_Q:
        raise ValueError(f"the curves are fitted for q = 2^{CURVE_LOG2_Q}, not 2^{log2_q}")
    log2_sigma = math.log2(sigma)
    met = [lvl for lvl, (_, _, n_min) in CURVES.items() if n >= n_min and log2_sigma >= min_log2_sigma(lvl, n) - 1e-9]
    return SecurityEstimate(max(met, default=0), n, log2_sigma, n > FITTED_MAX_N)
