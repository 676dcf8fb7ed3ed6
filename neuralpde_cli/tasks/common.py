"""The machinery every subcommand shares: a Hydra task around a body function.

A subcommand module is its body plus one line::

    def simulate_body(cfg: DictConfig, run: RunDir) -> dict: ...   # writes run, returns summary
    main = make_main("simulate", simulate_body, validate=check_simulate, headline=("loglik",))

``make_main`` gives the command its start-up checks (paths, unknown keys, NaN/Inf), resume
(``resume=DIR`` continues a run in DIR with the config saved there), the run directory, and
the way every failure ends: one line ``neuralpde: error: ...`` on stderr, exit 2 for bad input,
3 for a diverged run, 128 + signal for an interrupt, the status recorded in summary.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import numpy as np
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from neuralpde_cli import distributed
from neuralpde_cli.config_errors import coerce_overrides, run_composing
from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import GROUPS, option
from neuralpde_cli.run.atomic import atomic_write
from neuralpde_cli.run.rundir import LOCK_NAME, RunDir, RunLock, check_writable, in_use
from neuralpde_cli.training.checkpoint import describe
from neuralpde_cli.training.trainer import Diverged, Interrupted

log = logging.getLogger(__name__)
#: the final line (done: … or neuralpde: error: …): printed by the task, and logged through
#: this logger to the run's log file only (configs/hydra/job_logging/neuralpde.yaml)
result_log = logging.getLogger("neuralpde_cli.result")

#: the body of a subcommand: runs the job into the run directory, returns the summary written
Body = Callable[[DictConfig, RunDir], dict]
#: the subcommand's own start-up checks; raise UserError naming the key
Validate = Callable[[DictConfig], None]

#: Hydra flags that print and exit without running the task (nothing gets written)
NO_RUN_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
                "--shell-completion")


def config_dir() -> str:
    """Configs ship inside the package (``neuralpde_cli/configs``); a checkout keeps them at the
    top level beside the package."""
    here = Path(__file__).resolve().parent.parent
    installed = here / "configs"
    return str(installed if (installed / "solve.yaml").exists() else here.parent / "configs")


def overrides(args: list[str]) -> dict[str, str]:
    """``key=value`` pairs of a command line (``+key`` as ``key``, quotes kept)."""
    return {k.lstrip("+"): v for k, _, v in (a.partition("=") for a in args if "=" in a)}


def resume_arg(args: list[str]) -> str | None:
    """The DIR of ``resume=DIR`` on a command line, None without one."""
    value = overrides(args).get("resume", "").strip("'\"")
    return value if value not in ("", "null") else None


#: overrides that ``resume=`` accepts: they change how a run is shown, logged, checkpointed
#: or where it computes, never what it computes (``device=X`` stands for ``device.name=X``)
RESUME_SAFE = ("trainer.progress", "trainer.log_every", "trainer.checkpoint_every", "device.name",
               "device.threads")
#: Hydra keys that would move a resumed run out of its directory
_RESUME_FIXED = ("hydra.run.dir", "hydra.sweep.dir", "hydra.output_subdir")


@dataclass(frozen=True)
class Task:
    """One subcommand: its config name, body and checks (see ``make_main``)."""

    name: str
    body: Body
    validate: Validate | None = None
    headline: tuple[str, ...] = ()
    schema: type | None = None
    pre_compose: Callable[[list[str]], list[str]] | None = None
    register: Callable[[], None] | None = None
    resume_safe: tuple[str, ...] = RESUME_SAFE
    #: CPU intra-op threads when ``device.threads=0`` (0: torch's own default)
    threads: int = 0

    # --- before Hydra -------------------------------------------------------------------
    def main(self) -> None:
        """The entry point ``cli.py`` calls with ``sys.argv = [prog, *overrides]``.

        Everything that can reject the command runs here, before Hydra creates a folder or
        writes a file: the config is composed and checked (``validate`` included), then the
        run directory is created and locked, and only then does Hydra run the task in it.
        """
        args = data_path_shorthand(coerce_overrides(sys.argv[1:], self.schema), self.schema)
        extra = self.pre_compose(args) if self.pre_compose is not None else []
        if self.register is not None:
            self.register()
        if any(a.split("=", 1)[0] in NO_RUN_FLAGS for a in args):
            self._hydra([*args, *extra], _Job(self))
            return
        self.check_paths(args)
        multirun = any(a in ("-m", "--multirun") for a in args)
        job = self._prepare_multirun(args, extra) if multirun else \
            self._prepare_resume(args) if resume_arg(args) is not None else \
            self._prepare_run(args, extra)
        try:
            self._hydra(job.argv, job)
        finally:
            if job.lock is not None:
                job.lock.release()

    def _hydra(self, argv: list[str], job: _Job) -> None:
        """Hydra's main on ``argv``; its composition errors become one UserError line."""
        sys.argv = [sys.argv[0], *argv]
        run_composing(hydra.main(version_base="1.3", config_path=config_dir(),
                                 config_name=self.name)(job.task), argv, config_dir(), self.schema)

    def check_paths(self, args: list[str]) -> None:
        """A resume directory must exist, and the output directory (or the folder it would be
        made in) must be writable with room to spare."""
        values = overrides(args)
        resume = resume_arg(args)
        if resume is not None and not Path(resume).expanduser().is_dir():
            raise UserError(f"resume={resume}: no such run directory (resume takes the "
                            f"outputs/DATE/TIME directory of an earlier neuralpde {self.name})")
        multirun = any(a in ("-m", "--multirun") for a in args)
        out = resume if resume is not None else \
            values.get("hydra.sweep.dir" if multirun else "hydra.run.dir", "outputs")
        check_writable(Path(out.split("${")[0] or ".").expanduser(), "the output directory")

    def compose(self, args: list[str]) -> DictConfig | None:
        """The config Hydra will compose for ``args`` (its ``hydra`` node included), or None
        when composition fails: then Hydra itself reports why, before writing anything."""
        try:
            with initialize_config_dir(version_base="1.3", config_dir=config_dir(),
                                       job_name=self.name):
                return compose(config_name=self.name, overrides=args, return_hydra_config=True)
        except Exception:  # noqa: BLE001 - Hydra's own run reports it in its own words
            return None

    def _prepare_run(self, args: list[str], extra: list[str]) -> _Job:
        """Check the composed config, then create and lock its run directory."""
        composed = self.compose([*args, *extra])
        if composed is None:
            return _Job(self, argv=[*args, *extra])
        run_dir = Path(str(composed.hydra.run.dir)).expanduser()
        cfg = _without_hydra(composed)
        self.check(cfg)
        explicit = "hydra.run.dir" in overrides(args)
        # under torchrun rank 0 takes the directory, the other ranks a scratch folder
        place = distributed.one_writer(
            _device_name(cfg), run_dir, explicit,
            lambda: RunLock.claim(run_dir, unique=not explicit, what=f"hydra.run.dir={run_dir}"
                                  if explicit else "the run directory"))
        out, lock = place.folder, place.lock
        argv = [*args, *extra] + ([] if explicit and out == run_dir else [f"hydra.run.dir={out}"])
        return _Job(self, argv=argv, cfg=cfg, out=out, lock=lock)

    def _prepare_multirun(self, args: list[str], extra: list[str]) -> _Job:
        """Lock the sweep directory (each job checks its own config and records a failure in
        its own folder, as a sweep should go on)."""
        if resume_arg(args) is not None:
            raise UserError("resume= continues one run; it cannot be combined with -m")
        distributed.check_single("a sweep (-m)")
        plain = [a for a in args if a.lstrip("+").startswith(("hydra.", "experiment="))
                 and "," not in a]
        composed = self.compose(plain)
        if composed is None:
            return _Job(self, argv=[*args, *extra])
        sweep_dir = Path(str(composed.hydra.sweep.dir)).expanduser()
        explicit = "hydra.sweep.dir" in overrides(args)
        lock = RunLock.claim(sweep_dir, unique=not explicit,
                             what=f"hydra.sweep.dir={sweep_dir}" if explicit else "the sweep directory")
        argv = [*args, *extra] + ([] if explicit else [f"hydra.sweep.dir={lock.folder}"])
        return _Job(self, argv=argv, lock=lock)

    def _prepare_resume(self, args: list[str]) -> _Job:
        """The saved config with the overrides ``resume_safe`` allows applied; anything else
        refused by name. Checked like a new run, then the directory is locked (a run still
        writing it makes this one refuse). Nothing in DIR changes before all of that passed."""
        run_dir = Path(resume_arg(args) or "").expanduser()
        holder = RunLock.holder(run_dir)
        if holder is not None:  # said first: a running run is the reason, whatever else
            raise UserError(in_use(f"resume={run_dir}", run_dir, holder))
        cfg = self.resumed_config(str(run_dir))
        changes, passthrough = self.resume_changes(cfg, args)
        self.check(cfg)
        place = distributed.one_writer(_device_name(cfg), run_dir, True, lambda: RunLock.acquire(
            run_dir, what=f"resume={run_dir}"), resume=True)  # rank 0 only, under torchrun
        lock = place.lock
        if changes and not place.scratch:
            saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
            for key, value in changes.items():
                OmegaConf.update(saved, key, value, merge=False)
            text = OmegaConf.to_yaml(saved)
            atomic_write(run_dir / ".hydra" / "config.yaml", lambda h: h.write(text.encode()))
        argv = [f"resume={run_dir}", *passthrough, f"hydra.run.dir={place.folder}",
                "hydra.output_subdir=.hydra_resume"]
        applied = [f"{k}={v}" for k, v in changes.items()]
        return _Job(self, argv=argv, cfg=cfg, out=place.folder, lock=lock, applied=applied)

    def resume_changes(self, cfg: DictConfig, args: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Apply the command line's overrides to the resumed ``cfg``: those that repeat a saved
        value change nothing, those in ``resume_safe`` are applied; any other one is refused.
        Returns the changed keys with their new values, and Hydra's own overrides to pass on."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        given = [a for a in args if not a.startswith("-") and a.split("=", 1)[0] != "resume"]
        try:
            parsed = OverridesParser.create().parse_overrides(given)
        except Exception as exc:  # noqa: BLE001 - the grammar's message names the override
            raise UserError(f"cannot parse the overrides {given}: {describe(exc)}") from None
        changes: dict[str, Any] = {}
        passthrough, refused = [], []
        for item in parsed:
            key = item.key_or_group
            if key.startswith("hydra.") or key == "hydra":
                (refused if key in _RESUME_FIXED else passthrough).append(item.input_line)
                continue
            if item.is_sweep_override() or item.is_delete():
                refused.append(item.input_line)
                continue
            value = item.value()
            target = f"{key}.name" if key in GROUPS or key == "device" else key
            current = OmegaConf.select(cfg, target, default=_MISSING)
            if current is not _MISSING and _same(current, value):
                continue
            if target not in self.resume_safe:
                refused.append(item.input_line)
                continue
            try:
                OmegaConf.update(cfg, target, value, merge=False)
            except OmegaConfBaseException as exc:
                raise UserError(f"{item.input_line}: {describe(exc)}") from None
            changes[target] = value
        if refused:
            hint = f"; to go on from its result with other settings, start a new run with " \
                f"init.from_run={cfg.resume}" if OmegaConf.select(cfg, "init.from_run",
                                                                  default=_MISSING) is not _MISSING \
                else ""
            raise UserError(f"resume={cfg.resume} continues the run with its saved config; "
                            f"refused: {' '.join(refused)} (resume accepts only "
                            f"{', '.join(self.resume_safe)}, device=NAME and values equal to the "
                            f"saved ones{hint})")
        return changes, passthrough

    def check(self, cfg: DictConfig) -> None:
        """Every start-up check: the generic ones, then the subcommand's own."""
        check_config(cfg)
        if self.validate is not None:
            self.validate(cfg)

    def resumed_config(self, resume: str) -> DictConfig:
        """The config of the run being resumed, read from its own ``.hydra/config.yaml``."""
        run_dir = Path(resume)
        saved = run_dir / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise UserError(f"resume={resume}: {saved} not found; resume takes a run "
                            f"directory written by neuralpde {self.name} (outputs/DATE/TIME)")
        try:
            saved_cfg = OmegaConf.load(saved)
            if isinstance(saved_cfg.get("data"), str) and _has_data_group(self.schema):
                saved_cfg.data = {"path": saved_cfg.data}  # a run from before the data group
            # groups typed Any in the schema get their option's schema
            typed = {g: OmegaConf.structured(option(g, saved_cfg[g].name).config_class)
                     for g in GROUPS if isinstance(saved_cfg.get(g), DictConfig)
                     and "name" in saved_cfg[g]}
            base = [OmegaConf.structured(self.schema)] if self.schema is not None else []
            old = OmegaConf.merge(*base, typed, saved_cfg)
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise UserError(f"resume={resume}: {saved} does not fit this version's config "
                            f"({describe(exc)})") from None
        old.resume = str(run_dir)
        return old


_MISSING = object()


def _has_data_group(schema: type | None) -> bool:
    from dataclasses import fields

    from neuralpde_cli.data import DataConfig
    return schema is not None and any(f.name == "data" and f.default_factory is DataConfig
                                      for f in fields(schema))


def data_path_shorthand(args: list[str], schema: type | None) -> list[str]:
    """``data=PATH`` stands for ``data.path=PATH`` where the schema has the data group (sweeps
    ``data=a.csv,b.csv`` included)."""
    if not _has_data_group(schema):
        return args
    return [f"{a.split('=', 1)[0]}.path={a.split('=', 1)[1]}"
            if a.split("=", 1)[0].lstrip("+") == "data" and "=" in a else a for a in args]


def _same(current: Any, value: Any) -> bool:
    plain = OmegaConf.to_container(current) if isinstance(current, (DictConfig, ListConfig)) \
        else current
    return plain == value and type(plain) is type(value) or \
        (isinstance(plain, float) and isinstance(value, int) and plain == value)


def _device_name(cfg: DictConfig) -> str:
    """The config's device (for the process group's backend); CPU for commands without one."""
    return str(OmegaConf.select(cfg, "device.name", default="cpu"))


def _without_hydra(composed: DictConfig) -> DictConfig:
    """The task's config: Hydra's composition less its ``hydra`` node (as Hydra hands it)."""
    cfg = copy.deepcopy(composed)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


@dataclass
class _Job:
    """One invocation: what Hydra gets, and what ``Task.main`` prepared for the task (the
    checked config, the locked run directory) when it could."""

    spec: Task
    argv: list[str] = dataclasses.field(default_factory=list)
    cfg: DictConfig | None = None
    out: Path | None = None
    lock: RunLock | None = None
    applied: list[str] = dataclasses.field(default_factory=list)

    def task(self, hydra_cfg: DictConfig) -> float | None:
        """The Hydra task: returns the first headline metric (for sweepers) and maps failures
        to exit codes."""
        spec = self.spec
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        cfg = self.cfg if self.cfg is not None else hydra_cfg
        out = self.out if self.out is not None else Path(hc.runtime.output_dir)
        run: RunDir | None = None
        previous_sigterm = _sigterm_raises()
        if self.lock is not None and self.lock.stale and not multirun:
            log.warning("took over %s: its last writer (%s) ended without releasing it "
                        "(killed or crashed)", self.lock.folder / LOCK_NAME, self.lock.stale)
        if self.applied:
            log.info("resumed with %s", " ".join(self.applied))
        try:
            if self.cfg is None:  # a sweep's job (or a config Hydra is about to reject)
                if cfg.get("resume"):
                    raise UserError("resume= continues one run; it cannot be combined with -m")
                spec.check(cfg)
            _set_threads(int(OmegaConf.select(cfg, "device.threads", default=0) or 0)
                         or spec.threads)
            run = RunDir(out)
            summary = spec.body(cfg, run)
            if self.applied:
                summary["resume_overrides"] = self.applied
                run.write_summary(summary)
            metrics = summary.get("metrics", {})
            line = f"done: {out}  " + "  ".join(f"{k}={v:.3e}" for k, v in metrics.items()
                                                if k in spec.headline and isinstance(v, float))
            if summary.get("advice"):  # a large error, and the setting that works
                line += f"  ({summary['advice']})"
            print(line)
            result_log.info(line)
            if summary.get("tolerance_met") is False:
                print(f"neuralpde: warning: {summary.get('stop_reason', 'tolerance not met')}",
                      file=sys.stderr)
            return metrics.get(spec.headline[0]) if spec.headline else None
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            message = str(exc) or f"interrupted by {signal.Signals(signum).name}"
            mark(run, "interrupted", message)
            if run is not None and (run.checkpoints / "last.pt").is_file():
                saved = "; checkpoint written" if getattr(exc, "step", None) is not None else ""
                print(f"neuralpde: {message}{saved}. Resume with: neuralpde {spec.name} "
                      f"resume={out}", file=sys.stderr)
            else:
                print(f"neuralpde: {message} before the first checkpoint; run the same command "
                      "again", file=sys.stderr)
            sys.exit(128 + signum)
        except (UserError, Diverged, OSError, OmegaConfBaseException, *NUMERICAL_BREAKDOWNS) as exc:
            status = "diverged" if isinstance(exc, Diverged) else "failed"
            if isinstance(exc, NUMERICAL_BREAKDOWNS):  # the traceback stays in the log file only
                log.debug("numerical breakdown", exc_info=exc)
            message = describe_error(exc)
            mark(run, status, message)
            print(f"neuralpde: error: {message}", file=sys.stderr)
            result_log.error("neuralpde: error: %s", message)
            if multirun:
                _record_failure(out, status, message)
                return None
            sys.exit(3 if isinstance(exc, Diverged) else 2)
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)


def make_main(name: str, body: Body, validate: Validate | None = None,
              headline: tuple[str, ...] = (), *, schema: type | None = None,
              pre_compose: Callable[[list[str]], list[str]] | None = None,
              register: Callable[[], None] | None = None,
              resume_safe: tuple[str, ...] = RESUME_SAFE, threads: int = 0) -> Callable[[], None]:
    """The ``main`` of a subcommand that composes ``configs/<name>.yaml`` and runs ``body``.

    ``validate`` adds the subcommand's start-up checks to the generic ones (all of them run
    before anything is written); ``headline`` names the summary metrics the final line prints
    (the first is returned to sweepers); ``schema`` is the root structured config (resume
    merges the saved config onto it); ``pre_compose`` sees the raw command line (``--help``
    included) before Hydra composes and returns extra overrides to add; ``register`` stores
    the structured configs in Hydra's ConfigStore; ``resume_safe`` lists the keys that
    ``resume=DIR`` lets a user change; ``threads`` the CPU threads a run uses unless
    ``device.threads`` says otherwise (0: torch's default).
    """
    return Task(name, body, validate, tuple(headline), schema, pre_compose, register,
                tuple(resume_safe), threads).main


def _set_threads(threads: int) -> None:
    """torch's intra-op threads for this process (0: leave torch's default)."""
    if threads < 0:
        raise UserError(f"device.threads={threads} must be ≥ 0 (0: the subcommand's default)")
    if threads > 0:
        torch.set_num_threads(threads)


# --- checks every config gets ----------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Unknown keys, NaN/Inf anywhere, the seed's range."""
    check_known_keys(cfg, "")
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=True), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} must be a finite number")
    seed = cfg.get("seed")
    if isinstance(seed, int) and not -2 ** 63 <= seed < 2 ** 64:
        raise UserError(f"seed={seed} must fit in 64 bits")


def check_known_keys(node: DictConfig, prefix: str) -> None:
    """Keys added with ``+key=value`` that the node's schema does not have are errors."""
    kind = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise UserError(f"unknown config key {prefix}{key}; {prefix.rstrip('.') or 'the config'}"
                            f" has {sorted(known)}")
        child = node.get(key)
        if isinstance(child, DictConfig):
            check_known_keys(child, f"{prefix}{key}.")


def leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every scalar in a plain container."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{key}[{i}]")
    else:
        yield key, value


# --- how a run ends ----------------------------------------------------------------------------
def _sigterm_raises() -> Any:
    """SIGTERM outside the training loop (which checkpoints first) ends the run like Ctrl-C."""
    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return None


#: failures of a numerical method rather than of the input (a factorization of a matrix that
#: stopped being positive definite or invertible): one line for the user, the traceback in the log
NUMERICAL_BREAKDOWNS = (torch.linalg.LinAlgError, np.linalg.LinAlgError, FloatingPointError)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, NUMERICAL_BREAKDOWNS):
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return (f"the numerical method broke down ({first}): the model cannot be followed at "
                "these settings; a smaller optimizer.rtol, other starting values, or a kind "
                "that suits the data may help (the log file has the details)")
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot read or write a file{where}: {exc.strerror or exc}"
    return describe(exc) if isinstance(exc, OmegaConfBaseException) else str(exc)


def mark(run: RunDir | None, status: str, message: str) -> None:
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
