"""The optimisation model: per-owner costs of each parameter set, an allocation, and its energy.

Units inside the solvers: bandwidth MHz, frequencies GHz, data Mbit, work Gcycles,
power W, time s, energy J. For owner n under parameter set j:

    compute   C = D * c_enc(j)  Gcycles   time C / f       energy kappa C f^2
    uplink    S = D * s(j)      Mbit      rate R = b log2(1 + p g / b)   time S / R   energy p S / R
    server    G = D * c_srv(j)  Gcycles   time G / f_s     energy kappa_s G f_s^2
    downlink  D * s_out(j) / downlink rate (time only)

with ``g = h / (N0 * 1e6)`` so that ``p g / b`` is the SNR. Deadline: the four times add
up to at most ``T_max``. Shared: sum b <= B, sum f_s <= F_s, and (optional) the
sessions' keys fit the server's memory (a GLWE session holds its compression key; an
rlwe session holds nothing, so the limit never binds there). Objective: total energy minus
``omega`` times the summed privacy (security bits of the chosen sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetune.protocols.privtuner.cell import Cell
from hetune.protocols.privtuner.costs import CostModel, per_sample

GIB = 1024**3


@dataclass(frozen=True)
class Instance:
    """A cell with every owner's per-set costs laid out as arrays (owners x sets)."""

    cell: Cell
    sets: tuple[str, ...]
    phi: np.ndarray  # (J,) security bits
    mem_gib: np.ndarray  # (J,) session key held by the worker (0 for rlwe)
    C: np.ndarray  # (N, J) Gcycles on the device
    S: np.ndarray  # (N, J) Mbit uplink
    G: np.ndarray  # (N, J) Gcycles on the server
    Tdl: np.ndarray  # (N, J) s downlink
    g: np.ndarray  # (N,) SNR per W per MHz^-1
    pmax: np.ndarray  # (N,)
    fmax: np.ndarray  # (N,)

    @property
    def n(self) -> int:
        return len(self.cell.owners)

    @property
    def kc(self) -> float:  # kappa with Gcycles and GHz: kappa * 1e9 * 1e18
        return self.cell.kappa * 1e27

    @property
    def ks(self) -> float:
        return self.cell.kappa_server * 1e27


def build_instance(cell: Cell, costs: CostModel, sets: tuple[str, ...] | None = None) -> Instance:
    """The cell under the fit's scheme and its sets (default: all the fit has), least private first."""
    per = {s: per_sample(costs, s, cell.model, cell.seq_len, cell.batch, cell.layers) for s in (sets or costs.sets)}
    sets = tuple(sorted(per, key=lambda s: per[s].security_bits))
    per = [per[s] for s in sets]
    D = np.array([o.samples for o in cell.owners], dtype=float)[:, None]
    col = lambda attr: np.array([getattr(p, attr) for p in per])[None, :]  # noqa: E731
    n0 = cell.noise_w_per_hz * 1e6  # W per MHz
    return Instance(
        cell, sets, np.array([p.security_bits for p in per], dtype=float), np.array([p.key_bytes / GIB for p in per]),
        D * col("client_gcycles"), D * col("upload_mbit"), D * col("server_gcycles"), D * col("download_mbit") / cell.downlink_mbps,
        np.array([o.gain for o in cell.owners]) / n0, np.array([o.max_power_w for o in cell.owners]),
        np.array([o.max_cpu_ghz for o in cell.owners]),
    )


@dataclass(frozen=True)
class Allocation:
    b: np.ndarray  # MHz
    p: np.ndarray  # W
    f: np.ndarray  # GHz (device)
    fs: np.ndarray  # GHz (server share)


def rate(b, p, g):
    """Mbit/s of bandwidth b MHz at power p W (Shannon, FDMA)."""
    b = np.asarray(b, dtype=float)
    return b * np.log2(1 + np.asarray(p) * g / np.maximum(b, 1e-300))


def owner_times(inst: Instance, choice: np.ndarray, a: Allocation) -> np.ndarray:
    idx = np.arange(inst.n)
    C, S, G, Tdl = inst.C[idx, choice], inst.S[idx, choice], inst.G[idx, choice], inst.Tdl[idx, choice]
    with np.errstate(divide="ignore", invalid="ignore"):
        return C / a.f + S / rate(a.b, a.p, inst.g) + G / a.fs + Tdl


def owner_energy(inst: Instance, choice: np.ndarray, a: Allocation) -> np.ndarray:
    idx = np.arange(inst.n)
    C, S, G = inst.C[idx, choice], inst.S[idx, choice], inst.G[idx, choice]
    with np.errstate(divide="ignore", invalid="ignore"):
        return inst.kc * C * a.f**2 + a.p * S / rate(a.b, a.p, inst.g) + inst.ks * G * a.fs**2


def objective(inst: Instance, choice: np.ndarray, a: Allocation, omega: float) -> float:
    return float(owner_energy(inst, choice, a).sum() - omega * inst.phi[choice].sum())


def violation(inst: Instance, choice: np.ndarray, a: Allocation) -> float:
    """Largest relative constraint violation (0 when feasible)."""
    c = inst.cell
    worst = [
        np.max(owner_times(inst, choice, a) / c.deadline_s - 1), a.b.sum() / c.bandwidth_mhz - 1, a.fs.sum() / c.server_ghz - 1,
        np.max(a.p / inst.pmax - 1), np.max(a.f / inst.fmax - 1), inst.mem_gib[choice].sum() / c.server_memory_gib - 1,
    ]
    return max(0.0, *(float(w) for w in worst))


def uplink_power(b, t, S, g):
    """Power that sends S Mbit in t seconds over b MHz: (b / g)(2^(S / (b t)) - 1)."""
    return b / g * np.expm1(S * math.log(2) / (b * t))


def min_times(inst: Instance) -> dict[str, np.ndarray]:
    """Each owner's fastest possible time per set, alone in the cell at full resources (N x J)."""
    c = inst.cell
    parts = {
        "compute": inst.C / inst.fmax[:, None],
        "uplink": inst.S / rate(c.bandwidth_mhz, inst.pmax, inst.g)[:, None],
        "server": inst.G / c.server_ghz,
        "downlink": inst.Tdl,
    }
    parts["total"] = sum(parts.values())
    return parts


def repair(inst: Instance, choice: np.ndarray, a: Allocation) -> Allocation:
    """Remove a conic solver's tolerance-level violations (~1e-6): clip to the caps, then absorb
    any deadline excess by a slightly faster CPU. Objective changes are of the same tiny order."""
    c = inst.cell
    b = a.b * min(1.0, c.bandwidth_mhz / a.b.sum())
    fs = a.fs * min(1.0, c.server_ghz / a.fs.sum())
    p, f = np.minimum(a.p, inst.pmax), np.minimum(a.f, inst.fmax)
    fixed = Allocation(b, p, f, fs)
    excess = owner_times(inst, choice, fixed) - c.deadline_s
    idx = np.arange(inst.n)
    C = inst.C[idx, choice]
    need = np.where(excess > 0, C / f - excess, np.inf)  # compute time that would meet the deadline
    faster = np.where((excess > 0) & (need > 0), np.minimum(C / np.maximum(need, 1e-300), inst.fmax), f)
    return Allocation(b, p, faster, fs)
