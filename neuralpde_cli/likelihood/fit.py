r"""Maximum likelihood over a handful of named parameters: BFGS in unconstrained coordinates,
standard errors from the observed information.

* **Constraints by reparametrization.** A ``positive`` parameter is fitted as u = log θ, a
  ``correlation`` as u = atanh ρ, a ``real`` one as itself, so every iterate is admissible and
  the optimizer needs no bounds. Estimates, standard errors and the Hessian are reported in the
  natural parameters.
* **Resumable.** The whole optimizer state is (u, f, ∇f, the BFGS inverse Hessian, counters),
  saved after every iteration; resuming from it replays the same iterates, so an interrupted
  fit ends where the uninterrupted one ends.
* **A stopping rule in likelihood units.** Iteration stops when the Newton decrement
  ½∇fᵀH⁻¹∇f (the log-likelihood still to gain, under the quadratic model) falls below
  ``tol``: 1e-7 leaves the estimate within about 5e-4 standard errors of the optimum.
* **Observed information** H = ∇²(−log L) by central differences of the gradient (which is
  exact: autograd for the PDE likelihood), symmetrized; SE = √diag(H⁻¹).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from neuralpde_cli.errors import UserError

#: natural parameters → (negative log-likelihood, its gradient or None)
Objective = Callable[[np.ndarray], tuple[float, Optional[np.ndarray]]]

CONSTRAINTS = ("real", "positive", "correlation")


def to_unconstrained(theta: np.ndarray, kinds: list[str]) -> np.ndarray:
    out = np.array(theta, dtype=float)
    for i, kind in enumerate(kinds):
        if kind == "positive":
            out[i] = math.log(theta[i])
        elif kind == "correlation":
            out[i] = math.atanh(theta[i])
    return out


def to_natural(u: np.ndarray, kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """θ(u) and the diagonal Jacobian dθ/du."""
    theta, jac = np.array(u, dtype=float), np.ones(len(u))
    for i, kind in enumerate(kinds):
        if kind == "positive":
            theta[i] = math.exp(min(u[i], 700.0))
            jac[i] = theta[i]
        elif kind == "correlation":
            theta[i] = math.tanh(u[i])
            jac[i] = 1.0 - theta[i] ** 2
    return theta, jac


def in_domain(value: float, kind: str) -> bool:
    """Whether a natural value is admissible under its constraint (finite; > 0; in (−1, 1))."""
    return math.isfinite(value) and not (kind == "positive" and value <= 0) \
        and not (kind == "correlation" and not -1 < value < 1)


def check_start(names: list[str], theta: np.ndarray, kinds: list[str]) -> None:
    """A UserError naming a starting value outside its parameter's domain."""
    for name, value, kind in zip(names, theta, kinds):
        if kind not in CONSTRAINTS:
            raise UserError(f"parameter {name}: unknown constraint {kind!r}; one of {list(CONSTRAINTS)}")
        if not in_domain(value, kind):
            allowed = {"positive": "> 0", "correlation": "in (−1, 1)", "real": "finite"}[kind]
            raise UserError(f"the starting value {name}={value:g} must be {allowed}")


@dataclass
class FitState:
    """Everything the next iteration depends on (what a checkpoint holds)."""

    u: np.ndarray
    f: float
    g: np.ndarray
    hinv: np.ndarray
    iteration: int = 0
    evaluations: int = 0
    converged: bool = False
    step: float = 0.0
    #: the last :data:`STALL_ITERATIONS` iterations each gained less than the tolerance: the
    #: log-likelihood is not smooth enough there for the line search to make progress
    stalled: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        return {"u": self.u, "f": np.array(self.f), "g": self.g, "hinv": self.hinv,
                "iteration": np.array(self.iteration), "evaluations": np.array(self.evaluations),
                "converged": np.array(self.converged), "step": np.array(self.step),
                "stalled": np.array(self.stalled)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "FitState":
        return cls(np.asarray(a["u"], float), float(a["f"]), np.asarray(a["g"], float),
                   np.asarray(a["hinv"], float), int(a["iteration"]), int(a["evaluations"]),
                   bool(a["converged"]), float(a["step"]), bool(a.get("stalled", False)))


@dataclass
class FitResult:
    names: list[str]
    estimates: np.ndarray
    loglik: float
    hessian: np.ndarray
    se: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    iterations: int
    evaluations: int
    converged: bool
    #: anything the caller wants recorded beside (e.g. the march's step count)
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"names": self.names,
                "estimates": dict(zip(self.names, map(float, self.estimates))),
                "se": dict(zip(self.names, map(float, self.se))),
                "correlation": self.correlation.tolist(), "hessian": self.hessian.tolist(),
                "loglik": self.loglik, "iterations": self.iterations,
                "evaluations": self.evaluations, "converged": self.converged, **self.notes}


def _gradient_u(objective: Objective, u: np.ndarray, kinds: list[str]) -> tuple[float, np.ndarray]:
    """f and ∇ᵤf, the gradient by the chain rule, or by central differences in u when the
    objective gives none."""
    theta, jac = to_natural(u, kinds)
    f, g = objective(theta)
    if g is not None:
        return f, np.asarray(g, float) * jac
    if not math.isfinite(f):  # an infeasible point has no gradient: 2P more failures to learn it
        return f, np.full(len(u), np.nan)
    grad = np.empty_like(u)
    for i in range(len(u)):
        h = 1e-5 * max(1.0, abs(u[i]))
        up, down = u.copy(), u.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (objective(to_natural(up, kinds)[0])[0]
                   - objective(to_natural(down, kinds)[0])[0]) / (2 * h)
    return f, grad


def _safe(objective: Objective, trial: bool = True) -> Objective:
    """An evaluation that fails numerically (a march that diverges at an absurd trial θ, a
    Cholesky factor that does not exist) counts as +∞, so the line search backs off instead of
    the fit crashing. At a trial point a refusal of the θ itself (a diffusion singular at a
    start point when σ → 0) counts as +∞ too; at the starting values (``trial=False``) it is
    the user's to read."""
    def wrapped(theta: np.ndarray) -> tuple[float, Optional[np.ndarray]]:
        try:
            f, g = objective(theta)
        except (FloatingPointError, ArithmeticError, RuntimeError, np.linalg.LinAlgError):
            return math.inf, None
        except UserError:
            if not trial:
                raise
            return math.inf, None
        if not math.isfinite(f) or (g is not None and not np.all(np.isfinite(g))):
            return math.inf, None
        return f, g
    return wrapped


#: the largest move of one unconstrained coordinate in one line search
MAX_STEP_U = 2.0
#: iterations in a row that each gain less than ``tol`` in log L while the Newton decrement
#: still promises more end a fit as stalled: a 1-D CIR fit once crept through 12 iterations
#: (3–10 s each) that moved θ by 5e-6 and log L by < 1e-6 in all
STALL_ITERATIONS = 3


def minimize(objective: Objective, start: np.ndarray, kinds: list[str], *,
             hinv0: np.ndarray | None = None, max_iter: int = 200, tol: float = 1e-7,
             state: FitState | None = None,
             callback: Callable[[FitState, np.ndarray], None] | None = None) -> FitState:
    """BFGS with a backtracking (Armijo) line search on u; ``callback(state, θ)`` at the start
    and after each iteration (write metrics, checkpoint). ``state`` resumes a saved run."""
    safe = _safe(objective)
    if state is None:
        u = to_unconstrained(np.asarray(start, float), kinds)
        f, g = _gradient_u(_safe(objective, trial=False), u, kinds)
        if not math.isfinite(f):
            raise UserError("the log-likelihood is not finite at the starting values "
                            f"{np.round(to_natural(u, kinds)[0], 6).tolist()}; choose others")
        hinv = np.array(hinv0, float) if hinv0 is not None else np.eye(len(u)) / max(1.0, abs(f))
        state = FitState(u, f, g, hinv, evaluations=1)
        if callback is not None:
            callback(state, to_natural(state.u, kinds)[0])
    idle = 0
    while not state.converged and state.iteration < max_iter:
        direction = -state.hinv @ state.g
        slope = float(state.g @ direction)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            state.hinv = np.eye(len(state.u)) / max(1.0, float(np.linalg.norm(state.g)))
            direction = -state.hinv @ state.g
            slope = float(state.g @ direction)
        if -0.5 * slope < tol:
            state.converged = True
            break
        # at most MAX_STEP_U per coordinate in u (a factor e² for a positive parameter): a start
        # curvature that is far off (Kessler's, where it fits badly) must not send the first
        # trial to an absurd θ, whose march is slow to fail
        step, accepted = min(1.0, MAX_STEP_U / max(float(np.abs(direction).max()), 1e-300)), False
        for _ in range(40):
            u_new = state.u + step * direction
            f_new, g_new = _gradient_u(safe, u_new, kinds)
            state.evaluations += 1
            if math.isfinite(f_new) and f_new <= state.f + 1e-4 * step * slope:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            state.converged = -0.5 * slope < 100 * tol  # no progress possible at this precision
            break
        s, y = u_new - state.u, g_new - state.g
        sy = float(s @ y)
        if sy > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y)):
            rho = 1.0 / sy
            eye = np.eye(len(s))
            if state.iteration == 0 and hinv0 is None:
                state.hinv = eye * sy / float(y @ y)
            state.hinv = (eye - rho * np.outer(s, y)) @ state.hinv @ (eye - rho * np.outer(y, s)) \
                + rho * np.outer(s, s)
        idle = idle + 1 if state.f - f_new < tol else 0
        state.u, state.f, state.g = u_new, f_new, g_new
        state.iteration += 1
        state.step = step
        if idle >= STALL_ITERATIONS:
            state.stalled = True
            state.converged = -0.5 * slope < 100 * tol
        if callback is not None:
            callback(state, to_natural(state.u, kinds)[0])
        if state.stalled:
            break
    return state


def start_inverse_hessian(theta: np.ndarray, hessian: np.ndarray | list, kinds: list[str]
                          ) -> np.ndarray | None:
    """BFGS's first inverse Hessian in u from another fit's Hessian in θ at θ (a Gaussian
    baseline's): None when that is not positive definite."""
    jac = to_natural(to_unconstrained(np.asarray(theta, float), kinds), kinds)[1]
    try:
        hinv = np.linalg.inv(np.outer(jac, jac) * np.asarray(hessian, float))
    except np.linalg.LinAlgError:
        return None
    ok = np.all(np.isfinite(hinv)) and np.all(np.linalg.eigvalsh(0.5 * (hinv + hinv.T)) > 0)
    return hinv if ok else None


def confirm_discretization(objective: Objective, state: FitState, kinds: list[str],
                           readapt: Callable[[np.ndarray], float], *, max_iter: int, tol: float,
                           threshold: float = 1e-3) -> tuple[FitState, dict]:
    """A fit whose objective was discretized once (step times frozen) is checked by choosing the
    discretization again at the optimum: ``readapt(θ̂)`` does that and returns log L there. When
    that moves log L by more than ``threshold``, the fit goes on from θ̂ under the new one. Call
    it before :func:`summarize`, so that the information is taken under the final one."""
    theta = to_natural(state.u, kinds)[0]
    readapted = readapt(theta)
    check = {"loglik_replayed_steps": -state.f, "loglik_readapted_steps": readapted}
    if abs(readapted + state.f) > threshold:
        state = minimize(objective, theta, kinds, max_iter=max_iter, tol=tol)
    return state, check


def autograd_objective(log_density: Callable[[dict[str, "torch.Tensor"]], "torch.Tensor"],
                       tensors: Callable[[np.ndarray, bool], dict[str, "torch.Tensor"]]) -> Objective:
    """θ ↦ (−log L, its gradient by autograd) for a differentiable log-density of named
    parameter tensors; ``tensors(θ, requires_grad)`` makes those tensors."""
    import torch

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        values = tensors(theta, True)
        total = -log_density(values).sum()
        grads = torch.autograd.grad(total, list(values.values()), allow_unused=True)
        return float(total.detach()), np.array([0.0 if g is None else float(g) for g in grads])
    return nll


def observed_information(objective: Objective, theta: np.ndarray,
                         scale: np.ndarray | None = None) -> np.ndarray:
    """∇²(−log L) at θ by central differences of the gradient, steps 1e-4 of each parameter's
    ``scale`` (default: its magnitude); symmetrized."""
    p = len(theta)
    scale = np.maximum(np.abs(theta) if scale is None else np.asarray(scale, float), 1e-8)
    hess = np.empty((p, p))
    safe = _safe(objective)
    for i in range(p):
        h = 1e-4 * scale[i]
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        gu, gd = safe(up)[1], safe(down)[1]
        if gu is None or gd is None:  # no gradient there: no SE (summarize reports NaN)
            hess[:, i] = np.nan
            continue
        hess[:, i] = (np.asarray(gu) - np.asarray(gd)) / (2 * h)
    return 0.5 * (hess + hess.T)


def numeric_gradient(objective: Objective) -> Objective:
    """Add central-difference gradients (relative step 1e-6) to an objective without them."""
    def wrapped(theta: np.ndarray) -> tuple[float, np.ndarray]:
        f = objective(theta)[0]
        grad = np.empty(len(theta))
        for i in range(len(theta)):
            h = 1e-6 * max(abs(theta[i]), 1e-3)
            up, down = theta.copy(), theta.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (objective(up)[0] - objective(down)[0]) / (2 * h)
        return f, grad
    return wrapped


def summarize(names: list[str], objective: Objective, state: FitState, kinds: list[str],
              scale: np.ndarray | None = None) -> FitResult:
    """Estimates, observed information, SEs and correlations at the optimizer's end point."""
    theta = to_natural(state.u, kinds)[0]
    hess = observed_information(objective, theta, scale)
    try:
        if not np.all(np.isfinite(hess)):
            raise np.linalg.LinAlgError("observed information not finite")
        cov = np.linalg.inv(hess)
        se = np.sqrt(np.diag(cov)) if bool(np.all(np.diag(cov) > 0)) else np.full(len(theta), np.nan)
    except np.linalg.LinAlgError:
        cov, se = np.full_like(hess, np.nan), np.full(len(theta), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(se, se)
    # converged: the optimizer's test passed, and the end point is a maximum with finite SEs
    converged = state.converged and not state.stalled and bool(np.all(np.isfinite(se)))
    notes = {"stalled": True} if state.stalled else {}
    return FitResult(names, theta, -state.f, hess, se, cov, corr, state.iteration,
                     state.evaluations, converged, notes)


def sandwich(hessian: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Huber's sandwich H⁻¹(Σₖ sₖsₖᵀ)H⁻¹ from per-transition scores sₖ = ∇ log p(xₖ₊₁ | xₖ)
    (n, P): standard errors that stay valid when the model's noise is misspecified."""
    try:
        h_inv = np.linalg.inv(hessian)
    except np.linalg.LinAlgError:  # singular (or NaN) information: no SE, as in summarize
        nan = np.full_like(np.asarray(hessian, float), np.nan)
        return nan, np.full(len(nan), np.nan)
    cov = h_inv @ (scores.T @ scores) @ h_inv
    return cov, np.sqrt(np.clip(np.diag(cov), 0.0, None))
