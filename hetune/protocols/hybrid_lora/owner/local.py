"""In-process transport for the ``encrypted`` backend: the worker's code, no network.

Goes through the same serialized bytes and the same checks as the remote path, so the
encrypted and remote backends differ only in how the bytes travel.
"""

from __future__ import annotations

import time

from hetune.compile.bundle import Bundle
from hetune.crypto.scheme import ParamSet
from hetune.crypto.registry import get_scheme
from hetune.errors import ConfigError
from hetune.protocols.hybrid_lora.worker.runner import Worker


class LocalTransport:
    name = "encrypted"

    def __init__(self, bundle: Bundle):
        self.worker = Worker(bundle)
        self._params: ParamSet | None = None
        self._session: object = None

    def resolve_session(self, scheme: str | None, param_set: str | None) -> ParamSet:
        return self.worker.bundle.manifest.crypto.resolve_session(scheme, param_set)

    def open(self, params: ParamSet, session_key: bytes) -> None:
        refusal = self.worker.bundle.manifest.session_refusal(params)
        if refusal:
            raise ConfigError(refusal)
        self._session = get_scheme(params.scheme).open_session(params, session_key)
        self._params = params

    def in_features(self, op: str) -> int:
        return self.worker.shape(op, "forward").cols

    @property
    def weights_sha256(self) -> str:
        return self.worker.bundle.manifest.model.weights_sha256

    def run(self, op: str, direction: str, payload, rows: int, cols: int, sink=None) -> tuple[bytes, float]:
        """The result body and the worker's seconds; ``payload``: bytes, or a callable that makes them.
        With ``sink`` (see remote.Sink) the result goes there chunk by chunk as it is computed (body b"")."""
        payload = payload() if callable(payload) else payload
        if not isinstance(payload, bytes):  # a pipelined body: the worker's product needs all of it
            payload = b"".join(payload)
        get_scheme(self._params.scheme).check_request(self._params, payload, rows, cols)
        t0 = time.perf_counter()
        if sink is None:
            result = self.worker.run(op, direction, self._params, self._session, payload)
            return result, time.perf_counter() - t0
        sink.begin()
        worker_s = 0.0
        chunks = self.worker.run_stream(op, direction, self._params, self._session, payload)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            worker_s += time.perf_counter() - t0
            if chunk is None:
                return b"", worker_s
            sink.write(chunk)

    def close(self) -> None:
        self._params = self._session = None
