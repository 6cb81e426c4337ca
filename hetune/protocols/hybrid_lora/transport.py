"""In-process transport for the ``encrypted`` backend: the worker's code, no network.

Goes through the same serialized bytes as the remote path, so the encrypted and remote
backends differ only in how the bytes travel.
"""

from __future__ import annotations

from hetune.compile.bundle import Bundle
from hetune.crypto import glwe
from hetune.protocols.hybrid_lora.worker import GlweWorker


class LocalTransport:
    name = "encrypted"

    def __init__(self, bundle: Bundle):
        self.worker = GlweWorker(bundle)
        self._compression_key = None

    def open(self, compression_key: bytes, param_set: str | None = None) -> None:
        self._compression_key = glwe.load_compression_key(compression_key)

    def in_features(self, op: str) -> int:
        return self.worker.shape(op, "forward").cols

    def run(self, op: str, direction: str, payload: bytes, rows: int, cols: int) -> bytes:
        return self.worker.run(op, direction, payload, self._compression_key)

    def close(self) -> None:
        self._compression_key = None
