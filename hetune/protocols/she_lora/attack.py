"""Span-based inversion of a linear layer's LoRA update (the threat SHE-LoRA targets).

For y = W x + B A x, the gradient of A over a batch of tokens is
dA = B^T G^T X (r x n): every row of dA is a combination of the input rows x_t. With
one token the rows are all proportional to x, so the top right singular vector of the
update returns x up to sign and scale (the idea behind DAGER's span check). A server
that sees A's update with the selected columns encrypted only sees the other
coordinates; :func:`recover_input` fills the hidden ones with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lora_a_gradient(x: np.ndarray, grad_out: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dL/dA for inputs x (T, n), output gradients (T, m) and B (m, r): (r, n)."""
    return b.T @ grad_out.T @ x


def recover_input(update: np.ndarray, hidden: Sequence[int] = ()) -> np.ndarray:
    """The attacker's estimate of a single input x (n,), unit norm, from what it can see of dA."""
    seen = np.array(update, dtype=np.float64)
    seen[:, list(hidden)] = 0.0  # encrypted columns: unknown to the server
    _, _, vt = np.linalg.svd(seen, full_matrices=False)
    return vt[0]


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """|cos| (the attack recovers x up to sign)."""
    return float(abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-300))
