"""What client and worker agree on over HTTP: API version, directions, paths.

Body formats and sizes belong to each encryption scheme (:mod:`hetune.crypto.scheme`).
Kept free of torch-heavy and HTTP imports so both sides can use it.
"""

from __future__ import annotations

import ipaddress

API_VERSION = "v2"  # v2: sessions name a scheme; bodies are the scheme's
DIRECTIONS = ("forward", "backward")


def op_path(op: str, direction: str) -> str:
    return f"ops/{op}/{direction}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: the one place plain http and an unauthenticated worker are fine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
