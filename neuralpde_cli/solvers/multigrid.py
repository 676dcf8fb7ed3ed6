"""Geometric multigrid for the steady diffusion system, in torch (CPU and CUDA, one code path).

* Coarse operators are Galerkin products Pᵀ A P, computed once per solve from the fine
  coefficients by strided sums; from the second level on they are 9-point stencils.
* Smoothing is multicolour Gauss–Seidel: red–black for the 5-point fine operator, four
  colours (index parities) for the 9-point coarse ones, so it stays a true GS. Post-smoothing
  runs the colours in reverse, so V(ν, ν) is a symmetric preconditioner.
* Prolongation P is operator-dependent (black-box multigrid: it interpolates fluxes, so it
  follows κ's jumps; bilinear for constant κ), restriction is Pᵀ, and the coarsest grid is
  solved with a dense inverse computed at setup.
* ``fmg`` starts every level from the interpolated coarser solution, so one V-cycle per level
  already reaches discretization accuracy; ``pcg`` uses the V-cycle as a preconditioner for
  (flexible) CG after the same FMG start.

Convergence per V(2,1)-cycle: ≈ 0.1 for constant or smooth κ, ≈ 0.2 for layers, independent of
the grid. A checkerboard's cross points (where T ~ r^0.13 for contrast 100) make V-cycles
slow down as levels are added (≈ 0.4 at 513², 0.7 at 1025² with a 4 × 4 board) while the
two-grid rate stays ≈ 0.15: W-cycles, or better ``pcg`` (≈ 0.15–0.2 per iteration at 1025²),
remove that, so ``pcg`` is the choice for rough κ.

The differentiable solve (:meth:`MultigridSolver.solve_differentiable`) is an autograd
Function whose backward solves the adjoint system Aλ = ∂L/∂T with the same multigrid (A is
symmetric), then takes ∂L/∂κ = −λᵀ(∂A/∂κ)T and ∂L/∂s = λᵀ ∂b/∂s by one autograd pass through
the residual; it never backpropagates through iterations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from neuralpde_cli.equations.diffusion import (NINE_POINT, GridSystem, Stencil, onehot_kernel,
                                               stencil_accumulate, unknown_block)
from neuralpde_cli.errors import UserError, check_choice

CYCLES = ("fmg", "v", "w", "pcg")
STENCIL_MODES = ("auto", "slices", "conv")
#: Gauss–Seidel colour order; (0,0),(1,1) then (1,0),(0,1) is red–black for a 5-point stencil
COLOURS = ((0, 0), (1, 1), (1, 0), (0, 1))
#: stop when this many cycles in a row bring the residual no lower than 0.9 × the best before
#: them: the iteration has reached the rounding floor of its precision (float32: ~1e-4 on fine
#: grids), and further cycles only shuffle rounding errors
STALL_CYCLES = 4


@dataclass
class MultigridConfig:
    name: str = "multigrid"
    #: fmg: full multigrid, then V-cycles; v | w: cycles from the initial guess;
    #: pcg: full multigrid, then V-cycle-preconditioned conjugate gradients
    cycle: str = "pcg"
    pre_smooth: int = 2
    post_smooth: int = 1
    #: V-cycles per level in the full-multigrid pass
    fmg_cycles: int = 1
    #: stop when ‖b − AT‖/‖b‖ ≤ tol, or after max_cycles cycles (the FMG pass counts as one)
    tol: float = 1e-10
    max_cycles: int = 50
    #: how stencils are applied: slices (fused in-place shifted slices, fastest on CPU),
    #: conv (one conv2d gathers the neighbours, fewer kernel launches: fastest on GPU), auto
    stencil: str = "auto"
    #: coarsen while the grid has more than this many nodes per side, then solve densely
    #: (a coarsest grid that still resolves κ's pattern keeps V-cycles fast: 17 for 8 × 8)
    coarsest: int = 17


def allowed_resolutions(up_to: int = 4097) -> list[int]:
    out, n = [], 3
    while n <= up_to:
        out.append(n)
        n = 2 * n - 1
    return out


def prolongation_weights(coef: Tensor, offsets: tuple[tuple[int, int], ...]) -> Tensor:
    """Operator-dependent interpolation weights P[2J + δ, J] as (3, 3, nc, nc), indexed [δ + 1].

    Fine nodes between two coarse nodes along x take the weights of their stencil collapsed
    along y (−Σ west column / Σ centre column), and vice versa; cell centres solve their own
    equation for the interpolated neighbours (Dendy's black-box multigrid). Fluxes, not values,
    are interpolated linearly, so κ jumps that fall between coarse nodes keep a good coarse
    space. For constant κ the weights are exactly bilinear. Nodes on a Dirichlet side (whose
    rows ``coef`` keeps) interpolate along that side from Dirichlet coarse nodes only: a coarse
    correction, zero there, leaves them at zero, while Pᵀ A P couples completely to the
    boundary and full multigrid reproduces the boundary data.
    """
    m, nf, _ = coef.shape
    nc = (nf - 1) // 2 + 1
    a = dict(zip(offsets, coef))
    odd, even = slice(1, nf - 1, 2), slice(0, nf, 2)

    def total(d_list: list[tuple[int, int]], rows: slice, cols: slice) -> Tensor | float:
        parts = [a[d][rows, cols] for d in d_list if d in a]
        return sum(parts[1:], parts[0].clone()) if parts else 0.0

    def collapsed(rows: slice, cols: slice, axis: int) -> tuple[Tensor, Tensor]:
        """Weights towards the lower and the upper coarse neighbour along ``axis``."""
        line = {s: [(s, t) if axis == 0 else (t, s) for t in (-1, 0, 1)] for s in (-1, 0, 1)}
        den = total(line[0], rows, cols)
        fixed = den == 0
        den[fixed] = 1.0
        weights = -total(line[-1], rows, cols) / den, -total(line[1], rows, cols) / den
        for w in weights:
            w[fixed] = 0.5
        return weights

    wx = collapsed(odd, even, 0)                  # nodes (2I+1, 2K): (nc−1, nc)
    wy = collapsed(even, odd, 1)                  # nodes (2I, 2K+1): (nc, nc−1)
    # cell centres (2I+1, 2K+1): e = −Σ_{d≠0} a_d e(p + d) / a_0 with the edge values above
    den = a[(0, 0)][odd, odd]
    pw = coef.new_zeros(3, 3, nc, nc)
    pw[1, 1] = 1.0
    pw[2, 1, :-1], pw[0, 1, 1:] = wx[0], wx[1]
    pw[1, 2, :, :-1], pw[1, 0, :, 1:] = wy[0], wy[1]
    for ci in (0, 1):
        for cj in (0, 1):
            si, sj = 2 * ci - 1, 2 * cj - 1       # direction of the corner from the centre
            edge_x = wx[ci][:, cj:cj + nc - 1]      # x-edge node on the corner's row
            edge_y = wy[cj][ci:ci + nc - 1, :]      # y-edge node on the corner's column
            w = total([(si, sj)], odd, odd) + a[(0, sj)][odd, odd] * edge_x \
                + a[(si, 0)][odd, odd] * edge_y
            # the centre with its corner at (I, K) is the fine node 2J + δ, δ = −(si, sj)
            pw[1 - si, 1 - sj, ci:ci + nc - 1, cj:cj + nc - 1] = -w / den
    return pw


def _coarse_fine(e: int, nc: int, nf: int) -> tuple[slice, slice]:
    """Coarse indices K with fine node 2K + e inside [0, nf), and the matching fine slice."""
    lo, hi = (max(0, -e) + 1) // 2, min(nc - 1, (nf - 1 - e) // 2)
    return slice(lo, hi + 1), slice(2 * lo + e, 2 * hi + e + 1, 2)


def galerkin_coarse(coef: Tensor, offsets: tuple[tuple[int, int], ...], pw: Tensor) -> Tensor:
    """Pᵀ A P as a 9-point stencil (9, nc, nc) from A's stencil (m, nf, nf) and P's weights.

    For each fine offset ε ∈ [−2, 2]² from a coarse node, AP_ε[K] = Σ_d coef_d[2K + ε]·P_{ε+d}[K]
    (strided slices of the fine coefficients), which feeds A_c[D][I] += P_δ[I]·AP_ε[I + D] for
    the pairs δ − 2D = ε. One coarse-sized buffer, no conv over 9 × 9 channels, no padded copy.
    """
    nf, nc = coef.shape[-1], pw.shape[-1]
    ap = coef.new_zeros(nc + 2, nc + 2)              # AP_ε with a ghost layer for the shift by D
    inner = ap[1:-1, 1:-1]
    out = coef.new_zeros(len(NINE_POINT), nc, nc)
    forward = [(c, D) for c, D in enumerate(NINE_POINT) if D > (0, 0) or D == (0, 0)]
    for ei in range(-2, 3):
        for ej in range(-2, 3):
            inner.zero_()
            ki, fi = _coarse_fine(ei, nc, nf)
            kj, fj = _coarse_fine(ej, nc, nf)
            for k, (di, dj) in enumerate(offsets):
                if abs(ei + di) <= 1 and abs(ej + dj) <= 1:
                    inner[ki, kj].addcmul_(coef[k, fi, fj], pw[ei + di + 1, ej + dj + 1, ki, kj])
            for c, (Di, Dj) in forward:
                di, dj = ei + 2 * Di, ej + 2 * Dj       # δ with δ − 2D = ε
                if abs(di) <= 1 and abs(dj) <= 1:
                    out[c].addcmul_(pw[di + 1, dj + 1], ap[1 + Di:1 + Di + nc, 1 + Dj:1 + Dj + nc])
    # Pᵀ A P is symmetric on the unknowns: A_c[−D][I] = A_c[D][I − D]
    for c, (Di, Dj) in forward[1:]:
        back = NINE_POINT.index((-Di, -Dj))
        out[back, max(0, Di):nc + min(0, Di), max(0, Dj):nc + min(0, Dj)] = \
            out[c, max(0, -Di):nc - max(0, Di), max(0, -Dj):nc - max(0, Dj)]
    return out


class _Level:
    """One grid of the hierarchy: its operator, buffers and the Gauss–Seidel colour weights.

    T and r carry a ghost layer (so shifted views never leave the array); everything outside
    the unknown block stays fixed: Dirichlet values in T, zeros in r.
    """

    def __init__(self, stencil: Stencil, neumann: tuple[bool, ...], conv: bool) -> None:
        coef, self.offsets = stencil.coef, stencil.offsets
        self.n = n = coef.shape[-1]
        kw = {"dtype": coef.dtype, "device": coef.device}
        self.coef = coef
        self.block = i0, i1, j0, j1 = unknown_block(n, neumann)
        self.coef_block = coef[:, i0:i1, j0:j1]
        self.T = torch.zeros(n + 2, n + 2, **kw)
        self.r = torch.zeros(n + 2, n + 2, **kw)
        self.b = torch.zeros(n, n, **kw)
        self.T_block = self.T[1 + i0:1 + i1, 1 + j0:1 + j1]
        self.r_block = self.r[1 + i0:1 + i1, 1 + j0:1 + j1]
        self.b_block = self.b[i0:i1, j0:j1]
        self.kernel = onehot_kernel(self.offsets, **kw) if conv else None
        # colour c's update T += D⁻¹ r on its nodes only, as one weight array per colour
        i = torch.arange(i0, i1, device=coef.device)[:, None]
        j = torch.arange(j0, j1, device=coef.device)[None, :]
        inv_diag = 1.0 / self.coef_block[0]
        if len(self.offsets) == 5:                 # no diagonal couplings: red–black
            colours = [(i + j) % 2 == 0, (i + j) % 2 == 1]
        else:
            colours = [(i % 2 == a) & (j % 2 == c) for a, c in COLOURS]
        self.colour_weights = [inv_diag * m for m in colours if bool(m.any())]
        self.dense_inverse: Tensor | None = None
        #: interpolation weights to the next coarser level, (3, 3, nc, nc)
        self.weights: Tensor | None = None

    def smooth(self, sweeps: int, reverse: bool = False) -> None:
        """Multicolour Gauss–Seidel sweeps (colours reversed for post-smoothing).

        Each colour is one full residual and one masked update T += w_c ⊙ r, contiguous
        array operations throughout: stride-2 colour views cost about as much per element
        touched as whole arrays do (no vector loads), so this is the faster form on a CPU
        as well as on a GPU.
        """
        order = self.colour_weights[::-1] if reverse else self.colour_weights
        for _ in range(sweeps):
            for weight in order:
                self.residual()
                self.T_block.addcmul_(weight, self.r_block)

    def residual(self) -> Tensor:
        """r = b − A T on the unknown block (r is zero elsewhere); returns the padded r."""
        self.r_block.copy_(self.b_block)
        stencil_accumulate(self.r_block, self.coef_block, self.offsets, self.T,
                           (self.block[0], self.block[2]), kernel=self.kernel)
        return self.r

    def apply_block(self, v: Tensor, out: Tensor) -> Tensor:
        """out (padded) = A_UU v for a padded v that is zero outside the unknown block."""
        i0, i1, j0, j1 = self.block
        view = out[1 + i0:1 + i1, 1 + j0:1 + j1]
        view.zero_()
        stencil_accumulate(view, self.coef_block, self.offsets, v, (i0, j0), alpha=1.0,
                           kernel=self.kernel)
        return out

    def build_dense_inverse(self) -> None:
        """A_UU⁻¹ on this (coarsest) grid, from A applied to the unit vectors of the block."""
        i0, i1, j0, j1 = self.block
        ni, nj = i1 - i0, j1 - j0
        units = self.T.new_zeros(ni * nj, self.n + 2, self.n + 2)
        k = torch.arange(ni * nj, device=units.device)
        units[k, 1 + i0 + k // nj, 1 + j0 + k % nj] = 1.0
        cols = stencil_accumulate(units.new_zeros(ni * nj, ni, nj), self.coef_block,
                                  self.offsets, units, (i0, j0), alpha=1.0)
        self.dense_inverse = torch.linalg.inv(cols.reshape(ni * nj, ni * nj).T)

    def solve_dense(self) -> None:
        r = self.residual()[1 + self.block[0]:1 + self.block[1], 1 + self.block[2]:1 + self.block[3]]
        self.T_block.add_((self.dense_inverse @ r.reshape(-1)).reshape(r.shape))

    def restrict_to(self, coarse: _Level, src: Tensor) -> None:
        """coarse.b = Pᵀ src for a padded fine array src (zero outside the unknown block)."""
        coarse.b.zero_()
        for di, dj, view in self._fine_views(src, coarse.n):
            coarse.b.addcmul_(self.weights[di + 1, dj + 1], view)

    def add_prolongated(self, coarse: _Level, into: Tensor | None = None) -> None:
        """T (or ``into``, padded) += P T_coarse. A coarse correction is zero on Dirichlet
        nodes, and so is its interpolation there."""
        inner = coarse.T[1:-1, 1:-1]
        for di, dj, view in self._fine_views(self.T if into is None else into, coarse.n):
            view.addcmul_(self.weights[di + 1, dj + 1], inner)

    def interpolate_from(self, coarse: _Level) -> None:
        """T = P T_coarse on the unknowns, Dirichlet values kept (r serves as scratch)."""
        self.r.zero_()
        self.add_prolongated(coarse, into=self.r)
        self.T_block.copy_(self.r_block)
        self.r.zero_()

    @staticmethod
    def _fine_views(pad: Tensor, nc: int):
        """(δ, view of the padded fine array at the nodes 2J + δ) for the nine δ."""
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                yield di, dj, pad[1 + di:2 + di + 2 * (nc - 1):2, 1 + dj:2 + dj + 2 * (nc - 1):2]


class MultigridSolver:
    """Solves a :class:`GridSystem` to a relative residual ``tol`` by V/W/FMG cycles or MG-PCG."""

    def __init__(self, cfg: MultigridConfig) -> None:
        check_choice("optimizer.cycle", cfg.cycle, CYCLES)
        check_choice("optimizer.stencil", cfg.stencil, STENCIL_MODES)
        if cfg.pre_smooth < 0 or cfg.post_smooth < 0 or cfg.pre_smooth + cfg.post_smooth == 0:
            raise UserError(f"optimizer.pre_smooth={cfg.pre_smooth} and optimizer.post_smooth="
                            f"{cfg.post_smooth} must be ≥ 0 and not both 0")
        if cfg.fmg_cycles < 1 or cfg.max_cycles < 1:
            raise UserError(f"optimizer.fmg_cycles={cfg.fmg_cycles} and optimizer.max_cycles="
                            f"{cfg.max_cycles} must be ≥ 1")
        if not cfg.tol > 0:
            raise UserError(f"optimizer.tol={cfg.tol} must be > 0")
        if cfg.coarsest < 3:
            raise UserError(f"optimizer.coarsest={cfg.coarsest} must be ≥ 3")
        self.cfg = cfg

    # --- setup ------------------------------------------------------------------------------
    def check_resolution(self, n: int) -> None:
        """UserError unless n coarsens to the coarsest grid by halving (n = 2^k + 1)."""
        if n < 3 or (n > self.cfg.coarsest and (n - 1) & (n - 2) != 0):
            allowed = ", ".join(str(a) for a in allowed_resolutions() if a >= 17)
            raise UserError(f"resolution {n} is not 2^k+1; allowed: {allowed}, ... (multigrid "
                            f"halves the grid down to optimizer.coarsest={self.cfg.coarsest}, "
                            "which it solves directly; any n from 3 to that works too)")

    def _uses_conv(self, device: torch.device) -> bool:
        return self.cfg.stencil == "conv" or (self.cfg.stencil == "auto" and device.type == "cuda")

    def setup(self, system: GridSystem) -> list[_Level]:
        """The level hierarchy, coarsest first: Galerkin operators, buffers, dense inverse."""
        self.check_resolution(system.n)
        conv = self._uses_conv(system.kappa.device)
        with torch.no_grad():
            # the symmetric operator with Dirichlet rows kept: its Galerkin products stay
            # symmetric, couple completely to the boundary and give interpolation weights on it
            stencil = system.stencil(dirichlet_rows=True)
            levels = [_Level(Stencil(stencil.offsets, stencil.coef.detach()), system.neumann, conv)]
            while levels[-1].n > self.cfg.coarsest:
                fine = levels[-1]
                fine.weights = prolongation_weights(fine.coef, fine.offsets)
                coef = galerkin_coarse(fine.coef, fine.offsets, fine.weights)
                levels.append(_Level(Stencil(NINE_POINT, coef), system.neumann, conv))
            levels.reverse()
            levels[0].build_dense_inverse()
        return levels

    # --- cycles -----------------------------------------------------------------------------
    def _cycle(self, levels: list[_Level], l: int, gamma: int) -> None:
        level = levels[l]
        if l == 0:
            level.solve_dense()
            return
        level.smooth(self.cfg.pre_smooth)
        coarse = levels[l - 1]
        level.restrict_to(coarse, level.residual())
        coarse.T.zero_()
        for _ in range(gamma if l > 1 else 1):
            self._cycle(levels, l - 1, gamma)
        level.add_prolongated(coarse)
        level.smooth(self.cfg.post_smooth, reverse=True)

    def _fmg(self, levels: list[_Level]) -> None:
        """Full multigrid for the finest level's b and Dirichlet values (in its T).

        Level l − 1 solves A T = Pᵀ b with the boundary values injected: the Galerkin problem
        for T = P T_coarse, since P carries the coarse boundary values along each side.
        """
        for l in range(len(levels) - 1, 0, -1):
            fine, coarse = levels[l], levels[l - 1]
            fine.r_block.copy_(fine.b_block)
            fine.restrict_to(coarse, fine.r)
            coarse.T[1:-1, 1:-1].copy_(fine.T[1:-1:2, 1:-1:2])   # boundary values by injection
        levels[0].solve_dense()
        for l in range(1, len(levels)):
            levels[l].interpolate_from(levels[l - 1])
            for _ in range(self.cfg.fmg_cycles):
                self._cycle(levels, l, 1)

    def _pcg(self, levels: list[_Level], record: Any, cycles: int, history: list[dict]) -> None:
        """Flexible CG on the finest level, preconditioned by one V-cycle, from its current T.

        Flexible (Polak–Ribière) β, because V(ν₁, ν₂) with ν₁ ≠ ν₂ is not symmetric. Each
        iteration records the true residual b − A x of its iterate, never CG's recursively
        updated r: the two part once rounding dominates (in float32 the recursion reports
        1e-10 while b − A x stays at 1e-4), and only the true one says what T is worth.
        """
        fine, tol, max_cycles = levels[-1], self.cfg.tol, self.cfg.max_cycles
        x, r, b_saved = fine.T.clone(), fine.residual().clone(), fine.b.clone()
        z, z_old, p, ap = (torch.zeros_like(x) for _ in range(4))

        def dot(u: Tensor, v: Tensor) -> float:
            return float(torch.dot(u.reshape(-1), v.reshape(-1)))

        def precondition(out: Tensor) -> None:
            fine.b.copy_(r[1:-1, 1:-1])
            fine.T.zero_()
            self._cycle(levels, len(levels) - 1, 1)
            out.copy_(fine.T)

        precondition(z)
        p.copy_(z)
        rz = dot(r, z)
        while cycles < max_cycles:
            fine.apply_block(p, ap)
            alpha = rz / dot(p, ap)
            x.add_(p, alpha=alpha)
            r.add_(ap, alpha=-alpha)
            cycles += 1
            if not record(cycles, x) > tol or self._stalled(history):
                break                              # converged, stalled, or NaN (history shows it)
            z, z_old = z_old, z
            precondition(z)
            rz_new = dot(r, z)
            beta = (rz_new - dot(r, z_old)) / rz
            p.mul_(beta).add_(z)
            rz = rz_new
        fine.T.copy_(x)
        fine.b.copy_(b_saved)

    @staticmethod
    def _stalled(history: list[dict]) -> bool:
        rel = [h["rel_residual"] for h in history]
        return len(rel) > STALL_CYCLES and \
            not min(rel[-STALL_CYCLES:]) < 0.9 * min(rel[:-STALL_CYCLES])

    def _iterate(self, levels: list[_Level], b: Tensor, dirichlet: Tensor, T0: Tensor | None,
                 start: float, measure: Callable[[Tensor], float] | None = None
                 ) -> tuple[Tensor, list[dict]]:
        """Solve A_UU T_U = b_U − A_UD g for the load b (n, n) and Dirichlet values g (n, n).

        ``measure(T)`` (T (n, n) with its boundary values) is the relative residual recorded
        and tested against ``tol``; without it, ‖b − A T‖/‖b‖ on the finest level.
        """
        fine, cfg = levels[-1], self.cfg
        fine.b.copy_(b)
        fine.T.zero_()
        fine.T[1:-1, 1:-1].copy_(dirichlet)
        norm_b = float(torch.linalg.vector_norm(fine.residual()))
        norm_b = norm_b if norm_b > 0 else 1.0
        b_saved = fine.b.clone()
        history: list[dict] = []

        def relative(T_pad: Tensor) -> float:
            if measure is not None:
                return measure(T_pad[1:-1, 1:-1])
            if T_pad is not fine.T:  # PCG's iterate (its V-cycles reset fine.T and fine.b)
                fine.T.copy_(T_pad)
                fine.b.copy_(b_saved)
            return float(torch.linalg.vector_norm(fine.residual())) / norm_b

        def record(cycle: int, T_pad: Tensor | None = None) -> float:
            rel = relative(fine.T if T_pad is None else T_pad)
            history.append({"cycle": cycle, "rel_residual": rel,
                            "elapsed_s": time.perf_counter() - start})
            return rel

        cycles = 0
        if cfg.cycle in ("fmg", "pcg"):
            if T0 is None:
                self._fmg(levels)
            else:                                  # FMG on the correction equation A e = r(T0)
                fine.T_block.copy_(T0[fine.block[0]:fine.block[1], fine.block[2]:fine.block[3]])
                guess = fine.T.clone()
                fine.b.copy_(fine.residual()[1:-1, 1:-1])
                fine.T.zero_()
                self._fmg(levels)
                fine.T.add_(guess)
                fine.b.copy_(b)
            cycles = 1
            rel = record(cycles)
        else:
            if T0 is not None:
                fine.T_block.copy_(T0[fine.block[0]:fine.block[1], fine.block[2]:fine.block[3]])
            rel = relative(fine.T)
        if cfg.cycle == "pcg":
            if rel > cfg.tol and cycles < cfg.max_cycles and len(levels) > 1:
                self._pcg(levels, record, cycles, history)
        else:
            gamma = 2 if cfg.cycle == "w" else 1
            while rel > cfg.tol and cycles < cfg.max_cycles and not self._stalled(history):
                self._cycle(levels, len(levels) - 1, gamma)
                cycles += 1
                rel = record(cycles)
        return fine.T[1:-1, 1:-1].clone(), history

    # --- public -----------------------------------------------------------------------------
    def solve(self, system: GridSystem, T0: Tensor | None = None) -> tuple[Tensor, list[dict]]:
        """The discrete solution (n, n), boundary included, and one history dict per cycle.

        ``T0`` (n, n) is a warm start (its Dirichlet entries are ignored); with ``fmg`` and
        ``pcg`` the full-multigrid pass then works on the correction to it. Each cycle's
        ``rel_residual`` is ``system.rel_residual`` of its iterate: the one definition the
        run's summary reports too.
        """
        start = time.perf_counter()
        levels = self.setup(system)
        with torch.no_grad():
            return self._iterate(levels, system.load(), system.dirichlet_values, T0, start,
                                 system.rel_residual)

    def convergence(self, history: list[dict], dtype: torch.dtype) -> dict[str, Any]:
        """Whether the solve met ``tol``, and if not why: the cycle budget, or a residual that
        stalled at the rounding floor of ``dtype``."""
        tol, last = self.cfg.tol, history[-1]["rel_residual"] if history else math.nan
        if last <= tol:
            return {"tolerance_met": True, "stop_reason": f"optimizer.tol={tol:g} reached"}
        if len(history) >= self.cfg.max_cycles:
            why = f"optimizer.max_cycles={self.cfg.max_cycles} reached"
        elif not math.isfinite(last):
            why = "the residual became NaN/Inf"
        else:
            name = str(dtype).replace("torch.", "")
            why = (f"the residual stalled at the rounding floor of {name} (no 10% gain in "
                   f"{STALL_CYCLES} cycles)" + ("; precision=float64 goes lower"
                                                 if dtype != torch.float64 else ""))
        return {"tolerance_met": False,
                "stop_reason": f"optimizer.tol={tol:g} not met: rel_residual {last:.2e}, {why}"}

    def solve_differentiable(self, kappa: Tensor, source: Tensor, template: GridSystem) -> Tensor:
        """T(κ, s) on the grid and boundary of ``template``, differentiable by the adjoint."""
        return _AdjointSolve.apply(kappa, source, self, template)


class _AdjointSolve(torch.autograd.Function):
    """forward: solve A(κ)T = b(s); backward: solve Aλ = ∂L/∂T, then ∂L/∂(κ, s) = ∂(λᵀr)/∂(κ, s)
    with r = b(s) − A(κ)T (λ vanishes on Dirichlet nodes, where T does not depend on κ or s)."""

    @staticmethod
    def forward(ctx: Any, kappa: Tensor, source: Tensor, solver: MultigridSolver,
                template: GridSystem) -> Tensor:
        system = template.with_fields(kappa.detach(), source.detach())
        levels = solver.setup(system)
        T, _ = solver._iterate(levels, system.load(), system.dirichlet_values, None,
                               time.perf_counter())
        ctx.save_for_backward(kappa, source, T)
        ctx.solver, ctx.template, ctx.levels = solver, template, levels
        return T

    @staticmethod
    def backward(ctx: Any, grad_T: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        kappa, source, T = ctx.saved_tensors
        template: GridSystem = ctx.template
        g = (grad_T * template.unknown_mask).contiguous()
        lam, _ = ctx.solver._iterate(ctx.levels, g, torch.zeros_like(g), None, time.perf_counter())
        with torch.enable_grad():
            k = kappa.detach().requires_grad_(True)
            s = source.detach().requires_grad_(True)
            psi = (lam * template.with_fields(k, s).residual(T)).sum()
            grad_k, grad_s = torch.autograd.grad(psi, (k, s))
        return (grad_k if ctx.needs_input_grad[0] else None,
                grad_s if ctx.needs_input_grad[1] else None, None, None)
