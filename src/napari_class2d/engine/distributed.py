"""One job over many processes: data parallelism with ``torch.distributed``.

Launched with ``torchrun`` (``python -m torch.distributed.run``), every process runs
the same job: the same schedule, the same random draws (every process holds the
same seeded generator and draws the same mini-batches over the whole data set),
the same references. What differs is which particles a process touches:

* particle ``i`` (its index in the job's pool) belongs to rank
  ``(i // SHARD_BLOCK) % world_size`` (:class:`Shard`); a process preprocesses,
  caches and searches only its own particles of every batch;
* the sufficient statistics of an iteration (class sums and CTF² sums per half
  set, noise sums, soft counts, ...) are summed over the processes
  (:meth:`Reducer.sum`) where the engine has them complete, so the M-step sees
  the same sums as one process would (up to the order of float additions);
* per-particle results (class, pose, probabilities) are shared
  (:meth:`Reducer.share_assignments`), so every process holds them all;
* rank 0 writes the outputs and the checkpoint; all ranks resume from it.

The engine calls a :class:`Reducer` at these seams; the single-process one
(:data:`LOCAL`) does nothing, so a job without ``torchrun`` runs as before.
Backends: gloo for CPU jobs, ``cpu:gloo,cuda:nccl`` for GPU jobs (tensors on the
GPU go through NCCL, host arrays through gloo). ``docs/distributed.md`` shows the
commands.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: consecutive particles that go to the same rank (contiguous reads from the stacks)
SHARD_BLOCK = 32
#: environment variable: seconds a collective waits for the other processes
TIMEOUT_ENV = "NAPARI_CLASS2D_TIMEOUT_S"
#: default of :data:`TIMEOUT_ENV`; longer than rank 0's longest write (outputs of
#: millions of particles) and than the spread of the ranks' preprocessing times
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A process of a distributed job stopped, or a collective timed out."""


@dataclass(frozen=True)
class Shard:
    """Which particles a process holds: particle ``i`` belongs to rank
    ``(i // SHARD_BLOCK) % world_size``, whatever the data, the batch or the schedule."""

    rank: int = 0
    world_size: int = 1

    def owns(self, indices: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which of the pool ``indices`` this rank holds."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.world_size == 1:
            return np.ones(len(indices), dtype=bool)
        return (indices // SHARD_BLOCK) % self.world_size == self.rank

    def mine(self, indices: np.ndarray) -> np.ndarray:
        """The ``indices`` this rank holds, in their order."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices if self.world_size == 1 else indices[self.owns(indices)]

    @property
    def folder(self) -> str | None:
        """Sub-folder of the particle cache for this rank (``None``: one process)."""
        if self.world_size == 1:
            return None
        return f"rank{self.rank:03d}-of-{self.world_size:03d}"


class Reducer:
    """The collectives the engine calls; this one is a single process (all no-ops).

    Attributes
    ----------
    shard
        The particles this process holds.
    local_rank, local_world_size
        This process's index among the processes of its node, and their number.
    """

    def __init__(self, shard: Shard | None = None, local_rank: int = 0, local_world_size: int = 1):
        self.shard = shard if shard is not None else Shard()
        self.local_rank = local_rank
        self.local_world_size = local_world_size

    # -- who am I ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world_size(self) -> int:
        return self.shard.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and checkpoints."""
        return self.shard.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def owns(self, indices: np.ndarray) -> np.ndarray:
        return self.shard.owns(indices)

    def mine(self, indices: np.ndarray) -> np.ndarray:
        return self.shard.mine(indices)

    # -- collectives (single process: identities) --------------------------------------
    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sum each tensor over all processes, in place; returns them."""
        return tensors

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on any process."""
        return tuple(bool(f) for f in flags)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (picklable) on every process."""
        return obj

    def share_assignments(self, assignments, indices: np.ndarray) -> None:
        """Per-particle results of ``indices``: every process fills in the rows of the
        particles it holds, and afterwards every process holds all rows.

        ``assignments`` is a :class:`~napari_class2d.engine.model.ParticleAssignments`.
        """

    def barrier(self) -> None:
        """Wait for every process."""


#: the single-process reducer
LOCAL = Reducer()


class TorchReducer(Reducer):
    """The collectives of a ``torch.distributed`` process group (already initialised)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        super().__init__(
            Shard(dist.get_rank(), dist.get_world_size()),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # torch.distributed's errors are RuntimeErrors
            raise DistributedError(
                f"another process of the job stopped or cannot be reached while {what} "
                f"({_short(err)}); the job stops, and resume continues from the last checkpoint"
            ) from None

    def sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # one collective per dtype and device: the tensors packed into one flat buffer
        groups: dict[tuple, list[int]] = {}
        flat = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
        for i, t in enumerate(flat):
            groups.setdefault((t.dtype, t.device), []).append(i)
        for members in groups.values():
            buffer = torch.cat([flat[i].reshape(-1) for i in members])
            self._collective("summing the statistics", self._dist.all_reduce, buffer)
            start = 0
            for i in members:
                size = flat[i].numel()
                flat[i].copy_(buffer[start : start + size].view_as(flat[i]))
                start += size
        return tensors

    def any(self, *flags: bool) -> tuple[bool, ...]:
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64)
        self._collective(
            "agreeing on stop/finish", self._dist.all_reduce, t, op=self._dist.ReduceOp.MAX
        )
        return tuple(bool(v) for v in t.tolist())

    def broadcast_object(self, obj):
        box = [obj if self.is_main else None]
        self._collective("sharing new particles", self._dist.broadcast_object_list, box, src=0)
        return box[0]

    def share_assignments(self, assignments, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        columns = _assignment_columns(assignments)
        own = self.owns(indices)
        # a particle's row is non-zero on its own rank only, so the sum is exact
        buffer = np.zeros((len(indices), sum(c for _, c in columns)), dtype=np.float64)
        start = 0
        for name, width in columns:
            values = getattr(assignments, name)[indices[own]]
            buffer[own, start : start + width] = values.reshape(len(values), width)
            start += width
        t = torch.from_numpy(buffer)
        self._collective("sharing the particles' classes and poses", self._dist.all_reduce, t)
        start = 0
        for name, width in columns:
            target = getattr(assignments, name)
            values = buffer[:, start : start + width]
            target[indices] = values.reshape((len(indices),) + target.shape[1:]).astype(
                target.dtype
            )
            start += width

    def barrier(self) -> None:
        self._collective("waiting for the other processes", self._dist.barrier)


def _short(err: BaseException) -> str:
    """The gist of a backend's error: ``[.../pair.cc:537] Read error ...: Connection reset
    by peer. This is typically ...`` -> ``Read error ...: Connection reset by peer``."""
    text = " ".join(str(err).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]


def _assignment_columns(assignments) -> list[tuple[str, int]]:
    """``(field, values per particle)`` of a ParticleAssignments, in field order."""
    out = []
    for name in assignments.__dataclass_fields__:
        value = getattr(assignments, name)
        out.append((name, int(np.prod(value.shape[1:], dtype=np.int64))))
    return out


# -- the process group ------------------------------------------------------------------
def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(name: str) -> str:
    """The device of this process for the job's ``device``: under ``torchrun``,
    ``"auto"`` (with CUDA) and ``"cuda"`` become ``cuda:LOCAL_RANK``, so the processes
    of a node share its GPUs one each; ``"cuda:N"`` and ``"cpu"`` are kept."""
    if not launched():
        return name
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        count = max(torch.cuda.device_count(), 1)
        return f"cuda:{local % count}"
    return name


def timeout_seconds() -> float:
    """Seconds a collective waits (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S`)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def from_environment(device: str = "auto") -> Reducer:
    """The reducer of this process: :data:`LOCAL` unless started by ``torchrun`` with
    more than one process, in which case the process group ``torchrun`` describes is
    joined (once; gloo, or ``cpu:gloo,cuda:nccl`` when ``device`` is a GPU).

    Raises
    ------
    DistributedError
        The other processes could not be reached within the timeout.
    """
    import torch.distributed as dist

    if not (launched() and dist.is_available()):
        return LOCAL
    if not dist.is_initialized():
        name = rank_device(device)
        backend = "gloo"
        if name.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(name))
            backend = "cpu:gloo,cuda:nccl"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"cannot join the other processes of the job ({_short(err)})"
            ) from None
    return TorchReducer()


def current() -> Reducer:
    """The reducer of the process group joined so far (:data:`LOCAL` when none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchReducer()
    return LOCAL


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_words(command: Sequence[str]) -> list[str]:
    """The words that start ``command`` (``["classify", ...]``) the way this process was
    started: ``napari-class2d ...`` or ``torchrun --nproc-per-node N -m napari_class2d ...``."""
    if not launched():
        return ["napari-class2d", *command]
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    words = ["torchrun"]
    if world > local:  # several nodes: their rendezvous options as before ("...")
        words += ["--nnodes", str(world // max(local, 1)), "..."]
    else:
        words += ["--standalone"]
    return [*words, "--nproc-per-node", str(local), "-m", "napari_class2d", *command]
