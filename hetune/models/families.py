"""Model families as records: what hetune must know about an architecture, in one place.

The worker multiplies by the frozen linears of each decoder block; everything else
runs on the data owner's side in the family's own transformers code: embeddings (and
Gemma's sqrt(hidden) scale), every norm (Qwen3's and Gemma 3's per-head q/k norms
included), biases (Qwen2's q/k/v: added to the worker's bias-free product), rotary
positions, attention, activations and lm_head. A :class:`Family` names the block's
linears, how they fuse into ops (linears that share an input are one product), the
LoRA targets, and the conventions a checkpoint reader must respect. Loading, compile,
the data owner's client and PrivTuner's costs read it from :data:`FAMILIES`; adding a
family is one record here plus its tiny model in ``tests/test_families.py`` (the
checklist is in docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from hetune.errors import ModelLoadError

# (in, out) of each linear a family may have, in named dimensions of the config (see _dims).
LINEAR_DIMS = {
    "q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"), "o_proj": ("q", "hidden"),
    "qkv_proj": ("hidden", "qkv"),  # Phi-3: q, k and v rows in one checkpoint tensor
    "gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden"),
    "gate_up_proj": ("hidden", "inter2"),  # Phi-3: gate and up rows in one checkpoint tensor
}

_SEPARATE = (  # Llama's layout: q/k/v share the block's normed input, gate/up the MLP's
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Family:
    """One architecture, as hetune splits it between the worker and the data owner."""

    name: str
    model_types: tuple[str, ...]  # transformers' config.model_type values it covers
    groups: tuple[tuple[str, tuple[str, ...]], ...] = _SEPARATE  # per block, in execution order: (op, linears sharing its input)
    owner_keeps: tuple[str, ...] = ()  # block tensors besides the norms that stay with the data owner (documented, tested)
    norm_offset: float = 0.0  # RMSNorm is x * (norm_offset + w); llama.cpp's GGUF stores norm_offset + w
    embed_scale: bool = False  # the embedding is multiplied by sqrt(hidden) (on the data owner's side)
    gguf_bpe_from_scores: bool = False  # GGUF vocabulary is SentencePiece BPE ranked by scores (see models.gguf)
    bos_per_block: bool = False  # trained with <bos> first in every sequence: training blocks start with it too

    @property
    def linears(self) -> tuple[str, ...]:
        """Every outsourced linear of a block, as a module path inside the block."""
        return tuple(m for _, members in self.groups for m in members)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The names peft matches: every outsourced linear (lm_head stays plain)."""
        return tuple(m.rsplit(".", 1)[1] for m in self.linears)

    def op_shapes(self, config, fuse: bool = True) -> list[tuple[str, int, int]]:
        """(op, in, out) of one block's ops, from the config alone (PrivTuner prices a model without loading it)."""
        dims = _dims(config)
        shapes = []
        for name, members in self.groups:
            ins, outs = zip(*(LINEAR_DIMS[m.rsplit(".", 1)[1]] for m in members))
            if fuse:
                shapes.append((name, dims[ins[0]], sum(dims[o] for o in outs)))
            else:
                shapes += [(short_name(m), dims[i], dims[o]) for m, i, o in zip(members, ins, outs)]
        return shapes


def short_name(member: str) -> str:
    """'self_attn.q_proj' -> 'q': an unfused op's name."""
    return member.rsplit(".", 1)[1].removesuffix("_proj")


def _dims(config) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {"hidden": config.hidden_size, "q": q, "kv": kv, "qkv": q + 2 * kv, "inter": inter, "inter2": 2 * inter}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",)),  # Llama-2/3, Llama-3.2, SmolLM2
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",), owner_keeps=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    Family("qwen3", ("qwen3",), owner_keeps=("self_attn.q_norm", "self_attn.k_norm")),
    # Gemma 3 text (gemma3_text; also what a Gemma 3 GGUF loads as): four norms per block,
    # per-head q/k norms, GELU-tanh MLP, sliding-window attention, scaled embeddings.
    Family("gemma3", ("gemma3_text",), owner_keeps=("self_attn.q_norm", "self_attn.k_norm"),
           norm_offset=1.0, embed_scale=True, gguf_bpe_from_scores=True, bos_per_block=True),
    # Phi-3: the checkpoint fuses q/k/v and gate/up into one linear each, so each is one
    # op of one member (fused or not); LoRA adapts the fused linear, as peft does for Phi-3.
    Family("phi3", ("phi3",), groups=(
        ("qkv", ("self_attn.qkv_proj",)), ("o", ("self_attn.o_proj",)),
        ("gate_up", ("mlp.gate_up_proj",)), ("down", ("mlp.down_proj",)),
    )),
)}
_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
SUPPORTED_TYPES = tuple(_BY_TYPE)


def family_of(config, source: str = "the model") -> Family:
    """The family of a transformers config; a clear error for any other architecture."""
    model_type = getattr(config, "model_type", None)
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"{source} is a '{model_type}' model, not a supported decoder-only family",
            f"hetune supports model types {', '.join(SUPPORTED_TYPES)} "
            "(Llama-2/3, Llama-3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 3, Phi-3, SmolLM2 and their fine-tunes)",
        )
    return family
