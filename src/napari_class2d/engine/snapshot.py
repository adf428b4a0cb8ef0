"""The immutable per-iteration snapshot a job yields to its caller (CLI, widgets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Phase = Literal["waiting", "warm-up", "online", "full", "incremental", "done"]


@dataclass(frozen=True)
class IterationSnapshot:
    """What one iteration produced. All arrays are float32/int64 numpy copies.

    Attributes
    ----------
    iteration
        1-based count of iterations done so far in this job.
    n_iterations_planned
        Iterations the job plans in total (batch); streaming: so far known.
    phase
        ``"online"``, ``"full"``, ``"incremental"``, streaming ``"waiting"``
        (no iteration ran: waiting for particles) or ``"done"``.
    class_averages
        ``(K, D', D')`` real-space class averages at the working pixel size.
    pixel_size_A
        Pixel size of ``class_averages`` in Å.
    class_counts_hard
        Particles whose most likely class is k, over the particles this
        iteration saw (online) or all particles (full).
    class_counts_soft
        Sum of posteriors per class over the same particles.
    class_resolution_A
        Per-class resolution in Å (FRC 0.5 of two half-set averages; inf when unknown).
    class_eca
        Effective number of classes assigned (mean class ESS of the class's particles).
    class_distribution
        Class prior, sums to 1.
    noise_spectrum
        Noise variance per Fourier ring at the working box.
    annealing_factor
        Noise inflation factor used in this iteration (1 = no annealing).
    n_particles_seen
        Particles available to the job (streaming: imported so far).
    n_particles_used
        Particles this iteration's E-step visited.
    n_particles_needed
        Streaming: particles needed before warm-up ends (0 when reached).
    next_full_at
        Streaming: particles seen at which the next full iteration runs (0: none).
    mask_inner_diameter_A, mask_outer_diameter_A
        The soft circular mask applied to the averages, Å.
    timings
        Seconds spent per stage in this iteration.
    message
        Free text for the log / status line.
    class_lineage_id
        ``(K,)`` int64: the lineage each class holds (it changes only when a class is
        refilled from another, e.g. re-seeded; see :mod:`napari_class2d.engine.lineage`).
    class_flags
        Per class a short lineage warning ("" when none), e.g. ``"emptied it 16 → 12"``.
    """

    iteration: int
    n_iterations_planned: int
    phase: Phase
    class_averages: np.ndarray
    pixel_size_A: float
    class_counts_hard: np.ndarray
    class_counts_soft: np.ndarray
    class_resolution_A: np.ndarray
    class_eca: np.ndarray
    class_distribution: np.ndarray
    noise_spectrum: np.ndarray
    annealing_factor: float
    n_particles_seen: int
    n_particles_used: int
    mask_inner_diameter_A: float
    mask_outer_diameter_A: float
    n_particles_needed: int = 0
    next_full_at: int = 0
    timings: dict = field(default_factory=dict)
    message: str = ""
    class_lineage_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_flags: tuple[str, ...] = ()

    @property
    def n_classes(self) -> int:
        return int(self.class_averages.shape[0])
