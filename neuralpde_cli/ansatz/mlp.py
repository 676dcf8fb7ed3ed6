"""Multilayer perceptron ansatz with Taylor-mode second derivatives.

Second derivatives are where PINNs lose their time: the Hessian of the batch sum costs
batch²·d², a loop over dimensions costs d backward passes. Here the network is pushed forward
along a few directions v at once, carrying (value, first directional derivatives, the *sum* of
second directional derivatives) through each layer, so Σ_v vᵀ∇²f v costs one forward pass
whose price grows with the number of directions: d for the exact trace, a handful of probes
for the Hutchinson estimate at large d. ∂ₜℓ and ∇ℓ come from one reverse pass.

Tails. A network's log-density is only as good as its collocation points: beyond them it
extrapolates, and a tanh network extrapolates to a constant, so log p stops falling and a
spurious bump appears far from the mass (7 % of the peak at 10 standard deviations in the 2-D
demo before this ansatz had an envelope). With ``envelope=gaussian`` a density is

    log p(t, x) = log N(x; m(t), L(t)L(t)ᵀ) + c·tanh(f(t, x)/c),

a Gaussian whose mean and Cholesky factor are small learned functions of t, equal to the
initial mean and covariance at t = 0, times a bounded network correction: e^(−c) ≤ p/N ≤ e^c
everywhere, so the tails are Gaussian whatever the network does where it was never trained.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.ansatz.base import DensityAnsatz, hutchinson_directions
from neuralpde_cli.equations.base import (DensityEquation, Ensemble, LogDensityFields,
                                          gaussian_log_density)
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
    #: density equations: ``gaussian``: log p = log N(m(t), Σ(t)) + c·tanh(f/c), the Gaussian's
    #: moments learned (tails bounded by e^c times a Gaussian); ``ensemble``: N(m(t), Σ(t)) fitted
    #: to an Euler–Maruyama ensemble of the SDE and held fixed, the network reading x whitened by
    #: it, log p = log N + φ(t)·min-like(f, c) (φ(0) = 0; p ≤ e^c·N, thinner tails allowed);
    #: ``none``: log p = f; ``auto``: gaussian where the law is Gaussian, ensemble elsewhere.
    envelope: str = "auto"
    #: c, the bound on the network's correction to the envelope in log p (e^c as a factor)
    correction_bound: float = 3.0
    #: width of the small network of t that gives the envelope's mean and covariance
    envelope_width: int = 16


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
ENVELOPES = ("auto", "gaussian", "ensemble", "none")
#: Adam steps fitting an ensemble envelope's moments (a few seconds at most)
ENVELOPE_FIT_STEPS = 1500


def _bounded(c: float) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """a ↦ c·tanh(a/c) with its first two derivatives: ≈ a for |a| ≪ c, never beyond ±c."""
    def g(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.tanh(a / c)
        d1 = 1.0 - h * h
        return c * h, d1, -2.0 * h * d1 / c
    return g


def _capped(c: float) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """a ↦ c − softplus(c − a): ≈ a below c, never above it, unbounded below: a density at most
    e^c times its envelope, free to fall faster (a double well's x⁴ tails under a Gaussian)."""
    def g(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.sigmoid(c - a)
        return c - torch.nn.functional.softplus(c - a), s, -s * (1.0 - s)
    return g


class GaussianEnvelope(torch.nn.Module):
    """N(m(t), Σ(t)) in the form every linear SDE's law has, with learned coefficients:

        m(t) = m₀ + τ·s∘b(τ),   Σ(t) = A(τ) Σ₀ A(τ)ᵀ + t·s∘R(τ)R(τ)ᵀ∘s,   A(τ) = I + τ·F(τ),

    τ = t/T, s the spread the solution reaches (from the equation), R lower triangular with a
    positive diagonal, and b, F, R the outputs of a one-hidden-layer tanh network of τ. So
    Σ(0) = Σ₀ and m(0) = m₀ exactly, Σ(t) is positive definite for any weights, and heat
    (A = I, RRᵀ constant) or Ornstein–Uhlenbeck (A ≈ e^(−θt)) need only smooth outputs. The
    network starts with b = F = 0 and RRᵀ = e^(−4)·I: the envelope starts as p₀ barely
    spreading, and learns its moments from the equation's residual like the network does.
    """

    def __init__(self, mean0: Tensor, cov0: Tensor, t_final: float, spread: Tensor,
                 width: int) -> None:
        super().__init__()
        d = mean0.shape[0]
        self.dim, self.t_final = d, t_final
        self.register_buffer("mean0", mean0)
        self.register_buffer("cov0", cov0)
        self.register_buffer("spread", spread)
        rows, cols = torch.tril_indices(d, d, device=mean0.device)
        self.register_buffer("flat", rows * d + cols)
        self.register_buffer("diagonal", rows == cols)
        self.register_buffer("eye", torch.eye(d, dtype=mean0.dtype, device=mean0.device))
        kw = dict(dtype=mean0.dtype, device=mean0.device)
        self.hidden = torch.nn.Linear(1, width, **kw)
        self.out = torch.nn.Linear(width, d + d * d + rows.shape[0], **kw)
        torch.nn.init.xavier_normal_(self.hidden.weight)
        torch.nn.init.uniform_(self.hidden.bias, -1.0, 1.0)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.out.bias[d + d * d:][self.diagonal] = -2.0

    def moments(self, t: Tensor, rates: bool = False) -> tuple[Tensor, ...]:
        """Mean (N, d) and covariance (N, d, d) at times t (N,); with ``rates`` also their time
        derivatives, in closed form (the envelope's fields then need no second autograd pass)."""
        n, d, k = t.shape[0], self.dim, self.dim * self.dim
        tau = (t / self.t_final).unsqueeze(-1)
        h = torch.tanh(self.hidden(2.0 * tau - 1.0))
        a = self.out(h)
        mean = self.mean0 + self.spread * tau * a[:, :d]
        f = a[:, d:d + k].view(n, d, d)
        grow = self.eye + tau.unsqueeze(-1) * f
        log_r = a[:, d + k:]
        r = self._lower(torch.where(self.diagonal, torch.exp(log_r), log_r))
        tt = t[:, None, None]
        cov = grow @ self.cov0 @ grow.transpose(-1, -2) + tt * (r @ r.transpose(-1, -2))
        if not rates:
            return mean, cov
        # d/dτ through the one hidden layer, then d/dt = (d/dτ)/T
        da = ((1.0 - h * h) * (2.0 * self.hidden.weight[:, 0])) @ self.out.weight.T
        dmean = self.spread * (a[:, :d] + tau * da[:, :d]) / self.t_final
        dgrow = (f + tau.unsqueeze(-1) * da[:, d:d + k].view(n, d, d)) / self.t_final
        dr = self._lower(torch.where(self.diagonal, torch.exp(log_r), 1.0) * da[:, d + k:]) / self.t_final
        b = dgrow @ self.cov0 @ grow.transpose(-1, -2)
        rdr = dr @ r.transpose(-1, -2)
        dcov = b + b.transpose(-1, -2) + r @ r.transpose(-1, -2) + tt * (rdr + rdr.transpose(-1, -2))
        return mean, cov, dmean, dcov

    def fit(self, times: Tensor, means: Tensor, covs: Tensor, steps: int = ENVELOPE_FIT_STEPS) -> float:
        """Fit m(t), Σ(t) to given moments (an ensemble's) and freeze them; returns the final
        misfit (mean Mahalanobis² of the means plus the whitened covariance error²)."""
        chol = torch.linalg.cholesky(covs + 1e-12 * torch.eye(self.dim, dtype=covs.dtype,
                                                             device=covs.device))
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
        for _ in range(steps):
            mean, cov = self.moments(times)
            dm = torch.linalg.solve_triangular(chol, (mean - means).unsqueeze(-1), upper=False)
            a = torch.linalg.solve_triangular(chol, cov - covs, upper=False)
            dc = torch.linalg.solve_triangular(chol, a.transpose(-1, -2), upper=False)
            loss = (dm ** 2).sum((-1, -2)).mean() + (dc ** 2).sum((-1, -2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        self.requires_grad_(False)
        return float(loss.detach())

    def _lower(self, entries: Tensor) -> Tensor:
        """The lower-triangular factor of the growth term, rows scaled by the spread s."""
        n = entries.shape[0]
        r = entries.new_zeros(n, self.dim * self.dim).index_copy(1, self.flat, entries)
        return self.spread.unsqueeze(-1) * r.view(n, self.dim, self.dim)

    def log_density(self, t: Tensor, x: Tensor) -> Tensor:
        """log N(x; m(t), Σ(t)), (N,)."""
        mean, cov = self.moments(t)
        precision, log_det = _spd_inverse(cov)
        y = (x - mean).unsqueeze(-1)
        quad = (y.transpose(-1, -2) @ precision @ y)[:, 0, 0]
        return -0.5 * quad - 0.5 * log_det - 0.5 * self.dim * math.log(2.0 * math.pi)

    def fields(self, t: Tensor, x: Tensor, directions: Tensor) -> LogDensityFields:
        """ℓ = log N, ∂ₜℓ, ∇ℓ and Σ_v vᵀ∇²ℓ v in closed form (P = Σ⁻¹, y = x − m):
        ∇ℓ = −Py, ∂ₜℓ = ṁ·Py + ½(Py)ᵀΣ̇(Py) − ½tr(PΣ̇), Σ_v vᵀ∇²ℓ v = −tr(P Σ_v vvᵀ).
        ``directions`` (k, d) shared or (N, k, d)."""
        mean, cov, dmean, dcov = self.moments(t, rates=True)
        precision, log_det = _spd_inverse(cov)
        py = (precision @ (x - mean).unsqueeze(-1)).squeeze(-1)
        log_p = -0.5 * ((x - mean) * py).sum(-1) - 0.5 * log_det \
            - 0.5 * self.dim * math.log(2.0 * math.pi)
        dt = (dmean * py).sum(-1) + 0.5 * (py.unsqueeze(-2) @ dcov @ py.unsqueeze(-1))[:, 0, 0] \
            - 0.5 * (precision * dcov).sum((-1, -2))
        gram = directions.transpose(-1, -2) @ directions
        return LogDensityFields(log_p, dt, -py, -(precision * gram).sum((-1, -2)))


class TailPrecision(torch.nn.Module):
    """β(t) = softplus(b + v·tanh(W·u + c)) ≥ 0 from the time features u (N, 2), a small
    network of time only; it starts near 0 (softplus(−4) ≈ 0.02)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, width: int = 8) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(2, width, dtype=dtype, device=device)
        self.out = torch.nn.Linear(width, 1, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.constant_(self.out.bias, -4.0)

    def forward(self, u: Tensor) -> Tensor:
        return torch.nn.functional.softplus(self.out(torch.tanh(self.hidden(u)))).squeeze(-1)


def _spd_inverse(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Σ⁻¹ and log det Σ for a batch (N, d, d): cofactors for d ≤ 3 (a few elementwise
    operations, where batched LAPACK calls on tiny matrices cost more than the network), a
    Cholesky factorization above."""
    d = cov.shape[-1]
    if d > 3:
        chol = torch.linalg.cholesky(cov)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.cholesky_inverse(chol), log_det
    if d == 1:
        return 1.0 / cov, torch.log(cov[:, 0, 0])
    if d == 2:
        a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
        det = a * c - b * b
        cof = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2)
        return cof / det[:, None, None], torch.log(det)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2]
    e, f, i = cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]
    c00, c01, c02 = e * i - f * f, c * f - b * i, b * f - c * e
    c11, c12, c22 = a * i - c * c, b * c - a * f, a * e - b * b
    det = a * c00 + b * c01 + c * c02
    cof = torch.stack([torch.stack([c00, c01, c02], -1), torch.stack([c01, c11, c12], -1),
                       torch.stack([c02, c12, c22], -1)], -2)
    return cof / det[:, None, None], torch.log(det)


class MLP(DensityAnsatz):
    """f(normalized inputs) with tanh-like layers; a density (through log p) or a plain field.

    ``input_shift``/``input_scale`` map the raw inputs (t, x) or (x, y) to O(1); they come from
    the equation (its time horizon and the spread of its solution).
    """

    def __init__(self, cfg: MLPConfig, input_shift: Tensor, input_scale: Tensor,
                 has_time: bool, initial: tuple[Tensor, Tensor] | None = None,
                 t_final: float = 1.0, ensemble: Ensemble | None = None) -> None:
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
        check_choice("ansatz.envelope", cfg.envelope, ENVELOPES)
        #: the envelope needs a density equation's initial Gaussian; a field (steady) has none
        self.envelope: GaussianEnvelope | None = None
        #: ensemble envelope: the network reads (warped t, t, x whitened by the envelope)
        self.whiten = cfg.envelope == "ensemble" and has_time and initial is not None
        if self.whiten and ensemble is None:
            raise UserError("ansatz.envelope=ensemble needs the equation's SDE ensemble")
        if cfg.envelope in ("gaussian", "ensemble") and has_time and initial is not None:
            if cfg.output != "log":
                raise UserError(f"ansatz.envelope=gaussian corrects log p; ansatz.output="
                                f"{cfg.output} does not give log p (use ansatz.output=log or "
                                "ansatz.envelope=none)")
            if not 0 < cfg.correction_bound < math.inf or cfg.envelope_width < 1:
                raise UserError(f"ansatz.correction_bound={cfg.correction_bound} must be > 0 and "
                                f"ansatz.envelope_width={cfg.envelope_width} ≥ 1")
            spread = input_scale[1:]
            if self.whiten:
                means, covs = ensemble.moments()
                spread = torch.sqrt(torch.diagonal(covs[-1]))
            self.envelope = GaussianEnvelope(initial[0], initial[1], t_final, spread,
                                             cfg.envelope_width)
            if self.whiten:
                self.envelope_misfit = self.envelope.fit(ensemble.times, means, covs)
                var = torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1)
                #: log of the variance's growth over [0, T]: the warped time's denominator
                self.log_growth = float(torch.log(var.max() / var[0]))
        self.cfg = cfg
        self.has_time = has_time
        self.t_final = t_final
        self.activation = ACTIVATIONS[cfg.activation]
        #: log-densities grow like d: the last layer's scale, and an ensemble envelope's cap
        dim_scale = max(1.0, (input_shift.shape[0] - 1) / 2.0)
        self.output = OUTPUTS[cfg.output] if self.envelope is None else \
            _capped(cfg.correction_bound * dim_scale) if self.whiten \
            else _bounded(cfg.correction_bound)
        self.register_buffer("input_shift", input_shift)
        self.register_buffer("input_scale", input_scale)
        if initial is not None:
            self.register_buffer("initial_mean", initial[0])
            self.register_buffer("initial_cov", initial[1])
            self.register_buffer("initial_precision", torch.linalg.inv(initial[1]))
        self.exact_initial_condition = cfg.hard_ic or self.whiten
        #: scale the last layer so the network's output stays O(1)
        self.output_scale = dim_scale if has_time else 1.0
        n_in = input_shift.shape[0] + (1 if self.whiten else 0)
        #: log Z(t) per time once :meth:`normalize` was called (None: not normalized)
        self._log_masses: dict[float, Tensor] | None = None
        #: β(t) ≥ 0: narrows the tails beyond the collocation points, where a bounded network
        #: goes flat (a double well's log-density falls like −x⁴; a capped correction over a
        #: Gaussian left 4 % of the mass far out in 2-D)
        self.tail = TailPrecision(input_shift.dtype, input_shift.device) if self.whiten else None
        sizes = [n_in] + [cfg.width] * cfg.depth + [1]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, dtype=input_shift.dtype, device=input_shift.device)
            for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            torch.nn.init.xavier_normal_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        if self.envelope is not None:  # start as the envelope alone: no correction
            torch.nn.init.zeros_(self.layers[-1].weight)

    @classmethod
    def for_equation(cls, cfg: MLPConfig, equation: torch.nn.Module) -> "MLP":
        """Inputs normalized by the equation's own scales: (t, x) for a density, (x, y) else."""
        shift, scale = equation.input_normalization()
        if isinstance(equation, DensityEquation):
            if cfg.envelope == "auto":
                cfg = dataclasses.replace(
                    cfg, envelope="gaussian" if equation.gaussian_law() else "ensemble")
            ensemble = equation.ensemble() if cfg.envelope == "ensemble" else None
            return cls(cfg, shift, scale, True, (equation.initial_mean, equation.initial_cov),
                       equation.t_final, ensemble)
        return cls(cfg, shift, scale, False)

    # --- plain evaluation ----------------------------------------------------------------
    def _features(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The network's input from raw (t, x) or (x, y), the factor each raw coordinate's
        direction is scaled by ((n_in,) shared, or (N, n_in) per point), and φ(t) (N,) (the
        correction's time factor, ensemble envelopes only).

        Ensemble envelope: (2w − 1, 2t/T − 1, z/2), z = (x − m(t))/s(t) the point whitened by the
        envelope's mean and per-coordinate std, w = log(v(t)/v(0))/log(v_max/v(0)) the time
        warped by the variance's growth (a narrow start changes fastest at t ≈ 0: in w every
        stretch of growth is resolved alike); φ = 1 − e^(−3w), so p(0) = p₀ exactly."""
        if not self.whiten:
            return (inputs - self.input_shift) / self.input_scale, 1.0 / self.input_scale, None
        t, x = inputs[:, 0], inputs[:, 1:]
        mean, cov = self.envelope.moments(t)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        std = torch.sqrt(var)
        tau = t / self.t_final
        w = torch.log(var.mean(-1) / self.envelope.cov0.diagonal().mean()) / self.log_growth \
            if self.log_growth > 0.1 else tau
        h = torch.cat([(2.0 * w - 1.0)[:, None], (2.0 * tau - 1.0)[:, None], 0.5 * (x - mean) / std], -1)
        zero = torch.zeros_like(t)[:, None]
        factor = torch.cat([zero, zero, 0.5 / std], -1)  # directions: (0, v) ↦ (0, 0, v/2s)
        return h, factor, 1.0 - torch.exp(-3.0 * w)

    def _directions(self, directions: Tensor, factor: Tensor) -> Tensor:
        """Raw-input directions (m, n_raw) or (N, m, n_raw) in the network's input space."""
        if not self.whiten:
            return directions * factor
        d = directions[..., 1:]
        if d.dim() == 2:
            d = d.unsqueeze(0).expand(factor.shape[0], *d.shape)
        pad = d.new_zeros(*d.shape[:-1], 2)
        return torch.cat([pad, d], -1) * factor.unsqueeze(-2)

    # --- normalization (ensemble envelope) -----------------------------------------------
    def normalize(self) -> None:
        """From now on :meth:`log_density` is divided by Z(t) = E_N[e^(correction)] under the
        envelope N(m(t), Σ(t)) (:meth:`log_mass`), computed at each time asked for. The log-space
        residual cannot see a constant per time (it only changes ∂ₜ log Z), so mass is set here;
        called after training (its parameters change Z)."""
        if self.whiten:
            self._log_masses = {}

    def log_mass(self, t: Tensor) -> Tensor:
        """log Z(t) (N,): zero before :meth:`normalize`; else per distinct time, Gauss–Hermite
        nodes (48 per axis, d ≤ 2: exact to ~1e-10 for a smooth correction) or 2¹⁴ fixed normal
        draws (d > 2: a Monte Carlo estimate) under the envelope."""
        if self._log_masses is None:
            return torch.zeros_like(t)
        out = torch.empty_like(t)
        for value in torch.unique(t.detach()).tolist():
            if value not in self._log_masses:
                self._log_masses[value] = self._quadrature_log_mass(value)
            out[t.detach() == value] = self._log_masses[value]
        return out

    @torch.no_grad()
    def _quadrature_log_mass(self, t: float, nodes_1d: int = 48, samples: int = 1 << 14) -> Tensor:
        d = self.envelope.dim
        like = self.envelope.mean0
        if d <= 2:
            z1, w1 = np.polynomial.hermite_e.hermegauss(nodes_1d)
            z = np.stack([g.ravel() for g in np.meshgrid(*([z1] * d), indexing="ij")], -1)
            logw = sum(np.log(g.ravel()) for g in np.meshgrid(*([w1 / w1.sum()] * d), indexing="ij"))
            z, logw = (torch.as_tensor(a, dtype=like.dtype, device=like.device) for a in (z, logw))
        else:
            gen = torch.Generator(device="cpu").manual_seed(7)
            z = torch.randn(samples, d, generator=gen, dtype=like.dtype).to(like.device)
            logw = torch.full((samples,), -math.log(samples), dtype=like.dtype, device=like.device)
        tt = like.new_full((z.shape[0],), t)
        mean, cov = self.envelope.moments(tt[:1])
        x = mean + z @ torch.linalg.cholesky(cov[0]).T
        return torch.logsumexp(logw + self._correction(self._inputs(tt, x)), 0)

    def _correction(self, inputs: Tensor) -> Tensor:
        """log p − log N(envelope) of an ensemble envelope, before normalization:
        φ(t)·(g(f) − β(t)|z|²/2), g capped above, β ≥ 0 a learned narrowing of the tails."""
        h, _, phi = self._features(inputs)
        f = self.output(self._network(h))[0]
        return phi * (f - 0.5 * self.tail(h[:, :2]) * 4.0 * (h[:, 2:] ** 2).sum(-1))

    def forward(self, inputs: Tensor) -> Tensor:
        """The raw network output f at raw inputs (N, n_raw) → (N,)."""
        return self._network(self._features(inputs)[0])

    def _network(self, h: Tensor) -> Tensor:
        """The network output f from its input features h (N, n_in) → (N,)."""
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))[0]
        return self.output_scale * self.layers[-1](h).squeeze(-1)

    def _inputs(self, t: Tensor, x: Tensor) -> Tensor:
        return torch.cat([t.unsqueeze(-1), x], dim=-1)

    def log_density(self, t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.whiten:
            return self.envelope.log_density(t, x) + self._correction(self._inputs(t, x)) \
                - self.log_mass(t)
        out = self.output(self.forward(self._inputs(t, x)))[0]
        if self.envelope is not None:
            base = self.envelope.log_density(t, x)
            return base + ((t / self.t_final) * out if self.cfg.hard_ic else out)
        if self.cfg.hard_ic:
            out = gaussian_log_density(x, self.initial_mean, self.initial_cov) + (t / self.t_final) * out
        return out

    # --- derivatives ---------------------------------------------------------------------
    def taylor(self, inputs: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f, its derivatives along each direction (N, m), and Σ_v vᵀ∇²f v (N,).

        ``directions`` are in raw input space, (m, n_in) shared or (N, m, n_in) per point.
        """
        h, factor, phi = self._features(inputs)
        dh = self._directions(directions, factor)
        h0, dh0 = h, dh
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
        dg, s2g = g1.unsqueeze(-1) * do, g1 * so + g2 * (do * do).sum(-1)
        if phi is None:
            return g, dg, s2g
        # ensemble envelope: φ(t)·(g − β(t)|z|²/2); z = 2·(the x features), so |z|² = 4Σh²,
        # its derivative along a direction 8Σh·dh, its second derivatives summed 8Σdh²
        hx, dhx = h0[:, 2:], dh0[..., 2:]
        beta = self.tail(h0[:, :2])
        q, dq, s2q = 4.0 * (hx * hx).sum(-1), 8.0 * (hx.unsqueeze(-2) * dhx).sum(-1), \
            8.0 * (dhx * dhx).sum((-1, -2))
        b = beta.unsqueeze(-1)
        return phi * (g - 0.5 * beta * q), phi.unsqueeze(-1) * (dg - 0.5 * b * dq), \
            phi * (s2g - 0.5 * beta * s2q)

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
        if self.envelope is not None:  # log N in closed form, plus the (τ-scaled) correction
            base = self.envelope.fields(t, x, vx)
            if not self.cfg.hard_ic or self.whiten:
                return LogDensityFields(base.log_p + f, base.dt_log_p + dt, base.grad + grad,
                                        base.trace_dh + trace)
            tau = t / self.t_final
            return LogDensityFields(base.log_p + tau * f, base.dt_log_p + f / self.t_final + tau * dt,
                                    base.grad + tau.unsqueeze(-1) * grad, base.trace_dh + tau * trace)
        if not self.cfg.hard_ic:
            return LogDensityFields(f, dt, grad, trace)
        tau = t / self.t_final
        log0 = gaussian_log_density(x, self.initial_mean, self.initial_cov)
        grad0 = -(x - self.initial_mean) @ self.initial_precision
        pv = vx @ self.initial_precision
        trace0 = -(pv * vx).sum((-1, -2)) if vx.dim() == 3 else -(pv * vx).sum()
        return LogDensityFields(log0 + tau * f, f / self.t_final + tau * dt,
                                grad0 + tau.unsqueeze(-1) * grad, trace0 + tau * trace)
