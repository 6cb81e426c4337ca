"""The parameter-set choice for fixed shared resources: branch-and-bound, and brute force to check it.

With each owner's bandwidth ``b_n`` and server share ``f_s,n`` fixed, an owner's cost
under set j is its best energy over its own power and CPU frequency (a 1-D convex
problem in the compute time, solved by Brent's method) minus ``omega * phi_j``, or
infinite when the deadline cannot be met. Owners then couple only through the
server's memory for the sessions' keys (``sum mem_j <= M``: GLWE's compression keys;
rlwe sessions hold none, and the choice separates per owner): a multiple-choice knapsack. Branch-and-bound assigns owners in order; a node's lower
bound is its cost so far plus the LP relaxation of the rest (the multiple-choice
knapsack's LP, solved greedily on each owner's convex hull of options; without a memory
limit it is every unassigned owner at its cheapest set). A node is pruned when the bound
cannot beat the incumbent or the smallest keys of the unassigned owners no longer fit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from hetune.protocols.privtuner.system import Allocation, Instance, rate, uplink_power



def local_best(inst: Instance, n: int, j: int, b: float, fs: float, max_power: bool = False) -> tuple[float, float, float]:
    """Owner n under set j with b, f_s fixed: (energy, power, frequency); energy inf if infeasible.

    ``max_power`` pins p = p_max (the max-power baseline): the uplink time is then fixed.
    """
    from scipy.optimize import minimize_scalar

    c = inst.cell
    C, S, G, g = inst.C[n, j], inst.S[n, j], inst.G[n, j], inst.g[n]
    t_rem = c.deadline_s - G / fs - inst.Tdl[n, j]
    t_min = S / rate(b, inst.pmax[n], g)
    lo, hi = C / inst.fmax[n], t_rem - t_min  # compute time bounds
    if hi < lo * (1 - 1e-12):
        return math.inf, math.nan, math.nan
    hi = max(hi, lo)
    if max_power:
        t = t_min
        tau = t_rem - t
        energy = inst.kc * C**3 / tau**2 + inst.pmax[n] * t + inst.ks * G * fs**2
        return energy, float(inst.pmax[n]), C / tau

    def energy(tau: float) -> float:
        t = t_rem - tau
        return inst.kc * C**3 / tau**2 + t * uplink_power(b, t, S, g) + inst.ks * G * fs**2

    if hi - lo <= 1e-12 * max(1.0, hi):
        tau = lo
    else:
        res = minimize_scalar(energy, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10 * max(1.0, hi)})
        tau = min((lo, hi, float(res.x)), key=energy)
    t = t_rem - tau
    return energy(tau), float(min(uplink_power(b, t, S, g), inst.pmax[n])), C / tau


def cost_table(inst: Instance, alloc: Allocation, omega: float, max_power: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cost, power, frequency) per owner and set, N x J; cost = energy - omega * phi (inf: infeasible)."""
    N, J = inst.n, len(inst.sets)
    cost, p, f = np.full((N, J), math.inf), np.full((N, J), math.nan), np.full((N, J), math.nan)
    for n in range(N):
        for j in range(J):
            e, p[n, j], f[n, j] = local_best(inst, n, j, alloc.b[n], alloc.fs[n], max_power)
            cost[n, j] = e - omega * inst.phi[j]
    return cost, p, f


def _lagrangian_multiplier(cost: np.ndarray, mem: np.ndarray, budget: float) -> float:
    """lambda >= 0 maximising the root's Lagrangian bound  sum_n min_j (c_nj + lambda m_j) - lambda M.

    The bound is concave and piecewise linear in lambda; its maximum is at 0 or at a
    breakpoint where some owner's best set changes, so all breakpoints are tried.
    """
    if not math.isfinite(budget):
        return 0.0
    finite = np.isfinite(cost)
    cands = [0.0]
    for j in range(len(mem)):
        for k in range(len(mem)):
            if mem[k] > mem[j]:
                both = finite[:, j] & finite[:, k]
                cands.extend(((cost[both, j] - cost[both, k]) / (mem[k] - mem[j])).tolist())
    cands = np.array([c for c in cands if c >= 0])

    def bound(lam: float) -> float:
        return float(np.min(cost + lam * mem[None, :], axis=1).sum() - lam * budget)

    return float(max(cands, key=bound))


def _greedy(cost: np.ndarray, mem: np.ndarray, budget: float, lam: float) -> np.ndarray | None:
    """A feasible starting incumbent: each owner's best reduced-cost set, then the cheapest
    downgrades (cost added per GiB freed) until the keys fit."""
    N = cost.shape[0]
    choice = np.argmin(cost + lam * mem[None, :], axis=1)
    if not np.isfinite(cost[np.arange(N), choice]).all():
        return None
    while mem[choice].sum() > budget * (1 + 1e-12):
        best_move, best_rate = None, math.inf
        for n in range(N):
            for j in np.flatnonzero(np.isfinite(cost[n]) & (mem < mem[choice[n]])):
                rate = (cost[n, j] - cost[n, choice[n]]) / (mem[choice[n]] - mem[j])
                if rate < best_rate:
                    best_move, best_rate = (n, j), rate
        if best_move is None:
            return None
        choice[best_move[0]] = best_move[1]
    return choice


class _LpBound:
    """LP relaxation of the multiple-choice knapsack over owners n..N-1, for any remaining memory.

    Per owner, the lower convex hull of its (memory, cost) options from the smallest key up
    gives segments of falling cost; the LP takes the steepest segments first, the last one
    fractionally (Sinha & Zoltners 1979). Precomputed per suffix, evaluated by bisection.
    """

    def __init__(self, cost: np.ndarray, mem: np.ndarray):
        N = cost.shape[0]
        self.base_cost, self.base_mem = np.zeros(N + 1), np.zeros(N + 1)
        self.slopes, self.cum_dm, self.cum_dc = [None] * (N + 1), [None] * (N + 1), [None] * (N + 1)
        segs = np.zeros((0, 2))  # (d_mem, d_cost)
        self._store(N, segs)
        for n in range(N - 1, -1, -1):
            ok = np.flatnonzero(np.isfinite(cost[n]))
            if len(ok) == 0:
                self.base_mem[: n + 1] = math.inf
                for m in range(n, -1, -1):
                    self._store(m, np.zeros((0, 2)))
                break
            pts = sorted(zip(mem[ok], cost[n, ok]))
            hull = [pts[0]]
            for m, c in pts[1:]:
                if m == hull[-1][0] or c >= hull[-1][1]:
                    if m == hull[-1][0] and c < hull[-1][1]:
                        hull[-1] = (m, c)
                    continue
                while len(hull) >= 2 and (c - hull[-1][1]) * (hull[-1][0] - hull[-2][0]) <= (hull[-1][1] - hull[-2][1]) * (m - hull[-1][0]):
                    hull.pop()  # hull[-1] lies on or above the chord: not on the lower hull
                hull.append((m, c))
            self.base_cost[n] = self.base_cost[n + 1] + hull[0][1]
            self.base_mem[n] = self.base_mem[n + 1] + hull[0][0]
            mine = np.array([(m2 - m1, c2 - c1) for (m1, c1), (m2, c2) in zip(hull, hull[1:])]).reshape(-1, 2)
            segs = np.concatenate([segs, mine])
            self._store(n, segs)

    def _store(self, n: int, segs: np.ndarray) -> None:
        order = np.argsort(segs[:, 1] / np.maximum(segs[:, 0], 1e-300)) if len(segs) else np.zeros(0, dtype=int)
        s = segs[order]
        self.slopes[n] = s[:, 1] / np.maximum(s[:, 0], 1e-300) if len(s) else np.zeros(0)
        self.cum_dm[n], self.cum_dc[n] = np.cumsum(s[:, 0]), np.cumsum(s[:, 1])

    def __call__(self, n: int, room: float) -> float:
        """Lower bound on the cost of owners n.. with ``room`` GiB left (inf: infeasible)."""
        if not math.isfinite(self.base_mem[n]):
            return math.inf  # an unassigned owner has no feasible set
        spare = room - self.base_mem[n]
        if spare < -1e-12:
            return math.inf
        if not math.isfinite(spare):
            return self.base_cost[n] + (self.cum_dc[n][-1] if len(self.cum_dc[n]) else 0.0)
        k = int(np.searchsorted(self.cum_dm[n], spare, side="right"))
        value = self.base_cost[n] + (self.cum_dc[n][k - 1] if k else 0.0)
        if k < len(self.slopes[n]):
            value += self.slopes[n][k] * (spare - (self.cum_dm[n][k - 1] if k else 0.0))
        return value


def branch_and_bound(cost: np.ndarray, mem: np.ndarray, budget: float, incumbent: np.ndarray | None = None,
                     max_nodes: int = 200_000):
    """Min sum cost[n, choice[n]] s.t. sum mem[choice] <= budget. Returns (choice, value, nodes visited).

    A node is pruned by the LP relaxation of the rest (``_LpBound``: never above the true
    completion cost, infinite when even the smallest keys cannot fit). ``max_nodes`` caps the search on very large cells: the best choice found so
    far (never worse than ``incumbent``) is returned, and ``nodes == max_nodes`` says so.
    """
    N, J = cost.shape
    best_choice = None if incumbent is None else np.array(incumbent)
    best = math.inf if incumbent is None else float(cost[np.arange(N), incumbent].sum())
    if best_choice is not None and (not math.isfinite(best) or mem[best_choice].sum() > budget):
        best_choice, best = None, math.inf
    lp = _LpBound(cost, mem)
    lam = _lagrangian_multiplier(cost, mem, budget)
    greedy = _greedy(cost, mem, budget, lam)
    if greedy is not None and cost[np.arange(N), greedy].sum() < best:
        best_choice, best = greedy, float(cost[np.arange(N), greedy].sum())
    order = np.argsort(cost + lam * mem[None, :], axis=1)  # explore by reduced cost: good incumbents early
    nodes = 0
    stack = [(0, 0.0, 0.0, [])]
    while stack and nodes < max_nodes:
        n, value, used, partial = stack.pop()
        nodes += 1
        slack = 1e-12 * max(1.0, abs(best)) if math.isfinite(best) else 0.0
        if value + lp(n, budget * (1 + 1e-12) - used) >= best - slack:
            continue  # pruned: cannot beat the incumbent, or the keys cannot fit
        if n == N:
            best, best_choice = value, np.array(partial)
            continue
        for j in order[n][::-1]:  # push the cheapest last so it is explored first
            if math.isfinite(cost[n, j]):
                stack.append((n + 1, value + cost[n, j], used + mem[j], partial + [int(j)]))
    return best_choice, best, nodes


def brute_force(cost: np.ndarray, mem: np.ndarray, budget: float):
    N, J = cost.shape
    best, best_choice = math.inf, None
    for combo in itertools.product(range(J), repeat=N):
        combo = np.array(combo)
        if mem[combo].sum() > budget * (1 + 1e-12):
            continue
        value = cost[np.arange(N), combo].sum()
        if value < best:
            best, best_choice = value, combo
    return best_choice, best
