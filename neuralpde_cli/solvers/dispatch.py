"""Runs the solver the ``optimizer`` group chose and collects what a run reports.

Each solver is a small class with one job; this module is the only place that knows how each
one is driven (a trainer loop, a time march, a multigrid solve) and what it leaves behind.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.solvers.gradient import GradientSolver
from neuralpde_cli.training.objectives import DensityObjective
from neuralpde_cli.training.samplers import CollocationSampler


def run_solver(cfg: DictConfig, equation: Any, ansatz: Any, solver: Any, run: RunDir,
               resume_state: dict[str, Any] | None) -> dict[str, Any]:
    """Solve, write solution.npz, and return the summary fields (metrics, steps, ...)."""
    if isinstance(solver, GradientSolver):
        return _run_gradient(cfg, equation, ansatz, solver, run, resume_state)
    raise NotImplementedError(type(solver).__name__)


def _density_report(equation: DensityEquation, solution: torch.nn.Module, run: RunDir) -> dict[str, float]:
    metrics = equation.evaluate(solution)
    extra = getattr(equation, "evaluate_extra", None)
    if extra is not None:
        metrics.update(extra(solution))
    run.write_solution(equation.solution_arrays(solution))
    return metrics


def _run_gradient(cfg: DictConfig, equation: Any, ansatz: Any, solver: GradientSolver,
                  run: RunDir, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    trainer_cfg = OmegaConf.to_object(cfg.trainer)
    if isinstance(equation, DensityEquation):
        sampler = CollocationSampler(OmegaConf.to_object(cfg.sampler), equation, ansatz, generator)
        objective = DensityObjective(equation, ansatz, sampler)
        trainer = solver.run(ansatz, objective, trainer_cfg, run,
                             lambda: equation.evaluate(ansatz, n_points=1024, quick=True),
                             "rel_l2_error", resume_state)
        metrics = _density_report(equation, ansatz, run)
    else:
        raise NotImplementedError(type(equation).__name__)
    return {"metrics": metrics, "steps": trainer.step, "stop_reason": trainer.stop_reason,
            "final_loss": trainer.last_terms.get("loss"),
            "train_time_s": trainer.elapsed}
