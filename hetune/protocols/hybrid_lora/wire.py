"""What client and worker agree on over HTTP: API version, ciphertext sizes, codec payload.

Kept free of torch-heavy and HTTP imports so both sides can use it.
"""

from __future__ import annotations

import math

API_VERSION = "v1"
DIRECTIONS = ("forward", "backward")

# Serialized EncryptedMatrix under Concrete ML's default GLWE parameters: each row is
# split into ceil(cols / 2048) GLWE ciphertexts of 10,072 bytes, plus bincode length
# prefixes (24 bytes, then 16 per row). Checked against real ciphertexts in the tests;
# lets the worker refuse a wrong-shaped or truncated upload before any heavy work.
GLWE_CIPHERTEXT_BYTES = 10_072
ROW_OVERHEAD_BYTES = 16
MATRIX_OVERHEAD_BYTES = 24
POLY_SIZE = 2048


def ciphertext_bytes(rows: int, cols: int, poly_size: int = POLY_SIZE, glwe_bytes: int = GLWE_CIPHERTEXT_BYTES) -> int:
    """Serialized size; other GLWE parameter sets pass their polynomial and GLWE sizes."""
    return MATRIX_OVERHEAD_BYTES + rows * (ROW_OVERHEAD_BYTES + math.ceil(cols / poly_size) * glwe_bytes)


def op_path(op: str, direction: str) -> str:
    return f"ops/{op}/{direction}"
