"""The trained adapter as Hugging Face tools take it: AutoPeftModelForCausalLM, its tokenizer, generate."""

import json

import pytest
import torch

from hetune.compile.compiler import CompileConfig, compile_bundle
from hetune.models.loading import load_model


def _train(run_cli, out, data, model, bundle, *extra):
    code, _, err = run_cli("train", "--model", model, "--data", data, "--out", out, "--backend", "quantized", "--bundle", bundle,
                           "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--warmup-steps", "1", "--lr", "2e-2", *extra)
    assert code == 0, err
    assert "Could not find a config file" not in err  # peft's hub query about the vocabulary is not made
    return out / "adapter"


def test_adapter_of_a_directory_model_loads_with_auto_peft(run_cli, tmp_path, train_jsonl):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    loaded = load_model("micro-llama", seed=3)
    loaded.model.save_pretrained(tmp_path / "base")
    loaded.tokenizer.save_pretrained(tmp_path / "base")
    compile_bundle(str(tmp_path / "base"), tmp_path / "bundle", CompileConfig(calibration_tokens=16), progress=False)
    adapter = _train(run_cli, tmp_path / "run", train_jsonl, str(tmp_path / "base"), tmp_path / "bundle")

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # as it is: no base given
    tok = AutoTokenizer.from_pretrained(str(adapter))
    inputs = tok("def main(", return_tensors="pt")
    assert "token_type_ids" not in inputs
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    reference = PeftModel.from_pretrained(load_model(str(tmp_path / "base")).model, str(adapter))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
        assert not torch.equal(model(**inputs).logits, load_model(str(tmp_path / "base")).model(**inputs).logits)  # trained


def test_generate_prints_the_adapted_models_greedy_text(run_cli, tmp_path, train_jsonl, micro_bundle):
    from hetune.protocols.hybrid_lora.owner.adapter import load_adapted

    adapter = _train(run_cli, tmp_path / "run", train_jsonl, "micro-llama", micro_bundle)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "micro-llama"
    assert json.loads((adapter / "hetune.json").read_text()) == {"base_model": "micro-llama", "seed": 0}
    assert (adapter / "tokenizer.json").is_file()
    code, out, err = run_cli("generate", "--adapter", adapter, "--max-new-tokens", "8", "import os")
    assert code == 0, err
    model, tok = load_adapted(adapter)
    ids = tok("import os", return_tensors="pt")
    expected = tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:],
                          skip_special_tokens=True)
    assert out == expected + "\n"
    code, _, err = run_cli("generate", "--adapter", tmp_path, "hi")
    assert code == 2 and "not an adapter directory" in err
    code, _, err = run_cli("generate", "--adapter", adapter, "--chat", "hi")
    assert code == 2 and "no chat template" in err


def test_merge_writes_a_full_model_equal_to_base_plus_adapter(run_cli, tmp_path, train_jsonl, micro_bundle):
    from transformers import AutoModelForCausalLM

    from hetune.protocols.hybrid_lora.owner.adapter import load_adapted

    adapter = _train(run_cli, tmp_path / "run", train_jsonl, "micro-llama", micro_bundle)
    code, _, err = run_cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    model, tok = load_adapted(adapter)
    ids = tok("for i in range(", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model(**ids).logits, rtol=1e-5, atol=1e-5)  # float reassociation only
    code, _, err = run_cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 2 and "already exists" in err
