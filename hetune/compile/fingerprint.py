"""Which weights a bundle was compiled from: the data owner checks it before the first step.

Tensor shapes say only that a bundle fits a model's architecture; a base model and its
-Instruct variant, or a built-in at two seeds, have the same shapes. So compile records
in the manifest ``outsourced_sha256``: SHA-256 over every outsourced linear's float32
weight (its module path, shape, then bytes, in op order), and for a GGUF source also the
file's SHA-256 (``source_sha256``). The data owner recomputes one of them from what it
loaded, without ever holding all the outsourced weights:

- weights it holds (a built-in model, generated from its seed; a model given in full):
  hashed in memory;
- a checkpoint directory or hub id: each outsourced tensor read from the safetensors files
  one at a time, hashed and dropped (bf16/fp16 -> float32 is exact, as in compile);
- a GGUF file: the file's SHA-256 (dequantizing 100M+ weights to hash them would cost
  more than the file hash, and the file is what both sides loaded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from hetune.compile.manifest import Manifest
from hetune.errors import BundleError, ConfigError
from hetune.files import sha256_file
from hetune.models.layers import decoder_layers, member_linear


def _members(manifest_or_ops) -> list[str]:
    ops = manifest_or_ops.ops if isinstance(manifest_or_ops, Manifest) else manifest_or_ops
    return [m.module for op in ops for m in op.members]


def digest_weights(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, weight in named:
        w = weight.detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(w.shape)}\n".encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()


def _module_weight(model: torch.nn.Module, member: str) -> torch.Tensor:
    if member == "lm_head":
        return model.get_output_embeddings().weight
    return member_linear(decoder_layers(model), member).weight


def _held(weight: torch.Tensor) -> bool:
    """False for a meta tensor or the zero-stride placeholder of :func:`hetune.models.client_weights.placeholder_weight`."""
    return not weight.is_meta and (weight.numel() <= 1 or any(s != 0 for s in weight.stride()))


def outsourced_sha256(model: torch.nn.Module, ops) -> str:
    """The fingerprint of a model that holds its outsourced weights (compile's side)."""
    return digest_weights((m, _module_weight(model, m)) for m in _members(ops))


def _streamed(source: str, members: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Outsourced tensors read one at a time from a checkpoint's safetensors files."""
    from safetensors import safe_open

    from hetune.models.client_weights import _checkpoint_dir, _safetensors_files

    files = _safetensors_files(_checkpoint_dir(source))
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {key: h for h in handles for key in h.keys()}
        for member in members:
            key = "lm_head.weight" if member == "lm_head" else f"model.{member}.weight"
            if key not in where:
                raise BundleError(f"{source} has no tensor {key}, which the bundle outsources",
                                  "use the model the bundle was compiled from")
            yield member, where[key].get_tensor(key)


def owner_fingerprint(model: torch.nn.Module, manifest: Manifest, source: str | None) -> tuple[str, str]:
    """("outsourced", sha256) or ("gguf", the file's sha256), from what the data owner loaded (module docstring)."""
    from hetune.models.loading import gguf_path

    members = _members(manifest)
    if all(_held(_module_weight(model, m)) for m in members):
        return "outsourced", outsourced_sha256(model, manifest.ops)
    if source is None:
        raise ConfigError("the model does not hold its outsourced weights, so the bundle cannot be checked against it",
                          "pass model_id (the hub id, directory or .gguf file the model was loaded from)")
    gguf = gguf_path(source)
    if gguf is not None:
        return "gguf", sha256_file(gguf)
    return "outsourced", digest_weights(_streamed(source, members))


def check_bundle_model(manifest: Manifest, model: torch.nn.Module, source: str | None, where: str = "the bundle") -> None:
    """Refuse a bundle compiled from another model: architecture first, then the weights' fingerprint.

    ``where`` names the bundle for the message (its directory, or the worker's URL).
    """
    info = manifest.model
    mine_id = source or getattr(model.config, "_name_or_path", "") or "the local model"
    redo = (f"train with the model {where} was compiled from ({info.id}; a built-in with the --seed it was compiled "
            f"with), or compile a bundle from yours: hetune compile {mine_id} --out DIR")
    for key, value in info.config.items():
        mine = getattr(model.config, key, None)
        if mine is not None and mine != value:
            raise BundleError(f"{where} was compiled from {info.id} with {key}={value}; the local model {mine_id} has {mine}", redo)
    if not info.outsourced_sha256:
        raise BundleError(f"{where} records no fingerprint of its weights (compiled by hetune {manifest.hetune_version})",
                          f"recompile it with this hetune: hetune compile {info.id} --out DIR")
    kind, mine = owner_fingerprint(model, manifest, source)
    theirs = info.source_sha256 if kind == "gguf" else info.outsourced_sha256
    what = "GGUF file sha256" if kind == "gguf" else "outsourced weights sha256"
    if mine != theirs:
        raise BundleError(
            f"{where} was compiled from other weights than the local model's: {info.id} ({what} "
            f"{(theirs or 'not recorded')[:12]}) vs {mine_id} ({what} {mine[:12]})", redo)


def gguf_source_sha256(source: str) -> str:
    """The GGUF file's SHA-256 for a GGUF source (file or built-in), else ""."""
    from hetune.models.loading import gguf_path

    gguf = gguf_path(source) if isinstance(source, str) else None
    return sha256_file(Path(gguf)) if gguf is not None else ""
