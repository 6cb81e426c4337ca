"""The worker's computation: encrypted input times the bundle's clear integer weights.

Shared by the in-process ``encrypted`` backend and the HTTP server, so both run the
same code. Imports neither transformers nor peft: the worker needs only the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetune.compile.bundle import Bundle
from hetune.crypto import glwe


@dataclass(frozen=True)
class OpShape:
    cols: int  # width of the encrypted input
    out_cols: int  # width of the result


class GlweWorker:
    """Holds integer weights only; sees ciphertexts, shapes and timing, nothing else."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.weights = {spec.name: bundle.tensors[spec.weight_key] for spec in bundle.manifest.ops}  # (out, in)

    def shape(self, op: str, direction: str) -> OpShape:
        out, inp = self.weights[op].shape
        return OpShape(inp, out) if direction == "forward" else OpShape(out, inp)

    def run(self, op: str, direction: str, payload: bytes, compression_key: object) -> bytes:
        w = self.weights[op].numpy()
        # forward: Enc(X_q) (T, in) @ W_q^T (in, out); backward: Enc(G_q) (T, out) @ W_q (out, in)
        clear = np.ascontiguousarray(w.T if direction == "forward" else w)
        ciphertext = glwe.ciphertext_from_bytes(payload)
        return bytes(glwe.encrypted_matmul(ciphertext, clear, compression_key).serialize())
