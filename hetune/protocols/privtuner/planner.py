"""``hetune plan privtuner``: the alternating allocation, the baselines, and what is written out.

Alternation: (ii) continuous resources for the current choice (quadratic transform,
``continuous``), then (i) the parameter-set choice for those shared resources
(branch-and-bound, ``discrete``), until the choice stops changing or the objective
stops improving. Each step can only lower the objective: the current choice is a
candidate of step (i), and step (ii) optimises globally for a fixed choice. The
alternation is local in the discrete choice, so it starts from every uniform level and
from the decoupled choice (each owner choosing alone on an equal share) and keeps the best.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np

from hetune.errors import HetuneError
from hetune.files import save_figure
from hetune.protocols.privtuner.cell import Cell
from hetune.protocols.privtuner.continuous import ContinuousInfeasible, QuadraticTransformSolver
from hetune.protocols.privtuner.costs import CostModel
from hetune.protocols.privtuner.discrete import branch_and_bound, cost_table
from hetune.protocols.privtuner.system import Allocation, Instance, build_instance, min_times, objective, owner_energy, violation

BASELINES = ("equal_bandwidth", "max_power", "lowest_privacy", "highest_privacy", "no_joint_optimisation")


class InfeasibleCellError(HetuneError):
    """No allocation meets the deadline; the message names the binding constraint."""

    exit_code = 7


@dataclass
class Plan:
    name: str
    choice: np.ndarray  # set index per owner
    alloc: Allocation
    objective: float
    history: list[float] = field(default_factory=list)  # objective after every half-step
    solve_s: float = 0.0

    def summary(self, inst: Instance) -> dict:
        energy = owner_energy(inst, self.choice, self.alloc)
        return {
            "name": self.name, "objective": self.objective, "energy_j": float(energy.sum()),
            "privacy_bits": float(inst.phi[self.choice].sum()), "mean_security_bits": float(inst.phi[self.choice].mean()),
            "solve_s": self.solve_s, "iterations": len(self.history), "history": self.history,
            "owners": [
                {"param_set": inst.sets[j], "bandwidth_mhz": float(self.alloc.b[n]), "power_w": float(self.alloc.p[n]),
                 "cpu_ghz": float(self.alloc.f[n]), "server_ghz": float(self.alloc.fs[n]), "energy_j": float(energy[n])}
                for n, j in enumerate(self.choice)
            ],
        }


def check_feasible(inst: Instance) -> None:
    """Raise InfeasibleCellError naming the owner and the binding part when the deadline is impossible."""
    c = inst.cell
    parts = min_times(inst)
    for n in range(inst.n):
        j = int(np.argmin(parts["total"][n]))
        if parts["total"][n, j] > c.deadline_s:
            share = {k: float(parts[k][n, j]) for k in ("compute", "uplink", "server", "downlink")}
            binding = max(share, key=share.get)
            detail = ", ".join(f"{k} {v:.3g} s" for k, v in share.items())
            raise InfeasibleCellError(
                f"cell infeasible: owner {n + 1}: deadline {c.deadline_s:g} s < minimum {parts['total'][n, j]:.3g} s "
                f"at full bandwidth/power/frequency ({binding}-bound; {detail}; fastest set {inst.sets[j]})",
                f"raise deadline_s, or lower owner {n + 1}'s samples, or give it more {binding} resources",
            )
    if inst.mem_gib.min() * inst.n > c.server_memory_gib:
        raise InfeasibleCellError(
            f"cell infeasible: server memory {c.server_memory_gib:g} GiB < {inst.mem_gib.min() * inst.n:.3g} GiB "
            f"for {inst.n} sessions at the smallest session key",
            "raise server_memory_gib or serve fewer owners",
        )


def _joint_infeasible(inst: Instance) -> InfeasibleCellError:
    c = inst.cell
    return InfeasibleCellError(
        f"cell infeasible: every owner can meet the {c.deadline_s:g} s deadline alone, but not all "
        f"{inst.n} together within B = {c.bandwidth_mhz:g} MHz and F_s = {c.server_ghz:g} GHz (shared bandwidth/server-bound)",
        "raise bandwidth_mhz or server_ghz, or the deadline",
    )


class Planner:
    def __init__(self, inst: Instance, omega: float, equal_bandwidth: bool = False, max_power: bool = False,
                 max_rounds: int = 20, tol: float = 1e-10):
        if not omega >= 0:
            from hetune.errors import ConfigError

            raise ConfigError(f"omega={omega} must be >= 0", "pass a non-negative privacy weight (J per security bit)")
        self.inst, self.omega, self.max_power, self.max_rounds = inst, omega, max_power, max_rounds
        self.solver = QuadraticTransformSolver(inst, equal_bandwidth=equal_bandwidth, max_power=max_power)
        self.budget = inst.cell.server_memory_gib
        self.tol = tol
        self._memo: dict[tuple, object] = {}  # choice -> result: starts often revisit the same choice

    def continuous(self, choice: np.ndarray, start: Allocation | None = None):
        key = tuple(int(j) for j in choice)
        if key not in self._memo:
            try:
                self._memo[key] = self.solver.solve(np.asarray(choice), self.omega, start=start, tol=self.tol)
            except ContinuousInfeasible as err:
                self._memo[key] = err
        hit = self._memo[key]
        if isinstance(hit, ContinuousInfeasible):
            raise hit
        return copy.copy(hit)

    def _check_memory(self, choice: np.ndarray) -> None:
        if self.inst.mem_gib[choice].sum() > self.budget * (1 + 1e-12):
            raise ContinuousInfeasible("the sessions' keys exceed the server memory")

    def alternate(self, choice: np.ndarray, name: str = "alternating") -> Plan:
        t0 = time.perf_counter()
        choice = np.asarray(choice)
        self._check_memory(choice)
        res = self.continuous(choice)
        plan = Plan(name, choice, res.alloc, res.objective, [res.objective])
        idx = np.arange(self.inst.n)
        for _ in range(self.max_rounds):
            cost, p, f = cost_table(self.inst, plan.alloc, self.omega, self.max_power)
            new, _, _ = branch_and_bound(cost, self.inst.mem_gib, self.budget, incumbent=plan.choice)
            if new is None or np.array_equal(new, plan.choice):
                break
            step = Allocation(plan.alloc.b, p[idx, new], f[idx, new], plan.alloc.fs)
            plan.history.append(objective(self.inst, new, step, self.omega))
            try:
                res = self.continuous(new, start=step)
            except ContinuousInfeasible:
                break
            if res.objective > plan.history[-1]:  # solver tolerance: keep the discrete step's allocation
                res.alloc, res.objective = step, plan.history[-1]
            plan.history.append(res.objective)
            improved = res.objective < plan.objective - 1e-12 * max(1.0, abs(plan.objective))
            plan.choice, plan.alloc, plan.objective = new, res.alloc, res.objective
            if not improved:
                break
        plan.solve_s = time.perf_counter() - t0
        return plan

    def fixed(self, choice: np.ndarray, name: str) -> Plan:
        t0 = time.perf_counter()
        self._check_memory(np.asarray(choice))
        res = self.continuous(np.asarray(choice))
        return Plan(name, np.asarray(choice), res.alloc, res.objective, [res.objective], time.perf_counter() - t0)


def uniform_start(inst: Instance, level: int) -> np.ndarray:
    """Every owner at set ``level``, or its most private set that is feasible alone below that."""
    alone = min_times(inst)["total"] <= inst.cell.deadline_s
    return np.array([max([j for j in range(level + 1) if alone[n, j]] or [int(np.argmax(alone[n]))]) for n in range(inst.n)])


def decoupled_choice(inst: Instance, omega: float) -> np.ndarray:
    """Each owner picks its set alone, on an equal share of bandwidth and server (no joint optimisation)."""
    c, N = inst.cell, inst.n
    equal = Allocation(np.full(N, c.bandwidth_mhz / N), inst.pmax.copy(), inst.fmax.copy(), np.full(N, c.server_ghz / N))
    cost, _, _ = cost_table(inst, equal, omega)
    choice, _, _ = branch_and_bound(cost, inst.mem_gib, c.server_memory_gib)
    if choice is None:  # infeasible on equal shares: the cheapest set per owner
        choice = np.argmin(np.where(np.isfinite(cost), cost, np.inf), axis=1)
    return choice


def best_alternating(planner: Planner, name: str, omega: float) -> Plan:
    inst = planner.inst
    starts = [uniform_start(inst, j) for j in range(len(inst.sets))] + [decoupled_choice(inst, omega)]
    plans, seen = [], set()
    t0 = time.perf_counter()
    for s in starts:
        if tuple(s) in seen:
            continue
        seen.add(tuple(s))
        try:
            plans.append(planner.alternate(s, name))
        except ContinuousInfeasible:
            continue
    if not plans:
        raise ContinuousInfeasible("no start is feasible")
    best = min(plans, key=lambda p: p.objective)
    best.solve_s = time.perf_counter() - t0
    return best


def plan_cell(cell: Cell, costs: CostModel, omega: float, baselines: bool = True) -> dict:
    """The allocation and, with ``baselines``, the same figures for every baseline."""
    inst = build_instance(cell, costs)
    check_feasible(inst)
    planner = Planner(inst, omega)
    try:
        ours = best_alternating(planner, "privtuner", omega)
    except ContinuousInfeasible:
        raise _joint_infeasible(inst) from None
    result = {"omega": omega, "scheme": costs.scheme, "sets": list(inst.sets), "phi": inst.phi.tolist(), "plan": ours.summary(inst),
              "violation": violation(inst, ours.choice, ours.alloc), "baselines": {}}
    if baselines:
        for name, plan in run_baselines(inst, omega).items():
            result["baselines"][name] = plan.summary(inst) if plan else None
    return result


def run_baselines(inst: Instance, omega: float) -> dict[str, Plan | None]:
    out: dict[str, Plan | None] = {}
    N, J = inst.n, len(inst.sets)

    def attempt(name, fn):
        try:
            out[name] = fn()
        except ContinuousInfeasible:
            out[name] = None  # infeasible under the baseline's restriction

    attempt("equal_bandwidth", lambda: best_alternating(Planner(inst, omega, equal_bandwidth=True), "equal_bandwidth", omega))
    attempt("max_power", lambda: best_alternating(Planner(inst, omega, max_power=True), "max_power", omega))
    plain = Planner(inst, omega)
    attempt("lowest_privacy", lambda: plain.fixed(np.zeros(N, dtype=int), "lowest_privacy"))
    attempt("highest_privacy", lambda: plain.fixed(np.full(N, J - 1), "highest_privacy"))
    attempt("no_joint_optimisation", lambda: plain.fixed(decoupled_choice(inst, omega), "no_joint_optimisation"))
    return out


def omega_grid(inst: Instance, points: int = 9) -> np.ndarray:
    """Privacy weights around the scale where one security bit is worth a typical owner's energy share."""
    lo = Planner(inst, 0.0).fixed(np.zeros(inst.n, dtype=int), "scale")
    per_owner = max(owner_energy(inst, lo.choice, lo.alloc).mean(), 1e-12)
    span = max(float(np.ptp(inst.phi)), 1.0)
    return per_owner / span * np.logspace(-2, 1.5, points)


def sweep(cell: Cell, costs: CostModel, omegas=None) -> dict:
    """Energy and privacy of the plan and every baseline across privacy weights."""
    inst = build_instance(cell, costs)
    check_feasible(inst)
    omegas = omega_grid(inst) if omegas is None else np.asarray(omegas, dtype=float)
    rows = []
    for w in omegas:
        one = plan_cell(cell, costs, float(w))
        rows.append({"omega": float(w), "privtuner": _brief(one["plan"]),
                     **{k: (_brief(v) if v else None) for k, v in one["baselines"].items()}})
    return {"scheme": costs.scheme, "sets": list(inst.sets), "rows": rows}


def _brief(s: dict) -> dict:
    return {k: s[k] for k in ("objective", "energy_j", "privacy_bits", "mean_security_bits", "solve_s")}


def plot_sweep(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    omegas = [r["omega"] for r in data["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("privtuner",) + BASELINES:
        e = [r[name]["energy_j"] if r.get(name) else math.nan for r in data["rows"]]
        s = [r[name]["mean_security_bits"] if r.get(name) else math.nan for r in data["rows"]]
        style = dict(lw=2.5, color="k") if name == "privtuner" else dict(lw=1, ls="--")
        ax1.plot(omegas, e, marker="o", ms=3, label=name, **style)
        ax2.plot(omegas, s, marker="o", ms=3, label=name, **style)
    for ax, label in ((ax1, "total device energy (J)"), (ax2, "mean security (bits)")):
        ax.set_xscale("log")
        ax.set_xlabel("privacy weight omega (J per bit)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")  # max power is an order of magnitude above the rest
    ax1.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
