r"""Steady diffusion −∇·(κ∇T) = s on a rectangle, its grid discretization, and a PINN loss.

The grid is node-centred: resolution n means n × n nodes including the boundary, spacing
hₓ = (x₁ − x₀)/(n − 1), h_y = (y₁ − y₀)/(n − 1); arrays are indexed [i, j] with i along x.
The discretization is the vertex-centred finite-volume (5-point) scheme written as

    A = Gᵀ K G,   b = w ⊙ s,

G the differences along grid edges, K the edge conductances κ_f·(h_⊥/h_∥) (halved on boundary
lines, where a control volume is half as wide) and w the control-volume areas (½ on sides, ¼ at
corners). A is therefore symmetric positive definite on the unknowns, its energy
½TᵀAT − bᵀT is a quadrature of the continuous Ritz functional ½∫κ|∇T|² − ∫sT, and zero-flux
(Neumann) sides need no ghost nodes. Dirichlet nodes are fixed values, not unknowns; their
rows of A are zero.

The edge value κ_f is the harmonic mean of the two node values: the two half-cells between the
nodes conduct in series, so the harmonic mean is the exact flux for a piecewise-constant κ in 1-D
and keeps an insulating layer insulating; the arithmetic mean lets a contrast-100 layer leak
heat through at roughly 50× the true rate. For smooth κ both are second order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neuralpde_cli.errors import UserError, check_choice

FIELD_KINDS = ("constant", "checkerboard", "gaussian_bump", "layered", "file")
#: the FieldConfig keys each kind reads; a key set to anything but its default under a kind
#: that ignores it is an error, not a silent κ = 1 (``kappa.path=k.npy`` without ``kind=file``)
FIELD_KEYS = {"constant": ("value",), "checkerboard": ("value", "contrast", "cells"),
              "layered": ("value", "contrast", "cells"),
              "gaussian_bump": ("value", "amplitude", "center", "width"), "file": ("path", "range")}
SIDES = ("left", "right", "bottom", "top")

#: stencil offsets (di, dj); the centre comes first
FIVE_POINT: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
NINE_POINT: tuple[tuple[int, int], ...] = FIVE_POINT + ((1, 1), (-1, -1), (1, -1), (-1, 1))


@dataclass
class FieldConfig:
    """A scalar field on the domain: κ or s.

    constant: ``value``. checkerboard: ``cells`` × ``cells`` squares of ``value`` and
    ``value·contrast``. layered: ``cells`` horizontal layers alternating the same two values.
    gaussian_bump: ``value + amplitude·exp(−|x − center|²/(2 width²))``. file: a ``.npy`` array
    (any 2-D shape, first index along x, samples at the domain's corners and evenly between,
    values used as they are) or a greyscale image (top row = top of the domain, grey 0…1 mapped
    to ``range``), resampled bilinearly to the grid.
    """

    kind: str = "constant"
    value: float = 1.0
    contrast: float = 100.0
    cells: int = 4
    amplitude: float = 1.0
    #: gaussian_bump centre (x, y); empty: the middle of the domain
    center: list[float] = field(default_factory=list)
    width: float = 0.1
    path: Optional[str] = None
    #: image files: [value at black, value at white]
    range: list[float] = field(default_factory=lambda: [1.0, 100.0])


@dataclass
class BoundaryConfig:
    """Per side: a number (Dirichlet value) or ``neumann`` (zero flux)."""

    left: str = "0.0"
    right: str = "0.0"
    bottom: str = "0.0"
    top: str = "0.0"


@dataclass
class DiffusionConfig:
    name: str = "diffusion"
    #: [x0, x1, y0, y1]
    domain: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0, 1.0])
    kappa: FieldConfig = field(default_factory=FieldConfig)
    source: FieldConfig = field(default_factory=FieldConfig)
    bc: BoundaryConfig = field(default_factory=BoundaryConfig)
    #: compare with a direct sparse solve in evaluate (slow above 513²: ~16 s at 1025²)
    reference: bool = True
    #: resolution of the node fields a mesh-free ansatz sees (bilinear between nodes)
    pinn_field_resolution: int = 257


# --- stencils --------------------------------------------------------------------------------

def stencil_accumulate(out: Tensor, coef: Tensor, offsets: Sequence[tuple[int, int]],
                       T_pad: Tensor, start: tuple[int, int], step: int = 1,
                       alpha: float = -1.0, kernel: Tensor | None = None) -> Tensor:
    """out += alpha · Σₖ coef[k] ⊙ T[p + offsets[k]] for the nodes p = start + step·(a, b).

    ``T_pad`` carries one ghost layer (index 1 is node 0), so every shifted view exists and
    out-of-domain neighbours read zeros (their coefficients are zero anyway). ``coef`` holds the
    coefficients at those nodes, shape (m, *out.shape). With ``kernel`` (one-hot (m, 1, 3, 3))
    the neighbours are gathered by one strided conv2d instead of m shifted slices: fewer kernel
    launches, which wins on a GPU; on a CPU the fused in-place slices win.
    """
    ni, nj = out.shape[-2:]
    i0, j0 = start
    if kernel is None:
        for k, (di, dj) in enumerate(offsets):
            view = T_pad[..., 1 + i0 + di: 2 + i0 + di + step * (ni - 1): step,
                         1 + j0 + dj: 2 + j0 + dj + step * (nj - 1): step]
            out.addcmul_(coef[k], view, value=alpha)
        return out
    crop = T_pad[..., i0: i0 + step * (ni - 1) + 3, j0: j0 + step * (nj - 1) + 3]
    lead = crop.shape[:-2]
    nb = F.conv2d(crop.reshape(-1, 1, *crop.shape[-2:]), kernel, stride=step)
    out.add_((nb.reshape(*lead, *nb.shape[-3:]) * coef).sum(-3), alpha=alpha)
    return out


def onehot_kernel(offsets: Sequence[tuple[int, int]], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The (m, 1, 3, 3) conv2d weight whose channel k picks the neighbour at offsets[k]."""
    kernel = torch.zeros(len(offsets), 1, 3, 3, dtype=dtype, device=device)
    for k, (di, dj) in enumerate(offsets):
        kernel[k, 0, 1 + di, 1 + dj] = 1.0
    return kernel


@dataclass
class Stencil:
    """A (5- or 9-point) operator on an n × n node grid: (AT)_p = Σₖ coef[k, p]·T[p + offsets[k]].

    The system's operator has zero rows at Dirichlet nodes; the multigrid hierarchy keeps
    those rows (a symmetric operator) and stores its Galerkin coarse operators in this form.
    """

    offsets: tuple[tuple[int, int], ...]
    coef: Tensor

    def apply(self, T: Tensor) -> Tensor:
        """A T for T of shape (..., n, n) (differentiable in coef and T)."""
        out = torch.zeros(T.shape[:-2] + self.coef.shape[-2:], dtype=T.dtype, device=T.device)
        return stencil_accumulate(out, self.coef, self.offsets, F.pad(T, (1, 1, 1, 1)), (0, 0),
                                  alpha=1.0)


def harmonic_mean(a: Tensor, b: Tensor) -> Tensor:
    """2ab/(a + b): the conductance of two half-cells in series (see the module docstring)."""
    return (2.0 * a * b).div_(a + b) if not (a.requires_grad or b.requires_grad) \
        else 2.0 * a * b / (a + b)


def unknown_block(n: int, neumann: Sequence[bool]) -> tuple[int, int, int, int]:
    """(i0, i1, j0, j1): the unknowns [i0, i1) × [j0, j1) of an n × n grid; a Dirichlet side's
    line (corners included) is fixed, a Neumann side's line is unknown."""
    left, right, bottom, top = neumann
    return (0 if left else 1, n if right else n - 1, 0 if bottom else 1, n if top else n - 1)


# --- the discrete system ---------------------------------------------------------------------

@dataclass
class GridSystem:
    """The discrete problem at one resolution: node fields, boundary data and the operator.

    ``neumann`` is per side (left, right, bottom, top). The unknowns are the non-Dirichlet nodes,
    always a rectangular block (``block``), since a side is either all Dirichlet or all Neumann
    (a corner is Dirichlet when either of its sides is).
    """

    kappa: Tensor
    source: Tensor
    x: Tensor
    y: Tensor
    h: tuple[float, float]
    dirichlet_mask: Tensor
    dirichlet_values: Tensor
    neumann: tuple[bool, bool, bool, bool]
    #: the stencil and rhs, kept while κ needs no gradient (``with_fields`` starts afresh)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.kappa.shape[-1])

    @property
    def block(self) -> tuple[int, int, int, int]:
        """(i0, i1, j0, j1): the unknowns are [i0, i1) × [j0, j1)."""
        return unknown_block(self.n, self.neumann)

    @property
    def unknown_mask(self) -> Tensor:
        return ~self.dirichlet_mask

    def control_volumes(self) -> Tensor:
        """Area of each node's control volume: hₓh_y, halved on each boundary line it lies on."""
        half = torch.ones(self.n, dtype=self.kappa.dtype, device=self.kappa.device)
        half[0] = half[-1] = 0.5
        return self.h[0] * self.h[1] * half[:, None] * half[None, :]

    def stencil(self, dirichlet_rows: bool = False) -> Stencil:
        """The 5-point operator from κ (differentiable in κ): conductances on edges, then rows.

        Rows of Dirichlet nodes are zero, unless ``dirichlet_rows``: then every node keeps its
        row, a symmetric operator whose unknown rows are the same (multigrid coarsens that).
        """
        n, (hx, hy) = self.n, self.h
        half = torch.ones(n, dtype=self.kappa.dtype, device=self.kappa.device)
        half[0] = half[-1] = 0.5
        k = self.kappa
        # −(edge conductance): κ_f·h_⊥/h_∥, halved along boundary lines, negated for the matrix
        east = harmonic_mean(k[1:], k[:-1]) * ((-hy / hx) * half)[None, :]
        north = harmonic_mean(k[:, 1:], k[:, :-1]) * ((-hx / hy) * half)[:, None]
        coef = k.new_empty(len(FIVE_POINT), n, n)
        coef[1, :-1], coef[1, -1] = east, 0.0              # (i+1, j)
        coef[2, 1:], coef[2, 0] = east, 0.0                # (i−1, j)
        coef[3, :, :-1], coef[3, :, -1] = north, 0.0       # (i, j+1)
        coef[4, :, 1:], coef[4, :, 0] = north, 0.0         # (i, j−1)
        coef[0] = -coef[1:].sum(0)
        if not dirichlet_rows:
            i0, i1, j0, j1 = self.block
            coef[:, :i0], coef[:, i1:], coef[:, :, :j0], coef[:, :, j1:] = 0.0, 0.0, 0.0, 0.0
        return Stencil(FIVE_POINT, coef)

    def apply(self, T: Tensor) -> Tensor:
        """A T on the full grid (Dirichlet couplings included, zero at Dirichlet rows)."""
        if self.kappa.requires_grad:
            return self.stencil().apply(T)
        if "stencil" not in self._cache:
            self._cache["stencil"] = self.stencil()
        return self._cache["stencil"].apply(T)

    def load(self) -> Tensor:
        """w ⊙ s at the unknowns: the source part of the right-hand side (cached while s needs
        no gradient: the multigrid measures every cycle's residual with it)."""
        if self.source.requires_grad:
            return self.control_volumes() * self.source * self.unknown_mask
        if "load" not in self._cache:
            self._cache["load"] = self.control_volumes() * self.source * self.unknown_mask
        return self._cache["load"]

    def rhs(self) -> Tensor:
        """b of the reduced system A_UU T_U = b (source minus the Dirichlet couplings)."""
        if self.kappa.requires_grad or self.source.requires_grad:
            return self.load() - self.apply(self.dirichlet_values)
        if "rhs" not in self._cache:
            self._cache["rhs"] = self.load() - self.apply(self.dirichlet_values)
        return self._cache["rhs"]

    def with_boundary(self, T: Tensor) -> Tensor:
        """T with its Dirichlet nodes set to the boundary values."""
        return torch.where(self.dirichlet_mask, self.dirichlet_values, T)

    def residual(self, T: Tensor) -> Tensor:
        """b − A T at the unknowns (zero at Dirichlet nodes); T's Dirichlet entries used as given."""
        return self.load() - self.apply(T)

    def pointwise_residual(self, T: Tensor) -> Tensor:
        """The residual per unit area: ∇·(κ∇T) + s at each unknown node."""
        return self.residual(T) / self.control_volumes()

    def energy(self, T: Tensor) -> Tensor:
        """½ T_UᵀA_UU T_U − bᵀT_U: minimized by the discrete solution, gradient −residual."""
        z = T * self.unknown_mask
        return 0.5 * (z * self.apply(z)).sum() - (self.rhs() * z).sum()

    def rel_residual(self, T: Tensor) -> float:
        """‖b − A T‖ / ‖b‖ over the unknowns (‖b − A T‖ when b = 0)."""
        norm_b = float(torch.linalg.vector_norm(self.rhs()))
        norm_r = float(torch.linalg.vector_norm(self.residual(T)))
        return norm_r / norm_b if norm_b > 0 else norm_r

    def with_fields(self, kappa: Tensor, source: Tensor) -> GridSystem:
        """The same grid and boundary with other node values of κ and s."""
        return replace(self, kappa=kappa, source=source)


# --- fields ----------------------------------------------------------------------------------

def bilinear(values: Tensor, xi: Tensor, eta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A node array (a, b) spanning [0, 1]² interpolated at (ξ, η): value, ∂/∂ξ, ∂/∂η."""
    a, b = values.shape
    u, v = xi.clamp(0, 1) * (a - 1), eta.clamp(0, 1) * (b - 1)
    i = torch.clamp(torch.floor(u), 0, a - 2).long()
    j = torch.clamp(torch.floor(v), 0, b - 2).long()
    t, s = u - i, v - j
    v00, v10, v01, v11 = values[i, j], values[i + 1, j], values[i, j + 1], values[i + 1, j + 1]
    value = (1 - t) * (1 - s) * v00 + t * (1 - s) * v10 + (1 - t) * s * v01 + t * s * v11
    d_xi = ((1 - s) * (v10 - v00) + s * (v11 - v01)) * (a - 1)
    d_eta = ((1 - t) * (v01 - v00) + t * (v11 - v10)) * (b - 1)
    return value, d_xi, d_eta


def _load_array(where: str, cfg: FieldConfig) -> np.ndarray:
    """The file of a ``file`` field as a float array indexed [x, y]."""
    if not cfg.path:
        raise UserError(f"{where}.path is empty; kind=file needs a .npy or image file")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"{where}.path={cfg.path!r} does not exist (looked in {path.resolve()})")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"{where}.path={cfg.path!r} is not a readable .npy array ({exc})") from None
    else:
        import matplotlib.image as mpimg
        try:
            img = np.asarray(mpimg.imread(path))
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            raise UserError(f"{where}.path={cfg.path!r} is not a readable image ({exc}); "
                            "use a .npy array or a .png") from None
        if np.issubdtype(img.dtype, np.integer):
            img = img / np.iinfo(img.dtype).max
        grey = img[..., :3].mean(-1) if img.ndim == 3 else img
        if len(cfg.range) != 2:
            raise UserError(f"{where}.range={list(cfg.range)} must be [min, max]")
        arr = cfg.range[0] + (cfg.range[1] - cfg.range[0]) * grey[::-1].T
    if arr.ndim != 2 or min(arr.shape) < 2 or not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{where}.path={cfg.path!r} holds an array of shape {arr.shape} "
                        f"(dtype {arr.dtype}); allowed: a numeric 2-D array (nx, ny), each side ≥ 2")
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise UserError(f"{where}.path={cfg.path!r} contains NaN or Inf values")
    layout = "an image: its top row at the top of the domain" if path.suffix.lower() != ".npy" \
        else "a .npy array indexed [x, y]: first index along x, as solution.npz"
    logging.getLogger(__name__).info(
        "%s.path=%s: %d × %d values (x × y) read as %s, values %.4g … %.4g; sampled at the "
        "domain's corners and evenly between, resampled bilinearly onto each grid",
        where, cfg.path, arr.shape[0], arr.shape[1], layout, arr.min(), arr.max())
    return arr


class _Field:
    """A validated FieldConfig that evaluates on node grids (and at points, via a node grid)."""

    def __init__(self, where: str, cfg: FieldConfig, domain: tuple[float, float, float, float],
                 positive: bool) -> None:
        self.where, self.cfg, self.domain = where, cfg, domain
        check_choice(f"{where}.kind", cfg.kind, FIELD_KINDS)
        self._check_unused()
        if cfg.kind in ("checkerboard", "layered") and cfg.cells < 1:
            raise UserError(f"{where}.cells={cfg.cells} must be an integer ≥ 1")
        if cfg.kind == "gaussian_bump":
            if cfg.width <= 0:
                raise UserError(f"{where}.width={cfg.width} must be > 0")
            if cfg.center and len(cfg.center) != 2:
                raise UserError(f"{where}.center={list(cfg.center)} must be [x, y] or empty")
        self.array = _load_array(where, cfg) if cfg.kind == "file" else None
        if positive:
            low = self._minimum()
            if not low > 0:
                raise UserError(f"{where}: minimum value {low:g} (kind={cfg.kind}) is not > 0; "
                                "κ must be positive everywhere (value > 0, contrast > 0, "
                                "value + amplitude > 0, file values > 0)")

    def _check_unused(self) -> None:
        """A key the kind does not read, set away from its default, names the kinds that do."""
        default = FieldConfig()
        for f in fields(FieldConfig):
            value = getattr(self.cfg, f.name)
            if f.name == "kind" or f.name in FIELD_KEYS[self.cfg.kind] \
                    or value == getattr(default, f.name):
                continue
            users = [k for k, keys in FIELD_KEYS.items() if f.name in keys]
            raise UserError(f"{self.where}.{f.name}={value!r} is not used by {self.where}.kind="
                            f"{self.cfg.kind} (which reads {', '.join(FIELD_KEYS[self.cfg.kind])}); "
                            f"set {self.where}.kind to {' or '.join(users)} to use it, or drop it")

    def _minimum(self) -> float:
        c = self.cfg
        if c.kind == "constant":
            return c.value
        if c.kind in ("checkerboard", "layered"):
            return min(c.value, c.value * c.contrast) if c.cells > 1 else c.value
        if c.kind == "gaussian_bump":
            return min(c.value, c.value + c.amplitude)
        return float(self.array.min())

    def nodes(self, x: Tensor, y: Tensor) -> Tensor:
        """Values at the nodes of the tensor grid x × y: (len(x), len(y))."""
        c = self.cfg
        x0, x1, y0, y1 = self.domain
        X, Y = x[:, None], y[None, :]
        xi, eta = (X - x0) / (x1 - x0), (Y - y0) / (y1 - y0)
        shape = (x.shape[0], y.shape[0])
        if c.kind == "constant":
            return x.new_full(shape, c.value)
        if c.kind in ("checkerboard", "layered"):
            def cell(t: Tensor) -> Tensor:
                return torch.clamp(torch.floor(t * c.cells), max=c.cells - 1)
            odd = cell(eta) if c.kind == "layered" else cell(xi) + cell(eta)
            odd = torch.remainder(odd, 2).expand(shape) == 1
            return torch.where(odd, x.new_full(shape, c.value * c.contrast), x.new_full(shape, c.value))
        if c.kind == "gaussian_bump":
            cx, cy = c.center if c.center else (0.5 * (x0 + x1), 0.5 * (y0 + y1))
            r2 = (X - cx) ** 2 + (Y - cy) ** 2
            return c.value + c.amplitude * torch.exp(-r2 / (2.0 * c.width ** 2))
        arr = torch.as_tensor(self.array, dtype=x.dtype, device=x.device)
        xi, eta = xi.expand(shape), eta.expand(shape)
        return bilinear(arr, xi.reshape(-1), eta.reshape(-1))[0].reshape(shape)


# --- the equation ----------------------------------------------------------------------------

class SteadyDiffusion:
    r"""∇·(κ(x, y)∇T) + s(x, y) = 0 on [x₀, x₁] × [y₀, y₁].

    Each side has T = g (a constant) or zero flux κ ∂T/∂n = 0. At least one side must be
    Dirichlet, else T is defined only up to a constant. Solved on node grids (:meth:`discretize`,
    by multigrid or by training a grid ansatz), or mesh-free by a network
    (:meth:`pinn_loss_terms`); :meth:`evaluate` compares either with a direct sparse solve.
    """

    def __init__(self, cfg: DiffusionConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.validate()
        self._references: dict[int, np.ndarray] = {}
        self._pinn_nodes: tuple[Tensor, Tensor] | None = None

    def validate(self) -> None:
        """Check the config; raises UserError naming the value and what is allowed."""
        d = self.cfg.domain
        if len(d) != 4 or not (d[1] > d[0] and d[3] > d[2]):
            raise UserError(f"equation.domain={list(d)} must be [x0, x1, y0, y1] with x1 > x0 "
                            "and y1 > y0")
        self.domain = tuple(float(v) for v in d)
        self.kappa_field = _Field("equation.kappa", self.cfg.kappa, self.domain, positive=True)
        self.source_field = _Field("equation.source", self.cfg.source, self.domain, positive=False)
        values, neumann = [], []
        for side in SIDES:
            raw = getattr(self.cfg.bc, side)
            text = str(raw).strip().lower()
            if text == "neumann":
                values.append(0.0)
                neumann.append(True)
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise UserError(f"equation.bc.{side}={raw!r} is neither a number (Dirichlet "
                                "value) nor 'neumann' (zero flux)") from None
            if not math.isfinite(value):
                raise UserError(f"equation.bc.{side}={raw!r} must be finite")
            values.append(value)
            neumann.append(False)
        if all(neumann):
            raise UserError("equation.bc: all four sides are neumann, so T is fixed only up to a "
                            "constant; make at least one side a Dirichlet value")
        self.bc_values, self.neumann = tuple(values), tuple(neumann)
        if self.cfg.pinn_field_resolution < 3:
            raise UserError(f"equation.pinn_field_resolution={self.cfg.pinn_field_resolution} "
                            "must be ≥ 3")

    # --- grids ------------------------------------------------------------------------------
    def coordinates(self, n: int) -> tuple[Tensor, Tensor]:
        x0, x1, y0, y1 = self.domain
        kw = {"dtype": self.dtype, "device": self.device}
        return torch.linspace(x0, x1, n, **kw), torch.linspace(y0, y1, n, **kw)

    def node_points(self, n: int) -> Tensor:
        """The n² node coordinates (n², 2), ordered like T.reshape(-1) (first index x)."""
        x, y = self.coordinates(n)
        X, Y = torch.meshgrid(x, y, indexing="ij")
        return torch.stack([X.reshape(-1), Y.reshape(-1)], dim=-1)

    def discretize(self, n: int) -> GridSystem:
        """The discrete system at resolution n (n × n nodes, boundary included)."""
        if n < 3:
            raise UserError(f"resolution {n} is too small; the grid needs n ≥ 3 nodes per side")
        x, y = self.coordinates(n)
        kappa = self.kappa_field.nodes(x, y)
        if not float(kappa.min()) > 0:
            raise UserError(f"equation.kappa has minimum {float(kappa.min()):g} on the {n}×{n} "
                            "grid; κ must be > 0 everywhere")
        source = self.source_field.nodes(x, y)
        mask = torch.zeros(n, n, dtype=torch.bool, device=self.device)
        values = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        count = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        edges = ((slice(0, 1), slice(None)), (slice(n - 1, n), slice(None)),
                 (slice(None), slice(0, 1)), (slice(None), slice(n - 1, n)))
        for (si, sj), value, is_neumann in zip(edges, self.bc_values, self.neumann):
            if not is_neumann:
                mask[si, sj] = True
                values[si, sj] += value
                count[si, sj] += 1.0
        # a corner shared by two Dirichlet sides takes their mean (it couples to no unknown)
        values = values / count.clamp(min=1.0)
        h = ((self.domain[1] - self.domain[0]) / (n - 1), (self.domain[3] - self.domain[2]) / (n - 1))
        return GridSystem(kappa, source, x, y, h, mask, values, self.neumann)

    def reference_solution(self, n: int) -> np.ndarray:
        """Direct sparse solve of the same discrete system (cached per resolution)."""
        if n not in self._references:
            from neuralpde_cli.references.sparse_direct import direct_solve
            self._references[n] = direct_solve(self.discretize(n))
        return self._references[n]

    # --- what a run reports -------------------------------------------------------------------
    def evaluate(self, T_nodes: Tensor, n: int, reference: bool | None = None) -> dict[str, float]:
        """rel_residual always; rel_l2_error and max_abs_error vs the direct solve unless skipped.

        ``reference`` defaults to the config's flag; errors are over all nodes.
        """
        T = T_nodes.detach().reshape(n, n).to(self.dtype)
        system = self.discretize(n)
        out = {"rel_residual": system.rel_residual(T)}
        if self.cfg.reference if reference is None else reference:
            ref = self.reference_solution(n)
            diff = T.cpu().numpy() - ref
            out["rel_l2_error"] = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-300))
            out["max_abs_error"] = float(np.abs(diff).max())
        return out

    def solution_arrays(self, T_nodes: Tensor, n: int) -> dict[str, np.ndarray]:
        """Arrays for solution.npz, each (nx, ny) with first index along x (x, y are 1-D)."""
        system = self.discretize(n)
        T = T_nodes.detach().reshape(n, n).to(self.dtype)
        arrays = {"T": T, "x": system.x, "y": system.y, "kappa": system.kappa,
                  "source": system.source, "residual": system.pointwise_residual(T)}
        out = {k: v.cpu().numpy() for k, v in arrays.items()}
        if n in self._references:
            out["T_reference"] = self._references[n]
        return out

    def input_normalization(self) -> tuple[Tensor, Tensor]:
        """Shift and scale that bring (x, y) to [−1, 1]² for a network."""
        x0, x1, y0, y1 = self.domain
        kw = {"dtype": self.dtype, "device": self.device}
        return (torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2], **kw),
                torch.tensor([(x1 - x0) / 2, (y1 - y0) / 2], **kw))

    # --- mesh-free ----------------------------------------------------------------------------
    def pinn_loss_terms(self, model: torch.nn.Module, n_points: int,
                        generator: torch.Generator) -> dict[str, Tensor]:
        """Mean squared PDE residual at random interior points ("pde") and BC misfit ("bc").

        κ and s come from their node fields at ``pinn_field_resolution``, interpolated
        bilinearly, so κ has a gradient a.e. for every kind of field (a file included) and the
        residual κΔT + ∇κ·∇T + s needs no second derivative of κ.
        """
        if self._pinn_nodes is None:
            x, y = self.coordinates(self.cfg.pinn_field_resolution)
            self._pinn_nodes = (self.kappa_field.nodes(x, y), self.source_field.nodes(x, y))
        kappa_nodes, source_nodes = self._pinn_nodes
        x0, x1, y0, y1 = self.domain
        lo = torch.tensor([x0, y0], dtype=self.dtype, device=self.device)
        size = torch.tensor([x1 - x0, y1 - y0], dtype=self.dtype, device=self.device)

        frac = torch.rand(n_points, 2, generator=generator, dtype=self.dtype).to(self.device)
        xy = (lo + frac * size).requires_grad_(True)
        u = model(xy)
        grad = torch.autograd.grad(u.sum(), xy, create_graph=True)[0]
        lap = sum(torch.autograd.grad(grad[:, k].sum(), xy, create_graph=True)[0][:, k]
                  for k in range(2)) if grad.requires_grad else torch.zeros_like(u)  # affine model
        kappa, dk_xi, dk_eta = bilinear(kappa_nodes, frac[:, 0], frac[:, 1])
        source = bilinear(source_nodes, frac[:, 0], frac[:, 1])[0]
        dkappa = torch.stack([dk_xi, dk_eta], dim=-1) / size
        pde = kappa * lap + (dkappa * grad).sum(-1) + source

        n_bc = max(n_points // 4, 4)
        side = torch.arange(n_bc, device=self.device) % 4
        t = torch.rand(n_bc, generator=generator, dtype=self.dtype).to(self.device)
        along_x = side >= 2                      # bottom/top: t runs along x
        fixed = (side % 2).to(self.dtype)        # left/bottom → 0, right/top → 1
        fb = torch.stack([torch.where(along_x, t, fixed), torch.where(along_x, fixed, t)], -1)
        xb = (lo + fb * size).requires_grad_(True)
        ub = model(xb)
        normals = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]],
                               dtype=self.dtype, device=self.device)[side]
        g = torch.tensor(self.bc_values, dtype=self.dtype, device=self.device)[side]
        is_neumann = torch.tensor(self.neumann, device=self.device)[side]
        if any(self.neumann):
            gb = torch.autograd.grad(ub.sum(), xb, create_graph=True)[0]
            flux = (gb * normals).sum(-1)
        else:
            flux = torch.zeros_like(ub)
        bc = torch.where(is_neumann, flux, ub - g)
        return {"pde": (pde ** 2).mean(), "bc": (bc ** 2).mean()}
