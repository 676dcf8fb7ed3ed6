"""The gradient-training loop: phases, stopping, NaN rollback, checkpoints, signals, progress.

The trainer knows an :class:`Objective` (named loss terms per phase) and the parameters it
moves; it does not know which equation or ansatz it trains.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from neuralpde_cli.errors import UserError
from neuralpde_cli.run.rundir import MetricsWriter, RunDir
from neuralpde_cli.training.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    #: Adam steps fitting the initial condition alone (skipped when the ansatz has it built in)
    ic_steps: int = 200
    log_every: int = 100
    eval_every: int = 250
    checkpoint_every: int = 500
    #: stop when the total loss falls below this (0: off)
    loss_target: float = 0.0
    #: stop a phase after this many steps without a relative improvement of ``plateau_tol``
    plateau_patience: int = 0
    plateau_tol: float = 1e-3
    #: NaN/Inf rollbacks allowed before giving up, and the learning-rate factor for each
    max_retries: int = 3
    retry_lr_factor: float = 0.5
    #: clip the gradient norm (0: off)
    grad_clip: float = 0.0
    progress: bool = True
    weights: dict[str, float] = field(default_factory=lambda: {"ic": 1.0, "pde": 1.0, "bc": 1.0})


@dataclass
class Phase:
    """A stretch of training with one optimizer on the objective's terms for ``name``."""

    name: str
    optimizer: str  # "adam" | "lbfgs"
    steps: int
    lr: float
    schedule: str = "cosine"
    final_lr_factor: float = 0.01
    lbfgs_iters: int = 20
    history: int = 50


class Objective(Protocol):
    """What the trainer needs from a problem: named loss terms for a phase."""

    term_names: list[str]

    def loss_terms(self, phase: str) -> dict[str, torch.Tensor]: ...
    def freeze(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Diverged(Exception):
    """Training produced NaN/Inf more often than the retries allow."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint has been written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher): leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Runs phases of gradient steps on ``objective`` moving ``model``'s parameters."""

    def __init__(self, cfg: TrainerConfig, phases: list[Phase], model: torch.nn.Module,
                 objective: Objective, run: RunDir,
                 evaluate: Callable[[], dict[str, float]], error_key: str = "rel_l2_error") -> None:
        if not phases or any(p.steps < 0 for p in phases):
            raise UserError("the optimizer needs at least one phase with steps ≥ 0")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"trainer.{name}={getattr(cfg, name)} must be a positive integer")
        if cfg.max_retries < 0 or not 0 < cfg.retry_lr_factor < 1:
            raise UserError("trainer.max_retries must be ≥ 0 and trainer.retry_lr_factor in (0, 1)")
        self.cfg = cfg
        self.phases = phases
        self.model = model
        self.objective = objective
        self.run = run
        self.evaluate = evaluate
        self.error_key = error_key
        self.total_steps = sum(p.steps for p in phases)
        self.step = 0
        self.phase_index = 0
        self.phase_step = 0
        self.elapsed = 0.0
        self.best = math.inf
        self.retries = 0
        self.lr_scale = 1.0
        self.last_terms: dict[str, float] = {}
        self.last_error: float = math.nan
        self.stop_reason = "step budget"
        self._build_optimizer()

    # --- optimizers -----------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    def _build_optimizer(self) -> None:
        p = self.phase
        params = [q for q in self.model.parameters() if q.requires_grad]
        lr = p.lr * self.lr_scale
        if p.optimizer == "lbfgs":
            self.optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
                params, lr=lr, max_iter=p.lbfgs_iters, history_size=p.history,
                line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)
            self.objective.freeze()
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr)
        steps = max(p.steps, 1)
        if p.optimizer == "adam" and p.schedule == "cosine":
            self.scheduler: torch.optim.lr_scheduler.LRScheduler = \
                torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps,
                                                           eta_min=lr * p.final_lr_factor)
        elif p.optimizer == "adam" and p.schedule == "exponential":
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, p.final_lr_factor ** (1.0 / steps))
        else:
            self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizer, 1.0, total_iters=0)

    # --- one step -------------------------------------------------------------------------
    def _loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.objective.loss_terms(self.phase.name)
        total = sum(self.cfg.weights.get(k, 1.0) * v for k, v in terms.items())
        return total, terms

    def _step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step; returns the loss and terms, or raises FloatingPointError."""
        record: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            total, terms = self._loss()
            record["total"], record["terms"] = total, terms
            if torch.isfinite(total):
                total.backward()
            return total

        if self.phase.optimizer == "lbfgs":
            self.optimizer.step(closure)
            total, terms = self._loss()  # the loss at the new point, for the record
        else:
            closure()
            total, terms = record["total"], record["terms"]
            self._check_finite(total, terms)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        self._check_finite(total, terms)
        self.scheduler.step()
        return float(total.detach()), {k: float(v.detach()) for k, v in terms.items()}

    def _check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if torch.isfinite(total):
            grads = [q.grad for q in self.model.parameters() if q.grad is not None]
            if all(torch.isfinite(g).all() for g in grads):
                return
            raise FloatingPointError("the gradient of the loss")
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise FloatingPointError(f"loss term {bad[0] if bad else 'total'!r}")

    # --- state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step, "phase_index": self.phase_index, "phase_step": self.phase_step,
            "elapsed": self.elapsed, "best": self.best, "retries": self.retries,
            "lr_scale": self.lr_scale, "objective": self.objective.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.phase_index, self.phase_step = int(state["phase_index"]), int(state["phase_step"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.best, self.retries = float(state["best"]), int(state["retries"])
        self.lr_scale = float(state["lr_scale"])
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise UserError("the checkpoint does not match this model (was the config changed?): "
                            f"{str(exc).splitlines()[0][:200]}") from None
        self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def resume_from(self, path: Any) -> None:
        self.load_state(load_checkpoint(path))

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(),
                              "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict()})

    def _rollback(self, good: dict[str, Any], what: str) -> None:
        self.retries += 1
        if self.retries > self.cfg.max_retries:
            raise Diverged(f"training diverged at step {self.step} (phase {self.phase.name}): "
                           f"{what} became NaN/Inf {self.retries} times; rolled back "
                           f"{self.cfg.max_retries} times already. Lower optimizer.lr or the "
                           "loss weights")
        self.lr_scale *= self.cfg.retry_lr_factor
        self.model.load_state_dict(good["model"])
        self.optimizer.load_state_dict(good["optimizer"])
        self.scheduler.load_state_dict(good["scheduler"])
        for group in self.optimizer.param_groups:
            group["lr"] *= self.cfg.retry_lr_factor
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * self.cfg.retry_lr_factor for lr in self.scheduler.base_lrs]
        if hasattr(self.scheduler, "eta_min"):
            self.scheduler.eta_min *= self.cfg.retry_lr_factor
        log.warning("step %d: %s became NaN/Inf; rolled back and lowered the learning rate "
                    "to ×%.3g (retry %d of %d)", self.step, what, self.lr_scale, self.retries,
                    self.cfg.max_retries)

    def save(self, name: str = "last") -> None:
        save_checkpoint(self.run.checkpoints / f"{name}.pt", self.state())

    # --- the loop -------------------------------------------------------------------------
    def fit(self, resume_step: int | None = None) -> None:
        columns = ["step", "phase", "loss"] + [f"loss_{k}" for k in self.objective.term_names] \
            + ["lr", "elapsed_s", self.error_key]
        metrics = MetricsWriter(self.run.metrics_csv, columns, resume_step)
        console = Console(stderr=True)
        progress = Progress(TextColumn("[bold]{task.fields[phase]}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"), console=console,
                            disable=not self.cfg.progress, refresh_per_second=4)
        t_start = time.perf_counter() - self.elapsed
        good = self._snapshot()
        window_best, since_best = math.inf, 0
        try:
            with _SignalFlag() as flag, progress:
                bar = progress.add_task("train", total=self.total_steps, completed=self.step,
                                        phase=self.phase.name, info="")
                while self.phase_index < len(self.phases):
                    if self.phase_step >= self.phase.steps:
                        if not self._next_phase():
                            break
                        good, window_best, since_best = self._snapshot(), math.inf, 0
                        continue
                    if flag.signum is not None:
                        self.elapsed = time.perf_counter() - t_start
                        self.save()
                        raise Interrupted(flag.signum, self.step)
                    try:
                        loss, terms = self._step()
                    except FloatingPointError as exc:
                        self._rollback(good, str(exc))
                        continue
                    self.step += 1
                    self.phase_step += 1
                    self.elapsed = time.perf_counter() - t_start
                    self.last_terms = {"loss": loss, **terms}
                    row: dict[str, Any] = {"step": self.step, "phase": self.phase.name,
                                           "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                           "elapsed_s": self.elapsed}
                    row.update({f"loss_{k}": v for k, v in terms.items()})
                    if self.step % self.cfg.eval_every == 0 or self.phase_step == self.phase.steps:
                        self.last_error = self.evaluate().get(self.error_key, math.nan)
                        row[self.error_key] = self.last_error
                        if self.last_error < self.best:
                            self.best = self.last_error
                            self.save("best")
                    metrics.write(row)
                    if self.step % 25 == 0:
                        good = self._snapshot()
                    if self.step % self.cfg.checkpoint_every == 0:
                        self.save()
                    info = "  ".join(f"{k} {v:.3e}" for k, v in self.last_terms.items())
                    if math.isfinite(self.last_error):
                        info += f"  {self.error_key} {self.last_error:.3e}"
                    progress.update(bar, completed=self.step, phase=self.phase.name, info=info)
                    if self.step % self.cfg.log_every == 0:
                        log.info("step %d [%s] %s", self.step, self.phase.name, info)
                    if self.cfg.loss_target > 0 and loss < self.cfg.loss_target:
                        self.stop_reason = f"loss target {self.cfg.loss_target:g}"
                        break
                    if self.cfg.plateau_patience > 0:
                        if loss < window_best * (1.0 - self.cfg.plateau_tol):
                            window_best, since_best = loss, 0
                        else:
                            since_best += 1
                        if since_best >= self.cfg.plateau_patience:
                            log.info("phase %s: plateau after %d steps", self.phase.name,
                                     self.phase_step)
                            self.phase_step = self.phase.steps
        finally:
            metrics.close()
        self.save()

    def _next_phase(self) -> bool:
        if self.phase_index + 1 >= len(self.phases):
            self.phase_index = len(self.phases)
            return False
        self.phase_index += 1
        self.phase_step = 0
        self._build_optimizer()
        return True
