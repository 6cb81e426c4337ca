"""Compile a decoder-only model into a worker bundle.

For every outsourced op (its family's, :mod:`hetune.models.families`: q/k/v, o, gate/up, down
of each block; lm_head optional):
Brevitas quantizes the weight per output channel (after rotating its input dimension
when the QuantConfig asks for it, :mod:`hetune.quant.rotation`), the accumulator worst case is
checked against the encryption scheme's result budget (and, for the batched RLWE
scheme, the weight norms against its noise budget), and the integer weight is stored
as the worker's product consumes it. A calibration
pass on real text measures each op's forward and backward error versus float.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import hetune
from hetune.compile.fingerprint import gguf_source_sha256, outsourced_sha256
from hetune.compile.manifest import CryptoSpec, Manifest, MemberSpec, ModelInfo, OpSpec
from hetune.errors import OverflowRiskError
from hetune.models.layers import OpGroup, decoder_layers, member_linear, op_groups
from hetune.models.loading import LoadedModel, load_model
from hetune.quant.budget import accumulator_bound
from hetune.quant.config import QuantConfig
from hetune.quant.integer import IntegerLinear
from hetune.quant.rotation import input_rotation
from hetune.quant.weights import quantize_weight

CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
)


@dataclass(frozen=True)
class CompileConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    fuse: bool = True  # one op for q/k/v and one for gate/up (shared input, summed backward)
    include_lm_head: bool = False  # lm_head stays with the client by default
    calibration_tokens: int = 128  # real text pushed through the model to measure error
    seed: int = 0
    scheme: str | None = None  # encryption scheme sessions use by default (None: batched RLWE)
    param_set: str | None = None  # its parameter set (None: the scheme's default)


@dataclass
class CompiledModel:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    report: dict


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the base model's weights (LoRA adapters excluded), independent of wrappers."""
    digest = hashlib.sha256()
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        digest.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def group_weight(model: torch.nn.Module, group: OpGroup) -> tuple[torch.Tensor, tuple[MemberSpec, ...]]:
    """The op's frozen weight, members' rows stacked. Biases (Qwen2's q/k/v) are left out:
    the worker's product stays bias-free and the data owner adds them (OutsourcedLinear)."""
    if group.name == "lm_head":
        weight = model.get_output_embeddings().weight
        return weight.detach(), (MemberSpec("lm_head", 0, weight.shape[0]),)
    layers = decoder_layers(model)
    weights, members, offset = [], [], 0
    for path in group.members:
        lin = member_linear(layers, path)
        weights.append(lin.weight.detach())
        members.append(MemberSpec(path, offset, lin.out_features))
        offset += lin.out_features
    return torch.cat(weights, dim=0), tuple(members)  # (sum out, in): fused rows stacked


def _capture_inputs(model: torch.nn.Module, groups: list[OpGroup], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of each op on a calibration batch (the first member's input = the shared input)."""
    captured, hooks = {}, []
    layers = decoder_layers(model)
    for group in groups:
        module = model.get_output_embeddings() if group.name == "lm_head" else member_linear(layers, group.members[0])

        def hook(_mod, args, _name=group.name):
            captured[_name] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _capture_grads(model: torch.nn.Module, groups: list[OpGroup], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output gradients of each op under the LM loss on the calibration text (members concatenated).

    Gradients flow through activations only (inputs_embeds requires grad, weights do not),
    so no parameter gradient is ever allocated.
    """
    layers = decoder_layers(model)
    per_member, hooks = {}, []
    for group in groups:
        for path in group.members:
            module = model.get_output_embeddings() if group.name == "lm_head" else member_linear(layers, path)

            def hook(_mod, _gin, gout, _path=path):
                per_member[_path] = gout[0].detach().reshape(-1, gout[0].shape[-1]).to(torch.float64)

            hooks.append(module.register_full_backward_hook(hook))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=input_ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {g.name: torch.cat([per_member[m] for m in g.members], dim=1) for g in groups}


def _static_ranges(x: torch.Tensor, g_scaled: torch.Tensor, bits_a: int, bits_g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed input (scale, zero point) and gradient scale for the static ablation, from calibration data."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / (2**bits_a - 1) or 1.0
    gscale = float(g_scaled.abs().max()) / (2 ** (bits_g - 1) - 1) or 1.0
    return torch.tensor([scale, round(-lo / scale)], dtype=torch.float64), torch.tensor([gscale], dtype=torch.float64)


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp(min=1e-30))


def calibration_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    from hetune.data.corpus import stdlib_text

    ids = tokenizer(stdlib_text(max_chars=n_tokens * 8), return_tensors="pt")["input_ids"][:, :n_tokens]
    return ids


def compile_model(loaded: LoadedModel, cfg: CompileConfig = CompileConfig(), progress: bool = True) -> CompiledModel:
    from tqdm.auto import tqdm

    from hetune.crypto.registry import get_scheme, resolve_params

    model, qcfg = loaded.model, cfg.quant
    params = resolve_params(cfg.scheme, cfg.param_set)
    config = model.config
    groups = op_groups(config, fuse=cfg.fuse)
    if cfg.include_lm_head:
        groups.append(OpGroup("lm_head", -1, ("lm_head",)))

    ids = calibration_ids(loaded.tokenizer, cfg.calibration_tokens)
    inputs, grads = _capture_inputs(model, groups, ids), _capture_grads(model, groups, ids)
    ops, tensors, rows, risky = [], {}, [], []
    for group in tqdm(groups, desc="compile", unit="op", disable=not progress):
        weight, members = group_weight(model, group)
        rotation = input_rotation(qcfg, weight.shape[1])
        stored = weight.to(torch.float64) if rotation is None else rotation.apply(weight)  # W or W R: what W_q quantizes
        qw = quantize_weight(stored, qcfg.bits_w, per_channel=qcfg.ranges == "dynamic")
        bound = accumulator_bound(qw.q, qcfg.bits_w, qcfg.bits_a, qcfg.bits_g,
                                  fit_budget=None if qcfg.accept_overflow_risk else params.budget_bits)
        bits_a, bits_g = bound.bits_a, bound.bits_g
        spec = OpSpec(
            name=group.name, layer=group.layer, in_features=weight.shape[1], out_features=weight.shape[0],
            members=members, forward_acc_bits=bound.forward_bits, backward_acc_bits=bound.backward_bits,
            generic_acc_bits=bound.generic_bits, forward_l2=bound.forward_l2, backward_l2=bound.backward_l2,
            bits_a=bits_a, bits_g=bits_g,
            wire_bytes=get_scheme(params.scheme).wire_bytes(params, bound.forward_l2, bound.backward_l2),
        )
        why = params.check_op(spec.forward_l2, spec.backward_l2, spec.worst_acc_bits)
        if why:
            risky.append((spec, why))
        tensors[spec.weight_key], tensors[spec.scale_key] = qw.q, qw.scale
        w64, x, g = weight.to(torch.float64), inputs[group.name], grads[group.name]
        if qcfg.ranges == "static":
            tensors.update(zip(spec.static_keys, _static_ranges(x, g * qw.scale.to(torch.float64), bits_a, bits_g)))
        op = IntegerLinear(qw.q, spec.codec(tensors, qcfg))
        rows.append({
            "op": spec.name, "in": spec.in_features, "out": spec.out_features, "bits_a": bits_a, "bits_g": bits_g,
            "weight_rel_err": _rel_err(qw.dequantize().to(torch.float64), stored),  # R orthogonal: same as vs W
            "forward_rel_err": _rel_err(op.forward(x), x @ w64.T),
            "backward_rel_err": _rel_err(op.backward(g), g @ w64),
            "forward_acc_bits": bound.forward_bits, "backward_acc_bits": bound.backward_bits,
            "generic_acc_bits": bound.generic_bits, "forward_l2": bound.forward_l2, "backward_l2": bound.backward_l2,
        })
        ops.append(spec)

    if risky and not qcfg.accept_overflow_risk:
        worst, why = max(risky, key=lambda r: r[0].worst_acc_bits)
        raise OverflowRiskError(
            f"{len(risky)} op(s) cannot decrypt exactly under {params.scheme}/{params.name} "
            f"(w{qcfg.bits_w}/a{qcfg.bits_a}/g{qcfg.bits_g}); first: {worst.name} {why}",
            "lower --bits-w/--bits-a/--bits-g, or pass --accept-overflow-risk if typical values stay far below the worst case",
        )

    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    info = ModelInfo(
        id=loaded.model_id, model_type=config.model_type, weights_sha256=weights_sha256(model), total_params=total,
        config={k: getattr(config, k) for k in CONFIG_FIELDS if getattr(config, k, None) is not None},
        outsourced_sha256=outsourced_sha256(model, ops), source_sha256=gguf_source_sha256(loaded.model_id),
    )
    manifest = Manifest(hetune_version=hetune.__version__, model=info, quant=qcfg,
                        crypto=CryptoSpec(params.scheme, params.name), fused=cfg.fuse, ops=tuple(ops))
    report = {
        "scheme": params.scheme, "param_set": params.name, "budget_bits": params.budget_bits, "quant": asdict(qcfg),
        "calibration_tokens": cfg.calibration_tokens,
        "calibration_text": "Python standard library sources", "backward_gradients": "LM-loss output gradients on the calibration text",
        "ops": rows, "overflow_risk_ops": [s.name for s, _ in risky],
    }
    return CompiledModel(manifest, tensors, report)


def compile_bundle(model: LoadedModel | str, out: Path, cfg: CompileConfig = CompileConfig(), *,
                   overwrite: bool = False, progress: bool = True) -> CompiledModel:
    """Compile ``model`` (loaded, or a name for :func:`load_model` with ``cfg.seed``) and write its bundle to ``out``.

    The one compile-and-write: ``out`` is checked before the model is loaded or compiled (minutes on a
    real model), and the bundle is written atomically (:func:`~hetune.compile.bundle.write_bundle`).
    Returns the compiled model with the written manifest (file hashes filled in)."""
    from hetune.compile.bundle import check_output_dir, write_bundle

    out = Path(out)
    check_output_dir(out, overwrite)
    loaded = load_model(model, seed=cfg.seed) if isinstance(model, str) else model
    compiled = compile_model(loaded, cfg, progress)
    manifest = write_bundle(out, compiled.manifest, compiled.tensors, compiled.report, overwrite=overwrite)
    return CompiledModel(manifest, compiled.tensors, compiled.report)
