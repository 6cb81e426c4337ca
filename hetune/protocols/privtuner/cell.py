"""A wireless cell: data owners (devices) and the model owner's edge server, read from TOML.

Units are in the key names (``bandwidth_mhz``, ``deadline_s``...), so a value in the
wrong unit is an unknown key with a hint, not a silent factor of a million. Channel
gain is given directly (``gain_db``, negative) or from the distance with the 3GPP
path loss ``128.1 + 37.6 log10(d_km)`` dB the spec names.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetune.errors import ConfigError
from hetune.files import write_atomic

CELL_KEYS = {
    "bandwidth_mhz": "total uplink bandwidth B",
    "noise_dbm_per_hz": "noise power spectral density N0",
    "deadline_s": "per-owner deadline T_max",
    "server_ghz": "server frequency F_s shared by the owners' products",
}
CELL_OPTIONAL = {"kappa": 1e-28, "kappa_server": 0.0, "downlink_mbps": 100.0, "server_memory_gib": math.inf}
OWNER_KEYS = {"samples": "data size D_n (training sequences)", "max_power_w": "p_max", "max_cpu_ghz": "f_max"}
WORKLOAD_DEFAULTS = {"model": "micro-llama", "seq_len": 16, "batch": 4, "layers": 0}  # batch: `hetune train --batch-size`'s default;
# layers: the model's first decoder blocks only (0: all of them), the smallest real setting of a large model


@dataclass(frozen=True)
class Owner:
    samples: int
    gain: float  # linear channel power gain h_n
    max_power_w: float
    max_cpu_ghz: float
    distance_m: float | None = None

    @property
    def gain_db(self) -> float:
        return 10 * math.log10(self.gain)


@dataclass(frozen=True)
class Cell:
    owners: tuple[Owner, ...]
    bandwidth_mhz: float
    noise_dbm_per_hz: float
    deadline_s: float
    server_ghz: float
    kappa: float = 1e-28  # effective switched capacitance: energy = kappa * cycles * f^2
    kappa_server: float = 0.0  # 0: server energy not counted (the objective is the devices' energy)
    downlink_mbps: float = 100.0  # results back to the owner (a fixed-rate broadcast; time only)
    server_memory_gib: float = math.inf  # RAM for the sessions' keys (GLWE compression keys; rlwe holds none)
    model: str = "micro-llama"
    seq_len: int = 16
    batch: int = 4  # sequences per encrypted request (the client's micro-batch): they share its ciphertexts
    layers: int = 0  # the model's first decoder blocks that are trained (0: all)
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        if not self.owners:
            raise ConfigError(f"{self.source}: the cell has no [[owner]] entries", "add at least one [[owner]] table")
        for name in ("bandwidth_mhz", "deadline_s", "server_ghz", "downlink_mbps", "server_memory_gib", "kappa"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{self.source}: {name}={getattr(self, name)} must be > 0", f"set [cell] {name} to a positive number")
        if self.kappa_server < 0:
            raise ConfigError(f"{self.source}: kappa_server={self.kappa_server} must be >= 0", "use 0 to leave server energy out")
        if self.seq_len < 1 or self.batch < 1 or self.layers < 0:
            raise ConfigError(f"{self.source}: seq_len={self.seq_len} and batch={self.batch} must be >= 1, layers={self.layers} >= 0",
                              "set [workload] seq_len, e.g. 16, batch, e.g. 4, and layers (0: all of the model's)")

    @property
    def noise_w_per_hz(self) -> float:
        return 10 ** (self.noise_dbm_per_hz / 10) / 1000


def path_loss_gain(distance_m: float) -> float:
    """Linear power gain at ``distance_m`` for 128.1 + 37.6 log10(d_km) dB."""
    return 10 ** (-(128.1 + 37.6 * math.log10(distance_m / 1000)) / 10)


def _number(table: dict, key: str, where: str, meaning: str) -> float:
    if key not in table:
        raise ConfigError(f"{where}: missing key {key!r} ({meaning})", f"add `{key} = ...` to {where}")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key}={value!r} must be a number", f"write e.g. `{key} = 1.0` (no quotes or units)")
    return float(value)


def _positive(table: dict, key: str, where: str, meaning: str) -> float:
    value = _number(table, key, where, meaning)
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{where}: {key}={value} must be a positive finite number", f"fix {key} in {where}")
    return value


def _unknown(table: dict, known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}",
                          f"known keys: {', '.join(sorted(known))} (units are part of the name, e.g. bandwidth_mhz)")


def _owner(table: dict, where: str) -> Owner:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table", "write each owner as an [[owner]] table")
    _unknown(table, set(OWNER_KEYS) | {"distance_m", "gain_db"}, where)
    samples = _positive(table, "samples", where, OWNER_KEYS["samples"])
    if samples != int(samples):
        raise ConfigError(f"{where}: samples={table['samples']} must be a whole number", "use an integer count of sequences")
    if ("distance_m" in table) == ("gain_db" in table):
        raise ConfigError(f"{where}: give exactly one of distance_m and gain_db", "e.g. `distance_m = 150` or `gain_db = -100`")
    if "distance_m" in table:
        distance = _positive(table, "distance_m", where, "distance to the server")
        gain = path_loss_gain(distance)
    else:
        distance, gain_db = None, _number(table, "gain_db", where, "channel gain")
        if gain_db >= 0:
            raise ConfigError(f"{where}: gain_db={gain_db} must be negative (a path loss)", "e.g. gain_db = -100")
        gain = 10 ** (gain_db / 10)
    return Owner(int(samples), gain, _positive(table, "max_power_w", where, OWNER_KEYS["max_power_w"]),
                 _positive(table, "max_cpu_ghz", where, OWNER_KEYS["max_cpu_ghz"]), distance)


def parse_cell(data: dict, source: str = "<memory>") -> Cell:
    _unknown(data, {"cell", "owner", "workload"}, source)
    cell = data.get("cell")
    if not isinstance(cell, dict):
        raise ConfigError(f"{source}: missing [cell] table", "add [cell] with " + ", ".join(CELL_KEYS))
    where = f"{source} [cell]"
    _unknown(cell, set(CELL_KEYS) | set(CELL_OPTIONAL), where)
    values = {k: _number(cell, k, where, m) for k, m in CELL_KEYS.items()}
    for k in CELL_OPTIONAL:
        if k in cell:
            values[k] = _number(cell, k, where, k)
    owners = data.get("owner")
    if not isinstance(owners, list):
        raise ConfigError(f"{source}: missing [[owner]] tables", "add one [[owner]] table per data owner")
    workload = data.get("workload", {})
    if not isinstance(workload, dict):
        raise ConfigError(f"{source}: [workload] must be a table", "write [workload] with model and seq_len")
    _unknown(workload, set(WORKLOAD_DEFAULTS), f"{source} [workload]")
    model = workload.get("model", WORKLOAD_DEFAULTS["model"])
    seq_len = workload.get("seq_len", WORKLOAD_DEFAULTS["seq_len"])
    batch = workload.get("batch", WORKLOAD_DEFAULTS["batch"])
    layers = workload.get("layers", WORKLOAD_DEFAULTS["layers"])
    if not isinstance(model, str) or any(isinstance(v, bool) or not isinstance(v, int) for v in (seq_len, batch, layers)):
        raise ConfigError(f"{source} [workload]: model must be a string, seq_len, batch and layers integers",
                          'e.g. model = "micro-llama", seq_len = 16, batch = 4, layers = 0')
    parsed = tuple(_owner(o, f"{source} [[owner]] #{i + 1}") for i, o in enumerate(owners))
    return Cell(parsed, model=model, seq_len=seq_len, batch=batch, layers=layers, source=source, **values)


def load_cell(path: Path) -> Cell:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"cell file {path} does not exist", "pass a TOML cell file (see docs/examples/cell.toml)") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"cell file {path} is not valid TOML: {err}", "fix the syntax (see docs/examples/cell.toml)") from err
    return parse_cell(data, str(path))


def random_cell(num_owners: int, seed: int = 0, **overrides) -> Cell:
    """A cell with the spec's typical values: owners 50-500 m away, p_max 0.2-1 W, f_max 1-2 GHz, 5-30 samples,
    10-20 MHz (times N/10 above 10 owners), a 120 s deadline and 1,500 server GHz per owner."""
    rng = np.random.default_rng(seed)
    owners = tuple(
        Owner(int(rng.integers(5, 31)), path_loss_gain(d), float(rng.uniform(0.2, 1.0)), float(rng.uniform(1.0, 2.0)), float(d))
        for d in rng.uniform(50, 500, num_owners)
    )
    # 10-20 MHz for up to 10 owners (the spec's typical cell), scaled up beyond so 50 owners stay feasible
    base = dict(bandwidth_mhz=float(rng.uniform(10, 20)) * max(1.0, num_owners / 10), noise_dbm_per_hz=-174.0, deadline_s=120.0,
                server_ghz=1500.0 * num_owners, source=f"random cell (seed {seed})")
    base.update(overrides)
    return Cell(owners, **base)


def cell_to_toml(cell: Cell) -> str:
    lines = ["[cell]"]
    for k in ("bandwidth_mhz", "noise_dbm_per_hz", "deadline_s", "server_ghz", "kappa", "kappa_server", "downlink_mbps"):
        lines.append(f"{k} = {getattr(cell, k)!r}")
    if math.isfinite(cell.server_memory_gib):
        lines.append(f"server_memory_gib = {cell.server_memory_gib!r}")
    lines += ["", "[workload]", f'model = "{cell.model}"', f"seq_len = {cell.seq_len}", f"batch = {cell.batch}",
              f"layers = {cell.layers}"]
    for o in cell.owners:
        where = f"distance_m = {o.distance_m!r}" if o.distance_m is not None else f"gain_db = {o.gain_db!r}"
        lines += ["", "[[owner]]", f"samples = {o.samples}", where, f"max_power_w = {o.max_power_w!r}", f"max_cpu_ghz = {o.max_cpu_ghz!r}"]
    return "\n".join(lines) + "\n"


def write_random_cell(path: Path, num_owners: int, seed: int = 0) -> Cell:
    """``hetune plan cell``: a random cell as TOML, written atomically."""
    if num_owners < 1:
        raise ConfigError(f"owners={num_owners} must be >= 1", "pass --owners 5, for example")
    cell = random_cell(num_owners, seed)
    write_atomic(path, f"# random cell: {num_owners} owners, seed {seed} (hetune plan cell)\n" + cell_to_toml(cell))
    return cell
