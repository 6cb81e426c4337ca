"""CKKS packing of LoRA columns and the server's encrypted products (TenSEAL).

Column packing (SHE-LoRA, MaskCrypt): one encrypted column j of A (r values) is laid
out rank-major over r*m slots, A[t, j] repeated m times in block t (slot t*m + row),
split into ciphertexts of ``slots`` = N/2 values (zero-padded). The server multiplies
it slot-wise by the plaintext w * B[row, t] (same layout), so slot (t, row) holds
w * B[row, t] * A[t, j]; summing over clients is slot-wise addition. The client sums
the r blocks after decryption, giving the aggregate column sum_i w_i B_i A_i[:, j].
No rotation is ever needed, so the server's context carries no Galois or
relinearization keys: only the public key. One multiplication uses the one 40-bit level.

Dense packing (full HE baseline): every LoRA parameter in one flat vector, N/2 per
ciphertext; the server forms the weighted sum of ciphertexts.
"""

from __future__ import annotations

import math

import numpy as np

from hetune.protocols.she_lora.wire import PayloadError


def chunks_for(rank: int, m: int, slots: int) -> int:
    """Ciphertexts per encrypted column of a rank-r layer with m outputs."""
    return math.ceil(rank * m / slots)


def _pad(vec: np.ndarray, count: int, slots: int) -> list[list[float]]:
    out = np.zeros(count * slots)
    out[: len(vec)] = vec
    return [out[c * slots : (c + 1) * slots].tolist() for c in range(count)]


def encrypt_column(ctx, a_col: np.ndarray, m: int, slots: int) -> list[bytes]:
    """Enc of A[:, j] (r,) in the rank-major replicated layout; returns serialized ciphertexts."""
    import tenseal as ts

    flat = np.repeat(np.asarray(a_col, dtype=np.float64), m)  # (r*m,): block t holds A[t, j]
    return [ts.ckks_vector(ctx, part).serialize() for part in _pad(flat, chunks_for(len(a_col), m, slots), slots)]


def load_ciphertexts(ctx, blobs: list[bytes], slots: int, what: str) -> list:
    """Deserialize against the given (public) context; anything malformed raises PayloadError."""
    import tenseal as ts

    out = []
    for i, blob in enumerate(blobs):
        try:
            vec = ts.ckks_vector_from(ctx, blob)
        except Exception as err:  # tenseal: ValueError (bad stream) or RuntimeError (foreign parameters)
            raise PayloadError(f"{what}: ciphertext {i} does not parse under the run's CKKS context ({err})") from err
        if vec.size() != slots:
            raise PayloadError(f"{what}: ciphertext {i} holds {vec.size()} values, expected {slots}")
        out.append(vec)
    return out


def weighted_product(cts: list, b: np.ndarray, weight: float, slots: int, what: str) -> list:
    """Enc(w * B[row, t] * A[t, j]) slot-wise, from Enc(A[:, j]) in column packing. b: (m, r)."""
    m, r = b.shape
    if len(cts) != chunks_for(r, m, slots):
        raise PayloadError(f"{what}: {len(cts)} ciphertexts for a rank-{r} column of {m} rows, expected {chunks_for(r, m, slots)}")
    plain = _pad((weight * np.asarray(b, dtype=np.float64).T).reshape(-1), len(cts), slots)  # (r*m,) rank-major
    try:
        return [ct * pt for ct, pt in zip(cts, plain)]
    except Exception as err:
        raise PayloadError(f"{what}: ciphertext x plaintext failed ({err})") from err


def add_into(acc: list, terms: list) -> list:
    """Chunk-wise sum; a shorter list (lower rank) adds only to its first chunks."""
    for c, term in enumerate(terms):
        if c < len(acc):
            acc[c] = acc[c] + term
        else:
            acc.append(term)
    return acc


def add_plain_column(acc: list, column: np.ndarray, slots: int) -> list:
    """Add a clear contribution (m,) into block t=0 of an aggregated column (the client sums blocks)."""
    acc[0] = acc[0] + _pad(np.asarray(column, dtype=np.float64), 1, slots)[0]
    return acc


def decrypt_column(ctx, blobs: list[bytes], m: int, rank_max: int, slots: int) -> np.ndarray:
    """The aggregated column (m,): decrypt, drop padding, sum the rank blocks."""
    vecs = load_ciphertexts(ctx, blobs, slots, "aggregate")
    flat = np.concatenate([np.asarray(v.decrypt()) for v in vecs])
    return flat[: rank_max * m].reshape(rank_max, m).sum(axis=0)


def encrypt_dense(ctx, flat: np.ndarray, slots: int) -> list[bytes]:
    import tenseal as ts

    return [ts.ckks_vector(ctx, part).serialize() for part in _pad(np.asarray(flat, dtype=np.float64), math.ceil(len(flat) / slots), slots)]


def decrypt_dense(ctx, blobs: list[bytes], length: int, slots: int) -> np.ndarray:
    vecs = load_ciphertexts(ctx, blobs, slots, "aggregate")
    return np.concatenate([np.asarray(v.decrypt()) for v in vecs])[:length]
