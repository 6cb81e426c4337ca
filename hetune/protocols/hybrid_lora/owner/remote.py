"""HTTP transport for the ``remote`` backend: one or more workers serving the same bundle.

Ops are spread over the workers by decoder layer. Retries, TLS, the API key, response
caps and error mapping are the shared client's (:mod:`hetune.net.client`); here: an
expired session is re-opened once, each op's result is capped by its shape, and a
malformed manifest or codec raises WorkerError instead of an uncaught exception.
"""

from __future__ import annotations

import torch

from hetune.compile.manifest import Manifest
from hetune.crypto.registry import get_scheme
from hetune.errors import HetuneError, WorkerError
from hetune.net.client import API_KEY_ENV, API_KEY_HINT, MAX_INFO_BYTES, HttpClient, RetryPolicy, Sink, WorkerAccess  # noqa: F401  (re-exported)
from hetune.protocols.hybrid_lora import wire
from hetune.quant.integer import OpCodec

DEFAULT_RETRY = RetryPolicy()
RESULT_BYTES_FACTOR = 16  # result <= this x a request of its shape (RLWE: 2 values of <= 8 bytes per 6-byte input; GLWE: 0.7-1.3x measured)


class WorkerClient(HttpClient):
    """One worker of the core protocol: its status, codec, a session for the owner's keys, and op products."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, access: WorkerAccess | None = None):
        super().__init__(url, wire.API_VERSION, retry or DEFAULT_RETRY, access)
        self.session_id: str | None = None
        self._token: str | None = None
        self._key: bytes | None = None
        self._params = None  # the session's hetune.crypto.scheme.ParamSet
        self.fingerprint: str | None = None  # outsourced_sha256 the data owner verified; each session must report it

    def info(self) -> dict:
        response = self._checked(self._request("GET", "/info", headers=self._access.headers()), "info", self._key_hint(401))
        return self._json(response, "info", ("manifest",))

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        response = self._checked(self._request("GET", "/codec", headers=self._access.headers()), "codec")
        try:
            return load(response.content)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise self._malformed("codec", err) from None

    @staticmethod
    def _key_hint(status: int) -> str | None:
        return API_KEY_HINT if status == 401 else None

    def open(self, params, session_key: bytes) -> None:
        """A new session for the keys' scheme and parameter set; ``session_key`` is b"" for batched RLWE."""
        self._key, self._params = session_key, params
        query = {"scheme": params.scheme, "param_set": params.name}
        response = self._request("POST", "/sessions", content=session_key, params=query, headers=self._access.headers())
        data = self._session(self._checked(response, "a new session", self._key_hint(response.status_code)))
        served = data.get("outsourced_sha256")
        if self.fingerprint is not None and served != self.fingerprint:  # e.g. restarted on another bundle since /info
            self.close_session(data["session_id"], data["token"])
            raise WorkerError(f"worker {self.url} opened a session on other weights (outsourced weights sha256 "
                              f"{str(served)[:12]}) than the bundle checked against the local model ({self.fingerprint[:12]})",
                              "serve the bundle compiled from your model on that worker, then rerun (with --resume if a run had started)")
        self.session_id, self._token = data["session_id"], data["token"]

    def run(self, op: str, direction: str, payload, rows: int, cols: int, max_bytes: int = MAX_INFO_BYTES,
            sink: Sink | None = None) -> tuple[bytes, float]:
        """The result body (at most ``max_bytes``) and the worker's seconds (its ``x-worker-seconds`` header);
        ``payload``: bytes, or a callable that makes a fresh request body for each try. With ``sink`` the worker
        streams the result into it as it is computed (body b"", seconds 0: a streamed RLWE result ends with them)."""
        path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
        query = {"rows": rows, "cols": cols, **({"stream": "true"} if sink is not None else {})}
        for reopened in (False, True):
            body = payload() if callable(payload) else payload
            headers = {"authorization": f"Bearer {self._token}", "content-type": "application/octet-stream"}
            if not isinstance(body, bytes):  # made as it is sent (pipelined): its exact size up front, not chunked
                headers["content-length"] = str(get_scheme(self._params.scheme).request_bytes(self._params, rows, cols))
            response = self._request(
                "POST", path, max_bytes=max_bytes, content=body,
                remake=payload if callable(payload) else None, sink=sink, params=query, headers=headers,
            )
            if response.status_code == 404 and "session" in response.text and not reopened:
                self.open(self._params, self._key)  # the worker restarted or the session expired
                path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
                continue
            response = self._checked(response, f"{op} {direction}")
            try:
                seconds = float(response.headers.get("x-worker-seconds", 0.0))
            except ValueError:
                seconds = 0.0  # a timing header is for statistics only
            return response.content, seconds
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.session_id:
            self.close_session(self.session_id, self._token)
        self.session_id = self._token = self._key = self._params = None
        self.http.close()


class HttpTransport:
    name = "remote"

    def __init__(self, urls: tuple[str, ...] | list[str], access: WorkerAccess | None = None):
        self.clients = [WorkerClient(u, access=access) for u in urls]
        infos = [c.info() for c in self.clients]
        manifests = []
        for client, info in zip(self.clients, infos):
            try:
                manifests.append(Manifest.from_dict(info["manifest"]))
            except (KeyError, TypeError, ValueError, AttributeError, HetuneError) as err:
                raise client._malformed("manifest", err) from None
        self.manifest = manifests[0]
        for client, manifest in zip(self.clients[1:], manifests[1:]):
            if manifest.model.weights_sha256 != self.manifest.model.weights_sha256:
                raise WorkerError(f"worker {client.url} serves a different bundle than {self.clients[0].url}")
        self._by_op = {op.name: self.clients[max(op.layer, 0) % len(self.clients)] for op in self.manifest.ops}

    def codecs(self) -> dict[str, OpCodec]:
        tensors = self.clients[0].codec_tensors()
        for op in self.manifest.ops:
            for name in (op.scale_key, op.rowsum_key):
                if name not in tensors or tuple(tensors[name].shape) != (op.out_features,):
                    raise self.clients[0]._malformed("codec", ValueError(f"{name} is missing or not of shape ({op.out_features},)"))
        return {op.name: op.codec(tensors, self.manifest.quant) for op in self.manifest.ops}

    def verified(self, fingerprint: str) -> None:
        """The data owner checked the manifest's weights against its model: every session must serve these."""
        for client in self.clients:
            client.fingerprint = fingerprint

    def in_features(self, op: str) -> int:
        return self.manifest.op(op).in_features

    def resolve_session(self, scheme: str | None, param_set: str | None):
        return self.manifest.crypto.resolve_session(scheme, param_set)

    def open(self, params, session_key: bytes) -> None:
        for client in self.clients:
            client.open(params, session_key)

    @property
    def weights_sha256(self) -> str:
        return self.manifest.model.weights_sha256

    def run(self, op: str, direction: str, payload, rows: int, cols: int, sink: Sink | None = None) -> tuple[bytes, float]:
        client = self._by_op[op]
        spec = self.manifest.op(op)
        out_cols = spec.out_features if direction == "forward" else spec.in_features
        params = client._params
        cap = RESULT_BYTES_FACTOR * get_scheme(params.scheme).request_bytes(params, rows, out_cols) + 2**16
        return client.run(op, direction, payload, rows, cols, cap, sink)

    def close(self) -> None:
        for client in self.clients:
            client.close()
