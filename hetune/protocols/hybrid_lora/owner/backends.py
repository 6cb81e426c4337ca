"""One interface for every way of computing the frozen products: plain, quantized, encrypted, remote.

A backend maps ``(op, x) -> x W^T`` and ``(op, g) -> g W`` for the outsourced ops. The
training code never knows which one it talks to. What a backend needs (a bundle, a
worker) is checked when it is built, so a missing piece fails before the first step.
"""

from __future__ import annotations

import time
import queue
import threading
from collections.abc import Iterator
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
    worker_s: float = 0.0  # the worker's product alone, as it reports it (streamed: in the result's trailer)
    round_trip_s: float = 0.0  # wall time of the products, encryption to decryption (overlapped or not)
    timeline: list | None = None  # set to [] to record each product's spans (EncryptedBackend._round_trip); off: a long run
                                  # would keep one entry per product

    def snapshot(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}


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

    def __init__(self, codecs: dict[str, OpCodec], transport, keys: ClientKeys, overlap: bool = False):
        """``overlap`` (batched RLWE): each product pipelined: encrypted a chunk of features at a time in a thread
        while the previous chunk is uploaded, and its result streamed and decrypted a chunk of outputs at a time
        while the worker computes the next."""
        super().__init__()
        self.codecs = codecs
        self.transport = transport
        self.keys = keys
        self.name = transport.name
        if overlap and not hasattr(keys, "decryptor") and not getattr(keys, "fixed_masks", False):
            raise ConfigError(f"overlap needs the batched RLWE scheme, not {keys.params.scheme}", "drop overlap or use rlwe")
        self.overlap = overlap
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
        """One product. Its timeline entry: [start, end] seconds on perf_counter of ``encrypt``, ``decrypt`` and
        either ``transport`` (whole bodies: send, the worker's product, receive) or, with overlap, ``send`` (the
        body handed to the transport as it is encrypted), ``wait`` (for the worker's first chunk) and ``receive``
        (the result arriving, decrypted as it comes while the worker computes the next chunk); plus the busy
        seconds ``encrypt_s`` and ``decrypt_s``."""
        rows, cols = tq.q.shape
        st, q = self.stats, tq.q.to(torch.int64)
        calls, span = [], {"op": op, "direction": direction, "rows": rows, "cols": cols, "out_cols": out_cols,
                           "encrypt_s": 0.0, "decrypt_s": 0.0, "sent": 0, "received": 0}

        def new_call():
            if self.fixed_masks:
                calls.append(self.keys.new_call(op, direction))  # a fresh secret per call
                calls[-1].prepare(rows, out_cols, cols)  # its H s in a thread meanwhile: data-independent
            return calls[-1] if self.fixed_masks else self.keys

        pipelines = []

        def payload():  # each try (a retry, a reopened session) encrypts afresh, never resends
            key = new_call()
            if self.overlap:
                pipelines.append(_Pipelined(key.encrypt_chunks(q), span))
                return pipelines[-1]
            t = time.perf_counter()
            body = key.encrypt(q)
            span.update(encrypt=[t, time.perf_counter()], sent=len(body))
            span["encrypt_s"] += span["encrypt"][1] - t  # every try's
            return body

        def decryptor():
            return calls[-1].decryptor(rows, out_cols, cols) if self.fixed_masks else self.keys.decryptor(rows, out_cols)

        t1 = time.perf_counter()
        for attempt in (1, 2):  # a malformed result is asked for once more (re-encrypted), then the run stops
            try:
                if self.overlap:
                    sink = _Decrypting(decryptor, span)
                    self.transport.run(op, direction, payload, rows=rows, cols=cols, sink=sink)
                    raw, worker_s = sink.result(), sink.reader.worker_s  # the seconds from the result's trailer
                    span["wait"] = [span["send"][1], span["receive"][0]]  # upload done -> the worker's first chunk
                else:
                    result, worker_s = self.transport.run(op, direction, payload, rows=rows, cols=cols)
                    t2 = time.perf_counter()
                    span.update(transport=[span.get("encrypt", (t1, t1))[1], t2], received=len(result))  # send, worker, receive
                    raw = self._decrypt(result, rows, out_cols, cols, calls[-1] if self.fixed_masks else None)
                    span.update(decrypt=[t2, time.perf_counter()], decrypt_s=time.perf_counter() - t2)
                break
            except PayloadError as err:
                if attempt == 2:
                    raise WorkerError(f"the worker's result for {op} {direction} ({rows}x{out_cols}) is malformed, twice: {err.message}",
                                      "the worker may be faulty or not a hetune worker of this version; "
                                      "the last checkpoint is intact: rerun with --resume once it is fixed") from None
            finally:
                for pipeline in pipelines:  # an upload that failed before reading its body leaves no encrypting thread
                    pipeline.stop.set()
        wall = time.perf_counter() - t1
        st.encrypt_s += span["encrypt_s"]
        st.decrypt_s += span["decrypt_s"]
        st.transport_s += wall - span["encrypt_s"] - span["decrypt_s"]  # with overlap: what crypto did not hide
        st.round_trip_s += wall
        st.worker_s += worker_s
        st.round_trips += 1
        st.values_out += rows * out_cols
        st.bytes_sent += span["sent"]
        st.bytes_received += span["received"]
        if st.timeline is not None:
            st.timeline.append({**span, "worker_s": worker_s, "start": t1, "end": t1 + wall})
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


class _Pipelined:
    """A request body encrypted in a thread a chunk ahead of the upload that reads it (a bounded queue of ``depth``).

    Iterating it yields the chunks in order; the producer stops if the reader goes away (a failed
    upload) and its error, if any, is raised in the reader. Records the encrypt and send spans."""

    def __init__(self, chunks: Iterator[bytes], span: dict, depth: int = 2):
        self.chunks, self.span, self.queue = chunks, span, queue.Queue(depth)
        self.stop = threading.Event()
        span.update(encrypt=[time.perf_counter(), None], sent=0)
        threading.Thread(target=self._produce, name="hetune-encrypt", daemon=True).start()

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                chunk = next(self.chunks, None)
                self.span["encrypt_s"] += time.perf_counter() - t
                if chunk is None:
                    self.span["encrypt"][1] = time.perf_counter()
                self._put(chunk)
                if chunk is None:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the reader
            self._put(err)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[bytes]:
        self.span.update(send=[time.perf_counter(), None], send_chunks=0)
        try:
            while (item := self.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self.span["sent"] += len(item)
                self.span["send_chunks"] += 1
                yield item
            self.span["send"][1] = time.perf_counter()
        finally:
            self.stop.set()


class _Decrypting:
    """A transport sink that decrypts a streamed result as it arrives (a fresh decryptor per try, for the try's key)."""

    def __init__(self, make, span: dict):
        self.make, self.span, self.reader = make, span, None

    def begin(self) -> None:
        self.reader = self.make()
        self.span.update(receive=[time.perf_counter(), None], decrypt=[None, None], decrypt_s=0.0, received=0)

    def write(self, chunk: bytes) -> None:
        t = time.perf_counter()
        self.reader.write(chunk)
        now = time.perf_counter()
        self.span["decrypt"] = [self.span["decrypt"][0] or t, now]
        self.span["decrypt_s"] += now - t
        self.span["received"] += len(chunk)
        self.span["receive"][1] = now

    def result(self):
        if self.reader is None:
            raise PayloadError("no result arrived")
        return self.reader.result()


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is unknown", f"choose one of {', '.join(BACKENDS)}")
    return name
