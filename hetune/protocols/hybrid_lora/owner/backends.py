"""One interface for every way of computing the frozen products: plain, quantized, encrypted, remote.

A backend maps ``(op, x) -> x W^T`` and ``(op, g) -> g W`` for the outsourced ops. The
training code never knows which one it talks to. What a backend needs (a bundle, a
worker) is checked when it is built, so a missing piece fails before the first step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hetune.crypto.scheme import ClientKeys, PayloadError
from hetune.errors import ConfigError, WorkerError
from hetune.quant.integer import OpCodec
from hetune.quant.tokens import TokenQuant

BACKENDS = ("plain", "quantized", "encrypted", "remote")


@dataclass
class TransferStats:
    round_trips: int = 0
    values_out: int = 0  # output values computed by the worker
    bytes_sent: int = 0
    bytes_received: int = 0
    hint_bytes: int = 0  # fixed masks: hints downloaded (once per op, direction and block; cached on disk)
    encrypt_s: float = 0.0  # client: quantized integers -> request bodies
    decrypt_s: float = 0.0  # client: result bodies -> integers
    transport_s: float = 0.0  # from request sent to result received (worker + transfer)
    worker_s: float = 0.0  # the worker's product alone, as it reports it

    def snapshot(self) -> dict:
        return dict(self.__dict__)


class _Counting:
    """A sink that counts the bytes of the last try (a retry starts it afresh) and passes them on."""

    def __init__(self, sink):
        self.sink, self.bytes = sink, 0

    def begin(self) -> None:
        self.sink.begin()
        self.bytes = 0

    def write(self, chunk: bytes) -> None:
        self.sink.write(chunk)
        self.bytes += len(chunk)


class FrozenBackend:
    """Frozen linear products of the outsourced ops; float in, float64 out."""

    name = "abstract"
    encrypted = False  # whether products go through an encryption scheme (and a secret key exists)

    def __init__(self) -> None:
        self.stats = TransferStats()

    def forward(self, op: str, x: torch.Tensor) -> torch.Tensor:  # (T, in) -> (T, out)
        raise NotImplementedError

    def backward(self, op: str, g: torch.Tensor) -> torch.Tensor:  # (T, out) -> (T, in)
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions and keys."""


class PlainBackend(FrozenBackend):
    """Float reference: the model's own weights (fused rows stacked like the bundle's ops)."""

    name = "plain"

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = {k: w.detach().to(torch.float64) for k, w in weights.items()}

    def forward(self, op, x):
        return x.to(torch.float64) @ self.weights[op].T

    def backward(self, op, g):
        return g.to(torch.float64) @ self.weights[op]


class QuantizedBackend(FrozenBackend):
    """The worker's integer arithmetic in the clear: bit-exact, fast, for long runs."""

    name = "quantized"

    def __init__(self, ops: dict):  # op name -> IntegerLinear
        super().__init__()
        self.ops = ops

    def forward(self, op, x):
        self._count(x.shape[0] * self.ops[op].out_features)
        return self.ops[op].forward(x)

    def backward(self, op, g):
        self._count(g.shape[0] * self.ops[op].in_features)
        return self.ops[op].backward(g)

    def _count(self, values: int) -> None:
        """Same counts an encrypted run would have."""
        self.stats.round_trips += 1
        self.stats.values_out += values


class EncryptedBackend(FrozenBackend):
    """Quantize per token, encrypt, let a worker multiply, decrypt, decode.

    ``transport`` runs the worker's product: in this process (``encrypted``) or over
    HTTP (``remote``). ``keys`` are a scheme's :class:`~hetune.crypto.scheme.ClientKeys`;
    the secret key never leaves them. With an exact scheme the decrypted integers are the clear
    product's, so this backend equals ``quantized`` bit for bit.
    """

    encrypted = True

    def __init__(self, codecs: dict[str, OpCodec], transport, keys: ClientKeys):
        super().__init__()
        self.codecs = codecs
        self.transport = transport
        self.keys = keys
        self.name = transport.name
        transport.open(keys.params, keys.session_key())
        self.fixed_masks = getattr(keys, "fixed_masks", False)  # fixed masks, a fresh secret per call (the hint)
        if self.fixed_masks:
            keys.attach(transport.weights_sha256, self._fetch_hint)

    def prefetch_hints(self, tokens: int) -> None:
        """Fixed masks: fetch (or check in the cache) every op's hints for steps of up to ``tokens`` tokens now,
        instead of during the first step."""
        n = self.keys.params.poly_size
        for op, codec in self.codecs.items():
            n_in, n_out = self.transport.in_features(op), codec.out_features
            for direction, (cols, out) in (("forward", (n_in, n_out)), ("backward", (n_out, n_in))):
                for block in range(-(-tokens // n)):
                    self.keys.cache.values(op, direction, block, cols, out)

    def _fetch_hint(self, op: str, direction: str, query: bytes, rows: int, cols: int, sink) -> None:
        """The hint streamed into ``sink`` (the cache's temp file) as the worker computes it: never held whole."""
        counted = _Counting(sink)
        self.transport.run(op, direction, query, rows=rows, cols=cols, sink=counted)
        self.stats.hint_bytes += counted.bytes

    def _decrypt(self, result: bytes, rows: int, out_cols: int, cols: int, call=None):
        """The result's integers (under ``call``'s fresh secret with fixed masks), or PayloadError for a body that
        is not a well-formed result of this shape. A GLWE result the extension cannot read panics in Rust (a
        BaseException): caught too."""
        try:
            if call is not None:
                return call.decrypt(result, rows, out_cols, cols)
            return self.keys.decrypt(result, rows, out_cols)
        except PayloadError:
            raise
        except BaseException as err:  # noqa: BLE001 - pyo3 panics derive from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise PayloadError(f"result cannot be decrypted ({type(err).__name__})") from None

    def _round_trip(self, op: str, direction: str, tq: TokenQuant, out_cols: int) -> torch.Tensor:
        rows, cols = tq.q.shape
        st, q = self.stats, tq.q.to(torch.int64)
        calls, sent, enc_s = [], [], []

        def payload() -> bytes:  # each try (a retry, a reopened session) encrypts afresh, never resends
            t = time.perf_counter()
            if self.fixed_masks:
                calls.append(self.keys.new_call(op, direction))  # a fresh secret per call
                sent.append(calls[-1].encrypt(q))
            else:
                sent.append(self.keys.encrypt(q))
            enc_s.append(time.perf_counter() - t)
            return sent[-1]

        t1 = time.perf_counter()
        for attempt in (1, 2):  # a malformed result is asked for once more (re-encrypted), then the run stops
            result, worker_s = self.transport.run(op, direction, payload, rows=rows, cols=cols)
            t2 = time.perf_counter()
            try:
                raw = self._decrypt(result, rows, out_cols, cols, calls[-1] if self.fixed_masks else None)
                break
            except PayloadError as err:
                if attempt == 2:
                    raise WorkerError(f"the worker's result for {op} {direction} ({rows}x{out_cols}) is malformed, twice: {err.message}",
                                      "the worker may be faulty or not a hetune worker of this version; "
                                      "the last checkpoint is intact: rerun with --resume once it is fixed") from None
        st.encrypt_s, st.decrypt_s = st.encrypt_s + sum(enc_s), st.decrypt_s + time.perf_counter() - t2
        st.transport_s += t2 - t1 - sum(enc_s)
        st.worker_s += worker_s
        st.round_trips += 1
        st.values_out += rows * out_cols
        st.bytes_sent += len(sent[-1])
        st.bytes_received += len(result)
        return torch.from_numpy(raw).to(torch.float64)

    def forward(self, op, x):
        codec = self.codecs[op]
        tq = codec.encode_input(x)
        return codec.decode_output(self._round_trip(op, "forward", tq, codec.out_features), tq)

    def backward(self, op, g):
        codec = self.codecs[op]
        tq = codec.encode_grad(g)
        return codec.decode_grad(self._round_trip(op, "backward", tq, self.transport.in_features(op)), tq)

    def close(self):
        self.transport.close()


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is unknown", f"choose one of {', '.join(BACKENDS)}")
    return name
