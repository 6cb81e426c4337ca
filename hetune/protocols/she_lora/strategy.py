"""Server side: ``SheLoraStrategy`` negotiates the encrypted columns and aggregates column-aware.

It holds only a public CKKS context (refused otherwise; with Galois keys for the
column methods), so it can multiply, rotate and add ciphertexts but never decrypt. Every client message is parsed and checked before it
touches an accumulator; a malformed one (bad bytes, foreign or truncated ciphertexts,
wrong shapes, a budget broken) is logged and that client is left out of the round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from hetune.protocols.she_lora import cipher, wire
from hetune.protocols.she_lora.columns import negotiate, swap_permutation
from hetune.protocols.she_lora.config import SheLoraConfig
from hetune.protocols.she_lora.keys import KeySetupError
from hetune.protocols.she_lora.wire import PayloadError

log = logging.getLogger("hetune.she_lora")


@dataclass(frozen=True)
class ClientInfo:
    client: int
    rank: int
    budget: int
    n_samples: int


@dataclass
class Upload:
    """One client's checked upload, per layer: B (m, r), A's clear columns, Enc of the selected columns."""

    node: int
    info: ClientInfo
    head_w: np.ndarray | None  # the digits classifier head; None on the causal-LM tasks
    head_b: np.ndarray | None
    b: dict[str, np.ndarray] = field(default_factory=dict)
    a_plain: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # layer -> column -> (r,)
    a_cipher: dict[str, tuple[list[int], list]] = field(default_factory=dict)  # layer -> (columns in packed order, ciphertexts)
    dense: list = field(default_factory=list)
    ciphertexts: int = 0


class _ClientFailed(Exception):
    def __init__(self, node: int, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


class SheLoraStrategy:
    """Negotiation (round 0) and column-aware aggregation for she-lora, flexlora, full-he and maskcrypt."""

    def __init__(self, cfg: SheLoraConfig, shapes: dict[str, tuple[int, int]], head_shape: tuple[int, int] | None,
                 public_ctx=None):
        """``head_shape``: the digits classifier head, averaged in the clear; None when there is none (causal LM)."""
        if cfg.encrypts and (public_ctx is None or public_ctx.is_private()):
            raise KeySetupError("the server was given a context holding a secret key (or none)", "pass the public context only")
        if cfg.method in ("she-lora", "maskcrypt") and not public_ctx.has_galois_keys():
            raise KeySetupError("the server's public context has no Galois keys, needed for the encrypted column products",
                                "regenerate the keys with Galois keys in public.ctx (keys.setup_keys(..., galois=True))")
        self.cfg, self.shapes, self.ctx = cfg, dict(shapes), public_ctx
        self.head_shape = tuple(head_shape) if head_shape else None
        self.slots = cfg.ckks.slots
        self.clients: dict[int, ClientInfo] = {}
        self.subsets: dict[str, list[int]] = {}
        self.history: list[dict] = []
        self.rejections: list[dict] = []
        self._global: tuple[dict, dict, dict] | None = None  # (meta, arrays, blobs) of the last aggregate

    # ---- round 0 -------------------------------------------------------------------------
    def register(self, replies: list[tuple[int, bytes | None, str | None]]) -> None:
        tops = []
        for node, data, error in replies:
            try:
                if error:
                    raise PayloadError(f"client error: {error}")
                meta = wire.unpack(data)[0]
                info = ClientInfo(int(meta["client"]), int(meta["rank"]), int(meta["budget"]), int(meta["n_samples"]))
                n_min = min(n for _, n in self.shapes.values())
                if info.rank < 1 or info.n_samples < 1 or not 1 <= info.budget <= n_min:
                    raise PayloadError(f"rank {info.rank}, budget {info.budget} or size {info.n_samples} out of range")
                if self.cfg.method == "she-lora":
                    top = {name: [int(j) for j in meta["top"][name]] for name in self.shapes}
                    for name, cols in top.items():
                        if len(cols) != info.budget or len(set(cols)) != len(cols) or not all(0 <= j < self.shapes[name][1] for j in cols):
                            raise PayloadError(f"layer {name}: rank list {cols} is not {info.budget} distinct columns")
                    tops.append(top)
            except (PayloadError, KeyError, TypeError, ValueError) as err:
                self._reject(0, node, str(err))
                continue
            self.clients[node] = info
        if not self.clients:
            raise PayloadError("no client registered", "check the clients' logs")
        if self.cfg.method == "she-lora":
            k_max = max(c.budget for c in self.clients.values())
            self.subsets = {name: negotiate([t[name] for t in tops], k_max) for name in self.shapes}

    @property
    def rank_max(self) -> int:
        return max(c.rank for c in self.clients.values())

    def round_payload(self, rnd: int) -> bytes:
        """What every client receives: round, layout and the last aggregate (empty before round 1)."""
        meta = {"round": rnd, "method": self.cfg.method, "rank_max": self.rank_max, "shapes": self.shapes, "subsets": self.subsets}
        if self._global is None:
            return wire.pack({**meta, "empty": True})
        g_meta, arrays, blobs = self._global
        return wire.pack({**meta, **g_meta}, arrays, blobs)

    # ---- every round ---------------------------------------------------------------------
    def aggregate(self, rnd: int, replies: list[tuple[int, bytes | None, dict]], bytes_down: int) -> dict:
        """Aggregate one round's uploads; returns the round's metrics row (also kept in ``history``)."""
        t0 = time.perf_counter()
        uploads, reported = [], {}
        for node, data, metrics in replies:
            try:
                if data is None:
                    raise PayloadError(f"client error: {metrics.get('error', 'no reply')}")
                reported[node] = _round_metrics(metrics)
                uploads.append(self._parse(node, data, rnd))
            except PayloadError as err:
                self._reject(rnd, node, err.message)
            except (KeyError, TypeError, ValueError, AttributeError) as err:  # a header of the wrong types
                self._reject(rnd, node, f"malformed upload ({type(err).__name__}: {err})")
        while True:
            try:
                g = self._combine(uploads) if uploads else None
                break
            except _ClientFailed as failed:
                self._reject(rnd, failed.node, failed.reason)
                uploads = [u for u in uploads if u.node != failed.node]
        if g is not None:
            self._global = g
        agg_time = time.perf_counter() - t0
        good = [reported[u.node] for u in uploads]
        weights = np.array([u.info.n_samples for u in uploads], dtype=float)  # registered sizes, as in the aggregate
        row = {
            "round": rnd,
            "clients_accepted": len(uploads),
            "clients_rejected": sorted(r["node"] for r in self.rejections if r["round"] == rnd),
            "train_loss": float(np.average([m["train_loss"] for m in good], weights=weights)) if good else None,
            "bytes_up": int(sum(len(d) for _, d, _ in replies if d is not None)),
            "bytes_down": int(bytes_down),
            "ciphertexts_up": int(sum(u.ciphertexts for u in uploads)),
            "ciphertexts_down": int(sum(len(v) for v in self._global[2].values())) if self._global else 0,
            # encrypted columns in the aggregate, all layers: max k_i per layer for SHE-LoRA, the union for MaskCrypt
            "cipher_columns_down": int(sum(len(v["cipher_cols"]) for v in self._global[0].get("layers", {}).values()))
            if self._global else 0,
            "enc_time_s": float(sum(m["enc_time_s"] for m in good)),
            "enc_time_max_s": float(max((m["enc_time_s"] for m in good), default=0.0)),
            "dec_time_s": float(sum(m["dec_time_s"] for m in good)),
            "agg_time_s": agg_time,
            "encrypted_share": self.encrypted_share(),
        }
        self.history.append(row)
        return row

    def encrypted_share(self) -> float:
        """Share of the uploaded LoRA parameters that are encrypted (all clients, all layers)."""
        if self.cfg.method in ("flexlora", "full-he"):
            return float(self.cfg.method == "full-he")
        enc = sum(c.rank * c.budget * len(self.shapes) for c in self.clients.values())
        total = sum(c.rank * (m + n) for c in self.clients.values() for m, n in self.shapes.values())
        return enc / total

    def record_accuracy(self, rnd: int, evals: list[dict]) -> None:
        """Accuracy of the global model after round ``rnd`` (measured by the clients that received it)."""
        checked = []
        for e in evals:
            try:
                checked.append(_numbers(e, ("n_samples", "received_accuracy", "received_loss"), "evaluation"))
            except PayloadError as err:
                log.warning("round %d: evaluation left out: %s", rnd, err.message)
        evals = [e for e in checked if e["n_samples"] > 0]
        if not evals:
            return
        w = np.array([e["n_samples"] for e in evals], dtype=float)
        row = next((r for r in self.history if r["round"] == rnd), None)
        if row is None:
            row = {"round": rnd}
            self.history.insert(0, row) if rnd == 0 else self.history.append(row)
        row["accuracy"] = float(np.average([e["received_accuracy"] for e in evals], weights=w))
        row["test_loss"] = float(np.average([e["received_loss"] for e in evals], weights=w))

    # ---- internals -----------------------------------------------------------------------
    def _reject(self, rnd: int, node: int, reason: str) -> None:
        log.warning("round %d: rejected client on node %d: %s", rnd, node, reason)
        self.rejections.append({"round": rnd, "node": node, "reason": reason})

    def _parse(self, node: int, data: bytes, rnd: int) -> Upload:
        info = self.clients.get(node)
        if info is None:
            raise PayloadError(f"node {node} did not register in round 0")
        meta, arrays, blobs = wire.unpack(data)
        if meta.get("client") != info.client or meta.get("rank") != info.rank or meta.get("round") != rnd:
            raise PayloadError(f"header {({k: meta.get(k) for k in ('client', 'rank', 'round')})} does not match registration/round")
        if self.head_shape:
            up = Upload(node, info, _shape(arrays, "head.weight", self.head_shape), _shape(arrays, "head.bias", self.head_shape[:1]))
        else:
            up = Upload(node, info, None, None)
        method = self.cfg.method
        if method == "full-he":
            length = sum(self.rank_max * (m + n) for m, n in self.shapes.values())
            expected = -(-length // self.slots)
            if len(blobs.get("dense", [])) != expected:
                raise PayloadError(f"{len(blobs.get('dense', []))} dense ciphertexts, expected {expected}")
            up.dense = cipher.load_ciphertexts(self.ctx, blobs["dense"], [self.slots] * expected, "dense upload")
            up.ciphertexts = len(up.dense)
            return up
        for name, (m, n) in self.shapes.items():
            r = info.rank
            up.b[name] = _shape(arrays, f"B/{name}", (m, r))
            if method == "flexlora":
                a = _shape(arrays, f"A/{name}", (r, n))
                up.a_plain[name] = {j: a[:, j] for j in range(n)}
                continue
            sel = [int(j) for j in meta.get("selected", {}).get(name, [])]
            if len(sel) != info.budget:
                raise PayloadError(f"layer {name}: {len(sel)} encrypted columns, budget is {info.budget}")
            if method == "she-lora" and sel != self.subsets[name][: info.budget]:
                raise PayloadError(f"layer {name}: encrypted columns {sel} are not the agreed prefix {self.subsets[name][: info.budget]}")
            try:
                p = swap_permutation(sel, n)
            except ValueError as err:
                raise PayloadError(f"layer {name}: {err}") from err
            k = info.budget
            a_sw = _shape(arrays, f"Aplain/{name}", (r, n - k))
            up.a_plain[name] = {int(p[c]): a_sw[:, c] for c in range(n - k)}
            cts = cipher.load_ciphertexts(self.ctx, blobs.get(f"ct/{name}", []), cipher.input_sizes(k * r, self.slots), f"layer {name}")
            up.a_cipher[name] = ([int(p[n - k + c]) for c in range(k)], cts)  # the swapped tail, packed column-major
            up.ciphertexts += len(cts)
        return up

    def _combine(self, uploads: list[Upload]) -> tuple[dict, dict, dict]:
        total = float(sum(u.info.n_samples for u in uploads))
        arrays = {} if not self.head_shape else {
            "head.weight": sum(u.info.n_samples / total * u.head_w for u in uploads).astype(np.float32),
            "head.bias": sum(u.info.n_samples / total * u.head_b for u in uploads).astype(np.float32),
        }
        blobs: dict[str, list[bytes]] = {}
        if self.cfg.method == "full-he":
            acc: dict = {}
            for u in uploads:
                try:
                    cipher.add_into(acc, {c: ct * (u.info.n_samples / total) for c, ct in enumerate(u.dense)})
                except Exception as err:
                    raise _ClientFailed(u.node, f"encrypted weighting failed: {err}") from err
            blobs["dense"] = [acc[c].serialize() for c in sorted(acc)]
            length = sum(self.rank_max * (m + n) for m, n in self.shapes.values())
            return {"dense_length": length}, arrays, blobs
        layers = {}
        for name, (m, n) in self.shapes.items():
            plain = np.zeros((m, n))  # sum over clients holding column j in the clear of w_i B_i A_i[:, j]
            for u in uploads:
                cols = sorted(u.a_plain[name])
                plain[:, cols] += u.info.n_samples / total * (u.b[name] @ np.stack([u.a_plain[name][j] for j in cols], axis=1))
            order = self._cipher_order(name, uploads)  # output block p of the encrypted part is column order[p]
            chunks: list[tuple[int, int]] = []
            if order:
                blobs[f"ct/{name}"], chunks = self._encrypted_columns(name, m, order, plain, uploads, total)
            plain_cols = sorted(set(range(n)) - set(order))
            arrays[f"dw/{name}"] = plain[:, plain_cols].astype(np.float32)
            counts = {str(j): 0 for j in order}  # per-column counts: how many clients encrypted column j
            for u in uploads:
                for j in u.a_cipher.get(name, ([], []))[0]:
                    counts[str(j)] += 1
            layers[name] = {"plain_cols": plain_cols, "cipher_cols": order, "encrypted_by": counts,
                            "chunks": [list(c) for c in chunks]}
        return {"layers": layers}, arrays, blobs

    def _cipher_order(self, name: str, uploads: list[Upload]) -> list[int]:
        """The aggregate's encrypted columns: SHE-LoRA the agreed prefix of length max k_i, MaskCrypt the union."""
        if self.cfg.method == "she-lora":
            return list(self.subsets[name][: max(u.info.budget for u in uploads)])
        if self.cfg.method == "maskcrypt":
            return sorted(set().union(*(u.a_cipher[name][0] for u in uploads)))
        return []

    def _encrypted_columns(self, name: str, m: int, order: list[int], plain: np.ndarray, uploads: list[Upload],
                           total: float) -> tuple[list[bytes], list[tuple[int, int]]]:
        """sum_i Enc(w_i B_i A_i[:, order]) (one vector-matrix product per client and output chunk), plus clear parts."""
        import tenseal as ts

        sizes = {u.node: cipher.input_sizes(u.info.budget * u.info.rank, self.slots) for u in uploads}
        width = cipher.output_width([s for v in sizes.values() for s in v], self.slots)
        chunks = cipher.output_chunks(len(order), m, width)
        pos = {j: p for p, j in enumerate(order)}
        acc: dict = {}
        for u in uploads:
            cols, cts = u.a_cipher[name]
            try:
                prod = cipher.weighted_products(cts, sizes[u.node], u.b[name], u.info.n_samples / total,
                                                [pos[j] for j in cols], chunks, len(order), f"layer {name}")
                cipher.add_into(acc, prod)
            except PayloadError as err:
                raise _ClientFailed(u.node, err.message) from err
            except Exception as err:  # e.g. a ciphertext at a foreign level that cannot be added
                raise _ClientFailed(u.node, f"layer {name}: adding the encrypted product failed ({err})") from err
        # a column someone encrypted stays encrypted: the clear contributions of the others join it as plaintext
        clear = plain[:, order].T.reshape(-1)  # block p = column order[p]
        out = [(acc[o] + clear[lo:hi].tolist()) if o in acc else ts.ckks_vector(self.ctx, clear[lo:hi].tolist())
               for o, (lo, hi) in enumerate(chunks)]
        return [v.serialize() for v in out], chunks


def _numbers(metrics: dict, keys: tuple[str, ...], what: str) -> dict[str, float]:
    """A client's reported figures, checked: a missing or non-finite value rejects that client."""
    bad = [k for k in keys if not isinstance(metrics.get(k), (int, float)) or not math.isfinite(metrics[k])]
    if bad:
        raise PayloadError(f"{what} {', '.join(bad)} missing or not finite numbers")
    return {k: float(metrics[k]) for k in keys}


def _round_metrics(metrics: dict) -> dict[str, float]:
    return _numbers(metrics, ("train_loss", "enc_time_s", "dec_time_s"), "round metrics")


def _shape(arrays: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in arrays:
        raise PayloadError(f"missing array {key}")
    arr = arrays[key].astype(np.float64)
    if arr.shape != tuple(shape):
        raise PayloadError(f"{key} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise PayloadError(f"{key} holds NaN or infinite values")
    return arr
