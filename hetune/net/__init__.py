"""The data owners' HTTP client (:mod:`hetune.net.client`), shared by the protocols' owners (hybrid LoRA's
worker client, SFPrompt's body client), and :func:`is_loopback`, which servers use too.

Neither side of a protocol: it imports no owner code and no key type (import-linter's contract
in pyproject.toml), so each protocol's client builds on it without importing another protocol.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: the one place plain http and an unauthenticated worker are fine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
