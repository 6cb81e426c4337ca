"""HTTP transport for the ``remote`` backend: one or more workers serving the same bundle.

Ops are spread over the workers by decoder layer. A lost connection or a 5xx is
retried with exponential backoff, an expired session is re-opened once, and a worker
that stays away raises :class:`WorkerError` naming it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hetune.compile.manifest import Manifest
from hetune.errors import WorkerError
from hetune.protocols.hybrid_lora import wire
from hetune.quant.integer import OpCodec


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4  # after the first try; waits backoff_s * 2^attempt between tries
    backoff_s: float = 0.5
    timeout_s: float = 600.0  # one request; a big encrypted product takes minutes on CPU


DEFAULT_RETRY = RetryPolicy()


class WorkerClient:
    def __init__(self, url: str, retry: RetryPolicy | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.retry = retry or DEFAULT_RETRY
        self.http = httpx.Client(base_url=f"{self.url}/{wire.API_VERSION}", timeout=self.retry.timeout_s)
        self.session_id: str | None = None
        self._token: str | None = None
        self._key: bytes | None = None
        self._params = None  # the session's hetune.crypto.scheme.ParamSet

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.retry.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                problem = f"cannot reach worker {self.url}: {err}"
            else:
                if response.status_code < 500:
                    return response
                problem = f"worker {self.url} answered {response.status_code}"
            if attempt < self.retry.retries:
                time.sleep(self.retry.backoff_s * 2**attempt)
        raise WorkerError(problem, "check that `hetune serve` is running there, then resume from the last checkpoint")

    def _checked(self, response, what: str):
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise WorkerError(f"worker {self.url} refused {what}: {response.status_code} {detail}")
        return response

    def info(self) -> dict:
        return self._checked(self._request("GET", "/info"), "info").json()

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self._checked(self._request("GET", "/codec"), "codec").content)

    def open(self, params, session_key: bytes) -> None:
        """A new session for the keys' scheme and parameter set; ``session_key`` is b"" for batched RLWE."""
        self._key, self._params = session_key, params
        query = {"scheme": params.scheme, "param_set": params.name}
        data = self._checked(self._request("POST", "/sessions", content=session_key, params=query), "a new session").json()
        self.session_id, self._token = data["session_id"], data["token"]

    def run(self, op: str, direction: str, payload: bytes, rows: int, cols: int) -> tuple[bytes, float]:
        """The result body and the worker's seconds (its ``x-worker-seconds`` header)."""
        path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
        for reopened in (False, True):
            response = self._request(
                "POST", path, content=payload, params={"rows": rows, "cols": cols},
                headers={"authorization": f"Bearer {self._token}", "content-type": "application/octet-stream"},
            )
            if response.status_code == 404 and "session" in response.text and not reopened:
                self.open(self._params, self._key)  # the worker restarted or the session expired
                path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
                continue
            response = self._checked(response, f"{op} {direction}")
            return response.content, float(response.headers.get("x-worker-seconds", 0.0))
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.session_id:
            try:
                self.http.delete(f"/sessions/{self.session_id}", headers={"authorization": f"Bearer {self._token}"})
            except Exception:  # closing is best effort: the session expires anyway
                pass
        self.session_id = self._token = self._key = self._params = None
        self.http.close()


class HttpTransport:
    name = "remote"

    def __init__(self, urls: tuple[str, ...] | list[str]):
        self.clients = [WorkerClient(u) for u in urls]
        infos = [c.info() for c in self.clients]
        self.manifest = Manifest.from_dict(infos[0]["manifest"])
        for client, info in zip(self.clients[1:], infos[1:]):
            if info["manifest"]["model"]["weights_sha256"] != self.manifest.model.weights_sha256:
                raise WorkerError(f"worker {client.url} serves a different bundle than {self.clients[0].url}")
        self._by_op = {op.name: self.clients[max(op.layer, 0) % len(self.clients)] for op in self.manifest.ops}

    def codecs(self) -> dict[str, OpCodec]:
        tensors = self.clients[0].codec_tensors()
        q = self.manifest.quant
        return {
            op.name: OpCodec(tensors[f"{op.name}.scale"], tensors[f"{op.name}.rowsum"], q.bits_a, q.bits_g,
                             tensors.get(f"{op.name}.static_input"), tensors.get(f"{op.name}.static_grad"))
            for op in self.manifest.ops
        }

    def check_model(self, model: torch.nn.Module) -> None:
        """The client's model must have the architecture the bundle was compiled from."""
        for key, value in self.manifest.model.config.items():
            mine = getattr(model.config, key, None)
            if mine is not None and mine != value:
                raise WorkerError(
                    f"the worker's bundle was compiled for {key}={value}, the local model has {mine}",
                    f"use the model the bundle was compiled from ({self.manifest.model.id})",
                )

    def in_features(self, op: str) -> int:
        return self.manifest.op(op).in_features

    def default_params(self):
        from hetune.crypto.scheme import resolve_params

        return resolve_params(self.manifest.crypto["scheme"], self.manifest.crypto["param_set"])

    def open(self, params, session_key: bytes) -> None:
        for client in self.clients:
            client.open(params, session_key)

    def run(self, op: str, direction: str, payload: bytes, rows: int, cols: int) -> tuple[bytes, float]:
        return self._by_op[op].run(op, direction, payload, rows, cols)

    def close(self) -> None:
        for client in self.clients:
            client.close()
