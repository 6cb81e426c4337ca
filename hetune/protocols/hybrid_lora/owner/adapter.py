"""The trained adapter as Hugging Face tools take it, and a quick look at what it generates.

``save_adapter`` writes peft's files with ``base_model_name_or_path`` set (a hub id as
given, a directory or ``.gguf`` file as an absolute path, a built-in by its name), the
tokenizer beside them (without ``token_type_ids``, which Llama-class ``generate`` refuses),
and ``hetune.json`` naming the base for hetune (a built-in's seed included). So
``AutoPeftModelForCausalLM.from_pretrained(DIR)`` loads an adapter trained on a hub id or
directory as it is; built-ins and GGUF files load with ``hetune generate --adapter DIR`` or
:func:`load_adapted` (transformers cannot open either from the name alone).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from hetune.errors import ConfigError

BASE_FILE = "hetune.json"
MODEL_INPUTS = ["input_ids", "attention_mask"]  # what a Llama-class model's forward and generate take


def base_reference(model_id: str) -> str:
    """What ``base_model_name_or_path`` says: an existing path made absolute, a hub id or built-in name as given."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def save_adapter(pm, model_id: str, seed: int, out: Path) -> None:
    """Write ``pm``'s LoRA adapter, its tokenizer and ``hetune.json`` into ``out``."""
    for cfg in pm.model.peft_config.values():
        cfg.base_model_name_or_path = base_reference(model_id)
    pm.model.save_pretrained(out, save_embedding_layers=False)  # "auto" asks the hub about the base's vocabulary
    if pm.tokenizer is not None:
        tok = copy.deepcopy(pm.tokenizer)
        tok.model_input_names = list(MODEL_INPUTS)
        tok.init_kwargs["model_input_names"] = list(MODEL_INPUTS)  # saved into tokenizer_config.json
        tok.save_pretrained(out)
    (Path(out) / BASE_FILE).write_text(json.dumps({"base_model": base_reference(model_id), "seed": seed}, indent=1))


def load_adapted(adapter: Path):
    """(peft model, tokenizer) for an adapter directory written by ``hetune train``: the full base model (the data
    owner's own copy, loaded here in the clear) with the adapter on top."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from hetune.models.loading import load_model

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is not an adapter directory (no adapter_config.json)",
                          "pass the adapter/ directory of a run (or a checkpoints/step-N/adapter)")
    meta = json.loads((adapter / BASE_FILE).read_text()) if (adapter / BASE_FILE).is_file() else {}
    base = meta.get("base_model") or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base:
        raise ConfigError(f"{adapter} does not name its base model", "pass --model with the model it was trained on")
    loaded = load_model(base, seed=int(meta.get("seed", 0)))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter)) if (adapter / "tokenizer_config.json").is_file() else loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model, str(adapter))
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate(adapter: Path, prompt: str, max_new_tokens: int = 64, chat: bool = False) -> str:
    """Greedy continuation of ``prompt`` (as a user turn of the tokenizer's chat template with ``chat``)."""
    model, tok = load_adapted(adapter)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template", "leave out --chat to continue plain text")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tok(text, return_tensors="pt")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def merge(adapter: Path, out: Path) -> Path:
    """Fold the adapter into its base model's weights and save a full Hugging Face model directory (with the tokenizer)."""
    from hetune.files import write_dir_atomic

    model, tok = load_adapted(adapter)
    merged = model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    if Path(out).exists():
        raise ConfigError(f"{out} already exists", "choose a new --out directory for the merged model")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_dir_atomic(out, write)
