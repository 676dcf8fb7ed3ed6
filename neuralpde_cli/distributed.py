"""Data-parallel training on N processes with torch.distributed (``torchrun``).

``torchrun --standalone --nproc_per_node=N --no-python neuralpde solve ...`` starts N copies of
the same command; each learns its rank from torchrun's environment and joins one process group
(gloo on CPU, nccl on CUDA). Every rank draws its own collocation points (``seed + rank``);
the trainer's loss runs through DistributedDataParallel, so ``backward()`` averages the
parameter gradients, and the scalars that steer training (the loss L-BFGS's line search reads,
NaN checks, plateaus, a signal) are averaged or agreed on, so every rank takes the same steps
and ends with the same parameters.

Only rank 0 writes the run directory (and takes its lock); the other ranks run the very same
code in a private scratch folder that is removed when they exit, so no line of a run's body
has to ask which rank it is on. On one process everything here does nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from neuralpde_cli.errors import UserError

#: how long a rank waits for the others at start-up and in each collective
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run directory; every other rank writes only its scratch folder."""
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or another launcher setting WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def init(device_name: str) -> World:
    """Join torchrun's process group once (gloo on CPU, nccl on CUDA, one GPU per local rank).

    Ranks other than 0 send their standard output (the log's console copy, the final line)
    to /dev/null: the run's log is rank 0's. Errors still reach standard error."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    from neuralpde_cli.device import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(device_name).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the torchrun process group (rank "
                        f"{os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}, "
                        f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')}): {str(exc).splitlines()[0]}") from None
    atexit.register(_leave)
    here = world()
    if not here.writer:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return here


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_single(what: str) -> None:
    """A UserError when launched on several ranks: ``what`` runs on one process only."""
    if launched():
        raise UserError(f"{what} runs on one process; under torchrun (WORLD_SIZE="
                        f"{os.environ.get('WORLD_SIZE')}) only `neuralpde solve` with a "
                        "gradient optimizer trains data-parallel")


@dataclass(frozen=True)
class Place:
    """Where this rank writes: rank 0 the run directory (its lock held), others a scratch folder."""

    folder: Path
    lock: Any = None

    @property
    def scratch(self) -> bool:
        return self.lock is None


def one_writer(device_name: str, folder: Path, explicit: bool, take: Callable[[], Any],
               resume: bool = False) -> Place:
    """Agree on one run directory: rank 0 takes it (``take()`` returns a lock with a
    ``folder``), the others get a private scratch folder. With an explicit directory, ranks
    that name different ones refuse to start; a default (time-stamped) one is rank 0's.
    On ``resume`` the scratch folder starts with the run's checkpoints (read, never written)."""
    here = init(device_name)
    if here.size == 1:
        lock = take()
        return Place(Path(lock.folder), lock)
    mine = (str(Path(folder).expanduser().resolve()), explicit, socket.gethostname())
    everyone: list[Any] = [None] * here.size
    dist.all_gather_object(everyone, mine)
    if any(e[1] for e in everyone) and len({e[0] for e in everyone}) > 1:
        named = "; ".join(f"rank {r} on {host}: {path}" for r, (path, _, host) in enumerate(everyone))
        if not here.writer:
            _let_rank0_say_why()
        raise UserError(f"torchrun ranks would write to different run directories ({named}); "
                        "give every rank the same hydra.run.dir (rank 0 alone writes it)")
    answer: list[Any] = [None]
    lock = None
    if here.writer:
        try:
            lock = take()
            answer[0] = ("ok", str(lock.folder))
        except UserError as exc:
            answer[0] = ("error", str(exc))
    dist.broadcast_object_list(answer, src=0)
    status, text = answer[0]
    if status == "error":
        if here.writer:
            raise UserError(text)
        _let_rank0_say_why()
    if here.writer:
        return Place(Path(text), lock)
    scratch = Path(tempfile.mkdtemp(prefix=f"neuralpde-rank{here.rank}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if resume:
        (scratch / "checkpoints").mkdir()
        for name in ("last.pt", "best.pt"):
            if (Path(text) / "checkpoints" / name).is_file():
                shutil.copy2(Path(text) / "checkpoints" / name, scratch / "checkpoints" / name)
    return Place(scratch)


def _let_rank0_say_why() -> None:
    """A start-up refusal every rank reaches: rank 0 prints the one line and exits; the others
    wait quietly (torchrun stops them once rank 0 has ended), then exit 2 without a word."""
    import time

    time.sleep(30)
    raise SystemExit(2)


def rank_seed(seed: int) -> int:
    """Each rank's sampling seed: its own points, the same ones on every rerun."""
    return seed + world().rank


def summary_fields() -> dict[str, Any]:
    """What summary.json records about the processes that ran it."""
    return {"world_size": world().size, "host": socket.gethostname(), "pid": os.getpid()}


def check_solver(solver: Any, gradient_type: type) -> None:
    """On several ranks only gradient training without Levenberg–Marquardt is data-parallel."""
    if not launched():
        return
    if not isinstance(solver, gradient_type):
        raise UserError(f"optimizer={solver.cfg.name} is not data-parallel; under torchrun use a "
                        "gradient optimizer (adam, lbfgs, adam_lbfgs) or run on one process")
    if getattr(solver.cfg, "lm_steps", 0) > 0:
        raise UserError(f"optimizer.lm_steps={solver.cfg.lm_steps}: Levenberg–Marquardt is not "
                        "data-parallel; under torchrun set optimizer.lm_steps=0")


class _Closure(torch.nn.Module):
    """The model as DDP sees it: forward runs the loss computation it is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], Any]) -> Any:
        return compute()


class DataParallel:
    """What the trainer does differently on N ranks; on one process each method is a no-op."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.world = world()
        self.ddp: torch.nn.Module | None = None
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            on_cuda = next(model.parameters()).is_cuda
            self.ddp = DistributedDataParallel(
                _Closure(model), device_ids=[torch.cuda.current_device()] if on_cuda else None,
                find_unused_parameters=False)

    def loss(self, compute: Callable[[], Any]) -> Any:
        """``compute()``, through DDP on N ranks (its backward averages the gradients)."""
        return compute() if self.ddp is None else self.ddp(compute)

    def mean(self, total: torch.Tensor, terms: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its terms averaged over the ranks (detached), the same on every rank."""
        if self.ddp is None:
            return total, terms
        values = torch.stack([total.detach(), *(v.detach() for v in terms.values())]).double()
        dist.all_reduce(values)
        values = (values / self.world.size).to(total.dtype)
        return values[0], dict(zip(terms, values[1:]))

    def agree(self, signum: int | None) -> int | None:
        """A signal any rank received stops every rank at the same step."""
        if self.ddp is None:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def gather(self, obj: Any) -> list[Any] | None:
        """``obj`` from every rank (rank order), e.g. each rank's sampler state for a checkpoint."""
        if self.ddp is None:
            return None
        everyone: list[Any] = [None] * self.world.size
        dist.all_gather_object(everyone, obj)
        return everyone

    def own(self, state: dict[str, Any], key: str) -> Any:
        """This rank's ``key`` of a checkpoint written by :meth:`gather` (``key + '_ranks'``);
        None for a rank the checkpoint did not have (it keeps its own seed)."""
        ranks = state.get(f"{key}_ranks")
        if self.world.rank == 0 and not ranks:
            return state[key]
        return ranks[self.world.rank] if ranks and self.world.rank < len(ranks) else None


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def parameter_digests(model: torch.nn.Module) -> dict[str, Any]:
    """Each rank's SHA-256 of its parameters' bytes (summary.json, several ranks only): equal
    digests show the ranks ended with the same model."""
    here = world()
    if here.size == 1:
        return {}
    sha = hashlib.sha256()
    for tensor in model.state_dict().values():
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    everyone: list[Any] = [None] * here.size
    dist.all_gather_object(everyone, sha.hexdigest())
    return {"rank_parameter_sha256": everyone, "ranks_agree": len(set(everyone)) == 1}
