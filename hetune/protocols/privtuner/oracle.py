"""A second, independent formulation of the continuous problem (cvxpy).

With the uplink time ``t`` as a variable instead of the power, the uplink energy is

    F(b, t) = t (b / g) (2^(S / (b t)) - 1) = (1/g) m (e^(a/m) - 1),   m = b t,  a = S ln 2,

jointly convex in (b, t) (it depends on the product only, and m -> F(m) is convex,
decreasing and satisfies 2 m F'' + F' >= 0). No single DCP atom expresses it, so the
oracle writes it in log coordinates ``x = log b + log t`` (with ``e^log b <= b``,
``e^log t <= t``, tight at the optimum since F decreases in both) as the power series

    F = (a / g) (1 + sum_{k>=2} exp(-(k-1)(x - log a) - log k!)),

a sum of exponentials of affine functions: exact as K -> infinity, a lower bound for
finite K. The series is truncated at K terms and K doubled until the neglected tail at
the solution is below 1e-10 of F. The power limit is exact: ``S / t <= b log2(1 + g
p_max / b)`` (relative entropy). This is a convex program solved to global optimality.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from hetune.protocols.privtuner.system import Allocation, Instance, objective, uplink_power

LN2 = math.log(2)


class OracleFailed(RuntimeError):
    """The conic solver did not reach a solution (it stalls on large series, from about 20 owners)."""


def _tail_ratio(y: np.ndarray, K: int) -> float:
    """Upper bound of sum_{k>K} y^k/k! relative to e^y - 1."""
    log_tail = (K + 1) * np.log(y) - gammaln(K + 2) + y  # y^(K+1)/(K+1)! * e^y bounds the tail
    return float(np.max(np.exp(log_tail) / np.expm1(y)))


def oracle_solve(inst: Instance, choice: np.ndarray, omega: float, K: int = 24, max_K: int = 400):
    """Global optimum of the continuous problem for ``choice``: (Allocation, objective, uplink times).

    Tries b, f, f_s as shares of their caps first, then in natural units (MHz, GHz): Clarabel
    stalls on one or the other depending on the instance. Raises OracleFailed if both stall.
    """
    errors = []
    for scaled in (True, False):
        try:
            return _oracle(inst, np.asarray(choice), omega, K, max_K, scaled)
        except OracleFailed as err:
            errors.append(str(err))
    raise OracleFailed("; ".join(errors))


def _oracle(inst: Instance, choice: np.ndarray, omega: float, K: int, max_K: int, scaled: bool):
    import cvxpy as cp

    n, c, idx = inst.n, inst.cell, np.arange(inst.n)
    C, S, G = inst.C[idx, choice], inst.S[idx, choice], inst.G[idx, choice]
    a = S * LN2
    ub, uf, ufs = (c.bandwidth_mhz, inst.fmax, c.server_ghz) if scaled else (1.0, np.ones(n), 1.0)  # variable units
    while True:
        b, t, f, fs = (cp.Variable(n, nonneg=True) for _ in range(4))  # b ub MHz, t s, f uf GHz, fs ufs GHz
        lb, lt = cp.Variable(n), cp.Variable(n)
        x = lb + lt + np.log(ub) - np.log(a)  # log(m / a), m = b t in MHz s
        series = sum(cp.exp(-(k - 1) * x - gammaln(k + 1)) for k in range(2, K + 1))  # (n,)
        uplink = cp.multiply(a / inst.g, 1 + series)
        energy = cp.sum(uplink) + inst.kc * (C * uf**2) @ cp.square(f)
        if inst.ks > 0:
            energy = energy + inst.ks * G * ufs**2 @ cp.square(fs)
        cons = [
            cp.exp(lb) <= b, cp.exp(lt) <= t,
            cp.multiply(C / uf, cp.inv_pos(f)) + t + cp.multiply(G / ufs, cp.inv_pos(fs)) <= c.deadline_s - inst.Tdl[idx, choice],
            -ub * cp.rel_entr(b, b + inst.g * inst.pmax / ub) / LN2 >= cp.multiply(S, cp.inv_pos(t)),
            cp.sum(b) * ub <= c.bandwidth_mhz, cp.sum(fs) * ufs <= c.server_ghz, cp.multiply(f, uf) <= inst.fmax,
        ]
        prob = cp.Problem(cp.Minimize(energy), cons)
        try:
            prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
        except cp.SolverError:  # stalled short of the tight tolerances: Clarabel's defaults (1e-8)
            try:
                prob.solve(solver=cp.CLARABEL)
            except cp.SolverError as err:
                raise OracleFailed(f"conic solve did not converge (n={n}, K={K}, {'shares' if scaled else 'natural units'})") from err
        if prob.status not in ("optimal", "optimal_inaccurate"):
            raise OracleFailed(f"oracle: {prob.status}")
        bv, tv = ub * np.exp(lb.value), np.exp(lt.value)
        y = a / (bv * tv)
        if _tail_ratio(y, K) < 1e-10 or K >= max_K:
            break
        K *= 2
    alloc = Allocation(bv, np.minimum(uplink_power(bv, tv, S, inst.g), inst.pmax), f.value * uf, fs.value * ufs)
    return alloc, objective(inst, choice, alloc, omega), tv
