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


def signed_bits(max_abs: int) -> int:
    """Bits of a signed integer holding any value in [-max_abs, max_abs]."""
    return int(max_abs).bit_length() + 1


@dataclass(frozen=True)
class AccumulatorBound:
    forward_bits: int  # x unsigned bits_a, over these weights
    backward_bits: int  # g signed bits_g, over these weights
    generic_bits: int  # any weights of this shape and width
    forward_l2: float  # max_o ||W[o, :]||_2: the forward product's noise growth
    backward_l2: float  # max_j ||W[:, j]||_2: the backward product's

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
    wf = w.to(torch.float64)
    return AccumulatorBound(signed_bits(fwd), signed_bits(bwd), signed_bits(generic),
                            float(wf.norm(dim=1).max()), float(wf.norm(dim=0).max()))
