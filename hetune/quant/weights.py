"""HE-compatible weight quantization with Brevitas.

Weights are quantized once, at compile time, to signed integers with one scale per
output channel and zero point 0 (Brevitas ``Int8WeightPerChannelFloat`` with the bit
width overridden, narrow range). Zero point 0 keeps the worker's product a plain
integer matmul; per-channel scales are applied by the client after decryption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """W ~= scale[:, None] * q, q in [-(2^(b-1)-1), 2^(b-1)-1]."""

    q: torch.Tensor  # (out, in) int8 for b <= 8, else int16
    scale: torch.Tensor  # (out,) float32
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.q.to(torch.float32) * self.scale[:, None]


def int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def brevitas_quant_linear(weight: torch.Tensor, bits: int, per_channel: bool = True):
    """A Brevitas QuantLinear carrying ``weight`` with signed per-channel (or per-tensor) quantization."""
    import brevitas.nn as qnn  # heavy import: only at compile time
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    out_features, in_features = weight.shape
    layer = qnn.QuantLinear(
        in_features,
        out_features,
        bias=False,
        weight_quant=Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat,
        weight_bit_width=bits,
    )
    with torch.no_grad():
        layer.weight.copy_(weight.detach().to(torch.float32))
    return layer


def quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool = True) -> QuantizedWeight:
    """Quantize a (out, in) float weight with Brevitas; scales always come as one per channel."""
    layer = brevitas_quant_linear(weight, bits, per_channel)
    with torch.no_grad():
        qt = layer.quant_weight()
        scale = qt.scale.reshape(-1).expand(weight.shape[0]).to(torch.float32).contiguous()  # (out,)
        # Brevitas' own integer view; computed in float then rounded so 16-bit widths stay exact.
        q = torch.round(qt.value / qt.scale).to(int_dtype(bits))
    return QuantizedWeight(q=q, scale=scale, bits=bits)
