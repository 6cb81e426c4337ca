"""What client and worker agree on over HTTP: API version, directions, paths.

Body formats and sizes belong to each encryption scheme (:mod:`hetune.crypto.scheme`).
Kept free of torch-heavy and HTTP imports so both sides can use it.
"""

from __future__ import annotations

API_VERSION = "v2"  # v2: sessions name a scheme; bodies are the scheme's
DIRECTIONS = ("forward", "backward")


def op_path(op: str, direction: str) -> str:
    return f"ops/{op}/{direction}"
