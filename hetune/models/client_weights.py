"""Load the data owner's part of a model without its outsourced base weights.

For a checkpoint on disk (a directory, the hub cache or a GGUF file), the model skeleton
is built with its parameters on the meta device (buffers such as rotary frequencies are
computed as usual) and only the tensors the client needs (embeddings, norms,
biases, lm_head) are read from the safetensors files, or dequantized from the GGUF
file; the outsourced linears get a zero-stride placeholder of the right shape (4
bytes), which peft can wrap and hetune then replaces. Built-in models are generated
from a seed, so their outsourced weights exist briefly and are freed when the backend
is attached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hetune.errors import ModelLoadError
from hetune.models.builtin import BUILTIN_CONFIGS
from hetune.models.layers import decoder_layers, member_linear, op_groups
from hetune.models.loading import LoadedModel, gguf_path, load_config, load_model, load_tokenizer, local_source


def _checkpoint_dir(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # hub errors come in many classes; all mean "not available here"
        raise ModelLoadError(f"could not fetch {name_or_path}: {err}", "pass a local model directory instead") from err


def _safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        return sorted({ckpt / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{ckpt} has no safetensors weights", "save the model with save_pretrained(safe_serialization=True)")


def placeholder_weight(out_features: int, in_features: int) -> torch.nn.Parameter:
    """A (out, in) float32 tensor backed by a single element: shape without memory."""
    return torch.nn.Parameter(torch.zeros(1).expand(out_features, in_features), requires_grad=False)


def load_client_model(name_or_path: str, outsourced: list[str] | None = None, seed: int = 0) -> LoadedModel:
    """``outsourced``: member module paths ("layers.3.mlp.down_proj") the client must not load;
    None: every block linear, which is what every bundle outsources."""
    if name_or_path in BUILTIN_CONFIGS:
        return load_model(name_or_path, seed=seed)
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    model_id, name_or_path = name_or_path, local_source(name_or_path)
    gguf = gguf_path(name_or_path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary, Gemma's embed scale) computed
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    if outsourced is None:
        outsourced = [m for g in op_groups(config) for m in g.members]
    skip = set()
    for path in outsourced:
        lin = member_linear(layers, path)
        lin.weight = placeholder_weight(lin.out_features, lin.in_features)
        skip.add(f"model.{path}.weight")  # every family's decoder is the CausalLM's .model
    if gguf is not None:
        from hetune.models.gguf import load_gguf_tokenizer, read_gguf_tensors

        source, state = gguf, read_gguf_tensors(gguf, model, skip)
        tokenizer = load_gguf_tokenizer(gguf, config)
    else:
        source, state = _checkpoint_dir(name_or_path), {}
        for file in _safetensors_files(source):
            with safe_open(str(file), framework="pt") as fh:
                state.update({k: fh.get_tensor(k) for k in fh.keys() if k not in skip})
        tokenizer = load_tokenizer(source, config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"{source} lacks weights the client needs: {', '.join(missing[:5])}", "use the complete checkpoint")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id)
