"""An Optuna study over ``neuralpde solve`` runs: the search space, the workers, the plots.

Each trial is a ``neuralpde solve`` process writing its own run directory
``<study dir>/trials/<number>``; its objective is read from that run's summary.json, and
pruning reads the error column the trainer already writes to metrics.csv while it runs (a
pruned run is stopped with SIGTERM, which checkpoints it). The study itself lives in an Optuna
storage (a journal file in the study directory by default, or a database URL), so several
worker processes, on one host or several, share it; a trial whose worker died is found by its
free worker lock and resumed from its checkpoint by the next worker that starts.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from neuralpde_cli.errors import UserError

log = logging.getLogger(__name__)

#: keys of summary.json (outside ``metrics``) a study may optimize
RUN_FIELDS = ("wall_time_s", "train_time_s", "final_loss", "steps")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
TRIALS = "trials"
WORKER_LOCK = ".tune-worker.lock"
#: seconds between looks at a running trial's metrics.csv
POLL_S = 0.5


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError('neuralpde tune needs Optuna: pip install "neuralpde[tune]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# --- the search space ----------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One key of the search space: a float or integer interval, or a list of choices."""

    key: str
    kind: str  # "float" | "int" | "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def examples(self) -> list[Any]:
        """Values that span the dimension (each is composed once before the study starts)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


SPACE_FORMS = ("interval(low, high)", "tag(log, interval(low, high))",
               "tag(int, interval(low, high))", "choice(a, b, ...)", "range(start, stop[, step])")


def parse_space(space: list[str]) -> list[Dimension]:
    """The space as written in the config (``key=<Hydra sweep expression>`` per entry), or a
    UserError naming the entry that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    if not space:
        raise UserError("space is empty: give the keys to search, e.g. "
                        "'space=[\"optimizer.lr=tag(log, interval(1e-4, 1e-2))\"]' or "
                        "search=mlp_heat (configs/search/)")
    parser = OverridesParser.create()
    dims = []
    for entry in space:
        key, sep, expr = str(entry).partition("=")
        if not sep or not key.strip():
            raise UserError(f"space entry {entry!r}: write key=expression, e.g. "
                            "optimizer.lr=tag(log, interval(1e-4, 1e-2))")
        key = key.strip()
        where = f"space entry {key}={expr}"
        allowed = f"write one of {', '.join(SPACE_FORMS)}"
        try:
            value = parser.parse_override(f"{key}={expr}").value()
        except Exception as exc:  # noqa: BLE001 - Hydra's grammar names the problem
            raise UserError(f"{where} does not parse ({str(exc).splitlines()[0]}); "
                            f"{allowed}") from None
        tags = set(getattr(value, "tags", set()))
        if tags - {"log", "int"}:
            raise UserError(f"{where}: unknown tag {sorted(tags - {'log', 'int'})}; tags are log "
                            "and int")
        if isinstance(value, IntervalSweep):
            low, high = float(value.start), float(value.end)
            kind = "int" if "int" in tags else "float"
            if not low < high or ("log" in tags and low <= 0):
                raise UserError(f"{where}: needs low < high" + (" and low > 0 on a log scale"
                                                                   if "log" in tags else ""))
            if kind == "int" and not (low.is_integer() and high.is_integer()):
                raise UserError(f"{where}: an integer interval needs integer bounds")
            dims.append(Dimension(key, kind, low, high, log="log" in tags))
        elif isinstance(value, RangeSweep):
            if any(not float(v).is_integer() for v in (value.start, value.stop, value.step)):
                raise UserError(f"{where}: range takes integers; for floats use interval(low, high)")
            start, stop, step = int(value.start), int(value.stop), int(value.step)
            if step <= 0 or stop - step < start:
                raise UserError(f"{where}: range(start, stop, step) needs step > 0 and at "
                                "least two values (stop is excluded)")
            last = start + (stop - 1 - start) // step * step
            dims.append(Dimension(key, "int", start, last, step=step))
        elif isinstance(value, ChoiceSweep):
            choices = tuple(value.list)
            if len(choices) < 2 or any(isinstance(c, (dict, list)) for c in choices):
                raise UserError(f"{where}: choice needs two or more plain values")
            dims.append(Dimension(key, "choice", choices=choices))
        else:
            raise UserError(f"{where} is a single value, not a range to search; {allowed} "
                            "(fixed settings go in solve=[...])")
    return dims


def override(key: str, value: Any) -> str:
    """A trial's value as a solve override (floats in full precision)."""
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


# --- objectives ------------------------------------------------------------------------------
def metric(summary: dict[str, Any], name: str) -> float | None:
    """An objective's value in a run's summary.json: a metric, or a run field (wall time …)."""
    value = summary.get("metrics", {}).get(name, summary.get(name) if name in RUN_FIELDS else None)
    return float(value) if isinstance(value, (int, float)) and value is not None else None


def written_metrics(summary: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in summary.get("metrics", {}).items()
                  if isinstance(v, (int, float))) + [k for k in RUN_FIELDS if k in summary]


# --- storage, locks ----------------------------------------------------------------------------
def storage(url: str | None, study_dir: Path) -> Any:
    """The study's Optuna storage: a journal file (default ``study.journal`` in the study
    directory; one host, or a shared file system with working locks) or a database URL."""
    optuna = import_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None or "://" not in url:
        path = Path(url).expanduser() if url else study_dir / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    return optuna.storages.RDBStorage(url)


def check_storage(url: str | None) -> None:
    if url is None or "://" not in url:
        return
    scheme = url.split("://", 1)[0]
    if not scheme.split("+")[0] in ("sqlite", "postgresql", "mysql"):
        raise UserError(f"study.storage={url}: give a journal file path, or a database URL "
                        "(sqlite:///study.db, postgresql://user@host/db, mysql://...)")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` for the body (between the workers of one study)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _hold(path: Path) -> int | None:
    """Take the worker lock of a trial without waiting: the fd, or None if a worker holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def _release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# --- the worker ------------------------------------------------------------------------------
@dataclass
class StudySpec:
    """Everything a worker needs, read from the study directory's saved config."""

    study_dir: Path
    name: str
    storage_url: str | None
    directions: list[str]
    objective: list[str]
    solve: list[str]
    dims: list[Dimension]
    n_trials: int
    sampler: str
    seed: int
    pruner: str
    prune_startup: int
    prune_warmup: int

    def trial_dir(self, number: int) -> Path:
        return self.study_dir / TRIALS / f"{number:04d}"

    def open(self, worker: int) -> Any:
        """The shared study; worker k samples with seed + k (the same seed, the same trials).
        A restarted study's samplers start from a seed of their own (else a random start
        would repeat the trials it already ran)."""
        optuna = import_optuna()
        pruner = optuna.pruners.MedianPruner(n_startup_trials=self.prune_startup,
                                             n_warmup_steps=self.prune_warmup) \
            if self.pruner == "median" and len(self.objective) == 1 else optuna.pruners.NopPruner()
        study = optuna.create_study(storage=storage(self.storage_url, self.study_dir),
                                    study_name=self.name, directions=self.directions,
                                    pruner=pruner, load_if_exists=True)
        seed = self.seed + worker + 1009 * len(study.get_trials(deepcopy=False))
        study.sampler = optuna.samplers.RandomSampler(seed=seed) if self.sampler == "random" \
            else optuna.samplers.TPESampler(seed=seed,
                                            n_startup_trials=min(10, max(2, self.n_trials // 3)))
        return study


class ObjectiveMissing(UserError):
    """The runs do not write a metric the study optimizes."""


def work(spec: StudySpec, worker: int = 0) -> int:
    """Take trials until the study has ``n_trials``: first any whose worker died (resumed from
    its checkpoint), then new ones. Returns the number of trials this worker finished."""
    optuna = import_optuna()
    study = spec.open(worker)
    done = 0
    while True:
        with file_lock(spec.study_dir / ".tune-ask.lock"):  # exactly n_trials, none twice
            trials = study.get_trials(deepcopy=False)
            claimed = None
            for old in trials:
                if old.state == optuna.trial.TrialState.RUNNING:
                    fd = _hold(spec.trial_dir(old.number) / WORKER_LOCK)
                    if fd is not None:  # its worker is gone: take it over
                        claimed = (optuna.trial.Trial(study, old._trial_id), fd, True)
                        break
            if claimed is None:
                if len(trials) >= spec.n_trials:
                    return done
                trial = study.ask()
                fd = _hold(spec.trial_dir(trial.number) / WORKER_LOCK)
                assert fd is not None, "a new trial's lock is free"
                claimed = (trial, fd, False)
        trial, fd, again = claimed
        try:
            state, values = run_trial(spec, trial, again)
            if state == "complete":
                study.tell(trial, values if len(values) > 1 else values[0])
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned"
                           else optuna.trial.TrialState.FAIL)
            done += 1
        except ObjectiveMissing:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            _release(fd)


def run_trial(spec: StudySpec, trial: Any, again: bool) -> tuple[str, list[float]]:
    """Run one trial's ``neuralpde solve``; returns (complete|pruned|failed, objective values)."""
    params = {d.key: d.suggest(trial) for d in spec.dims}
    run_dir = spec.trial_dir(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker_pid", os.getpid())
    resume = again and (run_dir / "checkpoints" / "last.pt").is_file() \
        and (run_dir / ".hydra" / "config.yaml").is_file()
    args = [f"resume={run_dir}"] if resume else \
        [*spec.solve, *(override(k, v) for k, v in params.items()), f"hydra.run.dir={run_dir}",
         "trainer.progress=false"]
    how = "resumed" if resume else "started"
    print(f"tune: trial {trial.number} {how} ({' '.join(override(k, v) for k, v in params.items())})",
          flush=True)
    with open(run_dir / "trial_output.txt", "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "neuralpde_cli.cli", "solve", *args],
                                stdout=out, stderr=subprocess.STDOUT)
        pruned = _watch(spec, trial, proc, run_dir / "metrics.csv")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if pruned:
        print(f"tune: trial {trial.number} pruned at step {pruned}", flush=True)
        return "pruned", []
    if proc.returncode != 0 or summary.get("status") != "completed":
        if proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM) or proc.returncode < 0:
            raise KeyboardInterrupt  # the worker is being stopped: leave the trial running
        print(f"tune: trial {trial.number} failed: {summary.get('error', f'exit {proc.returncode}')}"
              f" (see {run_dir / 'trial_output.txt'})", flush=True)
        return "failed", []
    values = [metric(summary, name) for name in spec.objective]
    missing = [n for n, v in zip(spec.objective, values) if v is None]
    if missing:
        raise ObjectiveMissing(f"objective={missing[0]}: the runs do not write it (trial "
                               f"{trial.number}'s summary.json has {written_metrics(summary)})")
    text = "  ".join(f"{n}={v:.3e}" for n, v in zip(spec.objective, values))
    print(f"tune: trial {trial.number} {text}  {run_dir}", flush=True)
    return "complete", [float(v) for v in values]  # type: ignore[arg-type]


def _watch(spec: StudySpec, trial: Any, proc: subprocess.Popen, metrics_csv: Path) -> int | None:
    """Wait for the run, reporting its error column to the pruner; stop it (SIGTERM: it
    checkpoints) when the pruner says so. Returns the step it was pruned at, or None."""
    column = spec.objective[0]
    seen = 0
    prune = len(spec.objective) == 1 and spec.pruner != "none"
    try:
        while True:
            finished = proc.poll() is not None
            if prune and metrics_csv.is_file():
                with metrics_csv.open(newline="") as handle:
                    rows = list(csv.DictReader(handle))
                for row in rows[seen:]:
                    if row.get(column) not in (None, "") and row.get("step"):
                        value = float(row[column])
                        if math.isfinite(value):
                            trial.report(value, int(row["step"]))
                            if not finished and trial.should_prune():
                                proc.send_signal(signal.SIGTERM)
                                proc.wait()
                                return int(row["step"])
                seen = len(rows)
            if finished:
                return None
            time.sleep(POLL_S)
    except BaseException:
        if proc.poll() is None:  # the worker is stopped: its run checkpoints and stops too
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        raise


# --- what a study leaves -----------------------------------------------------------------------
def write_results(spec: StudySpec, study: Any) -> dict[str, Any]:
    """trials.csv, the plots, and the study's summary fields."""
    optuna = import_optuna()
    trials = study.get_trials(deepcopy=False)
    keys = [d.key for d in spec.dims]
    with (spec.study_dir / "trials.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", *spec.objective, *keys, "duration_s", "run_dir"])
        for t in trials:
            values = t.values or [None] * len(spec.objective)
            duration = t.duration.total_seconds() if t.duration is not None else None
            writer.writerow([t.number, t.state.name, *values, *(t.params.get(k) for k in keys),
                             duration, t.user_attrs.get("run_dir", "")])
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trials if complete else []
    return {"n_trials": len(trials), "trials": {k: v for k, v in counts.items() if v},
            "best": [{"number": t.number, "values": dict(zip(spec.objective, t.values)),
                      "params": t.params, "run_dir": t.user_attrs.get("run_dir")} for t in best],
            "plots": [str(p.relative_to(spec.study_dir)) for p in plot_study(spec, study)]}


def plot_study(spec: StudySpec, study: Any) -> list[Path]:
    """Optimization history (or the Pareto front), parameter importances, parallel coordinates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    folder = spec.study_dir / "plots"
    folder.mkdir(exist_ok=True)
    single = len(spec.objective) == 1
    name = spec.objective[0]
    first = [t.values[0] for t in study.get_trials(deepcopy=False) if t.values]
    if first and min(first) > 0 and max(first) > 10 * min(first):  # errors over decades
        target, name = (lambda t: math.log10(t.values[0])), f"log10 {name}"
    else:
        target = None if single else (lambda t: t.values[0])
    plots = {
        "history.png" if single else "pareto_front.png":
            (lambda: vis.plot_optimization_history(study, target_name=spec.objective[0])) if single else
            (lambda: vis.plot_pareto_front(study, target_names=spec.objective)),
        "importances.png": lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target=target, target_name=name),
        "parallel_coordinates.png": lambda: vis.plot_parallel_coordinate(
            study, target=target, target_name=name),
    }
    written = []
    for file, draw in plots.items():
        try:
            ax = draw()
        except Exception as exc:  # noqa: BLE001 - a plot this study cannot have (too few trials)
            log.info("plots/%s skipped: %s", file, exc)
            continue
        fig = getattr(ax, "figure", None) or ax.flat[0].figure
        if single and file == "history.png":
            ax.set_yscale("log")
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(folder / file, dpi=110)
        plt.close(fig)
        written.append(folder / file)
    return written

