"""CKKS packing of LoRA columns and the server's encrypted products (TenSEAL).

Column packing (SHE-LoRA, MaskCrypt), dense per layer: a client's k selected columns
of A (r x n) travel as ONE vector ``v = A[:, sel].T.reshape(-1)`` of k*r values,
column-major (a_1 (r values), a_2, ...), in ceil(k r / slots) ciphertexts (usually
one). The server multiplies it by a block-diagonal plaintext matrix with TenSEAL's
vector-matrix product (Halevi-Shoup diagonal method: one rotation and one plaintext
product per input slot, so the server's context needs Galois keys, never the secret):

    M[c r + t, pos_c m + row] = w * B[row, t]     (k r  x  K m)
    v M = concat over output blocks p of  w * B a_c   for the column c placed at p

where ``pos_c`` is the output block of the client's c-th column among the K encrypted
columns of the aggregate (SHE-LoRA: pos_c = c, the agreed prefix; MaskCrypt: the
column's position in the union). Every client's product has the same layout, so the
aggregate is a slot-wise sum of ciphertexts; the output (K m values) is cut into
chunks of at most ``width`` values (``output_width``), one product per chunk.

Exactness of TenSEAL's diagonal method: an input of L values is stored replicated with
period L over the slots, and output slot s reads input slots s .. s+L-1; when L does
not divide the slot count the wrap-around breaks the period, so output chunks must
satisfy width + L - 1 <= slots (measured: L=40 is exact at width 4057, wrong at 4058).
``input_sizes`` pads a last chunk longer than slots/2 to a full ciphertext, so the
width never drops below slots/2 + 1.

Dense packing (full HE baseline): every LoRA parameter in one flat vector, N/2 per
ciphertext; the server forms the weighted sum of ciphertexts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from hetune.protocols.she_lora.wire import PayloadError


def input_sizes(length: int, slots: int) -> list[int]:
    """Sizes of the ciphertexts holding a vector of ``length`` values (zero-padded to their sum)."""
    sizes = [slots] * (length // slots)
    rem = length % slots
    if rem:
        sizes.append(rem if rem <= slots // 2 or slots % rem == 0 else slots)
    return sizes


def output_width(sizes: Iterable[int], slots: int) -> int:
    """Largest output chunk for which the diagonal method is exact for every input size given."""
    bad = [s for s in sizes if slots % s]
    return slots - max(bad) + 1 if bad else slots


def output_chunks(blocks: int, m: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) of each output chunk of a layer's K*m aggregated values."""
    total = blocks * m
    return [(s, min(s + width, total)) for s in range(0, total, width)]


def encrypt_columns(ctx, a_sel: np.ndarray, slots: int) -> list[bytes]:
    """Enc of the selected columns a_sel (r, k), column-major; returns serialized ciphertexts."""
    import tenseal as ts

    flat = np.asarray(a_sel, dtype=np.float64).T.reshape(-1)  # (k*r,): a_1, a_2, ...
    sizes = input_sizes(len(flat), slots)
    padded = np.zeros(sum(sizes))
    padded[: len(flat)] = flat
    bounds = np.cumsum([0, *sizes])
    return [ts.ckks_vector(ctx, padded[lo:hi].tolist()).serialize() for lo, hi in zip(bounds[:-1], bounds[1:])]


def load_ciphertexts(ctx, blobs: list[bytes], sizes: Sequence[int], what: str) -> list:
    """Deserialize against the given (public) context; anything malformed raises PayloadError."""
    import tenseal as ts

    if len(blobs) != len(sizes):
        raise PayloadError(f"{what}: {len(blobs)} ciphertexts, expected {len(sizes)}")
    out = []
    for i, (blob, size) in enumerate(zip(blobs, sizes)):
        try:
            vec = ts.ckks_vector_from(ctx, blob)
        except Exception as err:  # tenseal: ValueError (bad stream) or RuntimeError (foreign parameters)
            raise PayloadError(f"{what}: ciphertext {i} does not parse under the run's CKKS context ({err})") from err
        if vec.size() != size:
            raise PayloadError(f"{what}: ciphertext {i} holds {vec.size()} values, expected {size}")
        out.append(vec)
    return out


def block_matrix(b: np.ndarray, weight: float, positions: Sequence[int], blocks: int, rows: int) -> np.ndarray:
    """The plaintext M (rows x blocks*m): block c of rows -> output block positions[c] holds w * B^T."""
    m, r = b.shape
    mat = np.zeros((rows, blocks * m))
    wbt = weight * np.asarray(b, dtype=np.float64).T  # (r, m)
    for c, pos in enumerate(positions):
        mat[c * r : (c + 1) * r, pos * m : (pos + 1) * m] = wbt
    return mat


def weighted_products(cts: list, sizes: Sequence[int], b: np.ndarray, weight: float, positions: Sequence[int],
                      chunks: Sequence[tuple[int, int]], blocks: int, what: str) -> dict[int, object]:
    """Enc(w B a_c) placed at output block positions[c], per output chunk index (chunks it does not touch are absent)."""
    mat = block_matrix(b, weight, positions, blocks, sum(sizes))
    bounds = np.cumsum([0, *sizes])
    out: dict[int, object] = {}
    try:
        for o, (lo, hi) in enumerate(chunks):
            for ct, r0, r1 in zip(cts, bounds[:-1], bounds[1:]):
                part = mat[r0:r1, lo:hi]
                if not part.any():  # this input chunk has no block in this output chunk
                    continue
                term = ct.mm(part.tolist())
                out[o] = out[o] + term if o in out else term
    except Exception as err:
        raise PayloadError(f"{what}: encrypted vector-matrix product failed ({err})") from err
    return out


def add_into(acc: dict, terms: dict) -> dict:
    """Sum per output chunk."""
    for o, term in terms.items():
        acc[o] = acc[o] + term if o in acc else term
    return acc


def encrypt_dense(ctx, flat: np.ndarray, slots: int) -> list[bytes]:
    import tenseal as ts

    flat = np.asarray(flat, dtype=np.float64)
    count = math.ceil(len(flat) / slots)
    padded = np.zeros(count * slots)
    padded[: len(flat)] = flat
    return [ts.ckks_vector(ctx, padded[c * slots : (c + 1) * slots].tolist()).serialize() for c in range(count)]


def decrypt_blocks(ctx, blobs: list[bytes], chunks: Sequence[tuple[int, int]], m: int) -> np.ndarray:
    """The aggregated encrypted columns (m, K): decrypt the output chunks, block p is column p."""
    vecs = load_ciphertexts(ctx, blobs, [hi - lo for lo, hi in chunks], "aggregate")
    flat = np.concatenate([np.asarray(v.decrypt()) for v in vecs]) if vecs else np.zeros(0)
    return flat.reshape(-1, m).T


def decrypt_dense(ctx, blobs: list[bytes], length: int, slots: int) -> np.ndarray:
    vecs = load_ciphertexts(ctx, blobs, [slots] * len(blobs), "aggregate")
    return np.concatenate([np.asarray(v.decrypt()) for v in vecs])[:length]
