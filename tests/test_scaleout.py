"""Scale-out on existing engines: Hydra launchers, torch.distributed data parallelism.

CPU only, one thread per process, gloo on the loopback interface. The slow tests (marked)
run the submitit launcher and the interrupted/resumed torchrun run.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_summary

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120", "OMP_NUM_THREADS": "1",
       "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
CLI = [sys.executable, "-m", "neuralpde_cli.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "neuralpde_cli.cli"]
#: a seconds-long grid sweep: a single level and a two-level multigrid chain
GRID_SWEEP = ["experiment=smoke", "equation=diffusion", "multigrid.levels=1,2"]


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
        ) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; returns the result and the pid it ran under (the sweep's parent)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), proc.pid


# --- launchers ------------------------------------------------------------------------------
def test_every_installed_hydra_plugin_imports() -> None:
    """A broken plugin breaks every Hydra app at discovery: import each, and find the two
    launchers the `launchers` extra installs."""
    import hydra_plugins
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = [m.name for m in pkgutil.iter_modules(hydra_plugins.__path__)]
    for name in names:
        importlib.import_module(f"hydra_plugins.{name}")
    launchers = {cls.__name__ for cls in Plugins.instance().discover(Launcher)}
    assert {"JoblibLauncher", "LocalLauncher", "SlurmLauncher"} <= launchers, launchers
    assert not {"hydra_ax_sweeper", "hydra_nevergrad_sweeper"} & set(names)


def test_launcher_presets_compose() -> None:
    """hydra/launcher=slurm and =local are the plugins' configs with neuralpde's defaults."""
    from hydra import compose, initialize_config_dir
    from neuralpde_cli.config import register_configs
    from neuralpde_cli.tasks.common import config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="solve"):
        slurm = compose("solve", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
        local = compose("solve", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu"
    assert slurm.array_parallelism == 64 and slurm.tasks_per_node == 1
    assert list(slurm.setup) == ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2


def test_missing_launcher_names_the_extra() -> None:
    from hydra.errors import MissingConfigException
    from neuralpde_cli.config_errors import describe_composition_error

    def line(missing: str, message: str) -> str:
        exc = MissingConfigException(message, missing_cfg_file=missing, options=["basic"])
        return describe_composition_error(exc, [], "configs", None)

    text = line("hydra/launcher/joblib", "In 'hydra/config': Could not find 'hydra/launcher/joblib'")
    assert text.startswith("hydra/launcher=joblib: not installed here;")
    assert 'pip install "neuralpde[launchers]"' in text
    text = line("hydra/launcher/submitit_slurm",
                "In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.")
    assert text.startswith("hydra/launcher=slurm needs hydra/launcher=submitit_slurm")
    assert "neuralpde tune" in line("hydra/sweeper/optuna", "Could not find 'hydra/sweeper/optuna'")
    assert "\n" not in text


def _check_sweep(sweep: Path, parent_pid: int) -> list[dict]:
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    rows = (sweep / "sweep_summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(",completed," in r for r in rows[1:]), rows
    summaries = [read_summary(job) for job in jobs]
    assert all(s["status"] == "completed" for s in summaries)
    assert all(s["pid"] != parent_pid for s in summaries), "a job ran in the parent process"
    chain = read_summary(jobs[1] / "level_1")  # the multigrid chain, warm-started level by level
    assert summaries[1]["levels"][1]["metrics"] == chain["metrics"]
    assert all(s["metrics"]["rel_l2_error"] < 1e-6 for s in summaries)  # against scipy's solve
    return summaries


def test_joblib_sweep_runs_jobs_in_worker_processes(tmp_path: Path) -> None:
    result, pid = run([*CLI, "solve", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       *GRID_SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    _check_sweep(tmp_path / "sweep", pid)
    assert "sweep: 2 jobs, 0 failed" in result.stdout


@pytest.mark.slow
def test_submitit_local_sweep_with_warm_start(tmp_path: Path) -> None:
    """submitit_local runs each job as its own process; a warm start from an earlier run
    (init.from_run) and a multigrid chain work as with the basic launcher."""
    first, _ = run([*CLI, "solve", "experiment=smoke", "equation=diffusion",
                    f"hydra.run.dir={tmp_path / 'first'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    result, pid = run([*CLI, "solve", "-m", "hydra/launcher=submitit_local", *GRID_SWEEP,
                       f"init.from_run={tmp_path / 'first'}", f"hydra.sweep.dir={tmp_path / 's'}"],
                      tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = _check_sweep(tmp_path / "s", pid)
    assert summaries[0]["cycles"] <= 1  # started from the converged solution of the same grid
    assert (tmp_path / "s" / ".submitit").is_dir()


# --- data parallel --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradient_worker(rank: int, port: int, out: str) -> None:
    """One gloo rank: the DDP gradient of the trainer's loss on this rank's own points; rank 0
    also the one-process gradient of the same loss on the union of both ranks' points."""
    import copy

    import torch.distributed as dist

    from neuralpde_cli.ansatz.mlp import MLP, MLPConfig
    from neuralpde_cli.distributed import DataParallel, rank_seed
    from neuralpde_cli.equations.heat import HeatConfig, HeatEquation
    from neuralpde_cli.training.objectives import DensityObjective
    from neuralpde_cli.training.samplers import CollocationSampler, SamplerConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.manual_seed(rank)  # different initial weights: DDP must start every rank from rank 0's
    dtype, cpu = torch.float64, torch.device("cpu")
    equation = HeatEquation(HeatConfig(dim=2), dtype, cpu)
    model = MLP.for_equation(MLPConfig(width=16), equation)
    reference = copy.deepcopy(model)
    sampler = CollocationSampler(SamplerConfig(batch_size=48), equation, model,
                                 torch.Generator().manual_seed(rank_seed(7)))
    objective = DensityObjective(equation, model, sampler)
    objective.freeze()  # this rank's points, kept to rebuild the union on rank 0
    parallel = DataParallel(model)
    if rank == 0:
        reference.load_state_dict(model.state_dict())  # = rank 0's weights (DDP broadcasts them)

    def loss() -> tuple[torch.Tensor, dict]:
        terms = objective.loss_terms("adam")
        return sum(terms.values()), terms

    total, terms = parallel.loss(loss)
    total.backward()
    mean_total, _ = parallel.mean(total, terms)
    points = [None, None]
    dist.all_gather_object(points, [p.detach() for p in objective.frozen])
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if rank == 0:
        union = DensityObjective(equation, reference, sampler)
        union.frozen = tuple(torch.cat([a, b]) for a, b in zip(*points))
        whole = sum(union.loss_terms("adam").values())
        whole.backward()
        torch.save({"ddp": grads, "single": [p.grad for p in reference.parameters()],
                    "ddp_loss": mean_total, "single_loss": whole.detach(),
                    "same_points": all(torch.equal(a, b) for a, b in zip(*points))}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradient_is_the_gradient_on_the_union_of_the_ranks_points(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_gradient_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert not result["same_points"]  # each rank drew its own collocation points
    assert torch.allclose(result["ddp_loss"], result["single_loss"], rtol=1e-12, atol=0)
    for ddp, single in zip(result["ddp"], result["single"]):
        assert torch.allclose(ddp, single, rtol=1e-9, atol=1e-14), (ddp - single).abs().max()


def _digest(state: dict) -> str:
    sha = hashlib.sha256()
    for tensor in state.values():
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


TINY_DDP = ["experiment=smoke", "trainer.progress=false", "optimizer.adam_steps=40",
            "optimizer.lbfgs_steps=2", "device=cpu"]


def test_torchrun_solve_one_run_directory_same_parameters(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir = tmp_path / "run"
    result, _ = run([*TORCHRUN, "solve", *TINY_DDP, f"hydra.run.dir={run_dir}"], tmp_path,
                    env={**ENV, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]
    assert not list(scratch.glob("neuralpde-rank*"))  # rank 1 wrote only a scratch folder, gone
    finals = [l for l in result.stdout.splitlines() if l.startswith("done: ")]
    assert finals == [finals[0]] and str(run_dir) in finals[0]  # rank 0 alone speaks for the run
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    digests = summary["rank_parameter_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["ranks_agree"]
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert _digest(last["model"]) == digests[0]  # rank 0's file holds the agreed parameters
    assert len(last["objective_ranks"]) == 2  # each rank's sampler state, for resume
    # the heat kernel, learnt on 2 ranks, against the exact solution (the MLP with its Gaussian
    # envelope ends at 5.5e-4 here; 0.087 without it), on exact-law points and on the grid
    assert summary["metrics"]["rel_l2_error"] < 5e-3, summary["metrics"]
    assert summary["metrics"]["max_rel_peak_error"] < 5e-3, summary["metrics"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == summary["steps"] + 1


def test_torchrun_ranks_with_different_directories_refuse(tmp_path: Path) -> None:
    result, _ = run([*TORCHRUN, "solve", *TINY_DDP, "hydra.run.dir=out/${oc.env:RANK}"], tmp_path)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("neuralpde: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "torchrun ranks would write to different run directories" in errors[0]
    assert "rank 0" in errors[0] and "rank 1" in errors[0]
    assert not (tmp_path / "out").exists()


def test_torchrun_refuses_a_solver_that_is_not_data_parallel(tmp_path: Path) -> None:
    """Checked before any rank joins a group: WORLD_SIZE (set by torchrun) is enough."""
    result, _ = run([*CLI, "solve", "experiment=smoke", "equation=diffusion"], tmp_path,
                    env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.returncode != 0
    assert "optimizer=multigrid is not data-parallel" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_torchrun_interrupted_run_resumes(tmp_path: Path) -> None:
    """SIGTERM to torchrun mid-training: both ranks stop at the same step with a checkpoint;
    `torchrun ... solve resume=DIR` finishes the run on 2 ranks."""
    import signal
    import time

    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "solve", *TINY_DDP, "optimizer.adam_steps=3000",
           "trainer.checkpoint_every=50", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.pt").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted", summary
    stopped = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 0 < stopped < 3000 + 20
    result, _ = run([*TORCHRUN, "solve", f"resume={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["ranks_agree"]
    assert summary["steps"] == 20 + 3000 + 2
