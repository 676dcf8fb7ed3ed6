"""Case 4: steady diffusion −∇·(κ∇T) = 1 on the unit square, T = 0 on the boundary.

n nodes per side (the unknowns are the (n − 2)² interior nodes), κ = 1, and a 4 × 4 checkerboard
of κ = 1 and 100. Every solver gets the same matrix (the project's finite-volume assembly,
``neuralpde_cli.references.sparse_direct``; a plain 5-point Laplacian where that is missing)
and is scored against scipy's sparse direct solve: relative error ‖T − T_direct‖/‖T_direct‖,
the time to reach 1e-6, and the time to the solver's own tolerance (relative residual 1e-10).

* neuralpde's geometric multigrid (``MultigridSolver``: full multigrid then V-cycles, and
  MG-preconditioned CG), timed from setup to the end of the solve;
* pyamg smoothed aggregation and Ruge–Stüben (setup + V-cycles);
* scipy ``spsolve`` (SuperLU, minimum-degree ordering): the reference;
* the classic baseline: the squared residual minimized by L-BFGS (float32) on a coarse-to-fine
  chain from 17² up, κ = 1, only at n ≤ 257 (it is slow: 435 s published at 1024²).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from benchmarks.common import (Clock, Column, Row, Spec, Unavailable, attempt, describe,
                               median_time, row, skipped, tier, time_to, unavailable)

TARGET, TOL = 1e-6, 1e-10
SETTINGS: dict[str, dict[str, Any]] = {
    # budget_s: time spent repeating one measurement (a first call slower than that is the
    # one measurement: the direct solve and pyamg at 1025²)
    "full": dict(sizes=(129, 257, 513, 1025), checkerboard=(513, 1025), repeats=3, budget_s=10.0,
                 classic=dict(max_n=257, iters_per_level=2000, chunk=100, cap_s=60.0)),
    "quick": dict(sizes=(129, 257, 513), checkerboard=(513,), repeats=2, budget_s=2.0,
                  classic=None),
    "smoke": dict(sizes=(17, 33), checkerboard=(33,), repeats=1, budget_s=0.2,
                  classic=dict(max_n=33, iters_per_level=40, chunk=20, cap_s=5.0)),
}
SPEC = Spec(
    "diffusion",
    "Steady diffusion −∇·(κ∇T) = 1 on the unit square, T = 0 on the boundary: error against "
    f"scipy's direct solve; time to {TARGET:g} and to relative residual {TOL:g}",
    (Column("time_s", "time to tol"), Column("setup_s", "setup"),
     Column("time_to_target_s", f"time to {TARGET:g}"), Column("error", "final error", "error"),
     Column("iterations", "cycles", "int")),
    ratio_key="time_to_target_s", plot="settings", plot_key="time_to_target_s",
)


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    cases = [(n, False) for n in s["sizes"]] + [(n, True) for n in s["checkerboard"]]
    rows: list[Row] = []
    for n, checker in cases:
        setting = f"n={n} " + ("checkerboard κ 1/100" if checker else "κ=1")
        rows += _setting(n, checker, setting, s, device)
    return rows


def _setting(n: int, checker: bool, setting: str, s: dict[str, Any], device: str) -> list[Row]:
    try:
        problem = _problem(n, checker, device)
    except Unavailable as exc:
        return [unavailable("every solver", setting, str(exc))]
    rows = attempt("scipy spsolve (reference)", setting, lambda: _direct(problem, setting, s))
    if rows[0]["status"] != "ok":
        return rows
    for cycle in ("fmg", "pcg"):
        name = f"neuralpde multigrid ({cycle})"
        rows += attempt(name, setting, lambda: _multigrid(name, setting, cycle, problem, s, device))
    for kind in ("smoothed aggregation", "Ruge–Stüben"):
        rows += attempt(f"pyamg {kind}", setting, lambda: _pyamg(kind, setting, problem, s))
    name, classic = "classic: squared residual, L-BFGS chain", s["classic"]
    if checker or not classic or n > classic["max_n"]:
        why = ("κ = 1 only" if checker else "not in --quick" if not classic
               else f"n > {classic['max_n']} (slow: 435 s published at 1024²)")
        return rows + [skipped(name, setting, why)]
    return rows + attempt(name, setting, lambda: _classic(name, setting, problem, classic, device))


# --- the problem ------------------------------------------------------------------------
@dataclass
class Problem:
    n: int
    checkerboard: bool
    matrix: sp.csr_matrix      # A on the unknowns
    rhs: np.ndarray
    unknown: np.ndarray        # flat indices (i·n + j) of the unknowns in the n × n grid
    system: Any                # the project's GridSystem, None with the fallback assembly
    assembly: str
    reference: np.ndarray | None = None

    def error(self, values: np.ndarray) -> float:
        """‖T − T_direct‖/‖T_direct‖ over the unknowns; ``values`` on them or on all n² nodes."""
        v = values.ravel()
        v = v[self.unknown] if v.size == self.n * self.n else v
        return float(np.linalg.norm(v - self.reference) / np.linalg.norm(self.reference))


def _problem(n: int, checkerboard: bool, device: str) -> Problem:
    """The project's system and matrix; for κ = 1 a plain 5-point Laplacian if that fails."""
    try:
        from neuralpde_cli.equations.diffusion import DiffusionConfig, FieldConfig, SteadyDiffusion
        from neuralpde_cli.references.sparse_direct import assemble_reduced
        kappa = (FieldConfig(kind="checkerboard", value=1.0, contrast=100.0, cells=4)
                 if checkerboard else FieldConfig(kind="constant", value=1.0))
        config = DiffusionConfig(kappa=kappa, source=FieldConfig(kind="constant", value=1.0))
        system = SteadyDiffusion(config, torch.float64, torch.device(device)).discretize(n)
        matrix, rhs, unknown = assemble_reduced(system)
    except Exception as exc:  # the project's assembly is missing or changed under us
        if checkerboard:
            raise Unavailable(f"the project's assembly failed: {describe(exc)}") from None
        return Problem(n, False, *_laplacian(n), None,
                       f"the benchmark's own (the project's failed: {describe(exc)})")
    return Problem(n, checkerboard, matrix.tocsr(), rhs, unknown, system, "the project's")


def _laplacian(n: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """κ = 1, s = 1: the 5-point stencil scaled like the finite-volume one (4, −1; b = h²)."""
    m = n - 2
    lap1 = sp.diags([-np.ones(m - 1), 2.0 * np.ones(m), -np.ones(m - 1)], [-1, 0, 1])
    eye = sp.identity(m)
    matrix = (sp.kron(lap1, eye) + sp.kron(eye, lap1)).tocsr()
    grid = np.arange(n * n).reshape(n, n)
    return matrix, np.full(m * m, 1.0 / (n - 1) ** 2), grid[1:-1, 1:-1].ravel()


# --- the solvers ------------------------------------------------------------------------
def _direct(problem: Problem, setting: str, s: dict[str, Any]) -> Row:
    import scipy.sparse.linalg as spla
    csc = problem.matrix.tocsc()
    timing = median_time(lambda: spla.spsolve(csc, problem.rhs, permc_spec="MMD_AT_PLUS_A"),
                         s["repeats"], "cpu", s["budget_s"])
    problem.reference = timing.result
    return row("scipy spsolve (reference)", setting, time_s=timing.median_s,
               time_to_target_s=timing.median_s, error=0.0,
               note=f"SuperLU, {problem.matrix.shape[0]:,} unknowns"
               + ("" if problem.system is not None else f"; matrix: {problem.assembly}"),
               assembly=problem.assembly)


def _multigrid(name: str, setting: str, cycle: str, problem: Problem, s: dict[str, Any],
               device: str) -> Row:
    if problem.system is None:
        raise Unavailable("needs the project's diffusion system (see the reference row's note)")
    from neuralpde_cli.solvers.multigrid import MultigridConfig, MultigridSolver

    def solve(max_cycles: int = 50) -> tuple[Any, list[dict[str, Any]]]:
        cfg = MultigridConfig(cycle=cycle, tol=TOL, max_cycles=max_cycles)
        return MultigridSolver(cfg).solve(problem.system, None)

    timing = median_time(solve, s["repeats"], device, s["budget_s"])
    values, history = timing.result
    error = problem.error(values.cpu().numpy())
    # the first cycle whose iterate is within TARGET of the direct solve: the same
    # (deterministic) solve stopped after k cycles, untimed, bisected over k
    errors: dict[int, float] = {len(history): error}
    lo, hi = 1, len(history)
    while error <= TARGET and lo < hi:
        mid = (lo + hi) // 2
        errors[mid] = problem.error(solve(history[mid - 1]["cycle"])[0].cpu().numpy())
        lo, hi = (lo, mid) if errors[mid] <= TARGET else (mid + 1, hi)
    curve = [(history[k - 1]["elapsed_s"], e) for k, e in sorted(errors.items())]
    reached = history[hi - 1]["elapsed_s"] if error <= TARGET else None
    residual = history[-1]["rel_residual"] if history else float("nan")
    return row(name, setting, time_s=timing.median_s, time_to_target_s=reached, error=error,
               iterations=len(history), curve=curve, repeats=timing.repeats,
               note=f"float64, {device}" + _unconverged(residual, len(history)))


def _pyamg(kind: str, setting: str, problem: Problem, s: dict[str, Any]) -> Row:
    import pyamg
    build: Callable[..., Any] = {"smoothed aggregation": pyamg.smoothed_aggregation_solver,
                                 "Ruge–Stüben": pyamg.ruge_stuben_solver}[kind]

    def solve() -> dict[str, Any]:
        start = time.perf_counter()
        hierarchy = build(problem.matrix)
        setup = time.perf_counter() - start
        curve, excluded = [], 0.0

        def record(x: np.ndarray) -> None:  # the error of each iterate, its cost not counted
            nonlocal excluded
            now = time.perf_counter()
            curve.append((now - start - excluded, problem.error(x)))
            excluded += time.perf_counter() - now

        x = hierarchy.solve(problem.rhs, tol=TOL, maxiter=200, callback=record)
        total = time.perf_counter() - start - excluded
        return dict(total=total, setup=setup, x=x, curve=curve)

    timing = median_time(lambda: solve(), s["repeats"], "cpu", s["budget_s"])
    out = timing.result
    residual = np.linalg.norm(problem.rhs - problem.matrix @ out["x"]) / np.linalg.norm(problem.rhs)
    return row(f"pyamg {kind}", setting, time_s=timing.median_s, setup_s=out["setup"],
               time_to_target_s=time_to(out["curve"], TARGET), error=problem.error(out["x"]),
               iterations=len(out["curve"]), curve=out["curve"], repeats=timing.repeats,
               note=f"pyamg {pyamg.__version__}, CPU" + _unconverged(residual, len(out["curve"])))


def _unconverged(residual: float, cycles: int) -> str:
    return "" if residual <= TOL else f"; residual {residual:.0e} > tol after {cycles} cycles"


def _classic(name: str, setting: str, problem: Problem, c: dict[str, Any], device: str) -> Row:
    """min ‖A T − b‖² by L-BFGS on grids 17, 33, …, n, each started from the coarser solution
    interpolated; κ = 1 (the stencil 4, −1 and b = h²), float32."""
    n, levels = problem.n, [problem.n]
    while levels[0] > 17:
        levels.insert(0, (levels[0] - 1) // 2 + 1)
    kw = {"dtype": torch.float32, "device": torch.device(device)}
    clock, curve = Clock(device), []
    interior = torch.zeros(levels[0] - 2, levels[0] - 2, **kw)
    iterations = 0
    for nk in levels:
        if nk != levels[0]:  # bilinear interpolation of the coarser solution, boundary zero
            full = F.pad(interior.detach(), (1, 1, 1, 1))[None, None]
            interior = F.interpolate(full, size=(nk, nk), mode="bilinear",
                                     align_corners=True)[0, 0, 1:-1, 1:-1]
        u = interior.clone().requires_grad_(True)
        h2 = 1.0 / (nk - 1) ** 2
        optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=c["chunk"], history_size=50,
                                      line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                      tolerance_change=0.0)

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            p = F.pad(u, (1, 1, 1, 1))
            r = 4.0 * u - p[2:, 1:-1] - p[:-2, 1:-1] - p[1:-1, 2:] - p[1:-1, :-2] - h2
            loss = (r * r).mean() / (h2 * h2)
            loss.backward()
            return loss

        for _ in range(c["iters_per_level"] // c["chunk"]):
            optimizer.step(closure)
            iterations += c["chunk"]
            if nk == n:
                elapsed = clock.pause()
                curve.append((elapsed, problem.error(u.detach().double().cpu().numpy())))
                clock.resume()
            if clock.read() > c["cap_s"]:
                break
        interior = u.detach()
    clock.pause()
    capped = clock.elapsed > c["cap_s"]
    return row(name, setting, time_s=clock.elapsed, time_to_target_s=time_to(curve, TARGET),
               error=problem.error(interior.double().cpu().numpy()), iterations=iterations,
               curve=curve, note=f"float32, {levels[0]}²…{n}², ≤ {c['iters_per_level']} per level"
               + (f", {c['cap_s']:g} s cap hit" if capped else ""))
