"""A randomized Hadamard rotation of an op's input dimension, to spread outlier features.

For any orthogonal R, ``x W^T = (x R)(W R)^T`` and ``g W = (g (W R)) R^T``. At compile time
the model owner quantizes ``W R`` per output channel (the worker holds only its integers);
the data owner rotates each input before quantizing it per token and un-rotates the
decoded input gradient. A few huge features of a token (the outliers of real LLMs'
activations) then spread over all features, so one per-token scale no longer wastes the
integer range on them (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

``R = diag(s) (C_m kron H_p)``: random signs ``s`` (seeded, so that no structured input
such as a constant row maps onto a spike), a Walsh-Hadamard transform over the largest
power-of-two factor ``p`` of the width and an orthonormal DCT-II over the odd rest ``m``
(576 = 9 x 64, 1536 = 3 x 512). The Walsh-Hadamard transform is fast by its Kronecker
structure, ``H_p = H_(p/q) kron H_q`` with q <= 64: two small BLAS products per row,
O(n (p/q + q + m)) per token (in torch this beats a log2(p)-pass butterfly: 2.4 ms for
512 tokens x 576, 13 ms x 1536, float64, one core). It is exact up to float rounding: the
worker's integer product is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hetune.quant.config import QuantConfig


def sylvester(p: int) -> torch.Tensor:
    """(p, p) Hadamard matrix of +-1 in Sylvester's order, p a power of two (as scipy.linalg.hadamard)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h


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
    p: int = field(init=False)  # power-of-two factor: Walsh-Hadamard
    m: int = field(init=False)  # odd factor: DCT
    signs: torch.Tensor = field(init=False, repr=False)  # (n,) +-1
    dct: torch.Tensor = field(init=False, repr=False)  # (m, m)
    h_outer: torch.Tensor = field(init=False, repr=False)  # (p/q, p/q) orthonormal Hadamard
    h_inner: torch.Tensor = field(init=False, repr=False)  # (q, q), q = min(p, 64)

    def __post_init__(self) -> None:
        self.p = self.n & -self.n
        self.m = self.n // self.p
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n)  # one R per width
        self.signs = torch.randint(0, 2, (self.n,), generator=gen).to(torch.float64) * 2 - 1
        self.dct = dct_matrix(self.m)
        q = min(self.p, 64)
        self.h_outer, self.h_inner = sylvester(self.p // q) / math.sqrt(self.p // q), sylvester(q) / math.sqrt(q)

    def _kron(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(C kron H_p) applied to each row; H_p = H_outer kron H_inner, all symmetric but C."""
        rows, q = x.shape[0], self.h_inner.shape[0]
        y = x.reshape(rows * self.m, self.p // q, q) @ self.h_inner  # (T m, p/q, q)
        y = (self.h_outer @ y).reshape(rows, self.m, self.p)
        return (c @ y if self.m > 1 else y).reshape(rows, self.n)  # C on the odd axis

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R for each row of x (rows, n)."""
        return self._kron(x.to(torch.float64, copy=True).mul_(self.signs), self.dct)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """y R^T: H_p is symmetric, C_m orthogonal."""
        return self._kron(y.to(torch.float64), self.dct.T).mul_(self.signs)


def input_rotation(quant: QuantConfig, n: int) -> HadamardRotation | None:
    """The rotation ``quant`` (the manifest's) names for op inputs of width n; None: no rotation."""
    return HadamardRotation(n, quant.rotation_seed) if quant.rotation == "hadamard" else None
