"""A test helper: an integer op straight from a quantized weight, without compiling a bundle."""

import torch

from hetune.quant.integer import IntegerLinear, OpCodec


def integer_op(q: torch.Tensor, scale: torch.Tensor, bits_a: int, bits_g: int, **codec) -> IntegerLinear:
    """The op for weight ``q`` (out, in) and per-row ``scale``; row sums from ``q``; ``codec``: OpCodec's options."""
    return IntegerLinear(q, OpCodec(scale, q.to(torch.float64).sum(dim=1), bits_a, bits_g, **codec))
