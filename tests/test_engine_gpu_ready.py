"""The iteration loop is ready for a GPU: no host-device synchronisation per chunk.

On a GPU, reading a tensor as a Python number (``float(t)``, ``bool(t)``, ``.item()``,
``.cpu()``), ``torch.nonzero`` and indexing with a boolean mask make the host wait for
the device. Counted here on the CPU, at the operators behind them (a dispatch mode sees
every one), for one iteration cut into many small chunks and into a few large ones: the
difference is what a chunk costs. Two are left per E-step chunk, both selections whose
size depends on the data: the particles whose rotations are marginalised, and the
best-pose contributions with a positive weight, which the chunk adds to the M-step sums
while it holds the particles (so a pass over a million particles keeps no per-particle
contributions and reads the cache once). A sync costs microseconds against a chunk's
milliseconds of search; one per mask or per particle would not.
"""

from __future__ import annotations

import collections
import math
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.job import Class2DJob
from synthetic import make_particles

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
}


class SyncPoints(TorchDispatchMode):
    """Counts, per line of napari_class2d, the operators that would make a GPU sync."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mask = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if func in SYNCING or mask:
            frames = [f for f in traceback.extract_stack() if "napari_class2d" in f.filename]
            line = (
                f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
            )
            self.where[line] += 1
        return func(*args, **(kwargs or {}))


def one_iteration(particles, budget_GB: float) -> tuple[int, collections.Counter]:
    """E-step chunks and sync points of the third iteration (online, both half sets)."""
    config = Class2DConfig(
        n_classes=4,
        max_res_A=10.0,
        n_online_em_iterations=4,
        batch_size_per_class=40,
        n_final_full_iterations=1,
        particle_diameter_A=120.0,
        memory_budget_GB=budget_GB,
    )
    job = Class2DJob(particles, config)
    steps = job.run()
    next(steps)
    next(steps)
    chunk = job.model._chunk(job.pool, job.model.search_band()[0])
    batches = []
    iterate = job.model.iterate

    def recorded(pool, indices, *args, **kwargs):
        batches.append(indices)
        return iterate(pool, indices, *args, **kwargs)

    job.model.iterate = recorded
    with SyncPoints() as spy:
        next(steps)
    per_half = collections.Counter(job.pool.half[batches[0]].tolist())
    n_chunks = sum(math.ceil(n / chunk) for n in per_half.values())
    return n_chunks, spy.where


def test_a_chunk_makes_at_most_two_host_device_syncs():
    particles = make_particles(400, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=3)[0]
    many, small = one_iteration(particles, 0.002)
    few, large = one_iteration(particles, 0.5)
    assert many >= few + 20  # the budgets do cut the iteration differently
    extra = sum(small.values()) - sum(large.values())
    assert extra <= 2 * (many - few), (
        f"{extra} more sync points for {many - few} more chunks: "
        f"{sorted((small - large).items(), key=lambda kv: -kv[1])}"
    )
