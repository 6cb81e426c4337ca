"""Bandwidth, power and frequencies for a fixed parameter choice, by fractional programming.

The uplink energy ``p S / R(b, p)`` is a ratio of a linear numerator and a concave
denominator (``R = b log2(1 + p g / b)``), so the objective is a sum of ratios. The
quadratic transform (Shen & Yu 2018) in its minimisation form,

    A / B = min_{y > 0}  y A^2 / 2 + 1 / (2 y B^2)     (minimiser y = 1 / (A B)),

turns it into a problem that is convex in (b, p, f, f_s) for fixed y: ``A^2 = p^2`` and
``B^-2`` (a convex decreasing power of a concave function) are convex, and the deadline
``C / f + S / R + G / f_s`` is convex. Alternating the closed-form y-update with the
convex x-update never increases the objective; a fixed point is a stationary point of
the original problem, and since the change of variables (b, p) -> (b, t = S / R) is a
smooth bijection onto a jointly convex problem (see ``oracle``), it is the global optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetune.protocols.privtuner.system import Allocation, Instance, objective, rate, repair

LN2 = math.log(2)


class ContinuousInfeasible(Exception):
    """No allocation meets every deadline for this parameter choice."""


@dataclass
class ContinuousResult:
    alloc: Allocation
    objective: float  # energy - omega * privacy
    history: list[float] = field(default_factory=list)  # true objective after each QT iteration
    iterations: int = 0


class QuadraticTransformSolver:
    """One compiled cvxpy problem per instance (and restriction), re-solved with new parameters.

    ``equal_bandwidth`` / ``max_power`` pin b = B/N or p = p_max (the baselines).
    """

    def __init__(self, inst: Instance, equal_bandwidth: bool = False, max_power: bool = False):
        import cvxpy as cp

        self.inst, n, c = inst, inst.n, inst.cell
        # Variables as shares of their caps (all in [0, 1]): b = B b^, p = p_max p^, f = f_max f^, f_s = F_s f_s^.
        # Keeps the conic solver well conditioned across MHz, mW, GHz and thousands of server GHz.
        self.b, self.p = cp.Variable(n, nonneg=True), cp.Variable(n, nonneg=True)
        self.f, self.fs = cp.Variable(n, nonneg=True), cp.Variable(n, nonneg=True)
        self.C, self.S, self.G = (cp.Parameter(n, nonneg=True) for _ in range(3))  # C / f_max, S / B, G / F_s
        self.T = cp.Parameter(n)  # deadline minus downlink time
        self.w1, self.w2 = cp.Parameter(n, nonneg=True), cp.Parameter(n, nonneg=True)  # QT weights
        self.ec, self.es = cp.Parameter(n, nonneg=True), cp.Parameter(n, nonneg=True)  # kappa C f_max^2, kappa_s G F_s^2
        snr = inst.g * inst.pmax / c.bandwidth_mhz  # SNR at full power over the whole band
        R = -cp.rel_entr(self.b, self.b + cp.multiply(snr, self.p)) / LN2  # rate / B, concave
        u = cp.Variable(n, nonneg=True)  # B / rate: u >= 1 / R (one cone, shared by energy and deadline)
        energy = (self.ec @ cp.square(self.f) + cp.sum(cp.multiply(self.w1, cp.square(self.p)))
                  + cp.sum(cp.multiply(self.w2, cp.square(u))) + self.es @ cp.square(self.fs))
        cons = [
            u >= cp.inv_pos(R),
            cp.multiply(self.C, cp.inv_pos(self.f)) + cp.multiply(self.S, u) + cp.multiply(self.G, cp.inv_pos(self.fs)) <= self.T,
            cp.sum(self.b) <= 1, cp.sum(self.fs) <= 1, self.p <= 1, self.f <= 1,
        ]
        if equal_bandwidth:
            cons.append(self.b == 1 / n)
        if max_power:
            cons.append(self.p == 1)
        self.problem = cp.Problem(cp.Minimize(energy), cons)
        self.equal_bandwidth, self.max_power = equal_bandwidth, max_power

    def _set_choice(self, choice: np.ndarray) -> tuple[np.ndarray, ...]:
        inst, idx, c = self.inst, np.arange(self.inst.n), self.inst.cell
        S, C, G = inst.S[idx, choice], inst.C[idx, choice], inst.G[idx, choice]
        self.C.value, self.S.value, self.G.value = C / inst.fmax, S / c.bandwidth_mhz, G / c.server_ghz
        self.ec.value, self.es.value = inst.kc * C * inst.fmax**2, inst.ks * G * c.server_ghz**2
        self.T.value = c.deadline_s - inst.Tdl[idx, choice]
        return S, C, G

    def _run(self, problem) -> Allocation | None:
        """Solve ``problem``; the allocation, or None on numerical failure. Raises on infeasibility."""
        import cvxpy as cp

        inst, c = self.inst, self.inst.cell
        try:
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=400)
        except cp.SolverError:  # numerical trouble at tight tolerances: Clarabel's defaults
            try:
                problem.solve(solver=cp.CLARABEL)
            except cp.SolverError:
                return None
        if problem.status in ("infeasible", "infeasible_inaccurate"):
            raise ContinuousInfeasible(problem.status)
        if problem.status not in ("optimal", "optimal_inaccurate"):
            return None
        b, p, f, fs = (np.maximum(v.value, 1e-15) for v in (self.b, self.p, self.f, self.fs))
        return Allocation(b * c.bandwidth_mhz, p * inst.pmax, f * inst.fmax, fs * c.server_ghz)

    def solve(self, choice: np.ndarray, omega: float, start: Allocation | None = None, tol: float = 1e-12,
              max_iter: int = 500, patience: int = 3) -> ContinuousResult:
        inst, c = self.inst, self.inst.cell
        S, _, _ = self._set_choice(np.asarray(choice))
        if start is None:
            b0, p0 = np.full(inst.n, inst.cell.bandwidth_mhz / inst.n), inst.pmax.copy()
        else:
            b0, p0 = start.b, start.p
        y = 1 / (p0 * rate(b0, p0, inst.g))
        history, best, stalled = [], None, 0
        for it in range(1, max_iter + 1):
            # S (y p^2 / 2 + 1 / (2 y R^2)) in the shares: p = p_max p^, 1 / R = u / B
            self.w1.value, self.w2.value = S * y * inst.pmax**2 / 2, S / (2 * y * c.bandwidth_mhz**2)
            alloc = self._run(self.problem)
            if alloc is None:  # numerical floor of the solver
                if best is None:
                    raise ContinuousInfeasible("solver failed")
                break
            alloc = repair(inst, choice, alloc)
            value = objective(inst, choice, alloc, omega)
            history.append(value)
            if best is None or value < best.objective:
                best = ContinuousResult(alloc, value)
            y = 1 / (alloc.p * rate(alloc.b, alloc.p, inst.g))
            # stop after `patience` iterations without a gain above tol (solver noise can make single steps rise)
            stalled = stalled + 1 if len(history) > 1 and history[-2] - history[-1] <= tol * max(1.0, abs(history[-1])) else 0
            if stalled >= patience:
                break
        best.history, best.iterations = history, len(history)
        return best
