r"""Time-marching the mixture's parameters (Neural Galerkin).

At each t the parameter velocity η minimizes Σ wᵣ|∂ℓ/∂θ·η − (rhs of the PDE)/p|²ᵣ + λ|Dη|² over
fixed base points z pushed through each component (x = mₖ + Lₖz), rows weighted by the
quadrature weight times πₖ (the Galerkin metric of p) or 1/K. The columns ∂ℓ/∂θ are closed form
in component-relative coordinates (:class:`~neuralpde_cli.ansatz.gmm.MixtureLayout`), so the
system is O(1)-scaled from a narrow start to a wide end; it is still ill-conditioned (1e10–1e12
with K = 8), which the ridge tames: D = diag(column norms) (Marquardt scaling, so λ means the
same for a component of weight 1/8 as for one of weight 1), then iterated Tikhonov to remove
most of the ridge's bias where the data determine η. One batched solve per stage covers all
start points: normal equations + Cholesky in float64 (κ ≤ n/λ after the scaling), or
matrix-free conjugate gradients for the thousands of unknowns of full covariances in high d.

The ODE θ̇ = η(t, θ) is integrated by Dormand–Prince 5(4) with error control in the relative
coordinates, or by classical RK4 on a grid geometric near t = 0. The accepted steps and their
dense output (Shampine's quartic for Dormand–Prince, cubic Hermite for RK4) become a
:class:`~neuralpde_cli.ansatz.gmm.MarchedMixture`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, MarchedMixture, MixtureEval, MixtureLayout
from neuralpde_cli.equations.base import DensityEquation
from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.training.trainer import Diverged

METHODS = ("rk45", "rk4")
ROW_WEIGHTS = ("mixture", "uniform")
QUADRATURES = ("auto", "gauss_hermite", "quantile", "sobol", "stroud5")
SOLVERS = ("auto", "dense", "cg")
#: from this dimension ``auto`` uses the degree-5 rule with conjugate gradients
STROUD_FROM_DIM = 5
RIDGE_SCALINGS = ("column", "none")

log = logging.getLogger(__name__)


@dataclass
class TimeMarchConfig:
    name: str = "time_march"
    #: rk45: adaptive Dormand–Prince; rk4: fixed steps on a geometric grid
    method: str = "rk45"
    #: rk45 error per step, measured in component-relative units (mean shifts in stds, log-scale
    #: changes of the Cholesky factor, logits)
    rtol: float = 1e-5
    atol: float = 1e-8
    #: λ of the ridge: λ|Dη|², D = diag(column norms) with ``ridge_scaling=column`` (λ is then
    #: relative to each column's own scale), D = I with ``none``
    ridge: float = 1e-3
    ridge_scaling: str = "column"
    #: base points per component (pushed through x = mₖ + Lₖz); 0: max(64, twice the
    #: 1 + d + d(d+1)/2 unknowns of a component)
    base_points: int = 0
    #: how the base points stand for N(0, I): gauss_hermite (tensor rule, weighted), quantile
    #: (1-D), sobol (antithetic, any d), stroud5 (2d² + 1 points, exact to degree 5; cg only in
    #: d > 4); auto: gauss_hermite for d ≤ 2, stroud5 (with cg) from d = 5, else sobol
    quadrature: str = "auto"
    max_steps: int = 20000
    #: first step (rk45) or first grid node (rk4) as a fraction of t_final; 0: from the initial
    #: rate r (RMS of the relative velocity, 1/time): h₀ = 0.2·rtol^{1/5}/r
    first_step: float = 0.0
    #: rk4: number of steps on the geometric grid
    steps: int = 400
    #: iterated-Tikhonov refinements: each cuts the ridge's bias in well-determined directions
    #: by another factor λ/σ² while ill-determined ones stay damped (0: plain ridge)
    refine: int = 1
    #: mixture: rows weighted by πₖ/N; uniform: 1/(KN) (more weight in small components)
    row_weights: str = "mixture"
    #: dense: normal equations + Cholesky; cg: matrix-free conjugate gradients; auto: cg from
    #: d = 5 (with the exact stroud5 points; Sobol points lose accuracy there: cov error 1e-2
    #: at d = 20, 5e-2 at d = 50, against 1e-4 with stroud5) or above 2000 unknowns
    linear_solver: str = "auto"
    cg_tol: float = 1e-10
    cg_iters: int = 100
    seed: int = 0
    #: torch.compile the least-squares velocity (inductor with its C++ wrapper): one fused
    #: kernel sequence per stage instead of a few hundred tiny operators. Pays where one march
    #: is replayed many times (a fit): the first call compiles, 10–30 s on 2 cores, cached on
    #: disk for later processes. Where compiling fails (no C++ compiler) the march runs eagerly.
    compile: bool = False


@dataclass
class MarchResult:
    ansatz: MarchedMixture
    #: one dict per accepted step: t, dt, lstsq_residual, elapsed_s
    history: list[dict[str, float]] = field(default_factory=list)
    #: each member's largest relative least-squares residual over the march (B,)
    member_residual: Tensor | None = None
    #: ``compile`` was asked for and the compiler failed: the march ran eagerly
    compile_failed: bool = False


class _Tableau(NamedTuple):
    c: list[float]
    a: list[list[float]]
    b: list[float]
    #: b − b̂ of the embedded pair (empty: no error estimate)
    e: list[float]
    #: the last stage is f(t + h, y_new): the next step's first stage for free
    fsal: bool
    #: dense output y(t + θh) = y + h Σⱼ θʲ Σᵢ Pᵢⱼ kᵢ (rows: stages; empty: cubic Hermite)
    dense: list[list[float]]


DOPRI5 = _Tableau(
    c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    a=[[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
       [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
       [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
       [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
    b=[35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0],
    e=[71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40],
    fsal=True,
    # Shampine's free quartic interpolant (as in scipy's RK45): 4th order, C¹ at the nodes
    dense=[[1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432],
           [0.0, 0.0, 0.0, 0.0],
           [0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799],
           [0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072],
           [0.0, 127303824393 / 49829197408, -318862633887 / 49829197408,
            701980252875 / 199316789632],
           [0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844],
           [0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423]])
RK4 = _Tableau(c=[0.0, 0.5, 0.5, 1.0], a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
               b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], e=[], fsal=False, dense=[])


def base_points(n: int, dim: int, rule: str, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Points z (M, d) and weights (M,) summing to 1 that stand for N(0, I).

    gauss_hermite: the tensor Gauss–Hermite rule with ⌊n^{1/d}⌋ nodes per axis (exact for
    polynomials of degree < 2n^{1/d}; for d ≤ 2); quantile: normal quantiles (1-D), equal
    weights; sobol: antithetic scrambled Sobol points through Φ⁻¹, equal weights (any d);
    stroud5: 2d² + 1 points exact to degree 5 (so the Gram matrix of a single Gaussian is exact),
    with negative weights for d > 4 (matrix-free solve only).
    """
    if rule == "gauss_hermite":
        side = max(2, int(round(n ** (1.0 / dim))))
        nodes, weights = np.polynomial.hermite_e.hermegauss(side)
        mesh = np.meshgrid(*([nodes] * dim), indexing="ij")
        wmesh = np.meshgrid(*([weights] * dim), indexing="ij")
        z = np.stack([m.ravel() for m in mesh], -1)
        w = np.prod(np.stack([m.ravel() for m in wmesh], -1), -1)
        return (torch.as_tensor(z, dtype=dtype, device=device),
                torch.as_tensor(w / w.sum(), dtype=dtype, device=device))
    if rule == "stroud5":
        # Stroud's fully symmetric degree-5 rule, 2d² + 1 points: 0, ±√(d+2)eᵢ, ±√((d+2)/2)(eᵢ ± eⱼ)
        eye = torch.eye(dim, dtype=dtype)
        i, j = torch.triu_indices(dim, dim, 1)
        pair = torch.cat([eye[i] + eye[j], eye[i] - eye[j]]) * math.sqrt((dim + 2) / 2)
        axis = eye * math.sqrt(dim + 2)
        z = torch.cat([torch.zeros(1, dim, dtype=dtype), axis, -axis, pair, -pair])
        w = torch.cat([torch.full((1,), 2.0 / (dim + 2), dtype=dtype),
                       torch.full((2 * dim,), (4.0 - dim) / (2 * (dim + 2) ** 2), dtype=dtype),
                       torch.full((pair.shape[0] * 2,), 1.0 / (dim + 2) ** 2, dtype=dtype)])
        return z.to(device), w.to(device)
    if rule == "quantile" and dim == 1:
        u = (torch.arange(n, dtype=dtype) + 0.5) / n
        z = torch.special.ndtri(u).unsqueeze(-1)
    else:
        sobol = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
        half = torch.special.ndtri(sobol.draw(n // 2, dtype=dtype).clamp(1e-12, 1 - 1e-12))
        z = torch.cat([half, -half] + ([torch.zeros(1, dim, dtype=dtype)] if n % 2 else []))
    return z.to(device), torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=dtype, device=device)


class _RightHandSide(torch.nn.Module):
    """(rhs of the PDE)/p at the points of mixtures: a module around the equation, so that
    ``torch.func.functional_call`` can swap in one set of equation parameters per mixture."""

    def __init__(self, equation: DensityEquation, layout: MixtureLayout) -> None:
        super().__init__()
        self.equation, self.layout = equation, layout

    def forward(self, t: Tensor, x: Tensor, ev: MixtureEval) -> Tensor:
        """t (P·N,), x (P·N, d) and ev of P parameter sets at N points each → (P·N,)."""
        fields = self.layout.fields(ev, self.equation.diffusion_sqrt(t, x))
        return self.equation.rhs_over_p(t, x, fields)


def check_param_batch(equation: DensityEquation, param_batch: dict[str, Tensor],
                      batch: int) -> dict[str, Tensor]:
    """Equation buffers (names as in ``equation.named_buffers()``, e.g. ``sde.sigma``) with one
    value per batch member, (B, *shape); B must match the start points (or one broadcasts)."""
    known = dict(equation.named_buffers())
    out: dict[str, Tensor] = {}
    for name, value in param_batch.items():
        if name not in known or name in ("initial_mean", "initial_cov"):
            allowed = sorted(k for k in known if k not in ("initial_mean", "initial_cov"))
            raise UserError(f"param_batch: {name!r} is not a parameter of this equation; "
                            f"choose from {allowed} (start points go in x0_batch)")
        value = torch.as_tensor(value).to(known[name])
        if value.shape[1:] != known[name].shape or value.shape[0] not in (1, batch):
            raise UserError(f"param_batch[{name!r}] has shape {tuple(value.shape)}; needs "
                            f"({batch}, {', '.join(map(str, known[name].shape))})".rstrip(", ") + ")")
        out[name] = value.expand(batch, *known[name].shape)
    return out


class _GalerkinField:
    """θ ↦ θ̇ for a batch of mixtures: the least-squares velocity at the current state.

    Rows: every base point pushed through every component, weighted by the quadrature weight
    times πₖ (or 1/K). Columns scaled to unit norm (Marquardt), ridge λ, ``refine`` rounds of
    iterated Tikhonov. ``dense``: normal equations and a Cholesky in float64 (unit diagonal + λ,
    so κ ≤ n/λ); ``cg``: the same equations matrix-free (J η and Jᵀy in O(NKd²)), for the
    thousands of unknowns of full covariances in high d.
    """

    def __init__(self, cfg: TimeMarchConfig, equation: DensityEquation, layout: MixtureLayout,
                 z: Tensor, weights: Tensor, solver: str,
                 params: dict[str, Tensor] | None = None, offsets: Tensor | None = None) -> None:
        self.cfg, self.equation, self.layout, self.z, self.weights = cfg, equation, layout, z, weights
        self.offsets = offsets
        self.solve = self._dense if solver == "dense" else self._cg
        self.residual = 0.0
        self.member_residual: Tensor | None = None
        self.rhs = _RightHandSide(equation, layout)
        self.params = {f"equation.{k}": v for k, v in (params or {}).items()}
        # dynamic=False: a fit replays tensors of one shape; the graph is cached per process by
        # the code object, and on disk by inductor, so each march's new field reuses it
        self.compiled = torch.compile(self.velocity, dynamic=False,
                                      options={"cpp_wrapper": True}) if cfg.compile else None
        if cfg.compile:  # inductor's note per linear-algebra operator it calls out to is noise
            logging.getLogger("torch._inductor.ir").setLevel(logging.ERROR)

    def _rhs_over_p(self, t: Tensor, x: Tensor, ev: MixtureEval) -> Tensor:
        """(rhs)/p at x (B, M, d) at time t (a 0-d tensor): one call for shared coefficients,
        or vmapped over the batch with each member's equation parameters swapped in."""
        b, m, d = x.shape
        member_t = t.expand(b) if self.offsets is None else t + self.offsets
        if not self.params:
            tt = member_t.repeat_interleave(m)
            return self.rhs(tt, x.reshape(-1, d), ev).reshape(b, m)

        def one(params: dict[str, Tensor], tb: Tensor, xb: Tensor, evb: MixtureEval) -> Tensor:
            single = MixtureEval(*(a.unsqueeze(0) for a in evb))
            return torch.func.functional_call(self.rhs, params, (tb.expand(m), xb, single),
                                              strict=False)

        try:
            return torch.func.vmap(one)(self.params, member_t, x, ev)
        except RuntimeError as exc:
            raise UserError("a batch over equation parameters needs coefficients that torch.func "
                            "can batch (closed-form divergences; no autograd inside): "
                            f"{str(exc).splitlines()[0][:200]}") from None

    def velocity(self, t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """θ̇ at time t (0-d tensor) and each member's relative least-squares residual: a pure
        function of tensors (no host syncs), so that it compiles to one graph."""
        lay, z = self.layout, self.z
        b, k, n, d = state.shape[0], lay.components, z.shape[0], lay.dim
        logits, means, entries = lay.unpack(state)
        x = (means.unsqueeze(2) + torch.einsum("bkij,nj->bkni", lay.chol(entries), z)).reshape(b, k * n, d)
        ev = lay.evaluate(state, x)
        f = self._rhs_over_p(t, x, ev)
        comp = ev.weights if self.cfg.row_weights == "mixture" else torch.full_like(ev.weights, 1 / k)
        rw = (comp.unsqueeze(-1) * self.weights).reshape(b, k * n)
        eta, rel = self.solve(ev, rw, f)
        return lay.from_relative(eta, state), rel.detach()

    def __call__(self, t: float, state: Tensor) -> Tensor:
        rate, rel = self._velocity(torch.as_tensor(t, dtype=state.dtype, device=state.device), state)
        self.residual = max(self.residual, float(rel.max()))
        self.member_residual = rel if self.member_residual is None \
            else torch.maximum(self.member_residual, rel)
        return rate

    def _velocity(self, t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`velocity`, compiled on its first call where the config asks; a compiler that
        fails (no C++ toolchain, an operator inductor cannot lower) leaves it eager."""
        if self.compiled is None:
            return self.velocity(t, state)
        from torch._dynamo.exc import BackendCompilerFailed
        from torch._inductor.exc import InductorError
        try:
            return self.compiled(t, state)
        except (BackendCompilerFailed, InductorError) as exc:
            log.warning("optimizer.compile: torch.compile failed (%s); the march runs eagerly",
                        str(exc).splitlines()[0][:160])
            self.compiled = None
            return self.velocity(t, state)

    def _column_scale(self, sq: Tensor) -> Tensor:
        if self.cfg.ridge_scaling != "column":
            return torch.ones_like(sq)
        norms = torch.sqrt(sq.clamp_min(1e-300))  # not 0: √ has no derivative there
        return torch.maximum(norms, 1e-6 * norms.amax(-1, keepdim=True))

    def _dense(self, ev: MixtureEval, rw: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.sqrt(rw)
        wj, wf = w.unsqueeze(-1) * self.layout.jacobian(ev), w * f
        norms = self._column_scale((wj * wj).sum(1))
        js, wf = (wj / norms.unsqueeze(1)).to(torch.float64), wf.to(torch.float64)
        eye = torch.eye(js.shape[-1], dtype=js.dtype, device=js.device)
        chol = torch.linalg.cholesky(js.transpose(1, 2) @ js + self.cfg.ridge * eye)
        eta = torch.zeros_like(wf[:, :js.shape[-1]])
        for _ in range(1 + self.cfg.refine):  # iterated Tikhonov: min |J(η + δ) − f|² + λ|δ|²
            miss = wf - (js @ eta.unsqueeze(-1)).squeeze(-1)
            eta = eta + torch.cholesky_solve(js.transpose(1, 2) @ miss.unsqueeze(-1), chol).squeeze(-1)
        res = torch.linalg.norm(wf - (js @ eta.unsqueeze(-1)).squeeze(-1), dim=-1)
        rel = res / torch.linalg.norm(wf, dim=-1).clamp_min(1e-300)
        return eta.to(rw.dtype) / norms, rel

    def _cg(self, ev: MixtureEval, rw: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        lay, lam = self.layout, self.cfg.ridge
        scale2 = self._column_scale(lay.jacobian_sq(ev, rw)) ** 2

        def normal(v: Tensor) -> Tensor:
            return lay.vjp(ev, rw * lay.jvp(ev, v)) + lam * scale2 * v

        eta = self._pcg(normal, lay.vjp(ev, rw * f), (1.0 + lam) * scale2)
        for _ in range(self.cfg.refine):
            rhs = lay.vjp(ev, rw * (f - lay.jvp(ev, eta)))
            eta = eta + self._pcg(normal, rhs, (1.0 + lam) * scale2)
        miss = f - lay.jvp(ev, eta)
        rel = torch.sqrt((rw * miss * miss).sum(-1).abs() / (rw * f * f).sum(-1).abs().clamp_min(1e-300))
        return eta, rel

    def _pcg(self, op: Callable[[Tensor], Tensor], b: Tensor, diag: Tensor) -> Tensor:
        """Jacobi-preconditioned conjugate gradients, batched; stops when every system has
        ‖r‖ ≤ cg_tol‖b‖."""
        x = torch.zeros_like(b)
        r = b.clone()
        zr = r / diag
        p, rz = zr, (r * zr).sum(-1, keepdim=True)
        goal = self.cfg.cg_tol * torch.linalg.norm(b, dim=-1)
        for _ in range(self.cfg.cg_iters):
            if bool((torch.linalg.norm(r, dim=-1) <= goal).all()):
                break
            ap = op(p)
            alpha = rz / (p * ap).sum(-1, keepdim=True).clamp_min(1e-300)
            x, r = x + alpha * p, r - alpha * ap
            zr = r / diag
            rz_new = (r * zr).sum(-1, keepdim=True)
            p, rz = zr + rz_new / rz.clamp_min(1e-300) * p, rz_new
        return x


class TimeMarcher:
    """Integrates the Galerkin ODE of a Gaussian mixture from p₀ to t_final."""

    def __init__(self, cfg: TimeMarchConfig) -> None:
        check_choice("optimizer.method", cfg.method, METHODS)
        check_choice("optimizer.row_weights", cfg.row_weights, ROW_WEIGHTS)
        check_choice("optimizer.quadrature", cfg.quadrature, QUADRATURES)
        check_choice("optimizer.ridge_scaling", cfg.ridge_scaling, RIDGE_SCALINGS)
        check_choice("optimizer.linear_solver", cfg.linear_solver, SOLVERS)
        for name in ("rtol", "ridge", "cg_tol", "cg_iters"):
            if not getattr(cfg, name) > 0:
                raise UserError(f"optimizer.{name}={getattr(cfg, name)} must be > 0")
        if cfg.atol < 0 or not 0 <= cfg.first_step < 1:
            raise UserError(f"optimizer.atol={cfg.atol} must be ≥ 0 and optimizer.first_step="
                            f"{cfg.first_step} in [0, 1) (a fraction of t_final; 0: automatic)")
        if cfg.base_points < 0 or cfg.max_steps < 1 or cfg.steps < 1 or cfg.refine < 0:
            raise UserError(f"optimizer.base_points={cfg.base_points} (≥ 0), max_steps="
                            f"{cfg.max_steps}, steps={cfg.steps} (≥ 1) and refine={cfg.refine} "
                            "(≥ 0) must be in range")
        self.cfg = cfg

    def run(self, equation: DensityEquation, ansatz: GaussianMixtureAnsatz,
            progress_callback: Callable[[float, dict[str, Any]], None] | None = None,
            x0_batch: Tensor | None = None,
            param_batch: dict[str, Tensor] | None = None,
            initial_chol: Tensor | None = None,
            step_times: list[float] | None = None,
            differentiable: bool = False,
            time_offsets: Tensor | None = None) -> MarchResult:
        """March p from N(x₀, Σ₀) for each row of ``x0_batch`` (B, d) (default: the equation's
        initial mean) and, with ``param_batch``, each member's own equation parameters
        ({buffer name: (B, *shape)}, e.g. ``{"sde.sigma": (B, d, d)}``), all in one march;
        ``progress_callback(t, {dt, lstsq_residual, elapsed_s})`` per step.

        The ansatz supplies the mixture's layout (K, d) and ``split``; its networks are not used
        (the result is a new module, :class:`MarchedMixture`, holding the trajectories; its
        ``cond`` rows are x₀ followed by the flattened parameters).

        Calibration needs three more things: ``initial_chol`` (B, d, d) gives each member its
        own starting Cholesky factor (a short-time Gaussian instead of one shared point width);
        ``step_times`` replays a given list of step end times (no error control), so that the
        result is a smooth function of the equation's parameters; ``differentiable`` keeps the
        autograd graph (gradients in any equation tensor that requires grad);
        ``time_offsets`` (B,) starts member b at calendar time t₀ᵦ: its coefficients are
        evaluated at t₀ᵦ + t (time-dependent SDEs, transitions started at their own times)."""
        if not isinstance(ansatz, GaussianMixtureAnsatz):
            raise UserError(f"optimizer=time_march marches a Gaussian mixture; got "
                            f"{type(ansatz).__name__} (use ansatz=gmm)")
        cfg, lay = self.cfg, ansatz.layout
        d = lay.dim
        unknowns = 1 + d + lay.n_tril
        n_base = cfg.base_points or max(64, 2 * unknowns)
        if n_base < unknowns:
            raise UserError(f"optimizer.base_points={cfg.base_points} is below the {unknowns} "
                            f"unknowns per component in d={d}; use ≥ {2 * unknowns} (or 0: auto)")
        ref = equation.initial_mean
        starts = ref.unsqueeze(0) if x0_batch is None else x0_batch.to(ref)
        if starts.dim() != 2 or starts.shape[1] != d:
            raise UserError(f"x0_batch has shape {tuple(starts.shape)}; needs (B, {d})")
        batch = max([starts.shape[0]] + [int(torch.as_tensor(v).shape[0])
                                         for v in (param_batch or {}).values()])
        params = check_param_batch(equation, param_batch or {}, batch)
        if starts.shape[0] not in (1, batch):
            raise UserError(f"x0_batch has {starts.shape[0]} rows and param_batch {batch}; "
                            "give both the same number (or one)")
        starts = starts.expand(batch, d)
        conditions = torch.cat([starts] + [v.reshape(batch, -1) for v in params.values()], 1)
        chol0 = torch.linalg.cholesky(equation.initial_cov) if initial_chol is None else initial_chol
        if initial_chol is not None and initial_chol.shape != (batch, d, d):
            raise UserError(f"initial_chol has shape {tuple(initial_chol.shape)}; needs ({batch}, {d}, {d})")
        state = lay.initial_state(starts, chol0, ansatz.cfg.split)
        solver = cfg.linear_solver if cfg.linear_solver != "auto" else (
            "cg" if lay.size > 2000 or d >= STROUD_FROM_DIM else "dense")
        rule = cfg.quadrature if cfg.quadrature != "auto" else (
            "gauss_hermite" if d <= 2 else "stroud5" if solver == "cg" else "sobol")
        z, weights = base_points(n_base, d, rule, ref.dtype, ref.device, cfg.seed)
        if solver == "dense" and bool((weights < 0).any()):
            raise UserError(f"optimizer.quadrature={rule} has negative weights in d={d}; "
                            "use it with optimizer.linear_solver=cg")
        offsets = None if time_offsets is None else time_offsets.to(ref).expand(batch)
        field_ = _GalerkinField(cfg, equation, lay, z, weights, solver, params, offsets)
        with torch.set_grad_enabled(differentiable):
            times, coeffs, history = self._integrate(field_, state, equation.t_final,
                                                     progress_callback, step_times)
        marched = MarchedMixture(lay, torch.tensor(times, dtype=ref.dtype, device=ref.device),
                                 torch.stack(coeffs, 1), conditions)
        return MarchResult(marched, history, field_.member_residual,
                           cfg.compile and field_.compiled is None)

    def _error_norm(self, layout: MixtureLayout, err: Tensor, state: Tensor) -> float:
        """RMS of the step error in relative coordinates over tolerances; worst start point."""
        rel = layout.to_relative(err, state)
        k = layout.components
        scale = torch.full_like(rel, self.cfg.atol + self.cfg.rtol)
        scale[:, :k] = self.cfg.atol + self.cfg.rtol * state[:, :k].abs().clamp_min(1.0)
        value = float(torch.sqrt(((rel / scale) ** 2).mean(-1)).max())
        return value if math.isfinite(value) else math.inf

    def _integrate(self, f: _GalerkinField, y: Tensor, t_final: float,
                   callback: Callable[[float, dict[str, Any]], None] | None,
                   step_times: list[float] | None = None
                   ) -> tuple[list[float], list[Tensor], list[dict[str, float]]]:
        """Accepted times, per-step polynomial coefficients (B, 5, n) in θ, and the history.

        With ``step_times`` the steps end exactly there (Dormand–Prince, or RK4 with
        ``method=rk4``) and no step is rejected; each step's error estimate, in units of the
        tolerance, is still recorded (``history[i]["step_error"]``)."""
        cfg = self.cfg
        adaptive = cfg.method == "rk45" and step_times is None
        tab = DOPRI5 if cfg.method == "rk45" else RK4
        if step_times is not None:
            t_final = float(step_times[-1])
        start = time.perf_counter()
        t, k1 = 0.0, f(0.0, y)
        h = cfg.first_step * t_final
        if h == 0.0:
            rate = float(torch.sqrt((f.layout.to_relative(k1, y).detach() ** 2).mean(-1)).max())
            h = min(0.1 * t_final, max(1e-12 * t_final, 0.2 * cfg.rtol ** 0.2 / max(rate, 1e-300)))
        grid = np.concatenate([[0.0], np.geomspace(h, t_final, cfg.steps)]) \
            if step_times is None else np.concatenate([[0.0], np.asarray(step_times, dtype=float)])
        times, coeffs, history = [0.0], [], []
        while t < t_final * (1 - 1e-14) and (step_times is None or len(history) < len(step_times)):
            if len(history) >= cfg.max_steps:
                raise Diverged(f"time-march used optimizer.max_steps={cfg.max_steps} steps and "
                               f"reached only t={t:.4g} of {t_final:g}; raise max_steps or rtol")
            h = min(h, t_final - t) if adaptive else float(grid[len(history) + 1] - t)
            f.residual = 0.0
            y_new, k_new, err, poly = self._step(f, tab, t, y, h, k1)
            # a replayed step is never rejected, but its error estimate is kept: it tells the
            # caller whether steps chosen at other parameters still suit these
            norm = self._error_norm(f.layout, err.detach(), y_new.detach()) if err is not None \
                else 0.0 if bool(torch.isfinite(y_new).all()) else math.inf
            if norm > 1.0 and (adaptive or not math.isfinite(norm)):
                if not adaptive or h < 1e-14 * t_final:
                    raise Diverged(f"time-march failed at t={t:.6g} (step {h:.3g}, error "
                                   f"{norm:.3g}): the least-squares velocity blew up; increase "
                                   "optimizer.ridge or use method=rk45")
                h *= max(0.2, 0.9 * norm ** -0.2)
                continue
            t += h
            coeffs.append(torch.cat([y.unsqueeze(1), poly], 1))
            y, k1 = y_new, k_new
            times.append(t)
            info = {"dt": h, "lstsq_residual": f.residual, "step_error": norm,
                    "elapsed_s": time.perf_counter() - start}
            history.append({"t": t, **info})
            if callback is not None:
                callback(t, info)
            if adaptive:
                h *= min(5.0, max(0.2, 0.9 * norm ** -0.2)) if norm > 0 else 5.0
        return times, coeffs, history

    @staticmethod
    def _step(f: _GalerkinField, tab: _Tableau, t: float, y: Tensor, h: float,
              k1: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """One explicit Runge–Kutta step: new state, its velocity, the error estimate, and the
        dense-output coefficients (B, 4, n) of θ, θ², θ³, θ⁴ on [t, t + h]."""
        ks = [k1]
        for c, row in zip(tab.c[1:], tab.a[1:]):
            yi = y + h * sum(a * k for a, k in zip(row, ks) if a != 0.0)
            ks.append(f(t + c * h, yi))
        y_new = y + h * sum(b * k for b, k in zip(tab.b, ks) if b != 0.0)
        k_new = ks[-1] if tab.fsal else f(t + h, y_new)
        err = h * sum(e * k for e, k in zip(tab.e, ks) if e != 0.0) if tab.e else None
        if tab.dense:
            weights = torch.tensor(tab.dense, dtype=y.dtype, device=y.device)
            poly = h * torch.einsum("ij,ibn->bjn", weights, torch.stack(ks))
        else:  # cubic Hermite through (y, k1) and (y_new, k_new)
            dy, f0, f1 = y_new - y, h * k1, h * k_new
            poly = torch.stack([f0, 3 * dy - 2 * f0 - f1, f0 + f1 - 2 * dy, torch.zeros_like(y)], 1)
        return y_new, k_new, err, poly
