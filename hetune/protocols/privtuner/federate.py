"""``hetune federate privtuner``: the planner's data owners fine-tune one model privately through one worker at once.

Input: the ``privtuner.json`` that ``hetune plan privtuner`` wrote (the allocation, the
baselines, and the cell and cost fit it was planned on). Each of the cell's owners trains
the cell's model (``[workload]`` model and its first ``layers`` blocks, ``seq_len``,
``batch``, ``samples / batch`` steps) on its own documents of
:func:`hetune.data.federated.make_federated_text`, with its own keys at the parameter set
the plan chose, through one loopback worker serving one bundle; all owners at the same time.

The cell's hardware is emulated on this one machine, and every resource the plan assigns
is enforced in wall-clock time:

- device CPU ``f_n``: the owner's encryption and decryption run alone on the machine (a
  lock over all its cores), then the owner waits until the phase has lasted
  ``busy * M / f_n``, M being the clock the cost fit counts cycles in (this machine's);
- uplink ``b_n, p_n``: each request is held back ``bits / R_n`` with the Shannon rate
  ``R_n = b_n log2(1 + p_n h_n / (N0 b_n))`` before it is sent; the downlink likewise at
  the cell's ``downlink_mbps``;
- server share ``f_s,n``: the worker's product runs alone on the machine, and its answer
  reaches the owner after ``busy * M / f_s,n``.

Only one phase computes at a time, so the machine stands for N devices and the server
only while their demands fit (sum of f_n / M and of the server's share below one); the
time an owner waits for the machine is measured and reported (``wait_s``), as is the
owner's own clear compute (model body, loss, optimizer), which the planner does not model
(``other_s``). An owner cannot be emulated faster than the machine: a plan giving a device
or server share above M is refused.

Measured per owner: the phases' times, the energy proxy ``kappa C f^2 + p T_up +
kappa_s G f_s^2`` with C and G the measured busy seconds times M, against the planner's
prediction for the same allocation (fit error); the measured objective against the
baselines' planned objectives. With ``solo``, every owner's adapter is compared with its
solo ``quantized`` run (same loop, same data, same seed): batched RLWE is exact, so they
must be equal bit for bit. With ``allocation`` set to a baseline's name, the same owners
run that baseline's allocation from the same plan file, so the objectives can be compared
measured against measured.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetune.errors import ConfigError, HetuneError
from hetune.files import write_json

_REPLAN = "plan it with this hetune: hetune plan privtuner --cell CELL --out DIR, then pass --plan DIR/privtuner.json"
PLAN_OWNER_KEYS = ("param_set", "bandwidth_mhz", "power_w", "cpu_ghz", "server_ghz")


@dataclass(frozen=True)
class FederateConfig:
    plan: Path
    out: Path = Path("runs/privtuner-federate")
    task: str = "knowledge"  # each owner's private documents: knowledge (company facts by topic) or text (stdlib prose)
    lr: float = 5e-3  # AdamW on the LoRA adapters, constant
    lora_r: int = 8
    clip_norm: float = 1.0
    max_docs: int = 0  # > 0: at most this many documents per owner
    seed: int = 0  # owner n's LoRA init and batch order use seed + n
    solo: bool = True  # also run each owner alone on the quantized backend; adapters must be equal bit for bit
    allocation: str = "plan"  # which allocation of the plan file to run: "plan", or a baseline's name (equal_bandwidth, ...)

    def __post_init__(self) -> None:
        from hetune.data.federated import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is unknown", f"use one of {', '.join(TASKS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.lora_r < 1 or not self.clip_norm > 0 or self.max_docs < 0:
            raise ConfigError(f"lr={self.lr}, lora_r={self.lora_r}, clip_norm={self.clip_norm}, max_docs={self.max_docs} out of range",
                              "pass a positive --lr and --lora-r, and --max-docs >= 0")


@dataclass(frozen=True)
class OwnerPlan:
    param_set: str
    bandwidth_mhz: float
    power_w: float
    cpu_ghz: float
    server_ghz: float


@dataclass(frozen=True)
class LoadedPlan:
    cell: object  # hetune.protocols.privtuner.cell.Cell
    costs: object  # hetune.protocols.privtuner.costs.CostModel
    omega: float
    owners: tuple[OwnerPlan, ...]
    objective: float  # the planned objective of the allocation in ``owners``
    baselines: dict  # name -> planned summary, or None where infeasible
    allocation: str = "plan"  # whose allocation ``owners`` is: the plan's, or a baseline's


def _bad(path: Path, problem: str, hint: str = _REPLAN) -> ConfigError:
    return ConfigError(f"plan {path}: {problem}", hint)


def load_plan(path: Path, allocation: str = "plan") -> LoadedPlan:
    """Read and check a ``hetune plan privtuner`` output; every problem is a ConfigError naming it.

    ``allocation``: run the plan's owners ("plan") or those of one of the baselines the
    planner wrote next to it (same cell, same cost fit), to measure the objective each reaches.
    """
    from hetune.protocols.privtuner.cell import parse_cell
    from hetune.protocols.privtuner.costs import CostModel

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"plan file {path} does not exist", _REPLAN) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read plan file {path}: {err}", _REPLAN) from err
    except json.JSONDecodeError as err:
        raise _bad(path, f"not valid JSON ({err})") from err
    plan = data.get("plan") if isinstance(data, dict) else None
    if not isinstance(plan, dict) or not isinstance(plan.get("owners"), list):
        raise _bad(path, "not a `hetune plan privtuner` output (no plan.owners)")
    baselines = data.get("baselines") if isinstance(data.get("baselines"), dict) else {}
    if allocation != "plan":
        if allocation not in baselines:
            raise ConfigError(f"plan {path} has no baseline {allocation!r}",
                              f"use plan or one of {', '.join(baselines) or '(none written)'}")
        plan = baselines[allocation]
        if not isinstance(plan, dict) or not isinstance(plan.get("owners"), list):
            raise ConfigError(f"plan {path}: baseline {allocation!r} is infeasible on this cell (no owners)",
                              f"use plan or another of {', '.join(k for k, v in baselines.items() if v)}")
    inputs = data.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("cell"), str) or not isinstance(inputs.get("costs"), dict):
        raise _bad(path, "holds no cell and cost fit (written by an older hetune?)")
    try:
        cell = parse_cell(tomllib.loads(inputs["cell"]), f"{path} (its cell)")
    except tomllib.TOMLDecodeError as err:
        raise _bad(path, f"its cell is not valid TOML ({err})") from err
    costs = CostModel.from_dict(inputs["costs"], f"{path} (its cost fit)")
    omega = data.get("omega")
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not omega >= 0:
        raise _bad(path, f"omega={omega!r} must be a number >= 0")
    owners = []
    for n, o in enumerate(plan["owners"], 1):
        if not isinstance(o, dict) or any(k not in o for k in PLAN_OWNER_KEYS):
            raise _bad(path, f"owner {n} lacks one of {', '.join(PLAN_OWNER_KEYS)}")
        if o["param_set"] not in costs.sets:
            raise _bad(path, f"owner {n}'s param_set {o['param_set']!r} is not one of the cost fit's ({', '.join(costs.sets)})")
        values = [o[k] for k in PLAN_OWNER_KEYS[1:]]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)) for v in values):
            raise _bad(path, f"owner {n}: bandwidth, power and frequencies must be positive numbers, got {values}")
        owners.append(OwnerPlan(o["param_set"], *map(float, values)))
    if len(owners) != len(cell.owners):
        raise _bad(path, f"plans {len(owners)} owners but its cell has {len(cell.owners)}")
    return LoadedPlan(cell, costs, float(omega), tuple(owners), float(plan.get("objective", math.nan)), dict(baselines), allocation)


def check_runnable(lp: LoadedPlan) -> None:
    """An allocation beyond the cell's capacities, or what this machine cannot emulate: before any model is loaded
    or output written."""
    from hetune.protocols.privtuner.system import violation

    inst, choice, alloc = predictions(lp)
    c = lp.cell
    shares = {"bandwidth_mhz": (alloc.b.sum(), c.bandwidth_mhz), "server_ghz": (alloc.fs.sum(), c.server_ghz)}
    for name, (used, cap) in shares.items():
        if used > cap * (1 + 1e-6):
            raise ConfigError(f"the plan's owners use {used:.6g} of the cell's {name} = {cap:g}",
                              "use the plan `hetune plan privtuner` wrote, unedited, or plan the cell again")
    for n, o in enumerate(lp.owners):
        if o.power_w > inst.pmax[n] * (1 + 1e-6) or o.cpu_ghz > inst.fmax[n] * (1 + 1e-6):
            raise ConfigError(f"owner {n + 1}'s power {o.power_w:.4g} W or cpu {o.cpu_ghz:.4g} GHz is above its cell's maximum "
                              f"({inst.pmax[n]:g} W, {inst.fmax[n]:g} GHz)", "use the plan `hetune plan privtuner` wrote, or plan again")
    late = violation(inst, choice, alloc)
    if late > 1e-3:
        raise ConfigError(f"the plan misses the cell's deadline or capacities by {late:.1%}", "plan the cell again")
    machine = lp.costs.cpu_ghz
    for n, o in enumerate(lp.owners, 1):
        for what, ghz in (("device cpu_ghz", o.cpu_ghz), ("server_ghz share", o.server_ghz)):
            if ghz > machine * (1 + 1e-9):
                raise ConfigError(
                    f"owner {n}'s {what} {ghz:.4g} GHz is above this machine's {machine:.4g} GHz (the cost fit's clock): "
                    "a phase cannot be run faster than the machine", "plan a cell whose max_cpu_ghz and server_ghz are at most "
                    f"{machine:.4g} (see docs/examples/cell_smollm2.toml)")
    cell = lp.cell
    for n, o in enumerate(cell.owners, 1):
        if o.samples % cell.batch:
            raise ConfigError(f"owner {n}'s samples={o.samples} is not a multiple of [workload] batch={cell.batch}",
                              "a step trains one batch: make every owner's samples a multiple of batch")


# ---- the emulated cell --------------------------------------------------------------


@dataclass
class Meter:
    """One owner's measured phases (seconds, bits)."""

    device_busy_s: float = 0.0  # encryption and decryption alone on the machine
    device_s: float = 0.0  # the same phases stretched to the owner's clock
    server_busy_s: float = 0.0  # the worker's products alone on the machine (with the loopback request)
    server_s: float = 0.0  # stretched to the owner's server share
    worker_s: float = 0.0  # of server_busy_s, the worker's own product time (its x-worker-seconds); the rest is HTTP
    uplink_bits: int = 0
    uplink_s: float = 0.0  # measured time the rate limiter held the requests
    downlink_bits: int = 0
    downlink_s: float = 0.0
    wait_s: float = 0.0  # waiting for the machine while another phase ran
    round_trips: int = 0


class Machine:
    """This computer as the cell's hardware: one compute phase at a time on all its cores, then stretched."""

    def __init__(self, ghz: float):
        self.ghz = ghz
        self._lock = threading.RLock()  # reentrant: a retried product re-encrypts inside the worker's phase

    def phase(self, fn, ghz: float, meter: Meter) -> tuple[object, float, float]:
        """``fn()``'s result, its busy seconds, and the seconds it lasted at ``ghz`` (waited out)."""
        t0 = time.perf_counter()
        with self._lock:
            t1 = time.perf_counter()
            result = fn()
            busy = time.perf_counter() - t1
        meter.wait_s += t1 - t0
        target = busy * self.ghz / ghz
        _hold(target - busy)
        return result, busy, target


def _hold(seconds: float) -> float:
    """Sleep ``seconds`` (at least); the time actually slept."""
    t0 = time.perf_counter()
    if seconds > 0:
        time.sleep(seconds)
    return time.perf_counter() - t0


class EmulatedKeys:
    """An owner's keys whose encryption and decryption run on its emulated device; everything else passes through."""

    def __init__(self, keys, machine: Machine, ghz: float, meter: Meter):
        self._keys, self._machine, self._ghz, self._meter = keys, machine, ghz, meter

    def _device(self, fn, *args):
        result, busy, lasted = self._machine.phase(lambda: fn(*args), self._ghz, self._meter)
        self._meter.device_busy_s += busy
        self._meter.device_s += lasted
        return result

    def encrypt(self, q):
        return self._device(self._keys.encrypt, q)

    def decrypt(self, blob, rows, out_cols):
        return self._device(self._keys.decrypt, blob, rows, out_cols)

    def __getattr__(self, name):
        return getattr(self._keys, name)


class EmulatedLink:
    """The owner's transport behind its uplink and downlink rates, and the worker's products at its server share."""

    def __init__(self, inner, machine: Machine, uplink_mbps: float, downlink_mbps: float, server_ghz: float, meter: Meter):
        self._inner, self._machine, self._meter = inner, machine, meter
        self.uplink_mbps, self.downlink_mbps, self.server_ghz = uplink_mbps, downlink_mbps, server_ghz

    def run(self, op: str, direction: str, payload, rows: int, cols: int) -> tuple[bytes, float]:
        m = self._meter
        body = payload()  # encrypted on the device (EmulatedKeys)
        m.uplink_bits += 8 * len(body)
        m.uplink_s += _hold(8 * len(body) / (self.uplink_mbps * 1e6))
        first = [body]

        def tries() -> bytes:  # the first try sends what the uplink carried; a retry encrypts afresh
            return first.pop() if first else payload()

        (result, worker_s), busy, lasted = self._machine.phase(
            lambda: self._inner.run(op, direction, tries, rows, cols), self.server_ghz, m)
        m.server_busy_s += busy
        m.server_s += lasted
        m.worker_s += worker_s
        m.downlink_bits += 8 * len(result)
        m.downlink_s += _hold(8 * len(result) / (self.downlink_mbps * 1e6))
        m.round_trips += 1
        return result, worker_s

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---- model, data, training ----------------------------------------------------------


def first_blocks(loaded, layers: int):
    """Keep the model's first ``layers`` decoder blocks (0: all), in place; the embeddings, final norm and head stay."""
    from hetune.models.layers import decoder_layers

    model = loaded.model
    if layers:
        blocks = decoder_layers(model)
        del blocks[layers:]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return loaded


def compile_bundle(cell, out: Path):
    """The worker's bundle of the cell's model (its first blocks) in ``out``; returns the tokenizer."""
    from hetune.compile.bundle import write_bundle
    from hetune.compile.compiler import CompileConfig, compile_model
    from hetune.models.loading import load_model

    loaded = first_blocks(load_model(cell.model), cell.layers)
    compiled = compile_model(loaded, CompileConfig(), progress=False)
    write_bundle(out, compiled.manifest, compiled.tensors, compiled.report, overwrite=True)  # a rerun's bundle replaces the last
    return loaded.tokenizer


def owner_model(cell, backend: str, seed: int, lora_r: int, **private):
    """The data owner's private model: the cell's model (its first blocks), LoRA with ``seed``, on ``backend``.

    Loaded with its weights so the bundle's fingerprint is checked against exactly these blocks; the
    outsourced ones are then dropped (:func:`~hetune.protocols.hybrid_lora.owner.client.make_private`)."""
    from hetune.models.loading import load_model
    from hetune.protocols.hybrid_lora.owner.client import LoraSettings, make_private, wrap_lora

    loaded = first_blocks(load_model(cell.model), cell.layers)
    model = wrap_lora(loaded.model, LoraSettings(r=lora_r), seed)
    return make_private(model, backend, tokenizer=loaded.tokenizer, **private)


def train_owner(pm, blocks, steps: int, batch: int, cfg: FederateConfig, seed: int) -> list[float]:
    """The owner's loop, the same on every backend: AdamW on the adapters, clipped, ``steps`` batches."""
    import torch

    from hetune.data.text import BlockSampler

    params = [p for p in pm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    sampler = BlockSampler(blocks, batch, seed)
    pm.model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ids = sampler.next()
        loss = pm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        losses.append(float(loss))
    return losses


def adapter_state(pm) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm.model).items()}


# ---- the run ------------------------------------------------------------------------


@dataclass
class OwnerRun:
    index: int
    plan: OwnerPlan
    steps: int
    blocks: object
    pm: object = None
    meter: Meter = field(default_factory=Meter)
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    error: BaseException | None = None


def predictions(lp: LoadedPlan):
    """(instance, choice, allocation): the planner's model of this cell at the plan's allocation."""
    import numpy as np

    from hetune.protocols.privtuner.system import Allocation, build_instance

    inst = build_instance(lp.cell, lp.costs)
    choice = np.array([inst.sets.index(o.param_set) for o in lp.owners])
    alloc = Allocation(*(np.array([getattr(o, k) for o in lp.owners]) for k in PLAN_OWNER_KEYS[1:]))
    return inst, choice, alloc


def run_federate(cfg: FederateConfig, echo=print) -> dict:
    """Run every planned owner at once through one worker; returns (and writes to ``out/federate.json``) the report."""
    import numpy as np
    import torch

    from hetune.compile.bundle import load_bundle
    from hetune.crypto.keys import generate_keys
    from hetune.data.federated import make_federated_text
    from hetune.data.text import pack
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker, ServeConfig
    from hetune.protocols.privtuner.system import objective, owner_energy, owner_times, rate

    lp = load_plan(cfg.plan, cfg.allocation)
    check_runnable(lp)
    cell, n_owners = lp.cell, len(lp.owners)
    data = make_federated_text(cfg.task, n_owners, cfg.seed, cfg.max_docs)  # bad task/owner count fails before any model
    inst, choice, alloc = predictions(lp)
    t_start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    echo(f"compiling {cell.model}" + (f" (first {cell.layers} blocks)" if cell.layers else ""))
    bundle_dir = cfg.out / "bundle"
    tokenizer = compile_bundle(cell, bundle_dir)
    compile_s = time.perf_counter() - t_start
    runs = [OwnerRun(n, o, cell.owners[n].samples // cell.batch, pack(data.clients[n], tokenizer, cell.seq_len))
            for n, o in enumerate(lp.owners)]

    solo = {}
    if cfg.solo:
        for r in runs:
            pm = owner_model(cell, "quantized", cfg.seed + r.index, cfg.lora_r, bundle=bundle_dir)
            solo[r.index] = (train_owner(pm, r.blocks, r.steps, cell.batch, cfg, cfg.seed + r.index), adapter_state(pm))

    machine = Machine(lp.costs.cpu_ghz)
    worker = LoopbackWorker(load_bundle(bundle_dir), ServeConfig(max_sessions=max(8, n_owners)))
    try:
        for r in runs:
            keys = EmulatedKeys(generate_keys(lp.costs.scheme, r.plan.param_set), machine, r.plan.cpu_ghz, r.meter)
            r.pm = owner_model(cell, "remote", cfg.seed + r.index, cfg.lora_r, workers=(worker.url,), keys=keys)
            up = float(rate(r.plan.bandwidth_mhz, r.plan.power_w, inst.g[r.index]))
            r.pm.backend.transport = EmulatedLink(r.pm.backend.transport, machine, up, cell.downlink_mbps, r.plan.server_ghz, r.meter)
        start = threading.Barrier(n_owners)

        def owner(r: OwnerRun) -> None:
            try:
                start.wait()
                t0 = time.perf_counter()
                r.losses = train_owner(r.pm, r.blocks, r.steps, cell.batch, cfg, cfg.seed + r.index)
                r.wall_s = time.perf_counter() - t0
            except BaseException as err:  # reported below, with the owner's number
                r.error = err

        echo(f"{n_owners} owners training at once through {worker.url} ({', '.join(o.param_set for o in lp.owners)})")
        threads = [threading.Thread(target=owner, args=(r,), name=f"owner-{r.index + 1}") for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in runs:
            if r.error is not None:
                if isinstance(r.error, HetuneError):
                    raise type(r.error)(f"owner {r.index + 1}: {r.error.message}", r.error.hint) from r.error
                raise r.error
    finally:
        for r in runs:
            if r.pm is not None:
                r.pm.close()
        worker.stop()

    times, energy = owner_times(inst, choice, alloc), owner_energy(inst, choice, alloc)
    idx = np.arange(n_owners)
    parts = {"device_s": inst.C[idx, choice] / alloc.f, "uplink_s": inst.S[idx, choice] / rate(alloc.b, alloc.p, inst.g),
             "server_s": inst.G[idx, choice] / alloc.fs, "downlink_s": inst.Tdl[idx, choice]}
    rows, measured_energy = [], []
    for r in runs:
        m, n = r.meter, r.index
        e = (inst.kc * m.device_busy_s * machine.ghz * r.plan.cpu_ghz**2 + r.plan.power_w * m.uplink_s
             + inst.ks * m.server_busy_s * machine.ghz * r.plan.server_ghz**2)
        measured_energy.append(e)
        modelled = m.device_s + m.uplink_s + m.server_s + m.downlink_s
        state = adapter_state(r.pm)
        adapter_dir = cfg.out / f"owner-{n + 1}" / "adapter"
        r.pm.model.save_pretrained(adapter_dir, save_embedding_layers=False)
        equal = None
        if cfg.solo:
            ref = solo[n][1]
            equal = state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
        rows.append({
            "owner": n + 1, **asdict(r.plan), "steps": r.steps, "samples": cell.owners[n].samples,
            "security_bits": float(inst.phi[choice[n]]), "uplink_mbps": float(rate(r.plan.bandwidth_mhz, r.plan.power_w, inst.g[n])),
            "measured": {**asdict(m), "wall_s": r.wall_s, "modelled_s": modelled, "other_s": r.wall_s - modelled - m.wait_s,
                         "energy_j": e, "uplink_mbps_effective": m.uplink_bits / 1e6 / m.uplink_s if m.uplink_s else None},
            "predicted": {"time_s": float(times[n]), "energy_j": float(energy[n]), **{k: float(v[n]) for k, v in parts.items()}},
            "fit_error": {"time": r.wall_s / times[n] - 1, "modelled_time": modelled / times[n] - 1, "energy": e / energy[n] - 1,
                          **{k: (getattr(m, k) / parts[k][n] - 1) if parts[k][n] else None for k in parts}},
            "losses": r.losses, "solo_losses": solo[n][0] if cfg.solo else None, "equal_to_solo": equal,
            "adapter": str(adapter_dir),
        })
    planned = objective(inst, choice, alloc, lp.omega)
    measured_obj = float(sum(measured_energy) - lp.omega * inst.phi[choice].sum())
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "workload": {"model": cell.model, "layers": cell.layers, "seq_len": cell.seq_len, "batch": cell.batch, "scheme": lp.costs.scheme},
        "allocation": lp.allocation, "machine_ghz": machine.ghz, "deadline_s": cell.deadline_s, "omega": lp.omega, "owners": rows,
        "objective": {"planned": planned, "plan_file": lp.objective, "measured": measured_obj,
                      "measured_energy_j": float(sum(measured_energy)), "security_bits": float(inst.phi[choice].sum()),
                      "baselines_planned": {k: (v or {}).get("objective") for k, v in lp.baselines.items()}},
        "all_equal_to_solo": all(r["equal_to_solo"] for r in rows) if cfg.solo else None,
        "compile_s": compile_s, "wall_s": time.perf_counter() - t_start,
        "max_rss_mib": _max_rss_mib(), "load_avg_1m": os.getloadavg()[0],
    }
    write_json(cfg.out / "federate.json", report)
    if cfg.solo and not report["all_equal_to_solo"]:
        bad = [r["owner"] for r in rows if not r["equal_to_solo"]]
        raise HetuneError(f"owners {bad}: the adapter differs from the solo quantized run's (report in {cfg.out / 'federate.json'})",
                          "this is a bug: batched RLWE is exact; please report it with the plan file")
    return report


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_report(report: dict) -> str:
    """Per owner: planned vs measured time and energy; then the objective against the baselines."""
    w = report["workload"]
    lines = [f"{w['model']}" + (f" (first {w['layers']} blocks)" if w["layers"] else "") +
             f", seq_len {w['seq_len']}, batch {w['batch']}, {w['scheme']}; deadline {report['deadline_s']:g} s; "
             f"allocation: {report['allocation']}", "",
             f"{'owner':>5} {'set':>5} {'steps':>5} {'time pred':>9} {'measured':>9} {'fit':>7} {'wait':>7} "
             f"{'energy pred':>11} {'measured':>10} {'fit':>7} {'= solo':>6}"]
    for o in report["owners"]:
        p, m, f = o["predicted"], o["measured"], o["fit_error"]
        same = {True: "yes", False: "NO", None: "-"}[o["equal_to_solo"]]
        lines.append(f"{o['owner']:>5} {o['param_set']:>5} {o['steps']:>5} {p['time_s']:>8.1f}s {m['wall_s']:>8.1f}s "
                     f"{f['time']:>+7.1%} {m['wait_s']:>6.1f}s {p['energy_j']:>10.4g}J {m['energy_j']:>9.4g}J {f['energy']:>+7.1%} {same:>6}")
    obj = report["objective"]
    lines += ["", f"objective (energy - omega x bits): planned {obj['planned']:.4g}, measured {obj['measured']:.4g}"]
    for name, value in obj["baselines_planned"].items():
        lines.append(f"  {name:<22} planned {value:.4g}" if value is not None else f"  {name:<22} infeasible")
    return "\n".join(lines)
