"""Load a Llama-class causal LM and its tokenizer: built-in name, local directory or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hetune.errors import ModelLoadError
from hetune.models.builtin import BUILTIN_CONFIGS, builtin_config, byte_tokenizer

# Architectures whose blocks have exactly q/k/v/o + gate/up/down linears and no biases.
LLAMA_CLASS_TYPES = ("llama", "mistral")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str


def _check_llama_class(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_CLASS_TYPES:
        raise ModelLoadError(
            f"{source} is a '{model_type}' model, not a Llama-class causal LM",
            f"hetune supports model types {', '.join(LLAMA_CLASS_TYPES)} "
            "(Llama-2/3, Llama-3.2, Mistral and their fine-tunes)",
        )


def load_config(name_or_path: str):
    """The model's config only: cheap, and enough to refuse an unsupported model early."""
    if name_or_path in BUILTIN_CONFIGS:
        return builtin_config(name_or_path)
    from transformers import AutoConfig

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model directory {name_or_path} does not exist",
            "pass a Hugging Face model directory (with config.json), a hub id, "
            f"or a built-in model: {', '.join(BUILTIN_CONFIGS)}",
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        if looks_local:
            raise ModelLoadError(
                f"{name_or_path} is not a Hugging Face model directory: {err}",
                "the directory needs config.json and the weights saved by save_pretrained",
            ) from err
        raise ModelLoadError(
            f"model '{name_or_path}' is not in the local Hugging Face cache and the hub "
            "could not be reached (or the id does not exist)",
            "on a machine with internet run `huggingface-cli download "
            f"{name_or_path} --local-dir DIR`, copy DIR here and pass DIR instead of the id; "
            f"or use a built-in model: {', '.join(BUILTIN_CONFIGS)}",
        ) from err
    _check_llama_class(config, name_or_path)
    return config


def load_model(name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Standard ``from_pretrained`` loading; built-ins are built from their config with ``seed``."""
    config = load_config(name_or_path)
    if name_or_path in BUILTIN_CONFIGS:
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise ModelLoadError(
                f"could not load the weights or tokenizer of {name_or_path}: {err}",
                "check that the directory (or cache) holds the full model, not only config.json",
            ) from err
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name_or_path)
