r"""The Fokker–Planck equation of an SDE from :mod:`neuralpde_cli.sdes`.

∂p/∂t = −Σᵢ∂ᵢ(μᵢp) + Σᵢⱼ∂ᵢ∂ⱼ(Dᵢⱼp), D = ½σσᵀ, from a Gaussian N(m₀, Σ₀) or a point mass δ(x − x₀)
represented as N(x₀, w²I). Linear SDEs (OU, Brownian with drift) have Gaussian solutions with
exact moments; for the others in 1-D and 2-D the reference is the project's finite-volume
solver (:mod:`neuralpde_cli.references.fd_density`), and runs report the L1 distance to it.

A jump diffusion (Merton, Bates: :mod:`neuralpde_cli.sdes.jumps`) adds λ(E p(x − J) − p): the
equation's operators are the diffusion's (what the time march integrates), and its law is the
diffusion's convolved with the Poisson number of jumps by t. The reference is built the same
way from the diffusion's exact Gaussian law (closed form) or its finite-volume law (shifted and
summed over the jump sizes).
"""

from __future__ import annotations

import dataclasses
import logging
import math

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.equations.base import DensityEquation, gaussian_log_density, initial_gaussian
from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.references.fd_density import FDSolution, solve_fp_fd
from neuralpde_cli.sdes import SDEConfig, build_sde

INITIALS = ("gaussian", "point")


log = logging.getLogger(__name__)

#: finite-volume cells across one initial standard deviation that the 1-D reference aims for
REFERENCE_CELLS_PER_STD = 4.0


@dataclass
class FokkerPlanckConfig:
    name: str = "fokker_planck"
    dim: int = 2
    t_final: float = 5.0
    #: the default is the 2-D OU benchmark: non-symmetric θ, correlated σ
    sde: SDEConfig = field(default_factory=SDEConfig)
    #: gaussian: N(initial_mean, Σ₀); point: δ(x − initial_mean) as N(initial_mean, point_width² I)
    initial: str = "gaussian"
    #: empty: the origin
    initial_mean: list[float] = field(default_factory=list)
    initial_std: float = 0.05
    #: Σ₀ = std²((1 − ρ)I + ρ11ᵀ), unless ``initial_cov`` is given in full
    initial_correlation: float = 0.0
    initial_cov: list[list[float]] = field(default_factory=list)
    point_width: float = 0.05
    eval_times: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0, 2.0, 5.0])
    #: finite-volume reference (non-Gaussian cases, dim ≤ 2): cells per axis (0: 1000 in 1-D,
    #: 120 in 2-D), box [low, high] per axis flattened (empty: from Euler–Maruyama paths),
    #: time step (0: t_final/1000 in 1-D, t_final/500 in 2-D)
    reference_cells: int = 0
    reference_box: list[float] = field(default_factory=list)
    reference_dt: float = 0.0


class FokkerPlanck(DensityEquation):
    """∂p/∂t = −∇·(μp) + ∇∇:(Dp) with μ, D from the configured SDE (a submodule)."""

    def __init__(self, cfg: FokkerPlanckConfig, dtype: torch.dtype, device: torch.device) -> None:
        if cfg.dim < 1:
            raise UserError(f"equation.dim={cfg.dim} must be an integer ≥ 1")
        if cfg.t_final <= 0:
            raise UserError(f"equation.t_final={cfg.t_final} must be > 0")
        check_choice("equation.initial", cfg.initial, INITIALS)
        if cfg.initial == "point":
            if cfg.point_width <= 0:
                raise UserError(f"equation.point_width={cfg.point_width} must be > 0")
            mean, cov = initial_gaussian(cfg.dim, cfg.initial_mean, cfg.point_width, 0.0, [],
                                         dtype, device)
        else:
            mean, cov = initial_gaussian(cfg.dim, cfg.initial_mean, cfg.initial_std,
                                         cfg.initial_correlation, cfg.initial_cov, dtype, device)
        if cfg.reference_cells < 0 or cfg.reference_dt < 0:
            raise UserError(f"equation.reference_cells={cfg.reference_cells} and reference_dt="
                            f"{cfg.reference_dt} must be ≥ 0 (0: automatic)")
        if cfg.reference_box and len(cfg.reference_box) != 2 * cfg.dim:
            raise UserError(f"equation.reference_box has {len(cfg.reference_box)} numbers; dim="
                            f"{cfg.dim} needs {2 * cfg.dim} (low, high per axis) or none")
        super().__init__(cfg.dim, cfg.t_final, mean, cov, cfg.eval_times)
        self.cfg = cfg
        self.sde = build_sde(cfg.sde, cfg.dim, dtype, device)
        self.constant_diffusion = self.sde.constant_diffusion
        bounds = self.lower_bounds()
        low = [i for i, b in enumerate(bounds) if b is not None and float(mean[i]) <= b]
        if low:
            raise UserError(f"equation.initial_mean={mean.tolist()}: coordinate {low[0]} must lie "
                            f"above {bounds[low[0]]:g} for sde.kind={cfg.sde.kind}")
        self._references: dict[tuple[float, ...], FDSolution] = {}
        self._samples: np.ndarray | None = None
        self._factors: list[FokkerPlanck] | None = None
        #: a jump diffusion's jumps (None: a diffusion); the operators are the diffusion's
        self.jumps = getattr(self.sde, "jumps", None)

    # --- coefficients: the SDE's, autograd where it has no closed form ---------------------
    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.sde.drift(t, x)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        return self.sde.diffusion_sqrt(t, x)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        closed = self.sde.drift_divergence(t, x)
        return closed if closed is not None else super().drift_divergence(t, x)

    def diffusion_divergences(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        closed = None if self.constant_diffusion else self.sde.diffusion_divergences(t, x)
        return closed if closed is not None else super().diffusion_divergences(t, x)

    def lower_bounds(self) -> list[float | None]:
        """Each coordinate's lower end of the state space (CIR, GBM: 0 in every coordinate;
        Heston: 0 for V), or None."""
        positive = set(getattr(self.sde, "positive_dims", ()))
        return [0.0 if i in positive else self.sde.lower_bound for i in range(self.dim)]

    # --- exact solution and references ------------------------------------------------------
    def exact_moments(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        return self.sde.exact_moments(t, self.initial_mean, self.initial_cov)

    def envelope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The exact mean and largest std when the solution is Gaussian, else the default."""
        exact = self.exact_moments(t)
        if exact is None:
            return super().envelope(t)
        return exact[0], torch.sqrt(torch.linalg.eigvalsh(exact[1])[:, -1:])

    def reference_box(self) -> np.ndarray:
        """(d, 2) box of the finite-volume reference: configured, or from 4000 EM paths.

        The sample range over the eval times (and t_final) is widened by half its width on
        each side; a bound of the state space (CIR, GBM) is approached only halfway.
        """
        if self.cfg.reference_box:
            return np.asarray(self.cfg.reference_box, dtype=float).reshape(self.dim, 2)
        samples = self._path_samples()
        lo, hi = samples.min(0), samples.max(0)
        width = hi - lo
        lo, hi = lo - 0.5 * width, hi + 0.5 * width
        for i, bound in enumerate(self.lower_bounds()):
            if bound is not None:
                lo[i] = max(lo[i], bound + 0.5 * (samples[:, i].min() - bound))
        return np.stack([lo, hi], -1)

    def _path_samples(self) -> np.ndarray:
        """4000 Euler–Maruyama paths at the eval times and t_final, with their starts, as one
        (n, d) array (seeded, computed once): where the solution lives."""
        if self._samples is None:
            gen = torch.Generator(device="cpu").manual_seed(4321)
            dtype = self.initial_mean.dtype
            times = torch.tensor(sorted(set(self.eval_times) | {self.t_final}), dtype=dtype)
            z = torch.randn(4000, self.dim, generator=gen, dtype=dtype).to(self.initial_mean.device)
            x0 = self.initial_mean + z @ torch.linalg.cholesky(self.initial_cov).T
            with torch.no_grad():
                paths = self.sde.euler_maruyama(x0, times.to(x0.device), 4000, gen,
                                                dt=min(1e-2, self.t_final / 500)).cpu().numpy()
            self._samples = np.concatenate([paths.reshape(-1, self.dim), x0.cpu().numpy()])
        return self._samples

    def _path_sde(self) -> torch.nn.Module:
        """The configured SDE itself: its Euler–Maruyama keeps bounded coordinates in their
        domain and draws jumps."""
        return self.sde

    def evaluation_box(self) -> tuple[Tensor, float]:
        """The grid of solution.npz: for a law without exact moments (d ≤ 2, or a product law),
        the 0.05 % to 99.95 % range of Euler–Maruyama paths over the eval times, widened by a
        fifth (a
        spread estimated at the initial mean misses drift and state-dependent noise: GBM's
        t = 1 density lies far right of it); else the default."""
        if self.gaussian_law() or (self.dim > 2 and self.product_factors() is None):
            return super().evaluation_box()
        lo, hi = np.quantile(self._path_samples(), [0.0005, 0.9995], axis=0)
        centre = torch.as_tensor(0.5 * (lo + hi), dtype=self.initial_mean.dtype,
                                 device=self.initial_mean.device)
        return centre, 0.6 * float((hi - lo).max())

    def _diffusion_moments(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """The exact Gaussian moments of the diffusion part (without jumps), where it has them."""
        diffusion = getattr(self.sde, "diffusion", self.sde)
        return diffusion.exact_moments(t, self.initial_mean, self.initial_cov)

    def fd_reference(self, times: list[float] | None = None) -> FDSolution | None:
        """The finite-volume solution at ``times`` (default: the eval times), cached; None when
        the solution (its diffusion part, with jumps) is Gaussian (exact moments exist) or
        dim > 2."""
        if self.dim > 2 or self._diffusion_moments(self.initial_mean.new_zeros(1)) is not None:
            return None
        key = tuple(sorted(float(t) for t in (times if times is not None else self.eval_times)))
        if key not in self._references:
            one_d = self.dim == 1
            box = self.reference_box()
            cells = self.cfg.reference_cells or self._auto_cells(box)
            self._check_resolution(box, cells)
            dt = self.cfg.reference_dt or self.t_final / (1000 if one_d else 500)
            self._references[key] = solve_fp_fd(
                self.sde, self.initial_mean.cpu().numpy(), self.initial_cov.cpu().numpy(), key,
                box, cells, dt, dtype=self.initial_mean.dtype,
                device=self.initial_mean.device)
        return self._references[key]

    def _initial_std_min(self) -> float:
        return float(torch.linalg.eigvalsh(self.initial_cov)[0].sqrt())

    def _auto_cells(self, box: np.ndarray) -> int:
        """1-D: enough cells for REFERENCE_CELLS_PER_STD across the initial density (a process
        that spreads far, like GBM, needs a long box), within [1000, 20000]; 2-D: 120."""
        if self.dim > 1:
            return 120
        need = REFERENCE_CELLS_PER_STD * float(box[0, 1] - box[0, 0]) / self._initial_std_min()
        return int(min(max(1000, math.ceil(need)), 20000))

    def _check_resolution(self, box: np.ndarray, cells: int) -> None:
        """Warn when the reference cannot resolve the initial density: its L1 figures would
        measure the reference's error, not the solution's."""
        h = float((box[:, 1] - box[:, 0]).max()) / cells
        per_std = self._initial_std_min() / h
        if per_std < 2.0:
            log.warning("the finite-volume reference has %.2g cells per initial std (h = %.3g): "
                        "its L1 errors are not reliable; set equation.reference_cells higher or "
                        "equation.reference_box narrower", per_std, h)

    def _diffusion_density(self, t: float, x: np.ndarray) -> np.ndarray | None:
        """The diffusion part's density at x (N, d): exact Gaussian, or the finite-volume
        solution linearly interpolated (None: neither exists)."""
        like = self.initial_mean
        moments = self._diffusion_moments(torch.tensor([t], dtype=like.dtype, device=like.device))
        if moments is not None:
            points = torch.as_tensor(x, dtype=like.dtype, device=like.device)
            return torch.exp(gaussian_log_density(points, moments[0][0], moments[1][0])).cpu().numpy()
        times = self.eval_times if any(abs(t - s) < 1e-12 for s in self.eval_times) else [t]
        sol = self.fd_reference(times)
        if sol is None:
            return None
        return sol.interpolate(int(np.argmin(np.abs(sol.times - t))), x)

    def jump_density(self, t: float, x: np.ndarray) -> np.ndarray | None:
        """p(t, x) of a jump diffusion: Σₙ Pois(n; λt) E p_diff(t, x − (J₁ + … + Jₙ)). With a
        Gaussian diffusion part (Merton) in closed form, Σₙ Pois(n; λt) N(x; m + n·m_J,
        C + n·S_J); else the finite-volume law shifted along the jump's axis, the n jumps' sum
        N(n·m_J, n·s_J²) integrated by the trapezoid on ±8 SD at half a cell or finer."""
        jumps, like = self.jumps, self.initial_mean
        tt = torch.tensor([t], dtype=like.dtype, device=like.device)
        terms = jumps.terms(tt)
        poisson = torch.exp(jumps.log_weights(tt, terms))[0]
        moments = self._diffusion_moments(tt)
        if moments is not None:
            points = torch.as_tensor(x, dtype=like.dtype, device=like.device)
            total = sum(poisson[n] * torch.exp(gaussian_log_density(
                points, moments[0][0] + n * jumps.mean, moments[1][0] + n * jumps.cov))
                for n in range(terms + 1))
            return total.cpu().numpy()
        mean = jumps.mean.detach().cpu().numpy()
        axis = [i for i in jumps.dims if jumps.cov[i, i] > 0]
        if len(axis) != 1:
            raise UserError("the reference convolves jumps along one coordinate")
        i = axis[0]
        std = math.sqrt(float(jumps.cov[i, i]))
        sol = self.fd_reference()
        cell = float(sol.centers[i][1] - sol.centers[i][0]) if sol is not None else std / 8
        total = np.zeros(x.shape[0])
        for n, w_n in enumerate(poisson.tolist()):
            if n == 0:
                part = self._diffusion_density(t, x)
                if part is None:
                    return None
                total += w_n * part
                continue
            spread = math.sqrt(n) * std
            count = int(max(65, math.ceil(16.0 * spread / (0.5 * cell)) + 1))
            z = np.linspace(-8.0, 8.0, count)
            weights = np.exp(-0.5 * z * z)
            weights /= weights.sum()
            for zq, wq in zip(z, weights):
                shift = n * mean.copy()
                shift[i] += spread * zq
                total += w_n * wq * self._diffusion_density(t, x - shift)
        return total

    # --- a product law in any dimension ---------------------------------------------------
    def product_factors(self) -> list["FokkerPlanck"] | None:
        """One 1-D equation per coordinate when the law is a product of 1-D laws (coordinates
        that do not interact, a start with a diagonal covariance, no jumps), each with its own
        finite-volume reference; None otherwise, or when dim ≤ 2 (the full reference exists)."""
        cov = self.initial_cov
        if self.dim <= 2 or self.jumps is not None \
                or not getattr(self.sde, "independent_coordinates", False) \
                or bool((cov - torch.diag(torch.diagonal(cov))).abs().max() > 0):
            return None
        if self._factors is None:
            factors: dict[tuple[float, float], FokkerPlanck] = {}
            for i in range(self.dim):
                key = (float(self.initial_mean[i]), float(cov[i, i]))
                if key not in factors:
                    cfg = dataclasses.replace(
                        self.cfg, dim=1, initial="gaussian", initial_mean=[key[0]],
                        initial_cov=[[key[1]]], reference_box=[])
                    factors[key] = FokkerPlanck(cfg, cov.dtype, cov.device)
            self._factors = [factors[(float(self.initial_mean[i]), float(cov[i, i]))]
                             for i in range(self.dim)]
        return self._factors

    def _factor_log_density(self, i: int, t: float, xi: np.ndarray) -> np.ndarray:
        sol = self._factors[i].fd_reference()
        index = int(np.argmin(np.abs(sol.times - t)))
        return np.log(np.maximum(sol.interpolate(index, xi[:, None]), 1e-300))

    def _product_log_density(self, t: float, x: Tensor) -> Tensor:
        xs = x.detach().cpu().numpy()
        total = sum(self._factor_log_density(i, t, xs[:, i]) for i in range(self.dim))
        return torch.as_tensor(total, dtype=x.dtype, device=x.device)

    def _product_samples(self, t: float, n: int, rng: np.random.Generator) -> np.ndarray:
        """n draws from the product reference at t: each coordinate by inverting its 1-D CDF."""
        out = np.empty((n, self.dim))
        for i, factor in enumerate(self._factors):
            sol = factor.fd_reference()
            index = int(np.argmin(np.abs(sol.times - t)))
            grid, dens = sol.centers[0], sol.density[index].ravel()
            cdf = np.cumsum(dens)
            out[:, i] = np.interp(rng.random(n) * cdf[-1], cdf, grid)
        return out

    def product_errors(self, ansatz: torch.nn.Module, n_points: int = 4096,
                       n_inner: int = 400, n_grid: int = 61) -> dict[str, float]:
        """Against the product reference at each eval time: ``rel_l2_log_error`` of log p on
        points drawn from the exact law, and ``marginal_l1_error``, the worst over coordinates of
        ∫|p̂ᵢ − pᵢ|, p̂ᵢ(xᵢ) = E[p̂(x)/Πⱼ≠ᵢ pⱼ(xⱼ)] over draws of the other coordinates from their
        exact laws (the marginal of a density no one can sample, without its normalizing
        constant: mass errors count)."""
        if self.product_factors() is None:
            return {}
        rng = np.random.default_rng(1234)
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        out: dict[str, float] = {}
        worst: dict[str, float] = {}
        for t in self.eval_times:
            xs = torch.as_tensor(self._product_samples(t, n_points, rng), dtype=dtype, device=device)
            tt = torch.full((n_points,), t, dtype=dtype, device=device)
            with torch.no_grad():
                log_pred = ansatz.log_density(tt, xs)
            log_true = self._product_log_density(t, xs)
            errs = {"rel_l2_log_error": float(torch.linalg.norm(log_pred - log_true)
                                              / torch.linalg.norm(log_true))}
            inner = self._product_samples(t, n_inner, rng)
            lows, highs = np.quantile(self._product_samples(t, 20000, rng), [1e-4, 1 - 1e-4], axis=0)
            l1 = 0.0
            for i, (lo, hi) in enumerate(zip(lows, highs)):
                grid = np.linspace(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), n_grid)
                pts = np.repeat(inner[None], n_grid, 0)
                pts[:, :, i] = grid[:, None]
                flat = torch.as_tensor(pts.reshape(-1, self.dim), dtype=dtype, device=device)
                others = self._product_log_density(t, flat) - torch.as_tensor(
                    self._factor_log_density(i, t, flat[:, i].cpu().numpy()), dtype=dtype,
                    device=device)
                with torch.no_grad():
                    ratio = torch.exp(ansatz.log_density(torch.full((flat.shape[0],), t, dtype=dtype,
                                                                    device=device), flat) - others)
                p_hat = ratio.reshape(n_grid, n_inner).mean(1).cpu().numpy()
                p_ref = np.exp(self._factor_log_density(i, t, grid))
                l1 = max(l1, float(np.abs(p_hat - p_ref).sum() * (grid[1] - grid[0])))
            errs["marginal_l1_error"] = l1
            for k, v in errs.items():
                out[f"{k}_t{t:g}"] = v
                worst[k] = max(worst.get(k, 0.0), v) if np.isfinite(v) else float("nan")
        out.update(worst)
        return out

    def reference_log_density(self, t: float, x: Tensor) -> Tensor | None:
        """Exact Gaussian when linear; else the finite-volume reference, linearly interpolated;
        with jumps, the diffusion's convolved with them (:meth:`jump_density`)."""
        if self.jumps is None:
            exact = super().reference_log_density(t, x)
            if exact is not None:
                return exact
            if self.product_factors() is not None:
                return self._product_log_density(t, x)
        xs = x.detach().cpu().numpy()
        p = self.jump_density(t, xs) if self.jumps is not None else self._diffusion_density(t, xs)
        return None if p is None else torch.log(torch.as_tensor(
            np.maximum(p, 1e-300), dtype=x.dtype, device=x.device))

    # --- what a run reports ---------------------------------------------------------------
    def evaluate_extra(self, ansatz: torch.nn.Module) -> dict[str, float]:
        """L1 distance to the finite-volume reference (non-Gaussian, dim ≤ 2) at each eval time
        (``l1_error_t{t}``, worst as ``l1_error``), and the ansatz's mass by quadrature
        (``quadrature_mass_error``, dim ≤ 2).

        L1 = Σ|p̂ − p_ref|hᵈ over the reference box plus the ansatz mass missing from the box.
        """
        out: dict[str, float] = {}
        if self.dim > 2:
            return self.product_errors(ansatz) if self.product_factors() is not None else out
        dtype, device = self.initial_mean.dtype, self.initial_mean.device
        sol = self.fd_reference()
        worst_l1, worst_mass = 0.0, 0.0
        for i, t in enumerate(self.eval_times):
            reference = None
            if sol is not None:
                x = torch.as_tensor(sol.points(), dtype=dtype, device=device)
                vol = sol.cell_volume
                reference = sol.density[i].ravel()
            else:
                x, vol = self._quadrature_grid(t)
            if self.jumps is not None:  # the law with its jumps, on the same points
                x, vol = (x, vol) if sol is not None else self._jump_grid()
                reference = self.jump_density(t, x.cpu().numpy())
            with torch.no_grad():
                p_hat = torch.exp(ansatz.log_density(torch.full((x.shape[0],), t, dtype=dtype,
                                                                device=device), x)).cpu().numpy()
            mass = float(p_hat.sum() * vol)
            worst_mass = max(worst_mass, abs(mass - 1.0))
            if reference is not None:
                l1 = float(np.abs(p_hat - reference).sum() * vol) + max(0.0, 1.0 - mass)
                out[f"l1_error_t{t:g}"] = l1
                worst_l1 = max(worst_l1, l1)
        if sol is not None or self.jumps is not None:
            out["l1_error"] = worst_l1
        out["quadrature_mass_error"] = worst_mass
        return out

    def _jump_grid(self, n: int = 4000) -> tuple[Tensor, float]:
        """Midpoints over the reference box (paths with their jumps), for a jump diffusion
        whose diffusion part is Gaussian (1-D: Merton)."""
        box = self.reference_box()
        h = float(box[0, 1] - box[0, 0]) / n
        if self.dim != 1:
            raise UserError("a jump diffusion with a Gaussian diffusion part is checked in 1-D")
        axis = box[0, 0] + (np.arange(n) + 0.5) * h
        return torch.as_tensor(axis[:, None], dtype=self.initial_mean.dtype,
                               device=self.initial_mean.device), h

    def _quadrature_grid(self, t: float, n: int = 256) -> tuple[Tensor, float]:
        """Midpoint grid over the exact mean ± 10 largest stds (spectrally accurate for smooth
        densities whose narrowest width spans a few cells)."""
        tt = torch.tensor([t], dtype=self.initial_mean.dtype, device=self.initial_mean.device)
        mean, std = self.envelope(tt)
        half = 10.0 * float(std[0, 0])
        h = 2.0 * half / n
        axis = (torch.arange(n, dtype=tt.dtype, device=tt.device) + 0.5) * h - half
        mesh = torch.meshgrid(*([axis] * self.dim), indexing="ij")
        x = mean[0] + torch.stack([m.reshape(-1) for m in mesh], -1)
        return x, h ** self.dim
