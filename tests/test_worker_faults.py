"""A worker killed with SIGKILL in the middle of a `hetune train` run and restarted on the same port.

The client retries with backoff (RetryPolicy), re-opens its session on the new worker
and finishes; batched RLWE being exact, the adapter equals a `quantized` run's.
"""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from hetune.protocols.hybrid_lora.owner.train import TrainConfig, read_metrics, train

HETUNE = str(Path(sys.executable).with_name("hetune"))
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker(bundle: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "a") as fh:
        proc = subprocess.Popen([HETUNE, "serve", str(bundle), "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v2/health", timeout=1)
            return proc
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


def settings(out: Path, data: Path) -> dict:
    return dict(model="micro-llama", data=(str(data),), out=out, steps=STEPS, seq_len=16, batch_size=1, warmup_steps=2,
                lr=5e-3, save_every=STEPS, eval_every=STEPS)


@pytest.mark.slow
def test_worker_killed_mid_run_and_restarted_gives_the_undisturbed_adapter(micro_bundle, train_jsonl, tmp_path):
    port, log = free_port(), tmp_path / "worker.log"
    cfg = settings(tmp_path / "remote", train_jsonl)
    worker = start_worker(micro_bundle, port, log)
    client = subprocess.Popen(
        [HETUNE, "train", "--model", cfg["model"], "--data", str(train_jsonl), "--out", str(cfg["out"]), "--backend", "remote",
         "--worker", f"http://127.0.0.1:{port}", "--steps", str(STEPS), "--seq-len", "16", "--batch-size", "1",
         "--warmup-steps", "2", "--lr", "5e-3", "--save-every", str(STEPS), "--eval-every", str(STEPS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        while not read_metrics(cfg["out"]):  # step 1 done: the client is now in the middle of step 2
            assert client.poll() is None, client.communicate()[1]
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        done_at_kill = len(read_metrics(cfg["out"]))
        assert client.poll() is None and done_at_kill < STEPS
        worker = start_worker(micro_bundle, port, log)  # the same port; the old sessions are gone with the process
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
    finally:
        for proc in (client, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "session" in log.read_text().split("worker on")[-1]  # the client opened a new session on the restarted worker

    train(TrainConfig(**{**cfg, "out": tmp_path / "quantized"}, backend="quantized", bundle=micro_bundle, progress=False))
    remote, reference = read_metrics(cfg["out"]), read_metrics(tmp_path / "quantized")
    assert [m["loss"] for m in remote] == [m["loss"] for m in reference] and len(remote) == STEPS
    from safetensors.torch import load_file

    got = load_file(str(cfg["out"] / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "quantized" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
