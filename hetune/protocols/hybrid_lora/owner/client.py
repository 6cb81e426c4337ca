"""The data owner's private model: its own non-linear parts, LoRA adapters, and a backend.

``build_private_model`` is the one entry point the training loop, the demo and the
tests use; the backend name picks how the frozen products are computed.
``make_private`` does the last step on a peft model you built yourself, for your own
training loop or ``transformers.Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hetune.compile.manifest import Manifest, OpSpec
from hetune.errors import ConfigError
from hetune.models.families import family_of
from hetune.models.layers import op_groups
from hetune.protocols.hybrid_lora.owner.backends import EncryptedBackend, FrozenBackend, PlainBackend, QuantizedBackend, check_backend_name
from hetune.protocols.hybrid_lora.owner.layer import OutsourcedOp, Replay, attach_backend, checkpoint_layers

if TYPE_CHECKING:
    from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess

@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # linear names, e.g. ("q_proj", "v_proj"); None: all of the family's (lm_head excluded)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r={self.r} must be >= 1", "use a rank such as 8")
        if self.targets is not None and not self.targets:
            raise ConfigError("lora targets are empty", "name at least one linear, or pass None for all of them")


@dataclass
class PrivateModel:
    model: torch.nn.Module  # peft model; outsourced linears hold no weights
    tokenizer: object | None
    backend: FrozenBackend
    ops: dict[str, OutsourcedOp] = field(default_factory=dict)
    manifest: Manifest | None = None  # the bundle's (the worker's); None on plain
    replay: Replay | None = None  # activation checkpointing (``checkpoint=True``)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``input_ids``: transformers' own, or with ``checkpoint=True``
        :func:`chunked_lm_loss` (the same value up to float rounding, without the logits whole)."""
        if self.replay is None:
            return self.model(input_ids=input_ids, labels=input_ids).loss
        return chunked_lm_loss(self.model, input_ids, input_ids)

    def close(self) -> None:
        self.backend.close()


LOSS_CHUNK = 256  # positions per chunk of chunked_lm_loss: 256 x vocab float32 logits at a time


def chunked_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted left, -100 ignored, mean) with the logits never whole.

    At 2,048 tokens and a 128,256-word vocabulary the logits, their log-softmax and their
    gradients are 1 GB each. Here the last hidden states go through the data owner's LM head
    :data:`LOSS_CHUNK` positions at a time, each chunk checkpointed (its logits recomputed in
    backward): a few hundred MB at most. Sums in another order than transformers' mean, so
    the value agrees to float rounding, not bit for bit.
    """
    from torch.nn.functional import cross_entropy, pad
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids).last_hidden_state
    head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    h = hidden.reshape(-1, hidden.shape[-1])
    target = pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)

    def chunk(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = head(hc).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return cross_entropy(logits, tc, ignore_index=-100, reduction="sum")

    total = sum(checkpoint(chunk, h[i : i + LOSS_CHUNK], target[i : i + LOSS_CHUNK], use_reentrant=False)
                for i in range(0, len(target), LOSS_CHUNK))
    return total / (target != -100).sum()


def plain_ops(model: torch.nn.Module, fuse: bool = True) -> tuple[list[OpSpec], dict[str, torch.Tensor]]:
    """Op layout and float weights straight from a model (the ``plain`` reference needs no bundle)."""
    from hetune.compile.compiler import group_weight

    specs, weights = [], {}
    for group in op_groups(model.config, fuse=fuse):
        weight, members = group_weight(model, group)
        specs.append(OpSpec(group.name, group.layer, weight.shape[1], weight.shape[0], members, 0, 0, 0))
        weights[group.name] = weight
    return specs, weights


def wrap_lora(model: torch.nn.Module, lora: LoraSettings, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    allowed = family_of(model.config).lora_targets
    unknown = sorted(set(lora.targets or ()) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown LoRA targets {unknown} for a {model.config.model_type} model", f"choose among {', '.join(allowed)}")
    torch.manual_seed(seed)  # LoRA A init: same adapters on every backend
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets or allowed))
    return get_peft_model(model, cfg)


def _new_keys(transport, scheme: str | None, param_set: str | None, hint_cache: Path | None = None):
    """Fresh keys for the named scheme and set; a name left None takes the bundle's (the worker's rule).

    ``hint_cache``: batched RLWE with fixed masks and a fresh secret per product, hints kept there."""
    from hetune.crypto.keys import fixed_mask_keys, generate_keys

    params = transport.resolve_session(scheme, param_set)
    if hint_cache is None:
        return generate_keys(params.scheme, params.name)
    if params.scheme != "rlwe":
        raise ConfigError(f"fixed masks (a hint cache) are a batched RLWE layout, not {params.scheme}'s",
                          "drop --hint-cache, or use --scheme rlwe")
    return fixed_mask_keys(params.name, hint_cache)


def _check_needs(backend: str, bundle: Path | None, workers: tuple[str, ...]) -> None:
    """What a backend needs, checked before any model is loaded."""
    check_backend_name(backend)
    if backend in ("quantized", "encrypted") and bundle is None:
        raise ConfigError(f"backend '{backend}' needs a bundle", "compile one with: hetune compile MODEL --out DIR")
    if backend == "remote" and not workers:
        raise ConfigError("backend 'remote' needs at least one worker URL", "pass --worker http://HOST:PORT")


def make_private(
    model: torch.nn.Module,
    backend: str,
    *,
    bundle: Path | None = None,
    workers: tuple[str, ...] = (),
    keys=None,
    scheme: str | None = None,
    param_set: str | None = None,
    tokenizer: object | None = None,
    access: WorkerAccess | None = None,
    model_id: str | None = None,
    hint_cache: Path | None = None,
    overlap: bool = False,
    checkpoint: bool = False,
) -> PrivateModel:
    """Make a peft LoRA model private, in place: its frozen linears run on ``backend``.

    The one call for training with your own loop or ``transformers.Trainer``: load a
    supported model (``hetune.models.loading.load_model``), wrap it with peft's
    ``get_peft_model``, call this, then train ``.model`` as usual and ``close()`` at the
    end. The frozen weights are dropped (biases stay with the data owner). ``bundle`` (or the
    worker's) must be compiled from the same base weights: checked before anything runs
    (:mod:`hetune.compile.fingerprint`); ``model_id`` (hub id, directory, .gguf file) is needed for
    that only if ``model`` lacks its outsourced weights (``load_client_model``). ``keys``,
    ``scheme``, ``param_set``, ``access``, ``hint_cache``, ``overlap``, ``checkpoint``: as in
    :func:`build_private_model`.
    """
    from hetune.compile.fingerprint import check_bundle_model

    _check_needs(backend, bundle, workers)
    manifest = None
    if backend == "plain":
        specs, weights = plain_ops(model)
        engine: FrozenBackend = PlainBackend(weights)
    elif backend == "remote":
        from hetune.protocols.hybrid_lora.owner.remote import HttpTransport

        transport = HttpTransport(workers, access)
        manifest = transport.manifest
        specs = list(manifest.ops)
        try:
            check_bundle_model(manifest, model, model_id, f"the bundle of worker {transport.clients[0].url}")
        except BaseException:
            transport.close()
            raise
        transport.verified(manifest.model.outsourced_sha256)
        engine = EncryptedBackend(transport.codecs(), transport, keys=keys or _new_keys(transport, scheme, param_set, hint_cache),
                                 overlap=overlap)
    else:
        from hetune.compile.bundle import load_bundle

        b = load_bundle(bundle)
        manifest = b.manifest
        check_bundle_model(manifest, model, model_id, f"bundle {bundle}")
        specs = list(manifest.ops)
        ops = {s.name: b.op(s.name) for s in specs}
        if backend == "quantized":
            engine = QuantizedBackend(ops)
        else:
            from hetune.protocols.hybrid_lora.owner.local import LocalTransport

            transport = LocalTransport(b)
            engine = EncryptedBackend({k: v.codec for k, v in ops.items()}, transport, keys=keys or _new_keys(transport, scheme, param_set, hint_cache),
                                 overlap=overlap)
    handles = attach_backend(model, specs, engine)
    replay = checkpoint_layers(model, handles) if checkpoint else None
    return PrivateModel(model, tokenizer, engine, handles, manifest, replay)


def build_private_model(
    model_id: str,
    backend: str,
    *,
    bundle: Path | None = None,
    workers: tuple[str, ...] = (),
    lora: LoraSettings = LoraSettings(),
    seed: int = 0,
    keys=None,
    scheme: str | None = None,
    param_set: str | None = None,
    access: WorkerAccess | None = None,
    hint_cache: Path | None = None,
    overlap: bool = False,
    checkpoint: bool = False,
) -> PrivateModel:
    """Load ``model_id`` (without its outsourced weights, except on ``plain``), add LoRA, make it private.

    ``scheme`` and ``param_set`` (encrypted/remote, when ``keys`` is None): what to generate keys for;
    either left None takes the bundle's (the worker's) default. ``access`` (remote): a
    :class:`~hetune.protocols.hybrid_lora.owner.remote.WorkerAccess` (CA to trust, API key); None: the
    system's trust store, no key. ``hint_cache`` (batched RLWE): fixed masks with a fresh secret per
    product, the worker's hints (W times the masks, fetched once) kept in that folder; None: fresh masks
    per request. ``overlap`` (batched RLWE, encrypted/remote): pipeline each product (encrypt while uploading,
    decrypt while the worker computes the rest: :class:`~hetune.protocols.hybrid_lora.owner.backends.EncryptedBackend`).
    ``checkpoint``: activation checkpointing of the decoder layers (in training mode) that keeps the worker's answers
    instead of asking again (:class:`~hetune.protocols.hybrid_lora.owner.layer.Replay`): the owner's activation memory
    falls to each layer's input and answers, for a recomputation of its clear ops in backward."""
    from hetune.models.client_weights import load_client_model
    from hetune.models.loading import load_model

    _check_needs(backend, bundle, workers)
    loaded = load_model(model_id, seed=seed) if backend == "plain" else load_client_model(model_id, seed=seed)
    model = wrap_lora(loaded.model, lora, seed)
    return make_private(model, backend, bundle=bundle, workers=workers, keys=keys, scheme=scheme,
                        param_set=param_set, tokenizer=loaded.tokenizer, access=access, model_id=model_id,
                        hint_cache=hint_cache, overlap=overlap, checkpoint=checkpoint)
