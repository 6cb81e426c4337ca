"""Real text that is already on every machine: the Python standard library's own sources.

No one here wrote it and nothing has to be downloaded, so it serves for calibration
activations and for pretraining the tiny base model.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_text(max_chars: int, skip_chars: int = 0) -> str:
    """Concatenated stdlib sources, deterministic order, ``max_chars`` after ``skip_chars``."""
    parts, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars + skip_chars:
            break
    return "".join(parts)[skip_chars : skip_chars + max_chars]
