"""The runner: the one place that wires a classification job, for every front end.

:class:`JobRunner` takes a :class:`~napari_class2d.run.spec.JobSpec`, checks the
device and the output folder, opens the particle source
(:func:`~napari_class2d.run.source.open_source`), builds the
:class:`~napari_class2d.engine.job.Class2DJob` and yields one
:class:`RunUpdate` (the engine's snapshot and the status line) per iteration.
It owns stopping, finishing, finishing after an idle stream, the fall-back to
no CTF correction for particles without CTF, warnings about the data, the
checkpoint (kept by the job after every iteration) and error reporting: every
problem a user can fix ends the run with a :class:`RunError` of one line.

The runner never touches Qt or napari: the command line prints its updates,
the widgets draw them from a worker thread.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.engine.distributed import DistributedError
from napari_class2d.engine.job import CHECKPOINT, Class2DJob
from napari_class2d.engine.snapshot import IterationSnapshot
from napari_class2d.io.errors import DiskFullError
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.source import ParticleSource, StaticSource
from napari_class2d.run.source import open_source
from napari_class2d.run.spec import JobSpec
from napari_class2d.run.status import format_status

log = logging.getLogger(__name__)

#: fewer particles per class than this on average: a warning (many classes stay empty)
MIN_PARTICLES_PER_CLASS = 10
#: images read at the start to catch constant (e.g. all-zero) data
SAMPLE_IMAGES = 32
#: the result files a finished job writes
RESULT_FILES = ("run_data.star", "run_classes.mrcs", "run_model.star")


class RunError(Exception):
    """A job that cannot start or go on, for a reason the user can fix (one line).

    Attributes
    ----------
    exit_code
        For the command line: 2 for bad input or options, 1 for a stream that
        brought nothing, 3 when another process of a distributed job was lost.
    kind
        ``"exists"`` when the output folder holds a result (resume or overwrite),
        else ``"error"``.
    """

    def __init__(self, message: str, *, exit_code: int = 2, kind: str = "error"):
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


@dataclass(frozen=True)
class RunUpdate:
    """What a running job reports: a snapshot (``None`` for the first and last
    update), the status line, and notes to show once (one line each)."""

    snapshot: IterationSnapshot | None
    status: str
    notes: tuple[str, ...] = ()
    final: bool = False


class JobRunner:
    """Runs one job from a :class:`JobSpec`; stop and finish may be asked from any thread.

    Attributes
    ----------
    outcome
        ``"not started"``, ``"running"``, ``"done"``, ``"stopped"``, ``"failed"``
        or ``"aborted"``.
    job
        The job once it is built (``None`` before).
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.job: Class2DJob | None = None
        self.source: ParticleSource | None = None
        self.outcome = "not started"
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._notes: list[str] = []
        self._lock = threading.Lock()

    # -- control (thread-safe) ----------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current iteration; the checkpoint keeps everything computed."""
        self._stop.set()
        if self.job is not None:
            self.job.request_stop()

    def request_finish(self) -> None:
        """Streaming: finish the schedule on the particles seen and write the results."""
        first = not self._finish.is_set()
        self._finish.set()
        job = self.job
        if job is not None:
            if first and job.streaming:
                self._warn_classes(job.n_particles, job.config)
            job.request_finish()

    # -- running ---------------------------------------------------------------------------
    def run(self) -> Iterator[RunUpdate]:
        """Run the job: a start update, one per iteration (and while a stream waits), a
        final one (``final=True``) with :meth:`final_status`.

        Raises
        ------
        RunError
            Bad options or input, an output folder that cannot be written, a full
            disk, a checkpoint that cannot be resumed: one line, no traceback.
        """
        self.outcome = "running"
        try:
            yield from self._run()
        except RunError:
            self.outcome = "failed"
            raise
        except DistributedError as err:
            self.outcome = "failed"
            raise RunError(one_line(err), exit_code=3) from None
        except (ValueError, OSError) as err:
            self.outcome = "failed"
            log.debug("run failed", exc_info=True)
            kind = "exists" if isinstance(err, FileExistsError) else "error"
            raise RunError(one_line(err), kind=kind) from None
        except KeyboardInterrupt:
            self.outcome = "aborted"
            raise
        except BaseException:
            if self.outcome == "running":
                self.outcome = "failed"
            raise
        finally:
            if self.source is not None:
                self.source.close()

    def _run(self) -> Iterator[RunUpdate]:
        spec = self.spec.validate()
        config = spec.config
        check_device(config.device)
        out = prepare_output(spec.out_path, spec.resume)
        self.source = source = open_source(spec)
        if isinstance(source, StaticSource):
            config = self._first_particles(source.particles, config)
        job = Class2DJob(
            source,
            config,
            out_dir=out,
            resume=spec.resume,
            overwrite=spec.overwrite,
            poll_seconds=spec.stream.poll_seconds,
            on_first_particles=self._first_particles if spec.streaming else None,
        )
        self.job = job
        if self._stop.is_set():
            job.request_stop()
        if self._finish.is_set():
            job.request_finish()
        yield RunUpdate(None, self._start_line(), self._take_notes())

        idle = spec.stream.finish_after_idle_seconds if spec.streaming else None
        last_seen, last_arrival = job.n_particles, time.monotonic()
        reported: set[str] = set()
        for snap in job.run():
            now = time.monotonic()
            if snap.n_particles_seen != last_seen:
                last_seen, last_arrival = snap.n_particles_seen, now
            self._report_broken(source, reported)
            if idle is not None and not self._finish.is_set() and now - last_arrival >= idle:
                if snap.n_particles_seen == 0:
                    raise RunError(
                        f"no particles arrived in {idle:g} s; nothing to classify", exit_code=1
                    )
                self._note(
                    f"no new particles for {idle:g} s: finishing ({snap.n_particles_seen} "
                    "particles)"
                )
                self.request_finish()
            yield RunUpdate(snap, format_status(snap), self._take_notes())
        self.outcome = "done" if job.done else "stopped"
        broken = getattr(source, "broken_files", {})
        if job.done and broken:
            self._note(f"{len(broken)} file(s) were never complete and were not used:")
            for path, reason in sorted(broken.items()):
                self._note(f"  {path}: {reason}")
        yield RunUpdate(None, self.final_status(), self._take_notes(), final=True)

    def final_status(self) -> str:
        """The last status line: where the results are, or how to resume."""
        job, out = self.job, self.spec.out_path
        if self.outcome == "done" and job is not None:
            return (
                f"Done: {job.n_particles} particles in {job.config.n_classes} classes; "
                f"results in {out} ({', '.join(RESULT_FILES)})"
            )
        if job is not None and (out / CHECKPOINT).is_file():
            return (
                f"Stopped after iteration {job.iteration}; resume continues from "
                f"{out / CHECKPOINT}"
            )
        return "Stopped before anything was computed"

    # -- notes -------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        with self._lock:
            self._notes.append(text)

    def _take_notes(self) -> tuple[str, ...]:
        with self._lock:
            notes, self._notes = tuple(self._notes), []
        return notes

    def _start_line(self) -> str:
        spec, job = self.spec, self.job
        out = spec.out_path
        if spec.streaming:
            what = "STAR file" if getattr(self.source, "single_file", False) else "folder"
            line = f"watching {what} {spec.input} -> {out}"
            if spec.resume:
                line += f" (resumed: {getattr(self.source, 'n_taken', 0)} particles already taken)"
            return line
        n = self.source.particles.n_particles
        line = (
            f"classifying {n} particles from {spec.describe_input()} into "
            f"{job.config.n_classes} classes -> {out}"
        )
        if spec.resume:
            line += f" (resumed after iteration {job.iteration})"
        return line

    def _first_particles(self, particles: ParticleSet, config: Class2DConfig) -> Class2DConfig:
        """What the first particles decide: no CTF correction without CTF, the
        maximum resolution's default, warnings about the data."""
        where = particles.source_path or "the particles"
        if not particles.has_ctf and config.ctf_correction != "off":
            self._note(
                f"{where}: no CTF parameters (no defocus columns); classifying without CTF "
                "correction"
            )
            config = config.replace(ctf_correction="off")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params = config.resolve(particles.box, float(np.median(particles.pixel_size_A)))
        for note in params.notes:
            self._note(note)
        for w in caught:
            self._note(f"warning: {w.message}")
        self._check_images(particles)
        if not self.spec.streaming:
            self._warn_classes(particles.n_particles, config)
        return config

    def _check_images(self, particles: ParticleSet) -> None:
        n = particles.n_particles
        if n == 0:
            return
        sample = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_IMAGES)).astype(np.int64))
        images = particles.read_images(sample)
        flat = images.reshape(len(images), -1)
        if np.all(flat.max(axis=1) == flat.min(axis=1)):
            value = float(flat[0, 0])
            self._note(
                f"warning: all {len(sample)} images sampled from "
                f"{particles.source_path or 'the particles'} are constant ({value:g} everywhere): "
                "the stacks may be empty; the classes will be flat"
            )

    def _warn_classes(self, n: int, config: Class2DConfig) -> None:
        k = config.n_classes
        if n < MIN_PARTICLES_PER_CLASS * k:
            self._note(
                f"warning: {n} particles for {k} classes (fewer than {MIN_PARTICLES_PER_CLASS} "
                "per class): many classes will stay empty or noisy; use fewer classes"
            )

    def _report_broken(self, source: ParticleSource, reported: set[str]) -> None:
        broken = getattr(source, "broken_files", {})
        for path in sorted(set(broken) - reported):
            self._note(f"incomplete file: {path}: {broken[path]}")
            reported.add(path)


def check_device(name: str) -> None:
    """Refuse a device this machine does not have.

    Raises
    ------
    ConfigError
        ``cuda:N`` without CUDA or without an N-th device, or an unknown name.
    """
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: {err}") from None
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index or 0
    if index >= count:
        have = (
            "this machine has no CUDA device"
            if count == 0
            else f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
        raise ConfigError(f"device={name!r}: {have}; use 'auto' or 'cpu'")


def prepare_output(out: Path, resume: bool) -> Path:
    """Create the output folder and make sure files can be written into it.

    Raises
    ------
    RunError
        The path is a file, the folder cannot be created or is not writable, or
        ``resume`` without a checkpoint there.
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: the output folder is a file")
    if resume and not (out / CHECKPOINT).is_file():
        raise RunError(f"{out}: no {CHECKPOINT} to resume from")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"{out}: cannot create the output folder ({err.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunError(f"{out}: cannot write into the output folder ({err.strerror})") from None
    return out


def one_line(err: BaseException) -> str:
    """An error as one line of text (an OS error as ``FILE: what happened``)."""
    if isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.strerror:
        text, filename = err.strerror, err.filename
        if filename is not None and str(filename) not in text:
            text = f"{filename}: {text}"
    else:
        text = str(err)
    return " ".join(text.split())
