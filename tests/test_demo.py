"""`hetune demo` end to end at a small setting (real encryption, about a minute)."""

import threading

import pytest

from hetune.protocols.hybrid_lora import demo

pytestmark = pytest.mark.he


def worker_threads():
    return [t for t in threading.enumerate() if t.name == "hetune-worker"]


def test_demo_runs_end_to_end(run_cli, tmp_path):
    code, stdout, stderr = run_cli("demo", "--out", tmp_path, "--steps", "2", "--seq-len", "4")
    assert code == 0, stderr
    assert "step      plain  quantized  encrypted" in stdout
    lines = [ln.split() for ln in stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 2
    for _, plain, quantized, encrypted, _gap in lines:
        assert abs(float(encrypted) - float(plain)) / float(plain) < 0.01
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "remote" / "adapter" / "adapter_model.safetensors").is_file()
    assert "encrypted output values" in stdout
    assert not worker_threads()


def test_ctrl_c_stops_the_worker(tmp_path, monkeypatch):
    from hetune.protocols.hybrid_lora import train as train_mod

    def interrupted(*_a, **_k):
        assert worker_threads(), "the worker should be running during the remote run"
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=tmp_path, steps=1, seq_len=4), echo=lambda *_: None)
    assert not worker_threads()
