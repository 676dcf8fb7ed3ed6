"""``make bench`` / ``make bench-quick``: every case in sequence, one table each.

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--cases heat2d,diffusion]

Cases run one after another, never in parallel (they would slow each other down). Each writes
``benchmarks/results/<case>_<device>[_quick].json`` (date, machine, load, torch version, rows)
and a plot beside it, so CPU and GPU figures never mix. ``--smoke`` runs seconds-long settings
that only check the suite works (``_smoke`` files; pass ``--out`` to keep them elsewhere).

``neuralpde solve`` runs as users run it, in a fresh process per run; the baselines written here
run in this process after one warm-up of torch; DeepXDE runs in its own process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import common

CASES = ("heat2d", "heat_step_cost", "heat_gmm", "fokker_planck", "diffusion", "neural_dynamics",
         "ddp", "calibrate", "calibrate_multi", "calibrate_real", "loglik_cost", "mlp_density",
         "mlp_nonlinear", "jumps_latent", "equity_real")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about two minutes in all")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings that check the suite runs; the figures mean nothing")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="results folder")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    common.SMOKE = args.smoke
    level = common.tier(args.quick)

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes are running "
              "and the timings below will be slower than on an idle machine", file=sys.stderr)
    start = time.perf_counter()
    common.warm_up_torch()
    for name in cases:
        case_start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            spec, rows = module.SPEC, module.run(args.quick, args.device)
        except Exception as exc:  # a broken case must not take the others down
            spec = common.Spec(name, name, ())
            rows = [common.unavailable(name, "—", common.describe(exc))]
        written = common.report(spec, rows, args.device, level, args.out,
                                time.perf_counter() - case_start)
        print("wrote " + ", ".join(str(p) for p in written) + "\n")
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"command: python -m benchmarks.run {' '.join(sys.argv[1:])}".rstrip())
    print(f"date: {now}  tier: {level}  device: {args.device}  "
          f"total: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
