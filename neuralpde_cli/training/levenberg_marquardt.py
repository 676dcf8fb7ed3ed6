"""Levenberg–Marquardt: Gauss–Newton steps with adaptive damping, for small least-squares fits.

A space-time residual is badly conditioned (an error early in t propagates to every later t),
and first-order methods crawl through that: L-BFGS leaves the 2-D OU benchmark at 3e-3. Using
the residual's Jacobian, Gauss–Newton converges superlinearly on a zero-residual problem (an
ansatz that can represent the solution). The price is the Jacobian (rows × parameters) and one
dense solve per step, so it is meant for small models such as a mixture's parameter networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

#: damping bounds (relative to the mean curvature) and the factors that adapt it
DAMPING_RANGE = (1e-12, 1e10)
DAMPING_DOWN, DAMPING_UP = 1.0 / 3.0, 4.0


@dataclass
class Residual:
    """Residual values (M,) scaled so the loss is their sum of squares.

    ``through`` and ``pullback``: per-row tensors hᵢ such that row i depends on the parameters
    only through hᵢ, and the map from per-row weights wᵢ (shaped like h) to the rows
    Σⱼwᵢⱼ∂hᵢⱼ/∂θ (M, n). The Jacobian is then one backward pass of the residual (for
    wᵢ = ∂rᵢ/∂hᵢ) plus per-row gradients of the small model behind h, instead of M backward
    passes of the whole residual.
    """

    values: Tensor
    through: tuple[Tensor, ...] = ()
    pullback: Callable[[tuple[Tensor, ...]], Tensor] | None = None


class LevenbergMarquardt(torch.optim.Optimizer):
    """min ½|r(θ)|²: δ = −(JᵀJ + λ·diag(JᵀJ))⁻¹Jᵀr, accepted if the loss falls (λ ÷ 3), else
    retried with λ × 4. With more parameters than rows the same step is solved in row space
    (λ times the mean curvature on the identity). λ is saved with the optimizer's state."""

    def __init__(self, params: Iterable[Tensor], damping: float = 1e-3, tries: int = 12) -> None:
        super().__init__(params, {"lr": 1.0, "damping": damping, "tries": tries})

    def _params(self) -> list[Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    @staticmethod
    def jacobian(res: Residual, params: list[Tensor]) -> Tensor:
        """∂r/∂θ, (M, n)."""
        r = res.values
        m = r.shape[0]
        if res.pullback is not None:
            return res.pullback(torch.autograd.grad(r.sum(), res.through))
        eye = torch.eye(m, dtype=r.dtype, device=r.device)
        grads = torch.autograd.grad(r, params, eye, is_grads_batched=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros(m, *p.shape, dtype=r.dtype,
                                                               device=r.device)).reshape(m, -1)
                          for g, p in zip(grads, params)], 1)

    @torch.no_grad()
    def _solve(self, jac: Tensor, r: Tensor, damping: float) -> Tensor:
        j, r = jac.to(torch.float64), r.to(torch.float64)
        if j.shape[1] <= j.shape[0]:
            a = j.T @ j
            diag = torch.diagonal(a).clamp_min(1e-12 * float(torch.diagonal(a).max().clamp_min(1e-300)))
            return -torch.linalg.solve(a + damping * torch.diag(diag), j.T @ r)
        k = j @ j.T
        scale = float(torch.diagonal(k).mean().clamp_min(1e-300)) * damping
        return -j.T @ torch.linalg.solve(k + scale * torch.eye(k.shape[0], dtype=k.dtype,
                                                                 device=k.device), r)

    @torch.no_grad()
    def _set(self, params: list[Tensor], start: list[Tensor], delta: Tensor) -> None:
        offset = 0
        for p, p0 in zip(params, start):
            p.copy_(p0 + delta[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
            offset += p.numel()

    def step(self, closure: Callable[[], Residual]) -> Tensor:  # type: ignore[override]
        """One accepted step (or none after ``tries`` rejections); returns the loss before it."""
        group = self.param_groups[0]
        params = self._params()
        with torch.enable_grad():
            res = closure()
            loss = res.values.detach().square().sum()
            jac = self.jacobian(res, params)
        r = res.values.detach()
        start = [p.detach().clone() for p in params]
        for _ in range(int(group["tries"])):
            delta = self._solve(jac, r, group["damping"])
            self._set(params, start, delta)
            with torch.no_grad():
                trial = closure().values.square().sum()
            if bool(torch.isfinite(trial)) and trial < loss:
                group["damping"] = max(group["damping"] * DAMPING_DOWN, DAMPING_RANGE[0])
                break
            self._set(params, start, torch.zeros_like(delta))
            group["damping"] = min(group["damping"] * DAMPING_UP, DAMPING_RANGE[1])
        return loss
