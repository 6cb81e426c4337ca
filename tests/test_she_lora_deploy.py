"""Real deployment on loopback: SuperLink + 2 SuperNodes + `flwr run` of deploy/she-lora (slow, ~75 s)."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports (checked once; a race is possible but unlikely)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no block of free ports")


@pytest.mark.slow
def test_loopback_deployment_runs_one_encrypted_round(tmp_path):
    base = _free_port_block(3)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "LINK_PORT": str(base), "NODE_PORT": str(base + 1)}
    proc = subprocess.run(["bash", str(ROOT / "deploy/she-lora/loopback.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SHE-LoRA: 2 clients registered" in out, out[-3000:]
    row = re.search(r"SHE-LoRA round 1: (\{.*\})", out)
    assert row, out[-3000:]
    assert "'clients_accepted': 2" in row.group(1) and re.search(r"'ciphertexts_up': [1-9]", row.group(1))
    assert "rejected" not in out
