r"""Gaussian-mixture ansatz: a density by construction, with every derivative in closed form.

p(x) = Σₖ πₖ N(x; mₖ, LₖLₖᵀ), π = softmax(logits), Lₖ lower triangular with a positive diagonal.
The parameters of K components in d dimensions are packed in one flat vector (the *state*):
[logits (K) | means (K·d) | Cholesky entries (K·d(d+1)/2, diagonal stored as log)]. Two
parametrizations produce states: :class:`GaussianMixtureAnsatz` (small networks of t, and of the
start point x₀ for transition densities; trained by gradient descent) and
:class:`MarchedMixture` (a stored trajectory from the time-marching solver, interpolated).
Both hand a state (and its time derivative) to the one implementation of the closed forms in
:class:`MixtureLayout`. With zₖ = Lₖ⁻¹(x − mₖ), vₖ = Lₖ⁻ᵀzₖ and responsibilities rₖ(x):

    ∇ℓ = −Σ rₖvₖ,   tr(D∇²ℓ) = Σ rₖ(|Sᵀvₖ|² − ‖Lₖ⁻¹S‖²_F) − |Sᵀ∇ℓ|²   (D = SSᵀ).

Velocities are expressed in component-relative coordinates: ṁₖ = Lₖbₖ, L̇ₖ = LₖAₖ (Aₖ lower
triangular), logits velocity c. In them ∂ℓ/∂θ·θ̇ is

    Σⱼ(rⱼ − πⱼ)cⱼ + Σₖ rₖ(zₖᵀbₖ + zₖᵀAₖzₖ − tr Aₖ),

Hermite polynomials of zₖ: nearly orthogonal under p, which keeps the time-marching
least-squares system scale-free (a narrow start and a wide end look alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from neuralpde_cli.ansatz.base import DensityAnsatz
from neuralpde_cli.equations.base import LogDensityFields
from neuralpde_cli.errors import UserError


@dataclass
class GMMConfig:
    name: str = "gmm"
    components: int = 1
    hidden: int = 32
    depth: int = 2
    #: K > 1: at t = 0 the components sit at m₀ + split·sₖ·L₀e₁ (sₖ evenly spaced, unit variance)
    #: with covariance L₀diag(1 − split², 1, …)L₀ᵀ: the mixture keeps p₀'s mean and covariance
    #: exactly and differs from p₀ by O(split⁴); identical components would make the
    #: time-marching system singular.
    split: float = 0.1
    #: model the transition density p(t, x | x₀): x₀ (and ``extra_conditions`` more inputs,
    #: e.g. equation parameters) is the ``cond`` argument; p(0, · | x₀) = N(x₀, Σ₀)
    condition_on_x0: bool = False
    extra_conditions: int = 0


class MixtureEval(NamedTuple):
    """A mixture evaluated at points: P parameter sets, N points each."""

    log_p: Tensor  # (P, N)
    resp: Tensor  # responsibilities (P, K, N)
    z: Tensor  # whitened points Lₖ⁻¹(x − mₖ), (P, K, N, d)
    v: Tensor  # Lₖ⁻ᵀzₖ = −∇ log N(x; mₖ, Σₖ), (P, K, N, d)
    chol: Tensor  # (P, K, d, d)
    weights: Tensor  # π, (P, K)


class MixtureLayout(torch.nn.Module):
    """Packing of K full-covariance Gaussians in d dimensions and the closed forms on a state.

    Shapes: a state is (P, n); points are (P, N, d) (N points per parameter set). Index
    tensors for the triangular entries are buffers built once.
    """

    def __init__(self, dim: int, components: int, device: torch.device | None = None) -> None:
        super().__init__()
        rows, cols = torch.tril_indices(dim, dim, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("flat_index", rows * dim + cols, persistent=False)
        self.register_buffer("diag_mask", rows == cols, persistent=False)
        self.dim, self.components, self.n_tril = dim, components, int(rows.numel())
        self.size = components * (1 + dim + self.n_tril)

    # --- packing ---------------------------------------------------------------------------
    def unpack(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits (P, K), means (P, K, d), Cholesky entries (P, K, T) of a state (P, n)."""
        k, d = self.components, self.dim
        lead = state.shape[:-1]
        return (state[..., :k], state[..., k:k + k * d].reshape(*lead, k, d),
                state[..., k + k * d:].reshape(*lead, k, self.n_tril))

    def pack(self, logits: Tensor, means: Tensor, entries: Tensor) -> Tensor:
        lead = logits.shape[:-1]
        return torch.cat([logits, means.reshape(*lead, -1), entries.reshape(*lead, -1)], -1)

    def _scatter(self, values: Tensor) -> Tensor:
        """Lower-triangular matrices (…, d, d) from their entries (…, T)."""
        d = self.dim
        out = values.new_zeros(*values.shape[:-1], d * d).index_copy(-1, self.flat_index, values)
        return out.reshape(*values.shape[:-1], d, d)

    def chol(self, entries: Tensor) -> Tensor:
        """L from entries whose diagonal is stored as log: positive diagonal by construction."""
        return self._scatter(torch.where(self.diag_mask, torch.exp(entries), entries))

    def entries(self, chol: Tensor) -> Tensor:
        vals = chol[..., self.rows, self.cols]
        return torch.where(self.diag_mask, torch.log(vals), vals)

    # --- the closed forms ------------------------------------------------------------------
    def evaluate(self, state: Tensor, x: Tensor) -> MixtureEval:
        """log p and the per-component quantities every derivative is built from (log-sum-exp)."""
        logits, means, entries = self.unpack(state)
        chol = self.chol(entries)
        diff = (x.unsqueeze(1) - means.unsqueeze(2)).transpose(-1, -2)  # (P, K, d, N)
        z = torch.linalg.solve_triangular(chol, diff, upper=False)
        v = torch.linalg.solve_triangular(chol.transpose(-1, -2), z, upper=True)
        z, v = z.transpose(-1, -2), v.transpose(-1, -2)
        log_det = (entries * self.diag_mask).sum(-1)  # Σ log Lᵢᵢ
        log_w = torch.log_softmax(logits, -1)
        log_comp = (-0.5 * (z * z).sum(-1) - (log_det + 0.5 * self.dim * math.log(2 * math.pi)
                                              - log_w).unsqueeze(-1))
        log_p = torch.logsumexp(log_comp, dim=1)
        resp = torch.exp(log_comp - log_p.unsqueeze(1))
        return MixtureEval(log_p, resp, z, v, chol, torch.exp(log_w))

    def fields(self, ev: MixtureEval, diffusion_sqrt: Tensor,
               rate: Tensor | None = None, state: Tensor | None = None) -> LogDensityFields:
        """ℓ, ∂ₜℓ (from the state's time derivative ``rate``; zero without), ∇ℓ, tr(D∇²ℓ).

        ``diffusion_sqrt`` is S, (d, r) shared or (P·N, d, r) per point.
        """
        p, k, n, d = ev.z.shape
        grad = -(ev.resp.unsqueeze(-1) * ev.v).sum(1)  # (P, N, d)
        s = diffusion_sqrt
        if s.dim() == 2:
            lis = torch.linalg.solve_triangular(ev.chol, s.expand(p, k, d, s.shape[-1]), upper=False)
            tr_prec = (lis * lis).sum((-1, -2)).unsqueeze(-1)  # tr(DΣₖ⁻¹), (P, K, 1)
            sv, sg = ev.v @ s, grad @ s
        else:
            s = s.reshape(p, n, d, s.shape[-1])
            eye = torch.eye(d, dtype=s.dtype, device=s.device)
            inv = torch.linalg.solve_triangular(ev.chol, eye.expand(p, k, d, d), upper=False)
            lis = torch.einsum("pkij,pnjr->pknir", inv, s)
            tr_prec = (lis * lis).sum((-1, -2))  # (P, K, N)
            sv = torch.einsum("pknd,pndr->pknr", ev.v, s)
            sg = torch.einsum("pnd,pndr->pnr", grad, s)
        trace = (ev.resp * ((sv * sv).sum(-1) - tr_prec)).sum(1) - (sg * sg).sum(-1)
        if rate is None:
            dt = torch.zeros_like(ev.log_p)
        else:
            dt = self.jvp(ev, self.to_relative(rate, state))
        return LogDensityFields(ev.log_p.reshape(-1), dt.reshape(-1), grad.reshape(-1, d),
                                trace.reshape(-1))

    def jacobian(self, ev: MixtureEval) -> Tensor:
        """∂ℓ/∂θ in relative coordinates (c, bₖ, Aₖ), (P, N, n): the columns of the
        time-marching least-squares system, in closed form."""
        p, k, n, d = ev.z.shape
        j_logit = ev.resp.transpose(1, 2) - ev.weights.unsqueeze(1)
        j_mean = (ev.resp.unsqueeze(-1) * ev.z).permute(0, 2, 1, 3).reshape(p, n, k * d)
        zz = ev.z[..., self.rows] * ev.z[..., self.cols] - self.diag_mask.to(ev.z.dtype)
        j_chol = (ev.resp.unsqueeze(-1) * zz).permute(0, 2, 1, 3).reshape(p, n, k * self.n_tril)
        return torch.cat([j_logit, j_mean, j_chol], -1)

    def jvp(self, ev: MixtureEval, eta: Tensor) -> Tensor:
        """J η (P, N) for relative velocities η (P, n) without forming J (O(NKd²))."""
        c, b, a = self.unpack(eta)
        amat = self._scatter(a)  # (P, K, d, d)
        lin_quad = ((ev.z @ amat.transpose(-1, -2) + b.unsqueeze(2)) * ev.z).sum(-1)  # zᵀ(Az + b)
        tr = torch.diagonal(amat, dim1=-2, dim2=-1).sum(-1, keepdim=True)
        comp = lin_quad - tr + c.unsqueeze(-1)
        return (ev.resp * comp).sum(1) - (ev.weights * c).sum(-1, keepdim=True)

    def vjp(self, ev: MixtureEval, y: Tensor) -> Tensor:
        """Jᵀ y (P, n) for row values y (P, N) without forming J."""
        ry = ev.resp * y.unsqueeze(1)  # (P, K, N)
        c = ry.sum(-1) - ev.weights * y.sum(-1, keepdim=True)
        zy = ev.z * ry.unsqueeze(-1)
        second = zy.transpose(-1, -2) @ ev.z  # Σₙ yrzzᵀ, (P, K, d, d)
        a = second[..., self.rows, self.cols] - self.diag_mask * ry.sum(-1, keepdim=True)
        return self.pack(c, zy.sum(2), a)

    def jacobian_sq(self, ev: MixtureEval, w: Tensor) -> Tensor:
        """Σₙ wₙ Jₙᵢ² per column i (P, n): the Jacobi preconditioner of the matrix-free solve."""
        rw = ev.resp * ev.resp * w.unsqueeze(1)  # (P, K, N)
        c = (w.unsqueeze(1) * (ev.resp - ev.weights.unsqueeze(-1)) ** 2).sum(-1)
        z2 = ev.z * ev.z
        z2w = z2 * rw.unsqueeze(-1)
        b = z2w.sum(2)  # Σ w r² zᵢ²
        fourth = z2w.transpose(-1, -2) @ z2  # Σ w r² zᵢ²zⱼ², (P, K, d, d)
        # (zᵢzⱼ − δᵢⱼ)² = zᵢ²zⱼ² − δᵢⱼ(2zᵢ² − 1)
        a = fourth[..., self.rows, self.cols] + self.diag_mask * (
            rw.sum(-1, keepdim=True) - 2.0 * b[..., self.rows])
        return self.pack(c, b, a)

    def from_relative(self, eta: Tensor, state: Tensor) -> Tensor:
        """The state's time derivative from relative velocities: ṁ = Lb, L̇ = LA."""
        c, b, a = self.unpack(eta)
        chol = self.chol(self.unpack(state)[2])
        dmeans = (chol @ b.unsqueeze(-1)).squeeze(-1)
        la = (chol @ self._scatter(a))[..., self.rows, self.cols]
        return self.pack(c, dmeans, torch.where(self.diag_mask, a, la))

    def to_relative(self, rate: Tensor, state: Tensor) -> Tensor:
        """Inverse of :meth:`from_relative`: b = L⁻¹ṁ, A = L⁻¹L̇ (diagonal: d log Lᵢᵢ/dt)."""
        c, dmeans, dentries = self.unpack(rate)
        entries = self.unpack(state)[2]
        chol = self.chol(entries)
        lvals = chol[..., self.rows, self.cols]
        dchol = self._scatter(torch.where(self.diag_mask, lvals * dentries, dentries))
        b = torch.linalg.solve_triangular(chol, dmeans.unsqueeze(-1), upper=False).squeeze(-1)
        a = torch.linalg.solve_triangular(chol, dchol, upper=False)[..., self.rows, self.cols]
        return self.pack(c, b, a)

    def moments(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (P, d) and covariance Σπₖ(LₖLₖᵀ + (mₖ − m)(mₖ − m)ᵀ) (P, d, d)."""
        logits, means, entries = self.unpack(state)
        w = torch.softmax(logits, -1)
        chol = self.chol(entries)
        mean = (w.unsqueeze(-1) * means).sum(1)
        dm = means - mean.unsqueeze(1)
        cov = (w[..., None, None] * (chol @ chol.transpose(-1, -2)
                                     + dm.unsqueeze(-1) * dm.unsqueeze(-2))).sum(1)
        return mean, cov

    def sample(self, state: Tensor, u: Tensor, z: Tensor) -> Tensor:
        """x = m_k + L_k z with k drawn by inverse CDF from u (P,): reparameterized in m, L."""
        logits, means, entries = self.unpack(state)
        cdf = torch.cumsum(torch.softmax(logits, -1), -1)
        k = torch.searchsorted(cdf.detach(), u.unsqueeze(-1)).clamp(max=self.components - 1)
        mean = torch.gather(means, 1, k.unsqueeze(-1).expand(-1, 1, self.dim)).squeeze(1)
        tri = torch.gather(entries, 1, k.unsqueeze(-1).expand(-1, 1, self.n_tril)).squeeze(1)
        return mean + (self.chol(tri) @ z.unsqueeze(-1)).squeeze(-1)

    def initial_state(self, mean: Tensor, chol: Tensor, split: float) -> Tensor:
        """State (P, n) of p₀ = N(mean (P, d), chol cholᵀ): K components split along L₀e₁
        keeping the mixture's mean and covariance equal to p₀'s (see ``GMMConfig.split``)."""
        k, d = self.components, self.dim
        dtype, device = mean.dtype, mean.device
        offsets = torch.zeros(k, dtype=dtype, device=device)
        eps = 0.0 if k == 1 else split
        if k > 1:
            offsets = torch.linspace(-1.0, 1.0, k, dtype=dtype, device=device)
            offsets = offsets / torch.sqrt((offsets * offsets).mean())
        chol = chol.expand(mean.shape[0], d, d)
        means = mean.unsqueeze(1) + eps * offsets[:, None] * chol[:, None, :, 0]
        shrink = torch.ones(d, dtype=dtype, device=device)
        shrink[0] = math.sqrt(1.0 - eps * eps)
        entries = self.entries(chol * shrink).unsqueeze(1).expand(-1, k, self.n_tril)
        logits = torch.zeros(mean.shape[0], k, dtype=dtype, device=device)
        return self.pack(logits, means, entries)


def convolve_jumps(layout: MixtureLayout, state: Tensor, log_weights: Tensor, jump_mean: Tensor,
                   jump_cov: Tensor) -> Tensor:
    """The mixture convolved with a Poisson number of Gaussian jumps, in closed form: state
    (P, size) of K components and log P(n jumps) (P, N + 1) → the state of K(N + 1) components
    (pack it with ``MixtureLayout(d, K(N + 1))``), component (n, k) = πₖ P(n) N(mₖ + n·jump_mean,
    Σₖ + n·jump_cov)."""
    logits, means, entries = layout.unpack(state)
    chol = layout.chol(entries)
    cov = chol @ chol.transpose(-1, -2)
    log_w = torch.log_softmax(logits, -1)
    parts_logits, parts_means, parts_entries = [], [], []
    for n in range(log_weights.shape[-1]):
        parts_logits.append(log_w + log_weights[:, n:n + 1])
        parts_means.append(means + n * jump_mean)
        parts_entries.append(entries if n == 0 else
                             layout.entries(torch.linalg.cholesky(cov + n * jump_cov)))
    return layout.pack(torch.cat(parts_logits, -1), torch.cat(parts_means, -2),
                       torch.cat(parts_entries, -2))


class _MixtureDensity(DensityAnsatz):
    """A DensityAnsatz whose state at (t, cond) comes from a subclass; closed forms from the
    layout. Points sharing one t and cond are evaluated with one parameter set."""

    exact_initial_condition = True
    samplable = True

    def __init__(self, layout: MixtureLayout) -> None:
        super().__init__()
        self.layout = layout

    def state_at(self, t: Tensor, cond: Tensor | None,
                 with_rate: bool) -> tuple[Tensor, Tensor | None]:
        """State (P, n) at times t (P,) and, if asked, its time derivative."""
        raise NotImplementedError

    def _grouped(self, t: Tensor, x: Tensor, cond: Tensor | None,
                 with_rate: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        shared = t.shape[0] > 1 and bool((t == t[0]).all()) and (
            cond is None or bool((cond == cond[0]).all()))
        if shared:
            state, rate = self.state_at(t[:1], None if cond is None else cond[:1], with_rate)
            return state, rate, x.unsqueeze(0)
        state, rate = self.state_at(t, cond, with_rate)
        return state, rate, x.unsqueeze(1)

    def log_density(self, t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
        state, _, xs = self._grouped(t, x, cond, False)
        return self.layout.evaluate(state, xs).log_p.reshape(-1)

    def log_density_fields(self, t: Tensor, x: Tensor, diffusion_sqrt: Tensor, probes: int = 0,
                           generator: torch.Generator | None = None,
                           cond: Tensor | None = None) -> LogDensityFields:
        """Exact closed forms (``probes`` is ignored: the trace costs no more than an estimate)."""
        state, rate, xs = self._grouped(t, x, cond, True)
        return self.layout.fields(self.layout.evaluate(state, xs), diffusion_sqrt, rate, state)

    def log_density_fields_rowwise(
            self, t: Tensor, x: Tensor, diffusion_sqrt: Tensor,
            generator: torch.Generator | None = None
    ) -> tuple[LogDensityFields, tuple[Tensor, ...], Callable[[tuple[Tensor, ...]], Tensor] | None]:
        """One parameter set per point: point i depends on the networks only through the state
        and its rate at tᵢ, (N, n) each, which makes a Gauss–Newton Jacobian cheap."""
        state, rate = self.state_at(t, None, True)
        ev = self.layout.evaluate(state, x.unsqueeze(1))
        return (self.layout.fields(ev, diffusion_sqrt, rate, state), (state, rate),
                self._state_pullback(t))

    def _state_pullback(self, t: Tensor) -> Callable[[tuple[Tensor, ...]], Tensor] | None:
        """Row i ↦ Σⱼ wᵢⱼ ∂(state, rate)ᵢⱼ/∂θ at tᵢ for weights w = (w_state, w_rate), as
        per-point gradients (torch.func) of the parameters in ``parameters()`` order; None
        when there are no parameters (the trajectory of a march)."""
        return None

    def moments(self, t: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if cond is not None and cond.dim() == 1:
            cond = cond.expand(t.shape[0], -1)
        return self.layout.moments(self.state_at(t, cond, False)[0])

    def marginal_log_density(self, t: float, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        """log of the exact marginal density of the coordinates ``dims`` at time t, at x
        (N, len(dims)): a Gaussian mixture's marginal is the mixture of its components'."""
        tt = torch.tensor([t], dtype=x.dtype, device=x.device)
        logits, means, entries = self.layout.unpack(self.state_at(tt, None, False)[0][0])
        chol = self.layout.chol(entries)
        index = torch.tensor(dims, device=x.device)
        cov = (chol @ chol.transpose(-1, -2))[:, index][:, :, index]
        normal = torch.distributions.MultivariateNormal(means[:, index], covariance_matrix=cov)
        return torch.logsumexp(torch.log_softmax(logits, -1) + normal.log_prob(x.unsqueeze(1)), -1)

    def sample(self, t: Tensor, generator: torch.Generator | None = None,
               cond: Tensor | None = None) -> Tensor:
        n, ref = t.shape[0], t
        u = torch.rand(n, generator=generator, dtype=ref.dtype).to(ref.device)
        z = torch.randn(n, self.layout.dim, generator=generator, dtype=ref.dtype).to(ref.device)
        return self.layout.sample(self.state_at(t, cond, False)[0], u, z)


class GaussianMixtureAnsatz(_MixtureDensity):
    r"""Mixture whose state is a network of t (and of x₀ when conditioned), exact at t = 0.

    state(t) = state₀(x₀) + scale ⊙ (f(u(t), x̂₀) − f(u(0), x̂₀)) with time features
    u = (2t/T − 1, 2 log(1 + t/t_c)/log(1 + T/t_c) − 1): diffusion from a narrow start changes
    the state fastest at t ≲ t_c = λ_min(Σ₀)/λ_max(D), and log-time resolves that without huge
    weights. The output layer starts at zero, so training starts from the static p₀. ``scale``
    is 1 for logits and log-diagonals and the solution's spread at T for means and off-diagonal
    Cholesky entries. ∂ₜstate comes from a forward tangent pass through the (tanh) network.
    """

    def __init__(self, cfg: GMMConfig, equation: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device) -> None:
        if cfg.components < 1:
            raise UserError(f"ansatz.components={cfg.components} must be an integer ≥ 1")
        if cfg.hidden < 1 or cfg.depth < 1:
            raise UserError(f"ansatz.hidden={cfg.hidden} and ansatz.depth={cfg.depth} must be ≥ 1")
        if not 0.0 <= cfg.split < 1.0:
            raise UserError(f"ansatz.split={cfg.split} must be in [0, 1) (a fraction of the "
                            "initial standard deviation)")
        if cfg.extra_conditions < 0 or (cfg.extra_conditions and not cfg.condition_on_x0):
            raise UserError(f"ansatz.extra_conditions={cfg.extra_conditions} must be ≥ 0 and needs "
                            "ansatz.condition_on_x0=true")
        d = equation.dim
        super().__init__(MixtureLayout(d, cfg.components, device))
        self.cfg = cfg
        self.t_final = float(equation.t_final)
        mean = equation.initial_mean.to(dtype=dtype, device=device)
        self.register_buffer("initial_mean", mean)
        self.register_buffer("initial_chol", torch.linalg.cholesky(
            equation.initial_cov.to(dtype=dtype, device=device)))
        t_end = torch.tensor([self.t_final], dtype=dtype, device=device)
        spread = float(equation.envelope(t_end)[1].max())
        k, n_tril = cfg.components, self.layout.n_tril
        scale = self.layout.pack(torch.ones(k, dtype=dtype, device=device),
                                 torch.full((k, d), spread, dtype=dtype, device=device),
                                 torch.where(self.layout.diag_mask, 1.0, spread)
                                 .to(dtype).expand(k, n_tril))
        self.register_buffer("output_scale", scale)
        self.register_buffer("cond_scale", torch.tensor(spread, dtype=dtype, device=device))
        s0 = equation.diffusion_sqrt(t_end * 0, mean[None]).reshape(d, -1)
        d_max = float(torch.linalg.matrix_norm(s0, ord=2)) ** 2
        var_min = float(torch.linalg.eigvalsh(equation.initial_cov)[0])
        self.t_c = min(self.t_final, var_min / max(d_max, 1e-300))
        n_in = 2 + ((d + cfg.extra_conditions) if cfg.condition_on_x0 else 0)
        sizes = [n_in] + [cfg.hidden] * cfg.depth + [self.layout.size]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=dtype, device=device)
                                          for a, b in zip(sizes[:-1], sizes[1:]))
        torch.nn.init.zeros_(self.layers[-1].weight)
        torch.nn.init.zeros_(self.layers[-1].bias)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The state and its time derivative at times t (P,) (unconditioned): the module's
        function for torch.func."""
        return self.state_at(t, None, True)

    def _state_pullback(self, t: Tensor) -> Callable[[tuple[Tensor, ...]], Tensor] | None:
        if self.cfg.condition_on_x0:
            return None  # the state depends on cond too: use the generic Jacobian
        params = {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

        def row(p: dict[str, Tensor], t_i: Tensor, w_state: Tensor, w_rate: Tensor) -> Tensor:
            state, rate = torch.func.functional_call(self, p, (t_i.reshape(1),))
            return (state[0] * w_state).sum() + (rate[0] * w_rate).sum()

        def pullback(local: tuple[Tensor, ...]) -> Tensor:
            grads = torch.func.vmap(torch.func.grad(row), in_dims=(None, 0, 0, 0))(
                params, t.detach(), *local)
            return torch.cat([g.reshape(t.shape[0], -1) for g in grads.values()], 1)

        return pullback

    @classmethod
    def for_equation(cls, cfg: GMMConfig, equation: torch.nn.Module) -> "GaussianMixtureAnsatz":
        ref = equation.initial_mean
        return cls(cfg, equation, ref.dtype, ref.device)

    def _start(self, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x₀ (P, d) and the network's conditioning features (P, c), or None unconditioned."""
        p, d = t.shape[0], self.layout.dim
        if not self.cfg.condition_on_x0:
            return self.initial_mean.expand(p, d), None
        width = d + self.cfg.extra_conditions
        if cond is None:
            cond = torch.cat([self.initial_mean, self.initial_mean.new_zeros(width - d)]).expand(p, width)
        if cond.shape[-1] != width:
            raise UserError(f"cond has {cond.shape[-1]} columns; this mixture is conditioned on x0 "
                            f"({d}) + {self.cfg.extra_conditions} extra = {width}")
        x0 = cond[:, :d]
        feats = torch.cat([(x0 - self.initial_mean) / self.cond_scale, cond[:, d:]], -1)
        return x0, feats

    def state_at(self, t: Tensor, cond: Tensor | None,
                 with_rate: bool) -> tuple[Tensor, Tensor | None]:
        x0, feats = self._start(t, cond)
        p, t_final, t_c = t.shape[0], self.t_final, self.t_c
        tt = torch.cat([t, torch.zeros_like(t)]).unsqueeze(-1)  # the network at t and at 0
        log_span = math.log1p(t_final / t_c)
        h = torch.cat([2.0 * tt / t_final - 1.0, 2.0 * torch.log1p(tt / t_c) / log_span - 1.0], -1)
        dh = torch.cat([torch.full_like(tt, 2.0 / t_final), 2.0 / ((t_c + tt) * log_span)], -1)
        if feats is not None:
            h = torch.cat([h, feats.repeat(2, 1)], -1)
            dh = torch.cat([dh, torch.zeros_like(feats).repeat(2, 1)], -1)
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
            dh = (1.0 - h * h) * (dh @ layer.weight.T)
        out = self.layers[-1](h)
        base = self.layout.initial_state(x0, self.initial_chol, self.cfg.split)
        state = base + self.output_scale * (out[:p] - out[p:])
        rate = self.output_scale * (dh[:p] @ self.layers[-1].weight.T) if with_rate else None
        return state, rate


class MarchedMixture(_MixtureDensity):
    """The time-marching solution: on each accepted step [tᵢ, tᵢ₊₁] the state is the solver's
    dense output Σⱼ cᵢⱼθʲ, θ = (t − tᵢ)/hᵢ (quartic for Dormand–Prince, cubic Hermite for RK4;
    C¹ in t, differentiable in t and x).

    Batched over ``conditions`` (B, c): a start point x₀ (d) followed by the flattened values
    of any equation parameters marched in the same batch. ``cond`` rows select one by their
    first c columns (None: the first). Times outside [0, T] are clamped.
    """

    def __init__(self, layout: MixtureLayout, times: Tensor, coeffs: Tensor,
                 conditions: Tensor) -> None:
        super().__init__(layout)
        self.register_buffer("times", times)
        self.register_buffer("coeffs", coeffs)  # (B, M − 1, degree + 1, n)
        self.register_buffer("conditions", conditions)
        self.t_final = float(times[-1])

    def start_index(self, cond: Tensor | None, n: int) -> Tensor:
        if cond is None:
            return torch.zeros(n, dtype=torch.long, device=self.times.device)
        width = self.conditions.shape[1]
        if cond.shape[-1] < width:
            raise UserError(f"cond has {cond.shape[-1]} columns; this march is batched over "
                            f"{width} (start point, then equation parameters)")
        dist = torch.cdist(cond[:, :width], self.conditions,
                           compute_mode="donot_use_mm_for_euclid_dist")  # exact for equal rows
        best, index = dist.min(-1)
        tol = 1e-8 * (1.0 + self.conditions.abs().max())
        if bool((best > tol).any()):
            bad = [round(v, 6) for v in cond[int(torch.argmax(best))].tolist()]
            shown = [[round(v, 6) for v in c] for c in self.conditions[:4].tolist()]
            raise UserError(f"cond={bad} is not one of the {self.conditions.shape[0]} marched start "
                            f"points (and parameters) {shown}{' …' if len(self.conditions) > 4 else ''}"
                            "; march it (x0_batch, param_batch) first")
        return index

    def state_at(self, t: Tensor, cond: Tensor | None,
                 with_rate: bool) -> tuple[Tensor, Tensor | None]:
        b = self.start_index(cond, t.shape[0])
        t = t.clamp(0.0, self.t_final)
        i = (torch.searchsorted(self.times, t.detach(), right=True) - 1).clamp(0, self.times.numel() - 2)
        h = (self.times[i + 1] - self.times[i]).unsqueeze(-1)
        theta = (t.unsqueeze(-1) - self.times[i].unsqueeze(-1)) / h
        c = self.coeffs[b, i]  # (P, degree + 1, n)
        powers = torch.arange(c.shape[1], dtype=t.dtype, device=t.device)
        basis = theta ** powers  # (P, degree + 1)
        state = (basis.unsqueeze(-1) * c).sum(1)
        if not with_rate:
            return state, None
        dbasis = powers[1:] * theta ** powers[:-1]
        return state, (dbasis.unsqueeze(-1) * c[:, 1:]).sum(1) / h


class JumpConvolvedMixture(_MixtureDensity):
    """A marched diffusion law convolved with compound-Poisson Gaussian jumps at every t: the
    law of a jump diffusion whose coefficients ignore the jumping coordinates (Merton, Bates),
    still a Gaussian mixture (:func:`convolve_jumps`), so it keeps every closed form: density,
    moments, marginals, samples. ``jumps`` is an :class:`~neuralpde_cli.sdes.jumps.GaussianJumps`;
    the sum keeps the jump counts whose Poisson tail at t_final matters."""

    def __init__(self, diffusion: MarchedMixture, jumps: torch.nn.Module) -> None:
        self.terms = jumps.terms(diffusion.times[-1:])
        super().__init__(MixtureLayout(diffusion.layout.dim,
                                       diffusion.layout.components * (self.terms + 1),
                                       device=diffusion.times.device))
        self.diffusion, self.jumps = diffusion, jumps
        self.t_final = diffusion.t_final

    def state_at(self, t: Tensor, cond: Tensor | None,
                 with_rate: bool) -> tuple[Tensor, Tensor | None]:
        if with_rate:
            raise UserError("a jump diffusion's law is marched, not trained: its state has no "
                            "rate for a residual")
        state, _ = self.diffusion.state_at(t, cond, False)
        return convolve_jumps(self.diffusion.layout, state, self.jumps.log_weights(t, self.terms),
                              self.jumps.mean, self.jumps.cov), None
