"""The model cut in three: head (embedding, soft prompts, first blocks), body (the
frozen middle blocks the server runs) and tail (last blocks, final norm, classifier).

One :class:`SplitModel` serves every method: SFPrompt and split-fed run
``tail(remote_body(head(x)))``, the local-loss update runs ``tail(head(x))``, federated
prompt tuning, LoRA and full fine-tuning run the three parts in one process.

Two kinds of output: a classifier ((B, classes) logits: the ViT's CLS head, or a Llama's
verbalizer) or, for the causal-LM tasks, next-token logits (B, L, vocab) at the token
positions through the model's own frozen LM head (tied to the client's embedding in SmolLM2).
"""

from __future__ import annotations

import torch
from torch import nn

from hetune.errors import ConfigError
from hetune.protocols.sfprompt import models


class BlockStack(nn.Module):
    """Consecutive transformer blocks of one family, run on (B, L, D) hidden states.

    Llama blocks get a causal mask and rotary positions 0..L-1 over the whole sequence
    (soft prompts included); ViT blocks attend to everything and take no positions.
    """

    def __init__(self, blocks: list[nn.Module], family: str, rotary: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.family = family
        self.rotary = rotary  # parameter-free (inv_freq buffer), rebuilt from the config anywhere

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        if self.family == "vit":
            for block in self.blocks:
                h = block(h)
            return h
        batch, length, _ = h.shape
        positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
        cos_sin = self.rotary(h, positions)
        mask = torch.full((length, length), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]  # (1, 1, L, L)
        for block in self.blocks:
            h = block(h, attention_mask=mask, position_embeddings=cos_sin)
        return h

    def __len__(self) -> int:
        return len(self.blocks)


def check_cut(model: str, cut: tuple[int, int], blocks: int = 0) -> None:
    """Head and tail block counts must leave at least one block for the body."""
    head, tail = cut
    total = models.depth(model, blocks)
    if head < 0 or tail < 0 or head + tail >= total:
        raise ConfigError(
            f"cut={head}:{tail} does not fit {model}, which has {total} blocks (the body needs at least one)",
            f"pass --cut HEAD:TAIL with HEAD + TAIL <= {total - 1}, e.g. --cut {min(1, max(total - 2, 0))}:1",
        )


def _blocks(backbone, family: str) -> list[nn.Module]:
    return list(backbone.vit.encoder.layer) if family == "vit" else list(backbone.model.layers)


def _rotary(backbone, family: str):
    return backbone.model.rotary_emb if family == "llama" else None


def body_stack(model: str, seed: int, cut: tuple[int, int], dtype=torch.float32, blocks: int = 0) -> BlockStack:
    """What the server holds: the frozen middle blocks, nothing else."""
    check_cut(model, cut, blocks)
    fam = models.family(model)
    backbone = models.build_backbone(model, seed, dtype, blocks)
    blocks = _blocks(backbone, fam)
    body = BlockStack(blocks[cut[0] : len(blocks) - cut[1]], fam, _rotary(backbone, fam))
    body.requires_grad_(False)
    return body


class SplitModel(nn.Module):
    """Head + body + tail of one backbone, with ``n_prompts`` learnable prompt tokens.

    ``label_token_ids`` (Llama only) are the verbalizer: the tail scores the class
    tokens at the last position, so both families return (B, num_classes) logits.
    ``lm``: next-token logits instead, through the backbone's frozen LM head.
    ``lora_rank`` > 0: LoRA adapters (peft) on all seven linears of every block (fl-lora).
    """

    def __init__(self, model: str, seed: int, cut: tuple[int, int], n_prompts: int,
                 label_token_ids: tuple[int, ...] = (), dtype=torch.float32, *, lm: bool = False,
                 blocks: int = 0, lora_rank: int = 0):
        super().__init__()
        check_cut(model, cut, blocks)
        self.family = models.family(model)
        self.lm, self.n_prompts = lm, n_prompts
        backbone = models.build_backbone(model, seed, dtype, blocks)
        blocks, rotary = _blocks(backbone, self.family), _rotary(backbone, self.family)
        n = len(blocks)
        self.head = BlockStack(blocks[: cut[0]], self.family, rotary)
        self.body = BlockStack(blocks[cut[0] : n - cut[1]], self.family, rotary)
        self.tail = BlockStack(blocks[n - cut[1] :], self.family, rotary)
        hidden = backbone.config.hidden_size
        if self.family == "vit":
            self.embeddings, self.norm, self.classifier = backbone.vit.embeddings, backbone.vit.layernorm, backbone.classifier
        elif lm:
            self.embeddings, self.norm = backbone.model.embed_tokens, backbone.model.norm
            self.lm_head = backbone.lm_head  # frozen; the same tensor as the embedding when tied
        else:
            if not label_token_ids:
                raise ConfigError("a Llama tail needs label_token_ids (the class tokens it scores)", "pass the task's label tokens")
            self.embeddings, self.norm = backbone.model.embed_tokens, backbone.model.norm
            # Untied: the tail's lm_head is the client's own copy, trained without touching the head's embedding.
            self.classifier = nn.Linear(hidden, backbone.config.vocab_size, bias=False, dtype=dtype)
            self.classifier.weight.data.copy_(backbone.lm_head.weight.data)
        self.register_buffer("label_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)
        generator = torch.Generator().manual_seed(seed + 1)
        self.prompts = nn.Parameter(0.02 * torch.randn(n_prompts, hidden, generator=generator, dtype=dtype)) if n_prompts else None
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            torch.manual_seed(seed)  # lora_A's init: identical in every process
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets), self)

    # ---- the three parts ----
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """ViT: [CLS, prompts, patches] after position embeddings (VPT-shallow); Llama: [prompts, tokens]."""
        e = self.embeddings(x)  # (B, L0, D)
        if self.prompts is None:
            return e
        p = self.prompts.unsqueeze(0).expand(e.shape[0], -1, -1)  # (B, P, D)
        return torch.cat([e[:, :1], p, e[:, 1:]], dim=1) if self.family == "vit" else torch.cat([p, e], dim=1)

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, L, D), L = L0 + P

    def tail_forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.tail(h))
        if self.lm:
            return self.lm_head(h[:, self.n_prompts :])  # (B, L0, vocab) at the token positions
        if self.family == "vit":
            return self.classifier(h[:, 0])  # (B, classes) from CLS
        return nn.functional.linear(h[:, -1], self.classifier.weight[self.label_ids])  # (B, classes) from the last token

    def forward(self, x: torch.Tensor, body=None) -> torch.Tensor:
        """``body``: a callable standing in for the local body (the remote one in split training)."""
        return self.tail_forward((body or self.body)(self.head_forward(x)))

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The local-loss path: head straight into tail, the tail acting as the auxiliary head."""
        return self.tail_forward(self.head_forward(x))

    # ---- what is trained and exchanged ----
    def set_trainable(self, trained: str) -> list[nn.Parameter]:
        """"full": every weight (FL); "lora": the adapters; "prompt": prompts + tail + final norm + classifier
        (never the LM head of an LM task: it is the client's frozen embedding)."""
        for name, param in self.named_parameters():
            param.requires_grad_(self._is_trained(name, trained))
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, trained: str, learning_rates: dict[str, float]) -> list[dict]:
        """AdamW groups for :meth:`set_trainable`'s parameters: the soft prompts apart from the pretrained rest."""
        params = self.set_trainable(trained)
        if "prompts" not in learning_rates:
            return [{"params": params, "lr": learning_rates["rest"]}]
        rest = [p for p in params if p is not self.prompts]
        return [{"params": [self.prompts], "lr": learning_rates["prompts"]}, {"params": rest, "lr": learning_rates["rest"]}]

    @staticmethod
    def _is_trained(name: str, trained: str) -> bool:
        if trained == "full":
            return "lora_" not in name
        if trained == "lora":
            return "lora_" in name
        return name == "prompts" or (name.startswith(("tail.", "norm.", "classifier.")) and "lora_" not in name)

    def shared_state(self, trained: str) -> dict[str, torch.Tensor]:
        """What FedAvg averages, by name (see set_trainable)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if self._is_trained(n, trained)}

    def load_shared(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def drop_body(self) -> None:
        """Client side of the split methods: the body's weights are the server's, not held here."""
        self.body = None


def split_for(cfg, task, dtype=torch.float32) -> SplitModel:
    """The SplitModel of an SfpromptConfig and its task (LoRA adapters for fl-lora only)."""
    return SplitModel(cfg.model, cfg.seed, cfg.cut, cfg.n_prompts, task.label_token_ids, dtype, lm=task.lm,
                      blocks=cfg.blocks, lora_rank=cfg.lora_rank if cfg.trained == "lora" else 0)
