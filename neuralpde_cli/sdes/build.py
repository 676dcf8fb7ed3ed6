"""From a config to an SDE: each kind's parameters by name, their domains, and the one
table from kind to family that builds it (differentiably in given tensors)."""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor

from neuralpde_cli.errors import UserError, check_choice
from neuralpde_cli.sdes import double_well, heston, jumps, linear, square_root
from neuralpde_cli.sdes.base import SDE, SDEConfig, _matrix, _vector
from neuralpde_cli.sdes.custom import CallableSDE, load_callable


#: kind → the constructor of its family from the parameter tensors (dim, p, dtype, device);
#: adding an SDE is its family's file, a line here and its keys in PARAMETER_KEYS
FAMILIES: dict[str, Callable[[int, dict[str, Tensor], torch.dtype, torch.device], SDE]] = {
    "ou": linear.ou, "brownian": linear.brownian,
    "double_well": double_well.single, "double_well_2d": double_well.coupled,
    "cir": square_root.cir, "cev": square_root.cev, "gbm": square_root.gbm,
    "heston": heston.heston,
    "merton": jumps.merton, "bates": jumps.bates,
}
#: every kind: the families, and ``custom`` (drift and diffusion callables)
KINDS = (*FAMILIES, "custom")

PARAMETER_KEYS: dict[str, tuple[str, ...]] = {
    "ou": ("theta", "mean", "sigma"),
    "brownian": ("drift_vector", "sigma"),
    "double_well": ("linear", "cubic", "noise"),
    "double_well_2d": ("linear", "cubic", "coupling", "noise"),
    "cir": ("rate", "level", "noise"),
    "cev": ("rate", "level", "noise", "gamma"),
    "gbm": ("rate", "noise"),
    "heston": ("mu", "rate", "level", "noise", "rho"),
    "merton": ("mu", "noise", "jump_rate", "jump_mean", "jump_std"),
    "bates": ("mu", "rate", "level", "noise", "rho", "jump_rate", "jump_mean", "jump_std"),
    "custom": ("sigma",),  # only without a diffusion callable; the callables have no parameters
}
_MATRICES = ("theta", "sigma")
_VECTORS = ("mean", "drift_vector")
#: scalars that must be > 0 (rate is a growth rate of any sign for gbm)
_POSITIVE = ("noise", "level", "gamma", "cubic", "jump_rate", "jump_std")
_NAME = re.compile(r"^([a-z_]+)((?:\[\d+\])*)$")


def _keys(kind: str, has_sigma: bool = True) -> tuple[str, ...]:
    check_choice("equation.sde.kind", kind, KINDS)
    keys = PARAMETER_KEYS[kind]
    return keys if has_sigma or kind != "custom" else ()


def _entries(key: str, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, index) of each calibratable scalar of ``key``: σ is parametrized by its lower
    triangle (σσᵀ is all the law sees); 1-D matrices and vectors are plain scalars."""
    if key in _MATRICES:
        if dim == 1:
            return [(key, (0, 0))]
        pairs = [(i, j) for i in range(dim) for j in range(dim) if key == "theta" or j <= i]
        return [(f"{key}[{i}][{j}]", (i, j)) for i, j in pairs]
    if key in _VECTORS:
        return [(key, (0,))] if dim == 1 else [(f"{key}[{i}]", (i,)) for i in range(dim)]
    return [(key, ())]


def _names(kind: str, dim: int, has_sigma: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (key, index) for key in _keys(kind, has_sigma)
            for name, index in _entries(key, dim)}


def _lookup(kind: str, name: str, dim: int, has_sigma: bool = True) -> tuple[str, tuple[int, ...]]:
    known = _names(kind, dim, has_sigma)
    if name not in known:
        raise UserError(f"{name!r} is not a parameter of equation.sde.kind={kind} (dim={dim}); "
                        f"its parameters are {list(known) or 'none'}")
    return known[name]


def parameter_names(cfg: SDEConfig, dim: int) -> list[str]:
    """The kind's calibratable scalars, flat: ``["theta", "mean", "sigma"]`` for 1-D OU,
    ``["theta[0][0]", …, "mean[1]", "sigma[1][1]"]`` (σ's lower triangle) for 2-D."""
    return list(_names(cfg.kind, dim, has_sigma=not cfg.diffusion)) + _custom_names(cfg)


def _custom_names(cfg: SDEConfig) -> list[str]:
    return list(cfg.params) if cfg.kind == "custom" else []


def parameter_constraint(kind: str, name: str, dim: int, cfg: SDEConfig | None = None) -> str:
    """"positive", "correlation" (in (−1, 1)) or "real": what each parameter must satisfy for
    the SDE to be the one named.

    Positive: noise, level, γ, cubic, the CIR/CEV rate, 1-D θ (mean reversion) and σ's
    diagonal (σ is the lower Cholesky factor of σσᵀ); everything else is real. Stability of a
    d-dimensional θ is a matrix condition, not an entry-wise one, and is left to the caller.
    """
    if cfg is not None and name in _custom_names(cfg):
        return "positive" if name in cfg.positive_params else "real"
    key, index = _lookup(kind, name, dim)
    if key == "rho":
        return "correlation"
    if key in _POSITIVE or (key == "rate" and kind != "gbm"):
        return "positive"
    if key == "sigma" and index[0] == index[1]:
        return "positive"
    if key == "theta" and dim == 1:
        return "positive"
    return "real"


def _cholesky_factor(sigma: Tensor) -> Tensor:
    """The lower-triangular L with positive diagonal and LLᵀ = σσᵀ (σ itself, columns' signs
    flipped, when it is already lower triangular, so a singular σ is kept)."""
    if not torch.any(torch.triu(sigma, diagonal=1) != 0):
        signs = torch.where(torch.diagonal(sigma) < 0, -1.0, 1.0).to(sigma.dtype)
        return sigma * signs
    factor, info = torch.linalg.cholesky_ex(sigma @ sigma.T)
    if int(info) != 0:
        raise UserError(f"equation.sde.sigma={sigma.tolist()} is singular and not lower "
                        "triangular; give it as a lower-triangular matrix to calibrate it")
    return factor


def _config_tensors(cfg: SDEConfig, dim: int, keys: tuple[str, ...], dtype: torch.dtype,
                    device: torch.device, as_factor: bool,
                    given: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """The kind's parameters from the config as tensors, shapes checked; σ as its Cholesky
    factor when ``as_factor`` (the form calibration names the entries of). Keys in ``given``
    (every entry supplied by the caller) are zeros of the right shape: the config's value,
    perhaps of another dimension, is not read."""
    out = {}
    for key in keys:
        value = getattr(cfg, key)
        if key in given:
            shape = (dim, dim) if key in _MATRICES else (dim,) if key in _VECTORS else ()
            out[key] = torch.zeros(shape, dtype=dtype, device=device)
        elif key in _MATRICES:
            out[key] = _matrix(value, dim, key, dtype, device)
            if key == "sigma" and as_factor:
                out[key] = _cholesky_factor(out[key])
        elif key in _VECTORS:
            out[key] = _vector(value, dim, key, dtype, device)
        else:
            out[key] = torch.tensor(float(value), dtype=dtype, device=device)
    return out


def parameter_values(cfg: SDEConfig, dim: int) -> dict[str, float]:
    """The config's value of every name in :func:`parameter_names` (σ entries of its lower
    Cholesky factor, which equals σ for a lower-triangular σ with positive diagonal)."""
    names = _names(cfg.kind, dim, has_sigma=not cfg.diffusion)
    keys = tuple(dict.fromkeys(key for key, _ in names.values()))
    tensors = _config_tensors(cfg, dim, keys, torch.float64, torch.device("cpu"), as_factor=True)
    return {**{name: float(tensors[key][index]) for name, (key, index) in names.items()},
            **{name: float(v) for name, v in cfg.params.items()}} if cfg.kind == "custom" else \
        {name: float(tensors[key][index]) for name, (key, index) in names.items()}


def _check_config_values(cfg: SDEConfig, replaced: set[str]) -> None:
    """The range checks on config values the caller does not replace."""
    if cfg.kind in ("heston", "bates"):
        for key in ("rate", "level"):
            if key not in replaced and getattr(cfg, key) <= 0:
                raise UserError(f"equation.sde.{key}={getattr(cfg, key)} must be > 0 for kind={cfg.kind}")
        if "rho" not in replaced and not -1 < cfg.rho < 1:
            raise UserError(f"equation.sde.rho={cfg.rho} must be in (−1, 1) (|ρ| = 1 makes the "
                            "diffusion singular)")
    if cfg.kind in ("merton", "bates"):
        for key in ("jump_rate", "jump_std"):
            if key not in replaced and not getattr(cfg, key) > 0:
                raise UserError(f"equation.sde.{key}={getattr(cfg, key)} must be > 0 for "
                                f"kind={cfg.kind} (a diffusion without jumps is kind="
                                f"{'brownian' if cfg.kind == 'merton' else 'heston'})")
    if cfg.kind in ("double_well", "double_well_2d", "cir", "cev", "gbm", "heston", "merton",
                    "bates") and \
            "noise" not in replaced and cfg.noise <= 0:
        raise UserError(f"equation.sde.noise={cfg.noise} must be > 0")
    if cfg.kind in ("cir", "cev"):
        for key in ("rate", "level") + (("gamma",) if cfg.kind == "cev" else ()):
            if key not in replaced and getattr(cfg, key) <= 0:
                raise UserError(f"equation.sde.{key}={getattr(cfg, key)} must be > 0 for "
                                f"kind={cfg.kind}")


def build_sde_with(cfg: SDEConfig, dim: int, values: Mapping[str, Tensor | float],
                   dtype: torch.dtype, device: torch.device) -> SDE:
    """The SDE of ``cfg`` with the named entries (:func:`parameter_names`) replaced by the given
    0-d tensors, differentiable in them; the caller keeps them within :func:`parameter_constraint`.
    """
    names = _names(cfg.kind, dim, has_sigma=not cfg.diffusion)
    custom = {n: torch.as_tensor(float(v), dtype=dtype, device=device) for n, v in cfg.params.items()} \
        if cfg.kind == "custom" else {}
    bad = [n for n in cfg.positive_params if n not in cfg.params]
    if bad:
        raise UserError(f"equation.sde.positive_params names {bad[0]!r}, which is not in "
                        f"equation.sde.params {sorted(cfg.params)}")
    values = dict(values)
    for name in [n for n in values if n in custom]:
        custom[name] = torch.as_tensor(values.pop(name), dtype=dtype, device=device)
    for name in values:
        _lookup(cfg.kind, name, dim, has_sigma=not cfg.diffusion)
    replaced = {names[name][0] for name in values}
    _check_config_values(cfg, replaced)
    keys = _keys(cfg.kind, has_sigma=not cfg.diffusion)
    callables = _custom_callables(cfg) if cfg.kind == "custom" else None  # before σ's shape
    given = frozenset(key for key in replaced
                      if all(n in values for n, (k, _) in names.items() if k == key))
    tensors = _config_tensors(cfg, dim, keys, dtype, device, as_factor="sigma" in replaced,
                              given=given)
    cloned: set[str] = set()
    for name, value in values.items():
        key, index = names[name]
        v = torch.as_tensor(value, dtype=dtype, device=device)
        if v.dim() != 0:
            raise UserError(f"build_sde_with: {name!r} needs a 0-d tensor, got shape {tuple(v.shape)}")
        if not index:
            tensors[key] = v
            continue
        if key not in cloned:  # out of place: the config tensors stay untouched
            tensors[key] = tensors[key].clone()
            cloned.add(key)
        tensors[key][index] = v
    return _assemble(cfg, dim, tensors, dtype, device, callables, custom)


def _custom_callables(cfg: SDEConfig) -> tuple[Callable[..., Tensor], Callable[..., Tensor] | None]:
    if not cfg.drift:
        raise UserError("equation.sde.kind=custom needs equation.sde.drift='package.module:function'"
                        " (or 'path/to/file.py:function')")
    drift = load_callable(cfg.drift, "drift")
    return drift, load_callable(cfg.diffusion, "diffusion") if cfg.diffusion else None


def _assemble(cfg: SDEConfig, dim: int, p: dict[str, Tensor], dtype: torch.dtype,
              device: torch.device, callables: tuple | None,
              custom: Mapping[str, Tensor] | None = None) -> SDE:
    """The SDE object of ``cfg.kind`` from its parameter tensors."""
    if cfg.kind == "custom":
        drift, diffusion = callables
        return CallableSDE(dim, drift, diffusion, p.get("sigma"), (cfg.drift, cfg.diffusion or ""),
                           dtype, device, custom)
    return FAMILIES[cfg.kind](dim, p, dtype, device)


def build_sde(cfg: SDEConfig, dim: int, dtype: torch.dtype, device: torch.device) -> SDE:
    """The SDE the config names, its shapes checked against ``dim``."""
    return build_sde_with(cfg, dim, {}, dtype, device)
