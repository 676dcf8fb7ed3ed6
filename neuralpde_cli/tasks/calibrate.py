"""``neuralpde calibrate data=PATH``: maximum likelihood for an SDE's parameters, the transition
density being the Fokker–Planck solution from each observation (:mod:`neuralpde_cli.likelihood.pde`).

config → observations + SDE family → baselines (exact where known, Euler, Kessler) → the PDE
fit (BFGS, checkpointed each iteration) → standard errors, profiles, diagnostics → run
directory (fit.json, metrics.csv, diagnostics.npz, plots/, summary.json).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import Tensor

from neuralpde_cli.data import DataConfig, Observations, Transitions, read_observations
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.likelihood import fit as fitting
from neuralpde_cli.likelihood.pde import PDELikelihoodConfig, TransitionDensity, TransitionSet
from neuralpde_cli.run.report import table_console
from neuralpde_cli.run.rundir import RunDir, jsonable
from neuralpde_cli.sdes import (SDEConfig, build_sde, build_sde_with, parameter_constraint,
                                parameter_names, parameter_values)
from neuralpde_cli.tasks.common import make_main
from neuralpde_cli.training.checkpoint import atomic_write

log = logging.getLogger(__name__)

BASELINES = ("exact", "euler", "kessler")
START_FROM = ("baseline", "config")
CHECKPOINT_FORMAT = "neuralpde-calibrate-1"


@dataclass
class FitSettings:
    #: parameters to fit (names as `parameter_names` lists them); empty: all of the kind's
    params: list[str] = field(default_factory=list)
    #: approximations fitted beside, each with its own estimates and SEs (exact: OU and CIR)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    #: baseline: start at the Kessler estimate (else Euler's) and its curvature; config: start
    #: at the values in equation.sde
    start_from: str = "baseline"
    max_iter: int = 100
    #: stop when the log-likelihood still to gain (Newton decrement) is below this
    tol: float = 1e-7
    #: points per profile likelihood (0: none); over ± profile_width standard errors
    profile_points: int = 9
    profile_width: float = 3.0
    #: x₀ bins of the transition-density plot (quantiles of the observed starts)
    density_bins: int = 3
    #: B ≥ 2: remove the estimate's small-sample bias by a parametric bootstrap of B data sets
    #: simulated at θ̂ with the data's design (likelihood.bootstrap); 0: none
    bootstrap_sets: int = 0
    #: the bootstrap's sampler sub-step (kinds without an exact law), as simulate.substep
    bootstrap_substep: float = 1e-3
    pde: PDELikelihoodConfig = field(default_factory=PDELikelihoodConfig)


@dataclass
class CalibrateConfig:
    #: observations: a CSV or .npz in the data schema (README § Data sets), and how to read it
    data: DataConfig = field(default_factory=DataConfig)
    equation: Any = MISSING
    ansatz: Any = MISSING
    optimizer: Any = MISSING
    fit: FitSettings = field(default_factory=FitSettings)
    device: Any = MISSING
    seed: int = 0
    precision: str = "float64"
    resume: Any = None


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from neuralpde_cli.config import register_configs
    register_configs()
    ConfigStore.instance().store(name="calibrate_schema", node=CalibrateConfig)


# --- the problem: data, SDE family, parameters --------------------------------------------------
class Problem:
    """What every likelihood of this run shares: the transitions, the parameters being fitted
    (names, constraints, starting values) and the SDE built from any values of them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.dim = int(cfg.equation.dim)
        self.sde_cfg: SDEConfig = OmegaConf.to_object(cfg.equation.sde)
        self.dtype = resolve_precision(cfg.precision)
        self.device = resolve_device(cfg.device.name)
        if self.dtype != torch.float64:
            raise UserError(f"precision={cfg.precision}: calibration runs in float64 (standard "
                            "errors come from differences of gradients)")
        observed = [int(i) for i in cfg.data.get("observed") or []]
        if observed and (sorted(set(observed)) != observed or observed[0] < 0
                         or observed[-1] >= self.dim or len(observed) == self.dim):
            raise UserError(f"data.observed={observed}: the state coordinates the columns hold, "
                            f"in increasing order, some of 0 … {self.dim - 1} (empty: all)")
        #: the coordinates the data do not hold (filtered out of the likelihood)
        self.latent = [i for i in range(self.dim) if observed and i not in observed]
        self.obs: Observations = read_observations(cfg.data.path, len(observed) or self.dim,
                                                   OmegaConf.to_object(cfg.data))
        tr = self.obs.transitions()
        self.transitions = tr
        self.data_start = _data_start(self.sde_cfg, self.dim, tr, self.obs, cfg.fit.start_from,
                                      list(cfg.fit.params) or None)
        sde = build_sde(self.sde_cfg, self.dim, self.dtype, self.device)  # checks the config
        if sde.lower_bound is not None and bool(np.any(self.obs.state <= sde.lower_bound)):
            row = int(np.argwhere(np.any(self.obs.state <= sde.lower_bound, axis=1))[0, 0])
            raise UserError(f"{self.obs.where(row)}: the state {self.obs.state[row].tolist()} is "
                            f"≤ {sde.lower_bound:g}; equation.sde.kind={self.sde_cfg.kind} lives "
                            "above it")
        held = observed or list(range(self.dim))
        for axis in [held.index(a) for a in getattr(sde, "positive_dims", ()) if a in held]:
            bad = np.flatnonzero(self.obs.state[:, axis] <= 0)
            if bad.size:
                raise UserError(f"{self.obs.where(int(bad[0]))}: "
                                f"{self.obs.state_names[axis]}={self.obs.state[bad[0], axis]:g} must "
                                f"be > 0 for equation.sde.kind={self.sde_cfg.kind}")
        known = parameter_names(self.sde_cfg, self.dim)
        self.names = list(cfg.fit.params) or known
        unknown = [n for n in self.names if n not in known]
        if unknown or len(set(self.names)) != len(self.names):
            raise UserError(f"fit.params={self.names}: "
                            + (f"{unknown[0]!r} is not a parameter of equation.sde.kind="
                               f"{self.sde_cfg.kind} (dim={self.dim}); choose from {known}"
                               if unknown else "a parameter is named twice"))
        self.kinds = [parameter_constraint(self.sde_cfg.kind, n, self.dim, self.sde_cfg)
                      for n in self.names]
        values = parameter_values(self.sde_cfg, self.dim)
        self.config_start = np.array([values[n] for n in self.names])
        fitting.check_start([f"equation.sde.{n}" for n in self.names], self.config_start, self.kinds)
        # where the baselines start (fit.start_from=baseline): the data's own scale when a
        # moment estimate exists and is in every parameter's domain, else the config's values
        self.baseline_start, self.baseline_start_from = self.config_start, "config"
        if self.data_start:
            self.baseline_start, self.baseline_start_from = self.config_start, "VAR(1)"
        elif cfg.fit.start_from == "baseline" and (self.dim == 1 or self.latent):
            from neuralpde_cli.likelihood.gaussian import ar1_start, jump_start, latent_variance_start
            moments = jump_start(tr.x0, tr.x1, tr.dt) if self.sde_cfg.kind == "merton" \
                else latent_variance_start(tr.x0, tr.x1, tr.dt, tr.path) if self.latent \
                else ar1_start(self.sde_cfg.kind, tr.x0, tr.x1, tr.dt)
            if moments is not None:
                guess = np.array([moments.get(n, v) for n, v in zip(self.names, self.config_start)])
                if all(fitting.in_domain(v, k) for v, k in zip(guess, self.kinds)):
                    self.baseline_start, self.baseline_start_from = guess, "moments"
        self.tset = TransitionSet.from_arrays(tr.x0, tr.x1, tr.t0, tr.dt, self.dtype, self.device)
        if self.tset.n < len(self.names) + 1:
            raise UserError(f"data={cfg.data.path} has {self.tset.n} transitions; fitting "
                            f"{len(self.names)} parameters needs more")

    def sde(self, values: dict[str, Tensor]) -> Any:
        return build_sde_with(self.sde_cfg, self.dim, values, self.dtype, self.device)

    def tensors(self, theta: np.ndarray, grad: bool) -> dict[str, Tensor]:
        return {n: torch.tensor(float(v), dtype=self.dtype, device=self.device, requires_grad=grad)
                for n, v in zip(self.names, theta)}

    def objective(self, log_density: Callable[[dict[str, Tensor]], Tensor]) -> fitting.Objective:
        """θ ↦ (−log L, its gradient by autograd) for a differentiable log-density."""
        return fitting.autograd_objective(log_density, self.tensors)


def _data_start(sde_cfg: SDEConfig, dim: int, tr: Transitions, obs: Observations,
                start_from: str, fitted: list[str] | None = None) -> bool:
    """In d > 1, an OU's θ, mean and σ from the data's VAR(1) (likelihood.gaussian.
    var1_ou_start), written into ``sde_cfg`` where it starts the baselines: nobody types 2×2
    matrices to fit them. Only the entries in ``fitted`` (fit.params; None: all) replace a
    matrix the config gives in full; a matrix of the wrong shape (not typed) is replaced
    whole. True where it did; with fit.start_from=config the config's values stay."""
    from neuralpde_cli.likelihood.gaussian import var1_ou_start

    if dim == 1 or sde_cfg.kind != "ou" or start_from != "baseline":
        return False
    guess = var1_ou_start(tr.x0, tr.x1, tr.dt)
    if guess is None:
        shaped = np.shape(sde_cfg.theta) == (dim, dim) and np.shape(sde_cfg.sigma) == (dim, dim)
        if shaped:
            return False
        log.warning("the data's VAR(1) is not a stable OU; starting from θ = I, the data's "
                    "mean and the covariance of its increments")
        dx = (tr.x1 - tr.x0) / np.sqrt(tr.dt)[:, None]
        guess = {"theta": np.eye(dim).tolist(), "mean": obs.state.mean(0).tolist(),
                 "sigma": np.linalg.cholesky(np.cov(dx.T) + 1e-12 * np.eye(dim)).tolist()}
    for key in ("theta", "mean", "sigma"):  # a value the user holds fixed stays as typed
        given = getattr(sde_cfg, key)
        typed = np.shape(given) == np.shape(guess[key])
        if not typed or fitted is None:
            setattr(sde_cfg, key, guess[key])
            continue
        value = np.array(given, dtype=float)
        for index in np.ndindex(value.shape):
            name = f"{key}" + "".join(f"[{i}]" for i in index)
            if name in fitted:
                value[index] = np.asarray(guess[key])[index]
        setattr(sde_cfg, key, value.tolist())
    return True


# --- baselines ---------------------------------------------------------------------------------
def _exact_law(problem: Problem) -> tuple[Callable[..., np.ndarray], tuple[str, ...]] | None:
    """The exact transition log-density and its parameter names, where one is known for this
    fit (1-D OU or CIR with every parameter fitted), else None."""
    from neuralpde_cli.references.transitions import EXACT

    law = EXACT.get(problem.sde_cfg.kind)
    if problem.dim != 1 or law is None or sorted(law[1]) != sorted(problem.names):
        return None
    return law[0], tuple(law[1])


def _baselines(problem: Problem) -> dict[str, dict[str, Any]]:
    """Every requested baseline that applies: estimates, SEs, log-likelihood, time."""
    from neuralpde_cli.likelihood.gaussian import euler_log_density, kessler_log_density
    from neuralpde_cli.references.transitions import EXACT, exact_mle

    tr, ts, out = problem.transitions, problem.tset, {}
    if problem.latent:
        log.info("baselines skipped: Euler, Kessler and the exact law need every coordinate "
                 "observed (coordinate%s %s latent)", "s" * (len(problem.latent) > 1),
                 problem.latent)
        return out
    for name in problem.cfg.fit.baselines:
        start = time.perf_counter()
        if name == "exact" and problem.dim > 1 and problem.sde_cfg.kind == "ou":
            entry = _exact_ou_nd(problem)
        elif name == "exact":
            law = _exact_law(problem)
            if law is None:
                log.info("baseline exact skipped: known for 1-D %s with all parameters fitted",
                         "/".join(sorted(EXACT)))
                continue
            begin = dict(zip(problem.names, problem.baseline_start))
            res = exact_mle(problem.sde_cfg.kind, tr.x0[:, 0], tr.x1[:, 0], tr.dt,
                            {n: begin[n] for n in law[1]})
            est = np.array([res["estimates"][n] for n in problem.names])
            se = np.array([res["se"][n] for n in problem.names])
            entry = {"estimates": dict(zip(problem.names, est.tolist())),
                     "se": dict(zip(problem.names, se.tolist())), "loglik": float(res["loglik"])}
        else:
            if name == "kessler" and problem.dim != 1:
                log.info("baseline kessler skipped: one-dimensional only")
                continue
            density = euler_log_density if name == "euler" else kessler_log_density
            objective = problem.objective(
                lambda v, f=density: f(problem.sde(v), ts.x0, ts.x1, ts.t0, ts.dt))
            state = fitting.minimize(objective, problem.baseline_start, problem.kinds,
                                     max_iter=500, tol=1e-10)
            res = fitting.summarize(problem.names, objective, state, problem.kinds)
            entry = {"estimates": dict(zip(problem.names, res.estimates.tolist())),
                     "se": dict(zip(problem.names, res.se.tolist())), "loglik": res.loglik,
                     "converged": res.converged, "hessian": res.hessian.tolist()}
        entry["wall_time_s"] = time.perf_counter() - start
        out[name] = entry
    if "exact" in out:
        ex = out["exact"]
        for entry in out.values():
            entry["distance_se"] = {n: (entry["estimates"][n] - ex["estimates"][n]) / ex["se"][n]
                                    for n in problem.names}
    return out


def _exact_ou_nd(problem: Problem) -> dict[str, Any]:
    """The exact MLE of a d-dimensional OU: the Gaussian transition with its covariance from
    the matrix exponential (references.transitions), maximized by the same BFGS."""
    from neuralpde_cli.references.transitions import ou_log_density

    tr, d = problem.transitions, problem.dim
    base = parameter_values(problem.sde_cfg, d)

    def matrices(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = {**base, **dict(zip(problem.names, theta))}
        th = np.array([[values[f"theta[{i}][{j}]"] for j in range(d)] for i in range(d)])
        mean = np.array([values[f"mean[{i}]"] for i in range(d)])
        sig = np.array([[values[f"sigma[{i}][{j}]"] if j <= i else 0.0 for j in range(d)]
                        for i in range(d)])
        return th, mean, sig

    def nll(theta: np.ndarray) -> tuple[float, None]:
        try:
            value = -float(np.sum(ou_log_density(tr.x0, tr.x1, tr.dt, *matrices(theta))))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return math.inf, None
        return (value if math.isfinite(value) else math.inf), None

    objective = fitting.numeric_gradient(nll)
    state = fitting.minimize(objective, problem.config_start, problem.kinds, max_iter=500, tol=1e-10)
    res = fitting.summarize(problem.names, objective, state, problem.kinds)
    return {"estimates": dict(zip(problem.names, res.estimates.tolist())),
            "se": dict(zip(problem.names, res.se.tolist())), "loglik": res.loglik,
            "converged": res.converged}


#: a positive parameter below this many of its standard errors collapsed onto its boundary (a
#: mean-reversion rate of 5e-11 with an SE of 0.05): the estimate carries no information
COLLAPSED_SE = 1e-3


def _unsound(problem: Problem, entry: dict[str, Any]) -> str | None:
    """Why a baseline's estimate is no start for the PDE fit (None: it is one)."""
    if not entry.get("converged", True):
        return "did not converge"
    for n, kind in zip(problem.names, problem.kinds):
        value, se = entry["estimates"][n], entry["se"][n]
        if not fitting.in_domain(value, kind):
            return f"{n}={value:g} is outside its domain"
        if se is None or not math.isfinite(se) or se <= 0:
            return f"{n} has no finite standard error"
        if kind == "positive" and value < COLLAPSED_SE * se:
            return f"{n}={value:.3g} collapsed onto 0 ({value / se:.1g} SE)"
    return None


def _start_candidates(problem: Problem, baselines: dict[str, dict]
                      ) -> list[tuple[np.ndarray, np.ndarray | None, str]]:
    """Starting values and inverse Hessians (in the fitter's coordinates) to try, best first:
    Kessler's estimate, then Euler's, each only where it is sound (:func:`_unsound`), then the
    data's AR(1) moments (where the baselines started), then the config's values. Never the
    exact MLE: it is the yardstick."""
    out = []
    if problem.cfg.fit.start_from == "baseline":
        for name in ("kessler", "euler"):
            if name not in baselines:
                continue
            b = baselines[name]
            why = _unsound(problem, b)
            if why is not None:
                log.warning("the %s estimate is no start (%s): trying the next", name, why)
                continue
            theta = np.array([b["estimates"][n] for n in problem.names])
            hinv = fitting.start_inverse_hessian(theta, b["hessian"], problem.kinds) \
                if "hessian" in b else None
            out.append((theta, hinv, name))
    if problem.baseline_start_from == "moments":
        out.append((problem.baseline_start.copy(), None, "moments"))
    out.append((problem.config_start.copy(), None, "config"))
    return out


def _start(problem: Problem, baselines: dict[str, dict]
           ) -> tuple[np.ndarray, np.ndarray | None, str, TransitionDensity]:
    """The first candidate start (:func:`_start_candidates`) where the march runs, and the
    transition density with its coordinates, components and step times chosen there; a
    UserError saying what to try when none does."""
    failures = []
    components = int(problem.cfg.ansatz.components)
    for theta, hinv, name in _start_candidates(problem, baselines):
        density = _density(problem, at=dict(zip(problem.names, theta.tolist())))
        try:
            chosen = density.choose_components(problem.tensors(theta, False), components)
            steps = len(density.step_times) if density.step_times is not None \
                else density.freeze_steps(problem.tensors(theta, False))  # chosen with K
        except (RuntimeError, ArithmeticError) as exc:  # torch's LinAlgError is a RuntimeError
            reason = str(exc).splitlines()[0][:120]
            log.warning("the march breaks at the %s start %s (%s): trying the next", name,
                        np.round(theta, 6).tolist(), reason)
            failures.append(f"{name} {np.round(theta, 6).tolist()}")
            continue
        if components > 1:
            residual, scores = density.gaussian_residual, density.component_logliks
            if scores is not None:
                log.info("%d mixture component%s: one Gaussian's march residual %.2g > "
                         "fit.pde.gaussian_residual=%g; at the start %d components take %d steps "
                         "against one Gaussian's %d, and the data's log L is %.3f against %.3f%s",
                         chosen, "" if chosen == 1 else "s", residual,
                         problem.cfg.fit.pde.gaussian_residual, components,
                         scores[f"steps_{components}"], scores["steps_1"],
                         scores[str(components)], scores["1"],
                         " (the mixture loses where the data are: one Gaussian kept)"
                         if chosen == 1 else "")
            else:
                log.info("%d mixture component%s: one Gaussian's march residual %s %s "
                         "fit.pde.gaussian_residual=%g", chosen, "" if chosen == 1 else "s",
                         "—" if residual is None else f"{residual:.2g}",
                         "≤" if chosen == 1 else ">", problem.cfg.fit.pde.gaussian_residual)
        log.info("time-march: %d steps to Δt = %.4g, replayed for every θ", steps,
                 density.t_final)
        return theta, hinv, name, density
    raise UserError("the transition density cannot be marched from any start ("
                    + "; ".join(failures) + "): set a plausible start with fit.start_from=config "
                    "and equation.sde.<parameter>=…, or check that the data suit "
                    f"equation.sde.kind={problem.sde_cfg.kind}")


# --- the PDE fit, checkpointed -------------------------------------------------------------------
class FitLog:
    """metrics.csv rows and checkpoints/last.pt after every iteration; the rows live in the
    checkpoint too, so a resumed fit rewrites metrics.csv exactly as far as it had got."""

    def __init__(self, run: RunDir, names: list[str]) -> None:
        self.run, self.names = run, names
        self.columns = ["iteration", "loglik", "grad_norm", "step_size", "evaluations", *names]
        self.rows: list[dict[str, float]] = []

    def record(self, state: fitting.FitState, theta: np.ndarray, extra: dict[str, Any]) -> None:
        self.rows.append({"iteration": state.iteration, "loglik": -state.f,
                          "grad_norm": float(np.linalg.norm(state.g)), "step_size": state.step,
                          "evaluations": state.evaluations, **dict(zip(self.names, theta))})
        self._write_csv()
        payload = {"format": CHECKPOINT_FORMAT,
                   "state": {k: torch.as_tensor(v) for k, v in state.arrays().items()},
                   "rows": torch.tensor([[r[c] for c in self.columns] for r in self.rows],
                                        dtype=torch.float64),
                   **{k: torch.as_tensor(v) for k, v in extra.items()}}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write(self.run.checkpoints / "last.pt", lambda h: h.write(buffer.getvalue()))

    def _write_csv(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.12g}" for k, v in r.items()} for r in self.rows)
        atomic_write(self.run.metrics_csv, lambda h: h.write(text.getvalue().encode()))

    def load(self) -> dict[str, Any] | None:
        path = self.run.checkpoints / "last.pt"
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: refuse, never run its code
            raise UserError(f"{path} is not a readable calibration checkpoint ({exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a calibration checkpoint (format "
                            f"{payload.get('format') if isinstance(payload, dict) else '?'})")
        self.rows = [dict(zip(self.columns, map(float, row))) for row in payload["rows"].tolist()]
        self._write_csv()
        return payload


def _fit_pde(problem: Problem, run: RunDir, start: np.ndarray, hinv0: np.ndarray | None,
             density: TransitionDensity, resume: bool) -> tuple[fitting.FitResult, dict[str, Any]]:
    cfg = problem.cfg.fit
    flog = FitLog(run, problem.names)
    saved = flog.load() if resume else None
    state = None
    if saved is not None:
        state = fitting.FitState.from_arrays({k: v.numpy() for k, v in saved["state"].items()})
        if "components" in saved:
            density.use_components(int(saved["components"]))
        density.step_times = saved["step_times"].tolist()
        density.refreezes = int(saved.get("refreezes", 0))
        log.info("resuming the fit at iteration %d", state.iteration)
    objective = problem.objective(lambda v: density.log_density(v))
    progress = _progress(problem.names)

    def callback(s: fitting.FitState, theta: np.ndarray) -> None:
        # the steps in use now (re-chosen when θ walked far): a resumed fit replays these
        flog.record(s, theta, {"step_times": torch.tensor(density.step_times, dtype=torch.float64),
                               "refreezes": torch.tensor(density.refreezes),
                               "components": torch.tensor(density.mixture.components)})
        progress(s, theta)

    state = fitting.minimize(objective, start, problem.kinds, hinv0=hinv0, max_iter=cfg.max_iter,
                             tol=cfg.tol, state=state, callback=callback)
    rechosen = density.refreezes
    log.info("the optimum found after %d iterations; re-choosing the march's steps there to "
             "confirm it", state.iteration)
    state, check = fitting.confirm_discretization(
        objective, state, problem.kinds,
        lambda theta: density.readapted_loglik(problem.tensors(theta, False)),
        max_iter=cfg.max_iter, tol=cfg.tol)
    moved = check["loglik_readapted_steps"] - check["loglik_replayed_steps"]
    if abs(moved) > 1e-3:
        log.info("steps re-adapted at the optimum moved log L by %.2g: refitted", moved)
    log.info("standard errors: the observed information from %d gradients",
             2 * len(problem.names))
    result = fitting.summarize(problem.names, objective, state, problem.kinds)
    if not result.converged:
        log.warning("the fit did not converge: %s", _why_not_converged(state, result))
    return result, {"steps": len(density.step_times), **check,
                    "steps_rechosen_during_fit": rechosen,
                    "components": density.mixture.components,
                    "compiled": density.compiled,  # fit.pde.compile (auto: a slow march)
                    "gaussian_residual": density.gaussian_residual,
                    "start_loglik_by_components": density.component_logliks,
                    # the Box–Cox power of each coordinate at the start (0: log; CEV's 1 − γ
                    # follows γ during the fit)
                    "march_coordinates": {str(i): float(a) for i, a in density.powers.items()},
                    "march_coordinates_follow_theta": density.dynamic}


def _why_not_converged(state: fitting.FitState, result: fitting.FitResult) -> str:
    """One line: why a fit is not called converged."""
    if state.stalled:
        return (f"the last {fitting.STALL_ITERATIONS} iterations each gained less than fit.tol "
                "in log L while its curvature promised more (log L is not smooth enough there for "
                "the line search); the estimates are where it stopped")
    if not np.all(np.isfinite(result.se)):
        bad = [n for n, v in zip(result.names, result.se) if not math.isfinite(v)]
        return (f"no finite standard error for {bad}: the observed information is not positive "
                "definite there (a parameter the data do not identify, or not a maximum)")
    return (f"the optimizer stopped after {state.iteration} iterations before its tolerance "
            "(raise fit.max_iter, or start elsewhere)")


def _progress(names: list[str]) -> Callable[[fitting.FitState, np.ndarray], None]:
    def show(state: fitting.FitState, theta: np.ndarray) -> None:
        values = "  ".join(f"{n}={v:.6g}" for n, v in zip(names, theta))
        log.info("iteration %d  log L = %.6f  |∇| = %.2e  %s", state.iteration, -state.f,
                 float(np.linalg.norm(state.g)), values)
    return show


# --- diagnostics ---------------------------------------------------------------------------------
def _sandwich(problem: Problem, density: TransitionDensity, result: fitting.FitResult) -> dict:
    """Huber's sandwich SEs from per-transition scores by central differences."""
    theta = result.estimates
    scores = np.empty((problem.tset.n, len(theta)))
    for i in range(len(theta)):
        h = 1e-5 * max(abs(theta[i]), 1e-3)
        if problem.kinds[i] == "positive":
            h = min(h, 0.5 * theta[i])
        if problem.kinds[i] == "correlation":
            h = min(h, 0.5 * (1 - abs(theta[i])))
        lp = []
        for sign in (1.0, -1.0):
            point = theta.copy()
            point[i] += sign * h
            with torch.no_grad():
                lp.append(density.log_density(problem.tensors(point, False), False).cpu().numpy())
        scores[:, i] = (lp[0] - lp[1]) / (2 * h)
    cov, se = fitting.sandwich(result.hessian, scores)
    return {"se_sandwich": dict(zip(problem.names, se.tolist())),
            "covariance_sandwich": cov.tolist()}


def _breakdown(exc: BaseException) -> str:
    """A numerical failure in one line: what broke, and that the fit's results stand."""
    return (f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''} "
            "(the estimates and observed-information SEs stand)")


def _robust(problem: Problem, density: TransitionDensity, result: fitting.FitResult) -> dict:
    """Sandwich standard errors (per-transition scores by central differences on the replayed
    steps), and the well-posedness figures users check: Feller's ratio 2κθ/ξ² (CIR, Heston;
    reported, not imposed) and the slowest decay rate of an OU drift matrix."""
    theta = result.estimates
    log.info("sandwich standard errors: per-transition scores from %d evaluations",
             2 * len(theta))
    out: dict[str, Any] = {}
    try:
        out.update(_sandwich(problem, density, result))
    except (RuntimeError, ArithmeticError, np.linalg.LinAlgError) as exc:
        log.warning("sandwich standard errors skipped: %s", _breakdown(exc))
        out["se_sandwich"] = None
    values = {**parameter_values(problem.sde_cfg, problem.dim), **dict(zip(problem.names, theta))}
    if problem.sde_cfg.kind in ("cir", "heston", "bates"):
        ratio = 2 * values["rate"] * values["level"] / values["noise"] ** 2
        out["feller"] = {"ratio": float(ratio), "satisfied": bool(ratio >= 1.0),
                         "note": "2κθ/ξ² ≥ 1 keeps the variance process off zero; reported, not imposed"}
    if problem.sde_cfg.kind == "ou":
        d = problem.dim
        th = np.array([[values["theta" if d == 1 else f"theta[{i}][{j}]"] for j in range(d)]
                       for i in range(d)])
        out["theta_slowest_decay"] = float(np.linalg.eigvals(th).real.min())
        out["stationary"] = bool(out["theta_slowest_decay"] > 0)
    return out



def _density_error(problem: Problem, diagnostics: dict[str, np.ndarray],
                   result: fitting.FitResult) -> dict[str, Any] | None:
    """Where the exact law is known (1-D OU, CIR): the PDE's per-transition log-density against
    the exact one at θ̂, in bands of |z| (the move's normal score under the exact law), so an
    error in the far tails, where real data put their worst weeks, cannot hide in an average."""
    from neuralpde_cli.references.transitions import error_by_band, normal_scores

    exact, pde = diagnostics["logdensity_exact"], diagnostics["logdensity_fit"]
    if not np.all(np.isfinite(exact)):
        return None
    tr = problem.transitions
    theta = dict(zip(problem.names, result.estimates))
    z = normal_scores(problem.sde_cfg.kind, tr.x0[:, 0], tr.x1[:, 0], tr.dt, theta)
    error = pde - exact
    out = {"loglik_exact_at_estimate": float(exact.sum()),
           "loglik_error_per_1000": float(1000.0 * error.sum() / tr.n),
           "largest_abs_z": float(np.abs(z).max()), "bands": error_by_band(error, z)}
    log.info("log-density error against the exact law at the estimate: %+.3g per 1,000 "
             "transitions; by |z|: %s", out["loglik_error_per_1000"], "; ".join(
                 f"{b['band']}: {b['n']} (max {b['max_abs']:.1e})" for b in out["bands"] if b["n"]))
    return out


#: a test's p-value below this rejects the model; a sandwich SE this many times the observed
#: one says the model's noise is misspecified for that parameter
REJECT_AT, SANDWICH_RATIO = 0.01, 1.5


def ljung_box(z: np.ndarray, lags: int) -> float:
    """Ljung–Box p-value of the first ``lags`` autocorrelations of z (χ² with ``lags`` df)."""
    from scipy.stats import chi2

    n = z.size
    z = z - z.mean()
    denom = float(z @ z)
    if n <= lags + 1 or denom <= 0:
        return math.nan
    rho = np.array([float(z[k:] @ z[:-k]) / denom for k in range(1, lags + 1)])
    q = n * (n + 2) * float(np.sum(rho ** 2 / (n - np.arange(1, lags + 1))))
    return float(chi2.sf(q, lags))


#: χ²₁'s 95 % quantile over 2: a profile log L within this of its maximum is inside the 95 %
#: profile interval
PROFILE_95 = 1.920729410347062


def _identification(result: fitting.FitResult, diagnostics: dict[str, np.ndarray]) -> dict:
    """Parameters the data identify poorly, read off the profiles: where log L has not fallen
    by χ²₁(95 %)/2 at the profile's end (± fit.profile_width SE, or the domain's edge), the
    95 % profile interval reaches beyond it and the Wald interval is too short; and a profile
    that rises above the fit's log L (the fit is not at a maximum)."""
    if "profile_loglik" not in diagnostics:
        return {}
    grid, loglik = diagnostics["profile_grid"], diagnostics["profile_loglik"]
    out = {}
    for i, name in enumerate(result.names):
        ll, xs = loglik[i], grid[i]
        if not np.isfinite(ll).any():
            continue
        est, se = result.estimates[i], result.se[i]
        reach = np.abs(xs[[0, -1]] - est) / se if se > 0 else np.zeros(2)
        sides = []
        for k, side in ((0, "below"), (-1, "above")):
            if math.isfinite(ll[k]) and result.loglik - ll[k] < PROFILE_95:
                edge = reach[k] < 0.99 * reach.max()  # the profile stopped at the domain's edge
                sides.append({"side": side, "to": float(xs[k]), "domain_edge": bool(edge)})
        rises = float(np.nanmax(ll) - result.loglik)
        if sides or rises > 0.05:
            out[name] = {"flat": sides, "rises_above_fit": rises}
    return out


def _verdict(result: fitting.FitResult, pit: np.ndarray,
             diagnostics: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What the fit says, in words: whether it converged, whether the probability integral
    transform rejects the model (Kolmogorov–Smirnov: uniform; Ljung–Box on its normal scores
    and their squares: independent), and which parameters' sandwich SEs exceed the observed
    ones (the model's noise is misspecified there)."""
    from scipy.stats import kstest, norm

    u = np.clip(np.asarray(pit, float), 1e-12, 1 - 1e-12)
    z = norm.ppf(u)
    lags = max(1, min(10, u.size // 5))
    tests = {"pit_uniform_ks_p": float(kstest(u, "uniform").pvalue),
             "pit_independent_ljung_box_p": ljung_box(z, lags),
             "pit_squares_independent_ljung_box_p": ljung_box(z * z - 1.0, lags)}
    rejected = [k for k, p in tests.items() if math.isfinite(p) and p < REJECT_AT]
    lines = []
    if result.converged:
        lines.append("The fit converged: a maximum with finite standard errors.")
    else:
        lines.append("The fit did NOT converge (see the warning above); read its estimates "
                     "with care.")
    words = {"pit_uniform_ks_p": "the transitions' PIT is not uniform (KS",
             "pit_independent_ljung_box_p": "the PIT's normal scores are autocorrelated "
                                            f"(Ljung–Box, {lags} lags",
             "pit_squares_independent_ljung_box_p": "their squares are autocorrelated (volatility "
                                                    f"clustering; Ljung–Box, {lags} lags"}
    if rejected:
        lines.append(f"The model is rejected at {REJECT_AT:.0%}: " + "; ".join(
            f"{words[k]} p = {tests[k]:.2g})" for k in rejected) + ".")
    else:
        lines.append(f"The model is not rejected at {REJECT_AT:.0%} (PIT: KS p = "
                     f"{tests['pit_uniform_ks_p']:.2g}, Ljung–Box p = "
                     f"{tests['pit_independent_ljung_box_p']:.2g}, on squares p = "
                     f"{tests['pit_squares_independent_ljung_box_p']:.2g}).")
    ratios = {}
    sandwich = result.notes.get("se_sandwich") or {}
    for name, se in zip(result.names, result.se):
        if sandwich.get(name) is not None and math.isfinite(se) and se > 0:
            ratios[name] = float(sandwich[name] / se)
    wide = [n for n, r in ratios.items() if r > SANDWICH_RATIO]
    if wide:
        lines.append("Sandwich SEs exceed the observed ones by more than "
                     f"{SANDWICH_RATIO:g}× for " + ", ".join(f"{n} ({ratios[n]:.1f}×)" for n in wide)
                     + ": the model's noise is misspecified there; quote the sandwich SEs.")
    weak = _identification(result, diagnostics or {})
    for name, what in weak.items():
        for flat in what["flat"]:
            where = (f"{flat['side']} to {flat['to']:.4g}, near the edge of its domain: the data do "
                     f"not bound {name} away from it" if flat["domain_edge"] else
                     f"{flat['side']} to {flat['to']:.4g}: its 95% profile interval is wider than "
                     "the Wald interval")
            lines.append(f"{name} is poorly identified: its profile log L stays within "
                         f"{PROFILE_95:.2f} of the maximum {where}; quote the profile interval "
                         "(profiles.png).")
        if what["rises_above_fit"] > 0.05:
            lines.append(f"{name}'s profile rises {what['rises_above_fit']:.2g} above the fit's "
                         "log L: the fit is not at a maximum (profiles.png).")
    return {**tests, "rejected_at": REJECT_AT if rejected else None, "rejected_by": rejected,
            "sandwich_over_observed": ratios, "poorly_identified": weak, "lines": lines}


#: a bias-correction this large against its estimate is not first-order small: the estimator's
#: law is far from normal there, and 2θ̂ − mean θ̂* is no better than θ̂
BIAS_OVER_ESTIMATE = 0.5


def _bootstrap_caveats(result: fitting.FitResult, correction: dict[str, Any]) -> list[str]:
    """Lines for the verdict where the bootstrap's correction should not be trusted: a bias of
    the order of the estimate, a correction made in the fitter's coordinates because the
    natural one left the domain, or a bias within the Monte Carlo noise of B refits."""
    if not correction or not correction.get("estimates"):
        return []
    lines = []
    for name, est in zip(result.names, result.estimates):
        bias = correction["bias"][name]
        noise = correction["bias_mc_se"].get(name)
        if name in correction.get("corrected_in_fit_coordinates", []) \
                or abs(bias) > BIAS_OVER_ESTIMATE * abs(est):
            lines.append(f"The bootstrap's bias for {name} ({bias:+.3g}) is "
                         f"{abs(bias) / max(abs(est), 1e-300):.1f}× the estimate ({est:.3g})"
                         + (", so the correction was made in the fitter's coordinate"
                            if name in correction.get("corrected_in_fit_coordinates", []) else "")
                         + f": the corrected {name} is unreliable; quote the estimate with its "
                         "profile interval.")
        elif noise is not None and math.isfinite(noise) and abs(bias) < 2 * noise:
            lines.append(f"The bootstrap's bias for {name} ({bias:+.3g}) is within twice its "
                         f"Monte Carlo error ({noise:.2g}): more sets (fit.bootstrap_sets) would "
                         "tell it from noise.")
    return lines


def _diagnostics(problem: Problem, density: TransitionDensity,
                 result: fitting.FitResult) -> dict[str, np.ndarray]:
    """PIT values, profile likelihoods, and the fitted transition density per x₀ bin."""
    cfg = problem.cfg.fit
    theta = result.estimates
    values = problem.tensors(theta, False)
    out: dict[str, np.ndarray] = {}
    log.info("diagnostics: the PIT, each transition's log-density%s and the transition "
             "plot's densities", ", profiles" if cfg.profile_points > 0 else "")
    out["pit"] = density.pit(values).cpu().numpy()
    out.update(_per_transition(problem, density, result))
    if cfg.profile_points > 0 and np.all(np.isfinite(result.se)):
        out.update(_profiles(problem, density, result))
    if problem.latent:  # a transition from one observed start has no law without V
        out.update(_filtered(problem, density, values))
        return out
    try:
        out.update(_bins(problem, density, values, result))
    except (RuntimeError, ArithmeticError) as exc:
        log.warning("transition.png's densities skipped: %s", _breakdown(exc))
    return out


def _filtered(problem: Problem, density: TransitionDensity,
              values: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """The filter's law of the latent coordinate after each observation at θ̂ (its mean and 5,
    50, 95 % quantiles), with each observation's time, its date, and the proxy column where
    the user named one (matched by time): what filtered.png draws."""
    with torch.no_grad():
        density.log_density(values, False)
    out = {f"filtered_{k}": v for k, v in density.filtered_summary().items()}
    tr, obs = problem.transitions, problem.obs
    out["filtered_time"] = tr.t0 + tr.dt
    if obs.dates is not None:
        out["filtered_date"] = np.array([str(d)[:10] for d in obs.dates[tr.row]])
    proxy = problem.cfg.data.get("proxy")
    if proxy:
        options = OmegaConf.to_object(problem.cfg.data)
        options.columns, options.observed, options.proxy = [proxy], [], None
        side = read_observations(problem.cfg.data.path, 1, options)
        where = {float(t): float(v) for t, v in zip(side.time, side.state[:, 0])}
        out["filtered_proxy"] = np.array([where.get(float(t), np.nan) for t in out["filtered_time"]])
        out["filtered_proxy_name"] = np.array(proxy)
    return out


def _per_transition(problem: Problem, density: TransitionDensity,
                    result: fitting.FitResult) -> dict[str, np.ndarray]:
    """Each observed transition's time (of its end; its date when the file had dates) and
    log-density at θ̂, fitted and, where the law is known (1-D OU, CIR), exact: what shows
    which moves the model finds extreme, and where the density approximation errs."""
    tr, obs = problem.transitions, problem.obs
    with torch.no_grad():
        fitted = density.log_density(problem.tensors(result.estimates, False), False).cpu().numpy()
    exact = np.full(tr.n, np.nan)
    law = _exact_law(problem)
    if law is not None:
        theta = dict(zip(problem.names, result.estimates))
        exact = law[0](tr.x0[:, 0], tr.x1[:, 0], tr.dt, *[theta[n] for n in law[1]])
    out = {"transition_time": tr.t0 + tr.dt, "logdensity_fit": fitted,
           "logdensity_exact": np.asarray(exact, float)}
    if obs.dates is not None:
        out["transition_date"] = np.array([str(d)[:10] for d in obs.dates[tr.row]])
    return out


def _profiles(problem: Problem, density: TransitionDensity,
              result: fitting.FitResult) -> dict[str, np.ndarray]:
    """log L along each parameter, the others following the line θ₋ᵢ(θᵢ) on which they
    maximize the quadratic model of log L (from the observed information): the profile's
    exact path when log L is quadratic, and close to it near the optimum."""
    cfg = problem.cfg.fit
    theta, hess, se = result.estimates, result.hessian, result.se
    p, m = len(theta), cfg.profile_points
    grid, loglik = np.empty((p, m)), np.empty((p, m))
    fitted_steps = list(density.step_times)  # a far profile point may choose its own steps
    for i in range(p):
        log.info("profile likelihood %d of %d (%s): %d points over ± %g SE", i + 1, p,
                 problem.names[i], m, cfg.profile_width)
        offsets = np.linspace(-cfg.profile_width, cfg.profile_width, m) * se[i]
        if problem.kinds[i] == "positive":  # stay inside the domain
            offsets = np.maximum(offsets, -0.9 * theta[i])
        elif problem.kinds[i] == "correlation":
            offsets = np.clip(theta[i] + offsets, -0.999, 0.999) - theta[i]
        others = [j for j in range(p) if j != i]
        slope = -np.linalg.solve(hess[np.ix_(others, others)], hess[others, i]) if others else None
        for k, off in enumerate(offsets):
            point = theta.copy()
            point[i] += off
            if others:
                point[others] += slope * off
            grid[i, k] = point[i]
            loglik[i, k] = np.nan  # a gap: the others' line leaves their domain (a ρ beyond
            if not all(fitting.in_domain(v, kind) for v, kind in zip(point, problem.kinds)):
                continue  # ±1, a singular diffusion), or a θ the march cannot cross
            try:
                with torch.no_grad():
                    loglik[i, k] = float(density.log_density(problem.tensors(point, False),
                                                             False).sum())
            except (UserError, RuntimeError, ArithmeticError):
                pass
        density.step_times = list(fitted_steps)  # neighbours share steps; the next line starts over
    return {"profile_names": np.array(problem.names), "profile_grid": grid,
            "profile_loglik": loglik}


def _bins(problem: Problem, density: TransitionDensity, values: dict[str, Tensor],
          result: fitting.FitResult) -> dict[str, np.ndarray]:
    """For each quantile bin of x₀: the conditional density p(x₁ | x₀ = the bin's median) at
    θ̂, fitted and (where known) exact, and the bin's observed moves recentred on that start
    (x₁ − x₀ + median): one law against the moves it should describe, never an average of
    densities that follows the histogram by construction."""
    tr = problem.transitions
    n_bins = max(1, int(problem.cfg.fit.density_bins))
    x0, x1 = tr.x0[:, 0], tr.x1[:, 0]
    edges = np.quantile(x0, np.linspace(0, 1, n_bins + 1))
    dt = float(np.median(tr.dt))
    spread = float(np.std(x1 - x0)) or 1.0
    g = 161
    out = {k: [] for k in ("bin_edges", "bin_dt", "bin_start", "density_x", "density_fit",
                           "density_exact")}
    bin_x1, bin_index = [], []
    exact = _exact_law(problem)
    theta = dict(zip(problem.names, result.estimates))
    bound = density.natural_sde({}).lower_bound  # the data's coordinates, not the march's
    for b in range(n_bins):
        inside = (x0 >= edges[b]) & ((x0 < edges[b + 1]) if b < n_bins - 1 else (x0 <= edges[b + 1]))
        inside &= np.isclose(tr.dt, dt, rtol=0.1)  # monthly calendar steps are 28–31 days
        rows = np.flatnonzero(inside)
        centre = rows[np.argsort(x0[rows])[rows.size // 2]] if rows.size else 0
        start = tr.x0[centre]
        ends = x1[rows] - x0[rows] + start[0]
        lo = (ends.min() if ends.size else start[0]) - 3 * spread
        hi = (ends.max() if ends.size else start[0]) + 3 * spread
        if bound is not None:
            lo = max(lo, bound + 1e-9 * max(1.0, abs(start[0])))
        xs = np.linspace(lo, hi, g)
        out["density_fit"].append(density.predictive_density(values, start[None, :], dt, xs))
        out["density_exact"].append(
            np.exp(exact[0](np.full(g, start[0]), xs, dt, *[theta[n] for n in exact[1]]))
            if exact is not None else np.full(g, np.nan))
        out["bin_edges"].append([edges[b], edges[b + 1]])
        out["bin_dt"].append(dt)
        out["bin_start"].append(start[0])
        out["density_x"].append(xs)
        bin_x1.append(ends)
        bin_index.append(np.full(ends.size, b))
    arrays = {k: np.asarray(v, dtype=float) for k, v in out.items()}
    arrays["bin_x1"] = np.concatenate(bin_x1) if bin_x1 else np.zeros(0)
    arrays["bin_index"] = np.concatenate(bin_index).astype(int) if bin_index else np.zeros(0, int)
    return arrays


# --- the task ------------------------------------------------------------------------------------
def check(cfg: DictConfig) -> None:
    """Every input check, before anything is written."""
    if OmegaConf.is_missing(cfg.data, "path") or not cfg.data.path:
        raise UserError("calibrate needs data=PATH: a CSV with a 'time' (years) or 'date' column "
                        "and one column per state variable, or an .npz (README § Calibrate an SDE to your own data)")
    check_choice("fit.start_from", cfg.fit.start_from, START_FROM)
    for name in cfg.fit.baselines:
        check_choice("fit.baselines", name, BASELINES)
    if cfg.fit.bootstrap_sets == 1 or cfg.fit.bootstrap_sets < 0 \
            or not cfg.fit.bootstrap_substep > 0:
        raise UserError(f"fit.bootstrap_sets={cfg.fit.bootstrap_sets} must be 0 (no bias "
                        f"correction) or ≥ 2, and fit.bootstrap_substep="
                        f"{cfg.fit.bootstrap_substep} > 0")
    for key, ok, allowed in (("max_iter", cfg.fit.max_iter >= 1, "≥ 1"),
                             ("tol", cfg.fit.tol > 0, "> 0"),
                             ("profile_points", cfg.fit.profile_points >= 0, "≥ 0 (0: none)"),
                             ("profile_width", cfg.fit.profile_width > 0, "> 0"),
                             ("density_bins", cfg.fit.density_bins >= 1, "≥ 1")):
        if not ok:  # one key named, with what it allows
            raise UserError(f"fit.{key}={cfg.fit[key]} must be {allowed}")
    if cfg.ansatz.name != "gmm" or cfg.optimizer.name != "time_march":
        raise UserError(f"calibrate computes transition densities with ansatz=gmm and "
                        f"optimizer=time_march; got ansatz={cfg.ansatz.name} "
                        f"optimizer={cfg.optimizer.name}")
    if cfg.equation.name != "fokker_planck":
        raise UserError(f"calibrate fits an SDE: equation=fokker_planck (got {cfg.equation.name})")
    problem = Problem(cfg)
    _density(problem)  # the time-march and mixture settings


def _density(problem: Problem, tset: TransitionSet | None = None,
             at: dict[str, float] | None = None) -> TransitionDensity:
    """The PDE transition density of the data's transitions (or of ``tset``), marched in the
    coordinates the SDE chooses at the parameter values ``at`` (the start)."""
    from neuralpde_cli.ansatz.gmm import GMMConfig
    from neuralpde_cli.solvers.time_march import TimeMarchConfig
    cfg = problem.cfg
    mixture: GMMConfig = OmegaConf.to_object(cfg.ansatz)
    march: TimeMarchConfig = OmegaConf.to_object(cfg.optimizer)
    if problem.latent:
        from neuralpde_cli.likelihood.filter import FilteredDensity
        path = problem.transitions.path
        first = np.r_[True, path[1:] != path[:-1]] if path is not None else \
            np.r_[True, np.zeros(problem.tset.n - 1, bool)]
        return FilteredDensity(problem.sde, problem.tset if tset is None else tset, first,
                               mixture, march, OmegaConf.to_object(cfg.fit.pde), at or {})
    return TransitionDensity(problem.sde, problem.tset if tset is None else tset, mixture, march,
                             OmegaConf.to_object(cfg.fit.pde), at)


def _bootstrap(problem: Problem, result: fitting.FitResult,
               fitted: TransitionDensity) -> dict[str, Any]:
    """The parametric-bootstrap bias correction (:mod:`neuralpde_cli.likelihood.bootstrap`): B
    data sets drawn at θ̂ along the data's design, each refitted from θ̂ with the fit's
    curvature; a refit that fails or does not converge is counted and left out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from neuralpde_cli.likelihood import bootstrap

    begin = time.perf_counter()
    cfg, ts = problem.cfg.fit, problem.tset
    theta, kinds = result.estimates, problem.kinds
    sde = problem.sde(problem.tensors(theta, False))
    generator = torch.Generator(device=problem.device).manual_seed(
        bootstrap.stream_seed(problem.cfg.seed, problem.transitions.x1))
    hinv0 = fitting.start_inverse_hessian(theta, result.hessian, kinds)
    refits, failed = [], 0
    columns = (TextColumn("[bold]bootstrap"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("bootstrap", total=int(cfg.bootstrap_sets), info="")
        for _ in range(int(cfg.bootstrap_sets)):
            x0, x1 = bootstrap.replay_design(sde, ts.x0, ts.t0, ts.dt, problem.transitions.path,
                                             generator, float(cfg.bootstrap_substep))
            density = _density(problem, TransitionSet(x0, x1, ts.t0, ts.dt),
                               fitted.coordinate_values)
            density.use_components(fitted.mixture.components)
            density.compiled = fitted.compiled  # the same graph: compiled once, in this process
            try:
                density.step_times = list(fitted.step_times)  # the fit's, re-chosen where stale
                state = fitting.minimize(problem.objective(density.log_density), theta, kinds,
                                         hinv0=hinv0, max_iter=cfg.max_iter,
                                         tol=bootstrap.REFIT_TOL)
            except (UserError, RuntimeError, ArithmeticError):
                state = None
            if state is None or not state.converged:
                failed += 1
            else:
                refits.append(fitting.to_natural(state.u, kinds)[0])
            done = np.mean(refits, axis=0) if refits else theta
            log.info("bootstrap set %d of %d: %s", len(refits) + failed, cfg.bootstrap_sets,
                     "refit failed" if state is None or not state.converged else "  ".join(
                         f"{n} {v:.4g}" for n, v in zip(problem.names, refits[-1])))
            progress.update(bar, advance=1, info="  ".join(
                f"{n} {2 * e - m:.4g}" for n, e, m in zip(problem.names, theta, done)))
    if len(refits) < max(2, int(cfg.bootstrap_sets) // 2):
        log.warning("bootstrap: %d of %d refits failed; no bias correction", failed,
                    cfg.bootstrap_sets)
        return {"method": "parametric bootstrap", "sets": int(cfg.bootstrap_sets),
                "refits": len(refits), "failed": failed, "estimates": None,
                "time_s": time.perf_counter() - begin}
    out = bootstrap.bias_correct(problem.names, theta, result.se, kinds, np.array(refits), failed)
    out["time_s"] = time.perf_counter() - begin
    log.info("bootstrap bias correction (%d refits, %.0f s): %s", len(refits), out["time_s"],
             "  ".join(f"{n} {v:.5g}" for n, v in out["estimates"].items()))
    return out


def _describe_data(problem: Problem) -> dict[str, Any]:
    """What was read, logged first (the time unit a rate is per) and kept in fit.json."""
    obs, tr = problem.obs, problem.transitions
    out: dict[str, Any] = {"path": obs.source, "columns": obs.state_names,
                           "time": obs.time_note, "observations": int(obs.time.shape[0]),
                           "skipped_lines": obs.skipped_lines}
    if obs.dates is not None:
        out["first"], out["last"] = str(obs.dates.min())[:10], str(obs.dates.max())[:10]
    log.info("%s; %d observations%s of %s, %d transitions, Δt median %.4g years", obs.time_note,
             out["observations"], f" ({out['first']} … {out['last']})" if obs.dates is not None
             else "", obs.state_names, tr.n, float(np.median(tr.dt)))
    if obs.skipped_lines:
        shown = ", ".join(map(str, obs.skipped_lines[:5]))
        log.warning("%d observations skipped for a missing value (line%s %s%s); each transition "
                    "across such a gap spans it with its own Δt (data.missing=refuse stops "
                    "instead)", len(obs.skipped_lines), "s" if len(obs.skipped_lines) > 1 else "",
                    shown, " …" if len(obs.skipped_lines) > 5 else "")
    return out


def _true_values(data: str) -> dict[str, float] | None:
    """The parameters the data were simulated with, when ``data`` sits in a simulate run."""
    summary = Path(data).expanduser().resolve().parent / "summary.json"
    try:
        values = json.loads(summary.read_text()).get("true_values")
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def calibrate(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Fit, diagnose and write the run directory; returns summary.json's content."""
    from neuralpde_cli.run.plots_calibrate import make_calibration_plots

    begin = time.perf_counter()
    torch.manual_seed(cfg.seed)
    problem = Problem(cfg)
    names = problem.names
    data_info = _describe_data(problem)
    summary: dict[str, Any] = {"status": "running", "command": "calibrate", "data": cfg.data.path,
                               "sde": problem.sde_cfg.kind, "parameters": names,
                               "device": str(problem.device),
                               "config": OmegaConf.to_container(cfg, resolve=True)}
    run.write_summary(summary)
    baselines = _baselines(problem)
    start, hinv0, start_name, density = _start(problem, baselines)
    log.info("PDE fit of %s from the %s estimate %s over %d transitions", names, start_name,
             np.round(start, 6).tolist(), problem.tset.n)
    t_fit = time.perf_counter()
    result, step_check = _fit_pde(problem, run, start, hinv0, density, bool(cfg.get("resume")))
    fit_time = time.perf_counter() - t_fit
    diagnostics = _diagnostics(problem, density, result)
    result.notes.update(_robust(problem, density, result))
    if "exact" in baselines:
        result.notes["density_error"] = _density_error(problem, diagnostics, result)
    result.notes["verdict"] = _verdict(result, diagnostics["pit"], diagnostics)
    if cfg.fit.bootstrap_sets and problem.latent:
        log.warning("the bootstrap is skipped: it replays the data's design from observed "
                    "states, and coordinate %s is latent", problem.latent)
    elif cfg.fit.bootstrap_sets:
        result.notes["bias_correction"] = _bootstrap(problem, result, density)
        result.notes["verdict"]["lines"] += _bootstrap_caveats(
            result, result.notes["bias_correction"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **diagnostics)
    atomic_write(run.path / "diagnostics.npz", lambda h: h.write(buffer.getvalue()))
    if problem.latent:  # the filtered latent coordinate on its own, as the issue of it asks
        filtered = io.BytesIO()
        np.savez_compressed(filtered, **{k: v for k, v in diagnostics.items()
                                         if k.startswith("filtered_")})
        atomic_write(run.path / "filtered.npz", lambda h: h.write(filtered.getvalue()))
    if "exact" in baselines:
        ex = baselines["exact"]
        result.notes["distance_se"] = {n: (e - ex["estimates"][n]) / ex["se"][n]
                                       for n, e in zip(names, result.estimates)}
        result.notes["se_ratio"] = {n: s / ex["se"][n] for n, s in zip(names, result.se)}
    k, n = len(names), problem.tset.n
    dts = problem.transitions.dt
    fit_json = {"method": "pde", **result.as_dict(), "aic": 2 * k - 2 * result.loglik,
                "bic": k * math.log(n) - 2 * result.loglik, "n_transitions": n,
                "n_paths": int(len(np.unique(problem.obs.path))), "data": data_info,
                "dt": {"min": float(dts.min()), "median": float(np.median(dts)),
                       "max": float(dts.max())},
                "start": {"from": start_name, "values": dict(zip(names, start.tolist())),
                          "baselines_from": problem.baseline_start_from},
                "time_march": step_check, "fit_time_s": fit_time,
                "true_values": _true_values(cfg.data.path), "baselines": baselines,
                "wall_time_s": time.perf_counter() - begin,
                "config": OmegaConf.to_container(cfg, resolve=True)}
    if fit_json["true_values"]:
        fit_json["true_values"] = {k_: v for k_, v in fit_json["true_values"].items() if k_ in names}
    text = json.dumps(jsonable(fit_json), indent=2)
    atomic_write(run.path / "fit.json", lambda h: h.write(text.encode()))
    metrics = {"loglik": result.loglik, "aic": fit_json["aic"], "bic": fit_json["bic"],
               **{f"{p}": float(v) for p, v in zip(names, result.estimates)},
               **{f"se_{p}": float(v) for p, v in zip(names, result.se)}}
    corrected = (result.notes.get("bias_correction") or {}).get("estimates")
    if corrected:
        metrics.update({f"{p}_bias_corrected": float(v) for p, v in corrected.items()})
    if "distance_se" in result.notes:
        metrics["max_distance_exact_se"] = max(abs(v) for v in result.notes["distance_se"].values())
    summary.update({"status": "completed", "metrics": metrics, "converged": result.converged,
                    "wall_time_s": time.perf_counter() - begin})
    run.write_summary(summary)
    summary["plots"] = [str(p.relative_to(run.path)) for p in make_calibration_plots(run.path)]
    run.write_summary(summary)
    _report(names, result, baselines)
    for line in result.notes["verdict"]["lines"]:
        print(line)
    return summary


def _report(names: list[str], result: fitting.FitResult, baselines: dict[str, dict]) -> None:
    """One table on the console: each method's estimates (SE) and, when exact, distance in SEs."""
    from rich.table import Table

    quasi = [m for m in ("euler", "kessler") if m in baselines]
    table = Table(title="estimates (standard error)",
                  caption="(log L): a Gaussian quasi-likelihood, not comparable"
                  if quasi else None)
    table.add_column("method")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("log L", justify="right")
    rows = {"pde": {"estimates": dict(zip(names, result.estimates)),
                    "se": dict(zip(names, result.se)), "loglik": result.loglik}}
    corrected = result.notes.get("bias_correction") or {}
    if corrected.get("estimates"):
        rows["pde, bias-corrected"] = {**corrected, "loglik": None}
    rows.update(baselines)
    for method, entry in rows.items():
        loglik = "—" if entry.get("loglik") is None else f"{entry['loglik']:.3f}"
        table.add_row(method, *[f"{entry['estimates'][n]:.5g} ({entry['se'][n]:.2g})" for n in names],
                      f"({loglik})" if method in quasi else loglik)
    table_console(48 + 22 * (len(names) + 1)).print(table)


main = make_main("calibrate", calibrate, check, headline=("loglik", "max_distance_exact_se"),
                 schema=CalibrateConfig, register=register, threads=1)
