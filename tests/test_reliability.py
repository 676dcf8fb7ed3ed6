"""Reliability: resume, signals, kill -9 during a checkpoint write, NaN rollback, bad input.

Most runs call ``neuralpde_cli.cli.main`` in-process (fast, and a patched method can send a
signal or inject a NaN at an exact step; plots are skipped there, they are not under test).
The signal, kill -9 and a few bad-input tests run the real console script in a subprocess.

Resumed runs must end bit-identical to an uninterrupted run with the same seed: every
metrics.csv column but ``elapsed_s``, and the summary's metrics, final loss, steps and stop
reason, compared with ``==``. Every run uses one torch thread (``OMP_NUM_THREADS=1`` for
subprocesses): the same reductions in every process, and no OpenMP spinning on a shared machine.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import read_summary, run_cli
from neuralpde_cli import registry
from neuralpde_cli.cli import main
from neuralpde_cli.config import SolveConfig
from neuralpde_cli.training.checkpoint import load_checkpoint, stale_temp_files
from neuralpde_cli.training.objectives import DensityObjective
from neuralpde_cli.training.samplers import SamplerConfig
from neuralpde_cli.training.trainer import Trainer, TrainerConfig

#: ic steps 1–20, Adam 21–80, L-BFGS 81–84; a checkpoint every 10 steps
TINY = ["experiment=smoke", "trainer.progress=false", "trainer.checkpoint_every=10",
        "optimizer.lbfgs_steps=4"]
ADAM, LBFGS, TOTAL = range(21, 81), range(81, 85), 84
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# --- running the CLI ----------------------------------------------------------------------
@dataclass
class Result:
    code: int
    out: str
    err: str


def run_in_process(args: list[str]) -> Result:
    """``neuralpde solve ARGS`` in this process: exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch("hydra._internal.utils.is_under_debugger", return_value=False), \
            mock.patch("neuralpde_cli.run.plots.make_plots", return_value=[]):
        try:
            code = main(["solve", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Result(code, out.getvalue(), err.getvalue())


def start(command: list[str], logs: Path) -> subprocess.Popen:
    """``python COMMAND`` in the background on one thread, output to LOGS.out/.err."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *command], env=env,
                            stdout=logs.with_suffix(".out").open("w"),
                            stderr=logs.with_suffix(".err").open("w"))


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], logs: Path,
              timeout: float = 180) -> None:
    """Poll until ``ready()``; fail with the process's stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never ready (exit {proc.poll()}): "
                        f"{logs.with_suffix('.err').read_text()[-2000:]}")
        time.sleep(0.01)


# --- reading a run directory --------------------------------------------------------------
def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock column."""
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


def last_row(run_dir: Path) -> tuple[int, str]:
    """(step, phase) of the last complete metrics.csv line, (0, "") before the first."""
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines() if path.exists() else []
    fields = [line.split(",") for line in lines[1:]]
    complete = [f for f in fields if len(f) == len(lines[0].split(","))]
    return (int(complete[-1][0]), complete[-1][1]) if complete else (0, "")


def checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_result(run_dir: Path, reference: Path) -> None:
    """Bit-identical to the uninterrupted run: nothing lost, nothing repeated."""
    assert metrics_rows(run_dir) == metrics_rows(reference)
    got, want = read_summary(run_dir), read_summary(reference)
    assert got["status"] == want["status"] == "completed"
    for key in ("metrics", "final_loss", "steps", "stop_reason"):
        assert got[key] == want[key], key
    assert not stale_temp_files(run_dir / "checkpoints")


def assert_interrupted(run_dir: Path, err: str, signum: int, step: int) -> None:
    """One resume line, a checkpoint at ``step``, rows up to it, the summary says so."""
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (
        f"neuralpde: interrupted by {name} at step {step}; checkpoint written. "
        f"Resume with: neuralpde solve resume={run_dir}")
    assert "Traceback" not in err
    assert checkpoint(run_dir)["step"] == step
    assert last_row(run_dir)[0] == step
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and name in summary["error"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_in_process([*TINY, f"hydra.run.dir={run_dir}"])
    assert result.code == 0, result.err
    return run_dir


# --- injecting trouble at an exact step ---------------------------------------------------
@contextlib.contextmanager
def signal_at(step: int, signum: int) -> Iterator[None]:
    """This process receives ``signum`` while it takes training step ``step``."""
    real = Trainer._step

    def step_then_signal(self: Trainer) -> tuple[float, dict[str, float]]:
        result = real(self)
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        return result

    with mock.patch.object(Trainer, "_step", step_then_signal):
        yield


@contextlib.contextmanager
def poisoned(kind: str, first: int, last: int | None = None) -> Iterator[None]:
    """The objective's ``pde`` term (kind="loss") or its gradient (kind="gradient") is NaN on
    Adam-phase evaluations ``first``…``last`` (1-based; call n is step 20 + n until a rollback)."""
    real = DensityObjective.loss_terms
    calls = itertools.count(1)

    def loss_terms(self: DensityObjective, phase: str) -> dict[str, torch.Tensor]:
        terms = real(self, phase)
        n = next(calls) if phase == "adam" else 0
        if n >= first and (last is None or n <= last):
            if kind == "loss":
                terms["pde"] = terms["pde"] * float("nan")
            else:  # forward +0; backward d√u/du = inf at u = 0, times du/dp = 0: NaN
                weight = next(self.ansatz.parameters())
                terms["pde"] = terms["pde"] + torch.sqrt((weight * 0).sum())
        return terms

    with mock.patch.object(DensityObjective, "loss_terms", loss_terms):
        yield


# --- resume -------------------------------------------------------------------------------
#: in-process interrupts, chained: each resume is interrupted again at the next point
INTERRUPTS = [(1, signal.SIGINT), (20, signal.SIGTERM), (47, signal.SIGINT),
              (80, signal.SIGTERM), (82, signal.SIGINT)]


def test_interrupted_anywhere_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    """First ic step, ic→Adam boundary, mid-Adam, Adam→L-BFGS boundary (the frozen collocation
    set is drawn then), mid-L-BFGS: each interrupt, then resume, then the same final result."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}"]
    for step, signum in INTERRUPTS:
        with signal_at(step, signum):
            result = run_in_process(args)
        assert result.code == 128 + signum, result.err
        assert_interrupted(run_dir, result.err, signum, step)
        args = [f"resume={run_dir}"]
    result = run_in_process(args)
    assert result.code == 0, result.err
    assert_same_result(run_dir, reference)


def test_levenberg_marquardt_interrupted_resumes_to_the_same_result(tmp_path: Path) -> None:
    """The damping Levenberg–Marquardt adapts is part of the checkpoint: interrupted at its
    first step and mid-phase, resumed, the run ends bit-identical to an uninterrupted one."""
    lm = ["experiment=ou_spacetime", "optimizer.lm_steps=12", "sampler.batch_size=16",
          "trainer.progress=false", "trainer.checkpoint_every=5"]
    reference_dir = tmp_path / "reference"
    assert run_in_process([*lm, f"hydra.run.dir={reference_dir}"]).code == 0
    run_dir = tmp_path / "run"
    args = [*lm, f"hydra.run.dir={run_dir}"]
    for step, signum in [(1, signal.SIGINT), (7, signal.SIGTERM)]:
        with signal_at(step, signum):
            result = run_in_process(args)
        assert result.code == 128 + signum, result.err
        assert_interrupted(run_dir, result.err, signum, step)
        args = [f"resume={run_dir}"]
    assert run_in_process(args).code == 0
    assert {r["phase"] for r in metrics_rows(run_dir)} == {"lm"}
    assert_same_result(run_dir, reference_dir)


def test_signals_from_outside_then_resume(reference: Path, tmp_path: Path) -> None:
    """The console script: SIGINT during Adam (exit 130), resume, SIGTERM during L-BFGS (exit
    143), resume to the end: the same result as the uninterrupted run."""
    run_dir = tmp_path / "run"
    plan = [([*TINY, f"hydra.run.dir={run_dir}"], signal.SIGINT, "adam", ADAM),
            ([f"resume={run_dir}"], signal.SIGTERM, "lbfgs", LBFGS)]
    for i, (args, signum, phase, steps) in enumerate(plan):
        logs = tmp_path / f"leg{i}"
        proc = start(["-m", "neuralpde_cli.cli", "solve", *args], logs)
        wait_for(proc, lambda: last_row(run_dir)[1] == phase, logs)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
        err = logs.with_suffix(".err").read_text()
        step = checkpoint(run_dir)["step"]
        assert step in steps, f"interrupted at step {step}, not in {phase}"
        assert_interrupted(run_dir, err, signum, step)
    result = run_in_process([f"resume={run_dir}"])
    assert result.code == 0, result.err
    assert_same_result(run_dir, reference)


#: run in a subprocess: the 2nd write of last.pt (step 20) writes half its bytes and hangs
HANGING_WRITER = '''
import io, sys, time
from pathlib import Path
import torch
import neuralpde_cli.training.checkpoint as ck
import neuralpde_cli.training.trainer as tr

marker, writes = Path(sys.argv[1]), []
def save(path, state):
    writes.extend([state["step"]] if path.name == "last.pt" else [])
    if path.name != "last.pt" or len(writes) < 2:
        return ck.save_checkpoint(path, state)
    def half_then_hang(handle):
        buf = io.BytesIO()
        torch.save({"format": ck.FORMAT, **state}, buf)
        handle.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        handle.flush()
        marker.write_text(str(state["step"]))
        time.sleep(600)
    ck.atomic_write(path, half_then_hang)
tr.save_checkpoint = save
from neuralpde_cli.cli import main
sys.exit(main(sys.argv[2:]))
'''


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(reference: Path,
                                                                  tmp_path: Path) -> None:
    """kill -9 halfway through writing the step-20 checkpoint: last.pt is still the whole
    step-10 one, and resuming from it loses nothing."""
    run_dir, marker, logs = tmp_path / "run", tmp_path / "paused", tmp_path / "hang"
    script = tmp_path / "hanging_writer.py"
    script.write_text(HANGING_WRITER)
    proc = start([str(script), str(marker), "solve", *TINY, f"hydra.run.dir={run_dir}"], logs)
    wait_for(proc, lambda: marker.is_file() and marker.read_text() != "", logs)
    assert marker.read_text() == "20" and stale_temp_files(run_dir / "checkpoints")
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert checkpoint(run_dir)["step"] == 10
    assert read_summary(run_dir)["status"] == "running"  # whole, though no longer true
    result = run_in_process([f"resume={run_dir}"])
    assert result.code == 0, result.err
    assert_same_result(run_dir, reference)


def test_resuming_a_finished_run_changes_nothing(reference: Path, tmp_path: Path) -> None:
    """Resume after the last step (e.g. a signal during the final plots): no training, the
    same result written again."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    result = run_in_process([f"resume={run_dir}"])
    assert result.code == 0, result.err
    assert_same_result(run_dir, reference)


# --- divergence ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,what", [("loss", "loss term 'pde'"),
                                       ("gradient", "the gradient of the loss")])
def test_one_nan_rolls_back_and_lowers_the_learning_rate(reference: Path, tmp_path: Path,
                                                         kind: str, what: str) -> None:
    """A NaN at step 30 is caught that step: roll back to the last good snapshot, halve the
    learning rate, go on; the run completes with every row finite and steps contiguous."""
    run_dir = tmp_path / "run"
    with poisoned(kind, first=10, last=10):
        result = run_in_process([*TINY, f"hydra.run.dir={run_dir}"])
    assert result.code == 0, result.err
    assert f"step 30: {what} became NaN/Inf; rolled back" in (run_dir / "solve.log").read_text()
    rows, ref = metrics_rows(run_dir), metrics_rows(reference)
    assert rows[:29] == ref[:29]
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL + 1))
    assert all(float(r["loss"]) < float("inf") for r in rows)  # finite, not NaN
    assert float(rows[29]["lr"]) < float(ref[29]["lr"])
    state = checkpoint(run_dir)
    assert (state["retries"], state["lr_scale"]) == (1, 0.5)
    assert read_summary(run_dir)["status"] == "completed"


def test_persistent_nan_stops_naming_step_and_term(tmp_path: Path) -> None:
    """NaN from step 30 on: after trainer.max_retries rollbacks, exit 3 with one line naming the
    step and the term; summary.json says diverged; rows and checkpoint stay consistent."""
    run_dir = tmp_path / "run"
    with poisoned("loss", first=10):
        result = run_in_process([*TINY, "trainer.max_retries=2", f"hydra.run.dir={run_dir}"])
    assert result.code == 3 and "Traceback" not in result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("neuralpde: error: training diverged at step 30 (phase adam): "
                           "loss term 'pde' is NaN/Inf; 2 rollbacks"), line
    summary = read_summary(run_dir)
    assert summary["status"] == "diverged" and "step 30" in summary["error"]
    assert [int(r["step"]) for r in metrics_rows(run_dir)] == list(range(1, 30))
    assert checkpoint(run_dir)["step"] == 20
    assert not stale_temp_files(run_dir / "checkpoints")


# --- bad input ----------------------------------------------------------------------------
@dataclass
class BadInput:
    """Overrides that must fail cleanly, a word the error must contain, and optional setup."""

    args: list[str]
    expect: str
    prepare: Callable[[], None] | None = None

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"BadInput({' '.join(self.args)!r}, expect={self.expect!r})"


def _fmt(value: float) -> str:
    return repr(float(value))


IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
NOT_POSITIVE = st.floats(max_value=0.0) | st.sampled_from([float("inf"), float("-inf")])
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "none"}
INT_KEYS = ["equation.dim", "sampler.batch_size", "ansatz.width", "ansatz.depth", "seed",
            "trainer.checkpoint_every", "optimizer.adam_steps"]
GROUPS = ["equation", "ansatz", "optimizer", "sampler", "trainer", "device", "experiment"]
#: ways to spoil a mid-run checkpoint's contents
MISMATCHES: dict[str, Callable[[dict], None]] = {
    "model tensor missing": lambda s: s["model"].pop(next(iter(s["model"]))),
    "model tensor of another shape": lambda s: s["model"].update(
        {next(iter(s["model"])): torch.zeros(3, 3, dtype=torch.float64)}),
    "phase the plan lacks": lambda s: s.update(phase_index=7),
    "RNG state of another type": lambda s: s["rng"].update(torch=torch.zeros(5)),
    "no optimizer state": lambda s: s.update(optimizer={}),
    "another format": lambda s: s.update(format="something-else"),
}
_RUNS = itertools.count()
#: each example is a CLI call (~0.5 s) and writes under the test's tmp_path (unique names)
SLOW_WITH_TMP_PATH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


def _known_keys() -> set[str]:
    """Every key of every schema: a random "unknown" key must not be one of them."""
    schemas = [SolveConfig, SamplerConfig, TrainerConfig,
               *(o.config_class for options in registry.GROUPS.values() for o in options.values())]
    return {"hydra"} | {f.name for cls in schemas for f in dataclasses.fields(cls)}


def _not_spd(m: tuple[float, float, float]) -> bool:
    """Symmetric, and the smallest eigenvalue (as the product computes it) is not positive."""
    a = torch.tensor([[m[0], m[1]], [m[1], m[2]]], dtype=torch.float64)
    return bool(torch.linalg.eigvalsh(a)[0] <= 0)


def _cov(rows: list[list[float]]) -> str:
    return "[" + ",".join("[" + ",".join(_fmt(v) for v in row) + "]" for row in rows) + "]"


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONFIGS / group).glob("*.yaml")}


def bad_inputs(corrupt_dir: Path, pristine: Path, scratch: Path) -> st.SearchStrategy[BadInput]:
    """Random bad overrides of every kind the issue names (and a few more); resume examples
    spoil ``corrupt_dir``'s checkpoint, a mid-run one (``pristine`` is a copy)."""
    last_pt = corrupt_dir / "checkpoints" / "last.pt"
    good_bytes = pristine.read_bytes()

    def write_bytes(data: bytes) -> BadInput:
        return BadInput([f"resume={corrupt_dir}"], "checkpoint", lambda: last_pt.write_bytes(data))

    known_keys = _known_keys()

    def mismatched(edit: str) -> BadInput:
        def prepare() -> None:
            state = torch.load(pristine, weights_only=True)
            MISMATCHES[edit](state)
            torch.save(state, last_pt)
        return BadInput([f"resume={corrupt_dir}"], "checkpoint", prepare)

    def not_a_folder(name: str) -> BadInput:
        blocker = scratch / f"file_{name}"
        return BadInput([f"hydra.run.dir={blocker}/run"], "directory",
                        lambda: blocker.write_text("not a folder"))

    cases = [
        NOT_POSITIVE.map(lambda x: BadInput([f"equation.diffusivity={_fmt(x)}"], "diffusivity")),
        st.integers(max_value=0).map(lambda n: BadInput([f"equation.dim={n}"], "dim")),
        st.integers(max_value=0).map(lambda n: BadInput([f"sampler.batch_size={n}"], "batch_size")),
        NOT_POSITIVE.map(lambda x: BadInput([f"equation.t_final={_fmt(x)}"], "t_final")),
        st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.floats(-10, 10)).filter(_not_spd).map(
            lambda m: BadInput([f"equation.initial_cov={_cov([[m[0], m[1]], [m[1], m[2]]])}"],
                               "initial_cov")),
        st.tuples(st.floats(0.5, 10), st.floats(-10, 10), st.floats(1, 10)).map(  # asymmetric
            lambda m: BadInput([f"equation.initial_cov={_cov([[m[0], m[1]], [m[1] + m[2], m[0]]])}"],
                               "initial_cov")),
        (NOT_POSITIVE | st.just(float("nan"))).map(
            lambda x: BadInput([f"optimizer.lr={_fmt(x)}"], "lr")),
        st.integers(max_value=0).map(lambda n: BadInput([f"ansatz.width={n}"], "width")),
        st.tuples(st.sampled_from(INT_KEYS), IDENT.filter(lambda w: w not in BOOL_WORDS)).map(
            lambda kv: BadInput([f"{kv[0]}={kv[1]}"], kv[0].split(".")[-1])),
        IDENT.filter(lambda w: w not in BOOL_WORDS).map(
            lambda w: BadInput([f"trainer.progress={w}"], "progress")),
        st.tuples(st.sampled_from(["", "+"]), st.sampled_from(["", "equation.", "ansatz.",
                                                               "trainer.", "sampler."]),
                  IDENT.filter(lambda k: k not in known_keys)).map(
            lambda t: BadInput([f"{t[0]}{t[1]}{t[2]}=1"], t[2])),
        st.tuples(st.sampled_from(GROUPS), IDENT).filter(lambda g: g[1] not in _options(g[0])).map(
            lambda g: BadInput([f"{g[0]}={g[1]}"], g[1])),
        (st.sampled_from(["float16", "bfloat16", "half", "float128", "int32"]) | IDENT).filter(
            lambda p: p not in ("float32", "float64")).map(
            lambda p: BadInput([f"precision={p}"], "precision")),
        st.integers(max_value=-1).map(lambda n: BadInput([f"trainer.max_retries={n}"], "max_retries")),
        (st.floats(max_value=0.0) | st.floats(min_value=1.0)).map(
            lambda x: BadInput([f"trainer.retry_lr_factor={_fmt(x)}"], "retry_lr_factor")),
        (st.integers(min_value=2 ** 64) | st.integers(max_value=-2 ** 63 - 1)).map(
            lambda n: BadInput([f"seed={n}"], "seed")),
        st.just(BadInput(["sampler=self"], "sampler=self")),
        st.just(BadInput(["optimizer.adam_steps=0", "optimizer.lbfgs_steps=0",
                          "trainer.ic_steps=0"], "steps")),
        IDENT.map(lambda name: BadInput([f"resume={scratch / 'missing' / name}"], "resume=")),
        IDENT.map(not_a_folder),
        st.binary(max_size=64).map(write_bytes),
        st.integers(1, len(good_bytes) - 1).map(lambda n: write_bytes(good_bytes[:n])),
        st.sampled_from(sorted(MISMATCHES)).map(mismatched),
    ]
    if not torch.cuda.is_available():
        cases.append(st.just(BadInput(["device=cuda"], "device=cuda")))
    return st.one_of(cases)


@pytest.fixture(scope="module")
def bad_input_strategy(tmp_path_factory: pytest.TempPathFactory) -> st.SearchStrategy[BadInput]:
    """Bad inputs, with a run interrupted during Adam whose checkpoint they may spoil."""
    scratch = tmp_path_factory.mktemp("bad")
    corrupt_dir = scratch / "corrupt"
    with signal_at(30, signal.SIGINT):
        assert run_in_process([*TINY, f"hydra.run.dir={corrupt_dir}"]).code == 130
    pristine = scratch / "midrun.pt"
    shutil.copy(corrupt_dir / "checkpoints" / "last.pt", pristine)
    return bad_inputs(corrupt_dir, pristine, scratch)


def check_clean_failure(bad: BadInput, result: Result, run_dir: Path) -> None:
    """Non-zero exit, no traceback, an error that names the problem, no training."""
    assert result.code not in (0, None), f"{bad} was accepted"
    assert "Traceback" not in result.err, result.err
    assert bad.expect.lower() in result.err.lower(), result.err
    assert not (run_dir / "metrics.csv").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_WITH_TMP_PATH)
@given(data=st.data())
def test_bad_input_fails_cleanly_before_any_work(bad_input_strategy: st.SearchStrategy[BadInput],
                                                 tmp_path: Path, data: st.DataObject) -> None:
    """In-process: every bad input is one clean error and a non-zero exit; training never starts."""
    bad = data.draw(bad_input_strategy)
    if bad.prepare:
        bad.prepare()
    run_dir = tmp_path / f"run{next(_RUNS)}"
    started: list[bool] = []
    with mock.patch.object(Trainer, "fit", lambda self, **kw: started.append(True)):
        result = run_in_process([*TINY, f"hydra.run.dir={run_dir}", *bad.args])
    check_clean_failure(bad, result, run_dir)
    assert not started, f"{bad}: training started"


@settings(max_examples=3, deadline=None, suppress_health_check=SLOW_WITH_TMP_PATH)
@given(data=st.data())
def test_bad_input_fails_cleanly_in_a_subprocess(bad_input_strategy: st.SearchStrategy[BadInput],
                                                 tmp_path: Path, data: st.DataObject) -> None:
    """The same, through the real console script."""
    bad = data.draw(bad_input_strategy)
    if bad.prepare:
        bad.prepare()
    run_dir = tmp_path / f"sub{next(_RUNS)}"
    out = run_cli(["solve", *TINY, f"hydra.run.dir={run_dir}", *bad.args], tmp_path, timeout=120)
    check_clean_failure(bad, Result(out.returncode, out.stdout, out.stderr), run_dir)


# --- full disk ----------------------------------------------------------------------------
def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_start_up_is_one_clean_line(tmp_path: Path) -> None:
    """Nothing is written when the output folder has no room (fsync fails as on a full disk)."""
    run_dir = tmp_path / "run"
    with mock.patch("os.fsync", _no_space):
        result = run_in_process([*TINY, f"hydra.run.dir={run_dir}"])
    assert result.code == 2 and "Traceback" not in result.err
    assert "No space left on device" in result.err.strip().splitlines()[-1]
    assert not run_dir.exists()


def test_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """The disk fills up during the second checkpoint write: one clean line, the first
    checkpoint intact, no partial file left."""
    run_dir = tmp_path / "run"
    real_save, calls = torch.save, itertools.count()

    def save(obj: object, handle: io.BufferedWriter) -> None:
        if next(calls) == 0:
            return real_save(obj, handle)
        handle.write(b"\0" * 100)
        _no_space()

    with mock.patch("torch.save", save):
        result = run_in_process([*TINY, f"hydra.run.dir={run_dir}"])
    assert result.code == 2 and "Traceback" not in result.err
    assert "No space left on device" in result.err.strip().splitlines()[-1]
    assert checkpoint(run_dir)["step"] == 10
    assert not stale_temp_files(run_dir / "checkpoints")
    assert read_summary(run_dir)["status"] == "failed"
