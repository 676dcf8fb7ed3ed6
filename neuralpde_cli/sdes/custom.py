"""Your own model: drift and diffusion callables loaded from 'module:function' or a file."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError
from neuralpde_cli.sdes.base import SDE


def _import_module(module_name: str, spec: str, what: str) -> object:
    """A module by file path ("./mydrift.py", "lib/f.py") or by dotted name, the current folder
    searched first for the latter (as ``python script.py`` would; the console script does not)."""
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise UserError(f"equation.sde.{what}={spec!r}: no such file {file.resolve()}")
            loader = importlib.util.spec_from_file_location(f"neuralpde_user_{file.stem}", file)
            if loader is None or loader.loader is None:
                raise UserError(f"equation.sde.{what}={spec!r}: {file} is not a Python file")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module_name)
        finally:
            if added:
                sys.path.remove(cwd)
    except UserError:
        raise
    except Exception as exc:  # the user's module: import errors, syntax errors, its own failures
        raise UserError(f"equation.sde.{what}={spec!r}: cannot import {module_name!r} "
                        f"({type(exc).__name__}: {exc})") from None


def load_callable(path: str, what: str) -> Callable[..., Tensor]:
    """The function named "package.module:function" or "path/to/file.py:function", or a
    UserError saying what is wrong."""
    if not isinstance(path, str) or ":" not in path or path.endswith(":") or path.startswith(":"):
        raise UserError(f"equation.sde.{what}={path!r} must look like 'package.module:function' "
                        "or 'path/to/file.py:function'")
    module_name, _, attr = path.rpartition(":")
    module = _import_module(module_name, path, what)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"equation.sde.{what}={path!r}: module {module_name!r} has no callable "
                        f"{attr!r}")
    return fn


class CallableSDE(SDE):
    """μ and σ from user functions f(t (N,), x (N, d)); σ (d, r) constant or (N, d, r).

    Shapes are checked once at construction on probe points; divergences use autograd.
    """

    autonomous = False

    def __init__(self, dim: int, drift: Callable[..., Tensor], diffusion: Callable[..., Tensor] | None,
                 sigma: Tensor | None, names: tuple[str, str], dtype: torch.dtype,
                 device: torch.device, params: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(dim)
        self._drift, self._diffusion = drift, diffusion
        self.register_buffer("sigma", sigma)
        self.param_names = list(params or {})
        for name, value in (params or {}).items():
            self.register_buffer(f"param_{name}", value)
        self._takes = {id(fn): _declared(fn, self.param_names) for fn in (drift, diffusion) if fn}
        unused = [n for n in self.param_names
                  if not any(n in taken for taken in self._takes.values())]
        if unused:
            raise UserError(f"equation.sde.params names {unused[0]!r}, which neither "
                            f"{names[0]!r} nor {names[1] or 'a diffusion callable'!r} takes as an "
                            "argument")
        probe_x = torch.linspace(-1.0, 1.0, 3 * dim, dtype=dtype, device=device).reshape(3, dim) + 1.5
        probe_t = torch.zeros(3, dtype=dtype, device=device)
        mu = self._call(self._drift, names[0], probe_t, probe_x)
        if mu.shape != (3, dim):
            raise UserError(f"equation.sde.drift={names[0]!r} returned shape {tuple(mu.shape)} for "
                            f"x of shape (3, {dim}); it must return (N, d) = (3, {dim})")
        if diffusion is not None:
            s = self._call(diffusion, names[1], probe_t, probe_x)
            if s.dim() == 2 and s.shape[0] == dim:
                self.constant_diffusion = True
            elif not (s.dim() == 3 and s.shape[:2] == (3, dim)):
                raise UserError(f"equation.sde.diffusion={names[1]!r} returned shape "
                                f"{tuple(s.shape)}; it must return σ of shape ({dim}, r) or "
                                f"(N, {dim}, r) = (3, {dim}, r)")
            else:
                self.constant_diffusion = False

    def _kwargs(self, fn: Callable[..., Tensor]) -> dict[str, Tensor]:
        return {n: getattr(self, f"param_{n}") for n in self._takes.get(id(fn), ())}

    def _call(self, fn: Callable[..., Tensor], name: str, t: Tensor, x: Tensor) -> Tensor:
        try:
            out = fn(t, x, **self._kwargs(fn))
        except Exception as exc:  # the user's code: report, do not crash with a traceback
            raise UserError(f"equation.sde callable {name!r} failed on probe input t (N,), "
                            f"x (N, d): {type(exc).__name__}: {exc}") from None
        if not isinstance(out, Tensor):
            raise UserError(f"equation.sde callable {name!r} returned {type(out).__name__}; "
                            "it must return a torch.Tensor")
        return out

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self._drift(t, x, **self._kwargs(self._drift))

    def diffusion_sqrt(self, t: Tensor, x: Tensor) -> Tensor:
        s = self.sigma if self._diffusion is None else \
            self._diffusion(t, x, **self._kwargs(self._diffusion))
        return s / math.sqrt(2.0)


def _declared(fn: Callable[..., Any], names: list[str]) -> tuple[str, ...]:
    """The parameter names ``fn`` accepts as keywords (all of them with ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return tuple(names)
    return tuple(n for n in names if n in sig.parameters)


# --- calibratable parameters ------------------------------------------------------------------
#: the config keys each kind's law depends on, in the order calibration lists them
