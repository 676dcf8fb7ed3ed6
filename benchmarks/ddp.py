"""Case: data-parallel training on 2 CPU processes (torchrun, gloo), one thread each.

The same 2-D heat training (MLP 3×64, Adam, float64) as ``neuralpde solve`` runs it, timed by
the trainer (train_time_s / steps, median of repeats, each in a fresh process):

* 1 process, batch B: the baseline;
* 2 ranks, B/2 points each: the same global batch, the work split (strong scaling);
* 2 ranks, B points each: twice the points per step in about the time of one (weak scaling).

Every run uses OMP_NUM_THREADS=1, so 2 ranks use 2 cores against the baseline's 1: the
speed-up is what a second core buys through DDP, gradient all-reduce and all.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Column, Row, Spec, Unavailable, attempt, row, tier

SPEC = Spec(
    "ddp",
    "Data-parallel training, 2 CPU ranks (gloo) vs 1 process, one thread each: time per step",
    (Column("time_s", "time / step"), Column("points", "points / step", "int"),
     Column("repeats", "repeats", "int")),
)
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(batch=2048, steps=300, repeats=3),
    "quick": dict(batch=1024, steps=100, repeats=3),
    "smoke": dict(batch=64, steps=5, repeats=1),
}


def _solve(ranks: int, batch: int, steps: int) -> dict[str, Any]:
    """One training in a fresh process (or ``ranks`` processes under torchrun)."""
    with tempfile.TemporaryDirectory(prefix="neuralpde-bench-ddp-") as tmp:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={ranks}", "-m"] if ranks > 1 else [sys.executable, "-m"]
        args = [*launcher, "neuralpde_cli.cli", "solve", "device=cpu", "trainer.progress=false",
                "ansatz.width=64", "ansatz.depth=3", f"sampler.batch_size={batch}",
                f"optimizer.adam_steps={steps}", "optimizer.lbfgs_steps=0", "trainer.ic_steps=0",
                f"trainer.eval_every={10 * steps}", f"trainer.checkpoint_every={10 * steps}",
                f"hydra.run.dir={tmp}/run"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp, env=env, timeout=1800)
        summary_file = Path(tmp) / "run" / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if proc.returncode != 0 or summary.get("status") != "completed":
            raise Unavailable(summary.get("error") or proc.stderr.strip()[-300:])
        return summary


def _measure(method: str, setting: str, ranks: int, per_rank: int, s: dict[str, Any]) -> Row:
    runs = [_solve(ranks, per_rank, s["steps"]) for _ in range(s["repeats"])]
    per_step = [r["train_time_s"] / r["steps"] for r in runs]
    errors = [r["metrics"]["rel_l2_error"] for r in runs]
    assert all(r.get("world_size", 1) == ranks for r in runs)
    return row(method, setting, time_s=statistics.median(per_step), points=ranks * per_rank,
               repeats=len(runs), error=statistics.median(errors), all_times_s=per_step,
               note=f"rel_l2_error {statistics.median(errors):.2e} after {s['steps']} steps")


def run(quick: bool, device: str) -> list[Row]:
    s = SETTINGS[tier(quick)]
    if device != "cpu":
        return [row("skipped", "cpu only", note="this case measures CPU ranks (gloo)")]
    batch = s["batch"]
    setting = f"2-D heat, B={batch}"
    rows: list[Row] = []
    rows += attempt("neuralpde, 1 process, batch B", setting,
                    lambda: _measure("neuralpde, 1 process, batch B", setting, 1, batch, s))
    rows += attempt("2 ranks, B/2 each (same global batch)", setting,
                    lambda: _measure("2 ranks, B/2 each (same global batch)", setting, 2,
                                     batch // 2, s))
    rows += attempt("2 ranks, B each (2B points per step)", setting,
                    lambda: _measure("2 ranks, B each (2B points per step)", setting, 2, batch, s))
    return rows
