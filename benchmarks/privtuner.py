"""How much device energy PrivTuner's joint allocation saves against each baseline, and what it costs to solve.

One question: on generated cells of 5..50 data owners (the spec's typical values; the
server's key memory limited to 0.3 GiB per owner, which couples the parameter-set
choice under glwe and never binds under rlwe, whose sessions hold no key), across
privacy weights, what energy and privacy does the alternating
allocation reach compared with equal bandwidth, max power, fixed lowest/highest
privacy and no joint optimisation; and how long do the planner, its continuous step
(quadratic transform) and the cvxpy oracle take, side by side on the same problems.

    .venv/bin/python benchmarks/privtuner.py [--sizes 5,10,20,50] [--omegas 1e-4,1e-3,1e-2] [--seed 0] [--scheme rlwe]
    .venv/bin/python benchmarks/privtuner.py --real-owners [--cell docs/examples/cell_smollm2.toml] [--omega 0.003]

``--real-owners``: the plan put to work. The cell is planned on the shipped rlwe fit
(measured on this 2-core machine when quiet; ``--measure-costs``: measured now), and
``hetune federate privtuner`` runs the plan's owners (SmolLM2-135M, the cell's blocks: its first
one in cell_smollm2.toml, all 30 in cell_smollm2_whole.toml; each owner its own documents, keys,
parameter set, rate and CPU shares) at once through one worker:
per owner measured time and energy against the prediction; then the same owners at the
equal-bandwidth baseline's allocation (``--allocations``: which ones), so the objective
is compared measured against measured. Writes benchmarks/results/privtuner_owners.json (``--out``)
and its plot, docs/img/privtuner_owners.png (the JSON's name); ``--plot JSON`` redraws a saved one.

Costs: the fit hetune ships for --scheme (rlwe, the default: default_costs.json in
hetune/protocols/privtuner/; glwe: default_costs_glwe.json), or --costs.
Writes benchmarks/results/privtuner.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from hetune.protocols.privtuner.cell import random_cell  # noqa: E402
from hetune.protocols.privtuner.costs import load_costs  # noqa: E402
from hetune.protocols.privtuner.discrete import branch_and_bound, brute_force, cost_table  # noqa: E402
from hetune.protocols.privtuner.oracle import OracleFailed, oracle_solve  # noqa: E402
from hetune.protocols.privtuner.planner import BASELINES, Planner, plan_cell  # noqa: E402
from hetune.protocols.privtuner.run import format_table  # noqa: E402
from hetune.protocols.privtuner.system import build_instance  # noqa: E402

warnings.filterwarnings("ignore", message="Solution may be inaccurate")


def cell_for(n: int, seed: int):
    return random_cell(n, seed=seed, server_memory_gib=0.3 * n)


def energy_rows(costs, sizes, omegas, seed) -> list[dict]:
    rows = []
    for n in sizes:
        cell = cell_for(n, seed)
        for omega in omegas:
            t0 = time.perf_counter()
            res = plan_cell(cell, costs, omega)
            wall = time.perf_counter() - t0
            ours = res["plan"]
            row = {"owners": n, "omega": omega, "wall_s": wall, "plan_solve_s": ours["solve_s"],
                   "privtuner": {k: ours[k] for k in ("energy_j", "mean_security_bits", "objective")}, "baselines": {}}
            for name in BASELINES:
                b = res["baselines"][name]
                row["baselines"][name] = None if b is None else {
                    "energy_j": b["energy_j"], "mean_security_bits": b["mean_security_bits"], "objective": b["objective"],
                    "energy_saved": (b["energy_j"] - ours["energy_j"]) / b["energy_j"],
                    "objective_gap": b["objective"] - ours["objective"],
                }
            rows.append(row)
            print(f"N={n:>2} omega={omega:g}: {ours['energy_j']:.4g} J, {ours['mean_security_bits']:.1f} bits, plan {wall:.1f} s; saved "
                  + ", ".join(f"{k} {v['energy_saved']:+.1%}" if v else f"{k} infeasible" for k, v in row["baselines"].items()),
                  flush=True)
    return rows


def solver_rows(costs, sizes, seed, omega=1e-3) -> list[dict]:
    """Continuous step (quadratic transform) vs the cvxpy oracle on the same choice (every owner at the least private set), warm."""
    rows = []
    for n in sizes:
        inst = build_instance(cell_for(n, seed), costs)
        choice = np.zeros(n, dtype=int)
        planner = Planner(inst, omega)
        planner.solver.solve(choice, omega)  # warm-up: cvxpy compiles the problem once
        t0 = time.perf_counter()
        qt = planner.solver.solve(choice, omega)
        t_qt = time.perf_counter() - t0
        row = {"owners": n, "qt_s": t_qt, "qt_iterations": qt.iterations}
        try:
            oracle_solve(inst, choice, omega)  # warm-up
            t0 = time.perf_counter()
            _, value, _ = oracle_solve(inst, choice, omega)
            t_or = time.perf_counter() - t0
            row.update(oracle_s=t_or, qt_over_oracle=t_qt / t_or, objective_rel_diff=abs(qt.objective - value) / abs(value))
            note = f"oracle {t_or:.2f} s, ratio {t_qt / t_or:.2f}, objective diff {row['objective_rel_diff']:.1e}"
        except OracleFailed as err:
            row["oracle_error"] = str(err)
            note = f"oracle failed: {err}"
        rows.append(row)
        print(f"N={n:>2}: QT {t_qt:.2f} s ({qt.iterations} it), {note}", flush=True)
    return rows


def bnb_rows(costs, seed, omega=1e-3) -> list[dict]:
    """Branch-and-bound vs brute force on the discrete step of real cells (nodes and time)."""
    rows = []
    for n in (4, 6, 8):
        inst = build_instance(cell_for(n, seed), costs)
        planner = Planner(inst, omega)
        alloc = planner.continuous(np.zeros(n, dtype=int)).alloc
        cost, _, _ = cost_table(inst, alloc, omega)
        t0 = time.perf_counter()
        choice, value, nodes = branch_and_bound(cost, inst.mem_gib, inst.cell.server_memory_gib)
        t_bb = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, bf_value = brute_force(cost, inst.mem_gib, inst.cell.server_memory_gib)
        t_bf = time.perf_counter() - t0
        rows.append({"owners": n, "bnb_nodes": nodes, "brute_force_leaves": len(inst.sets) ** n, "bnb_s": t_bb, "brute_force_s": t_bf,
                     "equal": bool(np.isclose(value, bf_value, rtol=1e-12))})
        print(f"N={n}: B&B {nodes} nodes {t_bb * 1e3:.1f} ms vs brute force {len(inst.sets) ** n} leaves {t_bf * 1e3:.1f} ms, "
              f"equal={rows[-1]['equal']}", flush=True)
    return rows


def real_owners(cell: Path, omega: float, out: Path, measure: bool, allocations: list[str]) -> dict:
    """Measure the costs here, plan the cell on them, run the owners through one worker at each allocation
    (the plan's, then baselines' from the same plan file): measured objective against measured objective."""
    from hetune.protocols.privtuner.costs import measure_and_save
    from hetune.protocols.privtuner.federate import FederateConfig, format_report, run_federate
    from hetune.protocols.privtuner.run import PlanConfig, run_plan

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    costs = None
    if measure:
        costs = out / "costs.json"
        measure_and_save(costs, "rlwe")
    measure_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = run_plan(PlanConfig(cell=cell, omega=omega, costs=costs, out=out / "plan", sweep=False))
    plan_s = time.perf_counter() - t0
    print(format_table(plan), flush=True)
    runs = {}
    for name in allocations:
        runs[name] = run_federate(FederateConfig(plan=out / "plan" / "privtuner.json", out=out / f"run-{name}",
                                                 allocation=name), echo=print)
        print(format_report(runs[name]), flush=True)
    print(f"\n{'allocation':<16} {'objective planned':>17} {'measured':>9} {'energy J planned':>16} {'measured':>9} "
          f"{'slowest owner s':>15} {'deadline':>8} {'= solo':>6}")
    compare = {}
    for name, r in runs.items():
        compare[name] = {"objective_planned": r["objective"]["planned"], "objective_measured": r["objective"]["measured"],
                         "energy_planned_j": sum(o["predicted"]["energy_j"] for o in r["owners"]),
                         "energy_measured_j": r["objective"]["measured_energy_j"], "security_bits": r["objective"]["security_bits"],
                         "slowest_owner_s": max(o["measured"]["wall_s"] for o in r["owners"]),
                         "slowest_owner_modelled_s": max(o["measured"]["modelled_s"] for o in r["owners"]),
                         "all_equal_to_solo": r["all_equal_to_solo"], "load_avg_1m": r["load_avg_1m"]}
        c = compare[name]
        print(f"{name:<16} {c['objective_planned']:>17.4g} {c['objective_measured']:>9.4g} {c['energy_planned_j']:>16.4g} "
              f"{c['energy_measured_j']:>9.4g} {c['slowest_owner_s']:>15.1f} {r['deadline_s']:>8g} {str(c['all_equal_to_solo']):>6}")
    return {"environment": environment(), "cell": str(cell), "omega": omega, "costs_measured_here": measure,
            "measure_s": measure_s, "plan_s": plan_s, "plan": {k: plan[k] for k in ("plan", "baselines", "violation", "sets")},
            "run": runs["plan"] if "plan" in runs else None, "runs": runs, "compare": compare}


PHASES = ("device_s", "uplink_s", "server_s", "downlink_s")
SHORT = {"equal_bandwidth": "eq. bw.", "lowest_privacy": "lowest", "highest_privacy": "highest", "max_power": "max p.",
         "no_joint_optimisation": "no joint"}  # the plot's allocation labels


def plot_owners(data: dict, path: Path) -> None:
    """Per allocation and owner, the planned and measured phases (stacked) against the deadline; energy beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hetune.files import save_figure

    runs = data["runs"]
    bars = sum(len(run["owners"]) for run in runs.values())
    fig, axes = plt.subplots(1, 2, figsize=(max(12.0, 1.3 * bars), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels, x = [], 0.0
    for name, run in runs.items():
        for o in run["owners"]:
            for offset, (kind, phases) in ((-0.2, ("predicted", o["predicted"])), (0.2, ("measured", o["measured"]))):
                bottom = 0.0
                for c, phase in zip(colors, PHASES):
                    axes[0].bar(x + offset, phases[phase], 0.38, bottom=bottom, color=c, alpha=0.5 if kind == "predicted" else 1,
                                label=phase.removesuffix("_s") if x == 0 and kind == "measured" else None)
                    bottom += phases[phase]
            axes[1].bar(x - 0.2, o["predicted"]["energy_j"], 0.38, color="grey", label="predicted" if x == 0 else None)
            axes[1].bar(x + 0.2, o["measured"]["energy_j"], 0.38, color="black", label="measured" if x == 0 else None)
            labels.append(f"{SHORT.get(name, name)}\n{o['owner']}: {o['param_set']}")
            x += 1
        axes[0].axhline(run["deadline_s"], color="red", lw=0.8)
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.legend(fontsize=8)
    axes[0].set(ylabel="seconds (left bar planned, right measured)", title="phases per owner (waits left out); red: deadline")
    compare = "\n".join(f"{n.replace('_', ' ')}: objective {c['objective_planned']:.3f} planned, {c['objective_measured']:.3f} measured"
                         for n, c in data["compare"].items())
    axes[1].set(ylabel="energy proxy (J)", title=compare)
    axes[1].title.set_fontsize(8)
    workload = next(iter(runs.values()))["workload"]
    blocks = {0: "all blocks", 1: "first block"}.get(workload["layers"], f"first {workload['layers']} blocks")
    fig.suptitle(f"PrivTuner, {len(labels) // len(runs)} owners through one worker: {workload['model']} ({blocks})")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-owners", action="store_true", help="plan a SmolLM2 cell and run its owners through one worker")
    ap.add_argument("--cell", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "examples" / "cell_smollm2.toml")
    ap.add_argument("--omega", type=float, default=0.003, help="--real-owners: privacy weight (J per bit)")
    ap.add_argument("--allocations", default="plan,equal_bandwidth",
                    help="--real-owners: the allocations to run, in order: plan and/or baselines of the plan file")
    ap.add_argument("--measure-costs", action="store_true", help="--real-owners: measure the rlwe costs here first (a loaded machine spoils the fit)")
    ap.add_argument("--sizes", default="5,10,20,50")
    ap.add_argument("--omegas", default="1e-4,1e-3,1e-2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--costs", type=Path, default=None)
    ap.add_argument("--scheme", default=None, help="rlwe (default) or glwe; with --costs, the file's")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/privtuner.json (--real-owners: results/privtuner_owners.json)")
    ap.add_argument("--plot", type=Path, default=None, metavar="JSON",
                    help="only draw docs/img/<JSON's name>.png from a saved --real-owners result")
    args = ap.parse_args()
    img = Path(__file__).resolve().parent.parent / "docs" / "img"
    if args.plot:
        plot_owners(json.loads(args.plot.read_text()), img / args.plot.with_suffix(".png").name)
        print(f"wrote {img / args.plot.with_suffix('.png').name}")
        return
    if args.real_owners:
        t0 = time.perf_counter()
        data = real_owners(args.cell, args.omega, Path("runs/privtuner-owners"), args.measure_costs, args.allocations.split(","))
        data["wall_s"] = time.perf_counter() - t0
        out = args.out or Path(__file__).parent / "results" / "privtuner_owners.json"
        write_json(out, data)
        plot_owners(data, img / out.with_suffix(".png").name)
        print(f"wrote {out} and {img / out.with_suffix('.png').name} in {data['wall_s']:.0f} s")
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    omegas = [float(w) for w in args.omegas.split(",")]
    costs = load_costs(args.costs, args.scheme)
    plan_cell(cell_for(3, 99), costs, 1e-3)  # warm-up: imports, solver set-up
    t0 = time.perf_counter()
    data = {
        "environment": environment(),
        "config": {"sizes": sizes, "omegas": omegas, "seed": args.seed, "scheme": costs.scheme,
                   "costs": str(args.costs or "shipped"), "cell": "random_cell(N, seed), server_memory_gib = 0.3 N",
                   "workload": "micro-llama, seq_len 16, batch 4", "sets": list(build_instance(cell_for(3, 99), costs).sets),
                   "cost_fit": costs.measured},
        "energy": energy_rows(costs, sizes, omegas, args.seed),
        "solver": solver_rows(costs, sizes, args.seed),
        "branch_and_bound": bnb_rows(costs, args.seed),
    }
    data["wall_s"] = time.perf_counter() - t0
    out = args.out or Path(__file__).parent / "results" / "privtuner.json"
    write_json(out, data)
    print(f"wrote {out} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
