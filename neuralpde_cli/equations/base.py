"""What every density equation shares: the Fokker–Planck operator written for log p.

Heat and Fokker–Planck are both ∂p/∂t = −∇·(μp) + Σᵢⱼ ∂ᵢ∂ⱼ(Dᵢⱼ p) with a Gaussian initial
density; heat is the case μ = 0, D = κI. Dividing by p and writing ℓ = log p gives

    ∂ₜℓ = −∇·μ − μ·∇ℓ + Σᵢⱼ∂ᵢ∂ⱼDᵢⱼ + 2 (∇·D)·∇ℓ + tr(D∇²ℓ) + ∇ℓᵀD∇ℓ,

which stays well scaled where p is tiny (high dimensions, narrow starts). An ansatz supplies
ℓ and its derivatives (:class:`LogDensityFields`); the equation supplies μ, D and their
derivatives. Neither knows how the other computes its part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes.base import SDE


@dataclass
class LogDensityFields:
    """ℓ = log p and the derivatives the operator needs, at N points.

    ``trace_dh`` is tr(D ∇²ℓ) (exact or a Hutchinson estimate); ``grad`` is ∇ₓℓ, (N, d).
    """

    log_p: Tensor
    dt_log_p: Tensor
    grad: Tensor
    trace_dh: Tensor


def gaussian_log_density(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mean, cov) for x (N, d), mean (d,) or (N, d), cov (d, d) or (N, d, d)."""
    chol = torch.linalg.cholesky(cov)
    diff = (x - mean).unsqueeze(-1)
    if chol.dim() == 2:
        chol = chol.expand(x.shape[0], *chol.shape)
    z = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    d = x.shape[-1]
    return -0.5 * (z * z).sum(-1) - 0.5 * log_det - 0.5 * d * math.log(2.0 * math.pi)


def importance_moments(log_pred: Tensor, log_proposal: Tensor,
                       x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Mean, covariance and mass of p̂ from samples x ~ q (self-normalized importance sampling)."""
    log_w = log_pred - log_proposal
    w = torch.softmax(log_w, dim=0)
    mass = float(torch.exp(torch.logsumexp(log_w, 0)) / x.shape[0])
    mean = (w[:, None] * x).sum(0)
    xc = x - mean
    return mean, (w[:, None] * xc).T @ xc, mass


def initial_gaussian(dim: int, mean: list[float], std: float, correlation: float,
                     cov: list[list[float]], dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """N(m₀, Σ₀) from config values, validated: Σ₀ = std²((1 − ρ)I + ρ11ᵀ) unless given in full."""
    if mean and len(mean) != dim:
        raise UserError(f"equation.initial_mean has {len(mean)} entries; dim={dim} needs {dim} "
                        "(or leave it empty for the origin)")
    m0 = torch.tensor(mean if mean else [0.0] * dim, dtype=dtype, device=device)
    if cov:
        c0 = torch.tensor(cov, dtype=dtype, device=device)
        if c0.shape != (dim, dim):
            raise UserError(f"equation.initial_cov has shape {tuple(c0.shape)}; dim={dim} needs "
                            f"({dim}, {dim})")
    else:
        if std <= 0:
            raise UserError(f"equation.initial_std={std} must be > 0")
        if not -1.0 / max(dim - 1, 1) < correlation < 1.0:
            raise UserError(f"equation.initial_correlation={correlation} gives no valid covariance "
                            f"in dim={dim}; allowed: {-1.0 / max(dim - 1, 1):.4g} < ρ < 1")
        eye = torch.eye(dim, dtype=dtype, device=device)
        c0 = std ** 2 * ((1.0 - correlation) * eye + correlation * torch.ones_like(eye))
    if not torch.allclose(c0, c0.T) or torch.linalg.eigvalsh(c0)[0] <= 0:
        raise UserError("equation.initial_cov is not symmetric positive definite "
                        f"(eigenvalues {torch.linalg.eigvalsh((c0 + c0.T) / 2).tolist()})")
    return m0, c0


def relative_l2_from_logs(log_pred: Tensor, log_true: Tensor) -> float:
    """‖p̂ − p‖₂ / ‖p‖₂ computed from logs, so it stays finite where p underflows (d = 100)."""
    w = torch.softmax(2.0 * log_true, dim=0)
    return float(torch.sqrt((w * torch.expm1(log_pred - log_true) ** 2).sum()))


@dataclass
class Ensemble:
    """Paths of the equation's SDE at a grid of times: ``paths`` (n_t, n, d) at ``times`` (n_t,)."""

    times: Tensor
    paths: Tensor
    _moments: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean (n_t, d) and covariance (n_t, d, d) at each time (computed once: the sampler,
        the objective and the envelope all read them)."""
        if self._moments is None:
            mean = self.paths.mean(1)
            y = self.paths - mean.unsqueeze(1)
            self._moments = (mean, y.transpose(-1, -2) @ y / (self.paths.shape[1] - 1))
        return self._moments


class _CoefficientSDE(SDE):
    """An equation's own drift and diffusion as an SDE, for its Euler–Maruyama paths."""

    def __init__(self, equation: "DensityEquation") -> None:
        super().__init__(equation.dim)
        self.drift = equation.drift  # type: ignore[method-assign]
        self.diffusion_sqrt = equation.diffusion_sqrt  # type: ignore[method-assign]


class DensityEquation(torch.nn.Module):
    """Base for ∂p/∂t = −∇·(μp) + ∇∇:(Dp) on ℝᵈ × [0, T] from a Gaussian N(m₀, Σ₀).

    Coefficients may be torch parameters (calibration differentiates through them), so the
    equation is an ``nn.Module``. Subclasses define :meth:`drift` and :meth:`diffusion_sqrt`;
    the divergence terms default to autograd and are overridden where closed forms exist.
    """

    #: True when D does not depend on x (lets ansatzes and operators skip ∇·D terms).
    constant_diffusion: bool = True

    def __init__(self, dim: int, t_final: float, initial_mean: Tensor, initial_cov: Tensor,
                 eval_times: list[float]) -> None:
        super().__init__()
        self.dim = dim
        self.t_final = float(t_final)
        self.register_buffer("initial_mean", initial_mean)
        self.register_buffer("initial_cov", initial_cov)
        self.eval_times = [float(t) for t in eval_times] or list(np.linspace(0.0, t_final, 5))

    # --- coefficients -------------------------------------------------------------------
    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """μ(t, x), (N, d)."""
        raise NotImplementedError

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        """S with D = S Sᵀ = ½σσᵀ: (d, r) when constant, else (N, d, r)."""
        raise NotImplementedError

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        """∇·μ, (N,). Autograd fallback (d backward passes); subclasses give closed forms."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True) if not x.requires_grad else x
            mu = self.drift(t, xr)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(self.dim):
                div = div + torch.autograd.grad(mu[:, i].sum(), xr, create_graph=True)[0][:, i]
        return div

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(Σⱼ∂ⱼDᵢⱼ (N, d), Σᵢⱼ∂ᵢ∂ⱼDᵢⱼ (N,)); zero for constant D, autograd otherwise."""
        n, d = x.shape
        if self.constant_diffusion:
            z = torch.zeros(n, dtype=x.dtype, device=x.device)
            return torch.zeros(n, d, dtype=x.dtype, device=x.device), z
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            s = self.diffusion_sqrt(t, xr)
            dmat = s @ s.transpose(-1, -2)
            div = torch.stack([
                sum(torch.autograd.grad(dmat[:, i, j].sum(), xr, create_graph=True)[0][:, j]
                    for j in range(d)) for i in range(d)], dim=-1)
            divdiv = sum(torch.autograd.grad(div[:, i].sum(), xr, create_graph=True)[0][:, i]
                         for i in range(d))
        return div, divdiv

    def diffusion_matrix(self, t: Tensor, x: Tensor) -> Tensor:
        s = self.diffusion_sqrt(t, x)
        return s @ s.transpose(-1, -2)

    # --- the operator -------------------------------------------------------------------
    def rhs_over_p(self, t: Tensor, x: Tensor, f: LogDensityFields) -> Tensor:
        """(right-hand side of the equation) / p, from the log-density fields."""
        mu = self.drift(t, x)
        out = -self.drift_divergence(t, x) - (mu * f.grad).sum(-1) + f.trace_dh
        s = self.diffusion_sqrt(t, x)
        st_grad = (f.grad.unsqueeze(-1) * s).sum(-2) if s.dim() == 3 else f.grad @ s
        out = out + (st_grad * st_grad).sum(-1)
        if not self.constant_diffusion:
            div, divdiv = self.diffusion_divergences(t, x)
            out = out + divdiv + 2.0 * (div * f.grad).sum(-1)
        return out

    def log_residual(self, t: Tensor, x: Tensor, f: LogDensityFields) -> Tensor:
        """∂ₜℓ − (rhs)/p: zero for the exact solution."""
        return f.dt_log_p - self.rhs_over_p(t, x, f)

    # --- initial condition and exact solution ------------------------------------------
    def initial_log_density(self, x: Tensor) -> Tensor:
        return gaussian_log_density(x, self.initial_mean, self.initial_cov)

    def exact_moments(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Mean (n_t, d) and covariance (n_t, d, d) when the solution is Gaussian, else None."""
        return None

    def gaussian_law(self) -> bool:
        """Whether the solution is Gaussian at every time (closed-form moments exist)."""
        return self.exact_moments(self.initial_mean.new_zeros(1)) is not None

    def reference_log_density(self, t: float, x: Tensor) -> Tensor | None:
        """log p(t, x) from an exact or independent numerical reference, or None."""
        moments = self.exact_moments(torch.tensor([t], dtype=x.dtype, device=x.device))
        if moments is None:
            return None
        mean, cov = moments
        return gaussian_log_density(x, mean[0], cov[0])

    def envelope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """A broad Gaussian (mean (N, d), std (N, 1)) covering the solution at times t.

        Used for collocation and evaluation grids; never for error metrics. The default
        widens the initial density by the largest diffusion rate at the initial mean.
        """
        m0 = self.initial_mean.expand(t.shape[0], self.dim)
        t0 = torch.zeros(1, dtype=t.dtype, device=t.device)
        s = self.diffusion_sqrt(t0, self.initial_mean[None])
        dmax = torch.linalg.matrix_norm(s.reshape(-1, self.dim, s.shape[-1]), ord=2)[0] ** 2
        var0 = torch.linalg.eigvalsh(self.initial_cov)[-1]
        return m0, torch.sqrt(var0 + 2.0 * dmax * t).unsqueeze(-1)

    # --- where the solution lives: an Euler–Maruyama ensemble of its SDE ------------------
    def ensemble(self, n_paths: int = 4000, n_times: int = 200, seed: int = 2024) -> "Ensemble":
        """X(t) of ``n_paths`` Euler–Maruyama paths of dX = μ dt + √2 S dW from p₀ at
        t_k = T(k/n_times)² (dense near t = 0, where a narrow start changes fastest), computed
        once per equation. Samples of the law itself, in any dimension: where collocation points
        belong (``sampler=paths``), and the moments a network's envelope is fitted to."""
        key = (n_paths, n_times, seed)
        cache = self.__dict__.setdefault("_ensembles", {})
        if key not in cache:
            like = self.initial_mean
            gen = torch.Generator(device="cpu").manual_seed(seed)
            times = self.t_final * torch.linspace(0.0, 1.0, n_times + 1, dtype=like.dtype) ** 2
            z = torch.randn(n_paths, self.dim, generator=gen, dtype=like.dtype).to(like.device)
            x = self.initial_mean + z @ torch.linalg.cholesky(self.initial_cov).T
            with torch.no_grad():
                paths = self._paths(x, times.to(like.device), gen)
            cache[key] = Ensemble(times.to(like.device), paths)
        return cache[key]

    def _paths(self, x0: Tensor, times: Tensor, generator: torch.Generator) -> Tensor:
        """(n_t, n, d) states at ``times`` from x0 at t = 0: Euler–Maruyama, steps ≤ T/4000
        that land on each time."""
        return self._path_sde().euler_maruyama(x0, times, x0.shape[0], generator,
                                               dt=self.t_final / 4000)

    def _path_sde(self) -> SDE:
        """The SDE whose paths :meth:`ensemble` draws: the equation's own coefficients."""
        return _CoefficientSDE(self)

    # --- what a run reports ---------------------------------------------------------------
    def input_normalization(self) -> tuple[Tensor, Tensor]:
        """Shift and scale that bring the inputs (t, x) of a network to O(1)."""
        t = torch.tensor([self.t_final], dtype=self.initial_mean.dtype,
                         device=self.initial_mean.device)
        _, std = self.envelope(t)
        one = torch.ones(1, dtype=t.dtype, device=t.device)
        shift = torch.cat([0.5 * self.t_final * one, self.initial_mean])
        scale = torch.cat([0.5 * self.t_final * one, std[0].expand(self.dim)])
        return shift, scale

    @torch.no_grad()
    def evaluate(self, ansatz: torch.nn.Module, n_points: int = 4096, seed: int = 1234,
                 quick: bool = False) -> dict[str, float]:
        """Errors against the exact solution, at each eval time: on points drawn from it, and
        on the regular grid of solution.npz (:meth:`grid_errors`).

        On points from the exact law: ``rel_l2_error`` (of p) and ``rel_l2_log_error`` (of
        log p, meaningful in high d); they weigh the error by p itself, so they cannot see mass
        where p has none: the grid errors can. The worst over the eval times has no suffix;
        per-time values carry ``_t{t}``. Moments come from the ansatz's closed forms, else by
        self-normalized importance sampling. ``quick`` (the trainer's live line): no moments,
        and grid errors only where the solution is known in closed form.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        times = torch.tensor(self.eval_times, dtype=dtype, device=device)
        exact = self.exact_moments(times)
        out: dict[str, float] = {}
        if exact is None:
            return out if quick else self.grid_errors(ansatz)
        means, covs = exact
        chols = torch.linalg.cholesky(covs)
        pred_moments = None if quick else ansatz.moments(times)
        worst: dict[str, float] = {}
        for i, t in enumerate(self.eval_times):
            z = torch.randn(n_points, self.dim, generator=gen, dtype=dtype).to(device)
            x = means[i] + z @ chols[i].T
            tt = torch.full((n_points,), t, dtype=dtype, device=device)
            with torch.no_grad():
                log_pred = ansatz.log_density(tt, x)
            log_true = gaussian_log_density(x, means[i], covs[i])
            errs = {"rel_l2_error": relative_l2_from_logs(log_pred, log_true),
                    "rel_l2_log_error": float(torch.linalg.norm(log_pred - log_true)
                                              / torch.linalg.norm(log_true))}
            if not quick:
                if pred_moments is not None:
                    m_hat, c_hat, mass = pred_moments[0][i], pred_moments[1][i], 1.0
                else:
                    # same points under the exact law as the reference: the sampling noise of a
                    # covariance estimate (√(d/n), 0.16 at d = 100) cancels, the bias remains
                    m_hat, c_hat, mass = importance_moments(log_pred, log_true, x)
                    m_ref, c_ref, _ = importance_moments(log_true, log_true, x)
                    m_hat, c_hat = m_hat - m_ref + means[i], c_hat - c_ref + covs[i]
                scale = torch.sqrt(torch.trace(covs[i]))
                errs["mean_rel_error"] = float(torch.linalg.norm(m_hat - means[i]) / scale)
                errs["cov_rel_error"] = float(torch.linalg.norm(c_hat - covs[i]) / torch.linalg.norm(covs[i]))
                std_hat = torch.sqrt(torch.clamp(torch.diagonal(c_hat), min=0))
                std = torch.sqrt(torch.diagonal(covs[i]))
                errs["std_rel_error"] = float((torch.abs(std_hat - std) / std).max())
                errs["mass_error"] = abs(mass - 1.0)
            for k, v in errs.items():
                out[f"{k}_t{t:g}"] = v
                worst[k] = max(worst.get(k, 0.0), v) if np.isfinite(v) else float("nan")
        out.update(worst)
        out.update(self.grid_errors(ansatz))
        return out

    @torch.no_grad()
    def grid_errors(self, ansatz: torch.nn.Module) -> dict[str, float]:
        """Errors on the regular grid of solution.npz (``x``, and ``u`` against ``u_exact``),
        where every point counts alike, so mass far from the solution's cannot hide.

        Per eval time (``_t{t}``) and worst: ``grid_rel_l2_error`` = ‖û − u‖₂/‖u‖₂ over the
        grid's points; ``max_rel_peak_error`` = max|û − u| / max u; ``grid_mass_error``
        (d ≤ 2, where the grid covers the box) = |Σ(û − u)|·hᵈ, the mass the ansatz has too much
        or too little in the box (the same sum for both, so neither the box's edges nor the
        rule count against it). In d ≥ 3 the grid is the (x1, x2) slice through the initial
        mean. Empty when the equation has no reference.
        """
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        x = self.evaluation_points()
        out: dict[str, float] = {}
        worst: dict[str, float] = {}
        for t in self.eval_times:
            ref = self.reference_log_density(t, x)
            if ref is None:
                return {}
            tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)
            u, u_ref = torch.exp(ansatz.log_density(tt, x)), torch.exp(ref)
            diff = u - u_ref
            errs = {"grid_rel_l2_error": float(torch.linalg.norm(diff) / torch.linalg.norm(u_ref)),
                    "max_rel_peak_error": float(diff.abs().max() / u_ref.max())}
            if self.dim <= 2:
                errs["grid_mass_error"] = float(diff.sum().abs()) * self.evaluation_cell()
            for k, v in errs.items():
                out[f"{k}_t{t:g}"] = v
                worst[k] = max(worst.get(k, 0.0), v) if np.isfinite(v) else float("nan")
        out.update(worst)
        return out

    def evaluation_box(self) -> tuple[Tensor, float]:
        """Centre and half-width of the grid of solution.npz: the initial mean ± 4 of the
        envelope's largest std over the eval times."""
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        times = torch.tensor(self.eval_times, dtype=dtype, device=device)
        _, std = self.envelope(times)
        return self.initial_mean, 4.0 * float(std.max())

    def evaluation_cell(self, n_side: int = 64) -> float:
        """hᵈ of the grid of :meth:`evaluation_points` (d ≤ 2; the line has 4·n_side points)."""
        _, half = self.evaluation_box()
        n = 4 * n_side if self.dim == 1 else n_side
        return (2.0 * half / (n - 1)) ** self.dim

    def evaluation_points(self, n_side: int = 64) -> Tensor:
        """The points of solution.npz: a line (d=1), a grid (d=2), else a 2-D slice at the mean."""
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        m, half = self.evaluation_box()
        if self.dim == 1:
            return torch.linspace(float(m[0]) - half, float(m[0]) + half, 4 * n_side,
                                  dtype=dtype, device=device)[:, None]
        g0 = torch.linspace(float(m[0]) - half, float(m[0]) + half, n_side, dtype=dtype, device=device)
        g1 = torch.linspace(float(m[1]) - half, float(m[1]) + half, n_side, dtype=dtype, device=device)
        a, b = torch.meshgrid(g0, g1, indexing="ij")
        x = m.expand(n_side * n_side, self.dim).clone()
        x[:, 0], x[:, 1] = a.reshape(-1), b.reshape(-1)
        return x

    def solution_arrays(self, ansatz: torch.nn.Module) -> dict[str, np.ndarray]:
        """Arrays for solution.npz: t, x, u (and u_exact), plus moment trajectories and (d ≤ 2)
        density frames at ``moment_t`` for the plots."""
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        x = self.evaluation_points()
        times = torch.tensor(self.eval_times, dtype=dtype, device=device)
        arrays: dict[str, np.ndarray] = {"t": times.cpu().numpy(), "x": x.cpu().numpy()}
        with torch.no_grad():
            log_u = torch.stack([ansatz.log_density(torch.full((x.shape[0],), float(t), dtype=dtype,
                                                               device=device), x) for t in times])
            arrays["u"] = torch.exp(log_u).cpu().numpy()
            refs = [self.reference_log_density(float(t), x) for t in times]
            if all(r is not None for r in refs):
                arrays["u_exact"] = torch.exp(torch.stack(refs)).cpu().numpy()
            tm = torch.linspace(0.0, self.t_final, 41, dtype=dtype, device=device)
            exact = self.exact_moments(tm)
            pred = ansatz.moments(tm)
            if pred is None and exact is not None:
                pred = self._sampled_moments(ansatz, tm, exact)
            arrays["moment_t"] = tm.cpu().numpy()
            if pred is not None:
                arrays["mean_pred"] = pred[0].cpu().numpy()
                arrays["std_pred"] = torch.sqrt(torch.diagonal(pred[1], dim1=-2, dim2=-1)).cpu().numpy()
            if exact is not None:
                arrays["mean_exact"] = exact[0].cpu().numpy()
                arrays["std_exact"] = torch.sqrt(torch.diagonal(exact[1], dim1=-2, dim2=-1)).cpu().numpy()
            if self.dim > 2 and hasattr(ansatz, "marginal_log_density"):
                arrays.update(self._marginal_arrays(ansatz, times))
            if self.dim <= 2:  # the density at every moment_t, for plots/density.gif
                frames = [ansatz.log_density(torch.full((x.shape[0],), float(t), dtype=dtype,
                                                        device=device), x) for t in tm]
                arrays["u_frames"] = torch.exp(torch.stack(frames)).float().cpu().numpy()
        return arrays

    def _marginal_arrays(self, ansatz: torch.nn.Module, times: Tensor,
                         n_side: int = 64) -> dict[str, np.ndarray]:
        """The (x1, x2) marginal at each eval time on a grid (a slice misleads in high d),
        predicted and, where the solution is Gaussian, exact."""
        center, std = self.envelope(times)
        half = 4.0 * float(std.max())
        m = self.initial_mean
        axes = [torch.linspace(float(m[k]) - half, float(m[k]) + half, n_side, dtype=m.dtype,
                               device=m.device) for k in (0, 1)]
        a, b = torch.meshgrid(*axes, indexing="ij")
        xm = torch.stack([a.reshape(-1), b.reshape(-1)], -1)
        pred = torch.stack([ansatz.marginal_log_density(float(t), xm, (0, 1)) for t in times])
        out = {"x_marginal": xm.cpu().numpy(), "u_marginal": torch.exp(pred).cpu().numpy()}
        exact = self.exact_moments(times)
        if exact is not None:
            out["u_marginal_exact"] = torch.exp(torch.stack([
                gaussian_log_density(xm, exact[0][i, :2], exact[1][i, :2, :2])
                for i in range(len(times))])).cpu().numpy()
        return out

    def _sampled_moments(self, ansatz: torch.nn.Module, times: Tensor,
                         exact: tuple[Tensor, Tensor], n: int = 2048) -> tuple[Tensor, Tensor]:
        """Moments of an ansatz without closed forms, importance-sampled from the exact law."""
        gen = torch.Generator(device="cpu").manual_seed(99)
        means, covs = [], []
        z = torch.randn(n, self.dim, generator=gen, dtype=times.dtype).to(times.device)
        for i, t in enumerate(times):
            x = exact[0][i] + z @ torch.linalg.cholesky(exact[1][i]).T
            log_pred = ansatz.log_density(torch.full((n,), float(t), dtype=x.dtype,
                                                     device=x.device), x)
            m, c, _ = importance_moments(log_pred, gaussian_log_density(x, exact[0][i], exact[1][i]), x)
            means.append(m)
            covs.append(c)
        return torch.stack(means), torch.stack(covs)
