"""`hetune demo` end to end at its smallest setting (micro-llama, real encryption); the full demo is slow."""

import threading

import pytest

from hetune.protocols.hybrid_lora.owner import demo

pytestmark = pytest.mark.he


def worker_threads():
    return [t for t in threading.enumerate() if t.name == "hetune-worker"]


def test_demo_runs_end_to_end(run_cli, tmp_path):
    code, stdout, stderr = run_cli("demo", "--out", tmp_path, "--model", "micro-llama", "--steps", "3",
                                   "--encrypted-steps", "2", "--seq-len", "16", "--batch-size", "2")
    assert code == 0, stderr
    assert "equal the quantized backend's bit for bit (losses and adapter): True" in stdout
    assert "steps 3-3 continue on the bit-exact quantized backend" in stdout
    rows = [ln.split() for ln in stdout.splitlines() if ln.strip()[:1].isdigit() and ln.split()[-1] in ("encrypted", "quantized")]
    assert [r[-1] for r in rows] == ["encrypted", "encrypted", "quantized"]
    for _, plain, private, _gap, _how in rows:
        assert abs(float(private) - float(plain)) / float(plain) < 0.05
    assert stdout.count("  Q: ") == 6 and "correct: base model" in stdout
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "private" / "adapter" / "adapter_model.safetensors").is_file()
    assert not worker_threads()


def test_ctrl_c_stops_the_worker(tmp_path, monkeypatch):
    from hetune.protocols.hybrid_lora.owner import train as train_mod

    def interrupted(*_a, **_k):
        assert worker_threads(), "the worker should be running during the remote run"
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=tmp_path, model="micro-llama", steps=1, seq_len=4), echo=lambda *_: None)
    assert not worker_threads()


@pytest.mark.slow
def test_full_demo_teaches_smollm2_private_facts(run_cli, tmp_path):
    """The main job as a user runs it: SmolLM2, real encryption for the first steps, answers before and after."""
    result = demo.run_demo(demo.DemoConfig(out=tmp_path), echo=print)
    assert result["encrypted_equals_quantized"]
    assert result["correct"]["after"] > result["correct"]["before"]
    assert abs(result["eval_gap"]) < 0.05
