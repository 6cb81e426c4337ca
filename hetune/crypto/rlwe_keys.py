"""The data owner's batched RLWE keys: encrypt requests, decrypt results (see :mod:`hetune.crypto.rlwe`).

The worker never imports this module (tests/test_layout.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import BinaryPolyMultiplier
from hetune.crypto.rlwe import NAME, SCHEME, blocks
from hetune.crypto.rlwe_params import PARAM_SETS, RlweParamSet
from hetune.crypto.scheme import ClientKeys, PayloadError
from hetune.errors import ConfigError
from hetune.files import write_atomic

_POLY_CHUNK = 1024  # polynomials per FFT batch (bounds memory)
_KEY_MAGIC = b"HTRLWEsk"


def _chunked(fn, a: torch.Tensor) -> torch.Tensor:
    """fn over a (P, N) in batches of polynomials (bounds the FFT's memory)."""
    return torch.cat([fn(a[i : i + _POLY_CHUNK]) for i in range(0, a.shape[0], _POLY_CHUNK)])


def top_bits(x: torch.Tensor, k: int) -> torch.Tensor:
    """Values mod 2^64 rounded to their top k bits, as signed integers |x'| <= 2^(k-1): x ~ x' 2^(64-k)."""
    return (x + (1 << (63 - k))) >> (64 - k) if k < 64 else x  # wrapping add, arithmetic shift: round mod 2^k


class RlweKeys(ClientKeys):
    """Binary secret s from the OS CSPRNG; its FFT is kept for the many products with it."""

    def __init__(self, rp: RlweParamSet, secret: torch.Tensor):
        self.rp, self.params = rp, SCHEME.params(rp.name)
        self._secret = secret
        self._mult = BinaryPolyMultiplier(secret)

    def session_key(self) -> bytes:
        return b""  # the worker needs no evaluation key

    def encrypt(self, q) -> bytes:
        x = torch.as_tensor(np.asarray(q), dtype=torch.int64)  # (T, k) small integers
        rows, cols = x.shape
        n = self.rp.n
        c = blocks(rows, n)
        seed = randomness.new_seed()
        a = randomness.aes_ctr_words(seed, cols * c * n).view(cols * c, n)
        b = _chunked(self._mult.mul, a)  # exact a * s: 2 limbs
        b += randomness.t_uniform(cols * c * n, self.rp.noise_bound_log2).view(cols * c, n)
        b.view(cols, c * n)[:, :rows] += x.T << self.rp.log2_delta  # feature j's polynomial holds its T tokens (block-major)
        header = wire.Header(wire.REQUEST, NAME, self.rp.name, rows, cols, self.rp.input_bytes, seed)
        return header.pack() + wire.pack_top(b, self.rp.input_bytes)

    def decrypt(self, result: bytes, rows: int, cols: int) -> np.ndarray:
        header = wire.Header.parse(result, wire.RESULT, NAME, self.rp.name, rows, cols)
        n, c = self.rp.n, blocks(rows, self.rp.n)
        count = cols * c * n
        body = memoryview(result)[wire.HEADER_BYTES :]
        if len(body) != 2 * count * header.value_bytes:
            raise PayloadError(f"result of {rows}x{cols} must carry {2 * count * header.value_bytes} bytes, got {len(body)}")
        a = wire.unpack_top(body[: count * header.value_bytes], count, header.value_bytes).view(cols * c, n)
        b = wire.unpack_top(body[count * header.value_bytes :], count, header.value_bytes).view(cols * c, n)
        k = min(8 * header.value_bytes, self.rp.fft_bits)  # only the top bits of a * s matter: one FFT
        phase = b - (_chunked(self._mult.mul_small, top_bits(a, k)) << (64 - k))  # Delta m + noise, mod 2^64
        d = self.rp.log2_delta
        m = (phase + (1 << (d - 1))) >> d  # round(phase / Delta), signed
        return m.view(cols, c * n)[:, :rows].T.contiguous().numpy()

    def save(self, path: Path) -> None:
        """Layout: magic, set name (8 bytes), packed secret bits. Written 0600 via a temp file."""
        bits = np.packbits(self._secret.numpy().astype(np.uint8)).tobytes()
        write_atomic(Path(path), _KEY_MAGIC + self.rp.name.encode().ljust(8, b"\0") + bits, mode=0o600)



def generate(param_set: str) -> RlweKeys:
    rp = PARAM_SETS[SCHEME.resolve(param_set).name]
    return RlweKeys(rp, randomness.binary_secret(rp.n))


def load(path: Path) -> RlweKeys:
    data = Path(path).read_bytes()
    name = data[8:16].rstrip(b"\0").decode(errors="replace")
    if data[:8] != _KEY_MAGIC or name not in PARAM_SETS or len(data) != 16 + PARAM_SETS[name].n // 8:
        raise ConfigError(f"{path} is not a hetune RLWE secret key", "pass the file written by --save-key")
    rp = PARAM_SETS[name]
    bits = np.unpackbits(np.frombuffer(data[16:], dtype=np.uint8))[: rp.n]
    return RlweKeys(rp, torch.from_numpy(bits.astype(np.int64)))
