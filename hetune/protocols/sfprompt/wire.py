"""What clients and the body server exchange: tensors as safetensors bytes.

A safetensors blob carries dtype and shape in a small JSON header and refuses a
truncated or altered payload, so the server can reject a bad request with a 4xx
before any compute. Every byte counted in the metrics is ``len()`` of these blobs.
"""

from __future__ import annotations

import torch

API_VERSION = "v1"  # SFPrompt's own: the body server's paths are /v1/sessions/...
MEDIA_TYPE = "application/octet-stream"


class WireFormatError(ValueError):
    """The bytes are not one well-formed tensor under the expected name."""


def pack(name: str, tensor: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().contiguous()})


def unpack(name: str, payload: bytes) -> torch.Tensor:
    from safetensors.torch import load

    try:
        tensors = load(payload)
    except Exception as err:  # safetensors raises its own error types on any malformed header
        raise WireFormatError(f"not a safetensors payload ({type(err).__name__})") from err
    if set(tensors) != {name}:
        raise WireFormatError(f"expected exactly one tensor named {name!r}, got {sorted(tensors)}")
    return tensors[name]
