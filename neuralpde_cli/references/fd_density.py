r"""Finite-volume reference for the Fokker–Planck equation on a 1-D or 2-D box.

Cell averages pᵢ change by the fluxes through their faces, dpᵢ/dt = −Σ_faces ±F/h, with zero
flux through the box boundary, so Σpᵢhᵈ is conserved to round-off by construction. The flux
along axis a is F = μₐp − ∂ₐ(Dₐₐp) − Σ_{b≠a}∂_b(D_ab p). Writing q = Dₐₐp, the first two terms
are F = vq − ∂ₐq with v = μₐ/Dₐₐ, discretized by Scharfetter–Gummel (exact for constant v and F
between two cell centres; second order, never negative for steep drifts):

    F_{i+½} = [B(−vh) qᵢ − B(vh) q_{i+1}] / h,   B(z) = z/(eᶻ − 1).

Cross terms (correlated noise in 2-D) are central. Time stepping is Crank–Nicolson with a few
half-size implicit-Euler start-up steps (Rannacher), which damp the high-frequency content of
a narrow initial Gaussian that Crank–Nicolson alone would keep ringing. The system matrix is
factored once per step size (scipy.sparse.linalg.splu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.sparse.linalg import splu

from neuralpde_cli.errors import UserError


@dataclass
class FDSolution:
    """Densities (n_t, n₁[, n₂]) at cell centres at the requested times."""

    times: np.ndarray
    centers: list[np.ndarray]
    density: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.array([c[1] - c[0] for c in self.centers])

    @property
    def cell_volume(self) -> float:
        return float(np.prod(self.spacing))

    def points(self) -> np.ndarray:
        """Cell centres (M, d) in the order of ``density[i].ravel()``."""
        mesh = np.meshgrid(*self.centers, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=-1)

    def mass(self) -> np.ndarray:
        return self.density.reshape(len(self.times), -1).sum(-1) * self.cell_volume

    def interpolate(self, index: int, x: np.ndarray) -> np.ndarray:
        """Density at time ``times[index]`` at points x (N, d); linear, zero outside the box."""
        if len(self.centers) == 1:
            return np.interp(x[:, 0], self.centers[0], self.density[index], left=0.0, right=0.0)
        f = RegularGridInterpolator(tuple(self.centers), self.density[index], bounds_error=False,
                                    fill_value=0.0)
        return f(x)


def _bernoulli(z: np.ndarray) -> np.ndarray:
    """B(z) = z/(eᶻ − 1), stable at 0 and for large |z|."""
    small = np.abs(z) < 1e-6
    safe = np.where(small, 1.0, z)
    with np.errstate(over="ignore"):
        return np.where(small, 1.0 - 0.5 * z, safe / np.expm1(safe))


def _coefficients(sde: torch.nn.Module, points: np.ndarray, t: float, dtype: torch.dtype,
                  device: torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    """μ (M, d) and D = SSᵀ (M, d, d) at points (M, d), evaluated where the SDE lives."""
    x = torch.as_tensor(points, dtype=dtype, device=device)
    tt = torch.full((x.shape[0],), t, dtype=dtype, device=device)
    with torch.no_grad():
        mu = sde.drift(tt, x)
        s = sde.diffusion_sqrt(tt, x)
        dmat = s @ s.transpose(-1, -2)
    dmat = dmat.expand(x.shape[0], *dmat.shape[-2:])
    return mu.cpu().numpy(), dmat.cpu().numpy()


def fp_operator(sde: torch.nn.Module, centers: Sequence[np.ndarray], t: float = 0.0,
                dtype: torch.dtype = torch.float64,
                device: torch.device | None = None) -> sp.csc_matrix:
    """The matrix A of dp/dt = A p (cell values in C order); every column sums to zero."""
    shape = tuple(len(c) for c in centers)
    dim = len(shape)
    h = np.array([c[1] - c[0] for c in centers])
    grids = np.meshgrid(*centers, indexing="ij")
    cell_pts = np.stack([g.ravel() for g in grids], -1)
    _, d_cell = _coefficients(sde, cell_pts, t, dtype, device)
    cell_idx = np.arange(cell_pts.shape[0]).reshape(shape)
    rows, cols, vals, div_rows, div_cols, div_vals = [], [], [], [], [], []
    n_faces = 0
    for a in range(dim):
        left = np.take(cell_idx, np.arange(shape[a] - 1), axis=a).ravel()
        right = np.take(cell_idx, np.arange(1, shape[a]), axis=a).ravel()
        face_pts = cell_pts[left].copy()
        face_pts[:, a] += 0.5 * h[a]
        mu_f, d_f = _coefficients(sde, face_pts, t, dtype, device)
        daa = d_f[:, a, a]
        if np.any(daa <= 0) or np.any(d_cell[:, a, a] <= 0):
            raise UserError("the finite-volume reference needs D > 0 throughout its box; "
                            "equation.reference_box reaches where the noise vanishes")
        z = mu_f[:, a] / daa * h[a]
        faces = n_faces + np.arange(left.size)
        rows += [faces, faces]
        cols += [left, right]
        vals += [_bernoulli(-z) * d_cell[left, a, a] / h[a], -_bernoulli(z) * d_cell[right, a, a] / h[a]]
        for b in range(dim):
            if b == a:
                continue
            # −∂_b(D_ab p) at the face: central over the four cells beside it
            for side, sign in ((1, -1.0), (-1, 1.0)):
                for cell in (left, right):
                    cpos = np.stack(np.unravel_index(cell, shape), -1)
                    nb = cpos[:, b] + side
                    ok = (nb >= 0) & (nb < shape[b])
                    npos = cpos[ok].copy()
                    npos[:, b] = nb[ok]
                    ncell = np.ravel_multi_index(tuple(npos.T), shape)
                    rows.append(faces[ok])
                    cols.append(ncell)
                    vals.append(sign * d_cell[ncell, a, b] / (4.0 * h[b]))
        div_rows += [left, right]
        div_cols += [faces, faces]
        div_vals += [np.full(left.size, -1.0 / h[a]), np.full(left.size, 1.0 / h[a])]
        n_faces += left.size
    m = cell_pts.shape[0]
    flux = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n_faces, m))
    div = sp.csr_matrix((np.concatenate(div_vals), (np.concatenate(div_rows),
                                                    np.concatenate(div_cols))), shape=(m, n_faces))
    return (div @ flux).tocsc()


def gaussian_cells(centers: Sequence[np.ndarray], mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """N(mean, cov) at the cell centres, scaled to mass exactly 1 on the grid."""
    grids = np.meshgrid(*centers, indexing="ij")
    x = np.stack([g.ravel() for g in grids], -1) - mean
    prec = np.linalg.inv(cov)
    p = np.exp(-0.5 * np.einsum("ni,ij,nj->n", x, prec, x))
    vol = float(np.prod([c[1] - c[0] for c in centers]))
    return (p / (p.sum() * vol)).reshape(grids[0].shape)


def solve_fp_fd(sde: torch.nn.Module, mean: np.ndarray, cov: np.ndarray, times: Sequence[float],
                box: np.ndarray, cells: int | Sequence[int], dt: float,
                startup: int = 4, dtype: torch.dtype = torch.float64,
                device: torch.device | None = None) -> FDSolution:
    """p at ``times`` from N(mean, cov) on ``box`` ((d, 2): low, high per axis).

    ``cells`` per axis; steps of at most ``dt`` (Crank–Nicolson after ``startup`` implicit-Euler
    half steps) land exactly on every requested time.
    """
    box = np.asarray(box, dtype=float).reshape(-1, 2)
    dim = box.shape[0]
    if dim not in (1, 2):
        raise UserError(f"the finite-volume reference covers dim 1 and 2 (got dim={dim})")
    n = [int(cells)] * dim if np.isscalar(cells) else [int(c) for c in cells]
    if min(n) < 4 or dt <= 0:
        raise UserError(f"reference cells={cells} must be ≥ 4 and dt={dt} > 0")
    centers = [lo + (np.arange(k) + 0.5) * (hi - lo) / k for (lo, hi), k in zip(box, n)]
    p = gaussian_cells(centers, np.asarray(mean, float), np.asarray(cov, float)).ravel()
    eye = sp.identity(p.size, format="csc")
    operator = (fp_operator(sde, centers, 0.0, dtype, device)
                if getattr(sde, "autonomous", False) else None)
    factors: dict[tuple[float, float], object] = {}

    def step(p: np.ndarray, t: float, h: float, theta: float) -> np.ndarray:
        a = operator if operator is not None else fp_operator(sde, centers, t + 0.5 * h, dtype, device)
        key = (round(h, 15), theta)
        if operator is None or key not in factors:
            factors[key] = splu((eye - theta * h * a).tocsc(), permc_spec="MMD_AT_PLUS_A")
        return factors[key].solve(p + (1.0 - theta) * h * (a @ p))

    out, t, first = [], 0.0, startup
    wanted = sorted(float(s) for s in times)
    for target in wanted:
        eps = 1e-12 * max(1.0, target)
        while first > 0 and target - t > eps:
            h = min(0.5 * dt, target - t)
            p, t, first = step(p, t, h, 1.0), t + h, first - 1
        if target - t > eps:
            n_steps = math.ceil((target - t) / dt - 1e-9)
            h = (target - t) / n_steps
            for k in range(n_steps):
                p = step(p, t + k * h, h, 0.5)
        t = target
        out.append(p.reshape(n).copy())
    return FDSolution(np.array(wanted), centers, np.stack(out))
