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

from neuralpde_cli.distributed import DataParallel
from neuralpde_cli.errors import UserError
from neuralpde_cli.run.rundir import MetricsWriter, RunDir
from neuralpde_cli.training.checkpoint import describe, load_checkpoint, save_checkpoint
from neuralpde_cli.training.levenberg_marquardt import LevenbergMarquardt, Residual

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

    def validate(self) -> None:
        """Range of every field (types are the schema's job); a UserError names the first bad one."""
        for name, low in (("log_every", 1), ("eval_every", 1), ("checkpoint_every", 1),
                          ("ic_steps", 0), ("plateau_patience", 0), ("max_retries", 0)):
            if getattr(self, name) < low:
                raise UserError(f"trainer.{name}={getattr(self, name)} must be "
                                + ("a positive integer" if low else "an integer ≥ 0"))
        for name in ("loss_target", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise UserError(f"trainer.{name}={getattr(self, name)} must be ≥ 0 (0: off)")
        if not 0 < self.plateau_tol < 1:
            raise UserError(f"trainer.plateau_tol={self.plateau_tol} must be in (0, 1)")
        if not 0 < self.retry_lr_factor < 1:
            raise UserError(f"trainer.retry_lr_factor={self.retry_lr_factor} must be in (0, 1)")
        bad = {k: v for k, v in self.weights.items() if not 0 <= v < math.inf}
        if bad:
            raise UserError(f"trainer.weights {bad} must be finite and ≥ 0")


@dataclass
class Phase:
    """A stretch of training with one optimizer on the objective's terms for ``name``."""

    name: str
    optimizer: str  # "adam" | "lbfgs" | "lm"
    steps: int
    lr: float
    schedule: str = "cosine"
    final_lr_factor: float = 0.01
    lbfgs_iters: int = 20
    history: int = 50
    #: Levenberg–Marquardt's initial damping (relative to the curvature)
    damping: float = 1e-3


class Objective(Protocol):
    """What the trainer needs from a problem: named loss terms for a phase (and, for
    Levenberg–Marquardt, the residuals whose mean squares they are: ``residual_terms``)."""

    term_names: list[str]

    def loss_terms(self, phase: str) -> dict[str, torch.Tensor]: ...
    def freeze(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: steps between the snapshots a NaN/Inf rolls back to
SNAPSHOT_EVERY = 25


class Diverged(ArithmeticError):
    """A numerical failure: training produced NaN/Inf more often than the retries allow, or a
    march could not reach its end (an optimizer treats it as an infeasible trial point)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (during training: after a checkpoint was written)."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}")
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
                 evaluate: Callable[[], dict[str, float]], error_key: str = "rel_l2_error",
                 shown: dict[str, str] | None = None) -> None:
        """``error_key`` picks best.pt; ``shown`` maps the metrics recorded in metrics.csv and
        the live line to their labels there (default: ``error_key`` under its own name)."""
        if not phases or any(p.steps < 0 for p in phases):
            raise UserError("the optimizer needs at least one phase with steps ≥ 0")
        cfg.validate()
        self.cfg = cfg
        self.phases = phases
        self.model = model
        self.objective = objective
        self.run = run
        self.evaluate = evaluate
        self.error_key = error_key
        self.shown = {error_key: error_key, **(shown or {})}
        self.last_shown: dict[str, float] = {}
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
        self.window_best, self.since_best = math.inf, 0  # plateau detection
        self.parallel = DataParallel(model)  # several ranks (torchrun): DDP; else a no-op
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
        elif p.optimizer == "lm":
            if not hasattr(self.objective, "residual_terms"):
                raise UserError("Levenberg–Marquardt needs a least-squares objective with residual "
                                "rows; this problem offers only a loss: use optimizer=lbfgs")
            self.optimizer = LevenbergMarquardt(params, damping=p.damping)
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
        return self.parallel.loss(self._local_loss)

    def _local_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.objective.loss_terms(self.phase.name)
        total = sum(self.cfg.weights.get(k, 1.0) * v for k, v in terms.items())
        return total, terms

    def _residual(self) -> Residual:
        """The weighted residual rows whose sum of squares is the total loss."""
        terms = self.objective.residual_terms(self.phase.name)  # type: ignore[attr-defined]
        parts = [math.sqrt(self.cfg.weights.get(k, 1.0) / r.values.numel()) * r.values
                 for k, r in terms.items()]
        if len(terms) == 1:  # a per-row Jacobian shortcut holds for a single term
            only = next(iter(terms.values()))
            return Residual(parts[0], only.through, only.pullback)
        return Residual(torch.cat(parts))

    def _step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step; returns the loss and terms, or raises FloatingPointError."""
        record: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            total, terms = self._loss()
            record["total"], record["terms"] = self.parallel.mean(total, terms)
            if torch.isfinite(record["total"]):  # the same answer on every rank
                total.backward()
            return record["total"]

        if self.phase.optimizer == "lbfgs":
            self.optimizer.step(closure)
            total, terms = self.parallel.mean(*self._loss())  # the loss at the new point
        elif self.phase.optimizer == "lm":
            self.optimizer.step(self._residual)
            with torch.no_grad():
                total, terms = self._loss()
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
            "phase": self.phase.name if self.phase_index < len(self.phases) else "done",
            "elapsed": self.elapsed, "best": self.best, "retries": self.retries,
            "lr_scale": self.lr_scale, "objective": self.objective.state_dict(),
            "plateau": [self.window_best, self.since_best], "last_terms": self.last_terms,
            "stop_reason": self.stop_reason,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; anything in it that does not fit this run is a UserError."""
        try:
            self._load_state(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError("the checkpoint does not match this run (was the config changed?): "
                            f"{describe(exc)}") from None

    def _load_state(self, state: dict[str, Any]) -> None:
        plan = [(p.name, p.steps) for p in self.phases]
        index, phase_step = int(state["phase_index"]), int(state["phase_step"])
        done = index == len(self.phases)
        expected = "done" if done else self.phases[index].name if 0 <= index < len(plan) else None
        if expected is None or state.get("phase", expected) != expected \
                or not (done or 0 <= phase_step <= self.phases[index].steps):
            raise UserError(f"the checkpoint is at phase {state.get('phase', index)!r} step "
                            f"{phase_step}, which this run's plan {plan} does not have (was the "
                            "config changed?)")
        self.phase_index, self.phase_step = index, phase_step
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.best, self.retries = float(state["best"]), int(state["retries"])
        self.lr_scale = float(state["lr_scale"])
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise UserError("the checkpoint does not match this model (was the config changed?): "
                            f"{' '.join(str(exc).split())[:300]}") from None
        if not done:  # a finished run has no optimizer left to continue
            self._build_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        objective = self.parallel.own(state, "objective")
        if objective is not None:
            self.objective.load_state_dict(objective)
        self.window_best, self.since_best = state.get("plateau", (math.inf, 0))
        self.last_terms = dict(state.get("last_terms", {}))
        self.stop_reason = str(state.get("stop_reason", self.stop_reason))
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
            raise Diverged(f"training diverged at step {self.step + 1} (phase {self.phase.name}): "
                           f"{what} is NaN/Inf; {self.cfg.max_retries} rollbacks with a lower "
                           "learning rate did not help (trainer.max_retries). Lower optimizer.lr "
                           "or the loss weights")
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
                    "to ×%.3g (retry %d of %d)", self.step + 1, what, self.lr_scale, self.retries,
                    self.cfg.max_retries)

    def save(self, name: str = "last") -> None:
        state = self.state()
        ranks = self.parallel.gather(state["objective"]) if name == "last" else None
        if ranks is not None:  # several ranks: each one's sampler state, so resume draws on
            state["objective_ranks"] = ranks
        save_checkpoint(self.run.checkpoints / f"{name}.pt", state)

    # --- the loop -------------------------------------------------------------------------
    def fit(self, resume_step: int | None = None) -> None:
        columns = ["step", "phase", "loss"] + [f"loss_{k}" for k in self.objective.term_names] \
            + ["lr", "elapsed_s", *self.shown]
        metrics = MetricsWriter(self.run.metrics_csv, columns, resume_step)
        console = Console(stderr=True)
        console.quiet = not console.is_terminal  # no live bar into a file: phase lines instead
        progress = Progress(TextColumn("[bold]{task.fields[phase]}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"), console=console,
                            disable=not (self.cfg.progress and self.parallel.world.writer),
                            refresh_per_second=4)
        t_start = time.perf_counter() - self.elapsed
        finished = self.phase_index >= len(self.phases)  # resumed from a finished run's checkpoint
        good = self._snapshot()
        try:
            with _SignalFlag() as flag, progress:
                bar = progress.add_task("train", total=self.total_steps, completed=self.step,
                                        phase="done" if finished else self.phase.name, info="")
                while self.phase_index < len(self.phases):
                    if self.phase_step >= self.phase.steps:
                        self._log_phase_end()
                        if not self._next_phase():
                            break
                        good, self.window_best, self.since_best = self._snapshot(), math.inf, 0
                        continue
                    signum = self.parallel.agree(flag.signum)  # every rank stops together
                    if signum is not None:
                        self.elapsed = time.perf_counter() - t_start
                        self.save()
                        raise Interrupted(signum, self.step)
                    candidate = self._snapshot() if self.step % SNAPSHOT_EVERY == 0 else None
                    try:
                        loss, terms = self._step()
                    except FloatingPointError as exc:
                        self._rollback(good, str(exc))
                        continue
                    if candidate is not None:  # its loss and gradient were finite: a good state
                        good = candidate
                    self.step += 1
                    self.phase_step += 1
                    self.elapsed = time.perf_counter() - t_start
                    self.last_terms = {"loss": loss, **terms}
                    row: dict[str, Any] = {"step": self.step, "phase": self.phase.name,
                                           "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                           "elapsed_s": self.elapsed}
                    row.update({f"loss_{k}": v for k, v in terms.items()})
                    if self.step % self.cfg.eval_every == 0 or self.phase_step == self.phase.steps:
                        evaluated = self.evaluate()
                        self.last_shown = {k: evaluated.get(k, math.nan) for k in self.shown}
                        self.last_error = self.last_shown[self.error_key]
                        row.update(self.last_shown)
                        if self.last_error < self.best:
                            self.best = self.last_error
                            self.save("best")
                    metrics.write(row)
                    if self.step % self.cfg.checkpoint_every == 0:
                        self.save()
                    info = "  ".join(f"{k} {v:.3e}" for k, v in self.last_terms.items())
                    info += "".join(f"  {self.shown[k]} {v:.3e}" for k, v in self.last_shown.items()
                                    if math.isfinite(v))
                    progress.update(bar, completed=self.step, phase=self.phase.name, info=info)
                    if self.step % self.cfg.log_every == 0:
                        log.info("step %d [%s] %s", self.step, self.phase.name, info)
                    if self.cfg.loss_target > 0 and loss < self.cfg.loss_target:
                        self.stop_reason = f"loss target {self.cfg.loss_target:g}"
                        self._log_phase_end()
                        self.phase_index = len(self.phases)  # the checkpoint says: finished
                        break
                    if self.cfg.plateau_patience > 0:
                        if loss < self.window_best * (1.0 - self.cfg.plateau_tol):
                            self.window_best, self.since_best = loss, 0
                        else:
                            self.since_best += 1
                        if self.since_best >= self.cfg.plateau_patience:
                            log.info("phase %s: plateau after %d steps", self.phase.name,
                                     self.phase_step)
                            self.phase_step = self.phase.steps
                if not finished:
                    self.save()  # still inside the signal guard: a signal now waits for it
        finally:
            metrics.close()
        if flag.signum is not None:  # arrived during the last step or the final save
            raise Interrupted(flag.signum, self.step)

    def _log_phase_end(self) -> None:
        """One line per phase in the log (and on the console): where it ended, and how."""
        info = "  ".join(f"{k} {v:.3e}" for k, v in self.last_terms.items())
        if math.isfinite(self.last_error):
            info += f"  {self.error_key} {self.last_error:.3e}"
        log.info("phase %s done: step %d, %.2f s  %s", self.phase.name, self.step, self.elapsed,
                 info)

    def _next_phase(self) -> bool:
        if self.phase_index + 1 >= len(self.phases):
            self.phase_index = len(self.phases)
            return False
        self.phase_index += 1
        self.phase_step = 0
        self._build_optimizer()
        return True
