"""The command line as a user meets it: help, compile, inspect, and clear failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HETUNE = str(Path(sys.executable).with_name("hetune"))


def test_help_lists_commands_with_real_text():
    out = subprocess.run([HETUNE, "--help"], capture_output=True, text=True, check=True).stdout
    assert "compile" in out and "worker bundle" in out
    assert "inspect" in out and "share of" in out
    assert "serve" in out and "remote worker" in out
    assert "train" in out and "LoRA" in out


def test_compile_then_inspect(run_cli, tmp_path):
    out = tmp_path / "bundle"
    code, stdout, stderr = run_cli("compile", "tiny-llama", "--out", out, "--calibration-tokens", "32")
    assert code == 0, stderr
    assert "16 ops" in stdout and "outsourced" in stdout
    assert "quantization report" in stderr
    code, stdout, _ = run_cli("inspect", out, "--json")
    summary = json.loads(stdout)
    assert code == 0 and len(summary["ops"]) == 16 and summary["bits"] == {"w": 8, "a": 12, "g": 12}
    assert all(8 <= op["bits_a"] <= 12 and 8 <= op["bits_g"] <= 12 and op["acc_bits"] <= 30 for op in summary["ops"])
    assert 0.9 < summary["outsourced_share"] < 1.0
    for op in summary["ops"]:  # tight widths per op and direction, recorded at compile time
        for direction in ("forward", "backward"):
            widths = op["wire_bytes"][direction]
            # bits / 8: b at 48 bits, results at 40 (each of A_out, B_out), the body result with the hint at 33
            assert widths["upload"] == 6 and widths["fresh_result"] == 10 and widths["body"] == 4.125 and widths["hint"] == 5
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0 and "layers.3.down" in stdout and "bits a/g" in stdout
    assert "upload 6 fresh 10 body 4.125 hint 5 | upload 6 fresh 10 body 4.125 hint 5" in stdout


def test_unfused_compile_with_lm_head(run_cli, tmp_path):
    out = tmp_path / "b"
    code, _, stderr = run_cli("compile", "tiny-llama", "--out", out, "--no-fuse", "--lm-head", "--bits-w", "6", "--calibration-tokens", "16")
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", out, "--json")
    ops = [op["name"] for op in json.loads(stdout)["ops"]]
    assert len(ops) == 7 * 4 + 1 and ops[-1] == "lm_head" and "layers.0.q" in ops


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--bits-w", "1"], 2, "bits_w=1 is out of range"),
        (["--bits-a", "17"], 2, "bits_a=17 is out of range"),
        (["--bits-w", "16", "--bits-a", "16"], 4, "cannot decrypt exactly under rlwe/p128"),
    ],
)
def test_bad_settings_fail_cleanly(run_cli, tmp_path, args, code, message):
    out = tmp_path / "out"
    got, _, stderr = run_cli("compile", "tiny-llama", "--out", out, "--calibration-tokens", "16", *args)
    assert got == code and message in stderr and "hint:" in stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_unknown_and_non_llama_models(run_cli, tmp_path):
    code, _, stderr = run_cli("compile", str(tmp_path / "missing"), "--out", tmp_path / "o")
    assert code == 3 and "does not exist" in stderr
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path / "bert")
    code, _, stderr = run_cli("compile", tmp_path / "bert", "--out", tmp_path / "o")
    assert code == 3 and "'bert' model, not a supported decoder-only family" in stderr
    assert not (tmp_path / "o").exists()


def test_unwritable_output(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run_cli("compile", "tiny-llama", "--out", blocker / "sub")
    assert code == 5 and "is not a directory, so" in stderr
    code, _, stderr = run_cli("compile", "tiny-llama", "--out", blocker)
    assert code == 5 and "not a directory" in stderr
    # a read-only filesystem: fails at write time, after compiling, and leaves nothing
    code, _, stderr = run_cli("compile", "tiny-llama", "--out", "/proc/hetune-test-bundle", "--calibration-tokens", "16")
    assert code == 5 and "could not write" in stderr
    assert not os.path.exists("/proc/hetune-test-bundle")


def test_inspect_damaged_bundle(run_cli, bundle_dir, tmp_path):
    code, _, stderr = run_cli("inspect", tmp_path)
    assert code == 5 and "not a hetune bundle" in stderr
    (tmp_path / "manifest.json").write_text("{not json")
    code, _, stderr = run_cli("inspect", tmp_path)
    assert code == 5 and "corrupted" in stderr


def test_error_exit_code_through_the_installed_entry_point(tmp_path):
    proc = subprocess.run([HETUNE, "compile", "tiny-llama", "--out", tmp_path / "o", "--bits-g", "40"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bits_g=40" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_runs_a_worker_and_refuses_a_damaged_bundle(micro_bundle, tmp_path):
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([HETUNE, "serve", str(micro_bundle), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/v2/info", timeout=1).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "worker did not come up"
                time.sleep(0.2)
        assert info["manifest"]["model"]["id"] == "micro-llama"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    result = subprocess.run([HETUNE, "serve", str(bad)], capture_output=True, text=True)
    assert result.returncode == 5 and "not a hetune bundle" in result.stderr


def test_quiet_by_default_and_verbose_on_demand(tmp_path):
    """Other libraries' notices ("No CUDA runtime is found" from torch, printed where CUDA_HOME is set) stay off
    the screen unless --verbose; the bundle is written into folders that did not exist."""
    noisy = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True, text=True).stderr
    args = ["compile", "micro-llama", "--out", str(tmp_path / "new" / "dir" / "b"), "--calibration-tokens", "16"]
    quiet = subprocess.run([HETUNE, *args], capture_output=True, text=True)
    assert quiet.returncode == 0 and "No CUDA runtime" not in quiet.stderr and (tmp_path / "new" / "dir" / "b" / "manifest.json").is_file()
    loud = subprocess.run([HETUNE, "--verbose", *args, "--overwrite"], capture_output=True, text=True)
    assert loud.returncode == 0 and ("No CUDA runtime" in loud.stderr) == ("No CUDA runtime" in noisy)


def test_help_renders_brackets():
    out = subprocess.run([HETUNE, "plan", "privtuner", "--help"], capture_output=True, text=True, check=True).stdout
    assert "[cell], [workload], one" in out and "[[owner]]" in out
