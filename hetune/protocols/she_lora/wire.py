"""A safe byte format for SHE-LoRA payloads: JSON header + raw arrays + ciphertext blobs.

No pickle: the server parses bytes from clients it does not trust, so the format is
checked field by field (magic, header, dtypes, shapes, offsets) and anything malformed
raises :class:`PayloadError`, which the strategy turns into "reject this client".
"""

from __future__ import annotations

import json
import struct

import numpy as np

from hetune.errors import HetuneError

MAGIC = b"HSL1"
_DTYPES = ("float32", "float64", "int64")


class PayloadError(HetuneError):
    """A client's or server's SHE-LoRA payload is malformed (bad bytes, ciphertext or shape)."""

    exit_code = 8


def pack(meta: dict, arrays: dict[str, np.ndarray] | None = None, blobs: dict[str, list[bytes]] | None = None) -> bytes:
    arrays, blobs = arrays or {}, blobs or {}
    header: dict = {"meta": meta, "arrays": [], "blobs": []}
    body: list[bytes] = []
    offset = 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _DTYPES:
            raise PayloadError(f"array {name} has dtype {arr.dtype}", f"use one of {_DTYPES}")
        raw = arr.tobytes()
        header["arrays"].append([name, arr.dtype.name, list(arr.shape), offset, len(raw)])
        body.append(raw)
        offset += len(raw)
    for name, items in blobs.items():
        header["blobs"].append([name, [len(b) for b in items], offset])
        body.extend(items)
        offset += sum(len(b) for b in items)
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(body)


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray], dict[str, list[bytes]]]:
    """(meta, arrays, blobs); raises PayloadError on anything that does not add up."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8 or data[:4] != MAGIC:
        raise PayloadError("payload does not start with the SHE-LoRA magic bytes", "the sender is not a SHE-LoRA peer")
    (head_len,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(bytes(data[8 : 8 + head_len]))
        body = memoryview(data)[8 + head_len :]
        arrays = {}
        for name, dtype, shape, offset, nbytes in header["arrays"]:
            if dtype not in _DTYPES:
                raise PayloadError(f"array {name} has dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if nbytes != expected or offset < 0 or offset + nbytes > len(body):
                raise PayloadError(f"array {name}: {nbytes} bytes at {offset} do not fit shape {shape} in the body")
            arrays[name] = np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape).copy()
        blobs = {}
        for name, lengths, offset in header["blobs"]:
            if offset < 0 or any(n < 0 for n in lengths) or offset + sum(lengths) > len(body):
                raise PayloadError(f"blob list {name} runs past the end of the payload")
            items, pos = [], offset
            for n in lengths:
                items.append(bytes(body[pos : pos + n]))
                pos += n
            blobs[name] = items
        if not isinstance(header["meta"], dict):
            raise PayloadError("payload header's meta is not an object")
        return header["meta"], arrays, blobs
    except PayloadError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise PayloadError(f"malformed payload header: {err}") from err
