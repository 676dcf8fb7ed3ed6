"""``neuralpde solve``: config → equation + ansatz → solver → run directory.

The task function stays thin: it builds the pieces named by the config, hands them to the
solver the ``optimizer`` group chose, and writes what the run produced. Bad input of any kind
ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

import neuralpde_cli
from neuralpde_cli import distributed
from neuralpde_cli.config import SolveConfig, register_configs
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import GROUPS, implied_choices, option, validate_combination
from neuralpde_cli.run import plots
from neuralpde_cli.run.atomic import atomic_write
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.solvers.gradient import GradientSolver
from neuralpde_cli.tasks.common import config_dir, make_main
from neuralpde_cli.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def build(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The equation, ansatz and solver objects the config names (validated as a combination)."""
    names = (cfg.equation.name, cfg.ansatz.name, cfg.optimizer.name)
    validate_combination(*names)
    eq_opt, an_opt, opt_opt = (option(g, n) for g, n in zip(("equation", "ansatz", "optimizer"), names))
    equation = eq_opt.target_class(OmegaConf.to_object(cfg.equation), dtype, device)
    ansatz = an_opt.target_class.for_equation(OmegaConf.to_object(cfg.ansatz), equation)
    solver = opt_opt.target_class(OmegaConf.to_object(cfg.optimizer))
    return equation, ansatz, solver


def solve(cfg: DictConfig, run: RunDir, warm: torch.Tensor | None = None) -> dict[str, Any]:
    """Run the job the config describes into ``run``; returns the summary written."""
    from neuralpde_cli.solvers.dispatch import run_solver  # heavy imports only when solving

    if cfg.multigrid.levels > 1:
        return solve_chain(cfg, run)
    device = resolve_device(cfg.device.name)
    dtype = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    startup_s = process_age_s()
    start = time.perf_counter()
    resume_state = None
    if cfg.get("resume"):
        resume_state = load_checkpoint(run.checkpoints / "last.pt", map_location=device)
    equation, ansatz, solver = build(cfg, device, dtype)
    _warm_start(cfg, ansatz, warm, device)
    summary = _summary_header(cfg, device, "running")
    run.write_summary(summary)
    result = run_solver(cfg, equation, ansatz, solver, run, resume_state)
    summary.update(result)
    summary["status"] = "completed"
    # wall_time_s ≥ train_time_s: the sessions before a resume count with the training time
    # their checkpoint recorded (train_time_s is the training loop's time over all sessions)
    resumed_s = float((resume_state or {}).get("elapsed", 0.0))
    session_s = time.perf_counter() - start
    summary["wall_time_s"] = session_s + resumed_s
    advice = large_error_advice(cfg, summary.get("metrics", {}))
    if advice:
        summary["advice"] = advice
    run.write_summary(summary)
    plotted = time.perf_counter()
    summary["plots"] = [str(p.relative_to(run.path)) for p in plots.make_plots(run.path)]
    train_s = float(summary["train_time_s"]) - resumed_s if "train_time_s" in summary else 0.0
    summary["timings"] = {"startup_s": startup_s, "train_s": train_s,
                          "evaluate_s": session_s - train_s,
                          "plots_s": time.perf_counter() - plotted}
    run.write_summary(summary)
    return summary


def process_age_s() -> float | None:
    """Seconds since this process started, as the kernel tells (Linux: the start time in
    /proc/self/stat against the boot clock it counts from); None elsewhere. The start-up share
    of ``timings``: interpreter, imports, Hydra's composition, the checks before a run."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return age if 0.0 <= age < 86400.0 else None


def _warm_start(cfg: DictConfig, ansatz: Any, warm: torch.Tensor | None,
                device: torch.device) -> None:
    """Start from a coarser level's values, or from an earlier run (``init.from_run``)."""
    if warm is None and cfg.init.from_run:
        source = run_source(cfg.init.from_run)
        npz = source / "solution.npz"
        if hasattr(ansatz, "warm_start_from") and npz.is_file():
            with np.load(npz) as data:
                if "T" not in data:
                    raise UserError(f"init.from_run={source}: its solution.npz holds no grid "
                                    "values T; a grid warm start needs a grid run")
                warm = torch.from_numpy(data["T"])
        else:
            state = load_checkpoint(source / "checkpoints" / "last.pt", map_location=device)
            try:
                ansatz.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise UserError(f"init.from_run={source}: its model does not match this ansatz "
                                f"({str(exc).splitlines()[0][:160]})") from None
    if warm is not None:
        ansatz.warm_start_from(warm.to(device))


def run_source(path: str) -> Path:
    """The run directory ``init.from_run`` names; a chain's folder stands for its finest level
    (a chain writes its results in ``level_<k>/``)."""
    source = Path(path).expanduser()
    levels = sorted((p for p in source.glob("level_*") if p.name[6:].isdigit()),
                    key=lambda p: int(p.name[6:]))
    if levels and not (source / "solution.npz").is_file() \
            and not (source / "checkpoints" / "last.pt").is_file():
        return levels[-1]
    return source


#: a headline error above this is called large on the final line, with the setting that works
LARGE_ERROR = 0.1


def large_error_advice(cfg: DictConfig, metrics: dict[str, Any]) -> str | None:
    """When the headline error against the exact or reference solution is large: says so and
    names the setting that reaches a small one (None otherwise)."""
    key = next((k for k in ("l1_error", "rel_l2_error", "rel_l2_log_error")
                if isinstance(metrics.get(k), float)), None)
    if key is None or not metrics[key] > LARGE_ERROR:
        return None
    equation, ansatz, optimizer = cfg.equation.name, cfg.ansatz.name, cfg.optimizer.name
    if equation == "diffusion":
        fix = ("the grid solver, which matches the direct solve: ansatz=grid (multigrid)"
               if ansatz == "mlp" else "optimizer=multigrid, which solves the grid system to tol")
    elif ansatz == "gmm" and optimizer != "time_march":
        fix = "optimizer=time_march, the solver for the mixture"
    elif ansatz == "gmm":
        fix = f"more components: ansatz.components={max(8, 2 * int(cfg.ansatz.components))}"
    elif equation == "fokker_planck" and int(cfg.equation.dim) <= 2:
        fix = ("the Gaussian mixture, time-marched: ansatz=gmm optimizer=time_march (with "
               "ansatz.components=8 for a law with several modes)")
    elif equation == "fokker_planck":
        fix = ("more steps (optimizer.adam_steps, optimizer.lbfgs_steps); a non-Gaussian law in "
               "d > 2 is beyond the MLP's Gaussian envelope today (README § The MLP on "
               "non-Gaussian laws)")
    else:
        fix = "more steps (optimizer.adam_steps, optimizer.lbfgs_steps) or ansatz=gmm"
    return f"large error: {key}={metrics[key]:.2g}; try {fix}"


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """While inside, the log also goes to ``path`` (a chain level's own solve.log), in the
    format of the run's log file."""
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(template.formatter if template is not None and template.formatter
                         else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - "
                                                "%(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _record_level(cfg: DictConfig, chain_dir: Path, level_dir: Path) -> None:
    """A level's ``.hydra/``: its own config (what ``resume`` reads) and the chain's overrides
    with the level's own, so a level is a run directory like any other."""
    config = OmegaConf.to_yaml(OmegaConf.merge(cfg, {"resume": None}))
    atomic_write(level_dir / ".hydra" / "config.yaml", lambda h: h.write(config.encode()))
    given = chain_dir / ".hydra" / "overrides.yaml"
    chain = [str(o) for o in OmegaConf.load(given)] if given.is_file() else []
    mine = ["multigrid.levels=1", f"ansatz.resolution={cfg.ansatz.resolution}"]
    text = OmegaConf.to_yaml([o for o in chain if o.split("=", 1)[0] not in
                              ("multigrid.levels", "ansatz.resolution")] + mine)
    atomic_write(level_dir / ".hydra" / "overrides.yaml", lambda h: h.write(text.encode()))


def solve_chain(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Coarse to fine: level k solves at (n − 1)/2^(L−1−k) + 1 nodes, warm-started from k − 1.

    Each level is a complete run directory ``level_<k>/``; the chain's summary lists them.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.device.name)
    summary = _summary_header(cfg, device, "running")
    run.write_summary(summary)
    chain, warm = [], None
    for k, level_cfg in enumerate(chain_levels(cfg)):
        level_run = RunDir(run.path / f"level_{k}")
        _record_level(level_cfg, run.path, level_run.path)
        with _log_to(level_run.path / "solve.log"):
            level = solve(level_cfg, level_run, warm)
            log.info("level %d (%d²) done: %s", k, level_cfg.ansatz.resolution, level["metrics"])
        warm = torch.from_numpy(np.load(level_run.solution_npz)["T"])
        chain.append({"level": k, "resolution": level_cfg.ansatz.resolution,
                      "wall_time_s": level["wall_time_s"], "metrics": level["metrics"],
                      **{key: level[key] for key in ("tolerance_met", "stop_reason")
                         if key in level}})
    summary.update({"status": "completed", "levels": chain, "metrics": chain[-1]["metrics"],
                    "wall_time_s": time.perf_counter() - start})
    advice = large_error_advice(cfg, summary["metrics"])
    if advice:
        summary["advice"] = advice
    summary.update({key: chain[-1][key] for key in ("tolerance_met", "stop_reason")
                    if key in chain[-1]})  # the finest level's answer is the chain's
    summary["plots"] = [str(p.relative_to(run.path)) for p in plots.make_chain_plots(run.path)]
    run.write_summary(summary)
    return summary


def chain_levels(cfg: DictConfig) -> list[DictConfig]:
    """The config of each level of a multigrid chain, coarsest first (a UserError unless the
    finest resolution halves ``levels − 1`` times to a grid of at least 3 nodes)."""
    levels, finest = int(cfg.multigrid.levels), int(cfg.ansatz.get("resolution", 0))
    step = 2 ** (levels - 1)
    if finest < 3 or (finest - 1) % step or (finest - 1) // step < 2:
        allowed = [(2 ** k) * step + 1 for k in range(1, 6)]
        raise UserError(f"multigrid.levels={levels} needs ansatz.resolution = m·{step} + 1 with "
                        f"m ≥ 2 (the resolution of the finest level), e.g. {allowed}; got "
                        f"{finest}")
    return [OmegaConf.merge(cfg, {"multigrid": {"levels": 1},
                                  "ansatz": {"resolution": (finest - 1) // 2 ** (levels - 1 - k) + 1}})
            for k in range(levels)]


def _summary_header(cfg: DictConfig, device: torch.device, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "equation": cfg.equation.name, "ansatz": cfg.ansatz.name, "optimizer": cfg.optimizer.name,
        "device": str(device), "precision": cfg.precision, "seed": cfg.seed,
        **distributed.summary_fields(),  # world_size (torchrun), host, pid
        "versions": {"neuralpde": neuralpde_cli.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def validate(cfg: DictConfig) -> None:
    """Every check a run would fail later, made before anything is written (the generic ones
    are in tasks/common.py): evaluation times inside the time interval, the chain's levels,
    the trainer's ranges, then the objects themselves (each option checks its own config),
    the resolution the solver needs, and the run a warm start or a resume reads."""
    if cfg.multigrid.levels < 1:
        raise UserError(f"multigrid.levels={cfg.multigrid.levels} must be ≥ 1 (1: a single level)")
    if cfg.multigrid.levels > 1 and (cfg.equation.name, cfg.ansatz.name) != ("diffusion", "grid"):
        raise UserError(f"multigrid.levels={cfg.multigrid.levels} is a coarse-to-fine chain of "
                        "grids: it applies to equation=diffusion with ansatz=grid only (here "
                        f"equation={cfg.equation.name} ansatz={cfg.ansatz.name}); leave "
                        "multigrid.levels at 1")
    times, t_final = cfg.equation.get("eval_times"), cfg.equation.get("t_final")
    if times is not None and t_final is not None and t_final > 0 \
            and not all(0 <= t <= t_final for t in times):
        raise UserError(f"equation.eval_times={list(times)} must lie in [0, equation.t_final="
                        f"{t_final}]")
    OmegaConf.to_object(cfg.trainer).validate()
    device, dtype = resolve_device(cfg.device.name), resolve_precision(cfg.precision)
    for level_cfg in chain_levels(cfg) if cfg.multigrid.levels > 1 else [cfg]:
        equation, ansatz, solver = build(level_cfg, device, dtype)
        distributed.check_solver(solver, GradientSolver)
        if hasattr(solver, "check_resolution") and hasattr(ansatz, "resolution"):
            solver.check_resolution(int(ansatz.resolution))
    if cfg.init.from_run:
        source = run_source(cfg.init.from_run)
        if not source.is_dir():
            raise UserError(f"init.from_run={source}: no such run directory")
        if not (hasattr(ansatz, "warm_start_from") and (source / "solution.npz").is_file()):
            load_checkpoint(source / "checkpoints" / "last.pt")
    if cfg.get("resume") and cfg.multigrid.levels == 1:
        load_checkpoint(Path(cfg.resume) / "checkpoints" / "last.pt")


def check_choices(args: list[str]) -> None:
    """Name an equation/ansatz/optimizer combination that cannot work before Hydra composes
    (composition would otherwise fail first on a key the other ansatz does not have)."""
    with open(Path(config_dir()) / "solve.yaml", encoding="utf-8") as handle:
        defaults = {k: v for item in yaml.safe_load(handle)["defaults"] if isinstance(item, dict)
                    for k, v in item.items()}
    chosen = {g: defaults.get(g) for g in ("equation", "ansatz", "optimizer")}
    given = {k.lstrip("+"): v for k, _, v in (a.partition("=") for a in args)}
    experiment = Path(config_dir()) / "experiment" / f"{given.get('experiment', '')}.yaml"
    if given.get("experiment") and experiment.is_file():  # its overrides, then the command line's
        with open(experiment, encoding="utf-8") as handle:
            for item in yaml.safe_load(handle).get("defaults", []):
                for key, value in (item.items() if isinstance(item, dict) else []):
                    group = key.replace("override", "").strip().lstrip("/")
                    if group in chosen:
                        chosen[group] = value
    chosen.update({k: v for k, v in given.items() if k in chosen})
    if all(isinstance(v, str) and v in GROUPS[g] for g, v in chosen.items()):
        validate_combination(chosen["equation"], chosen["ansatz"], chosen["optimizer"])


def pre_compose(args: list[str]) -> list[str]:
    """Before Hydra composes: a combination that cannot work is named, and the choices a
    single choice implies (equation=fokker_planck → ansatz=gmm …) are added."""
    extra = implied_choices(args)
    if not any(a.split("=", 1)[0] in ("-h", "--help", "--hydra-help") for a in args):
        check_choices([*args, *extra])
    return extra


HEADLINE = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual")

main = make_main("solve", solve, validate, HEADLINE, schema=SolveConfig,
                 pre_compose=pre_compose, register=register_configs)
