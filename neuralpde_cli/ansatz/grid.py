"""The grid ansatz: the node values of T themselves are the parameters.

Only the unknowns (non-Dirichlet nodes, a rectangular block) are trainable; :meth:`values`
inserts the fixed Dirichlet values around them, so boundary conditions hold exactly and the
gradient of the energy loss is exactly minus the discrete residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from neuralpde_cli.equations.diffusion import GridSystem, SteadyDiffusion
from neuralpde_cli.errors import UserError, check_choice

INITS = ("zeros", "boundary_mean")
LOSSES = ("energy", "residual")


@dataclass
class GridConfig:
    name: str = "grid"
    #: nodes per side, boundary included (2^k + 1 for multigrid and coarse-to-fine chains)
    resolution: int = 129
    #: zeros | boundary_mean (the mean Dirichlet value everywhere)
    init: str = "zeros"
    #: energy: ½TᵀAT − bᵀT (condition number κ(A), not κ(A)²); residual: mean squared
    #: pointwise residual (∇·κ∇T + s)², the classic choice
    loss: str = "energy"


class GridAnsatz(torch.nn.Module):
    """T on an n × n node grid; the interior (non-Dirichlet) values are the parameter."""

    def __init__(self, cfg: GridConfig, system: GridSystem) -> None:
        super().__init__()
        check_choice("ansatz.init", cfg.init, INITS)
        check_choice("ansatz.loss", cfg.loss, LOSSES)
        self.cfg, self.system = cfg, system
        i0, i1, j0, j1 = system.block
        start = system.kappa.new_zeros(i1 - i0, j1 - j0)
        if cfg.init == "boundary_mean":
            start += system.dirichlet_values[system.dirichlet_mask].mean()
        self.interior = torch.nn.Parameter(start)

    @classmethod
    def for_equation(cls, cfg: GridConfig, equation: SteadyDiffusion) -> GridAnsatz:
        if cfg.resolution < 3:
            raise UserError(f"ansatz.resolution={cfg.resolution} must be ≥ 3 (nodes per side, "
                            "boundary included)")
        return cls(cfg, equation.discretize(cfg.resolution))

    @property
    def resolution(self) -> int:
        return self.system.n

    def values(self) -> Tensor:
        """The full (n, n) grid: Dirichlet values on fixed nodes, the parameter elsewhere."""
        i0, i1, j0, j1 = self.system.block
        out = self.system.dirichlet_values.clone()
        out[i0:i1, j0:j1] = self.interior
        return out

    def forward(self) -> Tensor:
        return self.values()

    @torch.no_grad()
    def set_values(self, values: Tensor) -> None:
        """Take the unknowns from a full (n, n) grid on this ansatz's own nodes."""
        i0, i1, j0, j1 = self.system.block
        self.interior.copy_(values[i0:i1, j0:j1])

    @torch.no_grad()
    def warm_start_from(self, values: Tensor) -> None:
        """Set the unknowns from any (m, m') node grid over the same domain (bilinear).

        On nested 2^k + 1 grids this is exactly the multigrid prolongation for smooth κ.
        """
        if values.dim() != 2 or min(values.shape) < 2:
            raise UserError(f"warm start values have shape {tuple(values.shape)}; need a 2-D "
                            "node grid with at least 2 nodes per side")
        n = self.system.n
        grid = F.interpolate(values.to(self.interior)[None, None], size=(n, n), mode="bilinear",
                             align_corners=True)[0, 0]
        i0, i1, j0, j1 = self.system.block
        self.interior.copy_(grid[i0:i1, j0:j1])

    def loss_terms(self, system: GridSystem | None = None, loss: str | None = None) -> dict[str, Tensor]:
        """{"pde": loss} for gradient training; ``loss`` defaults to the config's choice.

        The energy is negative at its minimum (−½bᵀA⁻¹b), so a log-scale loss plot shows only
        the residual loss; for the energy its gradient (−residual), not its value, matters.
        """
        system = self.system if system is None else system
        loss = self.cfg.loss if loss is None else loss
        check_choice("ansatz.loss", loss, LOSSES)
        T = self.values()
        if loss == "energy":
            return {"pde": system.energy(T)}
        r = system.pointwise_residual(T)[system.unknown_mask]
        return {"pde": (r * r).mean()}
