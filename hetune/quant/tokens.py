"""Per-token dynamic quantization of activations and gradients (client side).

Scales and zero points never leave the data owner: only the integer matrix is
encrypted and sent. An all-zero row gets scale 0, so it decodes to exact zeros: the
GLWE noise on its (zero) product must not come back scaled by an arbitrary 1 (rows
with no loss, such as the last position, have all-zero gradients). Each row (token) gets its own range, which is what keeps the
backward pass stable at 8 bits (static per-tensor scales diverge; see the spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenQuant:
    """Integers (float64 holding exact integers), per-row scale and zero point."""

    q: torch.Tensor  # (T, k), exact integers
    scale: torch.Tensor  # (T, 1) float64
    zero_point: torch.Tensor  # (T, 1) float64, 0 for signed


def _float64_rows(x: torch.Tensor, owned: bool) -> torch.Tensor:
    """x as (rows, last dim) float64 that the quantizer may overwrite: a copy unless ``owned`` says x is the
    caller's scratch already (a fresh float64 tensor). In place, a (2,048 x 16,384) product's codec makes no
    temporaries of its size, each of which cost a pass and its page faults."""
    y = x.detach().to(torch.float64, copy=not (owned and x.dtype == torch.float64))
    return y.reshape(-1, y.shape[-1])


def quantize_activations(x: torch.Tensor, bits: int, clip: float = 1.0, owned: bool = False) -> TokenQuant:
    """Unsigned asymmetric per-row quantization; the range always contains 0 so 0 is exact.

    ``clip`` < 1 shrinks each row's range [min, max] by that ratio: the few values beyond
    saturate, the rest get a finer step. ``owned``: x is a float64 scratch tensor the
    quantizer may overwrite.
    """
    x = _float64_rows(x, owned)  # (T, k)
    qmax = 2**bits - 1
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)
    rmin = lo.clamp(max=0.0) * clip
    rmax = hi.clamp(min=0.0) * clip
    scale = (rmax - rmin) / qmax  # 0 only for an all-zero row
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-rmin / safe)
    q = x.div_(safe).round_().add_(zero_point).clamp_(0, qmax)
    return TokenQuant(q, scale, zero_point)


def quantize_gradients(g: torch.Tensor, bits: int, owned: bool = False) -> TokenQuant:
    """Signed symmetric per-row quantization (narrow range, zero point 0); ``owned`` as in quantize_activations."""
    g = _float64_rows(g, owned)  # (T, n)
    qmax = 2 ** (bits - 1) - 1
    lo, hi = torch.aminmax(g, dim=1, keepdim=True)
    scale = torch.maximum(hi, -lo).abs_() / qmax  # max |g| (abs_: +0, not -0, for an all-zero row, the only 0)
    q = g.div_(torch.where(scale > 0, scale, torch.ones_like(scale))).round_().clamp_(-qmax, qmax)
    return TokenQuant(q, scale, torch.zeros_like(scale))


def quantize_static(x: torch.Tensor, scale: float, zero_point: float, qmin: int, qmax: int) -> TokenQuant:
    """One fixed scale and zero point for every row (the static per-tensor ablation)."""
    x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    rows = torch.ones(x.shape[0], 1, dtype=torch.float64)
    return TokenQuant(q, rows * scale, rows * zero_point)
