"""Re-factor an aggregated update dW (m x n) to a client's own LoRA rank (FlexLoRA-style).

Truncated SVD: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, so B A is the best rank-r
approximation of dW in Frobenius and spectral norm (Eckart-Young) and equals dW
exactly when r >= rank(dW). The spec's staged variant (SVD of the cipher block, stack
with the plain block's factors, SVD again) gives the same product; one SVD of the
reassembled m x n matrix is cheaper to read and exact at our sizes.
"""

from __future__ import annotations

import numpy as np


def factorize(dw: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with B (m, rank), A (rank, n); zero-padded when rank > min(m, n)."""
    m, n = dw.shape
    u, s, vt = np.linalg.svd(np.asarray(dw, dtype=np.float64), full_matrices=False)
    keep = min(rank, len(s))
    root = np.sqrt(s[:keep])
    b = np.zeros((m, rank))
    a = np.zeros((rank, n))
    b[:, :keep] = u[:, :keep] * root  # (m, keep)
    a[:keep] = root[:, None] * vt[:keep]  # (keep, n)
    return b, a
