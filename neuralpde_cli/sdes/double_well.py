"""Double wells: dX = (aX − bX³) dt + σ dW, one coordinate or two coupled."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes.base import SDE


class DoubleWell(SDE):
    """μᵢ = linear·xᵢ − cubic·xᵢ³ (coordinate-wise; 1-D is the classic case), σ = noise·I."""

    #: each coordinate is its own 1-D process: from a product start the law is a product
    independent_coordinates = True

    def __init__(self, dim: int, noise: Tensor, linear: Tensor, cubic: Tensor) -> None:
        super().__init__(dim)
        self.register_buffer("noise", noise)
        self.register_buffer("linear", linear)
        self.register_buffer("cubic", cubic)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear * x - self.cubic * x ** 3

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return (self.linear - 3.0 * self.cubic * x * x).sum(-1)

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.noise.dtype, device=self.noise.device)
        return self.noise / math.sqrt(2.0) * eye


class CoupledDoubleWell(DoubleWell):
    """μ = (linear·x₁ − cubic·x₁³ + c x₂, −x₂ + c x₁) in 2-D: a double well in x₁ pulled by an
    OU x₂."""

    independent_coordinates = False

    def __init__(self, noise: Tensor, coupling: Tensor, linear: Tensor, cubic: Tensor) -> None:
        super().__init__(2, noise, linear, cubic)
        self.register_buffer("coupling", coupling)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        return torch.stack([self.linear * x1 - self.cubic * x1 ** 3 + self.coupling * x2,
                            -x2 + self.coupling * x1], -1)

    def drift_divergence(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear - 1.0 - 3.0 * self.cubic * x[:, 0] ** 2


def single(dim: int, p: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> DoubleWell:
    return DoubleWell(dim, p["noise"], p["linear"], p["cubic"])


def coupled(dim: int, p: dict[str, Tensor], dtype: torch.dtype,
            device: torch.device) -> CoupledDoubleWell:
    if dim != 2:
        raise UserError(f"equation.sde.kind=double_well_2d needs equation.dim=2 (got {dim})")
    return CoupledDoubleWell(p["noise"], p["coupling"], p["linear"], p["cubic"])
