"""Gradient training of an ansatz on its objective: Adam, L-BFGS, Levenberg–Marquardt, in that
order, each phase optional."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.training.trainer import Objective, Phase, Trainer, TrainerConfig

SCHEDULES = ("cosine", "exponential", "constant")


@dataclass
class GradientConfig:
    name: str = "adam_lbfgs"
    lr: float = 1e-3
    adam_steps: int = 2000
    #: outer L-BFGS steps of ``lbfgs_iters`` iterations each (strong-Wolfe line search)
    lbfgs_steps: int = 0
    lbfgs_lr: float = 1.0
    lbfgs_iters: int = 20
    history: int = 50
    #: Levenberg–Marquardt steps (Gauss–Newton with adaptive damping; small models only)
    lm_steps: int = 0
    #: its initial damping, relative to the curvature (adapted every step)
    damping: float = 1e-3
    schedule: str = "cosine"
    final_lr_factor: float = 0.01


class GradientSolver:
    """Builds the phase plan (initial condition, Adam, L-BFGS) and hands it to the Trainer."""

    def __init__(self, cfg: GradientConfig) -> None:
        if cfg.lr <= 0 or cfg.lbfgs_lr <= 0:
            raise UserError(f"optimizer.lr={cfg.lr} and optimizer.lbfgs_lr={cfg.lbfgs_lr} must be > 0")
        steps = {"adam_steps": cfg.adam_steps, "lbfgs_steps": cfg.lbfgs_steps,
                 "lm_steps": cfg.lm_steps}
        if min(steps.values()) < 0 or sum(steps.values()) == 0:
            raise UserError(" and ".join(f"optimizer.{k}={v}" for k, v in steps.items())
                            + " must be ≥ 0 and not all 0")
        if not 0 < cfg.damping < 1e10:
            raise UserError(f"optimizer.damping={cfg.damping} must be in (0, 1e10)")
        if cfg.lbfgs_iters <= 0 or cfg.history <= 0:
            raise UserError("optimizer.lbfgs_iters and optimizer.history must be positive integers")
        check_choice("optimizer.schedule", cfg.schedule, SCHEDULES)
        if not 0 < cfg.final_lr_factor <= 1:
            raise UserError(f"optimizer.final_lr_factor={cfg.final_lr_factor} must be in (0, 1]")
        self.cfg = cfg

    def phases(self, trainer_cfg: TrainerConfig, objective: Objective) -> list[Phase]:
        c = self.cfg
        plan = []
        if "ic" in objective.term_names and trainer_cfg.ic_steps > 0:
            plan.append(Phase("ic", "adam", trainer_cfg.ic_steps, c.lr, c.schedule, c.final_lr_factor))
        if c.adam_steps > 0:
            plan.append(Phase("adam", "adam", c.adam_steps, c.lr, c.schedule, c.final_lr_factor))
        if c.lbfgs_steps > 0:
            plan.append(Phase("lbfgs", "lbfgs", c.lbfgs_steps, c.lbfgs_lr,
                              lbfgs_iters=c.lbfgs_iters, history=c.history))
        if c.lm_steps > 0:
            plan.append(Phase("lm", "lm", c.lm_steps, 1.0, damping=c.damping))
        return plan

    def run(self, model: torch.nn.Module, objective: Objective, trainer_cfg: TrainerConfig,
            run: RunDir, evaluate: Callable[[], dict[str, float]], error_key: str,
            resume: dict[str, Any] | None = None, shown: dict[str, str] | None = None) -> Trainer:
        trainer = Trainer(trainer_cfg, self.phases(trainer_cfg, objective), model, objective,
                          run, evaluate, error_key, shown)
        if resume is not None:
            trainer.load_state(resume)
        trainer.fit(resume_step=trainer.step if resume is not None else None)
        return trainer
