"""A job specification: everything a front end collects before a job starts.

The command line and the widgets build the same :class:`JobSpec`; their
flags and form fields are generated from these dataclasses and
:class:`~napari_class2d.engine.config.Class2DConfig` (see
:mod:`napari_class2d.run.fields`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.io.particles import ParticleSet


@dataclass(frozen=True)
class SourceOptions:
    """How particle files are read (batch and streaming jobs).

    Attributes
    ----------
    pixel_size_A
        Pixel size in Å for particle files that give none (the file's value wins
        when it has one; for a bare ``.mrcs`` stack it replaces the header's).
    project_dir
        RELION or cryoSPARC project folder that relative image paths start from
        (empty: the particle file's folder and the folders above it are tried).
    """

    pixel_size_A: float | None = None
    project_dir: str | None = None

    def validate(self) -> SourceOptions:
        """Return self, or raise :class:`ConfigError` naming the option."""
        v = self.pixel_size_A
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"pixel_size_A={v!r}: must be > 0 Å (or unset)")
        if self.project_dir is not None and not Path(self.project_dir).is_dir():
            raise ConfigError(f"project_dir={self.project_dir!r}: no such folder")
        return self


@dataclass(frozen=True)
class StreamOptions:
    """How a streaming job watches for particles.

    Attributes
    ----------
    poll_seconds
        Pause between looks at the folder while waiting for particles, in seconds.
    stable_seconds
        Take a file only once it has not changed for this long, in seconds
        (0: as soon as it is complete).
    broken_after_seconds
        Report a file that stays incomplete for this long, in seconds.
    finish_after_idle_seconds
        Finish the job (remaining online and final full iterations, outputs)
        once no new particles arrived for this long, in seconds (empty: run
        until stopped or finished).
    """

    poll_seconds: float = 2.0
    stable_seconds: float = 0.0
    broken_after_seconds: float = 60.0
    finish_after_idle_seconds: float | None = None

    def validate(self) -> StreamOptions:
        """Return self, or raise :class:`ConfigError` naming the option."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{f.name}={v!r}: must be a number of seconds >= 0")
        return self


@dataclass(frozen=True)
class JobSpec:
    """One classification job, batch or streaming, as a front end asked for it.

    Attributes
    ----------
    config
        The classifier's parameters.
    input
        Batch: a particle file (``.star``, ``.cs``, ``.mrcs``) or particles
        already read. Streaming: a folder to watch or a STAR file that grows.
    out_dir
        Output folder: ``run_data.star``, ``run_classes.mrcs``,
        ``run_model.star``, ``checkpoint.pt`` and the particle cache.
    streaming
        Watch ``input`` for particles that arrive while the job runs.
    source
        How particle files are read.
    stream
        How a streaming job watches (ignored for batch jobs).
    resume
        Continue the job in ``out_dir`` from its checkpoint.
    overwrite
        Start over in an ``out_dir`` that holds a result.
    """

    config: Class2DConfig
    input: str | Path | ParticleSet
    out_dir: str | Path
    streaming: bool = False
    source: SourceOptions = field(default_factory=SourceOptions)
    stream: StreamOptions = field(default_factory=StreamOptions)
    resume: bool = False
    overwrite: bool = False

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def describe_input(self) -> str:
        """The input in words (for status lines)."""
        if isinstance(self.input, ParticleSet):
            return str(self.input.source_path or "particles in memory")
        return str(self.input)

    def validate(self) -> JobSpec:
        """Check everything that can be checked without reading data; return self.

        Raises
        ------
        ConfigError
            An invalid parameter or option, naming it.
        """
        self.config.validate()
        self.source.validate()
        self.stream.validate()
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite: choose one (continue the job, or start over)")
        if self.streaming and isinstance(self.input, ParticleSet):
            raise ConfigError("a streaming job watches a folder or a STAR file, not particles")
        return self
