"""The data owner's private model: its own non-linear parts, LoRA adapters, and a backend.

``build_private_model`` is the one entry point the training loop, the demo and the
tests use; the backend name picks how the frozen products are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetune.compile.manifest import OpSpec
from hetune.errors import ConfigError
from hetune.models.layers import decoder_layers, op_groups
from hetune.protocols.hybrid_lora.backends import FrozenBackend, GlweBackend, PlainBackend, QuantizedBackend, check_backend_name
from hetune.protocols.hybrid_lora.layer import OutsourcedOp, attach_backend

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS  # all-linear, lm_head excluded

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r={self.r} must be >= 1", "use a rank such as 8")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ConfigError(f"unknown LoRA targets {sorted(unknown)}", f"choose among {', '.join(LORA_TARGETS)}")


@dataclass
class PrivateModel:
    model: torch.nn.Module  # peft model; outsourced linears hold no weights
    tokenizer: object
    backend: FrozenBackend
    ops: dict[str, OutsourcedOp] = field(default_factory=dict)

    def close(self) -> None:
        self.backend.close()


def plain_ops(model: torch.nn.Module, fuse: bool = True) -> tuple[list[OpSpec], dict[str, torch.Tensor]]:
    """Op layout and float weights straight from a model (the ``plain`` reference needs no bundle)."""
    from hetune.compile.compiler import group_weight

    specs, weights = [], {}
    for group in op_groups(len(decoder_layers(model)), fuse=fuse):
        weight, members = group_weight(model, group)
        specs.append(OpSpec(group.name, group.layer, weight.shape[1], weight.shape[0], members, 0, 0, 0))
        weights[group.name] = weight
    return specs, weights


def _wrap_lora(model: torch.nn.Module, lora: LoraSettings, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A init: same adapters on every backend
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets))
    return get_peft_model(model, cfg)


def build_private_model(
    model_id: str,
    backend: str,
    *,
    bundle: Path | None = None,
    workers: tuple[str, ...] = (),
    lora: LoraSettings = LoraSettings(),
    seed: int = 0,
    keys=None,
    param_set: str | None = None,
) -> PrivateModel:
    """``param_set`` (encrypted/remote): the allow-listed GLWE parameters to generate keys for, when ``keys`` is None."""
    from hetune.models.client_weights import load_client_model
    from hetune.models.loading import load_model

    check_backend_name(backend)
    if keys is None and param_set is not None and backend in ("encrypted", "remote"):
        from hetune.crypto.glwe import GlweKeys

        keys = GlweKeys.generate(param_set=param_set)
    if backend == "plain":
        loaded = load_model(model_id, seed=seed)
        specs, weights = plain_ops(loaded.model)
        engine: FrozenBackend = PlainBackend(weights)
    elif backend == "remote":
        from hetune.protocols.hybrid_lora.remote import HttpTransport

        if not workers:
            raise ConfigError("backend 'remote' needs at least one worker URL", "pass --worker http://HOST:PORT")
        transport = HttpTransport(workers)
        specs = transport.manifest.ops
        loaded = load_client_model(model_id, [m.module for s in specs for m in s.members], seed=seed)
        transport.check_model(loaded.model)
        engine = GlweBackend(transport.codecs(), transport, keys=keys)
    else:
        if bundle is None:
            raise ConfigError(f"backend '{backend}' needs a bundle", "compile one with: hetune compile MODEL --out DIR")
        from hetune.compile.bundle import load_bundle

        b = load_bundle(bundle)
        specs = list(b.manifest.ops)
        loaded = load_client_model(model_id, [m.module for s in specs for m in s.members], seed=seed)
        ops = {s.name: b.op(s.name) for s in specs}
        if backend == "quantized":
            engine = QuantizedBackend(ops)
        else:
            from hetune.protocols.hybrid_lora.transport import LocalTransport

            engine = GlweBackend({k: v.codec for k, v in ops.items()}, LocalTransport(b), keys=keys)
    model = _wrap_lora(loaded.model, lora, seed)
    handles = attach_backend(model, specs, engine)
    return PrivateModel(model, loaded.tokenizer, engine, handles)
