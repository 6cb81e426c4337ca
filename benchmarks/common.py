"""What every benchmark records next to its numbers: code version, library versions, hardware."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import version

from hetune.files import write_json  # noqa: F401  (the benchmarks write their results with it)


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


def timed(fn):
    """(fn's result, its wall seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
