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
import time
from collections.abc import Iterator

import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import combine_limbs, gemm_mod_2_64, limb_plan, split_signed
from hetune.crypto.rlwe_params import DEFAULT_PARAM_SET, PARAM_SETS
from hetune.crypto.scheme import ParamSet, PayloadError, Scheme

NAME = "rlwe"
_COL_CHUNK = 1024  # coefficient columns per GEMM batch on the worker (bounds memory)
STREAM_ROWS = 256  # output polynomials per streamed result chunk: 4 MiB of int64 at N = 2048
FEED_BYTES = 2 * 2**20  # request bytes the worker multiplies at once as a body arrives (whole features, at least one)


def blocks(rows: int, n: int) -> int:
    return math.ceil(rows / n)


class RlweScheme(Scheme):
    name = NAME
    param_sets = tuple(PARAM_SETS)
    default_param_set = DEFAULT_PARAM_SET
    header_bytes = wire.HEADER_BYTES

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
        """Per direction, bytes per value: upload (b), fresh-mask result (A_out and B_out), and with fixed masks the
        per-call body result and the one-time hint, each the fewest bits the op's norm allows (rlwe_params) / 8."""
        rp = PARAM_SETS[params.name]
        out = {}
        for direction, l2 in (("forward", forward_l2), ("backward", backward_l2)):
            try:
                hint, body = rp.hinted_bits(l2)
                out[direction] = {"upload": rp.input_bits / 8, "fresh_result": 2 * rp.output_bits(l2) / 8,
                                  "body": body / 8, "hint": hint / 8}
            except ValueError:  # beyond the set's norm limit: compile refuses the op (or the user accepted the risk)
                out[direction] = {}
        return out

    def request_bytes(self, params: ParamSet, rows: int, cols: int) -> int:
        rp = PARAM_SETS[params.name]
        return wire.HEADER_BYTES + wire.packed_bytes(cols * blocks(rows, rp.n) * rp.n, rp.input_bits)

    def product_bytes(self, params: ParamSet, rows: int, out_cols: int, in_cols: int) -> int:
        coefs = blocks(rows, PARAM_SETS[params.name].n) * PARAM_SETS[params.name].n
        limbs = limb_plan(64, in_cols, 128)[1]  # 8-bit weights: |w| <= 128
        return limbs * (out_cols + in_cols) * coefs * 8  # ProductAccumulator's float64 limb sums and A's limbs

    def check_request(self, params: ParamSet, body: bytes, rows: int, cols: int) -> None:
        kinds = (wire.REQUEST, wire.HINTED_REQUEST, wire.HINT_QUERY)
        header = wire.Header.parse(body, kinds, NAME, params.name, rows, cols)
        rp = PARAM_SETS[params.name]
        if header.kind == wire.HINT_QUERY:
            if rows % rp.n or len(body) != wire.HEADER_BYTES:
                raise PayloadError(f"a hint query is the {wire.HEADER_BYTES}-byte header alone, rows a multiple of {rp.n}; "
                                   f"got {len(body)} bytes, rows {rows}", 422)
            return
        if header.value_bits != rp.input_bits:
            raise PayloadError(f"{NAME}/{params.name} requests carry {rp.input_bits}-bit values, header says {header.value_bits}")
        expected = self.request_bytes(params, rows, cols)
        if len(body) != expected:
            raise PayloadError(f"a {rows}x{cols} {NAME}/{params.name} request is {expected} bytes, got {len(body)} (truncated?)", 422)

    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor, device: str = "cpu") -> bytes:
        return b"".join(self.multiply_stream(params, session, body, weight, device))

    def multiply_stream(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor,
                        device: str = "cpu") -> Iterator[bytes]:
        """W (n_out, n_in) times every ciphertext mod 2^64, each result rounded to the widths the op's norm allows,
        yielded as the header and then chunks of :data:`STREAM_ROWS` output polynomials (plus a hint's digest,
        or a product's trailer).

        REQUEST (fresh masks): A_out = W A, then B_out = W B. HINTED_REQUEST (fixed masks): B_out
        only, half the work and the bytes: both through :class:`ProductAccumulator`, as a body
        read a piece at a time would be. HINT_QUERY: the hint H_k = W A_k of one block, each chunk
        computed when the previous one has been taken (a hint is never held whole), then its SHA-256.
        """
        acc = self.accumulator(params, session, body[: wire.HEADER_BYTES], None, None, weight, device)
        if acc is not None:
            view = memoryview(body)[wire.HEADER_BYTES :]
            for i in range(0, len(view), acc.feed_bytes):
                acc.feed(view[i : i + acc.feed_bytes])
            yield from acc.results()
            return
        rp = PARAM_SETS[params.name]
        header = wire.Header.parse(body, wire.HINT_QUERY, NAME, params.name)
        n_in, n_out = weight.shape[1], weight.shape[0]
        w = weight.to(torch.int64)
        wmax, norm = _weight_facts(w)
        wf = w.to(device=device, dtype=torch.float64)  # converted once per product, not per model
        block = header.rows // rp.n - 1
        a = randomness.aes_ctr_words(header.seed, n_in * rp.n, start=block * n_in * rp.n).view(n_in, rp.n).to(device)
        mask_bits, _ = rp.hinted_bits(norm)
        digest = hashlib.sha256()
        chunks = (wire.pack_top(_gemm(wf[o : o + STREAM_ROWS], a, wmax).cpu(), mask_bits) for o in range(0, n_out, STREAM_ROWS))
        for chunk in itertools.chain([wire.Header(wire.HINT, NAME, params.name, header.rows, n_out, mask_bits,
                                                  header.seed).pack()], chunks):
            digest.update(chunk)
            yield chunk
        yield digest.digest()

    def accumulator(self, params: ParamSet, session: object, header: bytes, rows: int | None, cols: int | None,
                    weight: torch.Tensor, device: str = "cpu") -> "ProductAccumulator | None":
        """A product that takes its request's ciphertexts as they arrive; None for a hint query (no body to wait for).
        PayloadError for a header that is not a request of this session's set (and of ``rows`` x ``cols`` if given)."""
        parsed = wire.Header.parse(header, (wire.REQUEST, wire.HINTED_REQUEST, wire.HINT_QUERY), NAME, params.name, rows, cols)
        if parsed.kind == wire.HINT_QUERY:
            return None
        rp = PARAM_SETS[params.name]
        if parsed.value_bits != rp.input_bits:
            raise PayloadError(f"{NAME}/{params.name} requests carry {rp.input_bits}-bit values, header says {parsed.value_bits}")
        return ProductAccumulator(rp, parsed, weight, device)


def _weight_facts(w: torch.Tensor) -> tuple[int, float]:
    """max |W| (for the GEMM's limb plan) and the largest row norm ||W_o||_2 (for the result widths)."""
    if not w.numel():
        return 0, 0.0
    return int(w.abs().max()), float(w.to(torch.float64).norm(dim=1).max())


def _gemm(wf: torch.Tensor, x: torch.Tensor, wmax: int) -> torch.Tensor:
    """wf @ x mod 2^64, :data:`_COL_CHUNK` coefficient columns at a time (bounds memory)."""
    return torch.cat([gemm_mod_2_64(wf, x[:, i : i + _COL_CHUNK], max_abs_weight=wmax) for i in range(0, x.shape[1], _COL_CHUNK)], dim=1)


class ProductAccumulator:
    """W @ (a request's ciphertexts) mod 2^64, summed a piece of whole features at a time as the body arrives.

    Feature j's body ciphertexts meet only column j of W, so W @ B = sum over pieces of
    W[:, piece] @ B[piece]: the worker multiplies piece i while piece i + 1 is on the wire. The
    sums are kept as the float64 limb products of :func:`limb_plan` for the whole request
    (every partial sum an integer below 2^53, so exact), each piece added in place by one
    GEMM (``addmm_``); they become int64 only as the result streams out. Converting each
    piece's product to int64 and adding it to int64 sums instead costs a pass over the whole
    result per piece: three times the GEMM time for the 1B shape's widest op at 2 MiB pieces.
    Fresh masks: A_out = W A does not depend on the body (A comes from the header's seed), so it
    is computed as the result streams out, :data:`STREAM_ROWS` outputs at a time. Memory: the
    limb sums (limbs x n_out x c N float64), A's limbs (fresh masks) and one piece: at most
    :meth:`RlweScheme.product_bytes`.
    """

    def __init__(self, rp, header: wire.Header, weight: torch.Tensor, device: str):
        self.rp, self.header, self.device = rp, header, device
        w = weight.to(torch.int64)
        self.wmax, norm = _weight_facts(w)
        self.wf = w.to(device=device, dtype=torch.float64)
        self.n_in, n_out = w.shape[1], w.shape[0]
        self.coefs = blocks(header.rows, rp.n) * rp.n  # c N coefficients per feature
        self.fixed = header.kind == wire.HINTED_REQUEST
        self.out_bits = rp.hinted_bits(norm)[1] if self.fixed else rp.output_bits(norm)
        self.limb_bits, n_limbs = limb_plan(64, self.n_in, self.wmax)
        self.sums = [torch.zeros(n_out, self.coefs, dtype=torch.float64, device=device) for _ in range(n_limbs)]
        self.feature_bytes = wire.packed_bytes(self.coefs, header.value_bits)
        self.feed_bytes = self.feature_bytes * max(1, FEED_BYTES // self.feature_bytes)  # whole features per piece
        self.done, self.seconds = 0, 0.0  # features summed; the worker's time on this product

    def feed(self, data) -> None:
        """Sum in the next whole features of B."""
        t = time.perf_counter()
        f = len(data) // self.feature_bytes
        if f * self.feature_bytes != len(data) or not 0 < f <= self.n_in - self.done:
            raise PayloadError(f"a request piece of {len(data)} bytes is not whole features of this {self.header.rows}x{self.n_in} request")
        b = wire.unpack_top(data, f * self.coefs, self.header.value_bits).view(f, self.coefs).to(self.device)
        wf = self.wf[:, self.done : self.done + f]
        for total, limb in zip(self.sums, split_signed(b, self.limb_bits, len(self.sums))):
            total.addmm_(wf, limb.to(torch.float64))
        self.done += f
        self.seconds += time.perf_counter() - t

    def results(self) -> Iterator[bytes]:
        """The result: header, chunks of :data:`STREAM_ROWS` outputs per part (A_out, then B_out), and the trailer
        with the worker's seconds."""
        if self.done != self.n_in:
            raise PayloadError(f"request ended after {self.done} of its {self.n_in} features (truncated?)", 422)
        kind = wire.HINTED_RESULT if self.fixed else wire.RESULT
        n_out = self.wf.shape[0]
        yield wire.Header(kind, NAME, self.rp.name, self.header.rows, n_out, self.out_bits, bytes(16)).pack()
        if not self.fixed:
            t = time.perf_counter()
            a = randomness.aes_ctr_words(self.header.seed, self.n_in * self.coefs).view(self.n_in, self.coefs).to(self.device)
            a = [limb.to(torch.float64) for limb in split_signed(a, self.limb_bits, len(self.sums))]  # split once, not per chunk
            self.seconds += time.perf_counter() - t
            yield from self._chunks(lambda o: combine_limbs([(self.wf[o : o + STREAM_ROWS] @ limb).to(torch.int64) for limb in a],
                                                            self.limb_bits))
            del a
        yield from self._chunks(lambda o: combine_limbs([s[o : o + STREAM_ROWS].to(torch.int64) for s in self.sums], self.limb_bits))
        self.sums = []
        yield wire.pack_trailer(self.seconds)

    def _chunks(self, rows_at) -> Iterator[bytes]:
        for o in range(0, self.wf.shape[0], STREAM_ROWS):
            t = time.perf_counter()
            chunk = wire.pack_top(rows_at(o).cpu(), self.out_bits)
            self.seconds += time.perf_counter() - t
            yield chunk


SCHEME = RlweScheme()
