"""Worst-case accumulator size of the worker's integer matmul versus the GLWE budget.

The GLWE matmul (concrete-ml-extensions, default parameters) reserves 27 bits for the
result: a signed result decrypts correctly while |raw| < 2^26 and wraps beyond
(measured; see docs/design.md). Because the weights are known at compile time, the
bound below is the exact worst case over *all* inputs for *these* weights, far
tighter than the generic k * max|x| * max|w| bound, which is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def signed_bits(max_abs: int) -> int:
    """Bits of a signed integer holding any value in [-max_abs, max_abs]."""
    return int(max_abs).bit_length() + 1


@dataclass(frozen=True)
class AccumulatorBound:
    forward_bits: int  # x unsigned bits_a, over these weights
    backward_bits: int  # g signed bits_g, over these weights
    generic_bits: int  # any weights of this shape and width

    @property
    def worst_bits(self) -> int:
        return max(self.forward_bits, self.backward_bits)


def accumulator_bound(q: torch.Tensor, bits_w: int, bits_a: int, bits_g: int) -> AccumulatorBound:
    """q: (out, in) signed integer weight of one (possibly fused) op."""
    w = q.to(torch.int64)
    xmax = 2**bits_a - 1  # unsigned activations in [0, xmax]
    pos = w.clamp(min=0).sum(dim=1)  # worst positive output per channel
    neg = (-w).clamp(min=0).sum(dim=1)
    fwd = xmax * int(torch.maximum(pos, neg).max())
    gmax = 2 ** (bits_g - 1) - 1  # signed gradients in [-gmax, gmax]
    bwd = gmax * int(w.abs().sum(dim=0).max())  # contraction over the output dim
    wmax = 2 ** (bits_w - 1) - 1
    generic = max(w.shape[1] * xmax, w.shape[0] * gmax) * wmax
    return AccumulatorBound(signed_bits(fwd), signed_bits(bwd), signed_bits(generic))
