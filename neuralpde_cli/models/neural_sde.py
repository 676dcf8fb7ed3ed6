r"""``model=neural_sde`` and ``model=jump_diffusion``: data from the spiral, a network fitted.

Two ways of fitting the neural SDE:

* **mean** (the post's): model paths are simulated (:func:`~neuralpde_cli.models.spiral.simulate`)
  and the sum of squares between the mean of ``model_paths`` of them and the data mean over
  every observation time is minimized. One model path cannot do: its loss at the true model is
  ≈ 20 (the paths' spread), against ≈ 0.4 for a mean of 100. The mean carries little about the
  noise, so the post fixes the diffusion at the truth (``noise=fixed``).
* **likelihood**: every observed transition's log-density, the mean and covariance from the
  moment equations (:mod:`neuralpde_cli.likelihood.moments`; ``density=euler`` is Euler's
  Gaussian, the cheap baseline), so drift and diffusion are both learned from single paths.

The jump diffusion is fitted by the mean of paths, its jump times drawn afresh each step; the
drift and the jump map are networks, the diffusion the truth's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neuralpde_cli.data import Observations
from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.models.spiral import (SPIRAL_A, JumpMapNet, Jumps, NeuralSDE, ScaleFirst,
                                         SpiralSDE, mean_path_loss, simulate, torchsde_paths)
from neuralpde_cli.training.trainer import Phase

METHODS = ("mean", "likelihood")
NOISES = ("fixed", "diagonal", "additive")
DENSITIES = ("moments", "euler")
STATE_NAMES = ["u1", "u2"]
#: repetitions of the 100-path mean when the final mean loss and its floor are reported
REPEATS = 20


@dataclass
class NeuralSDEConfig:
    """``model=neural_sde``: data from the spiral SDE, a drift network (x³ → hidden tanh → 2)
    and, unless ``noise=fixed``, a diffusion network, trained by ``method``."""

    name: str = "neural_sde"
    #: mean: the post's fit of the mean of model paths to the data mean; likelihood: the
    #: transition density of every observed step
    method: str = "mean"
    #: fixed: the true diag(noise_scale·u), not learned; diagonal: a network g(u), one entry
    #: per coordinate; additive: a learned constant g
    noise: str = "fixed"
    #: likelihood: moments (mean and covariance by the moment ODEs) or euler (N(x + μΔ, σσᵀΔ))
    density: str = "moments"
    hidden: int = 50
    #: the true system: drift matrix A, noise scale (g = noise_scale·u), start u₀, horizon
    drift_matrix: list[list[float]] = field(default_factory=lambda: [list(r) for r in SPIRAL_A])
    noise_scale: float = 0.2
    u0: list[float] = field(default_factory=lambda: [2.0, 0.0])
    t_final: float = 1.0
    #: observation times per path (equally spaced on [0, t_final], both ends included)
    observations: int = 30
    #: observed paths in the generated data set
    paths: int = 100
    #: model paths per step of the mean fit (and per repetition of the final mean loss)
    model_paths: int = 100
    #: simulator steps per observation interval (Heun drift, Itô noise)
    substeps: int = 10
    #: the data's step: torchsde's srk (strong order 1.5); jump data: the simulator
    data_dt: float = 1e-3
    #: likelihood: RK4 steps of the moment ODEs per observation interval
    moment_substeps: int = 4
    #: likelihood: drift-only steps first, on the noise-free one-step prediction |x₁ − φ_Δ(x₀)|²/Δ
    #: (from a random drift the likelihood's easiest way down is a huge diffusion that explains
    #: every step as noise, where it stays)
    warmup_steps: int = 300
    #: likelihood: L-BFGS (strong Wolfe) after Adam, outer steps of 20 iterations each (the
    #: likelihood is deterministic; the mean fit's loss is not, so it takes none)
    lbfgs_steps: int = 0
    #: Adam: steps, learning rate (cosine schedule down to lr·final_lr_factor)
    steps: int = 400
    lr: float = 0.025
    final_lr_factor: float = 0.04


@dataclass
class JumpDiffusionConfig(NeuralSDEConfig):
    """``model=jump_diffusion``: the spiral plus Poisson jumps; the drift and the jump map are
    networks (the diffusion fixed at the truth, as in the post), fitted to the mean of paths."""

    name: str = "jump_diffusion"
    jump_rate: float = 2.0
    #: the true jump map u ↦ (jump_factor·u₁, u₂)
    jump_factor: float = 0.5
    #: the jump-map network u + MLP(u), 2 → jump_hidden tanh → 2, starting at the identity
    jump_hidden: int = 16


def check_config(cfg: NeuralSDEConfig) -> None:
    """Every choice, range and shape of the model keys; one UserError naming the first bad one."""
    check_choice("model.method", cfg.method, METHODS)
    check_choice("model.noise", cfg.noise, NOISES)
    check_choice("model.density", cfg.density, DENSITIES)
    for key in ("hidden", "paths", "model_paths", "substeps", "moment_substeps", "steps"):
        if int(getattr(cfg, key)) < 1:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be an integer ≥ 1")
    for key in ("warmup_steps", "lbfgs_steps"):
        if int(getattr(cfg, key)) < 0:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be an integer ≥ 0")
    if cfg.method == "mean" and cfg.lbfgs_steps > 0:
        raise UserError(f"model.lbfgs_steps={cfg.lbfgs_steps} needs model.method=likelihood: the "
                        "mean-path loss is drawn afresh each step, which L-BFGS's line search "
                        "cannot use")
    if cfg.observations < 2:
        raise UserError(f"model.observations={cfg.observations} must be ≥ 2 (a transition "
                        "needs two)")
    for key in ("t_final", "data_dt", "lr"):
        if not float(getattr(cfg, key)) > 0:
            raise UserError(f"model.{key}={getattr(cfg, key)} must be > 0")
    if not 0 < cfg.final_lr_factor <= 1:
        raise UserError(f"model.final_lr_factor={cfg.final_lr_factor} must be in (0, 1]")
    if not cfg.noise_scale >= 0:
        raise UserError(f"model.noise_scale={cfg.noise_scale} must be ≥ 0")
    if len(cfg.u0) != 2 or [len(r) for r in cfg.drift_matrix] != [2, 2]:
        raise UserError(f"model.u0={list(cfg.u0)} must have 2 entries and model.drift_matrix="
                        f"{[list(r) for r in cfg.drift_matrix]} be 2×2: the spiral is 2-D")
    if cfg.method == "likelihood" and cfg.noise == "fixed" and cfg.noise_scale == 0:
        raise UserError("model.method=likelihood with model.noise=fixed needs model.noise_scale "
                        "> 0: without noise the transition density is not a density")
    if isinstance(cfg, JumpDiffusionConfig):
        if cfg.method != "mean":
            raise UserError(f"model.method={cfg.method} is not available for model=jump_diffusion "
                            "(its transition density is a jump mixture); use model.method=mean")
        if not cfg.jump_rate >= 0:
            raise UserError(f"model.jump_rate={cfg.jump_rate} must be ≥ 0")
        if cfg.jump_hidden < 1:
            raise UserError(f"model.jump_hidden={cfg.jump_hidden} must be an integer ≥ 1")


def paths_of(obs: Observations, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Times (n_t,) and states (n_t, n_paths, d) of data whose paths share one time grid."""
    ids = np.unique(obs.path)
    rows = [np.flatnonzero(obs.path == i) for i in ids]
    first = obs.time[rows[0]]
    for i, r in zip(ids, rows):
        if r.shape != rows[0].shape or not np.allclose(obs.time[r], first, rtol=0, atol=1e-9):
            raise UserError(f"{what} needs every path observed at the same times; path {int(i)} "
                            f"of {obs.source or 'the data'} has {r.shape[0]} observations at "
                            f"other times than path {int(ids[0])} ({obs.where(int(r[0]))})")
    return first, np.stack([obs.state[r] for r in rows], axis=1)


class MeanObjective:
    """The post's loss with ``n`` model paths per step, fresh noise (and jump times) each step."""

    term_names = ["mean"]

    def __init__(self, sde: NeuralSDE, x0: Tensor, times: Tensor, data_mean: Tensor, n: int,
                 substeps: int, seed: int, jump_rate: float = 0.0,
                 jump_map: torch.nn.Module | None = None) -> None:
        self.sde, self.x0, self.times, self.data_mean = sde, x0, times, data_mean
        self.n, self.substeps, self.jump_rate, self.jump_map = n, substeps, jump_rate, jump_map
        self.generator = torch.Generator(device=x0.device).manual_seed(seed)

    def paths(self, sde: Any = None, generator: torch.Generator | None = None,
              n: int | None = None, jump_map: torch.nn.Module | None = None) -> Tensor:
        gen = generator if generator is not None else self.generator
        n = n or self.n
        jumps = Jumps.sample(self.jump_rate, float(self.times[0]), float(self.times[-1]), n, gen,
                             self.x0.dtype, self.x0.device) if self.jump_rate > 0 else None
        return simulate(sde or self.sde, self.x0, self.times, n, self.substeps, gen, jumps,
                        jump_map or self.jump_map)

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        return {"mean": mean_path_loss(self.paths(), self.data_mean)}

    def freeze(self) -> None:
        """Nothing to freeze (L-BFGS on a noisy loss is not offered)."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class LikelihoodObjective:
    """−mean log p(x₁ | x₀) over every observed transition; in the ``warmup`` phase the drift
    alone, on the noise-free one-step prediction."""

    term_names = ["flow", "nll"]

    def __init__(self, sde: NeuralSDE, obs: Observations, density: str, substeps: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        tr = obs.transitions()
        as_t = lambda a: torch.as_tensor(np.asarray(a, float), dtype=dtype, device=device)  # noqa: E731
        self.x0, self.x1, self.t0, self.dt = as_t(tr.x0), as_t(tr.x1), as_t(tr.t0), as_t(tr.dt)
        self.sde, self.density, self.substeps = sde, density, substeps

    def log_density(self, sde: Any = None) -> Tensor:
        from neuralpde_cli.likelihood.gaussian import euler_log_density
        from neuralpde_cli.likelihood.moments import moment_log_density

        sde = sde or self.sde
        if self.density == "euler":
            return euler_log_density(sde, self.x0, self.x1, self.t0, self.dt)
        return moment_log_density(sde, self.x0, self.x1, self.t0, self.dt, self.substeps)

    def loss_terms(self, phase: str) -> dict[str, Tensor]:
        if phase == "warmup":
            from neuralpde_cli.likelihood.moments import flow_mean

            m = flow_mean(self.sde, self.x0, self.t0, self.dt, self.substeps)
            return {"flow": (((self.x1 - m) ** 2).sum(-1) / self.dt).mean()}
        return {"nll": -self.log_density().mean()}

    def freeze(self) -> None:
        """The loss is deterministic: nothing to freeze."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless."""


def rel_l2(estimate: Tensor, truth: Tensor) -> float:
    return float(torch.linalg.vector_norm(estimate - truth) / torch.linalg.vector_norm(truth))


class SDEExperiment:
    """The spiral (with or without jumps): truth, data, the trainable model, its objective,
    and what a run reports. Built by ``neuralpde fit`` (tasks/fit.py) from the model config."""

    def __init__(self, cfg: NeuralSDEConfig, dtype: torch.dtype, device: torch.device,
                 seed: int) -> None:
        check_config(cfg)
        self.cfg, self.dtype, self.device, self.seed = cfg, dtype, device, seed
        a = torch.tensor([[float(v) for v in r] for r in cfg.drift_matrix], dtype=dtype, device=device)
        self.truth = SpiralSDE(a, cfg.noise_scale).to(device)
        self.jumpy = isinstance(cfg, JumpDiffusionConfig)
        self.jump_rate = float(cfg.jump_rate) if self.jumpy else 0.0
        self.true_jump = ScaleFirst(cfg.jump_factor) if self.jumpy else None
        torch.manual_seed(seed)  # the networks' initial weights
        sde = NeuralSDE(cfg.hidden, cfg.noise, cfg.noise_scale)
        parts = {"sde": sde}
        if self.jumpy:
            parts["jump"] = JumpMapNet(cfg.jump_hidden)
        self.model = torch.nn.ModuleDict(parts).to(dtype=dtype, device=device)
        self.sde = sde
        self.jump_map = parts.get("jump")
        self.error_key = "nll" if cfg.method == "likelihood" else "mean_loss"

    def phases(self) -> list[Phase]:
        """Adam with a cosine schedule; the likelihood first warms the drift up alone."""
        c = self.cfg
        plan = [Phase("adam", "adam", c.steps, c.lr, "cosine", c.final_lr_factor)]
        if c.method == "likelihood" and c.warmup_steps > 0:
            plan.insert(0, Phase("warmup", "adam", c.warmup_steps, c.lr, "cosine", 0.1))
        if c.lbfgs_steps > 0:
            plan.append(Phase("lbfgs", "lbfgs", c.lbfgs_steps, 1.0, lbfgs_iters=20, history=50))
        return plan

    # --- data ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return 2

    def check_data(self, obs: Observations) -> None:
        """A data file must hold 2-D states; the mean fit needs one time grid for all paths."""
        if obs.dim != 2:
            raise UserError(f"data file {obs.source} has {obs.dim} state column(s) "
                            f"{obs.state_names}; model={self.cfg.name} needs 2 (u1, u2)")
        if self.cfg.method == "mean":
            paths_of(obs, "model.method=mean")

    def generate(self) -> Observations:
        """The data set: ``paths`` paths of the true system at the observation times."""
        c = self.cfg
        times = torch.linspace(0.0, float(c.t_final), int(c.observations), dtype=self.dtype,
                               device=self.device)
        x0 = torch.tensor([float(v) for v in c.u0], dtype=self.dtype, device=self.device)
        if self.jumpy:
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            sub = max(1, math.ceil(float(times[1] - times[0]) / float(c.data_dt) - 1e-9))
            jumps = Jumps.sample(self.jump_rate, 0.0, float(c.t_final), c.paths, gen, self.dtype,
                                 self.device)
            with torch.no_grad():
                paths = simulate(self.truth, x0, times, c.paths, sub, gen, jumps, self.true_jump)
        else:
            paths = torchsde_paths(self.truth, x0, times, c.paths, float(c.data_dt), self.seed)
        n_t = times.shape[0]
        return Observations(time=np.tile(times.cpu().numpy(), c.paths),
                            state=paths.transpose(0, 1).reshape(-1, 2).cpu().numpy(),
                            path=np.repeat(np.arange(c.paths), n_t), state_names=STATE_NAMES)

    def data_scheme(self) -> str:
        c = self.cfg
        return (f"the simulator (Heun drift, Itô noise) with steps ≤ {c.data_dt:g}, exact jump "
                "times" if self.jumpy else f"torchsde 0.2.6 srk (strong order 1.5), dt = {c.data_dt:g}")

    # --- training -----------------------------------------------------------------------------
    def setup(self, obs: Observations) -> None:
        """The objective for these data, and the states they visit (where errors are measured)."""
        c = self.cfg
        as_t = lambda a: torch.as_tensor(np.asarray(a, float), dtype=self.dtype, device=self.device)  # noqa: E731
        self.obs = obs
        self.visited = as_t(obs.state)
        try:
            times, states = paths_of(obs, "model.method=mean")
        except UserError:
            if c.method == "mean":
                raise
            # the likelihood needs no common grid; the mean-path report then uses path 0's times
            times, states = obs.time[obs.path == obs.path[0]], None
        self.times = as_t(times)
        self.data_paths = as_t(states) if states is not None else None
        start = self.data_paths[0].mean(0) if self.data_paths is not None else \
            torch.tensor([float(v) for v in c.u0], dtype=self.dtype, device=self.device)
        self.data_mean = self.data_paths.mean(1) if self.data_paths is not None else None
        self.simulator = MeanObjective(self.sde, start, self.times,
                                       self.data_mean if self.data_mean is not None else
                                       torch.zeros(len(times), 2, dtype=self.dtype, device=self.device),
                                       c.model_paths, c.substeps, self.seed + 1, self.jump_rate,
                                       self.jump_map)
        self.objective = self.simulator if c.method == "mean" else \
            LikelihoodObjective(self.sde, obs, c.density, c.moment_substeps, self.dtype, self.device)

    def _eval_generator(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + 1000 + offset)

    def errors(self) -> dict[str, float]:
        """The learned fields against the truth, relative L2 over the visited states."""
        x, zero = self.visited, torch.zeros(self.visited.shape[0], dtype=self.dtype, device=self.device)
        with torch.no_grad():
            out = {"drift_error": rel_l2(self.sde.drift(zero, x), self.truth.drift(zero, x))}
            if self.cfg.noise != "fixed":
                out["diffusion_error"] = rel_l2(self.sde.noise(zero, x).abs(),
                                                self.truth.noise(zero, x).abs())
            if self.jumpy:
                out["jump_map_error"] = rel_l2(self.jump_map(x), self.true_jump(x))
        return out

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            if self.cfg.method == "likelihood":
                out = {"nll": float(-self.objective.log_density().mean())}
            else:
                paths = self.simulator.paths(generator=self._eval_generator(0))
                out = {"mean_loss": float(mean_path_loss(paths, self.data_mean))}
        return {**out, **self.errors()}

    # --- results ------------------------------------------------------------------------------
    def _mean_losses(self, sde: Any, jump_map: Any, seed: int) -> np.ndarray:
        gen = self._eval_generator(seed)
        return np.array([float(mean_path_loss(self.simulator.paths(sde, gen, jump_map=jump_map),
                                              self.data_mean)) for _ in range(REPEATS)])

    def results(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Final metrics and the arrays the plots read."""
        c = self.cfg
        metrics = self.errors()
        arrays: dict[str, np.ndarray] = {"times": self.times.cpu().numpy()}
        n_fan = 20
        with torch.no_grad():
            if self.data_mean is not None:
                fitted = self._mean_losses(self.sde, self.jump_map, 1)
                floor = self._mean_losses(self.truth, self.true_jump, 2)
                quiet = SpiralSDE(self.truth.a, 0.0)
                one = self.simulator.paths(quiet, self._eval_generator(3), n=1,
                                           jump_map=self.true_jump) if not self.jumpy else None
                metrics.update({"mean_loss": float(fitted.mean()), "mean_loss_std": float(fitted.std()),
                                "floor_mean_loss": float(floor.mean()),
                                "floor_mean_loss_std": float(floor.std())})
                if one is not None:  # what a fit that ignores the noise would reach at best
                    metrics["noise_free_loss"] = float(mean_path_loss(one, self.data_mean))
                arrays["data_mean"] = self.data_mean.cpu().numpy()
                arrays["data_paths"] = self.data_paths[:, :n_fan].cpu().numpy()
            if c.method == "likelihood":
                metrics["loglik"] = float(self.objective.log_density().sum())
                try:  # Euler's density of the truth is singular where a coordinate is 0 (at u₀)
                    metrics["loglik_truth"] = float(self.objective.log_density(self.truth).sum())
                except UserError:
                    metrics["loglik_truth"] = math.nan
            many = 20 * c.model_paths
            gen = self._eval_generator(4)
            fitted_paths = self.simulator.paths(self.sde, gen, n=many, jump_map=self.jump_map)
            true_paths = self.simulator.paths(self.truth, gen, n=many, jump_map=self.true_jump)
            arrays.update({"fitted_mean": fitted_paths.mean(1).cpu().numpy(),
                           "true_mean": true_paths.mean(1).cpu().numpy(),
                           "fitted_paths": fitted_paths[:, :n_fan].cpu().numpy()})
            if self.data_mean is None:  # likelihood on data without a common grid
                metrics["fitted_vs_true_mean"] = float(((fitted_paths.mean(1) - true_paths.mean(1)) ** 2).sum())
            arrays.update(self._fields())
        return metrics, arrays

    def _fields(self) -> dict[str, np.ndarray]:
        """Drift and |diffusion| of truth and fit on a grid over the visited box, the visited
        states, and (jumps) both jump maps at those states."""
        x = self.visited
        lo, hi = x.min(0).values, x.max(0).values
        pad = 0.05 * (hi - lo)
        g1 = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), 25, dtype=self.dtype)
        g2 = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), 25, dtype=self.dtype)
        mesh = torch.stack(torch.meshgrid(g1, g2, indexing="ij"), -1).reshape(-1, 2).to(self.device)
        zero = torch.zeros(mesh.shape[0], dtype=self.dtype, device=self.device)
        out = {"grid_u1": g1.numpy(), "grid_u2": g2.numpy(), "visited": x.cpu().numpy(),
               "true_drift": self.truth.drift(zero, mesh).reshape(25, 25, 2).cpu().numpy(),
               "fitted_drift": self.sde.drift(zero, mesh).reshape(25, 25, 2).cpu().numpy(),
               "true_noise": self.truth.noise(zero, mesh).abs().reshape(25, 25, 2).cpu().numpy(),
               "fitted_noise": self.sde.noise(zero, mesh).abs().reshape(25, 25, 2).cpu().numpy()}
        if self.jumpy:
            out["true_jump"] = self.true_jump(x).cpu().numpy()
            out["fitted_jump"] = self.jump_map(x).cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"method": c.method, "noise": c.noise,
                "density": c.density if c.method == "likelihood" else None,
                "simulator": f"Heun drift + Itô noise, {c.substeps} steps per observation interval",
                "jump_rate": self.jump_rate if self.jumpy else None}
