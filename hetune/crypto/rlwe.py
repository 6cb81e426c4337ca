"""The batched RLWE scheme: tokens in the coefficients, the worker's product as exact integer GEMMs.

An op input X (T tokens x n_in features) becomes one ciphertext per feature j and block
of N tokens: m_j(X) = sum_t X[t, j] X^t, c_j = (a_j, b_j = a_j s + e_j + Delta m_j) mod 2^64.
The worker computes A_out = W A and B_out = W B mod 2^64 with the clear integer weight:
output o then encrypts sum_j W[o, j] m_j = (X W^T)[:, o]. No key switch, no rotation, no
evaluation key: a session holds nothing per data owner. The noise analysis that fixes
Delta and every width is in :mod:`hetune.crypto.rlwe_params`; the wire format in
:mod:`hetune.crypto.rlwe_wire`. Decryption is exact, so results equal the clear integer
product bit for bit. See ../shared/specs/batched_rlwe.md and docs/design.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import BinaryPolyMultiplier, gemm_mod_2_64
from hetune.crypto.rlwe_params import DEFAULT_PARAM_SET, PARAM_SETS, RlweParamSet
from hetune.crypto.scheme import ClientKeys, ParamSet, PayloadError, Scheme, register_scheme

NAME = "rlwe"
_POLY_CHUNK = 1024  # polynomials per FFT batch on the client (bounds memory)
_COL_CHUNK = 1024  # coefficient columns per GEMM batch on the worker (bounds memory)
_KEY_MAGIC = b"HTRLWEsk"


def blocks(rows: int, n: int) -> int:
    return math.ceil(rows / n)


def _chunked_mul(mult: BinaryPolyMultiplier, a: torch.Tensor) -> torch.Tensor:
    """a (P, N) -> a * s, in batches of polynomials."""
    return torch.cat([mult.mul(a[i : i + _POLY_CHUNK]) for i in range(0, a.shape[0], _POLY_CHUNK)])


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
        m = torch.zeros(cols, c * n, dtype=torch.int64)
        m[:, :rows] = x.T  # feature j's polynomial holds its T tokens (block-major)
        seed = randomness.new_seed()
        a = randomness.aes_ctr_words(seed, cols * c * n).view(cols * c, n)
        e = randomness.rounded_gaussian(cols * c * n, self.rp.sigma).view(cols * c, n)
        b = _chunked_mul(self._mult, a) + e + (m.view(cols * c, n) << self.rp.log2_delta)
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
        phase = b - _chunked_mul(self._mult, a)  # Delta m + noise, mod 2^64
        d = self.rp.log2_delta
        m = (phase + (1 << (d - 1))) >> d  # round(phase / Delta), signed
        return m.view(cols, c * n)[:, :rows].T.contiguous().numpy()

    def save(self, path: Path) -> None:
        """Layout: magic, set name (8 bytes), packed secret bits. Written 0600 via a temp file."""
        from hetune.files import write_atomic

        bits = np.packbits(self._secret.numpy().astype(np.uint8)).tobytes()
        write_atomic(Path(path), _KEY_MAGIC + self.rp.name.encode().ljust(8, b"\0") + bits, mode=0o600)


class RlweScheme(Scheme):
    name = NAME
    param_sets = tuple(PARAM_SETS)
    default_param_set = DEFAULT_PARAM_SET

    def params(self, name: str) -> ParamSet:
        if name not in PARAM_SETS:
            raise self.unknown_set(name)
        rp = PARAM_SETS[name]
        return ParamSet(
            scheme=NAME, name=name, security=rp.security, security_source=rp.source, budget_bits=rp.budget_bits,
            exact=True, noise_bound=0, session_key_bytes=0, poly_size=rp.n, max_weight_l2=rp.max_weight_l2,
        )

    def generate_keys(self, param_set: str | None = None) -> RlweKeys:
        rp = PARAM_SETS[self.resolve(param_set).name]
        return RlweKeys(rp, randomness.binary_secret(rp.n))

    def load_keys(self, path: Path) -> RlweKeys:
        from hetune.errors import ConfigError

        data = Path(path).read_bytes()
        name = data[8:16].rstrip(b"\0").decode(errors="replace")
        if data[:8] != _KEY_MAGIC or name not in PARAM_SETS or len(data) != 16 + PARAM_SETS[name].n // 8:
            raise ConfigError(f"{path} is not a hetune RLWE secret key", "pass the file written by --save-key")
        rp = PARAM_SETS[name]
        bits = np.unpackbits(np.frombuffer(data[16:], dtype=np.uint8))[: rp.n]
        return RlweKeys(rp, torch.from_numpy(bits.astype(np.int64)))

    def open_session(self, params: ParamSet, key: bytes) -> None:
        if key:
            raise PayloadError(f"an {NAME} session takes no key; send an empty body (got {len(key)} bytes)")
        return None

    def request_bytes(self, params: ParamSet, rows: int, cols: int) -> int:
        rp = PARAM_SETS[params.name]
        return wire.HEADER_BYTES + cols * blocks(rows, rp.n) * rp.n * rp.input_bytes

    def check_request(self, params: ParamSet, body: bytes, rows: int, cols: int) -> None:
        header = wire.Header.parse(body, wire.REQUEST, NAME, params.name, rows, cols)
        rp = PARAM_SETS[params.name]
        if header.value_bytes != rp.input_bytes:
            raise PayloadError(f"{NAME}/{params.name} requests carry {rp.input_bytes}-byte values, header says {header.value_bytes}")
        expected = self.request_bytes(params, rows, cols)
        if len(body) != expected:
            raise PayloadError(f"a {rows}x{cols} {NAME}/{params.name} request is {expected} bytes, got {len(body)} (truncated?)", 422)

    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor, device: str = "cpu") -> bytes:
        """W (n_out, n_in) times every ciphertext: A_out = W A, B_out = W B mod 2^64, rounded per the op's norm."""
        rp = PARAM_SETS[params.name]
        header = wire.Header.parse(body, wire.REQUEST, NAME, params.name)
        n_in, cols_coef = weight.shape[1], blocks(header.rows, rp.n) * rp.n
        count = n_in * cols_coef
        a = randomness.aes_ctr_words(header.seed, count).view(n_in, cols_coef)
        b = wire.unpack_top(memoryview(body)[wire.HEADER_BYTES :], count, header.value_bytes).view(n_in, cols_coef)
        w = weight.to(torch.int64)
        wmax = int(w.abs().max()) if w.numel() else 0
        out_bytes = rp.output_bytes(float(w.to(torch.float64).norm(dim=1).max()) if w.numel() else 0.0)
        wf = w.to(device=device, dtype=torch.float64)  # converted once per product, not per model
        out_a, out_b = [], []
        for start in range(0, cols_coef, _COL_CHUNK):
            for src, dst in ((a, out_a), (b, out_b)):
                chunk = src[:, start : start + _COL_CHUNK].to(device)
                dst.append(gemm_mod_2_64(wf, chunk, max_abs_weight=wmax).cpu())
        a_out, b_out = torch.cat(out_a, dim=1), torch.cat(out_b, dim=1)
        result = wire.Header(wire.RESULT, NAME, params.name, header.rows, weight.shape[0], out_bytes, bytes(16))
        return result.pack() + wire.pack_top(a_out, out_bytes) + wire.pack_top(b_out, out_bytes)


SCHEME = register_scheme(RlweScheme())
