"""What a stream has taken: which rows of which file, and which images of which stack.

The ledger keeps every image taken (per stack file, one bit per image), so an
image listed again by another STAR file (RELION's job-level ``particles.star``
beside its per-micrograph files) is not taken twice, and it turns the file
records and taken images into a JSON-able state and back, so a resumed stream
takes only what arrived since.
"""

from __future__ import annotations

import logging

import numpy as np

from napari_class2d.io.particles import ParticleSet
from napari_class2d.stream.records import FileRecord

logger = logging.getLogger(__name__)

#: state format tag and version, checked by restore
STATE_FORMAT = "napari-class2d.FolderWatcher"
STATE_VERSION = 1


class Ledger:
    """The images a stream has taken, per stack file.

    Attributes
    ----------
    n_duplicates_skipped
        Particles not taken again because their image was taken before.
    """

    def __init__(self):
        self.taken_images: dict[str, np.ndarray] = {}  # stack path -> bool per image
        self.n_duplicates_skipped = 0

    def take(self, where: str, part: ParticleSet) -> ParticleSet | None:
        """``part`` without images taken before (from any file) or repeated in it; the rest
        is marked taken. ``None`` when nothing is left. ``where`` names the file in the log."""
        src = part.images
        keep = np.ones(part.n_particles, dtype=bool)
        for s, entry in enumerate(src.stacks):
            rows = np.flatnonzero(src.stack_index == s)
            idx = src.image_index[rows]
            key = str(entry)
            taken = self.taken_images.get(key)
            need = int(idx.max()) + 1
            if taken is None or len(taken) < need:
                grown = np.zeros(max(need, 0 if taken is None else len(taken)), dtype=bool)
                if taken is not None:
                    grown[: len(taken)] = taken
                taken = self.taken_images[key] = grown
            _, first = np.unique(idx, return_index=True)
            fresh = np.zeros(len(idx), dtype=bool)
            fresh[first] = True
            fresh &= ~taken[idx]
            keep[rows] = fresh
            taken[idx] = True
        n_dup = int((~keep).sum())
        if n_dup:
            self.n_duplicates_skipped += n_dup
            logger.info(
                "%s: %d particle(s) skipped: their images were already taken", where, n_dup
            )
            if not keep.any():
                return None
            part = part.subset(np.flatnonzero(keep))
        return part

    # -- persistence ----------------------------------------------------------------------
    def images_state(self) -> dict[str, list[list[int]]]:
        """The taken images as ``{stack: [[start, stop), ...]]}`` (compact JSON)."""
        return {
            stack: _runs(np.flatnonzero(taken))
            for stack, taken in sorted(self.taken_images.items())
        }

    def restore_images(self, state: dict[str, list[list[int]]]) -> None:
        self.taken_images = {stack: _from_runs(runs) for stack, runs in state.items()}


def record_state(rec: FileRecord) -> dict:
    """How far one file was consumed (JSON-able)."""
    return {
        "size": rec.taken_size,
        "mtime_ns": rec.taken_mtime_ns,
        "rows_taken": rec.rows_consumed,
        "particles_taken": rec.particles_taken,
        "incremental": rec.incremental,
        "header_len": rec.header_len,
        "header_sha1": rec.header_sha1,
        "offset": rec.offset,
        "skip_rows": rec.skip_rows,
    }


def record_from_state(name: str, path: str, s: dict) -> FileRecord:
    """The record of a file consumed as :func:`record_state` says."""
    rec = FileRecord(path=path, name=name)
    rec.taken_size = rec.size = int(s["size"])
    rec.taken_mtime_ns = rec.mtime_ns = int(s["mtime_ns"])
    rec.rows_consumed = int(s["rows_taken"])
    rec.particles_taken = int(s.get("particles_taken", s["rows_taken"]))
    rec.incremental = bool(s["incremental"])
    rec.header_len = int(s["header_len"])
    rec.header_sha1 = str(s["header_sha1"])
    rec.offset = int(s["offset"])
    rec.skip_rows = int(s["skip_rows"])
    rec.status = "taken"
    return rec


def check_state(state: dict) -> None:
    """Raise ``ValueError`` unless ``state`` is a watcher state of this version."""
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"not a FolderWatcher state (format {state.get('format')!r}, version "
            f"{state.get('version')!r}); expected {STATE_FORMAT!r} version {STATE_VERSION}"
        )


def _runs(indices: np.ndarray) -> list[list[int]]:
    """Sorted indices as ``[[start, stop), ...]`` runs (compact JSON)."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = indices[np.r_[0, breaks]]
    stops = indices[np.r_[breaks - 1, len(indices) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def _from_runs(runs: list[list[int]]) -> np.ndarray:
    n = max((b for _, b in runs), default=0)
    out = np.zeros(n, dtype=bool)
    for a, b in runs:
        out[a:b] = True
    return out
