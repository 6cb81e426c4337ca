"""A client's link to the body server, and the autograd function that puts it in a graph.

``tail(RemoteBody(link)(head(x)))`` makes ``loss.backward()`` do the split backward: the
gradient at the body output goes up, the gradient at the body input comes back and
flows on into the head and the prompts. Bytes are counted by kind from the exact
request and response bodies.
"""

from __future__ import annotations

from collections import Counter

import torch

from hetune.errors import WorkerError
from hetune.net.client import HttpClient, RetryPolicy
from hetune.protocols.sfprompt import wire

# A round cannot wait long for one client: one quick retry, then the client is dropped.
SPLIT_RETRY = RetryPolicy(retries=1, backoff_s=0.2, timeout_s=120.0)
RESPONSE_SLACK = 4096  # bytes a safetensors header of the same shape may differ by, at most
_HINT = "check that the body server is running and reachable; this client is dropped from the round"


class BodyClient(HttpClient):
    """Session, split forward / backward and byte counts; retries, caps and errors come from the shared client."""

    def __init__(self, url: str, access_token: str, retry: RetryPolicy = SPLIT_RETRY):
        super().__init__(url, wire.API_VERSION, retry, down_hint=_HINT)
        self._access_token = access_token
        self.session_id: str | None = None
        self._token: str | None = None
        self.bytes: Counter = Counter()

    def open(self) -> None:
        """A session on the body server, admitted by the federation's access token."""
        try:
            response = self._request("POST", "/sessions", headers={"authorization": f"Bearer {self._access_token}"})
            data = self._session(self._checked(response, "a new session"))
        except WorkerError as err:
            raise WorkerError(err.message, _HINT) from err
        self.session_id, self._token = data["session_id"], data["token"]

    def _exchange(self, direction: str, name: str, tensor: torch.Tensor, step: int, keep: bool = True) -> torch.Tensor:
        payload = wire.pack(name, tensor)
        try:
            response = self._checked(self._request(
                "POST", f"/sessions/{self.session_id}/{direction}", content=payload, params={"step": step, "keep": keep},
                max_bytes=len(payload) + RESPONSE_SLACK,  # the answer has the request's shape and dtype
                headers={"authorization": f"Bearer {self._token}", "content-type": wire.MEDIA_TYPE},
            ), f"split {direction} (step {step})")
            result = wire.unpack(name, response.content)
        except wire.WireFormatError as err:
            raise WorkerError(f"body server {self.url} answered split {direction} with a malformed payload: {err}", _HINT) from err
        except WorkerError as err:
            raise WorkerError(err.message, _HINT) from err
        up, down = ("activations_up", "activations_down") if direction == "forward" else ("gradients_up", "gradients_down")
        self.bytes[up] += len(payload)
        self.bytes[down] += len(response.content)
        return result

    def forward(self, h: torch.Tensor, step: int, keep: bool = True) -> torch.Tensor:
        return self._exchange("forward", "h", h, step, keep)  # (B, L, D) -> (B, L, D)

    def backward(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        return self._exchange("backward", "g", grad, step)  # dL/d(body out) -> dL/d(body in)

    def close(self) -> None:
        if self.session_id:
            self.close_session(self.session_id, self._token)
        self.session_id = self._token = None
        self.http.close()


class _RemoteBodyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, link: BodyClient, step: int):
        ctx.link, ctx.step = link, step
        return link.forward(h, step, keep=True)

    @staticmethod
    def backward(ctx, grad):
        return ctx.link.backward(grad.contiguous(), ctx.step), None, None


class RemoteBody:
    """Callable standing in for the local body; numbers its forwards so each backward finds its own."""

    def __init__(self, link: BodyClient):
        self.link = link
        self.step = 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if not (torch.is_grad_enabled() and h.requires_grad):
            return self.link.forward(h, self.step, keep=False)  # evaluation: the server keeps nothing
        return _RemoteBodyFunction.apply(h, self.link, self.step)
