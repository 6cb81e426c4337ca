"""One interface for encryption schemes, and the registry that names them.

A scheme is what the data owner and the worker agree on to compute ``X W^T`` on
encrypted ``X``: its parameter sets (each with its security estimate and source, result
budget, exactness, key and ciphertext sizes), the data owner's keys (encrypt to bytes,
decrypt from bytes), and the worker's product (request bytes times a clear integer
weight). Backends, transports, the server and ``compile`` talk only to this interface,
so a scheme is one module and one :func:`register_scheme` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hetune.crypto.security import SecurityEstimate
from hetune.errors import ConfigError, HetuneError

DEFAULT_SCHEME = "rlwe"


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

    @abstractmethod
    def params(self, name: str) -> ParamSet: ...

    @abstractmethod
    def generate_keys(self, param_set: str | None = None) -> ClientKeys: ...

    @abstractmethod
    def load_keys(self, path: Path) -> ClientKeys: ...

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
    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor) -> bytes:
        """Worker side: Enc(X) (T, n_in) times the clear integer weight (n_out, n_in)^T -> result body."""

    def resolve(self, param_set: str | None) -> ParamSet:
        return self.params(param_set or self.default_param_set)

    def unknown_set(self, name: str) -> ConfigError:
        return ConfigError(f"parameter set {name!r} is not allow-listed for scheme {self.name!r}",
                           f"choose one of {', '.join(self.param_sets)} (see `hetune plan params`)")


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    if not scheme.name.isidentifier() or scheme.name in _SCHEMES:
        raise ValueError(f"scheme name {scheme.name!r} is invalid or already registered")
    if scheme.default_param_set not in scheme.param_sets:
        raise ValueError(f"{scheme.name}: default set {scheme.default_param_set!r} is not one of its sets")
    _SCHEMES[scheme.name] = scheme
    return scheme


def _load_builtin() -> None:
    from hetune.crypto import glwe, rlwe  # noqa: F401  (importing a scheme module registers it)


def scheme_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_SCHEMES)


def get_scheme(name: str | None = None) -> Scheme:
    """The registered scheme (default: batched RLWE); ConfigError naming the choices otherwise."""
    _load_builtin()
    name = name or DEFAULT_SCHEME
    if name not in _SCHEMES:
        raise ConfigError(f"encryption scheme {name!r} is unknown", f"choose one of {', '.join(_SCHEMES)}")
    return _SCHEMES[name]


def resolve_params(scheme: str | None, param_set: str | None) -> ParamSet:
    return get_scheme(scheme).resolve(param_set)


def describe_param_sets() -> str:
    """One line per registered scheme and allow-listed set: security, ring degree, budget, exactness, sizes."""
    lines = [f"{'scheme':<6} {'set':<5} {'bits':>5} {'N':>5} {'budget':>6} {'result':>10} {'session key':>11} {'B/input value':>13}"]
    for name in scheme_names():
        scheme = get_scheme(name)
        for set_name in scheme.param_sets:
            p = scheme.params(set_name)
            mark = "*" if p.security.extrapolated else ""
            n = p.poly_size
            per_value = (scheme.request_bytes(p, n, n) - scheme.request_bytes(p, n, 0)) / (n * n)
            result = "exact" if p.exact else f"+-{p.noise_bound}"
            default = " (default)" if name == DEFAULT_SCHEME and set_name == scheme.default_param_set else ""
            lines.append(f"{name:<6} {set_name:<5} {p.security.bits:>4}{mark:1} {p.poly_size:>5} {p.budget_bits:>4} b "
                         f"{result:>10} {p.session_key_bytes / 2**20:>7.0f} MiB {per_value:>13.2f}{default}")
    lines.append("bits: largest lattice-estimator curve level met (Zama's security curves, q = 2^64, binary secrets);")
    lines.append("* dimension beyond the curves' fitted range (n <= 2048): extrapolated, cross-checked with the HE standard")
    return "\n".join(lines)
