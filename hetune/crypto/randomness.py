"""Cryptographic randomness: OS CSPRNG seeds expanded with AES-128-CTR, never numpy's or torch's RNGs.

Public masks come from a fresh 128-bit seed per request that both sides expand the same
way; each ciphertext uses its own range of the counter stream, and a seed is never
reused (two ciphertexts with one mask under one key would leak the difference of their
messages). Secrets and noise come from seeds that never leave this process. tfhe-rs
seeds its ciphertext masks the same way (an AES-CTR CSPRNG).
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch

SEED_BYTES = 16


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def aes_ctr_words(seed: bytes, count: int) -> torch.Tensor:
    """``count`` pseudo-random 64-bit words (int64, two's complement) from AES-128-CTR keyed by ``seed``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    buf = bytearray(count * 8)
    encryptor.update_into(bytes(count * 8), buf)  # keystream = E_k(counter) xor 0
    return torch.frombuffer(buf, dtype=torch.int64)


def binary_secret(n: int) -> torch.Tensor:
    """Uniform binary coefficients from the OS CSPRNG."""
    bits = np.unpackbits(np.frombuffer(secrets.token_bytes((n + 7) // 8), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.int64))


def rounded_gaussian(count: int, sigma: float) -> torch.Tensor:
    """``count`` samples of round(N(0, sigma^2)) (int64), Box-Muller over AES-CTR words from a secret OS seed."""
    words = aes_ctr_words(new_seed(), 2 * ((count + 1) // 2)).view(2, -1)
    # a signed word, rounded to float64's 53 bits, mapped onto [0, 1); 1 - u > 0 keeps log() finite
    u = torch.clamp(words.to(torch.float64) * 2.0**-64 + 0.5, max=1.0 - 2.0**-53)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[0])) * sigma
    angle = (2 * math.pi) * u[1]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
    return torch.round(z).to(torch.int64)
