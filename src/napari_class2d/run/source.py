"""Open the particle source a job specification names: a fixed set or a watched folder."""

from __future__ import annotations

from pathlib import Path

from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.source import ParticleSource, StaticSource
from napari_class2d.run.spec import JobSpec
from napari_class2d.stream.watcher import FolderWatcher


def open_source(spec: JobSpec) -> ParticleSource:
    """The particles of ``spec``: a :class:`~napari_class2d.io.source.StaticSource` over
    the particle file (read now, images lazily) or the particles given, or a
    :class:`~napari_class2d.stream.watcher.FolderWatcher` over the folder or growing
    STAR file to watch (the output folder is never taken from).

    Raises
    ------
    ParticleFileError
        The particle file cannot be used (names the file, row and column).
    FileNotFoundError
        The particle file, or the folder to watch, does not exist.
    """
    options = spec.source
    if spec.streaming:
        return FolderWatcher(
            spec.input,
            pixel_size_A=options.pixel_size_A,
            project_dir=options.project_dir,
            stable_seconds=spec.stream.stable_seconds,
            broken_after_seconds=spec.stream.broken_after_seconds,
            exclude=[spec.out_path],
        )
    if isinstance(spec.input, ParticleSet):
        return StaticSource(spec.input)
    path = Path(spec.input)
    if not path.exists():
        raise FileNotFoundError(2, "particle file not found", str(path))
    return StaticSource(
        read_particles(path, pixel_size_A=options.pixel_size_A, project_dir=options.project_dir)
    )
