"""Backbones SFPrompt runs on: a tiny ViT for 8x8 digits, the built-in Llamas, and the
real ViT-B/16 and ViT-L/16 shapes (accounting only: no weights are ever built for them).
"""

from __future__ import annotations

from hetune.errors import ConfigError
from hetune.models.builtin import BUILTIN_CONFIGS as LLAMA_CONFIGS

# hidden, depth, heads, mlp, image, patch, channels, classes: plain ViTConfig fields.
VIT_CONFIGS: dict[str, dict] = {
    # scikit-learn's digits: 8x8 grey images, 2x2 patches -> 16 patches + CLS.
    "tiny-vit": dict(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        image_size=8, patch_size=2, num_channels=1, num_labels=10,
    ),
    # The paper's backbones (Dosovitskiy et al.): 224 px, 16 px patches -> 196 + CLS.
    "vit-b16": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=224, patch_size=16, num_channels=3, num_labels=100,
    ),
    "vit-l16": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        image_size=224, patch_size=16, num_channels=3, num_labels=100,
    ),
}
TRAINABLE_MODELS = ("tiny-vit", "micro-llama", "tiny-llama")  # small enough to run here


def family(name: str) -> str:
    """'vit' or 'llama'; a clear error for anything else."""
    if name in VIT_CONFIGS:
        return "vit"
    if name in LLAMA_CONFIGS:
        return "llama"
    raise ConfigError(
        f"model={name!r} is not a built-in SFPrompt backbone",
        f"use one of {', '.join(TRAINABLE_MODELS)} (ViT-B/16 and ViT-L/16 are for accounting only: vit-b16, vit-l16)",
    )


def model_config(name: str):
    """The Hugging Face config, eager attention (same arithmetic in every process)."""
    if family(name) == "vit":
        from transformers import ViTConfig

        return ViTConfig(**VIT_CONFIGS[name], attn_implementation="eager")
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_CONFIGS[name], attn_implementation="eager")


def depth(name: str) -> int:
    return model_config(name).num_hidden_layers


def build_backbone(name: str, seed: int, dtype=None):
    """The whole model with seeded random weights: every process builds identical ones."""
    import torch

    cfg = model_config(name)
    torch.manual_seed(seed)
    if family(name) == "vit":
        from transformers import ViTForImageClassification

        model = ViTForImageClassification(cfg)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(cfg)
    model = model.to(dtype or torch.float32)
    model.eval()
    return model
