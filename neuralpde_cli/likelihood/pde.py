r"""Transition densities p(x₁, t₀ + Δ | x₀, t₀; θ) from the Fokker–Planck equation, for
maximum likelihood.

One batched time-march of a Gaussian mixture (:class:`~neuralpde_cli.solvers.time_march.TimeMarcher`)
per θ covers every transition of a data set:

* **Amortized over start points.** The march runs from a grid of start points spread over the
  observed x₀ (one node beyond each end of every axis) and each transition reads its mixture
  state from a tensor-product natural cubic spline in x₀. The mixture's parameters are smooth
  in x₀ (exactly affine for OU, where the spline is exact), so the cost no longer grows with
  the number of transitions. Coordinates the coefficients do not depend on (log S in Heston)
  need no axis: the density is marched at one value and shifted. Time-dependent coefficients,
  or ``per_start``, march every distinct (x₀, t₀), each member from its own calendar time.
* **Coordinates where the law is near Gaussian.** An SDE may declare ``march_coordinates``: the
  Box–Cox power y = (xᵃ − 1)/a of a positive coordinate, a = 0 its logarithm (CIR's Lamperti
  coordinate 2√x − 2, CEV's a = 1 − γ that follows γ, Heston's log V). The march runs there (``in_march_coordinates``), where the law has Gaussian
  tails and the grid and mixture stay inside the state space, and each density is carried back
  by the Jacobian Π |dy/dx₁|.
* **No stiff point-mass start.** A point mass has no density; a narrow Gaussian N(x₀, w²) adds
  w² to the transition's variance. The march instead starts at a short time ε after x₀ from
  the Euler–Maruyama law N(x₀ + μ(x₀)ε, σσᵀ(x₀)ε), whose error in mean and variance is O(ε²)
  (relative O(ε/Δ)), and reads the transition over Δ at time Δ − ε.
* **Smooth and differentiable in θ.** The march keeps its autograd graph, so the gradient of the
  log-likelihood is one backward pass. Adaptive step control would make the likelihood a
  piecewise function of θ (a step accepted at one θ, rejected at the next), so the step times
  are fixed (:meth:`TransitionDensity.freeze_steps`, chosen adaptively at a θ) and replayed:
  the likelihood is then a smooth function of θ, and the fitter re-adapts the steps at the
  optimum to check that they did not matter. A replay still computes each step's error
  estimate; when θ has moved so far that the frozen steps no longer suit it, they are chosen
  again there (:data:`STALE_ERROR`), so a fit that walks far from its start does not follow
  gradients of a broken march.
* **Jumps added when the law is read.** For a jump diffusion (:mod:`neuralpde_cli.sdes.jumps`)
  the march is of the diffusion part, and each transition's mixture is convolved with the
  Poisson number of Gaussian jumps over its Δ (:func:`~neuralpde_cli.ansatz.gmm.convolve_jumps`):
  exact, since the coefficients do not see the coordinates that jump.

The coefficients are SDE modules from :mod:`neuralpde_cli.sdes` built by a callable from
parameter tensors, so this module knows nothing of which SDE it is fitting.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.ansatz.gmm import GaussianMixtureAnsatz, GMMConfig, MixtureLayout, convolve_jumps
from neuralpde_cli.equations.fokker_planck import FokkerPlanck, FokkerPlanckConfig
from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes import SDE, SDEConfig, march_log_jacobian, to_march
from neuralpde_cli.solvers.time_march import TimeMarchConfig, TimeMarcher

log = logging.getLogger(__name__)


@dataclass
class TransitionSet:
    """Transitions as tensors: start x0 (n, d), end x1 (n, d), start time t0 (n,), length dt (n,)."""

    x0: Tensor
    x1: Tensor
    t0: Tensor
    dt: Tensor

    @classmethod
    def from_arrays(cls, x0: np.ndarray, x1: np.ndarray, t0: np.ndarray, dt: np.ndarray,
                    dtype: torch.dtype, device: torch.device) -> "TransitionSet":
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), dtype=dtype, device=device)  # noqa: E731
        x0, x1 = as_t(x0), as_t(x1)
        return cls(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1), as_t(t0), as_t(dt))

    @property
    def n(self) -> int:
        return int(self.x0.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x0.shape[1])


def spline_matrix(m: int, h: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """S (m, m) mapping values at m equally spaced nodes (spacing h) to the second derivatives
    of their natural cubic spline."""
    a = torch.zeros(m, m, dtype=dtype, device=device)
    r = torch.zeros(m, m, dtype=dtype, device=device)
    a[0, 0] = a[-1, -1] = 1.0
    idx = torch.arange(1, m - 1, device=device)
    a[idx, idx - 1], a[idx, idx], a[idx, idx + 1] = 1.0, 4.0, 1.0
    r[idx, idx - 1], r[idx, idx], r[idx, idx + 1] = 6.0 / h ** 2, -12.0 / h ** 2, 6.0 / h ** 2
    return torch.linalg.solve(a, r)


def spline_weights(nodes: Tensor, x: Tensor) -> Tensor:
    """W (n, m) with W @ y = the natural cubic spline through (nodes, y) at x (n,): the spline
    is linear in its values, so a tensor-product spline is one weight row per axis. The weights
    depend only on x in units of the node spacing, so they are differentiable in the nodes too
    (a grid that follows θ)."""
    m = nodes.shape[0]
    u = (x - nodes[0]) / (nodes[1] - nodes[0])
    second = spline_matrix(m, 1.0, x.dtype, x.device)
    i = torch.clamp(torch.floor(u.detach()).long(), 0, m - 2)
    b = (u - i).unsqueeze(-1)
    a = 1.0 - b
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    return a * eye[i] + b * eye[i + 1] + ((a ** 3 - a) * second[i]
                                          + (b ** 3 - b) * second[i + 1]) / 6.0


#: a difference in the data's log L per transition below which K components and one Gaussian
#: tie (the issue's accuracy asked of a density: 0.1 per 1,000 transitions)
TIE_PER_TRANSITION = 1e-4


@dataclass
class PDELikelihoodConfig:
    """How the transition density is computed (the ``fit.pde`` keys)."""

    #: start-grid nodes per axis (a tensor-product cubic spline in x₀ over the coordinates the
    #: coefficients depend on); 0: 16 on one axis, 8 per axis on two, 5 on three, and every
    #: distinct start beyond
    grid: int = 0
    #: march every distinct start point (with its start time when time-dependent) instead
    per_start: bool = False
    #: ε = start_fraction · (shortest Δ): the march starts from the Euler law at time ε
    start_fraction: float = 1e-2
    #: coefficients that depend on calendar time: each transition is marched from its own
    #: start time (auto: as the SDE declares; custom callables are taken as time-dependent)
    time_dependent: str = "auto"
    #: the coordinates the density is marched in: auto, as the SDE declares (CIR and CEV:
    #: Lamperti's 2√x, GBM and Heston's V: log); natural: the data's own
    coordinates: str = "auto"
    #: one Gaussian component instead of ``ansatz.components`` when a one-component march at
    #: the start has a relative Galerkin residual at most this (the law is near Gaussian in the
    #: march's coordinates: OU, CIR at short Δt); 0: always ``ansatz.components``
    gaussian_residual: float = 0.02
    #: the march's least-squares ridge for a one-dimensional mixture of K > 1 components (0:
    #: optimizer.ridge): at calibrate's 1e-2 (chosen for Heston's 2-D smoothness) the weekly
    #: VIX's K = 3 march broke down, at 1e-3 it was 0.13 nats from the exact log L
    ridge_1d: float = 1e-3
    #: torch.compile the replayed march (``optimizer.compile``): true, false, or auto: from the
    #: evaluation after two differentiable marches that took ``compile_above_s`` or longer (a
    #: log L + ∇ of about three times that), where the compile's 10–60 s (two graphs, with and
    #: without gradients, on a cold cache) pay back within the fit's iterations, standard errors
    #: and profiles. At 0.3 s, fits of a few hundred observations whose marches took 0.3–0.45 s
    #: ran 1.3–2.3× slower on a cold cache (the latent Heston test 67 s → 156 s)
    compile: str = "auto"
    compile_above_s: float = 0.7


AUTO_GRID = {1: 16, 2: 8, 3: 5}
#: a replayed step whose error estimate exceeds this many tolerances means that the step times,
#: chosen at other parameters, no longer suit these (steps about 1.6× longer than the error
#: control would take): they are chosen again here. A double-well fit that walks from Kessler's
#: (1.06, 0.74, 0.68) towards (1, 1, 0.5) reaches 9 tolerances 20 % of the way and 580 at 30 %,
#: where the replay's Cholesky factors break down.
STALE_ERROR = 10.0
#: steps chosen again may number at most this many times those they replace (and at least
#: :data:`MIN_STEP_CAP`): a trial θ that needs more is too far for one line-search step, which
#: backs off towards it (the steps can grow again from there). Unbounded, a weekly Heston trial
#: point took a march whose differentiable replay filled 23 GB.
REFREEZE_GROWTH = 1.5
MIN_STEP_CAP = 64
#: base points per component when the march's own rule is automatic: a transition density is
#: a smooth, few-component mixture, and 24 Gauss–Hermite nodes (exact to degree 47) give the
#: CIR monthly log-densities of 64 to 1e-5 at a third of the cost (docs/calibration.md)
BASE_POINTS = {1: 24}
TIME_DEPENDENT = ("auto", "true", "false")
COMPILE = ("auto", "true", "false")
COORDINATES = ("auto", "natural")


class TransitionDensity:
    """log p(x₁ | x₀; θ) for a fixed set of transitions, as a differentiable function of the
    SDE's parameter tensors.

    Members of the march: a tensor grid over the coordinates the coefficients depend on
    (translation-invariant ones, e.g. log S in Heston, are marched at one value and shifted),
    or, for time-dependent coefficients or with ``per_start``, every distinct (x₀, t₀)."""

    def __init__(self, make_sde: Callable[[dict[str, Tensor]], SDE], transitions: TransitionSet,
                 mixture: GMMConfig, march: TimeMarchConfig, cfg: PDELikelihoodConfig,
                 coordinate_values: dict[str, float] | None = None) -> None:
        """``coordinate_values``: the parameter values at which the SDE's march coordinates are
        probed (default: the config's). A power that is a plain number is fixed from then on; one
        that is a tensor (CEV's 1 − γ) follows θ and is placed again at every evaluation."""
        # YAML reads true/false as booleans, which a str field keeps as 'True'/'False'
        cfg = replace(cfg, compile=str(cfg.compile).lower(),
                      time_dependent=str(cfg.time_dependent).lower())
        if cfg.grid != 0 and cfg.grid < 4:
            raise UserError(f"fit.pde.grid={cfg.grid} must be 0 (automatic) or ≥ 4 nodes per axis")
        if not 0 < cfg.start_fraction < 0.5:
            raise UserError(f"fit.pde.start_fraction={cfg.start_fraction} must be in (0, 0.5)")
        if not cfg.ridge_1d >= 0:
            raise UserError(f"fit.pde.ridge_1d={cfg.ridge_1d} must be ≥ 0 (0: optimizer.ridge)")
        if not cfg.gaussian_residual >= 0:
            raise UserError(f"fit.pde.gaussian_residual={cfg.gaussian_residual} must be ≥ 0 "
                            "(0: always ansatz.components)")
        if cfg.compile not in COMPILE:
            raise UserError(f"fit.pde.compile={cfg.compile!r} is unknown; choose one of "
                            f"{list(COMPILE)}")
        if not cfg.compile_above_s >= 0:
            raise UserError(f"fit.pde.compile_above_s={cfg.compile_above_s} must be ≥ 0")
        if cfg.coordinates not in COORDINATES:
            raise UserError(f"fit.pde.coordinates={cfg.coordinates!r} is unknown; choose one of "
                            f"{list(COORDINATES)}")
        if cfg.time_dependent not in TIME_DEPENDENT:
            raise UserError(f"fit.pde.time_dependent={cfg.time_dependent!r} is unknown; choose "
                            f"one of {list(TIME_DEPENDENT)}")
        if not bool((transitions.dt > 0).all()):
            raise UserError("every transition needs Δt > 0 (times must increase within a path)")
        # coordinates the SDE marches in (CIR's 2√x − 2, CEV's Box–Cox power 1 − γ, Heston's
        # log V): the data and the start grid are taken there, and each density carries the
        # Jacobian |dy/dx| back. A power that follows θ (CEV) places them again per evaluation.
        self.natural_sde, self.natural_data, self.cfg = make_sde, transitions, cfg
        self.coordinate_values = dict(coordinate_values or {})
        probe = make_sde({k: torch.tensor(float(v), dtype=transitions.x0.dtype,
                                          device=transitions.x0.device)
                          for k, v in self.coordinate_values.items()})
        self.powers = probe.march_coordinates() if cfg.coordinates == "auto" else {}
        self.dynamic = any(torch.is_tensor(a) for a in self.powers.values())
        self.floor = None
        if self.powers:
            dims = sorted(self.powers)
            if not all(bool((a[:, dims] > 0).all()) for a in (transitions.x0, transitions.x1)):
                raise UserError("the transition density is marched in powers or logarithms of "
                                f"coordinates {dims}: their values must be > 0")
            # where the state space ends at 0, the coefficients are held below a quarter of the
            # smallest observation (in CIR's 2√x: half of its y): data never come near, and the
            # far tail of a component that crosses 0 reads finite values
            self.floor = 0.25 * float(torch.cat([transitions.x0[:, dims],
                                                 transitions.x1[:, dims]]).min())
            probe = probe.in_march_coordinates(self.floor)
        self.mixture = mixture
        if march.base_points == 0 and transitions.dim in BASE_POINTS:
            march = replace(march, base_points=BASE_POINTS[transitions.dim])
        TimeMarcher(march)  # its settings checked here, before any march
        # whether to compile is this density's state (:attr:`compiled`), not the config's
        self.march_cfg = replace(march, compile=False)
        self.base_ridge = march.ridge
        tr = transitions
        self.time_dependent = cfg.time_dependent == "true" or (
            cfg.time_dependent == "auto" and not probe.autonomous)
        self.eps = cfg.start_fraction * float(tr.dt.min())
        # the distinct march horizons: Δ − ε for each distinct Δ (regular data: one)
        self.horizons, self.which = torch.unique(tr.dt - self.eps, return_inverse=True)
        self.t_final = float(self.horizons.max())
        invariant = tuple(getattr(probe, "invariant_dims", ()))
        self.free = [i for i in range(tr.dim) if i not in invariant]
        self.invariant = list(invariant)
        self.nodes_per_axis = cfg.grid or AUTO_GRID.get(len(self.free), 0)
        self.use_grid = not (cfg.per_start or self.time_dependent) and (
            self.nodes_per_axis > 0 or not self.free)
        self.offsets = None
        if not self.use_grid:  # every distinct start (and start time): a monotone change of
            # coordinates keeps them distinct, so they are found once, in the data's coordinates
            keys = torch.cat([tr.x0, tr.t0.unsqueeze(-1)], 1) if self.time_dependent else tr.x0
            unique, self.start_of = torch.unique(keys, dim=0, return_inverse=True)
            self.natural_starts = unique[:, :tr.dim].contiguous()
            if self.time_dependent:
                self.offsets = unique[:, tr.dim].contiguous()
        self._place(self.powers)
        #: how often the replayed steps were found stale and chosen again (fit.json reports it)
        self.refreezes = 0
        #: whether the marches run compiled (``fit.pde.compile=true`` or ``optimizer.compile``;
        #: auto turns it on)
        self.compiled = cfg.compile == "true" or march.compile
        #: the wall time of each differentiable replay while compiling is undecided (auto)
        self.replay_seconds: list[float] = []
        eye = np.eye(tr.dim).tolist()  # a placeholder SDE; each evaluation swaps in its own
        eq_cfg = FokkerPlanckConfig(dim=tr.dim, t_final=self.t_final, initial="gaussian",
                                    sde=SDEConfig(kind="brownian", sigma=eye),
                                    initial_mean=[0.0] * tr.dim, initial_std=1.0, eval_times=[])
        self.equation = FokkerPlanck(eq_cfg, tr.x0.dtype, tr.x0.device)
        self.use_components(mixture.components)
        #: the one-component march's residual at the start (:meth:`choose_components`)
        self.gaussian_residual: float | None = None
        #: the data log L at the start with one Gaussian and with K components, where both ran
        self.component_logliks: dict[str, float] | None = None
        #: the first :meth:`freeze_steps` chooses the components, unless they were set
        self.components_chosen = False
        #: a jump diffusion's jumps, from the SDE of the last march (None: a diffusion)
        self.jumps = getattr(probe, "jumps", None)
        self._jump_layouts: dict[tuple[int, int], MixtureLayout] = {}

    def _data_weighted(self, per_member: Tensor | None) -> float:
        """The mean of a per-member figure over the transitions, each member weighted by the
        transitions it serves (a grid member: the sum of its |spline weights|)."""
        if per_member is None:
            return 0.0
        if self.use_grid:
            share = self.weights.abs().sum(0)
        else:
            share = torch.bincount(self.start_of, minlength=self.members).to(per_member)
        return float((share * per_member).sum() / share.sum())

    def use_components(self, components: int) -> None:
        """March a mixture of this many components from now on (the frozen steps go)."""
        self.mixture = replace(self.mixture, components=int(components))
        ridge = self.base_ridge
        if self.natural_data.dim == 1 and components > 1 and self.cfg.ridge_1d > 0:
            ridge = self.cfg.ridge_1d
        self.march_cfg = replace(self.march_cfg, ridge=ridge)
        self.ansatz = GaussianMixtureAnsatz.for_equation(self.mixture, self.equation)
        self.layout: MixtureLayout = self.ansatz.layout
        self.step_times = None
        self.components_chosen = True

    def choose_components(self, values: dict[str, Tensor], components: int) -> int:
        """One Gaussian where the law is near Gaussian, else ``components``: a one-component
        march at ``values`` whose worst relative Galerkin residual is at most
        ``gaussian_residual`` follows the Fokker–Planck equation closely. Why not always K:
        components that coincide (OU's law stays Gaussian) make the march's least-squares
        system singular, and a 1-D OU fit with K = 3 took thousands of steps; where one
        Gaussian suffices it is also the most accurate (measured: docs/calibration.md)."""
        values = {k: v.detach() for k, v in values.items()}
        self.use_components(1)
        residual = math.inf
        if components > 1 and self.cfg.gaussian_residual > 0:
            try:
                with torch.no_grad():
                    march = self._run(values, False)
                residual = self._data_weighted(march.member_residual)
            except (RuntimeError, ArithmeticError):  # Diverged; torch's LinAlgError
                pass
        self.gaussian_residual = residual if math.isfinite(residual) else None
        self.component_logliks = None
        if residual > self.cfg.gaussian_residual:
            self.use_components(components)
            if math.isfinite(residual):
                self._keep_components_that_score(values, components)
        return self.mixture.components

    def _keep_components_that_score(self, values: dict[str, Tensor], components: int) -> None:
        """Drop the K components again where they give the data a clearly lower log-likelihood
        at ``values`` than one Gaussian: by more than TIE_PER_TRANSITION × n, the accuracy asked
        of the density (0.1 per 1,000 transitions). Under the model E log p_approx is largest
        for the exact law, so a clear loss on the data says that the mixture errs where the data
        are; a smaller difference is a tie, and a tie keeps what the march residual asked for
        (monthly CIR: K = 3 errs 1.6e-4 per transition, K = 1 2.8e-3, and K = 1 scores 0.009
        higher, noise). Measured against CIR's exact law where it decides: daily VIX in
        calendar days, K = 3 scored 0.8 lower, erred −1.5 in total against K = 1's −0.85 (a
        mixture's thinner tails at four moves beyond 5 SD) and took 369 steps against 18."""
        try:
            self.freeze_steps(values)
            many_times = list(self.step_times)
            with torch.no_grad():
                many = float(self.log_density(values, False).sum())
            self.use_components(1)
            self.freeze_steps(values)
            one_times = list(self.step_times)
            with torch.no_grad():
                one = float(self.log_density(values, False).sum())
        except (RuntimeError, ArithmeticError):  # one of the marches broke: keep K as asked
            self.use_components(components)
            return
        self.component_logliks = {"1": one, str(components): many, "steps_1": len(one_times),
                                  f"steps_{components}": len(many_times)}
        keep_one = many < one - TIE_PER_TRANSITION * self.natural_data.dt.shape[0]
        self.use_components(1 if keep_one else components)
        self.step_times = one_times if keep_one else many_times  # chosen here at ``values``

    def _place(self, powers: dict[int, float | Tensor]) -> None:
        """The data, the Jacobian, the start points and (on a grid) each transition's spline
        weights in the march coordinates ``powers``: once, or per evaluation where the powers
        follow θ (differentiable through them)."""
        tr = self.natural_data
        if powers:
            self.jacobian = march_log_jacobian(tr.x1, powers)
            tr = replace(tr, x0=to_march(tr.x0, powers), x1=to_march(tr.x1, powers))
        else:
            self.jacobian = torch.zeros_like(tr.dt)
        self.data = tr
        self.reference = tr.x0.median(0).values  # invariant coordinates are marched here
        if not self.use_grid:
            self.starts = to_march(self.natural_starts, powers) if powers else self.natural_starts
            return
        nodes = []
        for i in self.free:
            lo, hi = tr.x0[:, i].min(), tr.x0[:, i].max()
            span = torch.clamp(hi - lo, min=1e-3 * max(1.0, float(hi.abs())))
            h = span / (self.nodes_per_axis - 3)
            lower = lo - h
            if self.floor is not None and i in powers:  # the grid stays inside the state space
                lower = torch.maximum(lower, to_march(tr.x0.new_full((1, tr.dim), self.floor),
                                                      powers)[0, i])
            nodes.append(lower + (hi + h - lower) * torch.linspace(
                0.0, 1.0, self.nodes_per_axis, dtype=tr.x0.dtype, device=tr.x0.device))
        mesh = torch.meshgrid(*nodes, indexing="ij") if nodes else []
        count = int(np.prod([len(n) for n in nodes])) if nodes else 1
        starts = [self.reference[i].expand(count) for i in range(tr.dim)]
        for axis, i in enumerate(self.free):
            starts[i] = mesh[axis].reshape(-1)
        self.starts = torch.stack(starts, -1)
        self.nodes = nodes
        # each transition's tensor-product spline weights over the members (n, members), and
        # its offset from the marched value along the translation-invariant coordinates
        self.weights = torch.ones(tr.n, 1, dtype=tr.x0.dtype, device=tr.x0.device)
        for axis_nodes, i in zip(nodes, self.free):
            axis = spline_weights(axis_nodes, tr.x0[:, i])
            self.weights = (self.weights.unsqueeze(-1) * axis.unsqueeze(1)).reshape(tr.n, -1)
        self.shift = torch.zeros_like(tr.x0)
        self.shift[:, self.invariant] = tr.x0[:, self.invariant] - self.reference[self.invariant]

    def make_sde(self, values: dict[str, Tensor]) -> SDE:
        """The SDE at ``values`` in the march coordinates; where those follow θ, the data and
        the start grid are placed there first."""
        sde = self.natural_sde(values)
        if not self.powers:
            return sde
        if self.dynamic:
            self._place(sde.march_coordinates())
        return sde.in_march_coordinates(self.floor)

    @property
    def members(self) -> int:
        """Start points in one march."""
        return int(self.starts.shape[0])

    def _equation(self, values: dict[str, Tensor]) -> FokkerPlanck:
        sde = self.make_sde(values)
        self.jumps = getattr(sde, "jumps", None)
        self.equation.sde = sde
        self.equation.constant_diffusion = sde.constant_diffusion
        return self.equation

    def _start_law(self, sde: SDE) -> tuple[Tensor, Tensor]:
        """Mean and Cholesky factor (B, d), (B, d, d) of the Euler law at time ε after each start."""
        x0, eps = self.starts, self.eps
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        if self.offsets is not None:
            t = t + self.offsets
        s = sde.diffusion_sqrt(t, x0)
        s = s.expand(x0.shape[0], *s.shape[-2:]) if s.dim() == 2 else s
        cov = 2.0 * eps * (s @ s.transpose(-1, -2))
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            bad = x0[int(torch.nonzero(info)[0, 0])].tolist()
            raise UserError(f"the diffusion matrix is singular at the start point x0 = {bad}; "
                            "the transition density from there is not a density")
        return x0 + eps * sde.drift(t, x0), chol

    def _march(self, values: dict[str, Tensor], differentiable: bool):
        """The march at ``values``: the frozen steps replayed while their own error estimates
        say they still suit these parameters (see :data:`STALE_ERROR`), else steps chosen anew
        here and frozen from now on."""
        if self.step_times is None:
            return self._run(values, differentiable)
        try:
            began = time.perf_counter()
            result = self._run(values, differentiable)
            if differentiable and self.cfg.compile == "auto" and not self.compiled:
                self._consider_compiling(time.perf_counter() - began)
            if max(h["step_error"] for h in result.history) <= STALE_ERROR:
                return result
            del result  # its autograd graph, before a second march builds another
        except (RuntimeError, ArithmeticError):  # Diverged; torch's LinAlgError is a RuntimeError
            pass  # the stale steps broke the march: new ones decide whether θ itself is at fault
        self.freeze_steps(values, max(int(REFREEZE_GROWTH * len(self.step_times)), MIN_STEP_CAP))
        self.refreezes += 1
        return self._run(values, differentiable)

    def _consider_compiling(self, seconds: float) -> None:
        """``fit.pde.compile=auto``: compile from the next evaluation on once two differentiable
        replays have both taken ≥ ``compile_above_s``. Two, because the first carries one-time
        costs: a T-bill fit's first replay took 1.2 s in a busy test run where its march takes
        0.1 s, and the compile it started cost 50 s."""
        self.replay_seconds.append(seconds)
        if len(self.replay_seconds) >= 2 and min(self.replay_seconds[-2:]) >= self.cfg.compile_above_s:
            self.compiled = True
            log.info("the last two marches took %.2g s and %.2g s ≥ fit.pde.compile_above_s=%g: "
                     "compiling the march (torch.compile) for the evaluations to come",
                     *self.replay_seconds[-2:], self.cfg.compile_above_s)

    def _run(self, values: dict[str, Tensor], differentiable: bool, max_steps: int | None = None):
        """One march at ``values``: the frozen steps replayed, or chosen adaptively (at most
        ``max_steps``) where none are frozen; compiled once :attr:`compiled` is on."""
        eq = self._equation(values)
        mean0, chol0 = self._start_law(eq.sde)
        cfg = replace(self.march_cfg, compile=self.compiled)
        if max_steps is not None:
            cfg = replace(cfg, max_steps=min(max_steps, cfg.max_steps))
        result = TimeMarcher(cfg).run(eq, self.ansatz, x0_batch=mean0, initial_chol=chol0,
                                      step_times=self.step_times, differentiable=differentiable,
                                      time_offsets=None if self.offsets is None
                                      else self.offsets + self.eps)  # starts at t₀ + ε
        if result.compile_failed:  # said once (the march's warning); eager from now on
            self.compiled = False
            self.cfg = replace(self.cfg, compile="false")  # and auto does not try again
        return result

    def freeze_steps(self, values: dict[str, Tensor], max_steps: int | None = None) -> int:
        """Choose the step times adaptively at ``values`` and replay them from now on; needing
        more than ``max_steps`` (default: the march's own cap) raises ``Diverged``, and the
        steps frozen before stay."""
        if not self.components_chosen:
            self.choose_components(values, self.mixture.components)
        frozen, self.step_times = self.step_times, None
        try:
            with torch.no_grad():
                result = self._run({k: v.detach() for k, v in values.items()}, False, max_steps)
        except BaseException:
            self.step_times = frozen  # a θ the march cannot cross leaves the old steps in place
            raise
        self.step_times = [h["t"] for h in result.history]
        return len(self.step_times)

    def readapted_loglik(self, values: dict[str, Tensor]) -> float:
        """Steps chosen again at ``values`` (and frozen from now on), and log L with them."""
        self.freeze_steps(values)
        with torch.no_grad():
            return float(self.log_density(values, False).sum())

    def _node_states(self, values: dict[str, Tensor], differentiable: bool) -> Tensor:
        """The mixture state (horizons, members, size) of each march member at each Δ − ε."""
        marched = self._march(values, differentiable).ansatz
        n_h, n_s = self.horizons.shape[0], self.members
        t = self.horizons.repeat_interleave(n_s)
        index = torch.arange(n_s, device=t.device).repeat(n_h)
        return self._state_at(marched, t, index).reshape(n_h, n_s, -1)

    def states(self, values: dict[str, Tensor], differentiable: bool = True) -> Tensor:
        """The mixture state (n, size) of each transition's density, each marched from its own
        start (``per_start`` or time-dependent; a grid's transitions have none of their own)."""
        if self.use_grid:
            raise ValueError("states() needs a march per start (per_start or time-dependent)")
        return self._node_states(values, differentiable)[self.which, self.start_of]

    def law(self, state: Tensor, dt: Tensor) -> tuple[MixtureLayout, Tensor]:
        """The transition law over Δ = ``dt`` (P,) of marched states (P, size): the states
        themselves for a diffusion; for a jump diffusion, each convolved with the jumps that
        arrive in Δ (K(N + 1) components, N from the Poisson tail)."""
        if self.jumps is None:
            return self.layout, state
        terms = self.jumps.terms(dt)
        key = (self.layout.components, terms)
        if key not in self._jump_layouts:
            self._jump_layouts[key] = MixtureLayout(self.layout.dim, key[0] * (terms + 1),
                                                    device=state.device)
        return self._jump_layouts[key], convolve_jumps(
            self.layout, state, self.jumps.log_weights(dt, terms), self.jumps.mean, self.jumps.cov)

    def log_density(self, values: dict[str, Tensor], differentiable: bool = True) -> Tensor:
        """log p(x₁ | x₀) (n,) for every transition, in the data's coordinates."""
        return self._per_transition(values, differentiable,
                                    lambda layout, state, x: layout.evaluate(state, x).log_p,
                                    True) + self.jacobian

    def pit(self, values: dict[str, Tensor]) -> Tensor:
        """F(x₁ | x₀) (n,) of the first coordinate: the probability integral transform, uniform
        when the model is right."""
        with torch.no_grad():
            return self._per_transition(values, False, self.cdf, False).clamp(0.0, 1.0)

    def _per_transition(self, values: dict[str, Tensor], differentiable: bool,
                        node_fn: Callable[[MixtureLayout, Tensor, Tensor], Tensor],
                        density: bool) -> Tensor:
        """``node_fn(layout, states (s, size), points (s, r, d))`` → (s, r) read off each
        transition's law (:meth:`law`: with a jump diffusion's jumps).
        From a grid of starts, the law's *shape* is interpolated, not its parameters: a
        mixture that represents a density is not unique, and neighbouring members can hold the
        same law in different components, so a spline through their parameters can be a wrong
        law that moves erratically with θ (a daily Heston fit saw log p jump by 0.02 where the
        transition's own march moved by 1e-4). Each transition is standardized by the
        interpolated mean and covariance, z = L⁻¹(x₁ − m); every member's law is read at its own
        m_j + L_j z (with the Jacobian log|L_j| for a density), and those values are splined."""
        state = self._node_states(values, differentiable)
        x1 = self.data.x1
        if not self.use_grid:
            layout, own = self.law(state[self.which, self.start_of], self.data.dt)
            return node_fn(layout, own, x1.unsqueeze(1))[:, 0]
        out = x1.new_empty(x1.shape[0])
        for u in range(state.shape[0]):
            rows = self.which == u
            weights = self.weights[rows]  # (r, s)
            layout, at_u = self.law(state[u], (self.horizons[u] + self.eps).expand(state.shape[1]))
            mean, cov = layout.moments(at_u)
            chol_nodes = torch.linalg.cholesky(cov)
            m = weights @ mean + self.shift[rows]
            chol = torch.linalg.cholesky(torch.einsum("rs,sij->rij", weights, cov))
            z = torch.linalg.solve_triangular(chol, (x1[rows] - m).unsqueeze(-1),
                                              upper=False).squeeze(-1)
            points = mean.unsqueeze(1) + torch.einsum("sij,rj->sri", chol_nodes, z)
            values_at = node_fn(layout, at_u, points)  # (s, r)
            if density:
                log_det = torch.log(torch.diagonal(chol_nodes, dim1=-2, dim2=-1)).sum(-1)
                values_at = values_at + log_det.unsqueeze(-1)
            read = (weights * values_at.T).sum(-1)
            if density:
                read = read - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            out[rows] = read
        return out

    @staticmethod
    def _state_at(marched, t: Tensor, member: Tensor) -> Tensor:
        """State of march member ``member`` (P,) at times t (P,), from the dense output."""
        times = marched.times
        t = t.clamp(0.0, marched.t_final)
        i = (torch.searchsorted(times, t.detach(), right=True) - 1).clamp(0, times.numel() - 2)
        h = (times[i + 1] - times[i]).unsqueeze(-1)
        theta = (t.unsqueeze(-1) - times[i].unsqueeze(-1)) / h
        c = marched.coeffs[member, i]
        powers = torch.arange(c.shape[1], dtype=t.dtype, device=t.device)
        return ((theta ** powers).unsqueeze(-1) * c).sum(1)

    @staticmethod
    def cdf(layout: MixtureLayout, state: Tensor, x: Tensor) -> Tensor:
        """F(x | ·) (n, P) of the first coordinate's marginal, for states (n, size) of
        ``layout`` and points x (n, P, d) (only their first coordinate counts)."""
        logits, means, entries = layout.unpack(state)
        chol = layout.chol(entries)
        sd = torch.sqrt((chol[..., 0, :] ** 2).sum(-1))  # (n, K)
        z = (x[..., 0].unsqueeze(-1) - means[:, None, :, 0]) / sd[:, None, :]
        return (torch.softmax(logits, -1)[:, None, :] * torch.special.ndtr(z)).sum(-1)

    def predictive_density(self, values: dict[str, Tensor], x0: np.ndarray, dt: float,
                           x: np.ndarray, axis: int = 0) -> np.ndarray:
        """The density of coordinate ``axis`` of x₁ over Δ = dt, averaged over the starts x0
        (m, d), on a grid x (G,): what a histogram of the x₁ of those starts should look like.
        One extra march."""
        ref = self.data.x0
        starts = torch.as_tensor(np.asarray(x0, float), dtype=ref.dtype, device=ref.device)
        starts = starts.reshape(-1, ref.shape[1])
        probe = TransitionSet(starts, starts, torch.zeros_like(starts[:, 0]),
                              torch.full_like(starts[:, 0], dt))
        other = TransitionDensity(self.natural_sde, probe, self.mixture, self.march_cfg,
                                  replace(self.cfg, per_start=True), self.coordinate_values)
        natural = torch.as_tensor(np.asarray(x, float), dtype=ref.dtype, device=ref.device)
        powers = self.natural_sde(values).march_coordinates() if self.dynamic else self.powers
        power = {0: powers[axis]} if axis in self.powers else {}  # p(x) = p_y(y(x))·|dy/dx|
        grid = to_march(natural[:, None], power)[:, 0]
        jacobian = torch.exp(march_log_jacobian(natural[:, None], power))
        with torch.no_grad():
            layout, state = other.law(other.states({k: v.detach() for k, v in values.items()},
                                                   False), probe.dt)
            logits, means, entries = layout.unpack(state)
            sd = torch.sqrt((layout.chol(entries)[..., axis, :] ** 2).sum(-1))  # (m, K)
            z = (grid[None, :, None] - means[:, None, :, axis]) / sd[:, None, :]
            comp = torch.exp(-0.5 * z * z) / (sd[:, None, :] * math.sqrt(2 * math.pi))
            p = (torch.softmax(logits, -1)[:, None, :] * comp).sum(-1)
        return (p.mean(0) * jacobian).cpu().numpy()
