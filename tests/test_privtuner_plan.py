"""PrivTuner's planner: branch-and-bound, the continuous solver against its oracle, the alternation, baselines.

No encryption here: the cost fits shipped with hetune (measured with real encryption:
rlwe, the default, whose sessions hold no key, and glwe, whose compression keys couple the
owners through the worker's memory) feed small generated cells. Seeds are fixed; every
check is an invariant, not a golden number.
"""

import math
import warnings

import numpy as np
import pytest
from scipy.optimize import nnls

from hetune.protocols.privtuner.cell import random_cell
from hetune.protocols.privtuner.costs import load_costs
from hetune.protocols.privtuner.discrete import branch_and_bound, brute_force, cost_table
from hetune.protocols.privtuner.oracle import oracle_solve
from hetune.protocols.privtuner.planner import BASELINES, InfeasibleCellError, Planner, best_alternating, check_feasible, plan_cell
from hetune.protocols.privtuner.system import (Allocation, Instance, build_instance, min_times, objective, owner_energy, rate,
                                              uplink_power, violation)

warnings.filterwarnings("ignore", message="Solution may be inaccurate")
LN2 = math.log(2)


@pytest.fixture(scope="module")
def costs():
    return load_costs()


@pytest.fixture(scope="module")
def glwe_costs():
    return load_costs(scheme="glwe")


@pytest.fixture(scope="module")
def inst(costs):
    return build_instance(random_cell(4, seed=3), costs)


def test_sets_are_the_schemes(inst, glwe_costs):
    assert inst.sets == ("p128", "p192", "p256") and inst.phi.tolist() == [128, 192, 256]
    assert (inst.mem_gib == 0).all()  # rlwe sessions hold no key
    glwe = build_instance(random_cell(4, seed=3), glwe_costs)
    assert glwe.sets == ("p80", "p128", "p192", "p256") and glwe.phi.tolist() == [80, 128, 192, 256]
    assert glwe.mem_gib.tolist() == pytest.approx([48 / 1024, 128 / 1024, 0.5, 0.5], rel=1e-5)


def test_branch_and_bound_equals_brute_force_and_prunes():
    rng = np.random.default_rng(0)
    mem = np.array([0.05, 0.125, 0.5, 0.5])  # GiB per compression key, as the allow-list's
    pruned_somewhere = False
    for trial in range(40):
        N = int(rng.integers(2, 6))
        cost = rng.normal(0, 1, (N, 4)) - np.array([0, 0.5, 1.0, 1.2])  # privacy pays, keys cost memory
        cost[rng.random((N, 4)) < 0.15] = math.inf  # some sets miss the deadline
        budget = float(rng.uniform(mem[0] * N, mem[-1] * N))
        choice, value, nodes = branch_and_bound(cost, mem, budget)
        bf_choice, bf_value = brute_force(cost, mem, budget)
        if bf_choice is None:
            assert choice is None
            continue
        assert value == pytest.approx(bf_value, rel=1e-12, abs=1e-12)
        assert mem[choice].sum() <= budget + 1e-12 and cost[np.arange(N), choice].sum() == pytest.approx(value)
        pruned_somewhere |= nodes < sum(4**k for k in range(N + 1))
    assert pruned_somewhere  # the bound does prune


def _knapsack_dp(cost, mem_mib, budget_mib):
    """Exact multiple-choice knapsack by dynamic programming over integer MiB (reference for large N)."""
    best = np.zeros(budget_mib + 1)  # best[m]: min cost of owners so far using at most m MiB
    for row in cost:
        nxt = np.full(budget_mib + 1, math.inf)
        for c, m in zip(row, mem_mib):
            if math.isfinite(c) and m <= budget_mib:
                nxt[m:] = np.minimum(nxt[m:], best[: budget_mib + 1 - m] + c)
        best = nxt
    return best[-1]


def test_branch_and_bound_is_exact_on_large_memory_bound_cells():
    """40 owners, 4^40 choices: the Lagrangian bound keeps the search small; a DP checks the value."""
    rng = np.random.default_rng(1)
    mem_mib = np.array([48, 128, 512, 512])
    for _ in range(3):
        cost = rng.normal(0, 0.3, (40, 4)) - np.array([0, 0.6, 1.2, 1.3])  # everyone wants the big keys
        budget_mib = 40 * 200
        choice, value, nodes = branch_and_bound(cost, mem_mib / 1024, budget_mib / 1024)
        assert nodes < 200_000  # finished, not capped
        assert value == pytest.approx(_knapsack_dp(cost, mem_mib, budget_mib), rel=1e-9)
        assert mem_mib[choice].sum() <= budget_mib


def test_branch_and_bound_on_a_real_cost_table(inst, glwe_costs):
    glwe = build_instance(random_cell(4, seed=3), glwe_costs)
    res = Planner(glwe, 2e-3).continuous(np.zeros(glwe.n, dtype=int))
    cost, _, _ = cost_table(glwe, res.alloc, 2e-3)
    assert np.isfinite(cost[:, 0]).all()  # the current choice stays feasible
    budget = float(glwe.mem_gib[0] * glwe.n + 0.6)  # room for one big key at most
    choice, value, _ = branch_and_bound(cost, glwe.mem_gib, budget)
    bf_choice, bf_value = brute_force(cost, glwe.mem_gib, budget)
    assert value == pytest.approx(bf_value, rel=1e-12) and np.array_equal(choice, bf_choice)
    # rlwe: no keys, so whatever the memory limit each owner simply takes its cheapest set
    res = Planner(inst, 2e-3).continuous(np.zeros(inst.n, dtype=int))
    cost, _, _ = cost_table(inst, res.alloc, 2e-3)
    choice, value, _ = branch_and_bound(cost, inst.mem_gib, 0.0)
    assert np.array_equal(choice, np.argmin(cost, axis=1)) and value == pytest.approx(cost.min(axis=1).sum())


def kkt_residual(inst: Instance, choice: np.ndarray, alloc: Allocation, active_tol: float = 1e-4) -> dict:
    """KKT of the convex (b, t, f, f_s) form at ``alloc``: multipliers by non-negative least squares.

    Returns the relative stationarity residual (0 = exact KKT point), the largest relative
    constraint violation, and the multipliers. Complementary slackness holds by
    construction: only constraints active within ``active_tol`` get a multiplier.
    """
    n, c, idx = inst.n, inst.cell, np.arange(inst.n)
    C, S, G, Tdl = inst.C[idx, choice], inst.S[idx, choice], inst.G[idx, choice], inst.Tdl[idx, choice]
    b, f, fs, g = alloc.b, alloc.f, alloc.fs, inst.g
    t = S / rate(b, alloc.p, g)
    x = S * LN2 / (b * t)  # a / m
    dF_dm = (np.expm1(x) - x * np.exp(x)) / g
    # variable order: b (n), t (n), f (n), fs (n)
    grad = np.concatenate([t * dF_dm, b * dF_dm, 2 * inst.kc * C * f, 2 * inst.ks * G * fs])
    rows, names, slack = [], [], []

    def add(name, gvec, value, scale):
        rows.append(gvec)
        names.append(name)
        slack.append(value / scale)

    for i in range(n):
        gv = np.zeros(4 * n)
        gv[n + i], gv[2 * n + i], gv[3 * n + i] = 1.0, -C[i] / f[i] ** 2, -G[i] / fs[i] ** 2
        add(f"deadline[{i}]", gv, C[i] / f[i] + t[i] + G[i] / fs[i] + Tdl[i] - c.deadline_s, c.deadline_s)
        gv = np.zeros(4 * n)
        gv[2 * n + i] = 1.0
        add(f"fmax[{i}]", gv, f[i] - inst.fmax[i], inst.fmax[i])
        gv = np.zeros(4 * n)
        ex = np.exp(x[i])
        gv[i] = (np.expm1(x[i]) - x[i] * ex) / g[i]
        gv[n + i] = -(S[i] * LN2 / (g[i] * t[i] ** 2)) * ex
        add(f"pmax[{i}]", gv, uplink_power(b[i], t[i], S[i], g[i]) - inst.pmax[i], inst.pmax[i])
    gv = np.zeros(4 * n)
    gv[:n] = 1.0
    add("bandwidth", gv, b.sum() - c.bandwidth_mhz, c.bandwidth_mhz)
    gv = np.zeros(4 * n)
    gv[3 * n :] = 1.0
    add("server", gv, fs.sum() - c.server_ghz, c.server_ghz)
    slack = np.array(slack)
    active = np.abs(slack) <= active_tol
    scale = np.concatenate([b, t, f, fs])  # x_i * d/dx_i: dimensionless, comparable rows
    A = (np.array(rows)[active] * scale).T
    lam, _ = nnls(A, -grad * scale) if active.any() else (np.zeros(0), None)
    resid = grad * scale + A @ lam
    denom = np.abs(grad * scale) + np.abs(A) @ lam + 1e-300
    return {
        "stationarity": float(np.max(np.abs(resid)) / np.max(denom)),
        "primal_violation": float(max(0.0, slack.max())),
        "multipliers": {name: float(v) for name, v in zip(np.array(names)[active], lam)},
    }


@pytest.mark.parametrize("choice", [[0, 0, 0, 0], [1, 0, 2, 1]])
def test_continuous_matches_the_oracle_and_satisfies_kkt(costs, choice):
    # A small server-energy weight makes the optimum unique in f_s too (with kappa_server = 0
    # any split of spare server capacity is optimal, and only the objective can be compared);
    # rlwe's server work is small, so the weight is larger than GLWE's would need.
    inst = build_instance(random_cell(4, seed=3, deadline_s=20.0, kappa_server=1e-36), costs)
    choice = np.array(choice)
    omega = 1e-3
    ours = Planner(inst, omega, tol=1e-12).continuous(choice)
    alloc, value, _ = oracle_solve(inst, choice, omega)
    assert ours.objective == pytest.approx(value, rel=1e-4)
    # the energy is flat near the optimum at low SNR: allocations agree to 1e-3 (measured: < 1e-4)
    for name in ("b", "p", "f", "fs"):
        np.testing.assert_allclose(getattr(ours.alloc, name), getattr(alloc, name), rtol=1e-3, err_msg=name)
    kkt = kkt_residual(inst, choice, ours.alloc)
    assert kkt["stationarity"] < 1e-3 and kkt["primal_violation"] < 1e-5
    assert kkt["multipliers"]["bandwidth"] > 0  # the shared band is used up at the optimum
    # falsifiable: a perturbed allocation is not a KKT point
    shifted = type(ours.alloc)(ours.alloc.b * np.array([1.2, 0.8, 1, 1]), ours.alloc.p, ours.alloc.f, ours.alloc.fs)
    assert kkt_residual(inst, choice, shifted)["stationarity"] > 1e-2


def test_alternation_never_increases_the_objective(inst):
    for omega in (1e-4, 3e-3):
        plan = Planner(inst, omega).alternate(np.zeros(inst.n, dtype=int))
        h = np.array(plan.history)
        assert (np.diff(h) <= 1e-9 * np.abs(h[:-1]) + 1e-12).all(), h
        assert plan.objective == pytest.approx(objective(inst, plan.choice, plan.alloc, omega))
        assert violation(inst, plan.choice, plan.alloc) < 1e-5


@pytest.mark.parametrize("scheme,seed", [("rlwe", 0), ("rlwe", 1), ("glwe", 0)])
def test_plan_beats_every_baseline_on_generated_cells(costs, glwe_costs, scheme, seed):
    cell = random_cell(4, seed=seed, server_memory_gib=1.5)
    result = plan_cell(cell, costs if scheme == "rlwe" else glwe_costs, omega=2e-3)
    ours = result["plan"]
    assert result["violation"] < 1e-5
    feasible = {k: v for k, v in result["baselines"].items() if v is not None}
    assert set(result["baselines"]) == set(BASELINES) and len(feasible) >= 3
    for name, base in feasible.items():
        assert ours["objective"] <= base["objective"] + 1e-6 * abs(base["objective"]), name
    assert ours["objective"] < feasible["max_power"]["objective"]  # transmitting at full power wastes energy


def test_raising_omega_never_lowers_privacy(costs):
    inst = build_instance(random_cell(4, seed=5), costs)
    privacy = []
    for omega in (0.0, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1):
        plan = best_alternating(Planner(inst, omega), "privtuner", omega)
        privacy.append(inst.phi[plan.choice].sum())
    assert all(b >= a for a, b in zip(privacy, privacy[1:])), privacy
    assert privacy[-1] > privacy[0]  # the weight does move the choice


def test_energy_is_what_the_formulas_say(inst):
    """Hand-computed energy of one owner: kappa C f^2 + p S / (b log2(1 + p g / b))."""
    plan = Planner(inst, 0.0).continuous(np.ones(inst.n, dtype=int))
    a, n = plan.alloc, 2
    C, S = inst.C[n, 1], inst.S[n, 1]
    expected = inst.cell.kappa * (C * 1e9) * (a.f[n] * 1e9) ** 2 + a.p[n] * S / (a.b[n] * math.log2(1 + a.p[n] * inst.g[n] / a.b[n]))
    assert owner_energy(inst, np.ones(inst.n, dtype=int), a)[n] == pytest.approx(expected, rel=1e-12)


def test_infeasible_deadline_names_the_owner_and_binding_part(costs, glwe_costs):
    cell = random_cell(3, seed=0, deadline_s=2.0)
    with pytest.raises(InfeasibleCellError, match=r"owner 1: deadline 2 s < minimum .* \((uplink|server|compute|downlink)-bound"):
        check_feasible(build_instance(cell, costs))
    small = random_cell(3, seed=0, server_memory_gib=0.1)
    with pytest.raises(InfeasibleCellError, match="server memory"):
        check_feasible(build_instance(small, glwe_costs))  # three 48 MiB compression keys
    check_feasible(build_instance(small, costs))  # rlwe sessions need no memory


def test_jointly_infeasible_cell_names_the_shared_constraint(costs):
    # each owner alone meets the deadline at the full band (deadline 1.2 x the slowest owner's
    # minimum), but twelve owners sharing 1 MHz cannot
    probe = build_instance(random_cell(12, seed=2, bandwidth_mhz=1.0), costs)
    deadline = 1.2 * float(min_times(probe)["total"].min(axis=1).max())
    cell = random_cell(12, seed=2, bandwidth_mhz=1.0, deadline_s=deadline)
    check_feasible(build_instance(cell, costs))
    with pytest.raises(InfeasibleCellError, match="shared bandwidth/server"):
        plan_cell(cell, costs, 1e-3, baselines=False)


@pytest.mark.parametrize("name", ["cell.toml", "cell_smollm2.toml", "cell_smollm2_steps.toml"])
def test_the_documented_cells_load_and_plan_within_their_deadline(costs, name):
    """The cells README and docs/benchmarks.md run: each parses and has a feasible plan on the shipped fit."""
    from pathlib import Path

    from hetune.protocols.privtuner.cell import load_cell

    cell = load_cell(Path(__file__).resolve().parent.parent / "docs" / "examples" / name)
    plan = plan_cell(cell, costs, 0.003 if "smollm2" in name else 1e-3, baselines=False)
    assert len(plan["plan"]["owners"]) == len(cell.owners)
    assert plan["violation"] <= 1e-6
