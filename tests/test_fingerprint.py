"""The data owner refuses a bundle compiled from other weights than its model's, on every backend, before a step."""

import pytest
import torch

from hetune.compile.compiler import CompileConfig, compile_bundle
from hetune.models.loading import load_model

TRAIN = ("--steps", "1", "--seq-len", "16", "--batch-size", "1", "--eval-every", "1")


@pytest.fixture(scope="module")
def seed0_dir(tmp_path_factory):
    """micro-llama (seed 0) saved as a Hugging Face directory, and a bundle compiled from that directory."""
    root = tmp_path_factory.mktemp("dir-model")
    loaded = load_model("micro-llama", seed=0)
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    compile_bundle(str(root / "model"), root / "bundle", CompileConfig(calibration_tokens=16), progress=False)
    return root


def _train(run_cli, tmp_path, data, *args):
    return run_cli("train", "--data", data, "--out", tmp_path / "run", *TRAIN, *args)


@pytest.mark.parametrize("backend", ["quantized", "encrypted", "remote"])
def test_seed_1_model_refuses_a_seed_0_bundle(run_cli, tmp_path, train_jsonl, micro_bundle, loopback_worker, backend):
    where = ("--worker", loopback_worker().url) if backend == "remote" else ("--bundle", micro_bundle)
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", "micro-llama", "--seed", "1", "--backend", backend, *where)
    assert code == 5, err
    assert "was compiled from other weights than the local model's" in err
    assert "micro-llama (outsourced weights sha256" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", "micro-llama", "--seed", "0", "--backend", backend, *where)
    assert code == 0, err


@pytest.mark.parametrize("backend", ["quantized", "encrypted"])
def test_bundle_of_another_model_is_one_clear_line(run_cli, tmp_path, train_jsonl, bundle_dir, backend):
    """A tiny-llama bundle under micro-llama used to end in IndexError."""
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", "micro-llama", "--backend", backend, "--bundle", bundle_dir)
    assert code == 5 and "was compiled from tiny-llama with hidden_size=128; the local model micro-llama has 32" in err
    assert "Traceback" not in err


def test_directory_model_streams_its_outsourced_weights(run_cli, tmp_path, train_jsonl, seed0_dir):
    """A directory model's owner never loads the outsourced weights: they are hashed from the files, one at a time.
    Changing one outsourced weight only (client-side weights equal, like a model and its variant) is refused."""
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", seed0_dir / "model", "--backend", "quantized",
                          "--bundle", seed0_dir / "bundle")
    assert code == 0, err
    from safetensors.torch import load_file, save_file

    import shutil

    variant = tmp_path / "variant"
    shutil.copytree(seed0_dir / "model", variant)
    weights = load_file(str(variant / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(weights, str(variant / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", variant, "--backend", "quantized",
                          "--bundle", seed0_dir / "bundle", "--overwrite")
    assert code == 5 and "compiled from other weights" in err


def test_a_session_on_other_weights_is_refused(micro_bundle, loopback_worker):
    """The fingerprint is bound to the session: a worker that opens one on other weights than /info's is refused."""
    from hetune.errors import WorkerError
    from hetune.protocols.hybrid_lora.owner.remote import HttpTransport

    transport = HttpTransport([loopback_worker().url])
    transport.verified(transport.manifest.model.outsourced_sha256)
    params = transport.resolve_session(None, None)
    transport.open(params, b"")  # the same weights: accepted
    transport.close()
    transport = HttpTransport([loopback_worker().url])
    transport.verified("0" * 64)
    with pytest.raises(WorkerError, match="opened a session on other weights"):
        transport.open(params, b"")
    transport.close()


def test_manifest_records_the_gguf_file_and_outsourced_weights(compiled, tiny):
    from hetune.compile.fingerprint import outsourced_sha256

    assert compiled.manifest.model.source_sha256 == ""  # a built-in generated from a seed: no file
    assert compiled.manifest.model.outsourced_sha256 == outsourced_sha256(tiny.model, compiled.manifest.ops)
    with torch.no_grad():
        other = load_model("tiny-llama", seed=0).model
        other.model.embed_tokens.weight.add_(1.0)  # client-side weights only: the outsourced fingerprint stays
    assert outsourced_sha256(other, compiled.manifest.ops) == compiled.manifest.model.outsourced_sha256


def test_gguf_model_is_checked_by_its_file(run_cli, tmp_path, train_jsonl):
    """A GGUF source's owner hashes the file: the bundle of one GGUF file refuses another's model."""
    from test_gguf import write_gguf

    for seed in (0, 1):
        write_gguf(load_model("micro-llama", seed=seed).model, tmp_path / f"s{seed}.gguf")
    code, _, err = run_cli("compile", tmp_path / "s0.gguf", "--out", tmp_path / "bundle", "--calibration-tokens", "16")
    assert code == 0, err
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", tmp_path / "s1.gguf", "--backend", "quantized",
                          "--bundle", tmp_path / "bundle")
    assert code == 5 and "GGUF file sha256" in err and "compiled from other weights" in err
    code, _, err = _train(run_cli, tmp_path, train_jsonl, "--model", tmp_path / "s0.gguf", "--backend", "quantized",
                          "--bundle", tmp_path / "bundle")
    assert code == 0, err
