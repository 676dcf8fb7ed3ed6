"""Runs the solver the ``optimizer`` group chose and collects what a run reports.

Each solver is a small class with one job; this module is the only place that knows how each
one is driven (a trainer loop, a time march, a multigrid solve) and what it leaves behind.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from neuralpde_cli.ansatz.gmm import JumpConvolvedMixture
from neuralpde_cli.ansatz.mlp import MLP
from neuralpde_cli.errors import UserError
from neuralpde_cli.distributed import parameter_digests, rank_seed
from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.run.rundir import MetricsWriter, RunDir
from neuralpde_cli.solvers.gradient import GradientSolver
from neuralpde_cli.solvers.multigrid import MultigridSolver
from neuralpde_cli.solvers.time_march import TimeMarcher
from neuralpde_cli.training.checkpoint import save_checkpoint
from neuralpde_cli.training.objectives import DensityObjective, GridObjective, SteadyPINNObjective
from neuralpde_cli.training.samplers import CollocationSampler

log = logging.getLogger(__name__)


def run_solver(cfg: DictConfig, equation: Any, ansatz: Any, solver: Any, run: RunDir,
               resume_state: dict[str, Any] | None) -> dict[str, Any]:
    """Solve, write solution.npz, and return the summary fields (metrics, steps, ...)."""
    if getattr(equation, "jumps", None) is not None and not isinstance(solver, TimeMarcher):
        raise UserError(f"equation.sde.kind={equation.cfg.sde.kind} has jumps: solve marches "
                        "its diffusion and adds the jumps in closed form, with ansatz=gmm "
                        "optimizer=time_march (a trained residual has no jump term)")
    if isinstance(solver, GradientSolver):
        return _run_gradient(cfg, equation, ansatz, solver, run, resume_state)
    if isinstance(solver, TimeMarcher):
        return _run_time_march(cfg, equation, ansatz, solver, run)
    if isinstance(solver, MultigridSolver):
        return _run_multigrid(cfg, equation, ansatz, solver, run)
    raise TypeError(f"no driver for solver {type(solver).__name__}")


def _progress(total: float, label: str, enabled: bool) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                    console=Console(stderr=True),
                    disable=not (enabled and sys.stderr.isatty()))  # a file: log lines instead


def _save_solution_checkpoint(run: RunDir, solution: torch.nn.Module, steps: int) -> None:
    """A checkpoint of a solver that has no optimizer: the solution module and the RNG."""
    state = {"model": solution.state_dict(), "optimizer": {}, "scheduler": {}, "step": steps,
             "phase_index": 0, "rng": {"torch": torch.get_rng_state()}}
    for name in ("last", "best"):
        save_checkpoint(run.checkpoints / f"{name}.pt", state)


def _run_time_march(cfg: DictConfig, equation: DensityEquation, ansatz: Any, solver: Any,
                    run: RunDir) -> dict[str, Any]:
    """March the mixture's parameters in t; every accepted step is a row of metrics.csv."""
    writer = MetricsWriter(run.metrics_csv, ["step", "phase", "t", "dt", "step_error",
                                             "lstsq_residual", "elapsed_s"])
    progress = _progress(equation.t_final, "time-march", bool(cfg.trainer.progress))
    steps = 0
    with progress:
        bar = progress.add_task("march", total=equation.t_final, info="")

        def callback(t: float, info: dict[str, Any]) -> None:
            nonlocal steps
            steps += 1
            writer.write({"step": steps, "phase": "march", "t": t, **info})
            progress.update(bar, completed=t, info=f"t {t:.4g}  dt {info.get('dt', 0):.2e}")

        start = time.perf_counter()
        result = solver.run(equation, ansatz, callback)
    log.info("time-march done: t = %g in %d steps, %.2f s", equation.t_final, steps,
             time.perf_counter() - start)
    writer.close()
    solution = result.ansatz
    if getattr(equation, "jumps", None) is not None:  # the diffusion was marched: add the jumps
        solution = JumpConvolvedMixture(solution, equation.jumps)
    _save_solution_checkpoint(run, solution, steps)
    metrics = _density_report(equation, solution, run)
    return {"metrics": metrics, "steps": steps, "stop_reason": "t_final reached"}


def _run_multigrid(cfg: DictConfig, equation: Any, ansatz: Any, solver: Any,
                   run: RunDir) -> dict[str, Any]:
    """Solve the grid system to tolerance; every cycle is a row of metrics.csv."""
    n = ansatz.resolution
    system = equation.discretize(n)
    start = time.perf_counter()
    values, history = solver.solve(system, ansatz.values().detach())
    log.info("multigrid: %d² nodes, %d cycles, rel_residual %.3e, %.2f s", n, len(history),
             history[-1]["rel_residual"] if history else float("nan"), time.perf_counter() - start)
    with torch.no_grad():
        ansatz.set_values(values)
    writer = MetricsWriter(run.metrics_csv, ["step", "phase", "rel_residual", "elapsed_s"])
    for row in history:
        writer.write({"step": row["cycle"], "phase": "multigrid", **row})
    writer.close()
    _save_solution_checkpoint(run, ansatz, len(history))
    return _grid_report(equation, ansatz, run, {"steps": len(history), "cycles": len(history),
                                                **solver.convergence(history, values.dtype)})


def _grid_report(equation: Any, ansatz: Any, run: RunDir, extra: dict[str, Any]) -> dict[str, Any]:
    n = ansatz.resolution
    values = ansatz.values().detach()
    metrics = equation.evaluate(values, n)
    run.write_solution(equation.solution_arrays(values, n))
    return {"metrics": metrics, "resolution": n, **extra}


def _normalized(solution: torch.nn.Module) -> torch.nn.Module:
    """The solution with its mass set where the ansatz sets it after training (an MLP with an
    ensemble envelope: log Z(t) by quadrature); others are normalized by construction."""
    normalize = getattr(solution, "normalize", None)
    if normalize is not None:
        normalize()
    return solution


def _density_report(equation: DensityEquation, solution: torch.nn.Module, run: RunDir) -> dict[str, float]:
    metrics = equation.evaluate(_normalized(solution))
    extra = getattr(equation, "evaluate_extra", None)
    if extra is not None:
        metrics.update(extra(solution))
    run.write_solution(equation.solution_arrays(solution))
    return metrics


#: what the live line and metrics.csv of a density training show, and their labels on the line:
#: the error on points drawn from the exact solution (blind where it has no mass), and the two
#: on the regular grid of solution.npz (every point alike: spurious tails show there)
DENSITY_LIVE_METRICS = {"rel_l2_error": "L2err(exact-law pts)",
                        "grid_rel_l2_error": "L2err(grid)",
                        "max_rel_peak_error": "maxerr/peak(grid)"}

#: nodes per side on which a mesh-free network's steady solution is compared with the grid
PINN_EVAL_RESOLUTION = 65


class _NetworkOnNodes:
    """A network T(x, y) read at the nodes of the equation's grid, for the grid reports."""

    def __init__(self, model: MLP, equation: Any, resolution: int) -> None:
        self.model, self.resolution = model, resolution
        system = equation.discretize(resolution)
        xx, yy = torch.meshgrid(system.x, system.y, indexing="ij")
        self.nodes = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)

    def values(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.nodes).reshape(self.resolution, self.resolution)


def _run_gradient(cfg: DictConfig, equation: Any, ansatz: Any, solver: GradientSolver,
                  run: RunDir, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(rank_seed(int(cfg.seed)))
    trainer_cfg = OmegaConf.to_object(cfg.trainer)
    if isinstance(equation, DensityEquation):
        sampler = CollocationSampler(OmegaConf.to_object(cfg.sampler), equation, ansatz, generator)
        objective = DensityObjective(equation, ansatz, sampler)
        trainer = solver.run(ansatz, objective, trainer_cfg, run,
                             lambda: equation.evaluate(_normalized(ansatz), n_points=1024, quick=True),
                             "rel_l2_error", resume_state, DENSITY_LIVE_METRICS)
        metrics = _density_report(equation, ansatz, run)
    elif isinstance(ansatz, MLP):
        on_grid = _NetworkOnNodes(ansatz, equation, PINN_EVAL_RESOLUTION)
        objective = SteadyPINNObjective(equation, ansatz, int(cfg.sampler.batch_size), generator)
        trainer = solver.run(ansatz, objective, trainer_cfg, run,
                             lambda: equation.evaluate(on_grid.values().detach(), on_grid.resolution),
                             "rel_l2_error", resume_state)
        metrics = _grid_report(equation, on_grid, run, {})["metrics"]
    else:
        system = equation.discretize(ansatz.resolution)
        objective = GridObjective(system, ansatz, str(cfg.ansatz.loss))
        trainer = solver.run(ansatz, objective, trainer_cfg, run,
                             lambda: equation.evaluate(ansatz.values().detach(), ansatz.resolution),
                             "rel_l2_error", resume_state)
        metrics = _grid_report(equation, ansatz, run, {})["metrics"]
    return {"metrics": metrics, "steps": trainer.step, "stop_reason": trainer.stop_reason,
            "final_loss": trainer.last_terms.get("loss"),
            "train_time_s": trainer.elapsed, **parameter_digests(ansatz)}
