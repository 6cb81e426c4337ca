"""Client compute and communication, analytically, for any backbone config (no weights).

FLOPs count matrix products only (2 per multiply-add): the linears of every block, the
attention score and value products, the ViT patch embedding and the classifier, or an
LM's output projection over the vocabulary at every token position; norms, softmax and
activations are left out (a few percent, the same for every method). LoRA's own rank-r
products are left out too (under 2% of a block at r = 8 on SmolLM2).
Backward costs: a linear with trained weights 2x its forward (input and weight
gradients), a frozen linear that gradients must cross 1x, an attention product 2x
(both operands are activations); nothing upstream of the first trained tensor. An LM's
output projection is the client's frozen embedding except under fl-full.
Parameter counts come from the real module built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetune.protocols.sfprompt import models

FLOAT_BYTES = 4  # float32 on the wire


@dataclass(frozen=True)
class Costs:
    """Per-sample forward FLOPs of each part, split into linear and attention products."""

    embed: float
    head_linear: float
    head_attn: float
    body_linear: float
    body_attn: float
    tail_linear: float  # tail blocks + classifier
    tail_attn: float
    positions: int  # sequence length at the cut, prompts included
    hidden: int
    out_head: float = 0.0  # an LM's vocabulary projection at the token positions (frozen but in fl-full)


def _block_costs(cfg, fam: str, length: int) -> tuple[float, float]:
    d, m = cfg.hidden_size, cfg.intermediate_size
    if fam == "vit":
        return 2 * length * (4 * d * d + 2 * d * m), 4 * length * length * d
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    dq, dkv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    return 2 * length * (d * dq + 2 * d * dkv + dq * d + 3 * d * m), 4 * length * length * dq


def costs(model: str, cut: tuple[int, int], n_prompts: int, seq_len: int = 0, num_classes: int = 0,
          blocks: int = 0, lm: bool = False) -> Costs:
    """seq_len: Llama tokens per sample (ViT: from the image size); num_classes: classifier rows;
    lm: next-token logits over the vocabulary at all seq_len positions instead of a classifier."""
    cfg, fam = models.model_config(model, blocks), models.family(model)
    d = cfg.hidden_size
    if fam == "vit":
        patches = (cfg.image_size // cfg.patch_size) ** 2
        length = patches + 1 + n_prompts
        embed = 2 * patches * cfg.num_channels * cfg.patch_size**2 * d
        classes = num_classes or cfg.num_labels
    else:
        length, embed, classes = seq_len + n_prompts, 0.0, num_classes
    lin, attn = _block_costs(cfg, fam, length)
    head, tail = cut
    body = cfg.num_hidden_layers - head - tail
    if lm:
        return Costs(embed, head * lin, head * attn, body * lin, body * attn, tail * lin, tail * attn, length, d,
                     out_head=2 * seq_len * d * cfg.vocab_size)
    return Costs(embed, head * lin, head * attn, body * lin, body * attn, tail * lin + 2 * d * classes, tail * attn, length, d)


def sample_flops(c: Costs, method: str) -> dict[str, float]:
    """Client FLOPs for one sample through each stage of ``method``."""
    head_fwd = c.embed + c.head_linear + c.head_attn
    tail_fwd = c.tail_linear + c.tail_attn + c.out_head
    tail_bwd = 2 * c.tail_linear + 2 * c.tail_attn + c.out_head  # trained; the LM head crossed
    if method == "fl-full":
        fwd = head_fwd + c.body_linear + c.body_attn + tail_fwd
        # everything trained; the patch embedding needs its weight gradient only
        return {"train": fwd + c.embed + 2 * (c.head_linear + c.head_attn + c.body_linear + c.body_attn) + tail_bwd + c.out_head}
    if method == "fl-lora":
        fwd = head_fwd + c.body_linear + c.body_attn + tail_fwd
        linear, attn = c.head_linear + c.body_linear + c.tail_linear, c.head_attn + c.body_attn + c.tail_attn
        return {"train": fwd + linear + 2 * attn + c.out_head}  # every linear frozen and crossed; adapters left out
    head_bwd = c.head_linear + 2 * c.head_attn  # frozen, crossed on the way to the prompts
    split_step = head_fwd + head_bwd + tail_fwd + tail_bwd  # the body is the server's
    if method == "fed-prompt":
        body = c.body_linear + c.body_attn + c.body_linear + 2 * c.body_attn  # forward + crossing backward, locally
        return {"train": split_step + body}
    return {"local_loss": split_step, "el2n": head_fwd + tail_fwd, "split": split_step}


def round_flops(c: Costs, method: str, n: int, epochs: int, local_epochs: int, kept: int) -> float:
    """One client's FLOPs in one round: n local samples, ``kept`` after pruning."""
    s = sample_flops(c, method)
    if method in ("fl-full", "fl-lora", "fed-prompt"):
        return s["train"] * n * epochs
    if method == "split-fed":
        return s["split"] * n * epochs
    return s["local_loss"] * n * local_epochs + s["el2n"] * n + s["split"] * kept * epochs


def param_counts(model: str, cut: tuple[int, int], n_prompts: int, blocks: int = 0, lm: bool = False,
                 lora_rank: int = 8) -> dict[str, int]:
    """Exact parameter counts from the module built on the meta device (no memory, no weights)."""
    import torch

    from hetune.protocols.sfprompt.split import SplitModel

    labels = (0,) if models.family(model) == "llama" and not lm else ()
    with torch.device("meta"):
        split = SplitModel(model, 0, cut, 0, labels, lm=lm, blocks=blocks)
        lora = SplitModel(model, 0, cut, 0, labels, lm=lm, blocks=blocks, lora_rank=lora_rank) if models.family(model) == "llama" else None
    prompts = n_prompts * models.model_config(model, blocks).hidden_size
    shared = sum(p.numel() for p in split.shared_state("prompt").values())
    return {"total": sum(p.numel() for p in split.parameters()), "prompts_and_tail": shared + prompts,
            "lora": sum(p.numel() for p in lora.shared_state("lora").values()) if lora else 0}


def round_bytes(model: str, cut: tuple[int, int], n_prompts: int, method: str, n: int, epochs: int, kept: int,
                seq_len: int = 0, blocks: int = 0, lm: bool = False) -> float:
    """One client's bytes in one round (payloads only, no headers): parameters down and up,
    and for the split methods four tensors of (positions x hidden) per sample per epoch."""
    params = param_counts(model, cut, 0 if method in ("fl-full", "fl-lora") else n_prompts, blocks, lm)
    exchanged = {"fl-full": params["total"], "fl-lora": params["lora"]}.get(method, params["prompts_and_tail"])
    total = 2 * exchanged * FLOAT_BYTES
    if method in ("sfprompt", "split-fed"):
        c = costs(model, cut, n_prompts, seq_len, blocks=blocks, lm=lm)
        samples = kept if method == "sfprompt" else n
        total += 4 * samples * epochs * c.positions * c.hidden * FLOAT_BYTES
    return total
