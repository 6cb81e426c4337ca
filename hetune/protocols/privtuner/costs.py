"""Cost model of the core protocol per scheme and parameter set, fitted from measured timings and sizes.

``measure_costs`` times one scheme's primitives on this machine through the
:class:`~hetune.crypto.scheme.Scheme` interface only (the data owner's ``encrypt`` and
``decrypt``, the worker's ``multiply``) for every allow-listed set. Ciphertext volume is
counted in bytes of ``scheme.request_bytes``, which carries each scheme's padding (rlwe:
ceil(T / N) blocks of N token coefficients per feature; glwe: ceil(k / N) GLWEs per token),
so one form fits every scheme. For a product of T rows, k inputs and n outputs, with
``in_b = request_bytes(T, k)`` and ``out_b = request_bytes(T, n)`` (the result's volume,
as a request of its shape):

    client  = per_request + enc * in_b + dec * out_b
    worker  = per_request + per_value * T n + per_mac * n in_b + per_byte * (in_b + out_b)
    result  = result_ratio * out_b + result_overhead   (bytes)

``per_value`` is GLWE's key switch per output value, ``per_mac`` the products of every
output with the whole input (rlwe's GEMMs), ``per_byte`` reading and writing ciphertexts
(rlwe's mask expansion and packing), ``per_request`` a call's fixed cost; non-negative
least squares on the relative errors lets each scheme's data pick its terms. Seconds
become cycles by multiplying with the measuring CPU's clock (``cpu_ghz``, read from
/proc/cpuinfo unless given): "cycles" are cycles of that CPU running the scheme with all
its cores, the unit the planner scales by each device's frequency.

``per_sample`` turns a fit into the planner's per-sample figures for a workload: training
sequences of ``seq_len`` tokens, ``batch`` of them per encrypted request (the client's
micro-batch: its tokens share each request, and rlwe pads them to N), through one LoRA
step of a model of a supported family (or its first ``layers`` blocks; forward products of every outsourced op, backward products
of every op but the first block's q/k/v, as the core client does).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hetune.crypto.registry import DEFAULT_SCHEME, get_scheme
from hetune.crypto.keys import generate_keys
from hetune.errors import ConfigError, HetuneError
from hetune.files import write_json

# The fits shipped with hetune, one file per scheme (a cost file holds one scheme's sets).
SHIPPED = {DEFAULT_SCHEME: Path(__file__).with_name("default_costs.json"),
           "glwe": Path(__file__).with_name("default_costs_glwe.json")}
_REMEASURE = "write one with: hetune plan measure [--scheme glwe] --out costs.json"


@dataclass(frozen=True)
class ParamSetCosts:
    """Fitted costs of one parameter set: seconds on the measuring CPU, bytes."""

    name: str
    client_s_per_request: float  # client, fixed per product (encryption and decryption)
    enc_s_per_byte: float  # client, per byte of the request
    dec_s_per_byte: float  # client, per byte of the output's volume
    srv_s_per_request: float  # worker, fixed per product
    srv_s_per_value: float  # worker, per clear output value
    srv_s_per_mac_byte: float  # worker, per output column and byte of the request
    srv_s_per_byte: float  # worker, per byte of the request and of the output's volume
    result_ratio: float  # result bytes per byte of the output's volume
    result_overhead_bytes: float


@dataclass(frozen=True)
class CostModel:
    scheme: str
    cpu_ghz: float  # clock of the measuring CPU: cycles = seconds * cpu_ghz * 1e9
    sets: dict[str, ParamSetCosts]
    measured: dict  # when, where, shapes: provenance

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "cpu_ghz": self.cpu_ghz, "measured": self.measured,
                "sets": {k: asdict(v) for k, v in self.sets.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "cost file") -> "CostModel":
        try:
            scheme = get_scheme(data["scheme"])
            sets = {k: ParamSetCosts(**v) for k, v in data["sets"].items()}
            model = cls(scheme.name, float(data["cpu_ghz"]), sets, dict(data.get("measured", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{source} is not a hetune cost file ({type(err).__name__}: {err})", _REMEASURE) from err
        for name in sets:
            if name not in scheme.param_sets:
                raise ConfigError(f"{source}: set {name!r} is not one of scheme {scheme.name!r}'s "
                                  f"({', '.join(scheme.param_sets)})", _REMEASURE)
        return model


def load_costs(path: Path | None = None, scheme: str | None = None) -> CostModel:
    """A cost file, or the fit shipped for ``scheme`` (default rlwe); a file of another scheme is refused."""
    if path is None:
        name = get_scheme(scheme).name
        if name not in SHIPPED:
            raise ConfigError(f"hetune ships no cost fit for scheme {name!r}",
                              f"measure one: hetune plan measure --scheme {name} --out costs.json")
        path = SHIPPED[name]
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"cost file {path} does not exist", _REMEASURE) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"cost file {path} is not valid JSON ({err})", _REMEASURE) from err
    model = CostModel.from_dict(data, str(path))
    if scheme is not None and model.scheme != get_scheme(scheme).name:
        raise ConfigError(f"cost file {path} is for scheme {model.scheme!r}, not {scheme!r}",
                          f"drop --scheme, or measure one: hetune plan measure --scheme {scheme} --out costs.json")
    return model


def save_costs(model: CostModel, path: Path) -> None:
    """Atomic: temp file in the same directory, then rename."""
    write_json(path, model.to_dict())


# ---- per-sample figures for a workload ---------------------------------------------


@dataclass(frozen=True)
class Product:
    """One encrypted product per request: (rows, k) @ (k, n_out)."""

    k: int
    n_out: int


def workload_products(model: str, layers: int = 0) -> list[Product]:
    """Encrypted products of one LoRA training step (forward and backward) of ``model``'s first ``layers``
    decoder blocks (0: all)."""
    from hetune.models.families import family_of
    from hetune.models.loading import load_config

    c = load_config(model)
    ops = [(k, n) for _, k, n in family_of(c, model).op_shapes(c)]  # (in, out) of the block's fused ops, first one first
    products = []
    if layers > c.num_hidden_layers:
        raise ConfigError(f"[workload] layers={layers}: {model} has only {c.num_hidden_layers} decoder blocks",
                          f"use layers between 1 and {c.num_hidden_layers}, or 0 for all")
    for layer in range(layers or c.num_hidden_layers):
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
    key_bytes: int  # the session key the worker holds for the owner's session (0: none)
    security_bits: int


def per_sample(costs: CostModel, param_set: str, model: str, seq_len: int, batch: int = 1, layers: int = 0) -> SampleCosts:
    """One sequence's share of the requests of a micro-batch of ``batch`` sequences (T = batch * seq_len rows)."""
    scheme = get_scheme(costs.scheme)
    params, p = scheme.params(param_set), costs.sets[param_set]
    rows = batch * seq_len
    client_s = server_s = up = down = 0.0
    for prod in workload_products(model, layers):
        in_b, out_b = scheme.request_bytes(params, rows, prod.k), scheme.request_bytes(params, rows, prod.n_out)
        client_s += p.client_s_per_request + p.enc_s_per_byte * in_b + p.dec_s_per_byte * out_b
        server_s += (p.srv_s_per_request + p.srv_s_per_value * rows * prod.n_out + p.srv_s_per_mac_byte * prod.n_out * in_b
                     + p.srv_s_per_byte * (in_b + out_b))
        up += in_b
        down += p.result_ratio * out_b + p.result_overhead_bytes
    g = costs.cpu_ghz / batch
    return SampleCosts(client_s * g, up * 8e-6 / batch, server_s * g, down * 8e-6 / batch,
                       params.session_key_bytes, params.security.bits)


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


# (rows, k, n_out): the ratio of output-times-input to input-plus-output volume spans 1..85
# so per_mac and per_byte separate, and many rows of tiny products pin per_value against
# per_request; about 850 output values in all, since GLWE pays a key switch for each.
MEASURE_SHAPES = ((4, 32, 64), (2, 3000, 32), (1, 256, 128), (1, 16, 128), (2, 1024, 8), (32, 16, 4), (128, 8, 1))


def _fit_nonneg(rows: list[list[float]], y: list[float]) -> tuple[list[float], float]:
    """Non-negative coefficients minimising the relative errors (the shapes span 1 ms to seconds),
    and the worst relative error of the fit at the measured points."""
    import numpy as np
    from scipy.optimize import nnls

    a, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    coef = nnls(a / b[:, None], np.ones_like(b))[0]
    return [float(v) for v in coef], float(np.max(np.abs(a @ coef - b) / b))


def measure_param_set(scheme: str, name: str, shapes=MEASURE_SHAPES, repeats: int = 1, echo=None) -> tuple[ParamSetCosts, dict]:
    """Time key generation, encryption, the worker's product and decryption of ``shapes`` under one set.

    Each primitive keeps the fastest of ``repeats`` runs per shape (the least disturbed
    by other load on the machine); the repeats go round all shapes in turn, so a burst of
    load spoils one run of several shapes, not every run of one. Every decrypted result is
    checked against the clear product within the set's noise bound (0 for an exact scheme).
    """
    import numpy as np
    import torch

    sch = get_scheme(scheme)
    params = sch.params(name)
    t0 = time.perf_counter()
    keys = generate_keys(scheme, name)
    keygen_s = time.perf_counter() - t0
    state = sch.open_session(params, keys.session_key())
    rng = np.random.default_rng(0)
    warm = rng.integers(0, 256, (1, 16))  # warm-up: one small product, untimed
    keys.decrypt(sch.multiply(params, state, keys.encrypt(warm), torch.from_numpy(rng.integers(-127, 128, (4, 16)))), 1, 4)
    data = [(rng.integers(0, 256, (rows, k)), rng.integers(-127, 128, (n, k))) for rows, k, n in shapes]
    best = [[math.inf] * 3 for _ in shapes]  # (enc, worker, dec) seconds per shape
    result_bytes = [0] * len(shapes)
    max_err = 0
    for _ in range(repeats):
        for i, ((rows, k, n), (x, w)) in enumerate(zip(shapes, data)):
            t = time.perf_counter()
            body = keys.encrypt(x)
            t1 = time.perf_counter()
            blob = sch.multiply(params, state, body, torch.from_numpy(w))
            t2 = time.perf_counter()
            raw = keys.decrypt(blob, rows, n)
            t3 = time.perf_counter()
            best[i] = [min(b, s) for b, s in zip(best[i], (t1 - t, t2 - t1, t3 - t2))]
            if len(body) != (want := sch.request_bytes(params, rows, k)):
                raise HetuneError(f"{scheme}/{name}: a {rows}x{k} request is {len(body)} bytes, request_bytes says {want}")
            result_bytes[i] = len(blob)
            max_err = max(max_err, int(np.abs(raw - x @ w.T).max()))
            if max_err > params.noise_bound:
                raise HetuneError(f"{scheme}/{name}: decrypted result off by {max_err}, beyond the set's bound {params.noise_bound}")
    enc, dec, srv, res = [], [], [], []
    for (rows, k, n), (te, ts, td), size in zip(shapes, best, result_bytes):
        in_b, out_b = sch.request_bytes(params, rows, k), sch.request_bytes(params, rows, n)
        enc.append(([1.0, in_b], te))
        srv.append(([1.0, rows * n, n * in_b, in_b + out_b], ts))
        dec.append(([1.0, out_b], td))
        res.append(([out_b, 1.0], size))
        if echo:
            echo(f"  {scheme}/{name}: ({rows}x{k}) @ ({k}x{n}): enc {te * 1e3:.1f} ms, worker {ts * 1e3:.1f} ms, "
                 f"dec {td * 1e3:.1f} ms, {in_b:,} B up, {size:,} B down")
    fits = {what: _fit_nonneg([r for r, _ in pts], [y for _, y in pts]) for what, pts in
            (("enc", enc), ("srv", srv), ("dec", dec), ("res", res))}
    (e0, e), (s0, v, mac, byte), (d0, d), (ratio, over) = (fits[w][0] for w in ("enc", "srv", "dec", "res"))
    costs = ParamSetCosts(name, e0 + d0, e, d, s0, v, mac, byte, ratio, over)
    return costs, {"keygen_s": keygen_s, "max_abs_error": max_err, "enc_worker_dec_s": best,
                   "fit_max_rel_error": {w: fits[w][1] for w in ("enc", "srv", "dec")}}


def measure_costs(scheme: str = DEFAULT_SCHEME, param_sets=None, cpu_ghz: float | None = None, repeats: int = 1,
                  echo=None) -> CostModel:
    """Measure every allow-listed set of ``scheme`` (or ``param_sets``) on this machine and fit the cost model."""
    import platform

    sch = get_scheme(scheme)
    names = tuple(param_sets or sch.param_sets)
    ghz = cpu_ghz if cpu_ghz is not None else cpu_ghz_here()
    if ghz <= 0:
        raise ConfigError(f"cpu_ghz={ghz} must be > 0", "pass the measuring CPU's clock, e.g. --cpu-ghz 2.5")
    sets, extra, load = {}, {}, os.getloadavg()[0]  # load at the start and the end: other jobs slow the timings
    for name in names:
        sets[name], extra[name] = measure_param_set(sch.name, name, repeats=repeats, echo=echo)
    info = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_1m": [load, os.getloadavg()[0]], "shapes": [list(s) for s in MEASURE_SHAPES],
            "repeats": repeats, "per_set": extra}
    return CostModel(sch.name, ghz, sets, info)


def measure_and_save(out: Path, scheme: str = DEFAULT_SCHEME, param_sets=(), cpu_ghz: float | None = None,
                     repeats: int = 1, echo=None) -> CostModel:
    """``hetune plan measure``: validate, measure, write atomically."""
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be >= 1", "pass --repeats 1 or more")
    sch = get_scheme(scheme)  # an unknown scheme or set fails before minutes of measuring
    for name in param_sets:
        sch.params(name)
    model = measure_costs(sch.name, param_sets or None, cpu_ghz, repeats, echo)
    save_costs(model, out)
    return model
