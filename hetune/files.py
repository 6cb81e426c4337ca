"""Atomic output files: written to a temp file beside the target, then renamed.

A crash, Ctrl-C or bad input never leaves half a result, metrics file or plot where a
reader expects a whole one; the previous version stays until the new one is complete.
``sha256_file`` hashes a file in chunks (bundle files, packaged model files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path | str, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` (parents created) with permissions ``mode``."""
    with open_atomic(path, mode) as (fh, _):
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def open_atomic(path: Path | str, mode: int = 0o644) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file beside ``path`` (parents created) and its path, to write in pieces (a streamed download);
    renamed to ``path`` with permissions ``mode`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, Path(tmp)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomic(path: Path | str, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` fill a fresh ``.NAME.partial`` directory beside ``path``, then rename it to ``path``.

    A failure (full disk, no permission) removes the partial directory; a kill leaves it under
    its temp name, where the next write clears it. An existing ``path`` is replaced only once
    the new one is whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_json(path: Path | str, data, indent: int = 1) -> Path:
    """JSON (paths and other non-JSON values as strings), atomically."""
    return write_atomic(path, json.dumps(data, indent=indent, default=str))


def save_figure(fig, path: Path | str, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
