r"""Finite-volume transition densities of 1-D SDEs without a closed-form law, and their MLE.

The reference calibration is judged against where no exact transition law exists (CEV, the
double well). Plain numpy/scipy on plain arrays: coefficients are given as arrays at cell faces
(or, for :func:`fv_mle`, as numpy functions of x and the parameters), never as SDE objects, and
nothing is shared with the time-march it checks.

**Generator.** dX = μ dt + σ dW has the Fokker–Planck flux F = a·p − D·∂ₓp with D = σ²/2 and
a = μ − ∂ₓD. On equal cells of width h the flux through each interior face is
Scharfetter–Gummel (exact when a and D are constant between the two cell centres, second order
otherwise, and never negative):

    F_{i+½} = (D/h)·[B(−z) pᵢ − B(z) p_{i+1}],   z = a·h/D,   B(z) = z/(eᶻ − 1),

with a, D at the face (∂ₓD by central differences of the face values, O(h²)) and zero flux
through the two boundary faces, so dp/dt = A·p conserves mass exactly and A's off-diagonals
are ≥ 0 (a continuous-time Markov chain on the cells).

**Transition matrix.** P(Δ) = exp(AΔ) (:func:`transition_matrix`: scipy.linalg.expm). A
tridiagonal generator with positive off-diagonals is reversible (detailed balance with
π_{i+1}/πᵢ = A_{i+1,i}/A_{i,i+1}), so Π^{−½}AΠ^{½} is a symmetric tridiagonal matrix and the
same exponential is also V·e^{ΛΔ}·Vᵀ conjugated back (``method="spectral"``: one
``eigh_tridiagonal`` per parameter value, then any number of Δ for a few flops per
transition). The tests check the two agree; the spectral form makes the MLE affordable.

**Reading a transition density.** x₀ puts its unit mass on the two nearest cell centres with
the linear hat weights (the mass and mean of the point mass are kept); P moves it over Δ; the
density at x₁ is the linear interpolation of the resulting cell averages. Each step errs by
O((h/s)²) relative to the transition's standard deviation s (the hat and the interpolation each
add about h²/6 to the variance, the scheme O(h²)); :func:`choose_grid` makes the cell width at
most s/``cells_per_sd`` (default 20, so (h/s)² ≤ 1/400) for every transition in the data, s
measured on the finite-volume density itself, and the domain reach ``margin_sd`` (default 10)
standard deviations beyond every observation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp

from neuralpde_cli.references.transitions import numerical_hessian

#: μ(x, *params) or σ²(x, *params) on numpy arrays
Coefficient = Callable[..., np.ndarray]


def _bernoulli(z: np.ndarray) -> np.ndarray:
    """B(z) = z/(eᶻ − 1), stable at 0 and for large |z|."""
    small = np.abs(z) < 1e-8
    safe = np.where(small, 1.0, z)
    with np.errstate(over="ignore"):
        return np.where(small, 1.0 - 0.5 * z, safe / np.expm1(safe))


def _check_faces(faces: np.ndarray) -> float:
    faces = np.asarray(faces, dtype=float)
    if faces.ndim != 1 or faces.size < 4:
        raise ValueError(f"faces must be a 1-D array of ≥ 4 points (got shape {faces.shape})")
    h = (faces[-1] - faces[0]) / (faces.size - 1)
    if not h > 0 or np.max(np.abs(np.diff(faces) - h)) > 1e-9 * max(h, abs(faces[-1])):
        raise ValueError("faces must be increasing and equally spaced")
    return float(h)


def generator_bands(faces: np.ndarray, drift: np.ndarray,
                    variance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tridiagonal generator's diagonal (N,), super- and sub-diagonal (N−1,) on the N cells
    between ``faces`` (N+1,), from μ and σ² at the faces."""
    h = _check_faces(faces)
    drift, variance = (np.asarray(a, dtype=float) for a in (drift, variance))
    if drift.shape != faces.shape or variance.shape != faces.shape:
        raise ValueError(f"drift {drift.shape} and variance {variance.shape} must be given at "
                         f"the {faces.size} faces")
    d = 0.5 * variance
    inner = d[1:-1]
    if not np.all(inner > 0) or not np.all(np.isfinite(drift)):
        bad = int(np.argmax(~(inner > 0) | ~np.isfinite(drift[1:-1]))) + 1
        raise ValueError(f"σ² must be > 0 and μ finite at every interior face (face {bad}, "
                         f"x = {faces[bad]:g}: σ² = {variance[bad]:g}, μ = {drift[bad]:g})")
    a = drift[1:-1] - (d[2:] - d[:-2]) / (2.0 * h)
    z = a * h / inner
    alpha = inner * _bernoulli(-z) / h ** 2  # flux coefficient of the left cell (÷ h: dp/dt)
    beta = inner * _bernoulli(z) / h ** 2    # of the right cell
    n = faces.size - 1
    diag = np.zeros(n)
    diag[:-1] -= alpha   # mass leaving cell i to the right
    diag[1:] -= beta     # mass leaving cell i+1 to the left
    return diag, beta, alpha  # upper A[i, i+1] = β_i, lower A[i+1, i] = α_i


def fv_generator(faces: np.ndarray, drift: np.ndarray, variance: np.ndarray) -> sp.csr_matrix:
    """A (N, N) with dp/dt = A·p for the cell averages p, zero flux at both ends: columns sum
    to 0 (mass is conserved), off-diagonals ≥ 0."""
    diag, upper, lower = generator_bands(faces, drift, variance)
    return sp.diags([lower, diag, upper], [-1, 0, 1], format="csr")


def transition_matrix(generator: sp.spmatrix | np.ndarray, dt: float) -> np.ndarray:
    """P = exp(A·Δ) (dense): column j is the cell-mass distribution after Δ from cell j."""
    dense = generator.toarray() if sp.issparse(generator) else np.asarray(generator, float)
    return scipy.linalg.expm(dense * float(dt))


@dataclass
class Spectral:
    """exp(AΔ) = diag(e^{L/2}) V e^{ΛΔ} Vᵀ diag(e^{−L/2}), L = log π (the chain's detailed
    balance), for a tridiagonal A with positive off-diagonals."""

    values: np.ndarray   # Λ (N,)
    vectors: np.ndarray  # V (N, N), orthonormal columns
    log_pi: np.ndarray   # L (N,)

    @classmethod
    def of(cls, diag: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> "Spectral":
        if not (np.all(upper > 0) and np.all(lower > 0)):
            raise ValueError("the generator's off-diagonals underflowed to 0 (cells far too wide "
                             "for the drift there); use method='expm' or a finer grid")
        log_pi = np.concatenate([[0.0], np.cumsum(np.log(lower) - np.log(upper))])
        values, vectors = scipy.linalg.eigh_tridiagonal(diag, np.sqrt(upper * lower))
        return cls(values, vectors, log_pi)

    def entries(self, k: np.ndarray, j: np.ndarray, dt: np.ndarray, chunk: int = 512) -> np.ndarray:
        """P(Δ)[k, j] for index arrays k, j (n,) and Δ (n,)."""
        out = np.empty(k.shape[0])
        for s in range(0, k.shape[0], chunk):
            sl = slice(s, s + chunk)
            decay = np.exp(np.outer(dt[sl], self.values))
            core = np.einsum("nm,nm,nm->n", self.vectors[k[sl]], self.vectors[j[sl]], decay)
            out[sl] = np.exp(0.5 * (self.log_pi[k[sl]] - self.log_pi[j[sl]])) * core
        return out


def _hat(centers: np.ndarray, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Left cell index and the right cell's linear weight of each x (n,)."""
    h = centers[1] - centers[0]
    if np.any(x < centers[0]) or np.any(x > centers[-1]):
        bad = x[(x < centers[0]) | (x > centers[-1])][0]
        raise ValueError(f"{what} = {bad:g} lies outside the cell centres "
                         f"[{centers[0]:g}, {centers[-1]:g}]; widen the grid")
    i = np.clip(np.floor((x - centers[0]) / h).astype(int), 0, centers.size - 2)
    return i, (x - centers[i]) / h


def log_transition_density(faces: np.ndarray, drift: np.ndarray, variance: np.ndarray,
                           x0: np.ndarray, x1: np.ndarray, dt: np.ndarray | float,
                           method: str = "spectral") -> np.ndarray:
    """log p(x1, t + Δ | x0, t) (n,) on the grid ``faces`` with μ, σ² at the faces.

    ``method``: ``"expm"`` (scipy.linalg.expm once per distinct Δ) or ``"spectral"`` (the same
    exponential through the symmetrized eigendecomposition; any number of Δ).
    """
    x0, x1 = (np.asarray(a, dtype=float).reshape(-1) for a in (x0, x1))
    dt = np.broadcast_to(np.asarray(dt, dtype=float), x0.shape).astype(float)
    faces = np.asarray(faces, dtype=float)
    h = _check_faces(faces)
    centers = 0.5 * (faces[1:] + faces[:-1])
    j0, wj = _hat(centers, x0, "x0")
    k0, wk = _hat(centers, x1, "x1")
    bands = generator_bands(faces, drift, variance)
    pairs = [(k0, j0, (1 - wk) * (1 - wj)), (k0, j0 + 1, (1 - wk) * wj),
             (k0 + 1, j0, wk * (1 - wj)), (k0 + 1, j0 + 1, wk * wj)]
    p = np.zeros(x0.shape[0])
    if method == "spectral":
        spec = Spectral.of(*bands)
        for k, j, w in pairs:
            p += w * spec.entries(k, j, dt)
    elif method == "expm":
        a = sp.diags([bands[2], bands[0], bands[1]], [-1, 0, 1], format="csr")
        for step in np.unique(dt):
            rows = dt == step
            pm = transition_matrix(a, step)
            for k, j, w in pairs:
                p[rows] += w[rows] * pm[k[rows], j[rows]]
    else:
        raise ValueError(f"method={method!r}: 'spectral' or 'expm'")
    p /= h
    with np.errstate(divide="ignore"):
        return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)


# --- the grid -----------------------------------------------------------------------------
@dataclass
class Grid:
    faces: np.ndarray
    #: the smallest standard deviation of a data transition (measured on the FV density) over h
    cells_per_sd: float
    #: the smallest distance from an observation to the domain's edge, in that transition's sd
    margin_sd: float

    @property
    def cells(self) -> int:
        return self.faces.size - 1

    @property
    def h(self) -> float:
        return float(self.faces[1] - self.faces[0])

    def describe(self) -> dict:
        return {"cells": self.cells, "h": self.h, "lo": float(self.faces[0]),
                "hi": float(self.faces[-1]), "cells_per_sd": self.cells_per_sd,
                "margin_sd": self.margin_sd}


def _faces(lo: float, hi: float, h: float) -> np.ndarray:
    n = max(4, int(math.ceil((hi - lo) / h)))
    return np.linspace(lo, hi, n + 1)


def _measure(faces: np.ndarray, drift: Coefficient, variance: Coefficient, params: Sequence[float],
             x0: np.ndarray, x1: np.ndarray, dt: np.ndarray,
             cut_lower: bool = False) -> tuple[float, float]:
    """(min sd/h, min distance to the domain's edge in sd) over the data's transitions, the sd
    of each read from the FV density (its column's variance) at the cell nearest x₀: the
    cells against the shortest Δ, the margin against the longest (a transition's sd grows
    with Δ). With ``cut_lower`` the lower edge is the state's bound and only the upper edge
    counts."""
    centers = 0.5 * (faces[1:] + faces[:-1])
    h = faces[1] - faces[0]
    spec = Spectral.of(*generator_bands(faces, drift(faces, *params), variance(faces, *params)))
    cells = np.clip(np.round((x0 - centers[0]) / h).astype(int), 0, centers.size - 1)
    x = centers - centers[cells].mean()  # centred: no cancellation in E[x²] − E[x]²
    lift = np.exp(0.5 * (spec.log_pi - spec.log_pi.max()))
    weights = np.stack([lift, x * lift, x * x * lift]) @ spec.vectors  # (3, N): Σₖ xₖⁱ e^{Lₖ/2} V_km
    rows = spec.vectors[cells] / lift[cells, None]

    def sd_after(step: float) -> np.ndarray:
        # column j of P(Δ): its mass, mean and second moment, Σₖ xₖⁱ P_kj
        m0, m1, m2 = ((rows * np.exp(step * spec.values)) @ weights.T).T
        var = m2 / m0 - (m1 / m0) ** 2
        return np.maximum(np.sqrt(np.clip(var, 0.0, None)), 1e-300)

    narrow = sd_after(dt.min())
    wide = narrow if dt.max() == dt.min() else sd_after(dt.max())
    room = [faces[-1] - x if cut_lower else np.minimum(x - faces[0], faces[-1] - x)
            for x in (x0, x1)]
    return float(narrow.min() / h), float(min((r / wide).min() for r in room))


def choose_grid(drift: Coefficient, variance: Coefficient, params: Sequence[float],
                x0: np.ndarray, x1: np.ndarray, dt: np.ndarray, cells_per_sd: float = 20.0,
                margin_sd: float = 10.0, lower: float | None = None,
                max_rounds: int = 6) -> Grid:
    """Equal cells of width ≤ s/``cells_per_sd`` for every data transition's sd s, over a domain
    reaching ``margin_sd``·s beyond every observation (cut at ``lower``, the state's bound).

    Starts from the short-time sd σ(x)√Δ and refines until the FV density's own sd (at
    ``params``) satisfies both, so a mean-reverting law narrower than σ√Δ is covered.
    """
    x0, x1, dt = (np.asarray(a, dtype=float).reshape(-1) for a in (x0, x1, dt))
    lo_x, hi_x = float(min(x0.min(), x1.min())), float(max(x0.max(), x1.max()))
    probe = np.linspace(lo_x, hi_x, 64)
    sd0 = np.sqrt(np.maximum(variance(probe, *params), 0.0) * dt.min())
    if not np.all(sd0 > 0):
        raise ValueError("σ² vanishes inside the observed range; no density there")
    reach = margin_sd * float(np.sqrt(np.max(variance(probe, *params)) * dt.max()))
    lo, hi, h = lo_x - reach, hi_x + reach, float(sd0.min()) / cells_per_sd
    for _ in range(max_rounds):
        cut = lower is not None and lo <= lower
        lo = max(lo, lower) if cut else lo
        faces = _faces(lo, hi, h)
        measured, margin = _measure(faces, drift, variance, params, x0, x1, dt, cut)
        ok_h, ok_m = measured >= cells_per_sd * (1 - 1e-9), margin >= margin_sd
        if ok_h and ok_m and margin <= 2 * margin_sd:
            return Grid(faces, measured, margin)
        if not ok_h:
            h = 0.95 * measured * h / cells_per_sd
        # the reach beyond the data scales with the margin it gave: aim at 1.2 × margin_sd
        scale = 1.2 * margin_sd / max(margin, 1.0)
        lo = lo_x - (lo_x - lo) * scale if not cut else lo
        hi = hi_x + (hi - hi_x) * scale
    raise ValueError(f"no grid met cells_per_sd={cells_per_sd}, margin_sd={margin_sd} in "
                     f"{max_rounds} rounds (last: {measured:.3g} cells per sd, margin {margin:.3g} sd)")


# --- models and the MLE ---------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """A 1-D SDE as plain numpy formulas: parameter names, which are > 0, μ(x, *p), σ²(x, *p)."""

    names: tuple[str, ...]
    positive: tuple[str, ...]
    drift: Coefficient
    variance: Coefficient
    #: the state's lower bound (the domain is cut there), or None
    lower: float | None = None


#: the SDE kinds the benchmarks need, in calibration's parameter names
MODELS: dict[str, Model] = {
    "ou": Model(("theta", "mean", "sigma"), ("theta", "sigma"),
                lambda x, th, m, s: th * (m - x), lambda x, th, m, s: np.full_like(x, s * s)),
    "cir": Model(("rate", "level", "noise"), ("rate", "level", "noise"),
                 lambda x, k, m, s: k * (m - x), lambda x, k, m, s: s * s * np.clip(x, 0, None),
                 lower=0.0),
    "cev": Model(("rate", "level", "noise", "gamma"), ("rate", "level", "noise", "gamma"),
                 lambda x, k, m, s, g: k * (m - x),
                 lambda x, k, m, s, g: s * s * np.clip(x, 0, None) ** (2 * g), lower=0.0),
    "double_well": Model(("linear", "cubic", "noise"), ("cubic", "noise"),
                         lambda x, a, b, s: a * x - b * x ** 3,
                         lambda x, a, b, s: np.full_like(x, s * s)),
}


def fv_log_likelihood(model: Model, grid: Grid, params: Sequence[float], x0: np.ndarray,
                      x1: np.ndarray, dt: np.ndarray, method: str = "spectral") -> float:
    faces = grid.faces
    return float(np.sum(log_transition_density(faces, model.drift(faces, *params),
                                               model.variance(faces, *params), x0, x1, dt, method)))


def fv_mle(model: Model | str, x0: np.ndarray, x1: np.ndarray, dt: np.ndarray | float,
           start: Mapping[str, float], cells_per_sd: float = 20.0, margin_sd: float = 10.0,
           gtol: float = 1e-5) -> dict:
    """The maximum-likelihood estimate under the finite-volume transition density.

    The grid is chosen at ``start`` (:func:`choose_grid`) and frozen, so the likelihood is a
    smooth function of the parameters; BFGS in log-coordinates for the positive parameters
    (central-difference gradients); the grid is re-checked at the estimate and, if it no
    longer meets ``cells_per_sd``/``margin_sd`` there, rebuilt and the fit repeated from it.
    SEs from the inverse observed information (central-difference Hessian of −log L in the
    natural parameters, :func:`~neuralpde_cli.references.transitions.numerical_hessian`).
    """
    model = MODELS[model] if isinstance(model, str) else model
    x0, x1 = (np.asarray(a, dtype=float).reshape(-1) for a in (x0, x1))
    dt = np.broadcast_to(np.asarray(dt, dtype=float), x0.shape).astype(float)
    names = model.names
    is_pos = np.array([n in model.positive for n in names])
    begin = time.perf_counter()
    p = np.array([float(start[n]) for n in names])
    evaluations = 0
    for _ in range(3):
        grid = choose_grid(model.drift, model.variance, p, x0, x1, dt, cells_per_sd, margin_sd,
                           model.lower)

        def nll(theta: np.ndarray, grid: Grid = grid) -> float:
            nonlocal evaluations
            evaluations += 1
            if np.any(theta[is_pos] <= 0):
                return np.inf
            try:
                value = -fv_log_likelihood(model, grid, theta, x0, x1, dt)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                return np.inf
            return value if np.isfinite(value) else np.inf

        def to_natural(u: np.ndarray) -> np.ndarray:
            return np.where(is_pos, np.exp(np.clip(u, -700, 700)), u)

        u0 = np.where(is_pos, np.log(np.where(is_pos, p, 1.0)), p)
        res = scipy.optimize.minimize(lambda u: nll(to_natural(u)), u0, method="BFGS",
                                      jac="3-point", options={"gtol": gtol, "maxiter": 500})
        p = to_natural(res.x)
        if _grid_holds(model, grid, p, x0, x1, dt, cells_per_sd, margin_sd):
            break
    hessian = numerical_hessian(nll, p)
    cov = np.linalg.inv(hessian)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    grid_info = grid.describe()
    grid_info["cells_per_sd_at_estimate"], grid_info["margin_sd_at_estimate"] = _measure(
        grid.faces, model.drift, model.variance, p, x0, x1, dt, _cut(model, grid))
    return {"names": list(names), "estimates": dict(zip(names, p.tolist())),
            "se": dict(zip(names, se.tolist())), "loglik": -nll(p), "hessian": hessian,
            "grid": grid_info, "evaluations": evaluations, "optimizer": res.message,
            "gradient_norm": float(np.linalg.norm(res.jac)), "wall_time_s": time.perf_counter() - begin}


def _cut(model: Model, grid: Grid) -> bool:
    return model.lower is not None and grid.faces[0] <= model.lower


def _grid_holds(model: Model, grid: Grid, p: np.ndarray, x0: np.ndarray, x1: np.ndarray,
                dt: np.ndarray, cells_per_sd: float, margin_sd: float) -> bool:
    """The frozen grid still meets both requirements at the estimate p."""
    measured, margin = _measure(grid.faces, model.drift, model.variance, p, x0, x1, dt,
                                _cut(model, grid))
    return measured >= cells_per_sd * (1 - 1e-9) and margin >= margin_sd
