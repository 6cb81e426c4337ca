"""The worker's computation: encrypted input times the bundle's clear integer weights.

Shared by the in-process ``encrypted`` backend and the HTTP server, so both run the
same code. Scheme-neutral: the session's scheme (:mod:`hetune.crypto.scheme`) does the
product. Imports neither transformers nor peft: the worker needs only the bundle.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from hetune.compile.bundle import Bundle
from hetune.crypto.scheme import ParamSet
from hetune.crypto.registry import get_scheme


@dataclass(frozen=True)
class OpShape:
    cols: int  # width of the encrypted input
    out_cols: int  # width of the result


def default_device() -> str:
    """The worker's GEMMs run on a GPU when one is present (float64 limbs), else on the CPU cores."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class OpRunner(Protocol):
    """What the HTTP server needs from whatever computes the products: a :class:`Worker` in this
    process, or a router over layer-range slices on other replicas (``ray_serve.SliceRouter``)."""

    device: str

    @property
    def ops(self) -> Collection[str]: ...

    def shape(self, op: str, direction: str) -> OpShape: ...

    def codec_tensors(self) -> dict[str, torch.Tensor]: ...

    def run(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> bytes: ...

    def run_stream(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> Iterator[bytes]: ...


class Worker:
    """Holds integer weights only; sees ciphertexts, shapes and timing, nothing else."""

    def __init__(self, bundle: Bundle, device: str | None = None):
        self.bundle = bundle
        self.device = device or default_device()
        self.weights = {spec.name: bundle.tensors[spec.weight_key] for spec in bundle.manifest.ops}  # (out, in)

    @property
    def ops(self) -> Collection[str]:
        return self.weights.keys()

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        """Public per-channel data the client decodes with: scales and row sums of W_q (no weights)."""
        tensors = {}
        for name in self.weights:
            spec, codec = self.bundle.manifest.op(name), self.bundle.op(name).codec
            tensors[spec.scale_key], tensors[spec.rowsum_key] = codec.scale, codec.rowsum
            if codec.static_input is not None:
                tensors.update(zip(spec.static_keys, (codec.static_input, codec.static_grad)))
        return tensors

    def shape(self, op: str, direction: str) -> OpShape:
        out, inp = self.weights[op].shape
        return OpShape(inp, out) if direction == "forward" else OpShape(out, inp)

    def run(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> bytes:
        """forward: Enc(X_q) (T, in) times W_q^T; backward: Enc(G_q) (T, out) times W_q."""
        w = self.weights[op]
        weight = w if direction == "forward" else w.T  # (n_out, n_in) of this product
        return get_scheme(params.scheme).multiply(params, session, body, weight, self.device)

    def accumulator(self, op: str, direction: str, params: ParamSet, session: object, header: bytes, rows: int, cols: int):
        """:meth:`run` fed its body a piece at a time as it arrives (the scheme's accumulator), or None: read it whole."""
        w = self.weights[op]
        return get_scheme(params.scheme).accumulator(params, session, header, rows, cols, w if direction == "forward" else w.T,
                                                     self.device)

    def run_stream(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> Iterator[bytes]:
        """:meth:`run`'s result in chunks, each computed when the last was taken: a hint (or a streamed result)
        is never held whole."""
        w = self.weights[op]
        return get_scheme(params.scheme).multiply_stream(params, session, body, w if direction == "forward" else w.T, self.device)
