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
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import GROUPS, option
from neuralpde_cli.run.rundir import RunDir, check_writable
from neuralpde_cli.training.checkpoint import describe
from neuralpde_cli.training.trainer import Diverged, Interrupted

log = logging.getLogger(__name__)

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

    # --- before Hydra -------------------------------------------------------------------
    def main(self) -> None:
        """The entry point ``cli.py`` calls with ``sys.argv = [prog, *overrides]``."""
        args = sys.argv[1:]
        no_run = any(a.split("=", 1)[0] in NO_RUN_FLAGS for a in args)
        extra: list[str] = []
        if not no_run:
            self.check_paths(args)
        if self.pre_compose is not None:
            extra = self.pre_compose(args)
        sys.argv = [sys.argv[0], *args, *extra, *self.resume_overrides(args)]
        if self.register is not None:
            self.register()
        hydra.main(version_base="1.3", config_path=config_dir(), config_name=self.name)(self.task)()

    def check_paths(self, args: list[str]) -> None:
        """Before Hydra writes anything: a resume directory must exist, and the output directory
        (or the folder it would be made in) must be writable with room to spare."""
        values = overrides(args)
        resume = resume_arg(args)
        if resume is not None and not Path(resume).expanduser().is_dir():
            raise UserError(f"resume={resume}: no such run directory (resume takes the "
                            f"outputs/DATE/TIME directory of an earlier neuralpde {self.name})")
        multirun = any(a in ("-m", "--multirun") for a in args)
        out = resume if resume is not None else \
            values.get("hydra.sweep.dir" if multirun else "hydra.run.dir", "outputs")
        check_writable(Path(out.split("${")[0] or ".").expanduser(), "the output directory")

    @staticmethod
    def resume_overrides(args: list[str]) -> list[str]:
        """``resume=DIR`` runs inside DIR; Hydra's own record of this call goes to
        DIR/.hydra_resume/ so the original ``.hydra/config.yaml`` is never overwritten."""
        resume = resume_arg(args)
        if resume is None:
            return []
        return [f"hydra.run.dir={Path(resume).expanduser()}", "hydra.output_subdir=.hydra_resume"]

    # --- the Hydra task -----------------------------------------------------------------
    def task(self, cfg: DictConfig) -> float | None:
        """Returns the first headline metric (for sweepers); maps failures to exit codes."""
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        out = Path(hc.runtime.output_dir)
        run: RunDir | None = None
        previous_sigterm = _sigterm_raises()
        try:
            if cfg.get("resume"):
                if multirun:
                    raise UserError("resume= continues one run; it cannot be combined with -m")
                cfg = self.resumed_config(cfg)
                out = Path(cfg.resume)
            self.check(cfg)
            run = RunDir(out)
            summary = self.body(cfg, run)
            metrics = summary.get("metrics", {})
            print(f"done: {out}  " + "  ".join(f"{k}={v:.3e}" for k, v in metrics.items()
                                                 if k in self.headline and isinstance(v, float)))
            return metrics.get(self.headline[0]) if self.headline else None
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            message = str(exc) or f"interrupted by {signal.Signals(signum).name}"
            mark(run, "interrupted", message)
            if run is not None and (run.checkpoints / "last.pt").is_file():
                saved = "; checkpoint written" if getattr(exc, "step", None) is not None else ""
                print(f"neuralpde: {message}{saved}. Resume with: neuralpde {self.name} "
                      f"resume={out}", file=sys.stderr)
            else:
                print(f"neuralpde: {message} before the first checkpoint; run the same command "
                      "again", file=sys.stderr)
            sys.exit(128 + signum)
        except (UserError, Diverged, OSError, OmegaConfBaseException) as exc:
            status = "diverged" if isinstance(exc, Diverged) else "failed"
            message = describe_error(exc)
            mark(run, status, message)
            print(f"neuralpde: error: {message}", file=sys.stderr)
            if multirun:
                _record_failure(out, status, message)
                return None
            sys.exit(3 if isinstance(exc, Diverged) else 2)
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)

    def check(self, cfg: DictConfig) -> None:
        """Every start-up check: the generic ones, then the subcommand's own."""
        check_config(cfg)
        if self.validate is not None:
            self.validate(cfg)

    def resumed_config(self, cfg: DictConfig) -> DictConfig:
        """The config of the run being resumed, read from its own ``.hydra/config.yaml``."""
        run_dir = Path(cfg.resume)
        saved = run_dir / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise UserError(f"resume={cfg.resume}: {saved} not found; resume takes a run "
                            f"directory written by neuralpde {self.name} (outputs/DATE/TIME)")
        try:
            saved_cfg = OmegaConf.load(saved)
            # groups typed Any in the schema get their option's schema
            typed = {g: OmegaConf.structured(option(g, saved_cfg[g].name).config_class)
                     for g in GROUPS if isinstance(saved_cfg.get(g), DictConfig)
                     and "name" in saved_cfg[g]}
            base = [OmegaConf.structured(self.schema)] if self.schema is not None else []
            old = OmegaConf.merge(*base, typed, saved_cfg)
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise UserError(f"resume={cfg.resume}: {saved} does not fit this version's config "
                            f"({describe(exc)})") from None
        old.resume = str(run_dir)
        return old


def make_main(name: str, body: Body, validate: Validate | None = None,
              headline: tuple[str, ...] = (), *, schema: type | None = None,
              pre_compose: Callable[[list[str]], list[str]] | None = None,
              register: Callable[[], None] | None = None) -> Callable[[], None]:
    """The ``main`` of a subcommand that composes ``configs/<name>.yaml`` and runs ``body``.

    ``validate`` adds the subcommand's start-up checks to the generic ones; ``headline`` names
    the summary metrics the final line prints (the first is returned to sweepers); ``schema``
    is the root structured config (resume merges the saved config onto it); ``pre_compose``
    sees the raw command line (``--help`` included) before Hydra composes and returns extra
    overrides to add;
    ``register`` stores the structured configs in Hydra's ConfigStore.
    """
    return Task(name, body, validate, tuple(headline), schema, pre_compose, register).main


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


def describe_error(exc: BaseException) -> str:
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
