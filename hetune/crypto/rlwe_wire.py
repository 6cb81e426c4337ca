"""Wire format of the batched RLWE scheme: a fixed header, then packed 64-bit values.

Header (little-endian, 47 bytes): magic ``HTRL``, format version, kind, scheme and
parameter-set names (8 bytes each, NUL-padded), rows (tokens) and columns (features) as
uint32, bits per value k, and the 16-byte mask seed (zero in results). Values are
coefficients rounded to their top k bits (below 64: add 2^(63-k) mod 2^64, keep the top k),
feature-major (feature or output j's blocks of N coefficients one after the other), in
units of 256 values; with k = 8h + e, a unit is its
values' top h bytes each (little-endian, value after value), then e bit planes of 32 bytes:
plane j holds bit j of each value's remaining e bits (value i at bit i, little-endian bit
order). At whole-byte widths (e = 0) this is each value's top k/8 bytes in turn; a width
between, such as the 33-bit body result, costs k/8 bytes per value. Counts are multiples of
N >= 256, so every message is whole units.

Kinds, with fresh masks per request (the masks of every ciphertext from the request's seed):
- REQUEST: b of every (feature, block) ciphertext; RESULT: A_out then B_out, then the trailer.
With fixed masks (the hint; version 2): the masks of an op and direction come from one
seed fixed for the session, block k's at words [k n_in N, (k + 1) n_in N) of its stream:
- HINTED_REQUEST: b as in REQUEST, under a fresh secret per call; HINTED_RESULT: B_out only, then the trailer;
- HINT_QUERY: the header alone, rows = (k + 1) N asks for block k; HINT: H_k = W A_k
  (n_out x N), then a SHA-256 of header and values, so a truncated or corrupted hint is
  detected wherever it is read (the wire or the owner's disk cache).
Results end with a 12-byte trailer (version 3+): ``HTWS`` and the worker's seconds on the
product as a float64, so a result streamed before the product was done still says them.
The worker checks the header before any heavy work and the exact size as the body arrives.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from hetune.crypto.scheme import PayloadError

MAGIC = b"HTRL"
VERSION = 4  # 2: fixed masks and hints (kinds 3-6); 3: results end with the worker's seconds; 4: widths in bits
REQUEST, RESULT, HINTED_REQUEST, HINTED_RESULT, HINT_QUERY, HINT = 1, 2, 3, 4, 5, 6
_WHAT = {REQUEST: "request", RESULT: "result", HINTED_REQUEST: "request", HINTED_RESULT: "result",
         HINT_QUERY: "hint query", HINT: "hint"}
DIGEST_BYTES = 32  # SHA-256 after a hint's values
_FORMAT = "<4sBB8s8sIIB16s"
HEADER_BYTES = struct.calcsize(_FORMAT)
_TRAILER_MAGIC, _TRAILER_FORMAT = b"HTWS", "<4sd"
TRAILER_BYTES = struct.calcsize(_TRAILER_FORMAT)


@dataclass(frozen=True)
class Header:
    kind: int
    scheme: str
    param_set: str
    rows: int
    cols: int
    value_bits: int
    seed: bytes

    def pack(self) -> bytes:
        return struct.pack(_FORMAT, MAGIC, VERSION, self.kind, self.scheme.encode(), self.param_set.encode(),
                           self.rows, self.cols, self.value_bits, self.seed)

    @classmethod
    def parse(cls, data: bytes, kind: int | tuple[int, ...], scheme: str, param_set: str,
              rows: int | None = None, cols: int | None = None) -> "Header":
        """Parse and check against what the receiver expects (one kind or several); PayloadError names the mismatch."""
        kinds = (kind,) if isinstance(kind, int) else kind
        what = _WHAT[kinds[0]]
        if len(data) < HEADER_BYTES or bytes(data[:4]) != MAGIC:
            raise PayloadError(f"body is not a batched-RLWE {what} (expected scheme {scheme}/{param_set})")
        magic, version, got_kind, s, p, r, c, vb, seed = struct.unpack_from(_FORMAT, data)
        if version != VERSION:
            raise PayloadError(f"RLWE wire version {version} is not supported (this side speaks {VERSION})")
        got_scheme, got_set = s.rstrip(b"\0").decode(errors="replace"), p.rstrip(b"\0").decode(errors="replace")
        if (got_scheme, got_set) != (scheme, param_set):
            raise PayloadError(f"body is for {got_scheme}/{got_set}, this session uses {scheme}/{param_set}", 422)
        if got_kind not in kinds:
            raise PayloadError(f"body is not an RLWE {what} (kind {got_kind})")
        if (rows is not None and r != rows) or (cols is not None and c != cols):
            raise PayloadError(f"header says {r}x{c}, expected {rows}x{cols}", 422)
        if not 1 <= vb <= 64 or r < 1 or c < 1:
            raise PayloadError(f"header has bad sizes (rows {r}, cols {c}, {vb} bits per value)")
        return cls(got_kind, got_scheme, got_set, r, c, vb, seed)


def pack_trailer(worker_s: float) -> bytes:
    return struct.pack(_TRAILER_FORMAT, _TRAILER_MAGIC, worker_s)


def parse_trailer(data: bytes) -> float:
    """The worker's seconds from a result's trailer; PayloadError if it is not one."""
    if len(data) != TRAILER_BYTES or bytes(data[:4]) != _TRAILER_MAGIC:
        raise PayloadError(f"result does not end with its {TRAILER_BYTES}-byte trailer")
    (seconds,) = struct.unpack_from("<d", data, 4)
    if not 0 <= seconds < float("inf"):
        raise PayloadError(f"result trailer gives {seconds} worker seconds")
    return seconds


def _top_bytes(nbytes: int) -> np.dtype:
    """An int64 seen as (low bytes, top ``nbytes`` bytes), little-endian: field copies are one memcpy per value."""
    return np.dtype([("low", f"V{8 - nbytes}"), ("top", f"V{nbytes}")])


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values at ``bits`` each (``count`` whole units of 256, as every count of N-coefficient blocks is)."""
    return count * bits // 8


_UNIT = 256  # values per unit: a unit's bit planes are whole bytes


def digest(data) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


def pack_top(x: torch.Tensor, bits: int) -> bytes:
    """Round int64 values (mod 2^64) to their top ``bits`` bits and serialize them (module docstring)."""
    drop = 64 - bits
    if not drop:
        return x.contiguous().numpy().tobytes()
    rounded = x.contiguous().numpy() + np.int64(1 << (drop - 1))  # wraps mod 2^64: the top bits are the rounded value
    whole, e = divmod(bits, 8)
    if not e:
        return rounded.view(_top_bytes(whole))["top"].tobytes()
    units = _units(rounded.size, bits)
    # one record per unit, written in place: the top bytes of its 256 values, then its e bit planes
    out = np.empty(units, np.dtype(([("top", f"V{whole}", (_UNIT,))] if whole else []) + [("planes", np.uint8, (e, _UNIT // 8))]))
    if whole:
        out["top"] = rounded.view(_top_bytes(whole))["top"].reshape(units, _UNIT)
    # the e bits below the top bytes are the high bits of the byte under them
    rest = (rounded.view(np.uint8).reshape(-1, 8)[:, 7 - whole] >> np.uint8(8 - e)).reshape(units, _UNIT)
    for j in range(e):
        out["planes"][:, j] = np.packbits((rest >> j) & 1, axis=1, bitorder="little")
    return out.tobytes()


def unpack_top(data, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_top`: ``count`` int64 values with the top bits restored, low bits zero."""
    if bits == 64:
        return torch.from_numpy(np.frombuffer(data, dtype=np.int64, count=count).copy())
    whole, e = divmod(bits, 8)
    full = np.zeros(count, dtype=np.int64)
    if not e:
        full.view(_top_bytes(whole))["top"] = np.frombuffer(data, dtype=f"V{whole}", count=count)
        return torch.from_numpy(full)
    units = _units(count, bits)
    raw = np.frombuffer(data, np.uint8, count=packed_bytes(count, bits)).reshape(units, _UNIT * bits // 8)
    if whole:
        full.view(_top_bytes(whole))["top"] = np.ascontiguousarray(raw[:, : _UNIT * whole]).reshape(-1).view(f"V{whole}")
    rest = np.zeros((units, _UNIT), np.uint8)
    for j in range(e):
        start = _UNIT * whole + j * _UNIT // 8
        rest |= np.unpackbits(raw[:, start : start + _UNIT // 8], axis=1, bitorder="little") << np.uint8(j)
    full.view(np.uint8).reshape(count, 8)[:, 7 - whole] = (rest << np.uint8(8 - e)).reshape(-1)  # the byte under the top ones
    return torch.from_numpy(full)


def _units(count: int, bits: int) -> int:
    if count % _UNIT:
        raise PayloadError(f"{count} values at {bits} bits are not whole units of {_UNIT}")
    return count // _UNIT
