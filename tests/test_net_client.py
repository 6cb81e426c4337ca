"""The owners' HTTP client decodes a compressed answer in bounded pieces (hetune.net.client._decoded)."""

import gzip
import zlib

import pytest

from hetune.net.client import _INFLATE_STEP, _decoded, _Undecodable


def test_gzip_and_deflate_inflate_in_bounded_pieces():
    body = bytes(5 * _INFLATE_STEP) + b"tail"
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        raw = [packed[i : i + 65536] for i in range(0, len(packed), 65536)]  # as network reads
        pieces = list(_decoded(iter(raw), encoding))
        assert max(len(p) for p in pieces) <= _INFLATE_STEP and b"".join(pieces) == body
    assert list(_decoded(iter([b"ab", b"c"]), "")) == [b"ab", b"c"]


def test_an_unknown_corrupt_or_truncated_encoding_is_refused():
    with pytest.raises(_Undecodable, match="'br'"):
        list(_decoded(iter([b"x"]), "br"))
    with pytest.raises(_Undecodable, match="corrupt gzip"):
        list(_decoded(iter([gzip.compress(b"x")[:10] + b"\xff\xff\xff\xff"]), "gzip"))
    with pytest.raises(_Undecodable, match="truncated deflate"):
        list(_decoded(iter([zlib.compress(bytes(1000))[:-6]]), "deflate"))
