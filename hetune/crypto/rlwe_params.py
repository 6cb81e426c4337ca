"""Parameter sets of the batched RLWE scheme and the noise analysis that fixes Delta and the widths.

Ring Z_q[X]/(X^N + 1), q = 2^64, binary secret, rounded Gaussian noise. An output
coefficient of the worker's product carries the noise

    sum_j W[o, j] (e_j + r_j)  +  (A_out rounding) * s  +  (B_out rounding)

with e_j fresh Gaussian (std sigma), r_j the client's rounding of b to ``input_bits``
(uniform in +-u_in/2, u_in = 2^(64 - input_bits)) and the worker's rounding of its
outputs to ``out_bits`` (uniform in +-u/2, u = 2^(64 - out_bits); times the binary s it
sums at most N such terms). All terms are independent and sub-Gaussian, so with variance
proxy

    v = ||W[o, :]||_2^2 (sigma^2 + 1/4 + u_in^2 / 4)  +  (N + 1) u^2 / 4

P(|noise| >= Delta / 2) <= 2 exp(-(Delta / 2)^2 / (2 v)), and decoding is exact with
failure probability at most 2^-100 per value while (Delta / 2)^2 >= 2 ln(2^101) v.

Delta is the smallest power of two that passes for the worst 8-bit op of a Llama-class
model with unfused inputs up to 8192 wide (|w| = 127 everywhere, ||w||_2 = 127 sqrt(8192))
and no output rounding; the result budget is what Delta leaves of the 64 bits. ``compile``
and the worker check each op's actual norm against :attr:`RlweParamSet.max_weight_l2`, and
the worker rounds each op's outputs to the fewest bytes its norm allows.

Security: LWE of dimension N, q = 2^64, binary secret, from Zama's lattice-estimator
curves (:mod:`hetune.crypto.security`). p128 is tfhe-rs' 128-bit GLWE set (k = 1,
N = 2048; its sigma from ``minimal_variance_for_132_bits_security_gaussian``,
tfhe/src/core_crypto/commons/noise_formulas/secure_noise.rs), also concrete-ml-extensions'
PARAMS_8B_2048_NEW. p192 and p256 use N = 4096 with the smallest sigma the curves allow,
extrapolated past their fitted range (n <= 2048) and cross-checked against the HE
standard's table (Albrecht et al. 2018: n = 4096 gives 192 bits up to log q = 75 and 256
bits up to log q = 58 at sigma 3.2, i.e. q / sigma <= 2^56.3, which sigma 2^8.3 meets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetune.crypto.security import SecurityEstimate, lwe_security

LOG2_Q = 64
FAILURE_LOG2 = -100
TAIL_FACTOR = 2 * (1 - FAILURE_LOG2) * math.log(2)  # (Delta/2)^2 >= TAIL_FACTOR * v  <=>  failure <= 2^-100
WORST_WEIGHT_L2 = 127 * math.sqrt(8192)  # 8-bit weights, widest unfused input of Llama-3.2-1B / -3B


@dataclass(frozen=True)
class RlweParamSet:
    name: str
    n: int  # ring degree: tokens per ciphertext block
    log2_sigma: float  # fresh noise std as a fraction of q
    source: str
    input_bits: int = 48  # the client sends the top bits of b (masks travel as seeds)

    @property
    def sigma(self) -> float:
        return 2.0 ** (LOG2_Q + self.log2_sigma)

    @property
    def input_variance(self) -> float:
        """Variance proxy of one input coefficient's noise: fresh Gaussian, its rounding, b's rounding."""
        return self.sigma**2 + 0.25 + 4.0 ** (LOG2_Q - self.input_bits) / 4

    def output_variance(self, out_bits: int) -> float:
        return (self.n + 1) * 4.0 ** (LOG2_Q - out_bits) / 4 if out_bits < LOG2_Q else 0.0

    def variance(self, weight_l2: float, out_bits: int) -> float:
        return weight_l2**2 * self.input_variance + self.output_variance(out_bits)

    @property
    def log2_delta(self) -> int:
        return math.ceil(math.log2(2 * math.sqrt(TAIL_FACTOR * self.variance(WORST_WEIGHT_L2, LOG2_Q))))

    @property
    def budget_bits(self) -> int:
        """Signed result bits that decode: |raw| < 2^(budget_bits - 1)."""
        return LOG2_Q - self.log2_delta

    @property
    def _noise_limit(self) -> float:
        return (2.0 ** (self.log2_delta - 1)) ** 2 / TAIL_FACTOR

    @property
    def max_weight_l2(self) -> float:
        return math.sqrt(self._noise_limit / self.input_variance)

    def output_bytes(self, weight_l2: float) -> int:
        """Fewest bytes per output coefficient that keep decoding exact for weight rows of this norm."""
        for nbytes in range(1, 9):
            if self.variance(weight_l2, 8 * nbytes) <= self._noise_limit:
                return nbytes
        raise ValueError(f"weight L2 norm {weight_l2:.0f} exceeds {self.max_weight_l2:.0f}: decoding cannot be exact")

    @property
    def input_bytes(self) -> int:
        return self.input_bits // 8

    @property
    def security(self) -> SecurityEstimate:
        return lwe_security(self.n, 2.0**self.log2_sigma)


_TFHE = "tfhe-rs 128-bit GLWE (k=1, N=2048), minimal_variance_for_132_bits_security_gaussian"
_CURVES = "Zama lattice-estimator curves, smallest sigma for the level (extrapolated to N=4096; HE standard agrees)"
PARAM_SETS: dict[str, RlweParamSet] = {
    "p128": RlweParamSet("p128", 2048, math.log2(2.845267479601915e-15), _TFHE),
    "p192": RlweParamSet("p192", 4096, -62.0, _CURVES),  # the curves' floor: sigma = 4 (HE standard: 3.2)
    "p256": RlweParamSet("p256", 4096, -55.7, _CURVES),  # curve minimum -55.79 for 256 bits at n = 4096
}
DEFAULT_PARAM_SET = "p128"
