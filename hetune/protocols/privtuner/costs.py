"""Cost model of the core protocol per GLWE parameter set, fitted from measured timings and sizes.

``measure_costs`` times our own primitives on this machine for every allow-listed set:
client encryption (per input GLWE: one row chunk of ``N`` values), the worker's
encrypted matmul (per output value, plus a term per output value and extra input
chunk), client decryption (per packed output GLWE), and the serialized sizes. Seconds
become cycles by multiplying with the measuring CPU's clock (``cpu_ghz``, read from
/proc/cpuinfo unless given): "cycles" are therefore cycles of that CPU running the
extension with all its cores, the unit the planner scales by each device's frequency.

``per_sample`` turns the fit into the planner's per-sample figures for a workload: one
training sequence of ``seq_len`` tokens through one LoRA step of a Llama-class model
(forward products of every outsourced op, backward products of every op but the first
block's q/k/v, as the core client does).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hetune.errors import ConfigError
from hetune.files import write_json
from hetune.protocols.hybrid_lora import wire

DEFAULT_COSTS = Path(__file__).with_name("default_costs.json")


@dataclass(frozen=True)
class ParamSetCosts:
    """Fitted per-primitive costs of one parameter set (seconds on the measuring CPU, bytes)."""

    name: str
    security_bits: int
    poly_size: int  # input rows pad to this many values per GLWE
    packing_poly_size: int  # results pack this many values per GLWE
    enc_s_per_glwe: float
    dec_s_per_glwe: float  # per packed output GLWE
    srv_s_per_value: float  # worker seconds per output value
    srv_s_per_value_chunk: float  # extra worker seconds per output value and input GLWE beyond the first
    glwe_bytes: int  # one serialized input GLWE
    result_glwe_bytes: float  # one packed output GLWE, serialized
    result_overhead_bytes: float
    key_bytes: int  # compression key, held by the worker for the session


@dataclass(frozen=True)
class CostModel:
    cpu_ghz: float  # clock of the measuring CPU: cycles = seconds * cpu_ghz * 1e9
    sets: dict[str, ParamSetCosts]
    measured: dict  # when, where, shapes: provenance

    def to_dict(self) -> dict:
        return {"cpu_ghz": self.cpu_ghz, "measured": self.measured, "sets": {k: asdict(v) for k, v in self.sets.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "cost file") -> "CostModel":
        try:
            sets = {k: ParamSetCosts(**v) for k, v in data["sets"].items()}
            return cls(float(data["cpu_ghz"]), sets, dict(data.get("measured", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{source} is not a hetune cost file ({err})", "write one with: hetune plan measure --out costs.json") from err


def load_costs(path: Path | None = None) -> CostModel:
    path = Path(path) if path else DEFAULT_COSTS
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"cost file {path} does not exist", "write one with: hetune plan measure --out costs.json") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"cost file {path} is not valid JSON ({err})", "write one with: hetune plan measure --out costs.json") from err
    return CostModel.from_dict(data, str(path))


def save_costs(model: CostModel, path: Path) -> None:
    """Atomic: temp file in the same directory, then rename."""
    write_json(path, model.to_dict())


# ---- per-sample figures for a workload ---------------------------------------------


@dataclass(frozen=True)
class Product:
    """One encrypted product per token row: (rows, k) @ (k, n_out)."""

    k: int
    n_out: int


def workload_products(model: str) -> list[Product]:
    """Per-token encrypted products of one LoRA training step (forward and backward) of ``model``."""
    from hetune.models.loading import load_config

    c = load_config(model)
    h, inter = c.hidden_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    qkv = h + 2 * c.num_key_value_heads * head_dim
    ops = [(h, qkv), (h, h), (h, 2 * inter), (inter, h)]  # (in, out) of qkv, o, gate_up, down
    products = []
    for layer in range(c.num_hidden_layers):
        for i, (k, n) in enumerate(ops):
            products.append(Product(k, n))  # forward
            if not (layer == 0 and i == 0):  # the first block's qkv input needs no gradient
                products.append(Product(n, k))  # backward: g (T, out) @ W (out, in)
    return products


@dataclass(frozen=True)
class SampleCosts:
    """What one sample costs under one parameter set (the planner's c_enc, s, c_srv)."""

    client_gcycles: float  # encryption + decryption on the data owner's device
    upload_mbit: float
    server_gcycles: float
    download_mbit: float
    key_bytes: int
    security_bits: int


def per_sample(costs: CostModel, param_set: str, model: str, seq_len: int) -> SampleCosts:
    p = costs.sets[param_set]
    client_s = server_s = up = down = 0.0
    for prod in workload_products(model):
        chunks = math.ceil(prod.k / p.poly_size)
        out_glwes = math.ceil(prod.n_out / p.packing_poly_size)
        client_s += seq_len * (chunks * p.enc_s_per_glwe + out_glwes * p.dec_s_per_glwe)
        server_s += seq_len * prod.n_out * (p.srv_s_per_value + (chunks - 1) * p.srv_s_per_value_chunk)
        up += wire.ciphertext_bytes(seq_len, prod.k, p.poly_size, p.glwe_bytes)
        down += p.result_overhead_bytes + seq_len * out_glwes * p.result_glwe_bytes
    g = costs.cpu_ghz
    return SampleCosts(client_s * g, up * 8e-6, server_s * g, down * 8e-6, p.key_bytes, p.security_bits)


# ---- measuring -----------------------------------------------------------------------


def cpu_ghz_here() -> float:
    """Largest 'cpu MHz' in /proc/cpuinfo, in GHz (the clock cycles are counted in)."""
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    if not mhz:
        raise ConfigError("cannot read the CPU clock from /proc/cpuinfo", "pass it: hetune plan measure --cpu-ghz 2.5")
    return max(mhz) / 1000


# (rows, k, n_out): k spans 1..3 input GLWEs at N = 1024 so the chunk term is identifiable.
MEASURE_SHAPES = ((4, 32, 64), (2, 3000, 32), (1, 256, 256))


def _fit_nonneg(rows: list[list[float]], y: list[float]) -> list[float]:
    import numpy as np
    from scipy.optimize import nnls

    return [float(v) for v in nnls(np.asarray(rows, dtype=float), np.asarray(y, dtype=float))[0]]


def measure_param_set(name: str, shapes=MEASURE_SHAPES, repeats: int = 1, echo=None) -> tuple[ParamSetCosts, dict]:
    """Time keygen, encryption, the worker's matmul and decryption of ``shapes`` under one set."""
    import numpy as np

    from hetune.crypto import glwe
    from hetune.crypto.param_sets import param_set

    ps = param_set(name)
    t0 = time.perf_counter()
    keys = glwe.GlweKeys.generate(param_set=name)
    keygen_s = time.perf_counter() - t0
    key_bytes = len(keys.compression_key_bytes())
    rng = np.random.default_rng(0)
    # warm-up: one small product, untimed
    glwe.encrypted_matmul(keys.encrypt(rng.integers(0, 256, (1, 16))), rng.integers(-127, 128, (16, 4)), keys.compression)
    enc_rows, enc_y, srv_rows, srv_y, dec_rows, dec_y, res = [], [], [], [], [], [], []
    max_err = 0
    for rows, k, n in shapes:
        x, w = rng.integers(0, 256, (rows, k)), rng.integers(-127, 128, (k, n))
        chunks, out_glwes = math.ceil(k / ps.poly_size), math.ceil(n / ps.packing_poly_size)
        for _ in range(repeats):
            t = time.perf_counter()
            ct = keys.encrypt(x)
            enc_s = time.perf_counter() - t
            payload = bytes(ct.serialize())
            t = time.perf_counter()
            out = glwe.encrypted_matmul(glwe.ciphertext_from_bytes(payload), w, keys.compression)
            srv_s = time.perf_counter() - t
            blob = bytes(out.serialize())
            t = time.perf_counter()
            raw = keys.decrypt(keys.result_from_bytes(blob), n)
            dec_s = time.perf_counter() - t
            enc_rows.append([rows * chunks]); enc_y.append(enc_s)
            srv_rows.append([rows * n, rows * n * (chunks - 1)]); srv_y.append(srv_s)
            dec_rows.append([rows * out_glwes]); dec_y.append(dec_s)
            res.append((rows * out_glwes, len(blob)))
            max_err = max(max_err, int(np.abs(raw - x @ w).max()))
            if len(payload) != wire.ciphertext_bytes(rows, k, ps.poly_size, ps.glwe_bytes):
                raise AssertionError(f"{name}: ciphertext size {len(payload)} does not match the size formula")
        if echo:
            echo(f"  {name}: ({rows}x{k}) @ ({k}x{n}): enc {enc_s * 1e3:.1f} ms, worker {srv_s:.2f} s, dec {dec_s * 1e3:.1f} ms")
    (enc,), (srv, srv_chunk), (dec,) = _fit_nonneg(enc_rows, enc_y), _fit_nonneg(srv_rows, srv_y), _fit_nonneg(dec_rows, dec_y)
    (res_glwe, res_over) = _fit_nonneg([[g, 1.0] for g, _ in res], [b for _, b in res])
    costs = ParamSetCosts(name, ps.security.bits, ps.poly_size, ps.packing_poly_size, enc, dec, srv, srv_chunk,
                          ps.glwe_bytes, res_glwe, res_over, key_bytes)
    return costs, {"keygen_s": keygen_s, "max_abs_error": max_err}


def measure_costs(param_sets=None, cpu_ghz: float | None = None, repeats: int = 1, echo=None) -> CostModel:
    """Measure every allow-listed set (or ``param_sets``) on this machine and fit the cost model."""
    import platform

    from hetune.crypto.param_sets import PARAM_SETS

    names = tuple(param_sets or PARAM_SETS)
    ghz = cpu_ghz if cpu_ghz is not None else cpu_ghz_here()
    if ghz <= 0:
        raise ConfigError(f"cpu_ghz={ghz} must be > 0", "pass the measuring CPU's clock, e.g. --cpu-ghz 2.5")
    sets, extra = {}, {}
    for name in names:
        sets[name], extra[name] = measure_param_set(name, repeats=repeats, echo=echo)
    info = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "shapes": [list(s) for s in MEASURE_SHAPES], "repeats": repeats, "per_set": extra}
    return CostModel(ghz, sets, info)


def measure_and_save(out: Path, param_sets=(), cpu_ghz: float | None = None, repeats: int = 1, echo=None) -> CostModel:
    """``hetune plan measure``: validate, measure, write atomically."""
    from hetune.crypto.param_sets import param_set

    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be >= 1", "pass --repeats 1 or more")
    for name in param_sets:
        param_set(name)  # unknown names fail before minutes of measuring
    model = measure_costs(param_sets or None, cpu_ghz, repeats, echo)
    save_costs(model, out)
    return model
