"""GGUF models: a tiny file written here with gguf's GGUFWriter, and the built-in SmolLM2-135M.

A model written to GGUF (float32 tensors, llama.cpp's names and q/k row order) must
load back bit for bit, on the data owner's side without its outsourced weights; every
way a GGUF source can be wrong gives one clear line and exit code 3 from the CLI.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from hetune.errors import ModelLoadError
from hetune.models import builtin
from hetune.models.client_weights import load_client_model
from hetune.models.layers import decoder_layers, member_linear, op_groups
from hetune.models.loading import load_config, load_model
from hetune.protocols.hybrid_lora.owner.client import build_private_model


def _write_shape(writer, cfg) -> None:
    """The architecture fields every GGUF writer here records, from a transformers config."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)


def write_gguf(model: torch.nn.Module, path) -> None:
    """Write a Llama or Qwen2 model and a byte-level vocabulary the way llama.cpp's converter does."""
    import gguf

    cfg = model.config
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    writer.add_name("hetune test model")
    _write_shape(writer, cfg)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    vocab = builtin.byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    tokens[cfg.pad_token_id] = "ĠĠ"  # one merged token (two spaces): transformers' Qwen2 converter needs a merge
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ Ġ"] * 2)  # twice: transformers reads a one-element array as a scalar
    writer.add_token_types([3 if i in (cfg.bos_token_id, cfg.eos_token_id) else 1 for i in range(len(tokens))])  # 3: special
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied GGUF has no output.weight
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        array = tensor.numpy()
        n = heads.get(name.split(".")[-2])
        if cfg.model_type == "llama" and n:  # llama.cpp's rotary row order for q and k
            array = array.reshape(n, 2, array.shape[0] // n // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, family_model, tmp_path_factory):
    """(model, path of its GGUF file): micro-llama (seed 0, as the micro bundle) and a tiny Qwen2 with q/k/v biases."""
    model = load_model("micro-llama", seed=0).model if request.param == "llama" else family_model("qwen2")
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    write_gguf(model, path)
    return model, path


def test_gguf_file_loads_the_weights_it_was_written_from(tiny_gguf):
    model, path = tiny_gguf
    loaded = load_model(str(path))
    assert loaded.model.config.model_type == model.config.model_type
    ours, theirs = loaded.model.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    tok = loaded.tokenizer
    assert tok.decode(tok("def f(x):")["input_ids"], skip_special_tokens=True) == "def f(x):"


def test_client_reads_only_what_it_keeps_from_a_gguf_file(tiny_gguf):
    model, path = tiny_gguf
    client = load_client_model(str(path))
    members = [m for g in op_groups(model.config) for m in g.members]
    for member in members:
        assert member_linear(decoder_layers(client.model), member).weight.untyped_storage().nbytes() == 4  # placeholder
    kept = {n: t for n, t in client.model.state_dict().items() if not n.endswith("_proj.weight")}
    original = model.state_dict()
    assert all(torch.equal(t, original[n]) for n, t in kept.items())
    assert any(n.endswith("_proj.bias") for n in kept) == (model.config.model_type == "qwen2")


def test_cli_compiles_a_gguf_file_for_the_private_model(tiny_gguf, run_cli, tmp_path):
    model, path = tiny_gguf
    code, _, err = run_cli("compile", path, "--out", tmp_path / "bundle", "--calibration-tokens", "16")
    assert code == 0, err
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["id"] == str(path) and manifest["model"]["model_type"] == model.config.model_type
    ids = torch.tensor([[100, 101, 102, 32, 102, 40, 120, 41, 58]])  # "def f(x):"
    with torch.no_grad():
        quantized = build_private_model(str(path), "quantized", bundle=tmp_path / "bundle").model(input_ids=ids).logits
        reference = model(input_ids=ids).logits
    assert float((quantized - reference).norm() / reference.norm()) < 0.05  # 8-bit: about 1% measured


def _gpt2_gguf(path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _package(field: str, value: str) -> builtin.PackagedGguf:
    return dataclasses.replace(builtin.BUILTIN_GGUF["smollm2-135m"], **{field: value})


@pytest.mark.parametrize(
    "source, patch, message",
    [
        ("gpt2.gguf", None, "is a 'gpt2' model, not a supported decoder-only family"),
        ("garbage.gguf", None, "is not a GGUF model file transformers can read"),
        ("missing.gguf", None, "does not exist"),
        ("smollm2-135m", _package("packages", ("hetune-no-such-package",)), "needs the package hetune-no-such-package in "),
        ("smollm2-135m", _package("sha256", "0" * 64), "expected 0000"),
    ],
)
def test_bad_gguf_sources_fail_clearly(tmp_path, monkeypatch, run_cli, source, patch, message):
    if source == "gpt2.gguf":
        _gpt2_gguf(tmp_path / source)
    elif source == "garbage.gguf":
        (tmp_path / source).write_bytes(b"not a gguf file at all")
    if patch:
        monkeypatch.setitem(builtin.BUILTIN_GGUF, source, patch)
    model = str(tmp_path / source) if source.endswith(".gguf") else source
    with pytest.raises(ModelLoadError, match=message):
        load_config(model)
    code, _, err = run_cli("compile", model, "--out", tmp_path / "bundle")
    assert code == 3 and message in err and "hint:" in err
    assert not (tmp_path / "bundle").exists()


def test_smollm2_135m_is_a_real_pretrained_chat_model():
    """The built-in SmolLM2-135M-Instruct (Q4_1 GGUF, about 25 s to load on 2 cores) answers a factual question."""
    loaded = load_model("smollm2-135m")
    cfg = loaded.model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size)
    assert (cfg.model_type, *shape, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 1536, 49152, True)
    tok = loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        answer = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(answer[0, ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_135m_private_model_on_quantized(tmp_path):
    """Compile the real model and run the data owner's model, built from the GGUF without its outsourced weights.

    Measured: logits within 11% of float over 30 blocks, 19 of 20 next-token choices equal; about 90 s.
    """
    from hetune.compile.compiler import CompileConfig, compile_bundle

    full = load_model("smollm2-135m")
    compile_bundle(full, tmp_path / "bundle", CompileConfig(calibration_tokens=32), progress=False)
    pm = build_private_model("smollm2-135m", "quantized", bundle=tmp_path / "bundle")
    text = "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of"
    ids = full.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference, quantized = full.model(input_ids=ids).logits, pm.model(input_ids=ids).logits
    assert float((quantized - reference).norm() / reference.norm()) < 0.2
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    assert full.tokenizer.decode(quantized[0, -1].argmax()) == " Italy"


def test_model_packages_are_looked_up_in_the_models_dir_only(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv(builtin.MODELS_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=f"in {tmp_path / 'empty'}") as err:
        builtin.packaged_gguf_path("smollm2-135m")
    assert "hetune models install smollm2-135m" in err.value.hint
    code, _, err_text = run_cli("models", "install", "no-such-model")
    assert code == 3 and "no built-in GGUF model named no-such-model" in err_text


def _fake_package(models, package: str, file: str, data: bytes) -> None:
    """A package installed by `pip --target`, as importlib.metadata finds it: its file and dist-info."""
    top = package.replace("-", "_")
    (models / top).mkdir(parents=True)
    (models / top / file).write_bytes(data)
    info = models / f"{top}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
    (info / "RECORD").write_text(f"{top}/{file},,\n")


def test_a_split_gguf_is_joined_in_package_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    models = tmp_path / "models"
    monkeypatch.setenv(builtin.MODELS_DIR_ENV, str(models))
    chunks = [b"GGUF first part|", b"second part|", b"third"]
    packages = tuple(f"hetune-test-part{i}" for i in range(3))
    files = tuple(f"m.gguf.part{i:02d}" for i in range(3))
    for package, file, chunk in zip(packages, files, chunks):
        _fake_package(models, package, file, chunk)
    whole = b"".join(chunks)
    spec = builtin.PackagedGguf(packages, "1.0.0", files, hashlib.sha256(whole).hexdigest(), "m.gguf")
    monkeypatch.setitem(builtin.BUILTIN_GGUF, "split-test", spec)
    assert builtin.packaged_gguf_path("split-test") == models / "m.gguf"
    assert (models / "m.gguf").read_bytes() == whole
    (models / "m.gguf").unlink()
    reordered = dataclasses.replace(spec, packages=packages[::-1], files=files[::-1])  # same bytes, wrong order
    monkeypatch.setitem(builtin.BUILTIN_GGUF, "split-test", reordered)
    with pytest.raises(ModelLoadError, match="join to sha256") as info:
        builtin.packaged_gguf_path("split-test")
    assert "hetune models install split-test" in info.value.hint
    assert sorted(p.name for p in models.iterdir() if not p.is_dir()) == []  # nothing half-written left


def test_a_builtin_gguf_is_converted_once_and_loads_the_same(tiny_gguf, tmp_path, monkeypatch):
    """A built-in GGUF model is dequantized once into a Hugging Face directory; later loads read that, to the bit."""
    import hashlib

    from hetune.models import gguf as gguf_module

    model, path = tiny_gguf
    models = tmp_path / "models"
    monkeypatch.setenv(builtin.MODELS_DIR_ENV, str(models))
    _fake_package(models, "hetune-test-model", "tiny.gguf", path.read_bytes())
    spec = builtin.PackagedGguf(("hetune-test-model",), "1.0.0", ("tiny.gguf",), hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setitem(builtin.BUILTIN_GGUF, "tiny-test", spec)
    first = load_model("tiny-test")
    assert (builtin.converted_dir("tiny-test") / "config.json").is_file() and first.model_id == "tiny-test"

    def no_second_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_module, "convert_gguf", no_second_conversion)
    again, client = load_model("tiny-test"), load_client_model("tiny-test")
    original = model.state_dict()
    for loaded in (first, again):
        assert all(torch.equal(loaded.model.state_dict()[k], original[k]) for k in original)
    members = {f"model.{m}.weight" for g in op_groups(model.config) for m in g.members}
    assert all(torch.equal(t, original[n]) for n, t in client.model.state_dict().items() if n not in members)
    text = "def f(x):"
    assert again.tokenizer(text)["input_ids"] == load_model(str(path)).tokenizer(text)["input_ids"]


# A small SentencePiece BPE vocabulary as Gemma's GGUF stores it: control tokens, 256 byte
# tokens, then pieces ranked by score (a higher score merges first).
SPM_PIECES = ["▁", "d", "e", "f", "x", "(", ")", ":", "de", "def", "▁f", "▁x"]


def write_gemma3_gguf(model: torch.nn.Module, path) -> None:
    """A Gemma 3 model the way llama.cpp's converter writes it: norms stored as 1 + w, an SPM vocabulary with scores."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    _write_shape(writer, cfg)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(cfg.sliding_window)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(SPM_PIECES))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        array = tensor.numpy() + (1 if name.endswith("norm.weight") else 0)  # llama.cpp: Gemma's norms as 1 + w
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gemma3_gguf_norms_and_vocabulary_load_as_the_original(tmp_path):
    """The +1 llama.cpp adds to Gemma's norms is undone; the SPM vocabulary tokenizes by merge rank, not as Unigram."""
    from transformers import Gemma3TextConfig

    from hetune.models.families import family_of

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, vocab_size=260 + len(SPM_PIECES),
                              sliding_window=4, bos_token_id=2, eos_token_id=1, pad_token_id=0)  # GGUF-default layer types
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path / "tiny-gemma3.gguf"
    write_gemma3_gguf(model, path)
    assert family_of(load_config(str(path))).norm_offset == 1.0
    loaded = load_model(str(path))
    ours, theirs = loaded.model.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:  # norms: (w + 1) - 1 in float32, within one rounding of 1
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1.2e-7 if "norm" in name else 0, msg=name)
    ids = loaded.tokenizer("def f(x):")["input_ids"]
    assert loaded.tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "def", "▁f", "(", "x", ")", ":"]
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):"
    assert loaded.tokenizer.decode(loaded.tokenizer("é ok")["input_ids"], skip_special_tokens=True) == "é ok"  # byte fallback
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=torch.tensor([ids])).logits, model(input_ids=torch.tensor([ids])).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gemma3():
    """The built-in Gemma 3 270M (Q4_K_M GGUF in 4 packages), loaded once: about 2 minutes on 2 busy cores."""
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_270m_is_a_real_pretrained_model(gemma3):
    """Shape, norm convention and vocabulary right: whole-word tokens and a greedy fact (a wrong norm offset gives nonsense)."""
    cfg, tok = gemma3.model.config, gemma3.tokenizer
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
             cfg.intermediate_size, cfg.vocab_size)
    assert (cfg.model_type, *shape) == ("gemma3_text", 18, 640, 4, 1, 256, 2048, 262144)
    ids = tok("The capital of France is")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    text = "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        answer = gemma3.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert tok.decode(answer[0, ids.shape[1]:]).startswith(" Italy")


@pytest.mark.slow
def test_gemma3_270m_remote_step_equals_quantized_bit_for_bit(gemma3, tmp_path):
    """Compile the real model; the data owner's model from the GGUF without its outsourced weights; one step
    through a loopback worker under batched RLWE equal to quantized bit for bit, and quantized close to float."""
    from test_hybrid_lora import assert_equal_grads, lora_grads

    from hetune.compile.bundle import load_bundle
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.crypto.keys import generate_keys
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker

    compile_bundle(gemma3, tmp_path / "bundle", CompileConfig(calibration_tokens=32), progress=False)
    text = "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of"
    ids = gemma3.tokenizer(text, return_tensors="pt")["input_ids"]
    pm = build_private_model("gemma3-270m", "quantized", bundle=tmp_path / "bundle")
    with torch.no_grad():
        reference, quantized = gemma3.model(input_ids=ids).logits, pm.model(input_ids=ids).logits
    assert float((quantized - reference).norm() / reference.norm()) < 0.2
    assert gemma3.tokenizer.decode(quantized[0, -1].argmax()) == " Italy"
    step = ids[:, :8]
    expected = lora_grads(pm, step)
    worker = LoopbackWorker(load_bundle(tmp_path / "bundle"))
    try:
        remote = build_private_model("gemma3-270m", "remote", workers=(worker.url,), keys=generate_keys("rlwe"))
        assert_equal_grads(lora_grads(remote, step), expected)
        remote.close()
    finally:
        worker.stop()
