"""The ``neuralpde`` console script: dispatch ``argv[1]`` to a Hydra task.

Hydra has no subcommands, so the dispatcher pops the subcommand and hands the rest of the
command line to that task's ``@hydra.main`` function.
"""

from __future__ import annotations

import sys
from pathlib import Path

from neuralpde_cli import __version__
from neuralpde_cli.errors import UserError

SUBCOMMANDS = {
    "solve": ("neuralpde_cli.tasks.solve", "Solve a PDE with an ansatz; writes a run directory."),
}

USAGE = f"""neuralpde {__version__}: differentiable PDE solving from Hydra configs

Usage: neuralpde <subcommand> [overrides ...]

Subcommands:
{chr(10).join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())}

Try:
  neuralpde solve --help               config groups and their options
  neuralpde solve                      2-D heat with an MLP (about half a minute on a CPU)
  neuralpde solve equation=fokker_planck
  neuralpde solve --cfg job            print the composed config
  neuralpde solve -m optimizer.lr=1e-3,3e-3 ansatz.width=32,64
"""


def _resume_overrides(args: list[str]) -> list[str]:
    """``resume=DIR`` runs inside DIR; Hydra's own record of this call goes to DIR/.hydra_resume/
    so the original ``.hydra/config.yaml`` (the config being resumed) is never overwritten."""
    for arg in args:
        if arg.startswith("resume=") and arg[len("resume="):] not in ("", "null"):
            run_dir = Path(arg[len("resume="):]).expanduser()
            return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra_resume"]
    return []


#: Hydra flags that print and exit without running the task (nothing gets written)
_NO_RUN_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc",
                 "--shell-completion")


def _check_paths(args: list[str]) -> None:
    """Before Hydra writes anything: a resume directory must exist, and the output directory
    (or the folder it would be made in) must be writable with room to spare."""
    if any(a.split("=", 1)[0] in _NO_RUN_FLAGS for a in args):
        return
    from neuralpde_cli.run.rundir import check_writable  # imports torch: not for --help

    values = {k.lstrip("+"): v for k, _, v in (a.partition("=") for a in args if "=" in a)}
    resume = values.get("resume", "").strip("'\"")
    if resume not in ("", "null") and not Path(resume).expanduser().is_dir():
        raise UserError(f"resume={resume}: no such run directory (resume takes the "
                        "outputs/DATE/TIME directory of an earlier neuralpde solve)")
    multirun = any(a in ("-m", "--multirun") for a in args)
    out = resume if resume not in ("", "null") else \
        values.get("hydra.sweep.dir" if multirun else "hydra.run.dir", "outputs")
    check_writable(Path(out.split("${")[0] or ".").expanduser(), "the output directory")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"neuralpde {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"neuralpde: unknown subcommand {name!r}; choose one of {sorted(SUBCOMMANDS)} "
              "(neuralpde --help)", file=sys.stderr)
        return 2
    try:
        _check_paths(rest)
        module = __import__(SUBCOMMANDS[name][0], fromlist=["main"])
        from neuralpde_cli.registry import implied_choices
        sys.argv = [f"neuralpde-{name}", *rest, *implied_choices(rest), *_resume_overrides(rest)]
        module.main()
    except UserError as exc:
        print(f"neuralpde: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a run (a run handles its own, see tasks/solve.py)
        print("neuralpde: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
