"""``neuralpde tune``: a hyperparameter search with Optuna over ``neuralpde solve`` runs.

The run directory of the command is the study directory: the saved config, ``study.journal``
(the Optuna storage unless ``study.storage`` names another), ``trials/<number>/`` (one complete
solve run directory per trial), ``trials.csv``, ``plots/`` and ``summary.json`` with the best
trial(s). ``study.workers=N`` starts N − 1 more worker processes on the same study; more
workers, on other hosts too, join with ``neuralpde tune resume=DIR`` once this one ended, or
by sharing ``study.storage`` (a database URL) and ``study.name``. ``resume=DIR`` goes on where
a stopped study left off, its interrupted trials resumed from their checkpoints.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.run import study as studies
from neuralpde_cli.run.rundir import RunDir
from neuralpde_cli.tasks.common import RESUME_SAFE, make_main
from neuralpde_cli.training.checkpoint import save_checkpoint


@dataclass
class StudyConfig:
    name: str = "neuralpde"
    #: null: a journal file study.journal in the study directory; or a journal file path, or a
    #: database URL (sqlite:///…, postgresql://…) shared by workers on several hosts
    storage: Optional[str] = None
    n_trials: int = 20
    #: worker processes this command runs on the study (each trial is one solve process)
    workers: int = 1
    sampler: str = "tpe"
    seed: int = 0
    #: median: stop a trial whose error at a step is worse than the median of earlier trials
    #: at that step (single objective only); none: run every trial to the end
    pruner: str = "median"
    prune_startup: int = 3
    prune_warmup: int = 0


@dataclass
class TuneConfig:
    #: overrides every trial's `neuralpde solve` gets
    solve: List[str] = field(default_factory=lambda: ["experiment=smoke"])
    #: "key=<Hydra sweep expression>" per solve key (interval, tag(log, …), choice, range)
    space: List[str] = field(default_factory=list)
    #: summary.json metrics to optimize (several: a multi-objective study)
    objective: List[str] = field(default_factory=lambda: ["rel_l2_error"])
    #: minimize or maximize, one per objective (null: minimize all)
    directions: Optional[List[str]] = None
    study: StudyConfig = field(default_factory=StudyConfig)
    resume: Optional[str] = None


def register() -> None:
    ConfigStore.instance().store(name="tune_schema", node=TuneConfig)


#: what solve runs write to summary.json (``metrics`` by name, per time ``…_t<t>``, run fields)
METRICS = {"rel_l2_error", "rel_l2_log_error", "mean_rel_error", "cov_rel_error", "std_rel_error",
           "mass_error", "grid_rel_l2_error", "max_rel_peak_error", "grid_mass_error", "l1_error",
           "rel_residual", "max_abs_error", *studies.RUN_FIELDS}


def _directions(cfg: DictConfig) -> list[str]:
    return list(cfg.directions) if cfg.directions is not None else ["minimize"] * len(cfg.objective)


def check(cfg: DictConfig) -> None:
    """The study's settings, the search space, and that every trial's solve config composes
    at the ends of every range (so a typo fails now, not in trial 7)."""
    studies.import_optuna()
    study = cfg.study
    for key, low in (("n_trials", 1), ("workers", 1), ("prune_startup", 0), ("prune_warmup", 0)):
        if study[key] < low:
            raise UserError(f"study.{key}={study[key]} must be ≥ {low}")
    check_choice("study.sampler", study.sampler, studies.SAMPLERS)
    check_choice("study.pruner", study.pruner, studies.PRUNERS)
    studies.check_storage(study.storage)
    if not cfg.objective:
        raise UserError("objective=[] is empty: name a metric of summary.json, e.g. "
                        "objective=[rel_l2_error] or objective=[rel_l2_error,wall_time_s]")
    for name in cfg.objective:
        if re.sub(r"_t[0-9.e+-]+$", "", name) not in METRICS:
            raise UserError(f"objective={name} is not a metric the runs write; choose from "
                            f"{sorted(METRICS)} (or one at a time, e.g. rel_l2_error_t1)")
    directions = _directions(cfg)
    if len(directions) != len(cfg.objective) or any(d not in ("minimize", "maximize")
                                                    for d in directions):
        raise UserError(f"directions={directions}: give minimize or maximize for each of the "
                        f"{len(cfg.objective)} objectives {list(cfg.objective)}")
    dims = studies.parse_space(list(cfg.space))
    _check_trials(list(cfg.solve), dims)


def _check_trials(solve: list[str], dims: list[studies.Dimension]) -> None:
    """Compose and check the solve config with each end of each dimension."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from neuralpde_cli.config_errors import composition_errors, coerce_overrides
    from neuralpde_cli.config import SolveConfig, register_configs
    from neuralpde_cli.tasks import solve as solve_task
    from neuralpde_cli.tasks.common import _without_hydra, check_config, config_dir

    if GlobalHydra.instance().is_initialized():  # inside a running Hydra job: checked already
        return
    register_configs()
    variants = [[]] + [[studies.override(d.key, v)] for d in dims for v in d.examples()]
    for extra in variants:
        args = coerce_overrides([*solve, *extra], SolveConfig)
        args += solve_task.pre_compose(args)
        with composition_errors(args, config_dir(), SolveConfig):
            with initialize_config_dir(version_base="1.3", config_dir=config_dir(),
                                       job_name="solve"):
                composed = compose(config_name="solve", overrides=args, return_hydra_config=True)
        cfg = _without_hydra(composed)
        try:
            check_config(cfg)
            solve_task.validate(cfg)
        except UserError as exc:
            which = f"with {extra[0]} " if extra else ""
            raise UserError(f"the trials' solve config {which}(solve={solve}): {exc}") from None


def spec(cfg: DictConfig, study_dir: Path) -> studies.StudySpec:
    s = cfg.study
    return studies.StudySpec(
        study_dir=study_dir, name=s.name, storage_url=s.storage, directions=_directions(cfg),
        objective=list(cfg.objective), solve=list(cfg.solve),
        dims=studies.parse_space(list(cfg.space)), n_trials=s.n_trials, sampler=s.sampler,
        seed=s.seed, pruner=s.pruner, prune_startup=s.prune_startup, prune_warmup=s.prune_warmup)


def spec_from_dir(study_dir: Path) -> studies.StudySpec:
    """A worker's view: the config saved in the study directory (resume changes included)."""
    saved = OmegaConf.merge(OmegaConf.structured(TuneConfig),
                            OmegaConf.load(study_dir / ".hydra" / "config.yaml"))
    return spec(saved, study_dir)


def tune(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    """Run the study in ``run`` (the study directory) with ``study.workers`` processes."""
    plan = spec(cfg, run.path)
    summary = {"status": "running", "study": plan.name,
               "storage": plan.storage_url or str(run.path / "study.journal"),
               "objective": plan.objective, "directions": plan.directions,
               "space": list(cfg.space), "solve": plan.solve}
    run.write_summary(summary)
    study = plan.open(0)
    save_checkpoint(run.checkpoints / "last.pt", {"study": plan.name, "n_trials": plan.n_trials})
    helpers = [subprocess.Popen([sys.executable, "-m", "neuralpde_cli.tasks.tune", "--worker",
                                 str(run.path), str(k)]) for k in range(1, cfg.study.workers)]
    try:
        studies.work(plan, 0)
    finally:
        for proc in helpers:
            if proc.poll() is None and sys.exc_info()[0] is not None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait() for proc in helpers]
    if any(code != 0 for code in codes):
        raise UserError(f"a worker process ended with exit status {max(codes)}; see its "
                        "messages above (neuralpde tune resume=DIR goes on)")
    summary.update(studies.write_results(plan, study))
    best = summary["best"][0]["values"] if summary["best"] else {}
    summary.update({"status": "completed", "metrics": best})
    run.write_summary(summary)
    return summary


HEADLINE = ("rel_l2_error", "rel_l2_log_error", "cov_rel_error", "l1_error", "rel_residual",
            "wall_time_s", "train_time_s", "final_loss")

main = make_main("tune", tune, check, HEADLINE, schema=TuneConfig, register=register,
                 resume_safe=(*RESUME_SAFE, "study.n_trials", "study.workers"))


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # started by tune() above
    signal.signal(signal.SIGTERM, _stop)  # stop the trial's run too (it checkpoints)
    try:
        studies.work(spec_from_dir(Path(sys.argv[2])), int(sys.argv[3]))
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as exc:
        print(f"neuralpde: error: {exc}", file=sys.stderr)
        sys.exit(2)
