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

import hashlib
import itertools
import math
from collections.abc import Iterator

import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import gemm_mod_2_64
from hetune.crypto.rlwe_params import DEFAULT_PARAM_SET, PARAM_SETS
from hetune.crypto.scheme import ParamSet, PayloadError, Scheme

NAME = "rlwe"
_COL_CHUNK = 1024  # coefficient columns per GEMM batch on the worker (bounds memory)
STREAM_ROWS = 256  # output polynomials per streamed result chunk: 4 MiB of int64 at N = 2048


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

    def wire_bytes(self, params: ParamSet, forward_l2: float, backward_l2: float) -> dict:
        """Per direction: upload (b), fresh-mask result (A_out and B_out), and with fixed masks the per-call
        body result and the one-time hint, each the fewest bytes the op's norm allows (rlwe_params)."""
        rp = PARAM_SETS[params.name]
        out = {}
        for direction, l2 in (("forward", forward_l2), ("backward", backward_l2)):
            try:
                hint, body = rp.hinted_bytes(l2)
                out[direction] = {"upload": rp.input_bytes, "fresh_result": 2 * rp.output_bytes(l2), "body": body, "hint": hint}
            except ValueError:  # beyond the set's norm limit: compile refuses the op (or the user accepted the risk)
                out[direction] = {}
        return out

    def request_bytes(self, params: ParamSet, rows: int, cols: int) -> int:
        rp = PARAM_SETS[params.name]
        return wire.HEADER_BYTES + cols * blocks(rows, rp.n) * rp.n * rp.input_bytes

    def check_request(self, params: ParamSet, body: bytes, rows: int, cols: int) -> None:
        kinds = (wire.REQUEST, wire.HINTED_REQUEST, wire.HINT_QUERY)
        header = wire.Header.parse(body, kinds, NAME, params.name, rows, cols)
        rp = PARAM_SETS[params.name]
        if header.kind == wire.HINT_QUERY:
            if rows % rp.n or len(body) != wire.HEADER_BYTES:
                raise PayloadError(f"a hint query is the {wire.HEADER_BYTES}-byte header alone, rows a multiple of {rp.n}; "
                                   f"got {len(body)} bytes, rows {rows}", 422)
            return
        if header.value_bytes != rp.input_bytes:
            raise PayloadError(f"{NAME}/{params.name} requests carry {rp.input_bytes}-byte values, header says {header.value_bytes}")
        expected = self.request_bytes(params, rows, cols)
        if len(body) != expected:
            raise PayloadError(f"a {rows}x{cols} {NAME}/{params.name} request is {expected} bytes, got {len(body)} (truncated?)", 422)

    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor, device: str = "cpu") -> bytes:
        return b"".join(self.multiply_stream(params, session, body, weight, device))

    def multiply_stream(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor,
                        device: str = "cpu") -> Iterator[bytes]:
        """W (n_out, n_in) times every ciphertext mod 2^64, each result rounded to the widths the op's norm allows,
        yielded as the header and then chunks of :data:`STREAM_ROWS` output polynomials (plus a hint's digest).

        REQUEST (fresh masks): A_out = W A, then B_out = W B. HINTED_REQUEST (fixed masks): B_out
        only, half the work and the bytes. HINT_QUERY: the hint H_k = W A_k of one block, then its
        SHA-256. Each chunk is computed when the previous one has been taken, so the result is never
        held whole: memory is the input plus one chunk, and a reader can decrypt (or write to disk)
        chunk i while chunk i + 1 is computed.
        """
        rp = PARAM_SETS[params.name]
        header = wire.Header.parse(body, (wire.REQUEST, wire.HINTED_REQUEST, wire.HINT_QUERY), NAME, params.name)
        n_in, n_out = weight.shape[1], weight.shape[0]
        w = weight.to(torch.int64)
        wmax = int(w.abs().max()) if w.numel() else 0
        norm = float(w.to(torch.float64).norm(dim=1).max()) if w.numel() else 0.0
        wf = w.to(device=device, dtype=torch.float64)  # converted once per product, not per model

        def product(x: torch.Tensor, nbytes: int) -> Iterator[bytes]:  # W x mod 2^64 packed, a chunk of output rows at a time
            x = x.to(device)
            for o in range(0, n_out, STREAM_ROWS):
                rows = torch.cat([gemm_mod_2_64(wf[o : o + STREAM_ROWS], x[:, i : i + _COL_CHUNK], max_abs_weight=wmax).cpu()
                                  for i in range(0, x.shape[1], _COL_CHUNK)], dim=1)
                yield wire.pack_top(rows, nbytes)

        if header.kind == wire.HINT_QUERY:
            block = header.rows // rp.n - 1
            a = randomness.aes_ctr_words(header.seed, n_in * rp.n, start=block * n_in * rp.n).view(n_in, rp.n)
            mask_bytes, _ = rp.hinted_bytes(norm)
            digest = hashlib.sha256()
            for chunk in itertools.chain([wire.Header(wire.HINT, NAME, params.name, header.rows, n_out, mask_bytes,
                                                      header.seed).pack()], product(a, mask_bytes)):
                digest.update(chunk)
                yield chunk
            yield digest.digest()
            return
        cols_coef = blocks(header.rows, rp.n) * rp.n
        count = n_in * cols_coef
        b = wire.unpack_top(memoryview(body)[wire.HEADER_BYTES :], count, header.value_bytes).view(n_in, cols_coef)
        if header.kind == wire.HINTED_REQUEST:
            _, body_bytes = rp.hinted_bytes(norm)
            yield wire.Header(wire.HINTED_RESULT, NAME, params.name, header.rows, n_out, body_bytes, bytes(16)).pack()
            yield from product(b, body_bytes)
            return
        a = randomness.aes_ctr_words(header.seed, count).view(n_in, cols_coef)
        out_bytes = rp.output_bytes(norm)
        yield wire.Header(wire.RESULT, NAME, params.name, header.rows, n_out, out_bytes, bytes(16)).pack()
        yield from product(a, out_bytes)
        del a
        yield from product(b, out_bytes)


SCHEME = RlweScheme()
