"""The integer arithmetic of one outsourced op, split where the network splits it.

client:  encode (quantize per token)  ->  [worker: raw = X_q W_q^T  or  G_q W_q]  ->  decode
:class:`OpCodec` is the client half: it needs only public per-channel data (scales and
row sums of W_q) and the manifest's settings, never the weights. With a rotation R the
worker's W_q quantizes W R, the codec encodes x R and decodes the input gradient times R^T. :class:`IntegerLinear` adds the worker's integer
product. The ``quantized`` backend runs that product in the clear; the encrypted
backends replace only that step, so a clear run is bit-for-bit the worker's computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetune.quant.rotation import HadamardRotation
from hetune.quant.tokens import TokenQuant, quantize_activations, quantize_gradients, quantize_static


def integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product. float64 BLAS is exact here: every partial sum is far below 2^53."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64))


@dataclass
class OpCodec:
    """Client half of one op: per-token encoding and decoding around the worker's product."""

    scale: torch.Tensor  # (out,) float32, per-output-channel weight scale
    rowsum: torch.Tensor  # (out,) float64, sum_k W_q[j, k] (for the input zero point)
    bits_a: int
    bits_g: int
    static_input: torch.Tensor | None = None  # (2,) scale, zero point: the "static" ablation only
    static_grad: torch.Tensor | None = None  # (1,) scale: the "static" ablation only
    rotation: HadamardRotation | None = None  # of the input dimension (QuantConfig.rotation)
    clip_a: float = 1.0  # per-token activation range ratio (QuantConfig.clip_a)

    @property
    def out_features(self) -> int:
        return self.scale.shape[0]

    def encode_input(self, x: torch.Tensor) -> TokenQuant:
        if self.static_input is not None:
            scale, zero_point = self.static_input.tolist()
            return quantize_static(x, scale, zero_point, 0, 2**self.bits_a - 1)
        if self.rotation is not None:  # (T, in): x R, outliers spread; a fresh tensor the quantizer overwrites
            return quantize_activations(self.rotation.apply(x.detach().reshape(-1, x.shape[-1])), self.bits_a, self.clip_a, owned=True)
        return quantize_activations(x, self.bits_a, self.clip_a)  # uint per token, zero point on client

    def decode_output(self, raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        """raw (T, out) float64, overwritten -> float (T, out): remove the input zero point, apply both scales."""
        acc = raw.addcmul_(tq.zero_point, self.rowsum[None, :], value=-1)  # w_zp = 0: one correction term, exact integers
        return acc.mul_(tq.scale).mul_(self.scale.to(torch.float64)[None, :])

    def encode_grad(self, g: torch.Tensor) -> TokenQuant:
        """Fold the weight scale into g, then quantize per token (signed).

        dL/dx = g diag(s) W_q, so the worker only ever needs the integer W_q.
        """
        g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64, copy=True).mul_(self.scale.to(torch.float64))
        if self.static_grad is not None:
            qmax = 2 ** (self.bits_g - 1) - 1
            return quantize_static(g, float(self.static_grad), 0.0, -qmax, qmax)
        return quantize_gradients(g, self.bits_g, owned=True)

    def decode_grad(self, raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        """raw (T, in) float64, overwritten -> dL/dx: the gradient scale, then R^T (dL/dx = g W = (g W R) R^T)."""
        dx = raw.mul_(tq.scale)
        return dx if self.rotation is None else self.rotation.invert(dx)


@dataclass
class IntegerLinear:
    """One op with its integer weight: the worker's product plus the client's codec."""

    q: torch.Tensor  # (out, in) int8/int16, signed, zero point 0 (with a rotation: quantizes W R)
    codec: OpCodec

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def encode_input(self, x: torch.Tensor) -> TokenQuant:
        return self.codec.encode_input(x)

    def decode_output(self, raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        return self.codec.decode_output(raw, tq)

    def encode_grad(self, g: torch.Tensor) -> TokenQuant:
        return self.codec.encode_grad(g)

    def decode_grad(self, raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        return self.codec.decode_grad(raw, tq)

    # --- worker: the only step that touches the weights -------------------------------
    def raw_forward(self, xq: torch.Tensor) -> torch.Tensor:
        return integer_matmul(xq, self.q.T)  # (T, in) @ (in, out)

    def raw_backward(self, gq: torch.Tensor) -> torch.Tensor:
        return integer_matmul(gq, self.q)  # (T, out) @ (out, in)

    # --- whole op in the clear (the `quantized` execution) ----------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tq = self.encode_input(x)
        y = self.decode_output(self.raw_forward(tq.q), tq)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        tq = self.encode_grad(g)
        dx = self.decode_grad(self.raw_backward(tq.q), tq)
        return dx.reshape(*g.shape[:-1], self.in_features)
