"""The data owner's batched RLWE keys: encrypt requests, decrypt results (see :mod:`hetune.crypto.rlwe`).

The worker never imports this module (tests/test_layout.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from hetune.crypto import randomness, rlwe_wire as wire
from hetune.crypto.ring import BinaryPolyMultiplier
from hetune.crypto.rlwe import NAME, SCHEME, blocks
from hetune.crypto.rlwe_params import PARAM_SETS, RlweParamSet
from hetune.crypto.scheme import ClientKeys, PayloadError
from hetune.errors import ConfigError, HetuneError
from hetune.files import open_atomic, write_atomic

_POLY_CHUNK = 1024  # polynomials per FFT batch (bounds memory)
_STREAM_BATCH = 256  # outputs decrypted at once from a streamed result (the worker's chunk), unless fewer are left
ENCRYPT_FEATURES = 128  # features per encrypted chunk of a request (a pipelined upload's unit)
_UNMASK_CHUNK = 128  # outputs per batch of H s: its transients stay in the cores' caches (1.5x faster than 1024 here)
_KEY_MAGIC = b"HTRLWEsk"
_POOLS_LOCK = threading.Lock()


def _one_core() -> None:
    """Make the calling (new) pool thread run torch ops on one core, and leave the process's default as it was.

    torch keeps one count per thread, read from a process-wide default on the thread's first
    use; ``set_num_threads`` sets the caller's count *and* that default. So the thread first
    takes its count (the default, which marks its own as set), then sets 1, and a short-lived
    thread puts the default back for threads started later (tests/test_hint.py checks both)."""
    with _POOLS_LOCK:
        default = torch.get_num_threads()
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


def _single_core_pool(threads: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=_one_core)


_UNMASK = _single_core_pool(1, "hetune-unmask")  # one call's H s at a time, off the critical path, on one core


def _chunked(fn, a: torch.Tensor) -> torch.Tensor:
    """fn over a (P, N) in batches of polynomials (bounds the FFT's memory)."""
    if a.shape[0] <= _POLY_CHUNK:
        return fn(a)  # one batch: no concatenation's copy
    return torch.cat([fn(a[i : i + _POLY_CHUNK]) for i in range(0, a.shape[0], _POLY_CHUNK)])


_ENCRYPT_POOLS: dict[int, ThreadPoolExecutor] = {}


def _in_order(jobs: Iterator[Callable[[], bytes]]) -> Iterator[bytes]:
    """The jobs' results in order, run on as many single-core threads as torch has threads, that many ahead.

    A chunk's ops are too small for torch's own threads to pay (each op waits for both
    cores, and for a core held by H s or the worker); whole chunks side by side do."""
    threads, jobs = torch.get_num_threads(), list(jobs)
    if threads <= 1 or len(jobs) < threads:  # too few chunks to share out: torch's threads within each
        yield from (job() for job in jobs)
        return
    with _POOLS_LOCK:  # owners in threads of one process (PrivTuner) share the pools
        if threads not in _ENCRYPT_POOLS:
            _ENCRYPT_POOLS[threads] = _single_core_pool(threads, "hetune-encrypt-chunk")
    pool, pending = _ENCRYPT_POOLS[threads], deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) >= threads:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encrypt_rows(mult: BinaryPolyMultiplier, a: torch.Tensor, x: torch.Tensor, rp: RlweParamSet) -> bytes:
    """b = a s + e + Delta m for the masks ``a`` (f c, N) of features x (T, f), packed to the upload width."""
    f, c, n = x.shape[1], a.shape[0] // x.shape[1], rp.n
    b = _chunked(mult.mul, a)  # exact a * s: 2 limbs
    b += randomness.t_uniform(a.numel(), rp.noise_bound_log2).view(a.shape)
    b.view(f, c * n)[:, : x.shape[0]].add_(x.T, alpha=1 << rp.log2_delta)  # feature j's polynomial holds its T tokens (block-major)
    return wire.pack_top(b, rp.input_bits)


class ResultReader:
    """A result body decrypted as it arrives (a streamed download), or whole.

    Values are feature-major, each output's c blocks of N one after the other (``parts``
    such runs: 2 for A_out then B_out). Whole outputs are handed to ``take(header, first,
    values (k, c N))`` once :data:`_STREAM_BATCH` of them (or the rest of a part) have come,
    at most :data:`_POLY_CHUNK` at a time and never straddling a part; it returns the decoded
    rounds of the last part or None. The trailer after the values gives :attr:`worker_s`.
    A body that is short, long or of another shape raises PayloadError.
    """

    def __init__(self, rp: RlweParamSet, kind: int, rows: int, cols: int, parts: int, take):
        self.rp, self.kind, self.rows, self.cols, self.parts, self.take = rp, kind, rows, cols, parts, take
        self.begin()

    def begin(self) -> None:
        self.header: wire.Header | None = None
        self.buf, self.done = bytearray(), 0  # bytes not yet used; outputs (of all parts) taken
        self.worker_s: float | None = None  # from the trailer
        self.out = np.empty((self.cols, self.rows), dtype=np.int64)

    def write(self, chunk: bytes) -> None:
        self.buf += chunk
        if self.header is None:
            if len(self.buf) < wire.HEADER_BYTES:
                return
            self.header = wire.Header.parse(bytes(self.buf[: wire.HEADER_BYTES]), self.kind, NAME, self.rp.name, self.rows, self.cols)
            del self.buf[: wire.HEADER_BYTES]
        c = blocks(self.rows, self.rp.n)
        poly = wire.packed_bytes(c * self.rp.n, self.header.value_bits)  # one output's bytes
        total = self.parts * self.cols
        used = 0
        while self.done < total:
            left = self.cols - self.done % self.cols  # outputs left in this part
            k = min((len(self.buf) - used) // poly, _POLY_CHUNK, left)
            if k < min(_STREAM_BATCH, left):  # tiny batches would pay the FFT's per-call overhead many times over
                break
            v = wire.unpack_top(memoryview(self.buf)[used : used + k * poly], k * c * self.rp.n, self.header.value_bits)
            m = self.take(self.header, self.done, v.view(k, -1))
            if m is not None:
                o = self.done % self.cols
                self.out[o : o + k] = m[:, : self.rows].numpy()
            used += k * poly
            self.done += k
        del self.buf[:used]  # once per piece: a whole body is not moved again for every batch
        if self.done == total and self.buf:
            if len(self.buf) > wire.TRAILER_BYTES or self.worker_s is not None:
                raise PayloadError(f"result of {self.rows}x{self.cols} is longer than its {total} outputs and trailer")
            if len(self.buf) == wire.TRAILER_BYTES:
                self.worker_s = wire.parse_trailer(self.buf)
                self.buf.clear()

    def result(self) -> np.ndarray:
        total = self.parts * self.cols
        if self.header is None or self.done != total or self.worker_s is None:
            raise PayloadError(f"result of {self.rows}x{self.cols} ended after {self.done} of {total} outputs"
                               f"{' and before its trailer' if self.done == total else ''} (truncated?)")
        return torch.from_numpy(self.out).T.contiguous().numpy()  # torch's blocked transpose: numpy's strided one
        # took 44 ns a value on these power-of-two shapes (cache conflicts), torch's 6

    def whole(self, body: bytes) -> np.ndarray:
        self.begin()
        self.write(body)
        return self.result()


class RlweKeys(ClientKeys):
    """Binary secret s from the OS CSPRNG; its FFT is kept for the many products with it."""

    def __init__(self, rp: RlweParamSet, secret: torch.Tensor):
        self.rp, self.params = rp, SCHEME.params(rp.name)
        self._secret = secret
        self._mult = BinaryPolyMultiplier(secret)

    def session_key(self) -> bytes:
        return b""  # the worker needs no evaluation key

    def encrypt(self, q) -> bytes:
        return b"".join(self.encrypt_chunks(q))

    def encrypt_chunks(self, q, features: int | None = None) -> Iterator[bytes]:
        """The request body as its header and then ``features`` features' ciphertexts at a time (a pipelined upload
        sends one while the next is encrypted); under a fresh mask seed per request."""
        x = torch.as_tensor(np.asarray(q), dtype=torch.int64)  # (T, k) small integers
        rows, cols = x.shape
        n, c = self.rp.n, blocks(rows, self.rp.n)
        seed, features = randomness.new_seed(), features or ENCRYPT_FEATURES
        yield wire.Header(wire.REQUEST, NAME, self.rp.name, rows, cols, self.rp.input_bits, seed).pack()

        def chunk(j: int, f: int) -> bytes:
            a = randomness.aes_ctr_words(seed, f * c * n, start=j * c * n).view(f * c, n)  # row (j, k): feature j, block k
            return _encrypt_rows(self._mult, a, x[:, j : j + f], self.rp)

        yield from _in_order(partial(chunk, j, min(features, cols - j)) for j in range(0, cols, features))

    def decrypt(self, result: bytes, rows: int, cols: int) -> np.ndarray:
        return self.decryptor(rows, cols).whole(result)

    def decryptor(self, rows: int, cols: int) -> "ResultReader":
        """Decrypts a fresh-mask result (A_out, then B_out) fed in pieces: a * s as A_out arrives, the rest with B_out."""
        n, c, d = self.rp.n, blocks(rows, self.rp.n), self.rp.log2_delta
        a_s = torch.empty(cols, c * n, dtype=torch.int64)

        def take(header: wire.Header, o: int, v: torch.Tensor) -> torch.Tensor | None:
            if o < cols:
                self._mult.mul_top(v.view(-1, n), header.value_bits, a_s[o : o + len(v)].view(-1, n))  # only its top bits matter
                return None
            v -= a_s[o - cols : o - cols + len(v)]  # the phase Delta m + noise, mod 2^64
            v += 1 << (d - 1)
            v >>= d  # round(phase / Delta), signed
            return v

        return ResultReader(self.rp, wire.RESULT, rows, cols, 2, take)

    def save(self, path: Path) -> None:
        """Layout: magic, set name (8 bytes), packed secret bits. Written 0600 via a temp file."""
        bits = np.packbits(self._secret.numpy().astype(np.uint8)).tobytes()
        write_atomic(Path(path), _KEY_MAGIC + self.rp.name.encode().ljust(8, b"\0") + bits, mode=0o600)



def generate(param_set: str) -> RlweKeys:
    rp = PARAM_SETS[SCHEME.resolve(param_set).name]
    return RlweKeys(rp, randomness.binary_secret(rp.n))


def load(path: Path) -> RlweKeys:
    data = Path(path).read_bytes()
    name = data[8:16].rstrip(b"\0").decode(errors="replace")
    if data[:8] != _KEY_MAGIC or name not in PARAM_SETS or len(data) != 16 + PARAM_SETS[name].n // 8:
        raise ConfigError(f"{path} is not a hetune RLWE secret key", "pass the file written by --save-key")
    rp = PARAM_SETS[name]
    bits = np.unpackbits(np.frombuffer(data[16:], dtype=np.uint8))[: rp.n]
    return RlweKeys(rp, torch.from_numpy(bits.astype(np.int64)))


# ---- Fixed masks, a fresh secret per product (the hint) -------------------------------------------------

class SecretReuseError(HetuneError):
    """A per-call secret was asked to encrypt a second message: (mask, secret) pairs are used once."""


HintFetch = Callable[[str, str, bytes, int, int, "HintFile"], None]  # (op, direction, query, rows, cols, sink): streams the hint


class HintFile:
    """Where a hint download goes as it arrives: a temp file, rewound for each try."""

    def __init__(self, fh):
        self.fh = fh

    def begin(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)


class _BadHint(Exception):
    pass


class HintCache:
    """The session's mask seed and the hints H = W A, on disk, bound to the bundle and the seed.

    Layout: ``root/<set>-<bundle sha256>/mask_seed`` (16 bytes, made once: the masks are
    public, the seed is kept so a resumed run reuses the cached hints) and one file per
    (op, direction, block): the worker's hint (header, values, SHA-256 of both) followed by
    SHA-256(bundle hash, header, values). A hint is streamed from the worker into a temp file,
    checked there (sizes, header, seed, digest) and only then bound and renamed into place, so
    a truncated or corrupted download never becomes a cached hint; memory stays at one piece
    of the stream, never the hint. A cached file is checked once per process (both digests);
    a bad one is deleted and fetched again, and a second bad fetch raises PayloadError. Values
    are read one chunk at a time with positioned reads, not a memory map: a mapped hint's
    pages would count in the owner's resident memory (6 GB for the 1B shape) although they
    are only the kernel's file cache.
    """

    _READ = 1 << 20  # bytes per read while checking a file

    def __init__(self, root: Path, bundle_sha256: str, rp: RlweParamSet, fetch: HintFetch):
        self.rp, self.bundle_sha256, self.fetch = rp, bundle_sha256, fetch
        self.dir = Path(root) / f"{rp.name}-{bundle_sha256}"
        seed_path = self.dir / "mask_seed"
        seed = seed_path.read_bytes() if seed_path.exists() else b""
        if len(seed) != randomness.SEED_BYTES:
            seed = randomness.new_seed()
            write_atomic(seed_path, seed, mode=0o600)
        self.mask_seed = seed
        self._files: dict[tuple[str, str, int], tuple[Path, int]] = {}

    def op_seed(self, op: str, direction: str) -> bytes:
        """The seed of one op and direction's masks: a hash of the session seed and their names."""
        return hashlib.sha256(b"hetune/rlwe/masks\0" + self.mask_seed + f"{op}\0{direction}".encode()).digest()[:16]

    def values(self, op: str, direction: str, block: int, n_in: int, n_out: int) -> tuple[Path, int]:
        """Block ``block``'s hint file (fetched and checked on first use) and its bytes per value."""
        key = (op, direction, block)
        if key not in self._files:
            path = self.dir / f"{op}.{direction}.{block}.hint"
            for attempt in range(2):
                if path.exists():
                    problem = self._scan(path, op, direction, block, n_out, bound=True)[0]
                    if problem is None:
                        break
                    path.unlink()
                else:
                    try:
                        self._download(path, op, direction, block, n_in, n_out)
                        break
                    except _BadHint as bad:
                        problem = str(bad)
                if attempt:
                    raise PayloadError(f"the hint of {op} {direction} block {block} is {problem}, twice; "
                                       "check the worker serves the bundle this cache was made for")
            with path.open("rb") as fh:
                vb = wire.Header.parse(fh.read(wire.HEADER_BYTES), wire.HINT, NAME, self.rp.name).value_bits
            self._files[key] = (path, vb)
        return self._files[key]

    def read(self, op: str, direction: str, block: int, n_in: int, n_out: int, first: int, count: int) -> tuple[np.ndarray, int]:
        """Outputs ``first`` .. ``first + count`` of a block's hint (packed values) and their bits per value."""
        path, vb = self.values(op, direction, block, n_in, n_out)
        size = wire.packed_bytes(count * self.rp.n, vb)
        with path.open("rb", buffering=0) as fh:
            data = os.pread(fh.fileno(), size, wire.HEADER_BYTES + wire.packed_bytes(first * self.rp.n, vb))
        if len(data) != size:
            raise PayloadError(f"the cached hint {path.name} is shorter than it was when checked; "
                               "delete the hint cache directory and run again")
        return np.frombuffer(data, dtype=np.uint8), vb

    def _download(self, path: Path, op: str, direction: str, block: int, n_in: int, n_out: int) -> None:
        """Stream the hint into a temp file, check it, bind it, rename it into place; _BadHint (and no file) if bad."""
        rows = (block + 1) * self.rp.n
        query = wire.Header(wire.HINT_QUERY, NAME, self.rp.name, rows, n_in, 64, self.op_seed(op, direction)).pack()
        try:
            with open_atomic(path, mode=0o600) as (fh, tmp):
                self.fetch(op, direction, query, rows, n_in, HintFile(fh))
                fh.flush()
                problem, binding = self._scan(tmp, op, direction, block, n_out, bound=False)
                if problem is not None:
                    raise _BadHint(problem)  # the temp file is removed: nothing bad is cached
                fh.write(binding)
        except OSError as err:
            raise ConfigError(f"cannot write the hint cache {self.dir}: {err.strerror or err}",
                              "pass a writable --hint-cache directory with room for the hints") from err

    def _scan(self, path: Path, op: str, direction: str, block: int, n_out: int, bound: bool) -> tuple[str | None, bytes]:
        """(What is wrong with the hint file, or None; its binding digest), reading it a piece at a time.
        ``bound``: the file ends with its binding (cached), else only the worker's digest (just downloaded)."""
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(wire.HEADER_BYTES)
            try:
                header = wire.Header.parse(head, wire.HINT, NAME, self.rp.name, (block + 1) * self.rp.n, n_out)
            except PayloadError as err:
                return f"not a hint of this shape ({err.message})", b""
            values_end = wire.HEADER_BYTES + wire.packed_bytes(n_out * self.rp.n, header.value_bits)
            expected = values_end + (2 if bound else 1) * wire.DIGEST_BYTES
            if size != expected:
                return f"{size} bytes, expected {expected} (truncated?)", b""
            if header.seed != self.op_seed(op, direction):
                return "for other masks (another mask seed)", b""
            checksum, binding = hashlib.sha256(head), hashlib.sha256(self.bundle_sha256.encode() + head)
            for left in range(values_end - wire.HEADER_BYTES, 0, -self._READ):
                piece = fh.read(min(self._READ, left))
                checksum.update(piece)
                binding.update(piece)
            if checksum.digest() != fh.read(wire.DIGEST_BYTES):
                return "corrupted (checksum mismatch)", b""
            if bound and binding.digest() != fh.read(wire.DIGEST_BYTES):
                return "bound to another bundle", b""
        return None, binding.digest()


class CallKey:
    """One product call: a fresh binary secret that encrypts exactly one message under the op's fixed masks.

    Never saved and never pickled (so no checkpoint can restore a used secret); a second
    :meth:`encrypt` raises :class:`SecretReuseError`: two messages under one secret and the
    same masks would hand the worker Delta (M - M') + (E - E').
    """

    def __init__(self, rp: RlweParamSet, cache: HintCache, op: str, direction: str):
        self.rp, self.cache, self.op, self.direction = rp, cache, op, direction
        self._mult = BinaryPolyMultiplier(randomness.binary_secret(rp.n))
        self._used = False
        self._unmask: Future | None = None

    def __reduce__(self):
        raise TypeError("a per-call RLWE key is never saved or copied: a resumed run makes fresh ones")

    def encrypt(self, q) -> bytes:
        return b"".join(self.encrypt_chunks(q))

    def encrypt_chunks(self, q, features: int | None = None) -> Iterator[bytes]:
        """The request body as its header and then ``features`` features' ciphertexts at a time; this call's one message."""
        if self._used:
            raise SecretReuseError(f"this call's secret already encrypted a message ({self.op} {self.direction}); "
                                   "a retry or another micro-batch takes a new call key")
        self._used = True
        return self._chunks(torch.as_tensor(np.asarray(q), dtype=torch.int64), features)

    def _chunks(self, x: torch.Tensor, features: int) -> Iterator[bytes]:
        rows, cols = x.shape
        n, c = self.rp.n, blocks(rows, self.rp.n)
        seed = self.cache.op_seed(self.op, self.direction)
        yield wire.Header(wire.HINTED_REQUEST, NAME, self.rp.name, rows, cols, self.rp.input_bits, seed).pack()
        features = features or ENCRYPT_FEATURES

        def chunk(j: int, f: int) -> bytes:  # block k's masks of features j.. are at words k cols N + j N of the op's stream
            a = [randomness.aes_ctr_words(seed, f * n, start=(k * cols + j) * n).view(f, n) for k in range(c)]
            a = a[0] if c == 1 else torch.stack(a, dim=1).view(f * c, n)
            return _encrypt_rows(self._mult, a, x[:, j : j + f], self.rp)

        yield from _in_order(partial(chunk, j, min(features, cols - j)) for j in range(0, cols, features))

    def decrypt(self, result: bytes, rows: int, cols: int, n_in: int) -> np.ndarray:
        return self.decryptor(rows, cols, n_in).whole(result)

    def _hint_times_secret(self, o: int, k: int, block: int, n_in: int, cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs o..o+k's hint of ``block`` times this call's secret, to the top bits that matter (one FFT each)."""
        hint, hb = self.cache.read(self.op, self.direction, block, n_in, cols, o, k)
        h = wire.unpack_top(hint, k * self.rp.n, hb).view(k, self.rp.n)
        return self._mult.mul_top(h, hb, out)

    def prepare(self, rows: int, cols: int, n_in: int) -> None:
        """Start computing the whole unmasking term H s of this call in a thread.

        It depends on the cached hint and this call's secret only, not on the data or the
        worker's answer, so it runs while the request is encrypted and sent and the worker
        computes; decryption is then a subtraction. Holds cols x rows int64 (the size of the
        decrypted result) until the call is decrypted."""
        c = blocks(rows, self.rp.n)
        for k in range(c):  # hints fetched (or checked) here, never from the thread
            self.cache.values(self.op, self.direction, k, n_in, cols)

        def compute() -> torch.Tensor:
            out = torch.empty(cols, c, self.rp.n, dtype=torch.int64)
            for o in range(0, cols, _UNMASK_CHUNK):
                k = min(_UNMASK_CHUNK, cols - o)
                for b in range(c):
                    self._hint_times_secret(o, k, b, n_in, cols, out[o : o + k, b])
            return out

        self._unmask = _UNMASK.submit(compute)

    def decryptor(self, rows: int, cols: int, n_in: int) -> "ResultReader":
        """Decrypts B_out fed in pieces: minus the hint times this call's secret (from :meth:`prepare` if it ran,
        else block by block as the outputs come), rounded to Delta."""
        n, c, d = self.rp.n, blocks(rows, self.rp.n), self.rp.log2_delta

        def take(header: wire.Header, o: int, v: torch.Tensor) -> torch.Tensor:
            phase = v.view(len(v), c, n)
            if self._unmask is not None:
                phase -= self._unmask.result()[o : o + len(v)]
            else:
                for k in range(c):
                    phase[:, k] -= self._hint_times_secret(o, len(v), k, n_in, cols)
            v += 1 << (d - 1)
            v >>= d  # round(phase / Delta), signed
            return v

        return ResultReader(self.rp, wire.HINTED_RESULT, rows, cols, 1, take)


class FixedMaskKeys(ClientKeys):
    """The data owner's side of a fixed-mask session: a hint cache and fresh per-call keys, no long-term secret."""

    fixed_masks = True

    def __init__(self, rp: RlweParamSet, cache_root: Path):
        self.rp, self.params, self.cache_root = rp, SCHEME.params(rp.name), Path(cache_root)
        self.cache: HintCache | None = None

    def session_key(self) -> bytes:
        return b""

    def attach(self, bundle_sha256: str, fetch: HintFetch) -> None:
        """Bind to the worker's bundle: the cache directory of that bundle (and its mask seed)."""
        self.cache = HintCache(self.cache_root, bundle_sha256, self.rp, fetch)

    def new_call(self, op: str, direction: str) -> CallKey:
        if self.cache is None:
            raise ConfigError("fixed-mask keys are not bound to a bundle yet", "build the encrypted backend with them")
        return CallKey(self.rp, self.cache, op, direction)

    def encrypt(self, q) -> bytes:
        raise SecretReuseError("fixed-mask keys encrypt per call: use new_call(op, direction).encrypt(q)")

    def decrypt(self, result: bytes, rows: int, cols: int) -> np.ndarray:
        raise SecretReuseError("fixed-mask keys decrypt per call: use the CallKey that encrypted the request")

    def save(self, path: Path) -> None:
        raise ConfigError("a fixed-mask session has no long-term secret to save (each product's lives for one call)",
                          "drop --save-key, or use fresh masks per request")


def fixed_masks(param_set: str, cache_root: Path) -> FixedMaskKeys:
    return FixedMaskKeys(PARAM_SETS[SCHEME.resolve(param_set).name], cache_root)
