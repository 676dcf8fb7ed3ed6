"""``neuralpde solve``: config → equation + ansatz → solver → run directory.

The task function stays thin: it builds the pieces named by the config, hands them to the
solver the ``optimizer`` group chose, and writes what the run produced. Bad input of any kind
ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import hydra
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import neuralpde_cli
from neuralpde_cli.config import register_configs
from neuralpde_cli.device import resolve_device, resolve_precision
from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import GROUPS, option, validate_combination
from neuralpde_cli.run import plots
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.training.checkpoint import describe, load_checkpoint
from neuralpde_cli.training.trainer import Diverged, Interrupted

log = logging.getLogger(__name__)


def _config_dir() -> str:
    """Configs ship inside the package (``neuralpde_cli/configs``); a checkout keeps them at the
    top level beside the package."""
    here = Path(__file__).resolve().parent.parent
    installed = here / "configs"
    return str(installed if (installed / "solve.yaml").exists() else here.parent / "configs")


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
    summary["wall_time_s"] = time.perf_counter() - start + float(result.get("resumed_elapsed_s", 0))
    run.write_summary(summary)
    summary["plots"] = [str(p.relative_to(run.path)) for p in plots.make_plots(run.path)]
    run.write_summary(summary)
    return summary


def _warm_start(cfg: DictConfig, ansatz: Any, warm: torch.Tensor | None,
                device: torch.device) -> None:
    """Start from a coarser level's values, or from an earlier run (``init.from_run``)."""
    if warm is None and cfg.init.from_run:
        source = Path(cfg.init.from_run)
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


def solve_chain(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Coarse to fine: level k solves at (n − 1)/2^(L−1−k) + 1 nodes, warm-started from k − 1.

    Each level is a complete run directory ``level_<k>/``; the chain's summary lists them.
    """
    levels, finest = int(cfg.multigrid.levels), int(cfg.ansatz.get("resolution", 0))
    step = 2 ** (levels - 1)
    if finest < 3 or (finest - 1) % step or (finest - 1) // step < 2:
        allowed = [(2 ** k) * step + 1 for k in range(1, 6)]
        raise UserError(f"multigrid.levels={levels} needs ansatz.resolution = m·{step} + 1 with "
                        f"m ≥ 2 (the resolution of the finest level), e.g. {allowed}; got "
                        f"{finest}")
    start = time.perf_counter()
    device = resolve_device(cfg.device.name)
    summary = _summary_header(cfg, device, "running")
    run.write_summary(summary)
    chain, warm = [], None
    for k in range(levels):
        level_cfg = OmegaConf.merge(cfg, {"multigrid": {"levels": 1},
                                          "ansatz": {"resolution": (finest - 1) // 2 ** (levels - 1 - k) + 1}})
        level_run = RunDir(run.path / f"level_{k}")
        level = solve(level_cfg, level_run, warm)
        warm = torch.from_numpy(np.load(level_run.solution_npz)["T"])
        chain.append({"level": k, "resolution": level_cfg.ansatz.resolution,
                      "wall_time_s": level["wall_time_s"], "metrics": level["metrics"]})
        log.info("level %d (%d²): %s", k, level_cfg.ansatz.resolution, level["metrics"])
    summary.update({"status": "completed", "levels": chain, "metrics": chain[-1]["metrics"],
                    "wall_time_s": time.perf_counter() - start})
    summary["plots"] = [str(p.relative_to(run.path)) for p in plots.make_chain_plots(run.path)]
    run.write_summary(summary)
    return summary


def _summary_header(cfg: DictConfig, device: torch.device, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "equation": cfg.equation.name, "ansatz": cfg.ansatz.name, "optimizer": cfg.optimizer.name,
        "device": str(device), "precision": cfg.precision, "seed": cfg.seed,
        "versions": {"neuralpde": neuralpde_cli.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _resumed_config(cfg: DictConfig) -> DictConfig:
    """The config of the run being resumed, read from its own ``.hydra/config.yaml``."""
    run_dir = Path(cfg.resume)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={cfg.resume}: {saved} not found; resume takes a run directory "
                        "written by neuralpde solve (outputs/DATE/TIME)")
    try:
        saved_cfg = OmegaConf.load(saved)
        # the schema types equation/ansatz/optimizer as Any: give each its option's schema
        typed = {g: OmegaConf.structured(option(g, saved_cfg[g].name).config_class)
                 for g in ("equation", "ansatz", "optimizer")}
        old = OmegaConf.merge(OmegaConf.structured(_schema()), typed, saved_cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise UserError(f"resume={cfg.resume}: {saved} does not fit this version's config "
                        f"({describe(exc)})") from None
    old.resume = str(run_dir)
    return old


def _schema() -> Any:
    from neuralpde_cli.config import SolveConfig
    return SolveConfig


def validate(cfg: DictConfig) -> None:
    """Start-up checks no option's own code makes: unknown keys, NaN/Inf anywhere, the seed's
    range, evaluation times inside the time interval, the trainer's ranges."""
    _check_known_keys(cfg, "")
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} must be a finite number")
    if not -2 ** 63 <= cfg.seed < 2 ** 64:
        raise UserError(f"seed={cfg.seed} must fit in 64 bits")
    if cfg.multigrid.levels < 1:
        raise UserError(f"multigrid.levels={cfg.multigrid.levels} must be ≥ 1 (1: a single level)")
    times, t_final = cfg.equation.get("eval_times"), cfg.equation.get("t_final")
    if times is not None and t_final is not None and t_final > 0 \
            and not all(0 <= t <= t_final for t in times):
        raise UserError(f"equation.eval_times={list(times)} must lie in [0, equation.t_final="
                        f"{t_final}]")
    OmegaConf.to_object(cfg.trainer).validate()


def _check_known_keys(node: DictConfig, prefix: str) -> None:
    """Keys added with ``+key=value`` that the node's schema does not have are errors."""
    kind = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise UserError(f"unknown config key {prefix}{key}; {prefix.rstrip('.') or 'the config'}"
                            f" has {sorted(known)}")
        child = node.get(key)
        if isinstance(child, DictConfig):
            _check_known_keys(child, f"{prefix}{key}.")


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every scalar in a plain container."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, value


def _sigterm_raises() -> Any:
    """SIGTERM outside the training loop (which checkpoints first) ends the run like Ctrl-C."""
    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot read or write a file{where}: {exc.strerror or exc}"
    return describe(exc) if isinstance(exc, OmegaConfBaseException) else str(exc)


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: returns the final error (for sweepers) and maps failures to exit codes."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    run: RunDir | None = None
    previous_sigterm = _sigterm_raises()
    try:
        if cfg.get("resume"):
            if multirun:
                raise UserError("resume= continues one run; it cannot be combined with -m")
            cfg = _resumed_config(cfg)
            out = Path(cfg.resume)
        validate(cfg)
        run = RunDir(out)
        summary = solve(cfg, run)
        error = summary.get("metrics", {}).get("rel_l2_error")
        print(f"done: {out}  " + "  ".join(f"{k}={v:.3e}" for k, v in summary.get("metrics", {}).items()
                                             if k in _HEADLINE and isinstance(v, float)))
        return error
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        message = str(exc) or f"interrupted by {signal.Signals(signum).name}"
        _mark(run, "interrupted", message)
        if run is not None and (run.checkpoints / "last.pt").is_file():
            saved = "; checkpoint written" if getattr(exc, "step", None) is not None else ""
            print(f"neuralpde: {message}{saved}. Resume with: neuralpde solve resume={out}",
                  file=sys.stderr)
        else:
            print(f"neuralpde: {message} before the first checkpoint; run the same command again",
                  file=sys.stderr)
        sys.exit(128 + signum)
    except (UserError, Diverged, OSError, OmegaConfBaseException) as exc:
        status = "diverged" if isinstance(exc, Diverged) else "failed"
        message = _describe(exc)
        _mark(run, status, message)
        print(f"neuralpde: error: {message}", file=sys.stderr)
        if multirun:
            _record_failure(out, status, message)
            return None
        sys.exit(3 if isinstance(exc, Diverged) else 2)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


_HEADLINE = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual")


def _mark(run: RunDir | None, status: str, message: str) -> None:
    """Record a run's end in its summary without touching anything else it wrote."""
    if run is None:
        return
    try:
        summary = run.read_summary()
        summary.update({"status": status, "error": message})
        run.write_summary(summary)
    except (OSError, ValueError):  # a full disk or a torn summary: the error line still prints
        log.warning("could not record status %s in %s", status, run.summary_json)


def _record_failure(out: Path, status: str, message: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    if not path.exists():
        path.write_text(json.dumps({"status": status, "error": message}))


def check_choices(args: list[str]) -> None:
    """Name an equation/ansatz/optimizer combination that cannot work before Hydra composes
    (composition would otherwise fail first on a key the other ansatz does not have)."""
    with open(Path(_config_dir()) / "solve.yaml", encoding="utf-8") as handle:
        defaults = {k: v for item in yaml.safe_load(handle)["defaults"] if isinstance(item, dict)
                    for k, v in item.items()}
    chosen = {g: defaults.get(g) for g in ("equation", "ansatz", "optimizer")}
    given = {k.lstrip("+"): v for k, _, v in (a.partition("=") for a in args)}
    experiment = Path(_config_dir()) / "experiment" / f"{given.get('experiment', '')}.yaml"
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


def main() -> None:
    if not any(a.split("=", 1)[0] in ("-h", "--help", "--hydra-help") for a in sys.argv[1:]):
        check_choices(sys.argv[1:])
    register_configs()
    hydra.main(version_base="1.3", config_path=_config_dir(), config_name="solve")(task)()
