"""Multilayer perceptron ansatz with Taylor-mode second derivatives.

Second derivatives are where PINNs lose their time: the Hessian of the batch sum costs
batch²·d², a loop over dimensions costs d backward passes. Here the network is pushed forward
along a few directions v at once, carrying (value, first directional derivatives, the *sum* of
second directional derivatives) through each layer, so Σ_v vᵀ∇²f v costs one forward pass
whose price grows with the number of directions: d for the exact trace, a handful of probes
for the Hutchinson estimate at large d. ∂ₜℓ and ∇ℓ come from one reverse pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from neuralpde_cli.ansatz.base import DensityAnsatz, hutchinson_directions
from neuralpde_cli.equations.base import DensityEquation, LogDensityFields, gaussian_log_density
from neuralpde_cli.errors import UserError, check_choice


@dataclass
class MLPConfig:
    name: str = "mlp"
    width: int = 32
    depth: int = 2
    activation: str = "tanh"
    #: what the last layer means for a density: ``log`` (ℓ = f) or ``softplus`` (p = softplus f).
    output: str = "log"
    #: build p₀ into the parametrization: ℓ(t, x) = ℓ₀(x) + (t/T)·f(t, x).
    hard_ic: bool = False
    #: 0: exact trace tr(D∇²ℓ); k > 0: Hutchinson estimate with k Rademacher probes.
    probes: int = 0


def _tanh(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h = torch.tanh(a)
    d1 = 1.0 - h * h
    return h, d1, -2.0 * h * d1


def _softplus(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    return torch.nn.functional.softplus(a), s, s * (1.0 - s)


def _silu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    ds = s * (1.0 - s)
    return a * s, s + a * ds, ds * (2.0 + a * (1.0 - 2.0 * s))


def _sin(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h = torch.sin(a)
    return h, torch.cos(a), -h


def _identity(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return a, torch.ones_like(a), torch.zeros_like(a)


def _log_softplus(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sp = torch.nn.functional.softplus(a)
    s = torch.sigmoid(a)
    d1 = s / sp
    return torch.log(sp), d1, d1 * (1.0 - s) - d1 * d1


#: name → elementwise function returning (f, f', f'').
ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    "tanh": _tanh, "softplus": _softplus, "silu": _silu, "sin": _sin,
}
OUTPUTS = {"log": _identity, "softplus": _log_softplus}


class MLP(DensityAnsatz):
    """f(normalized inputs) with tanh-like layers; a density (through log p) or a plain field.

    ``input_shift``/``input_scale`` map the raw inputs (t, x) or (x, y) to O(1); they come from
    the equation (its time horizon and the spread of its solution).
    """

    def __init__(self, cfg: MLPConfig, input_shift: Tensor, input_scale: Tensor,
                 has_time: bool, initial: tuple[Tensor, Tensor] | None = None,
                 t_final: float = 1.0) -> None:
        super().__init__()
        check_choice("ansatz.activation", cfg.activation, ACTIVATIONS)
        check_choice("ansatz.output", cfg.output, OUTPUTS)
        if cfg.width < 1 or cfg.depth < 1:
            raise UserError(f"ansatz.width={cfg.width} and ansatz.depth={cfg.depth} must be ≥ 1")
        if cfg.probes < 0:
            raise UserError(f"ansatz.probes={cfg.probes} must be ≥ 0 (0 = exact trace)")
        if cfg.hard_ic and (cfg.output != "log" or initial is None):
            raise UserError("ansatz.hard_ic=true needs ansatz.output=log and a time-dependent "
                            "density equation")
        self.cfg = cfg
        self.has_time = has_time
        self.t_final = t_final
        self.activation = ACTIVATIONS[cfg.activation]
        self.output = OUTPUTS[cfg.output]
        self.register_buffer("input_shift", input_shift)
        self.register_buffer("input_scale", input_scale)
        if initial is not None:
            self.register_buffer("initial_mean", initial[0])
            self.register_buffer("initial_cov", initial[1])
            self.register_buffer("initial_precision", torch.linalg.inv(initial[1]))
        self.exact_initial_condition = cfg.hard_ic
        #: log-densities grow like d: scale the last layer so the network's output stays O(1)
        self.output_scale = max(1.0, (input_shift.shape[0] - 1) / 2.0) if has_time else 1.0
        n_in = input_shift.shape[0]
        sizes = [n_in] + [cfg.width] * cfg.depth + [1]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, dtype=input_shift.dtype, device=input_shift.device)
            for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            torch.nn.init.xavier_normal_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    @classmethod
    def for_equation(cls, cfg: MLPConfig, equation: torch.nn.Module) -> "MLP":
        """Inputs normalized by the equation's own scales: (t, x) for a density, (x, y) else."""
        shift, scale = equation.input_normalization()
        if isinstance(equation, DensityEquation):
            return cls(cfg, shift, scale, True, (equation.initial_mean, equation.initial_cov),
                       equation.t_final)
        return cls(cfg, shift, scale, False)

    # --- plain evaluation ----------------------------------------------------------------
    def forward(self, inputs: Tensor) -> Tensor:
        """The raw network output f at raw inputs (N, n_in) → (N,)."""
        h = (inputs - self.input_shift) / self.input_scale
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))[0]
        return self.output_scale * self.layers[-1](h).squeeze(-1)

    def _inputs(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.cat([t.unsqueeze(-1), x], dim=-1)

    def log_density(self, t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
        out = self.output(self.forward(self._inputs(t, x)))[0]
        if self.cfg.hard_ic:
            out = gaussian_log_density(x, self.initial_mean, self.initial_cov) + (t / self.t_final) * out
        return out

    # --- derivatives ---------------------------------------------------------------------
    def taylor(self, inputs: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f, its derivatives along each direction (N, m), and Σ_v vᵀ∇²f v (N,).

        ``directions`` are in raw input space, (m, n_in) shared or (N, m, n_in) per point.
        """
        h = (inputs - self.input_shift) / self.input_scale
        dh = directions / self.input_scale
        s2 = None
        for k, layer in enumerate(self.layers):
            a = layer(h)
            da = dh @ layer.weight.T
            s2a = None if s2 is None else s2 @ layer.weight.T
            if k == len(self.layers) - 1:
                h, dh, s2 = (self.output_scale * a, self.output_scale * da,
                             self.output_scale * s2a)
                break
            h, f1, f2 = self.activation(a)
            f1b = f1.unsqueeze(-2)
            curv = f2 * (da * da).sum(-2) if da.dim() == 3 else f2 * (da * da).sum(-2).unsqueeze(0)
            s2 = curv if s2a is None else f1 * s2a + curv
            dh = f1b * da
        if dh.dim() == 2:
            dh = dh.unsqueeze(0).expand(inputs.shape[0], *dh.shape)
        o, do, so = h.squeeze(-1), dh.squeeze(-1), s2.squeeze(-1)
        g, g1, g2 = self.output(o)
        return g, g1.unsqueeze(-1) * do, g1 * so + g2 * (do * do).sum(-1)

    def log_density_fields(self, t: Tensor, x: Tensor, diffusion_sqrt: Tensor, probes: int = 0,
                           generator: torch.Generator | None = None,
                           cond: Tensor | None = None) -> LogDensityFields:
        create_graph = torch.is_grad_enabled()
        n = x.shape[0]
        probes = probes or self.cfg.probes
        vx = hutchinson_directions(diffusion_sqrt, n, probes, generator)
        pad = torch.zeros(*vx.shape[:-1], 1, dtype=vx.dtype, device=vx.device)
        with torch.enable_grad():
            inputs = self._inputs(t, x).detach().requires_grad_(True)
            f, _, trace = self.taylor(inputs, torch.cat([pad, vx], dim=-1))
            grads = torch.autograd.grad(f.sum(), inputs, create_graph=create_graph)[0]
        dt, grad = grads[:, 0], grads[:, 1:]
        if not self.cfg.hard_ic:
            return LogDensityFields(f, dt, grad, trace)
        tau = t / self.t_final
        log0 = gaussian_log_density(x, self.initial_mean, self.initial_cov)
        grad0 = -(x - self.initial_mean) @ self.initial_precision
        pv = vx @ self.initial_precision
        trace0 = -(pv * vx).sum((-1, -2)) if vx.dim() == 3 else -(pv * vx).sum()
        return LogDensityFields(log0 + tau * f, f / self.t_final + tau * dt,
                                grad0 + tau.unsqueeze(-1) * grad, trace0 + tau * trace)
