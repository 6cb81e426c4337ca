"""Load a supported causal LM and its tokenizer: built-in name, ``.gguf`` file, local directory or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hetune.errors import ModelLoadError
from hetune.models.builtin import (BUILTIN_CONFIGS, BUILTIN_GGUF, BUILTIN_NAMES, builtin_config, byte_tokenizer, converted_dir,
                                   packaged_gguf_path)
from hetune.models.families import family_of


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str


def gguf_path(name_or_path: str) -> Path | None:
    """The GGUF file behind a built-in GGUF name or a ``.gguf`` path; None for other sources."""
    if name_or_path in BUILTIN_GGUF:
        return packaged_gguf_path(name_or_path)
    if not name_or_path.endswith(".gguf"):
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {name_or_path} does not exist", "pass the path of a .gguf file")
    return path


def local_source(name_or_path: str) -> str:
    """What to read a model from: a built-in GGUF model's converted directory (made on first use), else the argument.

    The conversion is exact (the dequantized float32 tensors, saved), so the directory and
    the GGUF give the same model; the bundle fingerprint still hashes the GGUF file itself.
    """
    if name_or_path not in BUILTIN_GGUF:
        return name_or_path
    gguf, target = packaged_gguf_path(name_or_path), converted_dir(name_or_path)  # the package is still checked
    if not (target / "config.json").is_file():
        from hetune.files import write_dir_atomic
        from hetune.models.gguf import convert_gguf

        try:
            write_dir_atomic(target, lambda tmp: convert_gguf(gguf, tmp))
        except OSError:  # a read-only environment: read the GGUF on every load instead
            return str(gguf)
    return str(target)


def load_tokenizer(directory, config):
    """A saved tokenizer. transformers 4.57.3+ warns that any directory it saved may hold Mistral's broken
    pre-tokenizer regex (it cannot tell); only a Mistral model's can, so others are loaded as they are."""
    from transformers import AutoTokenizer

    unaffected = config.model_type not in ("mistral", "mistral3", "ministral", "pixtral", "voxtral")
    return AutoTokenizer.from_pretrained(directory, config=config, **({"fix_mistral_regex": False} if unaffected else {}))


def load_config(name_or_path: str):
    """The model's config only: cheap, and enough to refuse an unsupported model early."""
    if name_or_path in BUILTIN_CONFIGS:
        return builtin_config(name_or_path)
    name_or_path = local_source(name_or_path)
    gguf = gguf_path(name_or_path)
    if gguf is not None:
        from hetune.models.gguf import load_gguf_config

        config = load_gguf_config(gguf)
        family_of(config, name_or_path)
        return config
    from transformers import AutoConfig

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"model directory {name_or_path} does not exist",
            "pass a Hugging Face model directory (with config.json), a .gguf file, a hub id, "
            f"or a built-in model: {', '.join(BUILTIN_NAMES)}",
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
            f"or use a built-in model: {', '.join(BUILTIN_NAMES)}",
        ) from err
    family_of(config, name_or_path)
    return config


def load_model(name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Hub id or directory: ``from_pretrained``; GGUF: every tensor dequantized; built-ins: built from their config with ``seed``."""
    config = load_config(name_or_path)
    model_id, name_or_path = name_or_path, local_source(name_or_path)
    if name_or_path in BUILTIN_CONFIGS:
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        tokenizer = byte_tokenizer()
    elif gguf_path(name_or_path) is not None:
        from hetune.models.client_weights import load_client_model

        loaded = load_client_model(name_or_path, outsourced=[])  # the data owner's reader, leaving nothing out
        model, tokenizer = loaded.model.to(dtype), loaded.tokenizer
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype)
            tokenizer = load_tokenizer(name_or_path, config)  # config: parsed once
        except OSError as err:
            raise ModelLoadError(
                f"could not load the weights or tokenizer of {name_or_path}: {err}",
                "check that the directory (or cache) holds the full model, not only config.json",
            ) from err
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id)
