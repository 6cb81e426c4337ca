"""Backbones SFPrompt runs on: the real pretrained SmolLM2-135M, a tiny ViT for 8x8 digits,
the built-in random Llamas, and the real ViT-B/16 and ViT-L/16 shapes (accounting only: no
weights are ever built for them).

``blocks`` > 0 keeps only a backbone's first blocks (a truncated SmolLM2 for fast tests).
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
PRETRAINED = ("smollm2-135m",)  # real weights, loaded with hetune.models.loading (cached conversion)
TRAINABLE_MODELS = ("smollm2-135m", "tiny-vit", "micro-llama", "tiny-llama")  # small enough to run here


def family(name: str) -> str:
    """'vit' or 'llama'; a clear error for anything else."""
    if name in VIT_CONFIGS:
        return "vit"
    if name in LLAMA_CONFIGS or name in PRETRAINED:
        return "llama"
    raise ConfigError(
        f"model={name!r} is not a built-in SFPrompt backbone",
        f"use one of {', '.join(TRAINABLE_MODELS)} (ViT-B/16 and ViT-L/16 are for accounting only: vit-b16, vit-l16)",
    )


def model_config(name: str, blocks: int = 0):
    """The Hugging Face config; the random backbones use eager attention (same arithmetic in every process)."""
    if family(name) == "vit":
        from transformers import ViTConfig

        cfg = ViTConfig(**VIT_CONFIGS[name], attn_implementation="eager")
    elif name in PRETRAINED:
        from hetune.models.loading import load_config

        cfg = load_config(name)
    else:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**LLAMA_CONFIGS[name], attn_implementation="eager")
    if blocks:
        if blocks > cfg.num_hidden_layers:
            raise ConfigError(f"blocks={blocks} exceeds the {cfg.num_hidden_layers} blocks of {name}",
                              f"pass --blocks 0 (all) or at most {cfg.num_hidden_layers}")
        cfg.num_hidden_layers = blocks
    return cfg


def depth(name: str, blocks: int = 0) -> int:
    return model_config(name, blocks).num_hidden_layers


def tokenizer(name: str):
    """The Llamas' tokenizer: SmolLM2's own, or the built-in byte tokenizer."""
    if name in PRETRAINED:
        from transformers import AutoTokenizer

        from hetune.models.loading import local_source

        return AutoTokenizer.from_pretrained(local_source(name))  # the converted directory: no weights read
    from hetune.models.builtin import byte_tokenizer

    return byte_tokenizer()


def build_backbone(name: str, seed: int, dtype=None, blocks: int = 0):
    """The whole model: SmolLM2's pretrained weights, or seeded random weights that every process
    builds identically. On the meta device (parameter counts) nothing is loaded."""
    import torch

    cfg = model_config(name, blocks)
    torch.manual_seed(seed)
    if family(name) == "vit":
        from transformers import ViTForImageClassification

        model = ViTForImageClassification(cfg)
    elif name in PRETRAINED and torch.empty(0).device.type != "meta":
        from hetune.models.loading import load_model

        model = load_model(name).model
        model.model.layers = model.model.layers[: cfg.num_hidden_layers]
        model.config.num_hidden_layers = cfg.num_hidden_layers
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(cfg)
    model = model.to(dtype or torch.float32)
    model.requires_grad_(True)
    model.eval()
    return model
