"""The integer arithmetic of one outsourced linear op, split where the network splits it.

client:  quantize per token   ->  [worker: raw = X_q W_q^T  (or G_q W_q)]  ->  correct, rescale
This module is the single definition of both halves. The ``quantized`` backend runs the
middle in the clear with :func:`integer_matmul`; the encrypted backends replace only that
middle step, so a clear run is bit-for-bit the computation the worker performs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetune.quant.tokens import TokenQuant, quantize_activations, quantize_gradients


def integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product. float64 BLAS is exact here: every partial sum is far below 2^53."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64))


@dataclass
class IntegerLinear:
    """Public quantization data of one op: integer weight, per-channel scales, row sums."""

    q: torch.Tensor  # (out, in) int8/int16, signed, zero point 0
    scale: torch.Tensor  # (out,) float32
    bits_a: int
    bits_g: int

    def __post_init__(self) -> None:
        self.colsum = self.q.to(torch.float64).sum(dim=1)  # (out,) sum_k W_q[j, k]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    # --- client, forward -------------------------------------------------------------
    def encode_input(self, x: torch.Tensor) -> TokenQuant:
        return quantize_activations(x, self.bits_a)

    def decode_output(self, raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        """raw (T, out) -> float (T, out): remove the input zero point, apply both scales."""
        acc = raw - tq.zero_point * self.colsum[None, :]  # w_zp = 0, so one correction term
        return acc * tq.scale * self.scale.to(torch.float64)[None, :]

    # --- client, backward ------------------------------------------------------------
    def encode_grad(self, g: torch.Tensor) -> TokenQuant:
        """Fold the per-output-channel weight scale into g, then quantize per token.

        dL/dx = g diag(s) W_q, so the worker only ever needs the integer W_q.
        """
        g = g.detach().to(torch.float64).reshape(-1, g.shape[-1]) * self.scale.to(torch.float64)
        return quantize_gradients(g, self.bits_g)

    @staticmethod
    def decode_grad(raw: torch.Tensor, tq: TokenQuant) -> torch.Tensor:
        return raw * tq.scale

    # --- worker: the only step that sees the weights ---------------------------------
    def raw_forward(self, xq: torch.Tensor) -> torch.Tensor:
        return integer_matmul(xq, self.q.T)  # (T, in) @ (in, out)

    def raw_backward(self, gq: torch.Tensor) -> torch.Tensor:
        return integer_matmul(gq, self.q)  # (T, out) @ (out, in)

    # --- whole op in the clear (the `quantized` execution) ---------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tq = self.encode_input(x)
        y = self.decode_output(self.raw_forward(tq.q), tq)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        tq = self.encode_grad(g)
        dx = self.decode_grad(self.raw_backward(tq.q), tq)
        return dx.reshape(*g.shape[:-1], self.in_features)
