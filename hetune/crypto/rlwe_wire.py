"""Wire format of the batched RLWE scheme: a fixed header, then packed 64-bit values.

Header (little-endian, 47 bytes): magic ``HTRL``, format version, kind (request or
result), scheme and parameter-set names (8 bytes each, NUL-padded), rows (tokens) and
columns (features) as uint32, bytes per value, and the 16-byte mask seed (zero in
results). A request body is b for every (feature, block) ciphertext, each coefficient
rounded to its top ``value_bytes`` bytes; a result body is A_out then B_out, rounded the
same way to the width the worker picked. The worker checks the header and the exact
size before any heavy work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from hetune.crypto.scheme import PayloadError

MAGIC = b"HTRL"
VERSION = 1
REQUEST, RESULT = 1, 2
_FORMAT = "<4sBB8s8sIIB16s"
HEADER_BYTES = struct.calcsize(_FORMAT)


@dataclass(frozen=True)
class Header:
    kind: int
    scheme: str
    param_set: str
    rows: int
    cols: int
    value_bytes: int
    seed: bytes

    def pack(self) -> bytes:
        return struct.pack(_FORMAT, MAGIC, VERSION, self.kind, self.scheme.encode(), self.param_set.encode(),
                           self.rows, self.cols, self.value_bytes, self.seed)

    @classmethod
    def parse(cls, data: bytes, kind: int, scheme: str, param_set: str,
              rows: int | None = None, cols: int | None = None) -> "Header":
        """Parse and check against what the receiver expects; PayloadError names the mismatch."""
        what = "request" if kind == REQUEST else "result"
        if len(data) < HEADER_BYTES or bytes(data[:4]) != MAGIC:
            raise PayloadError(f"body is not a batched-RLWE {what} (expected scheme {scheme}/{param_set})")
        magic, version, got_kind, s, p, r, c, vb, seed = struct.unpack_from(_FORMAT, data)
        if version != VERSION:
            raise PayloadError(f"RLWE wire version {version} is not supported (this side speaks {VERSION})")
        got_scheme, got_set = s.rstrip(b"\0").decode(errors="replace"), p.rstrip(b"\0").decode(errors="replace")
        if (got_scheme, got_set) != (scheme, param_set):
            raise PayloadError(f"body is for {got_scheme}/{got_set}, this session uses {scheme}/{param_set}", 422)
        if got_kind != kind:
            raise PayloadError(f"body is not an RLWE {what} (kind {got_kind})")
        if (rows is not None and r != rows) or (cols is not None and c != cols):
            raise PayloadError(f"header says {r}x{c}, expected {rows}x{cols}", 422)
        if not 1 <= vb <= 8 or r < 1 or c < 1:
            raise PayloadError(f"header has bad sizes (rows {r}, cols {c}, {vb} bytes per value)")
        return cls(got_kind, got_scheme, got_set, r, c, vb, seed)


def _top_bytes(nbytes: int) -> np.dtype:
    """An int64 seen as (low bytes, top ``nbytes`` bytes), little-endian: field copies are one memcpy per value."""
    return np.dtype([("low", f"V{8 - nbytes}"), ("top", f"V{nbytes}")])


def pack_top(x: torch.Tensor, nbytes: int) -> bytes:
    """Round int64 values (mod 2^64) to their top ``nbytes`` bytes and serialize them."""
    drop = 64 - 8 * nbytes
    if not drop:
        return x.contiguous().numpy().tobytes()
    rounded = x.contiguous().numpy() + np.int64(1 << (drop - 1))  # wraps mod 2^64: the top bytes are the rounded value
    return rounded.view(_top_bytes(nbytes))["top"].tobytes()


def unpack_top(data, count: int, nbytes: int) -> torch.Tensor:
    """Inverse of :func:`pack_top`: ``count`` int64 values with the top bytes restored, low bytes zero."""
    if nbytes == 8:
        return torch.from_numpy(np.frombuffer(data, dtype=np.int64, count=count).copy())
    full = np.zeros(count, dtype=np.int64)
    full.view(_top_bytes(nbytes))["top"] = np.frombuffer(data, dtype=f"V{nbytes}", count=count)
    return torch.from_numpy(full)
