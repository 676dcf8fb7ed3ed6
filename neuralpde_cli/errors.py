"""The one exception type that reaches the user as a single clean line."""

from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """Bad input (config value, file, combination): printed as one line, exit status 2."""


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """A UserError naming ``key=value`` and listing the allowed values, unless value is one."""
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{key}={value!r} is unknown; choose one of {choices}")
