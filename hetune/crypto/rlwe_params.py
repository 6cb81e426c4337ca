"""Parameter sets of the batched RLWE scheme and the noise analysis that fixes Delta and the widths.

Ring Z_q[X]/(X^N + 1), q = 2^64, binary secret, TUniform(b) noise (uniform on
[-2^b, 2^b], the ends at half weight; :func:`hetune.crypto.randomness.t_uniform`).

Noise of one output coefficient. The worker's product carries

    sum_j W[o, j] (e_j + r_j)  +  (mask-result rounding) * s  +  (body-result rounding)

with e_j fresh TUniform(b), r_j the owner's rounding of b to ``input_bits`` (uniform in
+-u_in/2, u_in = 2^(64 - input_bits)), the mask result a rounded to k_a bits (uniform in
+-u_a/2, u_a = 2^(64 - k_a); times the binary s it sums at most N terms) and the body
result to k_b bits (+-u_b/2). Every term is independent, zero-mean and sub-Gaussian:
TUniform(b) is a sum of independent signs (randomness.t_uniform), so its variance
(2^(2b+1) + 1) / 6 is its variance proxy; a rounding error of range u has proxy u^2/4
(Hoeffding). The variance proxy of the sum is

    v = ||W[o, :]||_2^2 ((2^(2b+1) + 1)/6 + u_in^2/4)  +  N u_a^2/4  +  u_b^2/4.

Decryption computes the mask result times s with ONE float64 FFT (ring.BinaryPolyMultiplier.mul_top)
on a trimmed to k_a <= ``fft_bits`` bits (53 - log2 N: the exact product stays below 2^52),
which adds at most F = small_product_error(N, k_a) 2^(64 - k_a), about 2^28 (Percival's
bound: deterministic, so it is subtracted from the margin). Decoding round(phase / Delta)
is exact while |noise| < Delta/2 - F, so per value

    P(failure) <= 2 exp(-(Delta/2 - F)^2 / (2 v)),

at most 2^-100 while (Delta/2 - F)^2 >= 2 ln(2^101) v.

Delta is the smallest power of two that passes for the worst 8-bit op of a Llama-class
model with unfused inputs up to 8192 wide (|w| = 127 everywhere, ||w||_2 = 127 sqrt(8192)),
the mask result at the widest width decryption uses and the body result unrounded; the
result budget is what Delta leaves of the 64 bits. At p128 (TUniform(17): std 2^16.2,
against 2^15.7 for the Gaussian this set used before) that worst case has
sqrt(2 ln(2^101) v) = 2^33.4, so Delta = 2^35 and the budget is 29 bits (it was 2^34 and
30 with the Gaussian; Delta = 2^34 would bound the worst case's failure by 2^-65 only).
``compile`` and the worker check each op's actual norm against :attr:`RlweParamSet.max_weight_l2`,
and the worker rounds each op's outputs to the fewest bits its norm allows.

Security: LWE of dimension N, q = 2^64, binary secret. p128 is tfhe-rs's 128-bit GLWE
noise for k = 1, N = 2048: ``glwe_noise_distribution: DynamicDistribution::new_t_uniform(17)``
in its default CPU set V1_4_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128
(tfhe/src/shortint/parameters/v1_4/classic/tuniform/p_fail_2_minus_128/ks_pbs.rs, which
v1_6 re-exports) and in V1_6_PARAM_GPU_MESSAGE_1_CARRY_1_KS_PBS_TUNIFORM_2M128 (.../v1_6/
classic/tuniform/p_fail_2_minus_128/ks_pbs_gpu.rs); tfhe-rs derives the bound from
``minimal_glwe_variance_for_132_bits_security_tuniform`` (tfhe/src/core_crypto/commons/
noise_formulas/secure_noise.rs: at N = 2048, q = 2^64 its exponent is 16.56, rounded up
to 17) and checks every set with the lattice estimator (ci/lattice_estimator.sage:
primal uSVP and dual hybrid, BDGL16 cost model, 127-bit floor). Our own estimate
(:mod:`hetune.crypto.security`, Zama's curves fitted for Gaussian noise) takes the
noise's standard deviation, as the estimator does. p192 and p256 use N = 4096 with the
smallest TUniform bound whose std reaches the smallest Gaussian sigma the curves allow
(tfhe-rs's ``variance_to_tuniform_bound_log2``: sigma 4 -> b = 3, sigma 2^8.3 -> b = 10),
extrapolated past the curves' fitted range (n <= 2048) and cross-checked against the HE
standard's table (Albrecht et al. 2018: n = 4096 gives 192 bits up to log q = 75 and 256
bits up to log q = 58 at sigma 3.2, i.e. q / sigma <= 2^56.3, which sigma 2^8.3 meets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetune.crypto.ring import small_product_bits, small_product_error
from hetune.crypto.security import SecurityEstimate, lwe_security

LOG2_Q = 64
FAILURE_LOG2 = -100
TAIL_FACTOR = 2 * (1 - FAILURE_LOG2) * math.log(2)  # (Delta/2 - F)^2 >= TAIL_FACTOR * v  <=>  failure <= 2^-100
WORST_WEIGHT_L2 = 127 * math.sqrt(8192)  # 8-bit weights, widest unfused input of Llama-3.2-1B / -3B


def wire_bits(bits: int) -> int:
    """The width a value travels at: ``bits``, or the next whole byte where that costs at most 3 bits.

    Past a whole byte every bit is a bit plane to pack and unpack (rlwe_wire): at 33 bits one
    plane saves 7 bits a value, at 39 seven planes would save one.
    """
    return bits if bits % 8 <= 4 else -(-bits // 8) * 8


def _rounding_variance(bits: int) -> float:
    """Variance proxy of rounding a 64-bit value to its top ``bits`` bits (range u = 2^(64 - bits))."""
    return 4.0 ** (LOG2_Q - bits) / 4 if bits < LOG2_Q else 0.0


@dataclass(frozen=True)
class RlweParamSet:
    name: str
    n: int  # ring degree: tokens per ciphertext block
    noise_bound_log2: int  # fresh noise TUniform(b): uniform on [-2^b, 2^b], ends at half weight
    source: str
    input_bits: int = 48  # the client sends the top bits of b (masks travel as seeds)

    @property
    def noise_variance(self) -> float:
        return (2.0 ** (2 * self.noise_bound_log2 + 1) + 1) / 6

    @property
    def noise_std(self) -> float:
        return math.sqrt(self.noise_variance)

    @property
    def input_variance(self) -> float:
        """Variance proxy of one input coefficient's noise: fresh TUniform and the rounding of b."""
        return self.noise_variance + _rounding_variance(self.input_bits)

    @property
    def fft_bits(self) -> int:
        """Widest mask result the one-FFT decryption multiplies by s (wider results are trimmed to it first)."""
        return small_product_bits(self.n)

    def decrypt_error(self, mask_bits: int = LOG2_Q) -> float:
        """F: the one-FFT product's deterministic error in the phase, for a mask result of ``mask_bits``."""
        k = min(mask_bits, self.fft_bits)
        return small_product_error(self.n, k) * 2.0 ** (LOG2_Q - k)

    def output_variance(self, mask_bits: int, body_bits: int) -> float:
        return self.n * _rounding_variance(min(mask_bits, self.fft_bits)) + _rounding_variance(body_bits)

    def variance(self, weight_l2: float, mask_bits: int = LOG2_Q, body_bits: int = LOG2_Q) -> float:
        return weight_l2**2 * self.input_variance + self.output_variance(mask_bits, body_bits)

    @property
    def log2_delta(self) -> int:
        margin = math.sqrt(TAIL_FACTOR * self.variance(WORST_WEIGHT_L2)) + self.decrypt_error()
        return math.ceil(math.log2(2 * margin))

    @property
    def budget_bits(self) -> int:
        """Signed result bits that decode: |raw| < 2^(budget_bits - 1)."""
        return LOG2_Q - self.log2_delta

    def noise_limit(self, mask_bits: int = LOG2_Q) -> float:
        """Largest variance proxy v that keeps the failure below 2^-100."""
        return (2.0 ** (self.log2_delta - 1) - self.decrypt_error(mask_bits)) ** 2 / TAIL_FACTOR

    @property
    def max_weight_l2(self) -> float:
        return math.sqrt((self.noise_limit() - self.output_variance(LOG2_Q, LOG2_Q)) / self.input_variance)

    def output_bits(self, weight_l2: float) -> int:
        """Fewest bits per output coefficient (mask and body results alike) that keep decoding exact for this norm."""
        for bits in range(1, LOG2_Q + 1):
            if self.variance(weight_l2, bits, bits) <= self.noise_limit(bits):
                return wire_bits(bits)
        raise ValueError(f"weight L2 norm {weight_l2:.0f} exceeds {self.max_weight_l2:.0f}: decoding cannot be exact")

    def hinted_bits(self, weight_l2: float) -> tuple[int, int]:
        """(hint bits, body bits) with fixed masks: the per-call body result as narrow as it can be, then the hint.

        The hint (the mask result W A, sent once) is trimmed by decryption to ``fft_bits``
        anyway, so it never needs more.
        """
        for body in range(1, LOG2_Q + 1):
            for mask in range(1, self.fft_bits + 1):
                if self.variance(weight_l2, mask, body) <= self.noise_limit(mask):
                    return wire_bits(mask), wire_bits(body)
        raise ValueError(f"weight L2 norm {weight_l2:.0f} exceeds {self.max_weight_l2:.0f}: decoding cannot be exact")

    @property
    def security(self) -> SecurityEstimate:
        return lwe_security(self.n, self.noise_std * 2.0**-LOG2_Q)


_TFHE = ("tfhe-rs 128-bit GLWE (k=1, N=2048): TUniform(17) as in V1_4_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128, "
         "from minimal_glwe_variance_for_132_bits_security_tuniform")
_CURVES = "Zama lattice-estimator curves, smallest sigma for the level as a TUniform std (extrapolated to N=4096; HE standard agrees)"
PARAM_SETS: dict[str, RlweParamSet] = {
    "p128": RlweParamSet("p128", 2048, 17, _TFHE),
    "p192": RlweParamSet("p192", 4096, 3, _CURVES),  # std 4.6 >= the curves' floor sigma = 4 (HE standard: 3.2)
    "p256": RlweParamSet("p256", 4096, 10, _CURVES),  # std 2^9.2 >= the curve minimum 2^8.21 for 256 bits at n = 4096
}
DEFAULT_PARAM_SET = "p128"
