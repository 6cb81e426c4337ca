"""Client side of SHE-LoRA: rebuild the global update, re-factor to rank r_i, train, upload.

Every function here is pure given (config, client id, bytes in): the ClientApp is a thin
wrapper, and clients keep no state between rounds (the server re-sends the aggregate,
whose encrypted columns only key holders can read).
"""

from __future__ import annotations

import time
import zlib


import numpy as np

from hetune.protocols.she_lora import cipher, task, wire
from hetune.protocols.she_lora.columns import sensitivity, swap_permutation, top_columns
from hetune.protocols.she_lora.config import SheLoraConfig
from hetune.protocols.she_lora.reparam import factorize


def _f32(x) -> np.ndarray:
    """Clear arrays travel as float32: the model's own dtype, so nothing the client trained is lost."""
    return np.asarray(x, dtype=np.float32)


def client_seed(cfg: SheLoraConfig, client: int, rnd: int) -> int:
    return cfg.seed * 1_000_003 + client * 1009 + rnd


def global_factors(cfg: SheLoraConfig, client: int, payload: bytes | None, ctx, clf, loras) -> None:
    """Load the server's aggregate into the model: the digits head, and LoRA re-factored to this client's rank."""
    import torch

    rank = cfg.rank_of(client)
    meta, arrays, blobs = wire.unpack(payload) if payload else ({"empty": True}, {}, {})
    if meta.get("empty"):
        task.fresh_adapters(loras, client_seed(cfg, client, 0))
        return
    if not cfg.causal_lm:
        with torch.no_grad():
            clf.head.weight.copy_(torch.as_tensor(arrays["head.weight"]))
            clf.head.bias.copy_(torch.as_tensor(arrays["head.bias"]))
    factors = {}
    for name, dw in rebuild_updates(meta, arrays, blobs, ctx, cfg.ckks.slots).items():
        factors[name] = factorize(dw, rank)
    task.set_adapters(loras, factors)


def rebuild_updates(meta: dict, arrays: dict, blobs: dict, ctx, slots: int) -> dict[str, np.ndarray]:
    """The aggregated dW per layer (m, n), decrypting the encrypted columns."""
    out = {}
    if meta["method"] == "full-he":
        flat = cipher.decrypt_dense(ctx, blobs["dense"], meta["dense_length"], slots)
        pos, r = 0, meta["rank_max"]
        for name, (m, n) in meta["shapes"].items():
            a = flat[pos : pos + r * n].reshape(r, n)
            pos += r * n
            b = flat[pos : pos + m * r].reshape(m, r)
            pos += m * r
            out[name] = b @ a  # FedAvg of A and B separately: not the mean of the products
        return out
    for name, (m, n) in meta["shapes"].items():
        dw = np.zeros((m, n))
        layer = meta["layers"][name]
        dw[:, layer["plain_cols"]] = arrays[f"dw/{name}"]
        if layer["cipher_cols"]:  # output block p of the decrypted vector is column cipher_cols[p]
            dw[:, layer["cipher_cols"]] = cipher.decrypt_blocks(ctx, blobs[f"ct/{name}"], [tuple(c) for c in layer["chunks"]], m)
        out[name] = dw
    return out


def register(cfg: SheLoraConfig, client: int) -> bytes:
    """Round 0: rank, budget, data size and, for SHE-LoRA, the order of the top-k_i columns per layer.

    Scores use the A this client will upload in round 1 (one deterministic local pass
    from the shared start) and its own calibration inputs; only the order is sent.
    """
    data = task.local_data(cfg, client)
    meta = {"client": client, "rank": cfg.rank_of(client), "budget": cfg.budget_of(client), "n_samples": data.n_samples}
    if cfg.method != "she-lora":
        return wire.pack(meta)
    clf, loras = task.build_model(cfg, cfg.rank_of(client))
    global_factors(cfg, client, None, None, clf, loras)
    task.train_local(cfg, clf, data, client_seed(cfg, client, 1))
    norms = task.input_norms(clf, loras, data.x[: cfg.calibration_samples])
    k = cfg.budget_of(client)
    meta["top"] = {name: top_columns(sensitivity(lora.A.detach().numpy(), norms[name]), k) for name, lora in loras.items()}
    return wire.pack(meta)


def train_round(cfg: SheLoraConfig, client: int, payload: bytes, ctx) -> tuple[bytes, dict]:
    """One round: evaluate the received global model, train locally, build the upload."""
    data = task.local_data(cfg, client)
    meta_in = wire.unpack(payload)[0]
    rnd = int(meta_in["round"])
    clf, loras = task.build_model(cfg, cfg.rank_of(client))
    t0 = time.perf_counter()
    global_factors(cfg, client, payload, ctx, clf, loras)
    dec_time = time.perf_counter() - t0
    acc, test_loss = task.evaluate(cfg, clf, data)
    loss = task.train_local(cfg, clf, data, client_seed(cfg, client, rnd))
    factors = {name: (l.B.detach().numpy().astype(np.float64), l.A.detach().numpy().astype(np.float64)) for name, l in loras.items()}
    t0 = time.perf_counter()
    upload = build_upload(cfg, client, rnd, meta_in, factors, clf, ctx, data.n_samples)
    enc_time = time.perf_counter() - t0
    return upload, {"train_loss": loss, "received_accuracy": acc, "received_loss": test_loss,
                    "enc_time_s": enc_time, "dec_time_s": dec_time, "n_samples": data.n_samples}


def build_upload(cfg, client: int, rnd: int, meta_in: dict, factors: dict, clf, ctx, n_samples: int) -> bytes:
    """The client's message for ``cfg.method`` (timed as encryption time)."""
    meta = {"client": client, "rank": cfg.rank_of(client), "n_samples": n_samples, "round": rnd}
    arrays = {} if cfg.causal_lm else {"head.weight": _f32(clf.head.weight.detach().numpy()),
                                        "head.bias": _f32(clf.head.bias.detach().numpy())}
    blobs: dict[str, list[bytes]] = {}
    slots = cfg.ckks.slots
    if cfg.method == "full-he":
        r = meta_in["rank_max"]
        parts = []
        for name, (m, n) in meta_in["shapes"].items():
            b, a = factors[name]
            a_pad, b_pad = np.zeros((r, n)), np.zeros((m, r))
            a_pad[: a.shape[0]], b_pad[:, : b.shape[1]] = a, b
            parts += [a_pad.reshape(-1), b_pad.reshape(-1)]
        blobs["dense"] = cipher.encrypt_dense(ctx, np.concatenate(parts), slots)
        return wire.pack(meta, arrays, blobs)
    selected = {}
    for name, (b, a) in factors.items():
        arrays[f"B/{name}"] = _f32(b)
        if cfg.method == "flexlora":
            arrays[f"A/{name}"] = _f32(a)
            continue
        n = a.shape[1]
        k = cfg.budget_of(client)
        if cfg.method == "she-lora":
            sel = meta_in["subsets"][name][:k]
        else:  # maskcrypt: a fresh random mask of the same size every round
            rng = np.random.default_rng([client_seed(cfg, client, rnd), zlib.crc32(name.encode())])
            sel = sorted(int(j) for j in rng.choice(n, size=k, replace=False))
        p = swap_permutation(sel, n)
        a_sw = a[:, p]  # (r, n): selected columns now in the last k positions
        arrays[f"Aplain/{name}"] = _f32(a_sw[:, : n - k])
        blobs[f"ct/{name}"] = cipher.encrypt_columns(ctx, a_sw[:, n - k :], slots)  # k*r values, column-major, dense
        selected[name] = [int(j) for j in sel]
    meta["selected"] = selected
    return wire.pack(meta, arrays, blobs)


def evaluate_global(cfg: SheLoraConfig, client: int, payload: bytes, ctx) -> dict:
    data = task.local_data(cfg, client)
    clf, loras = task.build_model(cfg, cfg.rank_of(client))
    global_factors(cfg, client, payload, ctx, clf, loras)
    acc, loss = task.evaluate(cfg, clf, data)
    return {"received_accuracy": acc, "received_loss": loss, "n_samples": data.n_samples}
