"""Pictures of a ``neuralpde fit`` run, drawn only from its run directory (solution.npz,
metrics.csv, summary.json).

SDE models: ``losses.png``, ``paths.png`` (data mean, fitted and true means against time and in
the phase plane, with a fan of sample paths), ``fields.png`` (learned against true drift and
|diffusion| over the visited box), ``jump_map.png`` (jump diffusion). Reaction–diffusion:
``losses.png``, ``snapshots.png`` (A, B, C: data, fit, error at three times), ``reaction.png``
(learned against true term over the data's (A, B) range, and at the visited states).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from neuralpde_cli.run.rundir import read_metrics


def plot_fit(run_path: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")

    run_path = Path(run_path)
    if not (run_path / "solution.npz").exists():
        return []
    try:
        summary = json.loads((run_path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    with np.load(run_path / "solution.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    out = run_path / "plots"
    out.mkdir(exist_ok=True)
    made = [_losses(run_path, summary, out)]
    if "grid_a" in arrays:
        made += [_snapshots(arrays, summary, out), _reaction(arrays, summary, out)]
    else:
        made += [_paths(arrays, summary, out), _fields(arrays, summary, out)]
        if "true_jump" in arrays:
            made.append(_jump_map(arrays, summary, out))
    return [p for p in made if p is not None]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_text(summary: dict, keys: tuple[str, ...]) -> str:
    m = summary.get("metrics", {})
    names = {"mean_loss": "mean-path loss", "floor_mean_loss": "floor (true model)",
             "drift_error": "drift err", "diffusion_error": "|g| err",
             "jump_map_error": "jump-map err", "reaction_error": "reaction err",
             "data_rel_error": "data err"}
    return ",  ".join(f"{names.get(k, k)} {m[k]:.3g}" for k in keys if k in m)


def _losses(run_path: Path, summary: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    if not (run_path / "metrics.csv").exists():
        return None
    m = read_metrics(run_path / "metrics.csv")
    if "step" not in m:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    loss = m["loss"]
    positive = np.all(loss[np.isfinite(loss)] > 0)
    ax.plot(m["step"], loss, lw=0.8, color="C0", label="training loss")
    evals = [k for k in ("mean_loss", "nll", "data_loss") if k in m]
    for k in evals:
        ok = np.isfinite(m[k])
        ax.plot(m["step"][ok], m[k][ok], "o-", ms=3, color="C3", label=f"{k} (evaluation)")
    if positive:
        ax.set_yscale("log")
    floor = summary.get("metrics", {}).get("floor_mean_loss")
    if floor is not None and "mean_loss" in evals:
        ax.axhline(floor, color="0.3", ls="--", lw=1, label=f"floor: true model {floor:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(f"{summary.get('model', '')}: training", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "losses.png")


def _paths(a: dict, summary: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    t = a["times"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for j in range(2):
        ax = axes[j]
        for k in range(a["fitted_paths"].shape[1]):
            ax.plot(t, a["fitted_paths"][:, k, j], color="C0", lw=0.5, alpha=0.35,
                    label="fitted model paths" if k == 0 else None)
        if "data_paths" in a:
            for k in range(a["data_paths"].shape[1]):
                ax.plot(t, a["data_paths"][:, k, j], color="0.6", lw=0.5, alpha=0.5,
                        label="data paths" if k == 0 else None)
        ax.plot(t, a["true_mean"][:, j], color="k", lw=2, label="true mean")
        ax.plot(t, a["fitted_mean"][:, j], color="C3", lw=1.6, ls="--", label="fitted mean")
        if "data_mean" in a:
            ax.plot(t, a["data_mean"][:, j], "o", color="C2", ms=3.5, label="data mean")
        ax.set_xlabel("t")
        ax.set_ylabel(f"u{j + 1}")
    axes[0].legend(fontsize=7, loc="best")
    ax = axes[2]
    ax.plot(a["true_mean"][:, 0], a["true_mean"][:, 1], color="k", lw=2, label="true mean")
    ax.plot(a["fitted_mean"][:, 0], a["fitted_mean"][:, 1], color="C3", lw=1.6, ls="--",
            label="fitted mean")
    if "data_mean" in a:
        ax.plot(a["data_mean"][:, 0], a["data_mean"][:, 1], "o", color="C2", ms=3.5,
                label="data mean")
    ax.set_xlabel("u1")
    ax.set_ylabel("u2")
    ax.set_title("phase plane", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"{summary.get('model', '')} ({summary.get('method', '')}): "
                 + _metric_text(summary, ("mean_loss", "floor_mean_loss")), fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "paths.png")


def _fields(a: dict, summary: dict, out: Path) -> Path:
    """Top: drift directions (true black, fitted red, unit length) over log|f|, and the relative
    drift error |f̂ − f|/|f|; bottom: |g| per coordinate, fitted (colour) and true (white lines).
    Dots: the visited states, the only places the errors are measured."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    g1, g2 = a["grid_u1"], a["grid_u2"]
    X, Y = np.meshgrid(g1, g2, indexing="ij")
    v = a["visited"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.4))
    true, fitted = a["true_drift"], a["fitted_drift"]
    mag = np.linalg.norm(true, axis=-1)
    ax = axes[0, 0]
    pc = ax.pcolormesh(X, Y, np.maximum(mag, 1e-3), shading="nearest", cmap="Greys", alpha=0.6,
                       norm=LogNorm())
    fig.colorbar(pc, ax=ax, label="|f| (true)")
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    step = 2
    for field, colour, width, label in ((true, "k", 0.005, "true f"), (fitted, "C3", 0.003, "fitted f")):
        d = unit(field)[::step, ::step]
        ax.quiver(X[::step, ::step], Y[::step, ::step], d[..., 0], d[..., 1], color=colour,
                  scale=28, width=width, label=label)
    ax.plot(v[:, 0], v[:, 1], ".", color="C0", ms=1, alpha=0.3)
    ax.set_title("drift direction (unit arrows)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[0, 1]
    rel = np.linalg.norm(fitted - true, axis=-1) / np.maximum(mag, 1e-12)
    pc = ax.pcolormesh(X, Y, np.clip(rel, 0, 1), shading="nearest", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(pc, ax=ax, label="|f̂ − f| / |f| (clipped at 1)")
    ax.plot(v[:, 0], v[:, 1], ".", color="w", ms=1, alpha=0.3)
    ax.set_title("drift error: " + _metric_text(summary, ("drift_error",))
                 + " (relative L2 over the dots)", fontsize=9)
    for j in range(2):
        ax = axes[1, j]
        true_g, fitted_g = a["true_noise"][..., j], a["fitted_noise"][..., j]
        hi = float(max(true_g.max(), fitted_g.max()))
        pc = ax.pcolormesh(X, Y, fitted_g, shading="nearest", cmap="viridis", vmin=0.0, vmax=hi)
        cs = ax.contour(X, Y, true_g, levels=6, colors="w", linewidths=0.8)
        ax.clabel(cs, fontsize=6)
        fig.colorbar(pc, ax=ax, label=f"|g{j + 1}| fitted (colour), true (white lines)")
        ax.plot(v[:, 0], v[:, 1], ".", color="C3", ms=0.8, alpha=0.3)
        fixed = summary.get("noise") == "fixed"
        ax.set_title(f"diffusion |g{j + 1}|" + (" (fixed at the truth)" if fixed else
                                                 ": " + _metric_text(summary, ("diffusion_error",))),
                     fontsize=9)
    for ax in axes.ravel():
        ax.set_xlabel("u1")
        ax.set_ylabel("u2")
    fig.tight_layout()
    return _save(fig, out / "fields.png")


def _jump_map(a: dict, summary: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    v, true, fitted = a["visited"], a["true_jump"], a["fitted_jump"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for j in range(2):
        ax = axes[j]
        ax.plot(true[:, j], fitted[:, j], ".", ms=2, alpha=0.5)
        lo, hi = float(min(true[:, j].min(), fitted[:, j].min())), float(max(true[:, j].max(), fitted[:, j].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true jump map, coordinate {j + 1}" + (" (u1/2)" if j == 0 else " (u2)"))
        ax.set_ylabel("fitted jump map")
    fig.suptitle("jump map at the visited states: " + _metric_text(summary, ("jump_map_error",))
                 + " (weakly identifiable: ≈ 2 jumps per path)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "jump_map.png")


def _snapshots(a: dict, summary: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    t, data, fitted = a["times"], a["data"], a["fitted"]
    picks = sorted({1, len(t) // 2, len(t) - 1})
    names = ("A", "B", "C")
    fig, axes = plt.subplots(3, 2 * len(picks), figsize=(3.0 * 2 * len(picks), 8.2))
    for col, k in enumerate(picks):
        for s in range(3):
            ax = axes[s, 2 * col]
            im = ax.imshow(data[k, s].T, origin="lower", cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{names[s]} data, t = {t[k]:.3g}", fontsize=8)
            ax = axes[s, 2 * col + 1]
            err = fitted[k, s] - data[k, s]
            bound = float(np.abs(err).max()) or 1.0
            im = ax.imshow(err.T, origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"fit − data", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    integ = summary.get("integrator", "")
    fig.suptitle(f"neural reaction–diffusion ({integ}): first index x → right, y ↑;  "
                 + _metric_text(summary, ("data_rel_error", "reaction_error")), fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "snapshots.png")


def _reaction(a: dict, summary: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    A, B = np.meshgrid(a["grid_a"], a["grid_b"], indexing="ij")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    lo = float(min(a["grid_true"].min(), a["grid_fitted"].min()))
    hi = float(max(a["grid_true"].max(), a["grid_fitted"].max()))
    v = a["visited"]
    for ax, key, title in ((axes[0], "grid_true", "true −AB"), (axes[1], "grid_fitted", "learned term")):
        pc = ax.pcolormesh(A, B, a[key], shading="nearest", cmap="magma", vmin=lo, vmax=hi)
        fig.colorbar(pc, ax=ax)
        ax.plot(v[:, 0], v[:, 1], ".", color="c", ms=1.5, alpha=0.5)
        ax.set_xlabel("A")
        ax.set_ylabel("B")
        ax.set_title(f"{title} at C = {float(a['grid_c']):.3g} (dots: visited (A, B))", fontsize=9)
    ax = axes[2]
    ax.plot(a["true_term"], a["fitted_term"], ".", ms=2, alpha=0.5)
    lo2, hi2 = float(a["true_term"].min()), float(a["true_term"].max())
    ax.plot([lo2, hi2], [lo2, hi2], "k--", lw=1)
    ax.set_xlabel("true −AB at visited states")
    ax.set_ylabel("learned term")
    ax.set_title(_metric_text(summary, ("reaction_error",)), fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "reaction.png")
