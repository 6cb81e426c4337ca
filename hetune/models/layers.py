"""Which linear layers of a decoder-only model are outsourced, and how they are fused.

The layout comes from the model's :class:`~hetune.models.families.Family` record. Works on
a plain causal LM and on a peft-LoRA wrapped one (the frozen ``base_layer`` is what gets
outsourced; the LoRA A/B stay with the data owner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetune.models.families import family_of, short_name


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
    raise TypeError("model has no decoder layers; is it a decoder-only causal LM?")


def op_groups(config, fuse: bool = True) -> list[OpGroup]:
    """Every block's ops, in execution order, for a model of ``config``'s family."""
    family = family_of(config)
    groups = []
    for i in range(config.num_hidden_layers):
        for name, members in family.groups:
            paths = tuple(f"layers.{i}.{m}" for m in members)
            if fuse:
                groups.append(OpGroup(f"layers.{i}.{name}", i, paths))
            else:
                groups += [OpGroup(f"layers.{i}.{short_name(m)}", i, (p,)) for m, p in zip(members, paths)]
    return groups


def member_linear(layers: torch.nn.ModuleList, path: str) -> torch.nn.Linear:
    """path 'layers.3.self_attn.q_proj' -> the frozen nn.Linear."""
    _, idx, *rest = path.split(".")
    module = layers[int(idx)]
    for attr in rest:
        module = getattr(module, attr)
    return base_linear(module)
