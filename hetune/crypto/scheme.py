"""One interface for encryption schemes, and the registry that names them.

A scheme is what the data owner and the worker agree on to compute ``X W^T`` on
encrypted ``X``: its parameter sets (each with its security estimate and source, result
budget, exactness, key and ciphertext sizes), the data owner's keys (encrypt to bytes,
decrypt from bytes: :class:`ClientKeys`, made by :mod:`hetune.crypto.keys`), and the
worker's product (request bytes times a clear integer weight: :class:`Scheme`).
Backends, transports, the server and ``compile`` talk only to these interfaces; the
registry that names schemes is :mod:`hetune.crypto.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hetune.crypto.security import SecurityEstimate
from hetune.errors import ConfigError, HetuneError

class PayloadError(HetuneError):
    """A request or result body is malformed, truncated, or for another scheme or set; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ParamSet:
    """Everything a client, a worker and ``compile`` need to know about one parameter set."""

    scheme: str
    name: str
    security: SecurityEstimate
    security_source: str
    budget_bits: int  # signed bits of a result that decrypt correctly: |raw| < 2^(budget_bits - 1)
    exact: bool  # decrypted results equal the integer product (else within noise_bound)
    noise_bound: int  # absolute error bound of a decrypted result; 0 when exact
    session_key_bytes: int  # uploaded when a session opens (0: no evaluation key)
    poly_size: int
    max_weight_l2: float | None  # largest L2 norm of a weight row the noise analysis allows (None: no limit)

    def describe(self) -> dict:
        return {**asdict(self), "security": asdict(self.security)}

    def check_op(self, forward_l2: float, backward_l2: float, acc_bits: int) -> str | None:
        """Why an op with these weight norms and worst-case accumulator cannot run here, or None."""
        if acc_bits > self.budget_bits:
            return f"needs {acc_bits} accumulator bits, {self.scheme}/{self.name} decrypts {self.budget_bits}"
        worst = max(forward_l2, backward_l2)
        if self.max_weight_l2 is not None and worst > self.max_weight_l2:
            return (f"weight L2 norm {worst:.0f} exceeds the {self.max_weight_l2:.0f} that keeps "
                    f"{self.scheme}/{self.name} decryption failures below 2^-100")
        return None


class ClientKeys(ABC):
    """The data owner's keys for one parameter set. The secret never leaves this object unless saved."""

    params: ParamSet

    @abstractmethod
    def session_key(self) -> bytes:
        """Public material the worker needs (an evaluation key), or b"" when it needs none."""

    @abstractmethod
    def encrypt(self, q: np.ndarray | torch.Tensor) -> bytes:
        """q: (T, k) integers -> request body."""

    @abstractmethod
    def decrypt(self, result: bytes, rows: int, cols: int) -> np.ndarray:
        """Result body -> (rows, cols) int64."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the secret key (mode 0600), only when the user asks for it."""


class Scheme(ABC):
    name: str
    param_sets: tuple[str, ...]
    default_param_set: str
    header_bytes: int = 0  # a request's fixed header, read before :meth:`accumulator` is asked (0: none)

    @abstractmethod
    def params(self, name: str) -> ParamSet: ...

    @abstractmethod
    def open_session(self, params: ParamSet, key: bytes) -> object:
        """The worker's per-session state from the uploaded key; raises PayloadError if it is malformed."""

    @abstractmethod
    def request_bytes(self, params: ParamSet, rows: int, cols: int) -> int:
        """Exact size of a request body of ``rows`` x ``cols`` integers."""

    @abstractmethod
    def check_request(self, params: ParamSet, body: bytes, rows: int, cols: int) -> None:
        """Raise PayloadError unless ``body`` is a well-formed request of that shape (cheap; before any product)."""

    @abstractmethod
    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor, device: str = "cpu") -> bytes:
        """Worker side: Enc(X) (T, n_in) times the clear integer weight (n_out, n_in)^T -> result body, computed on ``device``."""

    def multiply_stream(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor,
                        device: str = "cpu") -> Iterator[bytes]:
        """:meth:`multiply`'s result in pieces, each computed when the last was taken (bounded memory); here in one piece."""
        yield self.multiply(params, session, body, weight, device)

    def accumulator(self, params: ParamSet, session: object, header: bytes, rows: int | None, cols: int | None,
                    weight: torch.Tensor, device: str = "cpu"):
        """A product fed its request body a piece at a time as it arrives (``feed_bytes``, ``feed``, ``results``,
        ``seconds``), given the body's first :attr:`header_bytes`; None: this scheme (or this request)
        needs the whole body first (:meth:`multiply`)."""
        return None

    def product_bytes(self, params: ParamSet, rows: int, out_cols: int, in_cols: int) -> int:
        """At most what :meth:`accumulator` holds for a ``rows`` x ``in_cols`` -> ``out_cols`` product (0: no accumulator)."""
        return 0

    def wire_bytes(self, params: ParamSet, forward_l2: float, backward_l2: float) -> dict:
        """Bytes per value each direction of an op puts on the wire, from its weight norms; {} when not norm-driven."""
        return {}

    def resolve(self, param_set: str | None) -> ParamSet:
        return self.params(param_set or self.default_param_set)

    def unknown_set(self, name: str) -> ConfigError:
        return ConfigError(f"parameter set {name!r} is not allow-listed for scheme {self.name!r}",
                           f"choose one of {', '.join(self.param_sets)} (see `hetune plan params`)")
