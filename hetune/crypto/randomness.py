"""Cryptographic randomness: OS CSPRNG seeds expanded with AES-128-CTR, never numpy's or torch's RNGs.

Public masks come from a 128-bit seed that both sides expand the same way; each
ciphertext uses its own range of the counter stream. Secrets and noise come from seeds
that never leave this process. tfhe-rs seeds its ciphertext masks the same way (an
AES-CTR CSPRNG).

The keystream is AES-CTR applied to zeros with ``update_into`` straight into the output
tensor's memory, from one shared read-only block of zeros: no per-call plaintext buffer
and no copy (about 5x cheaper per ciphertext than encrypting a fresh ``bytes(n)``).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

SEED_BYTES = 16
_AES_BLOCK = 16
_ZEROS = bytes(1 << 20)  # read-only plaintext for the keystream, shared by every call and thread


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def _keystream_into(seed: bytes, out: torch.Tensor, nbytes: int, block: int = 0) -> None:
    """Fill the first ``nbytes`` of ``out``'s storage with the AES-128-CTR keystream of ``seed`` from counter ``block``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    buf = memoryview(out.numpy()).cast("B")  # `out` has AES_BLOCK - 1 spare bytes: update_into's requirement
    for start in range(0, nbytes, len(_ZEROS)):
        size = min(len(_ZEROS), nbytes - start)
        encryptor.update_into(memoryview(_ZEROS)[:size], buf[start : start + size + _AES_BLOCK - 1])


def aes_ctr_words(seed: bytes, count: int, start: int = 0) -> torch.Tensor:
    """Words ``start .. start + count`` (int64, two's complement) of the AES-128-CTR stream keyed by ``seed``.

    Two words per AES block, so ``start`` is even: the stream is seekable, and a block of
    fixed masks is read without expanding the ones before it.
    """
    if start % 2:
        raise ValueError(f"a keystream starts at an even word (one AES block is two words), got {start}")
    out = torch.empty(count + 2, dtype=torch.int64)  # 2 spare words: update_into's tail room
    _keystream_into(seed, out, 8 * count, start // 2)
    return out[:count]


def binary_secret(n: int) -> torch.Tensor:
    """Uniform binary coefficients from the OS CSPRNG."""
    bits = np.unpackbits(np.frombuffer(secrets.token_bytes((n + 7) // 8), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.int64))


def t_uniform(count: int, bound_log2: int) -> torch.Tensor:
    """``count`` samples of TUniform(b): uniform on [-2^b, 2^b], the two ends at half weight (int32).

    tfhe-rs's noise distribution (its ``DynamicDistribution::new_t_uniform``). From one fresh
    32-bit word w of an AES-CTR stream keyed by a secret OS seed: its top b + 1 bits k and
    its lowest bit c give k + c - 2^b. The value v = k + c - 2^b arises from (k, c) =
    (v + 2^b, 0) or (v + 2^b - 1, 1): two outcomes inside, one at either end. Equivalently
    e = sum_{i<=b} 2^(i-1) eps_i + eps'/2 with independent signs eps (each bit of k centred,
    and c centred), which makes it strictly sub-Gaussian: its variance (2^(2b+1) + 1) / 6 is
    also its variance proxy (cosh x <= exp(x^2 / 2) per sign), the fact that
    :mod:`hetune.crypto.rlwe_params` uses. Integer numpy ops, single-threaded: a few us per
    ciphertext, against about 70 for Box-Muller's logs, roots and trig.
    """
    if not 0 <= bound_log2 <= 29:
        raise ValueError(f"TUniform bound 2^{bound_log2} does not fit the 32-bit draws used here")
    words = torch.empty(count + 4, dtype=torch.int32)  # one 32-bit draw per sample; 4 spare words for update_into
    _keystream_into(new_seed(), words, 4 * count)
    w = words.numpy()[:count].view(np.uint32)
    e = (w >> (31 - bound_log2)).view(np.int32)  # k: the top b + 1 bits, in [0, 2^(b+1))
    e += (w & 1).view(np.int32)  # + c
    e -= 1 << bound_log2
    return torch.from_numpy(e)
