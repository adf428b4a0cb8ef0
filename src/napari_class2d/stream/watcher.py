"""A streaming particle source: new, complete particle files in a folder or a growing STAR.

:class:`FolderWatcher` is what a streaming :class:`~napari_class2d.engine.job.Class2DJob`
polls between iterations (a :class:`~napari_class2d.io.source.ParticleSource`).
It watches either

* a folder (searched recursively) into which per-micrograph particle STAR files
  and their ``.mrcs`` stacks are written over time (RELION ``Extract/jobNNN/``,
  ``napari-class2d simulate --stream-into``, cryoSPARC exports), or
* one STAR file that grows (rows appended by a running pre-processing job).

A row is taken only once it is complete: its STAR line ends with a newline, the
STAR text parses, its image stack exists, the stack's size is at least what its
header promises (header + extended header + nx*ny*nz*bytes) and its image index
is below nz. Incomplete files are retried on later polls (never twice taken,
never raising into the caller); files that stay incomplete are reported in
:attr:`FolderWatcher.broken_files`. Polling is stat-based: a file already taken
is not opened again unless its size or modification time changed, and then only
the bytes appended since are parsed.

The work is split by job: :mod:`~napari_class2d.stream.discovery` finds the
files, :mod:`~napari_class2d.stream.growing` reads what was appended,
:mod:`~napari_class2d.stream.readiness` checks the stacks and
:mod:`~napari_class2d.stream.ledger` remembers what was taken; this module
decides what to take and keeps the failures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import ImageSource, ParticleSet
from napari_class2d.stream.discovery import DEFAULT_SUFFIXES, Discovery, is_temp_name
from napari_class2d.stream.growing import PARSE_CHUNK_FILES, GrowingReader
from napari_class2d.stream.ledger import (
    STATE_FORMAT,
    STATE_VERSION,
    Ledger,
    check_state,
    record_from_state,
    record_state,
)
from napari_class2d.stream.readiness import StackReadiness
from napari_class2d.stream.records import FileRecord, NotReady, Parsed

logger = logging.getLogger(__name__)

__all__ = ["STATE_FORMAT", "STATE_VERSION", "FolderWatcher", "is_temp_name"]


class FolderWatcher:
    """New complete particles from a folder of particle files or from one growing STAR file.

    Parameters
    ----------
    path
        A folder (searched recursively for ``*.star`` files; hidden folders are
        skipped) or one STAR file that grows. A STAR path need not exist yet.
    pixel_size_A
        Pixel size in Å for files that give none (RELION 3.0 without
        ``rlnImagePixelSize``).
    project_dir
        RELION/cryoSPARC project folder against which relative image paths are
        resolved (after the STAR file's own folder; see
        :func:`napari_class2d.io.paths.resolve_stack`).
    stable_seconds
        Only take a particle file or image stack whose modification time is at
        least this many seconds old (0: take as soon as it is complete). Use it
        for writers that rewrite files in place.
    broken_after_polls, broken_after_seconds
        A file still incomplete after more than this many polls *and* seconds
        is reported in :attr:`broken_files` (and the log). It keeps being
        retried: it is taken as soon as it becomes complete.
    suffixes
        Particle-file name endings taken from a folder (``".cs"`` may be added
        for cryoSPARC files; those are parsed whole, not incrementally).
    exclude
        Files or folders never taken (e.g. the job's own output folder when it
        lies inside the watched folder).
    max_seconds_per_poll
        Stop a poll after this many seconds of parsing and leave the remaining
        files for the next poll (``None``: take everything available).

    Attributes
    ----------
    broken_files
        ``{path: reason}`` of files incomplete for longer than the limits above.
    n_taken
        Particles returned so far (over all polls, restored ones included).

    Notes
    -----
    Rows are taken in a deterministic order: files sorted by their path
    relative to the watched folder (then modification time), rows in file order.
    An image already taken (same stack file and index, e.g. RELION's job-level
    ``particles.star`` next to its per-micrograph files) is not taken again.
    The watcher is thread-safe and writes no file (STAR text is parsed in memory).
    """

    #: more particles may arrive (a :class:`~napari_class2d.io.source.ParticleSource`)
    streaming = True

    def __init__(
        self,
        path: str | Path,
        pixel_size_A: float | None = None,
        project_dir: str | Path | None = None,
        stable_seconds: float = 0.0,
        *,
        broken_after_polls: int = 5,
        broken_after_seconds: float = 60.0,
        suffixes: Iterable[str] = DEFAULT_SUFFIXES,
        exclude: Iterable[str | Path] = (),
        max_seconds_per_poll: float | None = None,
    ):
        if stable_seconds < 0:
            raise ValueError(f"stable_seconds={stable_seconds}: must be >= 0")
        self.discovery = Discovery(path, suffixes, exclude)
        self.path = self.discovery.path
        self.single_file = self.discovery.single_file
        self.pixel_size_A = pixel_size_A
        self.project_dir = Path(project_dir) if project_dir is not None else None
        self.stable_seconds = float(stable_seconds)
        self.broken_after_polls = int(broken_after_polls)
        self.broken_after_seconds = float(broken_after_seconds)
        self.max_seconds_per_poll = max_seconds_per_poll
        self.reader = GrowingReader(pixel_size_A, self.project_dir)
        self.readiness = StackReadiness(self.project_dir, self.stable_seconds)
        self.ledger = Ledger()

        self.broken_files: dict[str, str] = {}
        self.n_taken = 0
        self.n_polls = 0
        self._records: dict[str, FileRecord] = {}
        self._box: int | None = None
        self._has_ctf: bool | None = None
        self._lock = threading.RLock()

    # -- public API -----------------------------------------------------------------
    @property
    def n_duplicates_skipped(self) -> int:
        """Particles not taken because their image was taken before."""
        return self.ledger.n_duplicates_skipped

    @property
    def pending_files(self) -> list[str]:
        """Particle files seen but not (completely) taken yet, broken ones excluded."""
        with self._lock:
            return [r.path for r in self._sorted_records() if r.status in ("new", "pending")]

    @property
    def taken_files(self) -> list[str]:
        """Particle files from which particles were taken."""
        with self._lock:
            return [r.path for r in self._sorted_records() if r.rows_consumed > 0]

    def poll(self) -> ParticleSet | None:
        """The complete particles that arrived since the last poll, or ``None``.

        Never raises for bad or incomplete files: they are retried on later
        polls, logged, and listed in :attr:`broken_files` once they stay
        incomplete. Returns one set (files concatenated in order).
        """
        with self._lock:
            self.n_polls += 1
            started = time.monotonic()
            parts: list[ParticleSet] = []
            try:
                entries = self.discovery.scan(self._records)
            except OSError as err:
                logger.warning("cannot list %s: %s; will retry", self.path, err)
                return None
            now = time.time()
            todo = [rec for rec in entries if self._wants(rec, now)]
            for start in range(0, len(todo), PARSE_CHUNK_FILES):
                if (
                    self.max_seconds_per_poll is not None
                    and time.monotonic() - started > self.max_seconds_per_poll
                ):
                    break
                chunk = todo[start : start + PARSE_CHUNK_FILES]
                results = self.reader.parse_many(chunk)
                for rec in chunk:
                    part = self._poll_file(rec, results[rec.name], now)
                    if part is not None and part.n_particles:
                        parts.append(part)
            if not parts:
                return None
            out = ParticleSet.concat(parts)
            self.n_taken += out.n_particles
            return out

    def state(self) -> dict:
        """What was taken so far, JSON-able, for :meth:`restore` after a restart."""
        with self._lock:
            files = {
                r.name: record_state(r)
                for r in self._sorted_records()
                if r.rows_consumed > 0 or r.header_len > 0
            }
            return {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "path": str(self.path),
                "n_taken": int(self.n_taken),
                "box": self._box,
                "has_ctf": self._has_ctf,
                "files": files,
                "taken_images": self.ledger.images_state(),
            }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: files and images taken then are not taken again.

        Raises
        ------
        ValueError
            ``state`` is not a watcher state of a known version.
        """
        check_state(state)
        with self._lock:
            if state.get("path") != str(self.path):
                logger.warning(
                    "restoring the state of %s into a watcher of %s; file names are relative",
                    state.get("path"),
                    self.path,
                )
            self._records.clear()
            self.broken_files.clear()
            for name, s in state["files"].items():
                self._records[name] = record_from_state(name, self.discovery.abspath(name), s)
            self.ledger.restore_images(state["taken_images"])
            self.n_taken = int(state["n_taken"])
            self._box = state.get("box")
            self._has_ctf = state.get("has_ctf")

    def redelivered(self) -> None:
        """The particles taken before a restore are not kept here (the job keeps them)."""
        return None

    def close(self) -> None:
        """Nothing to release: the watcher keeps no file open and writes none."""

    def __repr__(self) -> str:
        return (
            f"FolderWatcher({str(self.path)!r}, taken={self.n_taken} particles from "
            f"{len(self.taken_files)} files, pending={len(self.pending_files)}, "
            f"broken={len(self.broken_files)})"
        )

    # -- one file -------------------------------------------------------------------
    def _sorted_records(self) -> list[FileRecord]:
        return sorted(self._records.values(), key=lambda r: (r.name, r.mtime_ns))

    def _wants(self, rec: FileRecord, now: float) -> bool:
        """Whether ``rec`` may hold something new (stat-based, no file is opened)."""
        changed = (rec.size, rec.mtime_ns) != (rec.taken_size, rec.taken_mtime_ns)
        if rec.status in ("taken", "not-particles") and not changed:
            return False
        if rec.status == "broken" and not changed and self.n_polls % self.broken_after_polls:
            return False  # broken files are retried every few polls only
        if self.stable_seconds and now - rec.mtime_ns * 1e-9 < self.stable_seconds:
            if rec.status in ("new", "taken", "not-particles"):
                rec.status = "pending"
            return False
        if rec.status == "not-particles":
            rec.status = "pending"
        return True

    def _poll_file(self, rec: FileRecord, parsed, now: float) -> ParticleSet | None:
        """Take the complete rows of ``parsed`` (from the reader) for ``rec``."""
        try:
            part, complete = self._take(rec, parsed)
        except NotReady as err:
            self._failed(rec, str(err), now)
            return None
        except ParticleFileError as err:
            self._failed(rec, err.reason if err.path == Path(rec.path) else str(err), now)
            return None
        except Exception as err:  # never let one bad file stop the stream
            logger.debug("unexpected error reading %s", rec.path, exc_info=True)
            self._failed(rec, f"{type(err).__name__}: {err}", now)
            return None
        if rec.status == "not-particles":
            return None
        if complete or part is not None:  # progress: forget earlier failures
            rec.n_failures, rec.first_failure, rec.warned = 0, None, False
            if self.broken_files.pop(rec.path, None) is not None:
                logger.info("%s is complete now and was taken", rec.path)
        if complete:
            rec.status, rec.reason = "taken", ""
        return part

    def _failed(self, rec: FileRecord, reason: str, now: float) -> None:
        if rec.status == "not-particles":
            return
        rec.n_failures += 1
        if rec.first_failure is None:
            rec.first_failure = now
        rec.reason = reason
        if not rec.warned:
            logger.warning("%s is not complete yet (%s); will retry", rec.path, reason)
            rec.warned = True
        if rec.status == "broken":
            self.broken_files[rec.path] = reason
            return
        rec.status = "pending"
        if (
            rec.n_failures > self.broken_after_polls
            and now - rec.first_failure > self.broken_after_seconds
        ):
            rec.status = "broken"
            self.broken_files[rec.path] = reason
            logger.warning(
                "%s has stayed incomplete for %d polls / %.0f s: %s",
                rec.path,
                rec.n_failures,
                now - rec.first_failure,
                reason,
            )

    def _take(self, rec: FileRecord, parsed) -> tuple[ParticleSet | None, bool]:
        """New complete rows of ``rec``; and whether every complete line was consumed.

        Raises
        ------
        NotReady, ParticleFileError
            Nothing could be taken (the message says why).
        """
        if isinstance(parsed, Exception):
            raise parsed
        if parsed is None:  # nothing new (or not a particle file)
            rec.taken_size, rec.taken_mtime_ns = rec.size, rec.mtime_ns
            return None, True
        n_rows = len(parsed.image_index)
        stacks, ok, reason = self.readiness.check(rec.path, parsed, self._box)
        n_ok = n_rows if ok.all() else int(np.argmin(ok))
        if n_ok == 0:
            raise NotReady(reason)
        part = self._build(rec, parsed, stacks, n_ok)
        # consume the rows
        rec.rows_consumed += n_ok
        if n_ok == n_rows:
            if rec.incremental:
                rec.offset += parsed.n_body_bytes
                rec.skip_rows = 0
            else:
                rec.skip_rows += n_ok
            rec.taken_size, rec.taken_mtime_ns = rec.size, rec.mtime_ns
            rec.cache, rec.cache_key = None, ()
            complete = True
        else:
            rec.skip_rows += n_ok
            rec.cache = parsed.after(n_ok)
            rec.cache_key = rec.current_key()
            rec.status = "pending"
            rec.reason = reason
            complete = False
        part = self.ledger.take(rec.path, part)
        if part is not None:
            rec.particles_taken += part.n_particles
        return part, complete

    def _build(self, rec: FileRecord, parsed: Parsed, stacks: list, n: int) -> ParticleSet:
        """The first ``n`` parsed rows as a particle set with resolved, checked stacks."""
        table = parsed.table
        rows = parsed.row_indices[:n]
        code = parsed.stack_code[:n]
        used = np.unique(code)
        remap = np.full(len(stacks), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        box = self.readiness.header(stacks[int(used[0])]).nx
        has_ctf = table.ctf is not None
        if self._has_ctf is not None and has_ctf != self._has_ctf:
            raise NotReady(
                f"{'has' if has_ctf else 'has no'} CTF parameters, unlike the "
                "particles taken before"
            )
        images = ImageSource([stacks[int(s)] for s in used], remap[code], parsed.image_index[:n])
        out = ParticleSet(
            table.metadata.iloc[rows].reset_index(drop=True),
            images,
            table.pixel_size_A[rows],
            box,
            table.ctf.take(rows) if table.ctf is not None else None,
            table.optics,
            table.optics_group[rows],
            rec.path,
            table.source_format,
        )
        self._box = box
        self._has_ctf = has_ctf
        return out
