"""The training loop: checkpoints and exact resume, peft-loadable adapter, worker loss, CLI errors."""


import pytest
import torch

from hetune.errors import WorkerError
from hetune.protocols.hybrid_lora.owner.train import TrainConfig, latest_checkpoint, read_metrics, train


@pytest.fixture(scope="module")
def data_file(stdlib_jsonl):
    return stdlib_jsonl(12_000)


def config(out, data_file, micro_bundle, **kw):
    base = dict(model="micro-llama", data=(str(data_file),), out=out, backend="quantized", bundle=micro_bundle,
                seq_len=32, batch_size=2, steps=6, warmup_steps=2, save_every=3, eval_every=3, lr=5e-3, progress=False)
    return TrainConfig(**{**base, **kw})


def test_resume_matches_uninterrupted_run(tmp_path, data_file, micro_bundle, monkeypatch):
    straight = train(config(tmp_path / "a", data_file, micro_bundle))

    from hetune.data import text

    calls = {"n": 0}
    original = text.BlockSampler.next

    def crash_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(text.BlockSampler, "next", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", data_file, micro_bundle))
    monkeypatch.setattr(text.BlockSampler, "next", original)
    assert latest_checkpoint(tmp_path / "b").name == "step-3"
    resumed = train(config(tmp_path / "b", data_file, micro_bundle), resume=True)

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # exact, not approximately
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_encrypted_steps_then_quantized_equal_a_quantized_run(tmp_path, data_file, micro_bundle):
    """Batched RLWE is exact: 2 encrypted steps, resumed on ``quantized``, equal 4 quantized steps bit for bit."""
    from safetensors.torch import load_file

    train(config(tmp_path / "q", data_file, micro_bundle, steps=4, save_every=4, eval_every=4))
    train(config(tmp_path / "mix", data_file, micro_bundle, backend="encrypted", steps=4, save_every=4, eval_every=4, stop_after=2))
    assert latest_checkpoint(tmp_path / "mix").name == "step-2"
    train(config(tmp_path / "mix", data_file, micro_bundle, steps=4, save_every=4, eval_every=4), resume=True)
    q, mix = read_metrics(tmp_path / "q"), read_metrics(tmp_path / "mix")
    assert [m["loss"] for m in q] == [m["loss"] for m in mix] and mix[0]["bytes_sent"] > 0 == mix[-1]["bytes_sent"]
    wq = load_file(str(tmp_path / "q" / "adapter" / "adapter_model.safetensors"))
    wm = load_file(str(tmp_path / "mix" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wq[k], wm[k]) for k in wq)


def test_loss_goes_down_and_adapter_loads_with_peft(tmp_path, data_file, micro_bundle):
    from peft import PeftModel

    from hetune.models.loading import load_model

    summary = train(config(tmp_path, data_file, micro_bundle, steps=12, eval_every=12, save_every=12))
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert summary["final_eval_loss"] == metrics[-1]["eval_loss"]
    base = load_model("micro-llama", seed=0).model
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) == 28
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init


def test_worker_going_away_stops_cleanly_with_checkpoint(tmp_path, data_file, loopback_worker, monkeypatch):
    from hetune.data import text
    from hetune.protocols.hybrid_lora.owner import remote

    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(retries=1, backoff_s=0.05))
    worker = loopback_worker()
    calls = {"n": 0}
    original = text.BlockSampler.next

    def stop_worker_after_first_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            worker.stop()
        return original(self)

    monkeypatch.setattr(text.BlockSampler, "next", stop_worker_after_first_step)
    cfg = config(tmp_path, data_file, None, backend="remote", workers=(worker.url,), seq_len=2, batch_size=1,
                 steps=3, save_every=1, eval_every=10)
    with pytest.raises(WorkerError) as info:
        train(cfg)
    assert "at step 2" in info.value.message and "cannot reach worker" in info.value.message
    assert "step-1" in info.value.hint and "--resume" in info.value.hint
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-1" and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--backend", "gpu"], 2, "backend='gpu' is unknown"),
        (["--backend", "quantized"], 2, "needs a bundle"),
        (["--backend", "plain", "--steps", "0"], 2, "steps=0 must be >= 1"),
        (["--backend", "remote", "--worker", "http://127.0.0.1:9"], 6, "cannot reach worker"),
        (["--backend", "remote", "--worker", "http://127.0.0.1:9", "--param-set", "p100"], 2, "choose one of p128, p192, p256"),
        (["--backend", "remote", "--worker", "http://127.0.0.1:9", "--scheme", "ckks"], 2, "scheme 'ckks' is unknown"),
        (["--backend", "plain", "--param-set", "p80"], 2, "--param-set apply to the encrypted and remote backends"),
        (["--backend", "remote", "--worker", "http://127.0.0.1:9", "--load-key", "/nonexistent"], 2, "--load-key /nonexistent does not exist"),
    ],
)
def test_train_cli_errors(run_cli, tmp_path, data_file, args, code, message, monkeypatch):
    from hetune.protocols.hybrid_lora.owner import remote

    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(retries=0, timeout_s=5.0))
    got, _, stderr = run_cli("train", "--model", "micro-llama", "--data", data_file, "--out", tmp_path / "run", *args)
    assert got == code and message in stderr


def test_missing_data_file(run_cli, tmp_path):
    got, _, stderr = run_cli("train", "--model", "micro-llama", "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "r", "--backend", "plain")
    assert got == 2 and "not found" in stderr
