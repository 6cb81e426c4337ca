"""A randomized Hadamard rotation of an op's input dimension, to spread outlier features.

For any orthogonal R, ``x W^T = (x R)(W R)^T`` and ``g W = (g (W R)) R^T``. At compile time
the model owner quantizes ``W R`` per output channel (the worker holds only its integers);
the data owner rotates each input before quantizing it per token and un-rotates the
decoded input gradient. A few huge features of a token (the outliers of real LLMs'
activations) then spread over all features, so one per-token scale no longer wastes the
integer range on them (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

``R = diag(s) (C_m kron H_p)``: random signs ``s`` (seeded, so that no structured input
such as a constant row maps onto a spike), a fast Walsh-Hadamard transform over the
largest power-of-two factor ``p`` of the width and an orthonormal DCT-II over the odd rest
``m`` (576 = 9 x 64, 1536 = 3 x 512). Applying it costs O(n (log p + m)) per token. It is
exact up to float rounding: the worker's integer product is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hetune.quant.config import QuantConfig


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) over the last dim, a power of two.

    Hand-written: neither torch nor scipy has a fast one (scipy.linalg.hadamard is dense).
    """
    *lead, n = x.shape
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)  # pairs (i, i + h) inside blocks of 2h
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def dct_matrix(m: int) -> torch.Tensor:
    """(m, m) orthonormal DCT-II, float64: every row but the first spreads evenly too."""
    k = torch.arange(m, dtype=torch.float64)[:, None]
    j = torch.arange(m, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (j + 0.5) * k / m) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c


@dataclass
class HadamardRotation:
    """x -> x R and back for rows of width ``n``; float64 in and out."""

    n: int
    seed: int = 0
    p: int = field(init=False)  # power-of-two factor: fast Walsh-Hadamard
    m: int = field(init=False)  # odd factor: DCT
    signs: torch.Tensor = field(init=False, repr=False)  # (n,) +-1
    dct: torch.Tensor = field(init=False, repr=False)  # (m, m)

    def __post_init__(self) -> None:
        self.p = self.n & -self.n
        self.m = self.n // self.p
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n)  # one R per width
        self.signs = torch.randint(0, 2, (self.n,), generator=gen).to(torch.float64) * 2 - 1
        self.dct = dct_matrix(self.m)

    def _kron(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = fwht(x.reshape(-1, self.m, self.p)) / math.sqrt(self.p)  # (T, m, p): H_p on the last axis
        if self.m > 1:
            y = torch.einsum("ij,tjp->tip", c, y)  # C_m on the middle axis
        return y.reshape(x.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R for each row of x (..., n)."""
        return self._kron(x.to(torch.float64) * self.signs, self.dct)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """y R^T: H_p is symmetric, C_m orthogonal."""
        return self._kron(y.to(torch.float64), self.dct.T) * self.signs


def input_rotation(quant: QuantConfig, n: int) -> HadamardRotation | None:
    """The rotation ``quant`` (the manifest's) names for op inputs of width n; None: no rotation."""
    return HadamardRotation(n, quant.rotation_seed) if quant.rotation == "hadamard" else None
