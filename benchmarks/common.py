"""What every benchmark case shares: settings tiers, the timer, rows, the table, JSON and plots.

A case module exposes ``SPEC`` (its name, title, table columns, plot) and
``run(quick, device) -> list[Row]``. A row is a plain dict: ``method``, ``setting``, ``status``
(``ok``, ``skipped`` on purpose, or ``unavailable`` with the reason), a ``note``, and the case's
own figures (``time_s``, ``error``, ``time_to_target_s``, a ``curve`` of (seconds, error), ...).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from neuralpde_cli.run.rundir import jsonable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
#: set by ``run.py --smoke``: seconds-long settings that check the suite itself (figures void)
SMOKE = False

Row = dict[str, Any]


class Unavailable(Exception):
    """A method could not run here; the message says why in the method's own words."""


def tier(quick: bool) -> str:
    """``full`` (make bench), ``quick`` (make bench-quick) or ``smoke`` (checks the code only)."""
    return "smoke" if SMOKE else "quick" if quick else "full"


#: ``neuralpde solve`` overrides for gradient training per tier: an error record every 25 steps
#: (the error-against-time curve), and shorter training in the short tiers
TRAINING = {
    "full": ["trainer.eval_every=25"],
    "quick": ["trainer.eval_every=25", "trainer.ic_steps=100", "optimizer.adam_steps=300",
              "optimizer.lbfgs_steps=10"],
    "smoke": ["trainer.eval_every=10", "trainer.ic_steps=10", "optimizer.adam_steps=20",
              "optimizer.lbfgs_steps=1", "optimizer.lbfgs_iters=5"],
}


# --- timing -----------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float
    repeats: int
    result: Any  # what the last call returned


def median_time(fn: Callable[[], Any], repeats: int, device: str = "cpu",
                budget_s: float = math.inf) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call.

    Stops repeating once the timed calls have used ``budget_s``; a warm-up call that alone
    exceeds the budget is the one measurement (slow baselines are not run twice).
    """
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    first = time.perf_counter() - start
    if first >= budget_s:
        return Timing(first, 1, result)
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), len(times), result)


class Clock:
    """Training time that excludes evaluation: ``pause()`` before anything not to be counted,
    ``resume()`` after it. It runs from construction."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.elapsed = 0.0
        self._start: float | None = time.perf_counter()

    def pause(self) -> float:
        if self._start is not None:
            sync(self.device)
            self.elapsed += time.perf_counter() - self._start
            self._start = None
        return self.elapsed

    def resume(self) -> None:
        self._start = time.perf_counter()

    def read(self) -> float:
        """The time so far, running segment included (no device sync: for caps, not records)."""
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.elapsed + running


def warm_up_torch() -> None:
    """Pay torch's one-time costs (the first optimizer step imports a good deal) before any
    in-process timing. ``neuralpde solve`` runs in fresh processes and pays them itself."""
    w = torch.zeros(2, requires_grad=True)
    for optimizer in (torch.optim.Adam([w]), torch.optim.LBFGS([w], max_iter=2,
                                                               line_search_fn="strong_wolfe")):
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((w - 1.0) ** 2).sum()
            loss.backward()
            return loss
        optimizer.step(closure)


Curve = list[tuple[float, float]]  # (seconds, error), time increasing


def time_to(curve: Curve, target: float) -> float | None:
    """First time the error is at or below ``target``; None if never."""
    return next((t for t, e in curve if e <= target), None)


def error_at(curve: Curve, budget_s: float) -> float | None:
    """The last error recorded within ``budget_s`` seconds (the state had the run stopped then)."""
    within = [e for t, e in curve if t <= budget_s]
    return within[-1] if within else None


def curve_figures(curve: Curve, target: float, budget_s: float, final_error: float | None,
                  total_s: float | None) -> dict[str, Any]:
    """Time to ``target`` and the error at ``budget_s`` from an error-against-time record (a run
    without one counts as a single point: its final error at its total time)."""
    if not curve and final_error is not None and total_s is not None:
        curve = [(total_s, final_error)]
    return {"time_to_target_s": time_to(curve, target),
            "error_at_budget": error_at(curve, budget_s), "curve": curve}


def thin(curve: Curve, points: int = 200) -> Curve:
    step = max(1, math.ceil(len(curve) / points))
    return curve[::step] + ([curve[-1]] if curve and (len(curve) - 1) % step else [])


# --- data ----------------------------------------------------------------------------------
def exact_cir_path(n: int, dt: float, rate: float, level: float, noise: float,
                   seed: int) -> np.ndarray:
    """One CIR path of n exact steps from its level (numpy's non-central χ²): 2c·X(t+Δ) given
    X(t) is χ²'(4κθ/σ², 2c·X(t)e^{−κΔ}), c = 2κ/(σ²(1 − e^{−κΔ}))."""
    rng = np.random.default_rng(seed)
    c = noise * noise * -math.expm1(-rate * dt) / (4 * rate)
    x = np.empty(n + 1)
    x[0] = level
    for i in range(n):
        x[i + 1] = c * rng.noncentral_chisquare(4 * rate * level / noise ** 2,
                                                x[i] * math.exp(-rate * dt) / c)
    return x


# --- rows -------------------------------------------------------------------------------
def row(method: str, setting: str, **values: Any) -> Row:
    return {"method": method, "setting": setting, "status": "ok", **values}


def unavailable(method: str, setting: str, reason: str) -> Row:
    """A method that could not run here (not installed, not built yet, failed)."""
    return {"method": method, "setting": setting, "status": "unavailable",
            "note": f"unavailable: {reason}"}


def skipped(method: str, setting: str, reason: str) -> Row:
    """A method left out of this setting on purpose (too slow or too large)."""
    return {"method": method, "setting": setting, "status": "skipped", "note": f"skipped: {reason}"}


def attempt(method: str, setting: str, fn: Callable[[], Row | list[Row]]) -> list[Row]:
    """Run one method; any failure becomes an ``unavailable`` row naming the reason."""
    try:
        out = fn()
    except Exception as exc:  # a peer or an option that is missing or broken: report, go on
        if device_oom(exc):
            return [unavailable(method, setting, "out of memory")]
        return [unavailable(method, setting, describe(exc))]
    return out if isinstance(out, list) else [out]


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, Unavailable):
        return text[0][:300] if text else "unavailable"
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def device_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --- running things in a fresh process -------------------------------------------------
def selected_sections(variable: str, known: tuple[str, ...]) -> list[str]:
    """The parts of a case that the environment variable ``variable`` names (comma-separated;
    unset: all of ``known``); an unknown name is refused with the choices."""
    chosen = [p.strip() for p in os.environ.get(variable, ",".join(known)).split(",")]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise Unavailable(f"{variable}: unknown part(s) {unknown}; choose from {list(known)}")
    return chosen


def run_neuralpde(command: str, overrides: list[str], run_dir: Path, device: str,
                  timeout_s: float, env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """``neuralpde <command>`` in a fresh process, as a user runs it, writing into ``run_dir``:
    its ``summary.json`` and the process's wall time. Raises :class:`Unavailable` with the
    CLI's own message when the run fails."""
    args = [sys.executable, "-m", "neuralpde_cli.cli", command, f"hydra.run.dir={run_dir}",
            f"device={device}", *overrides]
    start = time.perf_counter()
    proc = _run(args, timeout_s, cwd=str(Path(run_dir).parent), env=env)
    wall = time.perf_counter() - start
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if proc.returncode != 0 or summary.get("status") != "completed":
        raise Unavailable(summary.get("error") or _last_message(proc.stderr)
                          or f"neuralpde {command} exited with status {proc.returncode}")
    return summary, wall


def neuralpde_solve(overrides: list[str], device: str, timeout_s: float,
                    error_key: str = "rel_l2_error") -> dict[str, Any]:
    """``neuralpde solve`` in a fresh process: its ``summary.json`` plus ``curve``: (trainer
    seconds, error) from metrics.csv, and ``process_s``, the command's whole wall time."""
    with tempfile.TemporaryDirectory(prefix="neuralpde-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        summary, wall = run_neuralpde("solve", ["trainer.progress=false", *overrides], run_dir,
                                      device, timeout_s)
        summary["process_s"] = wall
        summary["curve"] = _metrics_curve(run_dir / "metrics.csv", error_key)
    return summary


def call_in_subprocess(function: str, kwargs: dict[str, Any], timeout_s: float,
                       env: dict[str, str] | None = None) -> dict[str, Any]:
    """``module:function(**kwargs)`` in a fresh Python (for peers that change global torch
    state on import); the function returns a JSON-able dict."""
    module, name = function.split(":")
    code = ("import json, sys\n"
            f"from {module} import {name}\n"
            f"print('RESULT ' + json.dumps({name}(**json.loads(sys.argv[1]))))")
    proc = _run([sys.executable, "-c", code, json.dumps(kwargs)], timeout_s, cwd=str(ROOT),
                env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise Unavailable(_last_message(proc.stderr) or f"exited with status {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def _run(args: list[str], timeout_s: float, cwd: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = env or dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    # the checkout's code, as imported in this process (make bench runs from the repo root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                              env=env)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"timed out after {timeout_s:.0f} s") from None


def _last_message(stderr: str) -> str:
    """The line of a failed run's stderr that says why: neuralpde's own one-line error, the
    last line of a traceback, else the first line (Hydra's config errors come first)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("neuralpde: ")]
    if own:
        return own[-1][:300]
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1][:300]
    return (lines or [""])[0][:300]


def _metrics_curve(path: Path, error_key: str) -> Curve:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(float(r["elapsed_s"]), float(r[error_key])) for r in rows
            if r.get(error_key) not in (None, "") and r.get("elapsed_s") not in (None, "")]


def neuralpde_errors_by_t(metrics: dict[str, Any], key: str = "rel_l2_error") -> dict[str, float]:
    """The per-time errors ``<key>_t<t>`` of a run's summary, keyed by t."""
    prefix = f"{key}_t"
    return {k[len(prefix):]: v for k, v in metrics.items()
            if k.startswith(prefix) and isinstance(v, (int, float))}


def neuralpde_row(method: str, setting: str, overrides: list[str], device: str, timeout_s: float,
                  target: float, budget_s: float) -> Row:
    """A row from one ``neuralpde solve`` run: its training time (else wall time), final error
    (``rel_l2_error``, the worst over the eval times), the errors by time, and its curve."""
    summary = neuralpde_solve(overrides, device, timeout_s)
    metrics = summary["metrics"]
    time_s = summary.get("train_time_s") or summary["wall_time_s"]
    error = metrics.get("rel_l2_error")
    note = (f"{summary['ansatz']}, {summary['optimizer']}, {summary['precision']}, "
            f"{summary.get('steps', '?')} steps")
    return row(method, setting, time_s=time_s, error=error,
               errors_by_t=neuralpde_errors_by_t(metrics), wall_time_s=summary["wall_time_s"],
               note=note, metrics=metrics, overrides=overrides,
               **curve_figures(summary["curve"], target, budget_s, error, time_s))


# --- the table, the JSON and the plot ---------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str
    header: str
    #: time | error | int | pct | text | by_t (a dict t → error)
    kind: str = "time"


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    columns: tuple[Column, ...]
    #: the column divided by the neuralpde row of the same setting (the "× neuralpde" column)
    ratio_key: str = "time_s"
    #: ``curves``: error against time per row; ``settings``: ``plot_key`` per setting and method
    plot: str = "settings"
    plot_key: str = "time_s"
    target: float | None = None


def add_ratios(spec: Spec, rows: list[Row]) -> None:
    """``ratio``: this row's ``ratio_key`` over the first neuralpde row's in the same setting."""
    for r in rows:
        ref = next((q for q in rows if q["setting"] == r["setting"] and q["status"] == "ok"
                    and q["method"].startswith("neuralpde") and q.get(spec.ratio_key)), None)
        value = r.get(spec.ratio_key)
        r["ratio"] = value / ref[spec.ratio_key] if ref and value is not None else None


def fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "time":
        return (f"{value * 1e6:.0f} µs" if value < 1e-3 else f"{value * 1e3:.1f} ms"
                if value < 1 else f"{value:.2f} s" if value < 100 else f"{value:.0f} s")
    if kind == "error":
        return f"{value:.1e}"
    if kind == "ratio":
        return f"×{value:.3g}"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "float":
        return f"{value:.2f}"
    if kind == "by_t":
        return " ".join(f"{t}:{e:.0e}" for t, e in value.items())
    return str(value)


def print_table(spec: Spec, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=spec.title, title_justify="left",
                  caption=f"× neuralpde: {_header(spec, spec.ratio_key)} over that of the first "
                          "neuralpde row of the same setting that has one", caption_justify="left")
    one_setting = len({r["setting"] for r in rows}) == 1
    headers = ([] if one_setting else [Column("setting", "setting", "text")]) \
        + [Column("method", "method", "text"), *spec.columns,
           Column("ratio", "× neuralpde", "ratio"),
           Column("note", "note", "text")]
    for c in headers:
        table.add_column(c.header, no_wrap=c.key != "note" and c.kind != "by_t",
                         justify="left" if c.kind in ("text", "by_t") else "right")
    previous = None
    for r in rows:
        if not one_setting and previous is not None and r["setting"] != previous:
            table.add_section()
        previous = r["setting"]
        ours = r["method"].startswith("neuralpde")
        style = "dim" if r["status"] != "ok" else "bold" if ours else None
        table.add_row(*(fmt(r.get(c.key), c.kind) for c in headers), style=style)
    console = Console()
    (console if console.is_terminal else Console(width=170)).print(table)


def _header(spec: Spec, key: str) -> str:
    return next((c.header for c in spec.columns if c.key == key), key)


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": _cpu_model(),
        "device": device, "platform": platform.platform(), "python": platform.python_version(),
        # over the last 1, 5, 15 minutes: anything near the core count means the figures
        # were taken on a busy machine
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_stem(spec: Spec, device: str, level: str) -> str:
    """``<case>_<device>`` for a full run, with ``_quick``/``_smoke`` for the short tiers, so
    CPU and GPU figures, and short runs and real ones, never share a file."""
    return f"{spec.name}_{device.split(':')[0]}" + ("" if level == "full" else f"_{level}")


def write_results(spec: Spec, rows: list[Row], device: str, level: str, out_dir: Path,
                  elapsed_s: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results_stem(spec, device, level)}.json"
    record = {
        "case": spec.name, "title": spec.title, "tier": level,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": machine(device), "torch": torch.__version__,
        "case_wall_time_s": round(elapsed_s, 2), "rows": rows,
    }
    path.write_text(json.dumps(jsonable(record), indent=1) + "\n")
    return path


def plot(spec: Spec, rows: list[Row], path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if spec.plot == "curves":
        drawn = [r for r in ok if r.get("curve")]
        for r in drawn:
            t, e = zip(*r["curve"])
            ax.plot(t, e, "o-", ms=2, lw=1.6 if r["method"].startswith("neuralpde") else 1.1,
                    label=f"{r['method']} ({r['setting']})" if len({q['setting'] for q in ok}) > 1
                    else r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("training time [s]")
        ax.set_ylabel("relative L2 error")
        if spec.target:
            ax.axhline(spec.target, color="0.5", ls="--", lw=0.8)
    else:
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        drawn = []
        for method in dict.fromkeys(r["method"] for r in ok):
            pts = [(settings.index(r["setting"]), r[spec.plot_key]) for r in ok
                   if r["method"] == method and r.get(spec.plot_key)]
            if pts:
                drawn.append(method)
                x, y = zip(*pts)
                ax.plot(x, y, "o-", ms=4, label=method)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(_header(spec, spec.plot_key) + " [s]")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_title(textwrap.fill(spec.title, 110), fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(spec: Spec, rows: list[Row], device: str, level: str, out_dir: Path,
           elapsed_s: float) -> list[Path]:
    """Print the case's table, write its JSON and its plot; returns the files written."""
    add_ratios(spec, rows)
    for r in rows:
        if "curve" in r:
            r["curve"] = thin(r["curve"])
    print_table(spec, rows)
    written = [write_results(spec, rows, device, level, out_dir, elapsed_s)]
    picture = plot(spec, rows, out_dir / f"{results_stem(spec, device, level)}.png")
    return written + ([picture] if picture else [])
