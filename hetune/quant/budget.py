"""Worst-case accumulator size and weight norms of the worker's integer product.

Every scheme decrypts a signed result correctly only within its budget (27 bits for
Concrete ML's GLWE, 30 for the batched RLWE p128 set; :mod:`hetune.crypto.scheme`).
Because the weights are known at compile time, the bound below is the exact worst case
over *all* inputs for *these* weights, far tighter than the generic
k * max|x| * max|w| bound, which is reported alongside. The largest row and column L2
norms drive the batched RLWE scheme's noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIT_FLOOR_BITS = 8  # Concrete ML's width: compile narrows an op no further (accumulator_bound's fit_budget)


def signed_bits(max_abs: int) -> int:
    """Bits of a signed integer holding any value in [-max_abs, max_abs]."""
    return int(max_abs).bit_length() + 1


@dataclass(frozen=True)
class AccumulatorBound:
    bits_a: int  # the activation width it holds for
    bits_g: int  # the gradient width it holds for
    forward_bits: int  # x unsigned bits_a, over these weights
    backward_bits: int  # g signed bits_g, over these weights
    generic_bits: int  # any weights of this shape and width
    forward_l2: float  # max_o ||W[o, :]||_2: the forward product's noise growth
    backward_l2: float  # max_j ||W[:, j]||_2: the backward product's


def _forward_bits(row_l1: int, bits_a: int) -> int:
    return signed_bits((2**bits_a - 1) * row_l1)  # unsigned activations in [0, 2^a - 1]


def _backward_bits(col_l1: int, bits_g: int) -> int:
    return signed_bits((2 ** (bits_g - 1) - 1) * col_l1)  # signed gradients in [-(2^(g-1) - 1), ...]


def _widest(bits: int, fits) -> int:
    """The widest width, at most ``bits``, that ``fits``; never below FIT_FLOOR_BITS (or ``bits``, if narrower)."""
    floor = min(FIT_FLOOR_BITS, bits)
    return next((b for b in range(bits, floor, -1) if fits(b)), floor)


def accumulator_bound(q: torch.Tensor, bits_w: int, bits_a: int, bits_g: int,
                      fit_budget: int | None = None) -> AccumulatorBound:
    """q: (out, in) signed integer weight of one (possibly fused) op.

    ``fit_budget``: narrow the activation and gradient widths, each on its own, to the widest
    (at most ``bits_a``/``bits_g``) whose worst case fits that many bits, never below
    FIT_FLOOR_BITS, where the caller decides whether to refuse. Why per op: the worst case
    grows with each op's row and column L1 norms, so a width that fits a 576-wide op can
    overflow a much wider one; and wider inputs are what close the quantization gap on real
    weights (docs/benchmarks.md).
    """
    w = q.to(torch.int64)
    row = int(torch.maximum(w.clamp(min=0).sum(dim=1), (-w).clamp(min=0).sum(dim=1)).max())  # worst output per channel
    col = int(w.abs().sum(dim=0).max())  # contraction over the output dim
    if fit_budget is not None:
        bits_a = _widest(bits_a, lambda b: _forward_bits(row, b) <= fit_budget)
        bits_g = _widest(bits_g, lambda b: _backward_bits(col, b) <= fit_budget)
    wmax = 2 ** (bits_w - 1) - 1
    generic = max(w.shape[1] * (2**bits_a - 1), w.shape[0] * (2 ** (bits_g - 1) - 1)) * wmax
    wf = w.to(torch.float64)
    return AccumulatorBound(bits_a, bits_g, _forward_bits(row, bits_a), _backward_bits(col, bits_g), signed_bits(generic),
                            float(wf.norm(dim=1).max()), float(wf.norm(dim=0).max()))
