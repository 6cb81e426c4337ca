"""Reading and writing worker bundles atomically and verifiably.

A bundle is a directory: ``manifest.json`` (shapes, bits, crypto parameters, file
hashes), ``weights.safetensors`` (integer weights and per-channel scales only) and
``report.json`` (quantization error and accumulator bits). It is assembled in a
temporary sibling directory and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from hetune.compile.manifest import Manifest, OpSpec
from hetune.errors import BundleError
from hetune.files import sha256_file
from hetune.quant.integer import IntegerLinear

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "report.json"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any heavy work if the bundle cannot be written where asked."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory", "choose another --out path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"{out} already exists and is not empty", "pass --overwrite or choose another --out path")
    parent = out.resolve().parent
    while not parent.exists():  # missing parents are created when the bundle is written
        parent = parent.parent
    if not parent.is_dir():
        raise BundleError(f"{parent} is not a directory, so {out} cannot be created under it", "choose another --out path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write to {parent} (permission denied)", "choose a writable --out path")


def write_bundle(out: Path, manifest: Manifest, tensors: dict[str, torch.Tensor], report: dict, overwrite: bool = False) -> Manifest:
    """Write atomically; returns the manifest with file hashes filled in."""
    from safetensors.torch import save_file

    out = Path(out)
    check_output_dir(out, overwrite)
    tmp = out.resolve().parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        files = {WEIGHTS_FILE: {"sha256": sha256_file(tmp / WEIGHTS_FILE), "bytes": (tmp / WEIGHTS_FILE).stat().st_size}}
        manifest = Manifest(**{**manifest.__dict__, "files": files})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if out.exists():
            old = out.resolve().parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as err:
        raise BundleError(f"could not write the bundle to {out}: {err}", "check free disk space and permissions") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    def op(self, name: str) -> IntegerLinear:
        spec = self.manifest.op(name)
        return IntegerLinear(self.tensors[spec.weight_key], spec.codec(self.tensors, self.manifest.quant))

    def report(self) -> dict:
        return json.loads((self.path / REPORT_FILE).read_text())


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist", "create one with: hetune compile MODEL --out DIR")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{path} has no {MANIFEST_FILE}; it is not a hetune bundle", "recompile: hetune compile MODEL --out DIR")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{mpath} is corrupted (not valid JSON: {err})", "recompile the bundle") from err
    if not isinstance(data, dict):
        raise BundleError(f"{mpath} is corrupted (not a JSON object)", "recompile the bundle")
    return Manifest.from_dict(data)


def _check_tensor(tensors: dict, key: str, shape: tuple, spec: OpSpec) -> None:
    if key not in tensors:
        raise BundleError(f"bundle weights lack {key} for op {spec.name}", "recompile the bundle")
    if tuple(tensors[key].shape) != shape:
        raise BundleError(f"{key} has shape {tuple(tensors[key].shape)}, manifest says {shape}", "recompile the bundle")


def load_bundle(path: Path, verify: bool = True, layers: range | None = None) -> Bundle:
    """Load and check a bundle: file sizes, sha256 (``verify``), tensor names and shapes.

    ``layers``: read only the ops of these decoder blocks (:meth:`Manifest.layer_slice`), so a
    worker that serves one slice of a model never holds the rest in memory.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    manifest = read_manifest(path)
    for name, meta in manifest.files.items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"bundle file {fpath} is missing", "copy the whole bundle directory, or recompile")
        size = fpath.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{fpath} is truncated or altered: {size} bytes, manifest says {meta['bytes']}", "copy the bundle again, or recompile")
        if verify and sha256_file(fpath) != meta["sha256"]:
            raise BundleError(f"{fpath} is corrupted: sha256 does not match the manifest", "copy the bundle again, or recompile")
    if layers is not None:
        manifest = manifest.layer_slice(layers)
    wanted = {spec.name for spec in manifest.ops}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:  # keys are "<op>.<tensor>"
            tensors = {k: f.get_tensor(k) for k in f.keys() if layers is None or k.rsplit(".", 1)[0] in wanted}
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{path / WEIGHTS_FILE} cannot be read: {err}", "copy the bundle again, or recompile") from err
    for spec in manifest.ops:
        _check_tensor(tensors, spec.weight_key, (spec.out_features, spec.in_features), spec)
        _check_tensor(tensors, spec.scale_key, (spec.out_features,), spec)
        if tensors[spec.weight_key].is_floating_point():
            raise BundleError(f"{spec.weight_key} holds floats; a bundle carries integer weights only", "recompile the bundle")
    return Bundle(path, manifest, tensors)
