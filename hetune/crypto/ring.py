"""Exact arithmetic over Z_{2^64} and Z_{2^64}[X]/(X^N + 1) with float64 kernels.

Both kernels split 64-bit integers into limbs small enough that every float64
intermediate is an exact integer, run the float work (FFT or GEMM) per limb, round, and
recombine with wrapping int64 arithmetic, which *is* arithmetic mod 2^64.

- :class:`BinaryPolyMultiplier`: a (..., N) times a binary secret s, mod (X^N + 1, 2^64).
  Limbs are the two 32-bit words of each value, the low one unsigned and the high one
  signed (a = high 2^32 + low, 0 <= low < 2^32): read straight from memory, no borrow to
  compute. With ||limb||_2 <= 2^32 sqrt(N) and ||s||_2 <= sqrt(N), Percival's bound for an
  FFT product of length N = 2^n (:func:`fft_product_error`: (3n + sqrt5 (3n + 1) +
  3n/sqrt2) eps ||x|| ||y||, eps = 2^-53; n = log2 N, one more than the folded transform's
  length, covers the twists) is below 0.13 at N = 2048 and 0.29 at N = 4096: rounding is
  exact. Every product is below N 2^32 <= 2^44 in magnitude, so adding 1.5 x 2^52 rounds it
  to the nearest integer and leaves that integer in the float's low mantissa bits
  (:func:`_rounded_to_int64`).
- :meth:`BinaryPolyMultiplier.mul_top`: one FFT, no limbs, for a decryption that needs
  only the top bits of a * s (the mask result trimmed to its top k bits): see there.
- :func:`gemm_mod_2_64`: W (n_out, n_in) small signed integers times X (n_in, C) mod 2^64.
  Limb width L is chosen so that n_in * max|W| * 2^(L-1) < 2^53: every partial sum of
  the float64 GEMM is then an exact integer, whatever order the BLAS adds in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOAT64_EXACT_BITS = 53
_ROUNDER = 1.5 * 2.0**52  # x + this, for |x| < 2^51, is round(x) + this exactly (the ulp there is 1)
_ROUNDER_BITS = 0x4338000000000000  # its IEEE 754 bit pattern


def _rounded_to_int64(x: torch.Tensor) -> torch.Tensor:
    """round(x) as int64 for float64 |x| < 2^51, in place of x's storage: two passes instead of round and convert."""
    x += _ROUNDER
    out = x.view(torch.int64)
    out -= _ROUNDER_BITS
    return out


def fft_product_error(n: int, x_l2: float, y_l2: float) -> float:
    """Percival's bound on the max error of a float64 FFT product of length n (C. Percival, Rapid
    multiplication modulo the sum and difference of highly composite numbers, Math. Comp. 2003)."""
    log_n = math.log2(n)
    return (3 * log_n + math.sqrt(5) * (3 * log_n + 1) + 3 * log_n / math.sqrt(2)) * 2.0**-FLOAT64_EXACT_BITS * x_l2 * y_l2


def split_signed(x: torch.Tensor, limb_bits: int, n_limbs: int) -> list[torch.Tensor]:
    """int64 x (two's complement of a value mod 2^(limb_bits * n_limbs)) -> signed limbs.

    x == sum_k limb_k * 2^(k * limb_bits) (mod 2^64); |limb_k| <= 2^(limb_bits - 1).
    """
    if (limb_bits, n_limbs) == (32, 2) and x.is_contiguous():  # the hot case: read the two int32 halves in place
        halves = x.view(torch.int32).view(*x.shape, 2)  # little-endian: (low, high) words
        low = halves[..., 0]  # the low word read as signed: the centred remainder
        return [low, halves[..., 1].to(torch.int64) + (low < 0)]  # borrow: x = (high + 1) 2^32 + low when low < 0
    limbs, rest, half, mask = [], x, 1 << (limb_bits - 1), (1 << limb_bits) - 1
    for _ in range(n_limbs - 1):
        low = ((rest + half) & mask) - half  # centred remainder in [-2^(L-1), 2^(L-1))
        limbs.append(low)
        rest = (rest - low) >> limb_bits  # arithmetic shift: exact, since rest - low is a multiple of 2^L
    limbs.append(rest)
    return limbs


def combine_limbs(parts: list[torch.Tensor], limb_bits: int) -> torch.Tensor:
    """sum_k parts[k] * 2^(k * limb_bits) with wrapping int64 arithmetic (= mod 2^64)."""
    out = parts[-1]
    for part in reversed(parts[:-1]):
        out = (out << limb_bits) + part
    return out


def limb_plan(value_bits: int, n_in: int, max_abs_weight: int) -> tuple[int, int]:
    """(limb_bits, n_limbs) for an exact float64 GEMM over ``value_bits``-bit integers."""
    headroom = FLOAT64_EXACT_BITS - math.ceil(math.log2(max(n_in * max(max_abs_weight, 1), 1) + 1))
    limb_bits = min(headroom + 1, value_bits)  # |limb| <= 2^(L-1): n_in * wmax * 2^(L-1) < 2^53
    if limb_bits < 8:
        raise ValueError(f"a GEMM over {n_in} inputs with |w| <= {max_abs_weight} cannot be exact in float64")
    n_limbs = math.ceil(value_bits / limb_bits)
    return math.ceil(value_bits / n_limbs), n_limbs


def gemm_mod_2_64(w: torch.Tensor, x: torch.Tensor, value_bits: int = 64, max_abs_weight: int | None = None) -> torch.Tensor:
    """(w @ x) mod 2^64, exactly.

    w: (n_out, n_in) signed integers (any integer or float dtype holding integers).
    x: (n_in, C) int64 holding values mod 2^value_bits (two's complement).
    Returns int64 (n_out, C), the product mod 2^64 (mod 2^value_bits is its low bits).
    """
    n_in = w.shape[1]
    wmax = int(w.abs().max()) if max_abs_weight is None else max_abs_weight
    limb_bits, n_limbs = limb_plan(value_bits, n_in, wmax)
    wf = w.to(device=x.device, dtype=torch.float64)
    parts = [torch.matmul(wf, limb.to(torch.float64)).to(torch.int64) for limb in split_signed(x, limb_bits, n_limbs)]
    return combine_limbs(parts, limb_bits)


class BinaryPolyMultiplier:
    """Multiplies many polynomials by one fixed binary secret s, negacyclically mod 2^64.

    Uses the folded transform of length N/2: a real polynomial evaluated at the primitive
    2N-th roots zeta^(4k+1) is the DFT of z_j = (a_j + i a_(j+N/2)) zeta^j, so one complex
    FFT of half length serves each real product.
    """

    LIMB_BITS = 32

    def __init__(self, s: torch.Tensor):
        n = s.shape[-1]
        if n & (n - 1) or n < 4:
            raise ValueError(f"ring degree {n} must be a power of two")
        if fft_product_error(n, 2.0**self.LIMB_BITS * math.sqrt(n), math.sqrt(n)) >= 0.5:
            raise ValueError(f"at ring degree {n} the float64 FFT product of 32-bit limbs is not provably exact")
        self.n = n
        j = torch.arange(n // 2, dtype=torch.float64)
        self.twist = torch.polar(torch.ones_like(j), math.pi * j / n)  # zeta^j, zeta = exp(i pi / N)
        self._untwist = self.twist.conj().resolve_conj()
        self.s_hat = self._forward(s.to(torch.float64))
        self._s_hat_down: dict[int, torch.Tensor] = {}  # s_hat 2^-z, for mul_top's words with z zero low bits

    def _forward(self, a: torch.Tensor) -> torch.Tensor:  # (..., N) float -> (..., N/2) evaluations
        h = self.n // 2
        z = torch.complex(a[..., :h], a[..., h:])
        z *= self.twist
        return torch.fft.ifft(z, norm="forward")  # sum_j z_j zeta^(4jk): the evaluations at zeta^(4k+1)

    def _inverse(self, c_hat: torch.Tensor) -> torch.Tensor:  # (..., N/2) -> (..., N) float
        z = torch.fft.fft(c_hat, norm="forward")
        z *= self._untwist
        return torch.cat([z.real, z.imag], dim=-1)

    def mul(self, a: torch.Tensor) -> torch.Tensor:
        """a: (..., N) int64 (values mod 2^64) -> a * s mod (X^N + 1, 2^64), int64, exactly (a view of a buffer
        twice its size, which lives as long as the view)."""
        words = a.contiguous().numpy().view(np.uint32).reshape(*a.shape, 2)  # little-endian: (low, high)
        limbs = np.empty((2, *a.shape))  # both limbs in one FFT batch, converted in one pass each
        limbs[0] = words[..., 0]
        limbs[1] = words[..., 1].view(np.int32)
        c_hat = self._forward(torch.from_numpy(limbs))
        c_hat *= self.s_hat
        low, high = _rounded_to_int64(self._inverse(c_hat))
        high <<= self.LIMB_BITS  # combined in place: wrapping int64 arithmetic is arithmetic mod 2^64
        high += low
        return high

    def mul_top(self, x: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., N) int64 words whose low 64 - ``bits`` bits are zero -> about x * s to its top k bits,
        k = min(bits, :func:`small_product_bits`): round(v * s) 2^(64 - k) mod 2^64 for the signed top-k values
        v = x / 2^(64 - k) (into ``out`` if given). Wider words are rounded to their top k bits first.

        One FFT product, no limbs, for values whose low bits do not matter. The exact product
        v * s is an integer below N 2^(k-1) <= 2^52 in magnitude, so float64 holds it, and the
        rounded result is within :func:`small_product_error` of it (Percival's bound plus the
        final rounding), over the integers (no wrap). Decryption subtracts it from the phase:
        the error becomes at most small_product_error(N, k) 2^(64 - k), about 2^28 at N = 2048
        whatever k, far below Delta / 2; :mod:`hetune.crypto.rlwe_params` subtracts it from the
        decoding margin. The words are transformed as they are (v 2^(64 - k) has k significant
        bits: exact in float64) and s's transform carries the 2^-(64 - k): scaling by a power of
        two is exact in every float operation, so each float is the one computed from v itself,
        without a pass to shift v down.
        """
        k = min(bits, small_product_bits(self.n))
        z = 64 - k
        if bits > k:
            x = (x + (1 << (z - 1))) >> z << z  # wrapping add, arithmetic shift: round mod 2^k
        if z not in self._s_hat_down:
            self._s_hat_down[z] = self.s_hat * 2.0**-z
        p = self._inverse(self._forward(x.to(torch.float64)) * self._s_hat_down[z])
        if self.n * 2.0 ** (k - 1) + small_product_error(self.n, k) < 2.0**51:  # within the rounder's range
            r = _rounded_to_int64(p)
        else:
            r = torch.round(p).to(torch.int64)
        return torch.bitwise_left_shift(r, z, out=out)


def small_product_bits(n: int) -> int:
    """Widest signed operand of :meth:`BinaryPolyMultiplier.mul_top` at ring degree n: N 2^(k-1) <= 2^52."""
    return FLOAT64_EXACT_BITS - int(math.log2(n))


def small_product_error(n: int, k: int) -> float:
    """Bound on |mul_top - v * s| for top-k values |v| <= 2^(k-1), binary s, in units of v (final rounding included).

    ||v||_2 <= 2^(k-1) sqrt(N), ||s||_2 <= sqrt(N); the result is an integer, so the bound on
    the float error plus the 1/2 of rounding bounds the integer error.
    """
    return fft_product_error(n, 2.0 ** (k - 1) * math.sqrt(n), math.sqrt(n)) + 0.5
