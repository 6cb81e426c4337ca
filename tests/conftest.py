"""Shared fixtures: one tiny Llama built from its config and one bundle compiled from it."""

from __future__ import annotations

import sys

import pytest
import torch

from hetune.compile.compiler import CompileConfig, compile_bundle
from hetune.models.loading import load_model


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny):
    """tiny-llama compiled and its bundle written, once: (bundle directory, compiled model)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return out, compile_bundle(tiny, out, CompileConfig(calibration_tokens=64), progress=False)


@pytest.fixture(scope="session")
def compiled(tiny_bundle):
    return tiny_bundle[1]


@pytest.fixture(scope="session")
def bundle_dir(tiny_bundle):
    return tiny_bundle[0]


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the hetune CLI in-process: returns (exit code, stdout, stderr)."""
    from hetune import cli

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["hetune", *map(str, args)])
        cli._state["debug"] = False
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


FAMILY_CONFIGS = {  # one tiny config per record of hetune.models.families (test_families checks they match)
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    # one sliding-window block and one global block, as Gemma 3 interleaves them
    "gemma3": ("Gemma3TextConfig", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", dict(head_dim=None)),  # Phi-3's head size is hidden / heads (16)
}


@pytest.fixture(scope="session")
def family_model():
    """Build a tiny random model of a family from its transformers config class (2 blocks, hidden 64, byte vocab).

    Biases and norm weights are moved off their init values (0 and 1) so that a model
    that dropped or mixed them up would not pass for the original.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    from hetune.models.builtin import BUILTIN_CONFIGS

    byte_ids = {k: BUILTIN_CONFIGS["micro-llama"][k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}

    def build(family: str, seed: int = 0) -> torch.nn.Module:
        config_class, extra = FAMILY_CONFIGS[family]
        kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=128, **byte_ids) | extra
        config = getattr(transformers, config_class)(**{k: v for k, v in kwargs.items() if v is not None})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        return model.eval()

    return build


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory):
    """A bundle of the 2-block micro-llama: small enough for real encryption in tests."""
    out = tmp_path_factory.mktemp("micro") / "bundle"
    compile_bundle("micro-llama", out, CompileConfig(calibration_tokens=32), progress=False)
    return out


@pytest.fixture
def loopback_worker(micro_bundle):
    from hetune.compile.bundle import load_bundle
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker, ServeConfig

    workers = []

    def start(**cfg):
        workers.append(LoopbackWorker(load_bundle(micro_bundle), ServeConfig(**cfg)))
        return workers[-1]

    yield start
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def stdlib_jsonl(tmp_path_factory):
    """Factory: a jsonl file of ``chars`` characters of Python standard library text, in 400-character records."""
    import json

    from hetune.data.corpus import stdlib_text

    def make(chars: int):
        path = tmp_path_factory.mktemp("data") / "train.jsonl"
        text = stdlib_text(chars)
        path.write_text("".join(json.dumps({"text": text[i : i + 400]}) + "\n" for i in range(0, len(text), 400)))
        return path

    return make


@pytest.fixture(scope="session")
def train_jsonl(stdlib_jsonl):
    """A small training file for `hetune train` runs."""
    return stdlib_jsonl(4_000)


@pytest.fixture(scope="session")
def rlwe_keys():
    from hetune.crypto.keys import generate_keys

    return generate_keys("rlwe")


@pytest.fixture(scope="session")
def micro(micro_bundle):
    """The micro bundle, loaded."""
    from hetune.compile.bundle import load_bundle

    return load_bundle(micro_bundle)
