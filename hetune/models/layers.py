"""Which linear layers of a Llama-class model are outsourced, and how they are fused.

Works on a plain causal LM of a supported family (Llama, Mistral, Qwen2, Qwen3: same
linear names) and on a peft-LoRA wrapped one (the frozen
``base_layer`` is what gets outsourced; the LoRA A/B stay with the data owner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per block: groups of linears that share their input, in execution order.
FUSED_GROUPS = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class OpGroup:
    """One outsourced op: one or more linears sharing an input, stacked along outputs."""

    name: str  # e.g. "layers.3.qkv"
    layer: int
    members: tuple[str, ...]  # module paths relative to the decoder, e.g. "layers.3.self_attn.q_proj"


def base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The frozen nn.Linear inside a (possibly peft-wrapped) module."""
    inner = getattr(module, "base_layer", module)
    if not isinstance(inner, torch.nn.Linear):
        raise TypeError(f"expected a Linear, got {type(inner).__name__}")
    return inner


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks, through any peft / CausalLM wrappers."""
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel
        if hasattr(inner, "layers"):
            return inner.layers
        inner = getattr(inner, "model", None)
    raise TypeError("model has no decoder layers; is it a Llama-class causal LM?")


def op_groups(num_layers: int, fuse: bool = True) -> list[OpGroup]:
    groups = []
    for i in range(num_layers):
        for name, members in FUSED_GROUPS:
            paths = tuple(f"layers.{i}.{m}" for m in members)
            if fuse:
                groups.append(OpGroup(f"layers.{i}.{name}", i, paths))
            else:
                for path in paths:
                    short = path.rsplit(".", 1)[1].removesuffix("_proj")
                    groups.append(OpGroup(f"layers.{i}.{short}", i, (path,)))
    return groups


def member_linear(layers: torch.nn.ModuleList, path: str) -> torch.nn.Linear:
    """path 'layers.3.self_attn.q_proj' -> the frozen nn.Linear."""
    _, idx, *rest = path.split(".")
    module = layers[int(idx)]
    for attr in rest:
        module = getattr(module, attr)
    return base_linear(module)
