"""What ``hetune plan privtuner`` does end to end: read, plan, compare, sweep, write.

Writes ``OUT/privtuner.json`` (the allocation, every baseline, the omega sweep, and the
cell and cost fit it was planned on, so ``hetune federate privtuner --plan`` needs nothing else) and
``OUT/energy_vs_omega.png``, each to a temporary file renamed into place, so a failed
run leaves no half-written output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hetune.errors import ConfigError
from hetune.files import write_json

DEFAULT_OMEGA = 1e-3  # J per security bit


@dataclass(frozen=True)
class PlanConfig:
    cell: Path
    omega: float = DEFAULT_OMEGA
    costs: Path | None = None  # None: the fit shipped with hetune for ``scheme`` (measured on the 2-core dev machine)
    scheme: str | None = None  # None: the cost file's scheme, or rlwe for the shipped fit
    out: Path = Path("runs/privtuner")
    sweep: bool = True
    sweep_points: int = 7

    def __post_init__(self) -> None:
        if not (self.omega >= 0 and math.isfinite(self.omega)):
            raise ConfigError(f"omega={self.omega} must be a finite number >= 0", "pass --omega in J per security bit, e.g. 0.001")
        if self.sweep_points < 2:
            raise ConfigError(f"sweep_points={self.sweep_points} must be >= 2", "use e.g. 7")


def run_plan(cfg: PlanConfig) -> dict:
    import warnings

    with warnings.catch_warnings():  # cvxpy's "may be inaccurate": results are checked (violation, objective)
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        return _run_plan(cfg)


def _run_plan(cfg: PlanConfig) -> dict:
    import numpy as np

    from hetune.protocols.privtuner.cell import cell_to_toml, load_cell
    from hetune.protocols.privtuner.costs import load_costs
    from hetune.protocols.privtuner.planner import check_feasible, omega_grid, plan_cell, plot_sweep, sweep
    from hetune.protocols.privtuner.system import build_instance

    cell = load_cell(cfg.cell)
    costs = load_costs(cfg.costs, cfg.scheme)
    check_feasible(build_instance(cell, costs))  # before any output exists
    result = plan_cell(cell, costs, cfg.omega)
    result["cell"] = str(cfg.cell)
    result["costs"] = str(cfg.costs or f"shipped fit for {costs.scheme}")
    result["inputs"] = {"cell": cell_to_toml(cell), "costs": costs.to_dict()}  # what `hetune federate privtuner` runs
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.sweep:
        inst = build_instance(cell, costs)
        grid = np.unique(np.concatenate([omega_grid(inst, cfg.sweep_points), [cfg.omega]]))
        result["sweep"] = sweep(cell, costs, grid)
        plot_sweep(result["sweep"], cfg.out / "energy_vs_omega.png")
    write_json(cfg.out / "privtuner.json", result)
    return result


def format_table(result: dict) -> str:
    """The allocation per owner, then the plan against each baseline."""
    lines = [f"scheme {result['scheme']}, omega = {result['omega']:g} J/bit", "",
             f"{'owner':>5} {'set':>5} {'bits':>4} {'B (MHz)':>9} {'p (W)':>9} {'f (GHz)':>8} {'f_s (GHz)':>10} {'energy (J)':>11}"]
    for n, o in enumerate(result["plan"]["owners"], 1):
        bits = result["phi"][result["sets"].index(o["param_set"])]
        lines.append(f"{n:>5} {o['param_set']:>5} {bits:>4.0f} {o['bandwidth_mhz']:>9.4g} {o['power_w']:>9.3g} {o['cpu_ghz']:>8.4g} "
                     f"{o['server_ghz']:>10.4g} {o['energy_j']:>11.4g}")
    lines += ["", f"{'plan':<22} {'energy (J)':>11} {'mean bits':>9} {'objective':>11} {'vs privtuner':>13}"]
    ours = result["plan"]
    rows = [("privtuner", ours)] + list(result["baselines"].items())
    for name, s in rows:
        if s is None:
            lines.append(f"{name:<22} {'infeasible':>11}")
            continue
        delta = "" if name == "privtuner" else f"{(s['energy_j'] - ours['energy_j']) / max(s['energy_j'], 1e-300):>+12.1%}"
        lines.append(f"{name:<22} {s['energy_j']:>11.4g} {s['mean_security_bits']:>9.1f} {s['objective']:>11.4g} {delta:>13}")
    lines.append("(vs privtuner: the baseline's energy that privtuner saves, as a share of the baseline's)")
    return "\n".join(lines)
