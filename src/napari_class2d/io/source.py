"""Where a job's particles come from: a fixed set, or a stream that grows.

:class:`~napari_class2d.engine.job.Class2DJob` takes any object with the
:class:`ParticleSource` methods. :class:`StaticSource` holds one particle set
(a batch job); :class:`~napari_class2d.stream.watcher.FolderWatcher` delivers
the complete particles that appear in a folder or a growing STAR file.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import numpy as np

from napari_class2d.io.particles import ParticleSet

#: state() format tag of a StaticSource
STATIC_FORMAT = "napari-class2d.StaticSource"


class SourceMismatchError(ValueError):
    """A job is resumed with other particles than the ones it was started with."""


@runtime_checkable
class ParticleSource(Protocol):
    """What a classification job needs from its particles.

    Attributes
    ----------
    streaming
        More particles may arrive later (the job waits for them and finishes
        only when asked); ``False`` for a set that is complete from the start.
    """

    streaming: bool

    def poll(self) -> ParticleSet | None:
        """The particles that arrived since the last call (``None``: none)."""

    def state(self) -> dict:
        """What was delivered so far, JSON-able (kept in the job's checkpoint)."""

    def restore(self, state: dict) -> None:
        """Continue after :meth:`state`: what was delivered then is not delivered again.

        Raises
        ------
        SourceMismatchError
            ``state`` was saved by a source of other particles.
        """

    def redelivered(self) -> list[ParticleSet] | None:
        """After :meth:`restore`: the particles delivered before, when the source holds
        them itself (a fixed set), else ``None`` (the job keeps its own copy)."""

    def close(self) -> None:
        """Release what the source holds open (files, folders)."""


def fingerprint(particles: ParticleSet) -> str:
    """A short hash of which images a set holds, in order (stack file names and indices).

    Stack folders are left out, so a project that moved keeps its fingerprint.
    """
    src = particles.images
    digest = hashlib.sha1()
    digest.update(f"{particles.n_particles} {particles.box}\n".encode())
    names = [
        "<memory>" if src.stack_path(s) is None else src.stack_path(s).name
        for s in range(len(src.stacks))
    ]
    codes = {name: i for i, name in enumerate(dict.fromkeys(names))}
    remap = np.array([codes[name] for name in names], dtype=np.int64)
    digest.update("\n".join(codes).encode())
    if len(src):
        digest.update(np.ascontiguousarray(remap[src.stack_index]).tobytes())
    digest.update(np.ascontiguousarray(src.image_index, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


class StaticSource:
    """A particle set that is complete from the start (a batch job).

    Parameters
    ----------
    particles
        All particles; :meth:`poll` delivers them once.
    """

    streaming = False

    def __init__(self, particles: ParticleSet):
        self.particles = particles
        self._delivered = False

    def poll(self) -> ParticleSet | None:
        if self._delivered:
            return None
        self._delivered = True
        return self.particles

    def state(self) -> dict:
        return {
            "format": STATIC_FORMAT,
            "n_particles": self.particles.n_particles,
            "fingerprint": fingerprint(self.particles),
            "path": str(self.particles.source_path) if self.particles.source_path else None,
        }

    def restore(self, state: dict) -> None:
        if state.get("format") != STATIC_FORMAT:
            raise SourceMismatchError(
                "the checkpoint was made by a streaming job; resume it as a streaming job"
            )
        mine = self.state()
        if state.get("fingerprint") != mine["fingerprint"]:
            then = state.get("path") or "particles in memory"
            now = mine["path"] or "particles in memory"
            raise SourceMismatchError(
                f"the checkpoint was made from {then} ({state.get('n_particles')} particles); "
                f"{now} ({mine['n_particles']} particles) holds other particles. Resume with "
                "the same particles, or start over (overwrite)"
            )
        self._delivered = True

    def redelivered(self) -> list[ParticleSet] | None:
        return [self.particles]

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticSource({self.particles!r})"


def as_source(particles_or_source) -> ParticleSource:
    """A :class:`ParticleSource` for a particle set (wrapped) or a source (as is)."""
    if isinstance(particles_or_source, ParticleSet):
        return StaticSource(particles_or_source)
    if isinstance(particles_or_source, ParticleSource):
        return particles_or_source
    raise TypeError(
        f"expected a ParticleSet or a particle source (poll/state/restore), "
        f"got {type(particles_or_source).__name__}"
    )
