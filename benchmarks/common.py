"""What every benchmark records next to its numbers: code version, library versions, hardware."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path


def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {
        "git_sha": sha,
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("hetune", "torch", "brevitas", "concrete-ml", "concrete-ml-extensions", "transformers")},
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def write_json(path: Path, data: dict) -> None:
    """Atomic: a crashed benchmark never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read
    os.replace(tmp, path)
