"""The one status line of a running job, shared by the commands and the widgets."""

from __future__ import annotations

import numpy as np

from napari_class2d.engine.snapshot import IterationSnapshot

#: between the parts of a status line
SEPARATOR = " · "


def format_status(snap: IterationSnapshot) -> str:
    """One line for a snapshot: phase, iteration, particles seen / used / needed, classes.

    For example ``online · it 7/25 · seen 3400 · used 1000 · classes 50/50 populated ·
    best 9.8 Å · anneal 1.67``; a waiting stream adds how many particles are still
    needed, when the next full iteration runs and why it waits.
    """
    parts = [snap.phase, f"it {snap.iteration}/{snap.n_iterations_planned}"]
    parts.append(f"seen {snap.n_particles_seen}")
    if snap.phase != "waiting":
        parts.append(f"used {snap.n_particles_used}")
    if snap.n_particles_needed:
        parts.append(f"need {snap.n_particles_needed} more to start")
    if snap.iteration:
        populated = int((snap.class_counts_hard > 0).sum())
        parts.append(f"classes {populated}/{snap.n_classes} populated")
        finite = snap.class_resolution_A[np.isfinite(snap.class_resolution_A)]
        if finite.size:
            parts.append(f"best {float(finite.min()):.1f} Å")
        parts.append(f"anneal {snap.annealing_factor:.2f}")
    if snap.next_full_at:
        parts.append(f"next full iteration at {snap.next_full_at} seen")
    line = SEPARATOR.join(parts)
    if snap.message:
        line += f" - {snap.message}"
    return line
