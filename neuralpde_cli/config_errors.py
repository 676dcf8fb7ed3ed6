"""Hydra's composition errors as one ``neuralpde: error: …`` line, and the int → float fix.

Hydra reports a typo in a group or key, a wrong type or an unknown option in 5–12 lines with
exit status 1 (and the config search path). :func:`run_composing` runs a Hydra main with
``HYDRA_FULL_ERROR`` set, so those exceptions reach it, and turns each into a
:class:`~neuralpde_cli.errors.UserError` naming the key, what was given and what is allowed,
with a "did you mean" for near misses (exit status 2, like every other bad input).

OmegaConf accepts ``[1, 2]`` for a ``list[float]`` but not ``[[1, 2], [3, 4]]`` for a
``list[list[float]]`` (a merge of nested lists does not convert); :func:`coerce_overrides`
writes the integers of such command-line values as floats first, where the schema says float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from neuralpde_cli.errors import UserError
from neuralpde_cli.registry import GROUPS


# --- the schema, looked up by dotted key --------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a hint that cannot be resolved: no hints
        return {}


def _children(cls: Any, name: str, top: bool) -> list[Any]:
    """The types a key ``name`` of ``cls`` can have (a group typed Any: each option's schema)."""
    hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
    if name not in hints:
        return []
    hint = hints[name]
    if top and hint is Any and name in GROUPS:
        return [option.config_class for option in GROUPS[name].values()]
    return [hint]


def schema_field(key: str, root: type | None) -> tuple[Any, Any] | None:
    """(type hint, default) of a dotted key in the schema, or None when no schema has it; for a
    group whose options differ (equation, ansatz, optimizer) the first option that has it."""
    if root is None:
        return None
    parts = key.split(".")
    owners: list[Any] = [root]
    for i, part in enumerate(parts):
        found = [(owner, hint) for owner in owners for hint in _children(owner, part, i == 0)]
        if not found:
            return None
        if i == len(parts) - 1:
            owner, hint = found[0]
            return hint, _default(owner, part)
        owners = [hint for _, hint in found if dataclasses.is_dataclass(hint)]
    return None


def _default(owner: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(owner):
        return None
    for f in dataclasses.fields(owner):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def describe_type(hint: Any) -> str:
    """``an integer``, ``a number``, ``a list of numbers``, ``a matrix (a list of rows)`` …"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin is list:
        inner = args[0] if args else Any
        if typing.get_origin(inner) is list:
            return "a matrix (a list of rows of numbers)"
        return f"a list of {_plural(inner)}"
    if origin is dict:
        return "a mapping {name: value}"
    if dataclasses.is_dataclass(hint):
        return "a group of keys (" + ", ".join(f.name for f in dataclasses.fields(hint)) + ")"
    return "a value"


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, "values")


def _float_leaf(hint: Any) -> bool:
    """A list type whose innermost elements are floats (``list[float]``, ``list[list[float]]``)."""
    while typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        if not args:
            return False
        hint = args[0]
        if hint is float:
            return True
    return False


def _compact(value: Any) -> str:
    """A value as a command-line override writes it: ``[[1.0,0.0],[0.0,1.0]]``, ``{a:1.0}``."""
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_compact(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# --- integers written as floats in list overrides -----------------------------------------------
def coerce_overrides(args: list[str], schema: type | None) -> list[str]:
    """``key=[[1,2],[3,4]]`` → ``key=[[1.0,2.0],[3.0,4.0]]`` where the schema says float (sweeps
    of such lists as well); everything else unchanged (Hydra reports what it cannot parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            out.append(arg)
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # noqa: BLE001 - a syntax error: Hydra names it
            out.append(arg)
            continue
        found = schema_field(override.key_or_group, schema)
        if found is None or not _float_leaf(found[0]) or override.is_delete():
            out.append(arg)
            continue
        value = override.value()
        choices = getattr(value, "list", None) if override.is_sweep_override() else [value]
        depth = _list_depth(found[0])
        if not isinstance(choices, list) or not all(_shaped(c, depth) for c in choices) \
                or not any(_has_int(c) for c in choices):
            out.append(arg)
            continue
        out.append(arg.split("=", 1)[0] + "=" + ",".join(_compact(_floats(c)) for c in choices))
    return out


def _list_depth(hint: Any) -> int:
    depth = 0
    while typing.get_origin(hint) is list:
        depth, hint = depth + 1, (typing.get_args(hint) or (Any,))[0]
    return depth


def _shaped(value: Any, depth: int) -> bool:
    """``value`` is a list nested ``depth`` deep with numbers at the bottom (a value of another
    shape is left for the schema to reject as given)."""
    if depth == 0:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) and all(_shaped(v, depth - 1) for v in value)


def _has_int(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_int(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _floats(value: Any) -> Any:
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# --- Hydra's exceptions as one line -------------------------------------------------------------
@contextlib.contextmanager
def composition_errors(args: list[str], groups_dir: str, schema: type | None) -> Iterator[None]:
    """Inside: a Hydra composition error (bad key, option, type, syntax) raised by
    ``hydra.compose`` or a Hydra main becomes a UserError naming it. ``groups_dir`` is the
    config folder (its sub-folders are the groups), ``schema`` the root structured config (the
    types the message names). A Hydra main reports instead of raising unless
    ``HYDRA_FULL_ERROR`` is set: it is, while inside."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(describe_composition_error(exc, args, groups_dir, schema)) from None
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def run_composing(main: Callable[[], None], args: list[str], groups_dir: str,
                  schema: type | None) -> None:
    """Run a Hydra main inside :func:`composition_errors`."""
    with composition_errors(args, groups_dir, schema):
        main()


def _first_line(exc: BaseException | None) -> str:
    lines = str(exc or "").strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _given(args: Iterable[str], key: str) -> str | None:
    """The ``key=value`` text of the command line that sets ``key`` (``+key`` too)."""
    for arg in args:
        name, sep, _ = arg.partition("=")
        if sep and name.lstrip("+~") == key:
            return arg
    return None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def _groups(groups_dir: str) -> list[str]:
    root = Path(groups_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yaml"))
                  and not p.name.startswith(("_", "experiment_options")))


_LAUNCHERS = 'pip install "neuralpde[launchers]" (hydra-joblib-launcher, hydra-submitit-launcher)'
_BROKEN = ("is not supported: its Hydra 1.2/1.3 plugin breaks Hydra's plugin discovery on Python "
           "3.11 (and every Hydra app with it); search with neuralpde tune instead")
#: Hydra plugins by the config they provide: what to install, or why not
PLUGINS = {
    **{f"hydra/launcher/{name}": _LAUNCHERS
       for name in ("joblib", "submitit_local", "submitit_slurm")},
    "hydra/sweeper/optuna": "neuralpde does not use hydra-optuna-sweeper (it pins optuna < 3); "
                            'use neuralpde tune (pip install "neuralpde[tune]")',
    "hydra/sweeper/ax": f"the Ax sweeper {_BROKEN}",
    "hydra/sweeper/nevergrad": f"the Nevergrad sweeper {_BROKEN}",
}


def describe_composition_error(exc: BaseException, args: list[str], groups_dir: str,
                               schema: type | None) -> str:
    """One line for a Hydra composition exception (see the module docstring)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = exc.__cause__ if exc.__cause__ is not None else exc
    message = str(exc)
    plugin = PLUGINS.get(str(getattr(exc, "missing_cfg_file", None) or ""))
    if isinstance(exc, MissingConfigException) and plugin is not None:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        preset = re.match(r"In '([^']+)/([^'/]+)'", message)
        via = f"{group}={preset.group(2)} needs " if preset and preset.group(1) == group else ""
        return f"{via}{group}={name}: not installed here; {plugin}"
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = sorted(exc.options)
        return (f"{group}={name} is not an option of {group}; {_did_you_mean(name, options)}"
                f"choose one of {options}")
    if isinstance(exc, OverrideParseException):
        return (f"cannot parse the override {_first_line(exc)}; write key=value, lists as "
                "[1.0,2.0] (quote them in the shell: 'key=[1.0,2.0]')")
    merging = re.match(r"Error merging override (\S+?)=(.*)", message.splitlines()[0]) \
        if message else None
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and not merging:
        return _unknown_key(cause, args, groups_dir)
    appending = re.match(r"Could not append to config\. An item is already at '([^']+)'", message)
    if appending:
        key = appending.group(1)
        given = _given(args, key) or key
        return (f"{given}: {key} exists already; set it without the '+': "
                f"{given.lstrip('+')}")
    if merging or isinstance(cause, ValidationError):
        key = merging.group(1).lstrip("+~") if merging else str(getattr(cause, "full_key", ""))
        key = re.sub(r"\[\d+\]", "", key)
        given = _given(args, key) or f"{key}={merging.group(2) if merging else ''}"
        found = schema_field(key, schema)
        if found is not None:
            hint, default = found
            example = f", e.g. {key}={_compact(default)}" if default not in (None, "", [], {}) \
                else ""
            return f"{given}: {key} takes {describe_type(hint)}{example}"
        return f"{given}: {_first_line(cause)}"
    where = re.match(r"In '([^']+)'", message)
    prefix = f"in configs/{where.group(1)}.yaml: " if where else ""
    return prefix + (_first_line(cause) if cause is not exc else _first_line(exc))


def _unknown_key(cause: Any, args: list[str], groups_dir: str) -> str:
    """``equaton=heat`` or ``equation.dimm=2``: the key, its near miss and the keys there are."""
    full_key = str(getattr(cause, "full_key", "") or getattr(cause, "key", ""))
    parent, _, name = full_key.rpartition(".")
    owner: Optional[type] = getattr(cause, "object_type", None)
    known = [f.name for f in dataclasses.fields(owner)] if owner is not None and \
        dataclasses.is_dataclass(owner) else []
    if not parent:
        known = sorted(set(known) | set(_groups(groups_dir)))
    given = _given(args, full_key) or full_key
    where = parent or "the config"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    if owner is None or not dataclasses.is_dataclass(owner):  # a free-form dict (sde.params)
        return (f"{given}: {where} is a dict: add a key with a leading +, e.g. "
                f"'+{full_key}=1.0' or '+{where}={{{name}: 1.0}}'")
    return f"{given}: unknown key {full_key}; {hint}{where} has {', '.join(sorted(known))}"
