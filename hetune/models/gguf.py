"""GGUF files (llama.cpp's format): config, and selective tensor reads for the data owner.

transformers parses a GGUF file's metadata into a config (enough to refuse another
family, by its model type, as for a directory). The tensors are read here, each file
parsed once per process: the data owner's model reads only the tensors it keeps
(embeddings, norms, biases), never dequantizing the outsourced weights; the full model
(compile, ``plain``) reads them all.
transformers also undoes llama.cpp's norm offset (Gemma's RMSNorm is x * (1 + w), the
GGUF stores 1 + w; its Gemma tensor processor subtracts 1), which ``read_gguf_tensors``
reuses; Gemma's vocabulary needs :func:`load_gguf_tokenizer`.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch

from hetune.errors import ModelLoadError


def load_gguf_config(path: Path):
    """The transformers config of a GGUF file (parses its metadata, not its tensors), a fresh copy per call."""
    return copy.deepcopy(_gguf_config(path))


@lru_cache(maxsize=2)
def _gguf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:  # bad magic, truncated file, an architecture transformers lacks
        raise ModelLoadError(
            f"{path} is not a GGUF model file transformers can read: {err}",
            "pass a complete .gguf file of a supported family, e.g. Llama, Mistral, Qwen2/3, Gemma 3 "
            "(as written by llama.cpp or gguf-py)",
        ) from err


def read_gguf_tensors(path: Path, model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """``model``'s tensors from the file, dequantized to float32, except those named in ``skip``.

    Uses transformers' own GGUF -> Hugging Face name map and tensor fix-ups (Llama's q/k
    row permutation), the same steps ``from_pretrained`` runs (transformers 4.57).
    """
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = _reader(path)
    arch = _string(reader, "general.architecture")  # "llama" also for Mistral
    names = get_gguf_hf_weights_map(model, model_type=arch)  # gguf name -> HF state-dict name
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    state = {}
    for tensor in reader.tensors:
        name = names.get(tensor.name)
        if name is None or name in skip:
            continue
        weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32))
    return state


@lru_cache(maxsize=2)
def _reader(path: Path):
    """Parsing the metadata of a 262k-token vocabulary takes most of a minute: once per file and process."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _string(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def load_gguf_tokenizer(path: Path, config):
    """The tokenizer stored in the file, as a transformers fast tokenizer.

    transformers 4.57 reads a Gemma GGUF vocabulary (SentencePiece BPE, merge order
    stored as scores) into a Unigram model, which splits common words ("The capital of
    France" -> The c ap it al of Fr an ce); for such families the BPE is rebuilt from
    the same tokens and scores, as transformers' own SentencePiece converter does.
    """
    from transformers import AutoTokenizer

    from hetune.models.families import family_of

    if family_of(config, str(path)).gguf_bpe_from_scores:
        return _bpe_from_scores(_reader(path))
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config)


def _bpe_from_scores(reader):
    """A SentencePiece BPE vocabulary with byte fallback (Gemma's), from the GGUF's tokens, scores and types."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    f = reader.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    scores = f["tokenizer.ggml.scores"].contents()
    types = f["tokenizer.ggml.token_type"].contents()  # llama.cpp: 3 control, 4 user-defined, 6 byte
    ids = {k: int(f[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos", "unknown", "padding")}
    vocab = {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(BPE(vocab, generate_merges(vocab, list(zip(tokens, scores))), unk_token=tokens[ids["unknown"]],
                         fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # control and user-defined pieces are whole tokens, never split (SentencePiece's rule)
    core.add_tokens([AddedToken(t, special=ty == 3, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, model_input_names=["input_ids", "attention_mask"], bos_token=tokens[ids["bos"]], eos_token=tokens[ids["eos"]],
        unk_token=tokens[ids["unknown"]], pad_token=tokens[ids["padding"]],
    )
    if "tokenizer.ggml.add_bos_token" not in f or f["tokenizer.ggml.add_bos_token"].contents():
        from tokenizers import processors

        bos = tokens[ids["bos"]]
        core_pp = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
        tok.backend_tokenizer.post_processor = core_pp
    return tok


def convert_gguf(path: Path, out: Path) -> None:
    """Write the whole model of a GGUF file as a Hugging Face directory (float32 safetensors, config, tokenizer).

    Dequantizing the tensors and building the tokenizer take about 30 s on 2 cores for
    SmolLM2; a saved directory loads in about 2 (:func:`hetune.models.loading.local_source`).
    """
    from hetune.models.client_weights import load_client_model

    loaded = load_client_model(str(path), outsourced=[])
    loaded.model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
