"""The batched RLWE scheme: tokens in the coefficients, the worker's product as exact integer GEMMs.

An op input X (T tokens x n_in features) becomes one ciphertext per feature j and block
of N tokens: m_j(X) = sum_t X[t, j] X^t, c_j = (a_j, b_j = a_j s + e_j + Delta m_j) mod 2^64.
The worker computes A_out = W A and B_out = W B mod 2^64 with the clear integer weight:
output o then encrypts sum_j W[o, j] m_j = (X W^T)[:, o]. No key switch, no rotation, no
evaluation key: a session holds nothing per data owner. This module is the worker's and
the public half; the data owner's keys are in :mod:`hetune.crypto.rlwe_keys`. The noise analysis that fixes
Delta and every width is in :mod:`hetune.crypto.rlwe_params`; the wire format in
:mod:`hetune.crypto.rlwe_wire`. Decryption is exact, so results equal the clear integer
product bit for bit. See ../shared/specs/batched_rlwe.md and docs/design.md.
"""

from __future__ import annotations

import math

import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import gemm_mod_2_64
from hetune.crypto.rlwe_params import DEFAULT_PARAM_SET, PARAM_SETS
from hetune.crypto.scheme import ParamSet, PayloadError, Scheme

NAME = "rlwe"
_COL_CHUNK = 1024  # coefficient columns per GEMM batch on the worker (bounds memory)


def blocks(rows: int, n: int) -> int:
    return math.ceil(rows / n)


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


SCHEME = RlweScheme()
