"""GGUF files (llama.cpp's format): config, and selective tensor reads for the data owner.

transformers reads a GGUF file with ``from_pretrained(dir, gguf_file=name)`` and
dequantizes every tensor to float; the config alone is enough to refuse another family
(by its model type, as for a directory). The data owner's model reads only the tensors
it keeps (embeddings, norms, biases), never dequantizing the outsourced weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetune.errors import ModelLoadError


def load_gguf_config(path: Path):
    """The transformers config of a GGUF file (parses its metadata, not its tensors)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:  # bad magic, truncated file, an architecture transformers lacks
        raise ModelLoadError(
            f"{path} is not a GGUF model file transformers can read: {err}",
            "pass a complete .gguf file of a Llama, Mistral, Qwen2 or Qwen3 model (as written by llama.cpp or gguf-py)",
        ) from err


def read_gguf_tensors(path: Path, model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """``model``'s tensors from the file, dequantized to float32, except those named in ``skip``.

    Uses transformers' own GGUF -> Hugging Face name map and tensor fix-ups (Llama's q/k
    row permutation), the same steps ``from_pretrained`` runs (transformers 4.57).
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()  # "llama" also for Mistral
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
