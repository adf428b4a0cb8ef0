"""A streaming particle source: new, complete particle files in a folder or a growing STAR.

:class:`FolderWatcher` is what a streaming :class:`~napari_class2d.engine.job.Class2DJob`
polls between iterations. It watches either

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import CTFParams, ImageSource, ParticleSet

logger = logging.getLogger(__name__)

#: state() format tag and version, checked by restore()
STATE_FORMAT = "napari-class2d.FolderWatcher"
STATE_VERSION = 1

#: particle-file suffixes taken from a watched folder by default
DEFAULT_SUFFIXES = (".star",)
#: name endings of files still being written by common tools (never taken)
TEMP_SUFFIXES = (".tmp", ".part", "~", ".swp", ".partial", ".crdownload")

_IMAGE_NAME_RE = re.compile(rb"^[ \t]*_rlnImageName\b", re.M)
_DATA_RE = re.compile(rb"^[ \t]*data_", re.M)
_ROW_RE = re.compile(rb"^[ \t]*[^\s#]", re.M)  # a data line (not blank, not a comment)
_COMMENT_RE = re.compile(rb"^[ \t]*#[^\n]*\n", re.M)
#: files whose new rows are parsed together (bounds the scratch STAR of one parse)
PARSE_CHUNK_FILES = 256


def is_temp_name(name: str) -> bool:
    """Whether a file name looks like a file still being written (or an editor backup)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


@dataclass
class _FileRecord:
    """What the watcher knows about one particle file."""

    path: str  # absolute
    name: str  # relative to the watched folder, '/'-separated (state key, sort key)
    size: int = -1  # last seen stat
    mtime_ns: int = -1
    status: str = "new"  # new | pending | taken | not-particles | broken
    # consumption of the file
    incremental: bool = True  # STAR with the particle loop last: parse appended bytes only
    header_len: int = 0  # bytes of the STAR header up to the particle loop's columns (0: unknown)
    header_sha1: str = ""
    offset: int = 0  # bytes whose rows are all consumed (incremental STAR)
    skip_rows: int = 0  # rows after `offset` (or of the whole file) already consumed
    rows_consumed: int = 0  # rows of the file consumed in total
    particles_taken: int = 0  # new particles taken from it (duplicates of earlier images excluded)
    taken_size: int = -1  # stat when rows were last consumed
    taken_mtime_ns: int = -1
    # failures
    reason: str = ""
    n_failures: int = 0
    first_failure: float | None = None
    warned: bool = False
    # parse cache for pending files: (size, mtime_ns, offset, skip_rows) -> parsed rows
    cache_key: tuple = ()
    cache: object = field(default=None, repr=False)

    def to_state(self) -> dict:
        return {
            "size": self.taken_size,
            "mtime_ns": self.taken_mtime_ns,
            "rows_taken": self.rows_consumed,
            "particles_taken": self.particles_taken,
            "incremental": self.incremental,
            "header_len": self.header_len,
            "header_sha1": self.header_sha1,
            "offset": self.offset,
            "skip_rows": self.skip_rows,
        }


class _NotReady(Exception):
    """A file (or its images) is not complete yet; the message says why."""


@dataclass
class _Body:
    """Appended text of an incremental STAR file, not parsed yet."""

    header: bytes
    body: bytes


@dataclass
class _Parsed:
    """Rows parsed from a particle file, before the completeness check of their images."""

    particles: ParticleSet  # parsed rows (stacks not resolved); may hold other files' rows too
    stack_names: list[str]  # stacks as written in the file
    stack_code: np.ndarray  # per row: index into stack_names
    image_index: np.ndarray  # per row: 0-based image index
    n_body_bytes: int  # bytes of the parsed body (incremental STAR), to advance the offset
    rows: np.ndarray | None = None  # this file's rows of `particles` (None: all of them)

    @property
    def row_indices(self) -> np.ndarray:
        return np.arange(len(self.image_index)) if self.rows is None else self.rows


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
        :func:`napari_class2d.io.star.read_star`).
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
    The watcher is thread-safe.
    """

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
        self.path = Path(os.path.abspath(path))
        if self.path.is_dir():
            self.single_file = False
        elif self.path.is_file() or self.path.suffix.lower() == ".star":
            self.single_file = True
            if not self.path.parent.is_dir():
                raise FileNotFoundError(
                    f"{self.path}: the folder {self.path.parent} does not exist; "
                    "expected a folder to watch or a STAR file (which may appear later)"
                )
        else:
            raise FileNotFoundError(
                f"{self.path}: no such folder; expected a folder to watch or a STAR file"
            )
        if stable_seconds < 0:
            raise ValueError(f"stable_seconds={stable_seconds}: must be >= 0")
        self.pixel_size_A = pixel_size_A
        self.project_dir = Path(project_dir) if project_dir is not None else None
        self.stable_seconds = float(stable_seconds)
        self.broken_after_polls = int(broken_after_polls)
        self.broken_after_seconds = float(broken_after_seconds)
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.exclude = [os.path.abspath(p) for p in exclude]
        self.max_seconds_per_poll = max_seconds_per_poll

        self.broken_files: dict[str, str] = {}
        self.n_taken = 0
        self.n_polls = 0
        self.n_duplicates_skipped = 0
        self._records: dict[str, _FileRecord] = {}
        self._taken_images: dict[str, np.ndarray] = {}  # stack path -> bool per image
        self._box: int | None = None
        self._has_ctf: bool | None = None
        self._header_cache: dict[str, tuple[int, int, object]] = {}
        self._lock = threading.RLock()
        self._tmpdir = tempfile.mkdtemp(prefix="napari-class2d-watch-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    # -- public API -----------------------------------------------------------------
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
                entries = self._scan()
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
                results = self._parse_many(chunk)
                for rec in chunk:
                    part = self._poll_file(rec, results[rec.name], now)
                    if part is not None and part.n_particles:
                        parts.append(part)
            if not parts:
                return None
            out = _join(parts)
            self.n_taken += out.n_particles
            return out

    def state(self) -> dict:
        """What was taken so far, JSON-able, for :meth:`restore` after a restart."""
        with self._lock:
            files = {
                r.name: r.to_state()
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
                "taken_images": {
                    stack: _runs(np.flatnonzero(taken))
                    for stack, taken in sorted(self._taken_images.items())
                },
            }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: files and images taken then are not taken again.

        Raises
        ------
        ValueError
            ``state`` is not a watcher state of a known version.
        """
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a FolderWatcher state (format {state.get('format')!r}, version "
                f"{state.get('version')!r}); expected {STATE_FORMAT!r} version {STATE_VERSION}"
            )
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
                rec = _FileRecord(path=self._abspath(name), name=name)
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
                self._records[name] = rec
            self._taken_images = {
                stack: _from_runs(runs) for stack, runs in state["taken_images"].items()
            }
            self.n_taken = int(state["n_taken"])
            self._box = state.get("box")
            self._has_ctf = state.get("has_ctf")

    def close(self) -> None:
        """Remove the watcher's scratch folder (also done when it is garbage-collected)."""
        self._finalizer()

    def __repr__(self) -> str:
        return (
            f"FolderWatcher({str(self.path)!r}, taken={self.n_taken} particles from "
            f"{len(self.taken_files)} files, pending={len(self.pending_files)}, "
            f"broken={len(self.broken_files)})"
        )

    # -- discovery ------------------------------------------------------------------
    def _abspath(self, name: str) -> str:
        if self.single_file:
            return str(self.path)
        return os.path.join(self.path, *name.split("/"))

    def _sorted_records(self) -> list[_FileRecord]:
        return sorted(self._records.values(), key=lambda r: (r.name, r.mtime_ns))

    def _excluded(self, path: str) -> bool:
        return any(path == e or path.startswith(e + os.sep) for e in self.exclude)

    def _scan(self) -> list[_FileRecord]:
        """Stat every candidate file; return their records in taking order."""
        found: list[tuple[str, str, os.stat_result]] = []
        if self.single_file:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return []
            found.append((self.path.name, str(self.path), st))
        else:
            self._walk(str(self.path), "", found, set())
        records = []
        for name, path, st in found:
            rec = self._records.get(name)
            if rec is None:
                rec = self._records[name] = _FileRecord(path=path, name=name)
            rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
            records.append(rec)
        records.sort(key=lambda r: (r.name, r.mtime_ns))
        return records

    def _walk(self, folder: str, prefix: str, out: list, seen: set) -> None:
        try:
            key = os.stat(folder)
        except OSError:
            return
        if (key.st_dev, key.st_ino) in seen:  # symlink loop
            return
        seen.add((key.st_dev, key.st_ino))
        with os.scandir(folder) as it:
            entries = list(it)
        suffixes, exclude = self.suffixes, self.exclude
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if not is_temp_name(name) and not (exclude and self._excluded(entry.path)):
                        self._walk(entry.path, prefix + name + "/", out, seen)
                    continue
                lower = name.lower()
                if (
                    lower.endswith(suffixes)
                    and not lower.endswith(TEMP_SUFFIXES)
                    and not (exclude and self._excluded(entry.path))
                    and entry.is_file()
                ):
                    out.append((prefix + name, entry.path, entry.stat()))
            except OSError:  # vanished between listing and stat
                continue

    # -- one file -------------------------------------------------------------------
    def _wants(self, rec: _FileRecord, now: float) -> bool:
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

    def _poll_file(self, rec: _FileRecord, parsed, now: float) -> ParticleSet | None:
        """Take the complete rows of ``parsed`` (from :meth:`_parse_many`) for ``rec``."""
        try:
            part, complete = self._take(rec, parsed)
        except _NotReady as err:
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

    def _failed(self, rec: _FileRecord, reason: str, now: float) -> None:
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

    def _take(self, rec: _FileRecord, parsed) -> tuple[ParticleSet | None, bool]:
        """New complete rows of ``rec``; and whether every complete line was consumed.

        Raises
        ------
        _NotReady, ParticleFileError
            Nothing could be taken (the message says why).
        """
        if isinstance(parsed, Exception):
            raise parsed
        if parsed is None:  # nothing new (or not a particle file)
            rec.taken_size, rec.taken_mtime_ns = rec.size, rec.mtime_ns
            return None, True
        n_rows = len(parsed.image_index)
        stacks, ok, reason = self._check_images(rec, parsed)
        n_ok = n_rows if ok.all() else int(np.argmin(ok))
        if n_ok == 0:
            raise _NotReady(reason)
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
            rec.cache = _Parsed(
                parsed.particles,
                parsed.stack_names,
                parsed.stack_code[n_ok:],
                parsed.image_index[n_ok:],
                parsed.n_body_bytes,
                parsed.row_indices[n_ok:],
            )
            rec.cache_key = _cache_key(rec)
            rec.status = "pending"
            rec.reason = reason
            complete = False
        part = self._dedupe(rec, part)
        if part is not None:
            rec.particles_taken += part.n_particles
        return part, complete

    # -- parsing --------------------------------------------------------------------
    def _parse_many(self, recs: list[_FileRecord]) -> dict[str, object]:
        """Parse the new rows of each file: ``{name: _Parsed | None | Exception}``.

        Appended text of STAR files with the same header (per-micrograph files of
        one job) is parsed in one go: the fixed cost of a STAR parse, not the rows,
        dominates for small files.
        """
        results: dict[str, object] = {}
        groups: dict[bytes, list[tuple[_FileRecord, bytes, bytes]]] = {}
        for rec in recs:
            if rec.cache is not None and rec.cache_key == _cache_key(rec):
                results[rec.name] = rec.cache
                continue
            rec.cache, rec.cache_key = None, ()
            try:
                got = self._read_new(rec)
            except Exception as err:
                results[rec.name] = err
                continue
            if isinstance(got, _Body):
                key = _COMMENT_RE.sub(b"", got.header)  # writers stamp the time in comments
                groups.setdefault(key, []).append((rec, got.header, got.body))
            else:
                results[rec.name] = got
        for items in groups.values():
            if len(items) > 1:
                try:
                    results.update(self._parse_batch(items[0][1], [(r, b) for r, _, b in items]))
                    continue
                except Exception:  # parse one by one, so the error names its file
                    logger.debug("batch parse failed; parsing files one by one", exc_info=True)
            for rec, header, body in items:
                try:
                    results[rec.name] = self._parse_text(rec, header + body, len(body))
                except Exception as err:
                    results[rec.name] = err
        for rec in recs:
            if isinstance(results[rec.name], _Parsed):
                rec.cache, rec.cache_key = results[rec.name], _cache_key(rec)
        return results

    def _parse_batch(self, header: bytes, items: list[tuple[_FileRecord, bytes]]) -> dict:
        """Parse the bodies of several files sharing ``header`` in one STAR parse."""
        from napari_class2d.io.star import parse_image_names

        counts = [len(_ROW_RE.findall(body)) for _, body in items]
        ps = self._read_star_text(header + b"".join(body for _, body in items))
        if ps is None or ps.n_particles != sum(counts):
            raise ValueError("rows parsed do not match the data lines of the files")
        image_index, stack_code, stack_names = parse_image_names(
            Path(items[0][0].path), ps.metadata["rlnImageName"]
        )
        out: dict[str, _Parsed | None] = {}
        start = 0
        for (rec, body), n in zip(items, counts, strict=True):
            rows = np.arange(start + min(rec.skip_rows, n), start + n)
            start += n
            if len(rows) == 0:
                out[rec.name] = None
                continue
            used, code = np.unique(stack_code[rows], return_inverse=True)
            out[rec.name] = _Parsed(
                ps,
                [stack_names[int(u)] for u in used],
                code.astype(np.int64),
                image_index[rows],
                len(body),
                rows,
            )
        return out

    def _read_new(self, rec: _FileRecord):
        """The text of ``rec`` not consumed yet (complete lines only).

        Returns a :class:`_Body` (appended rows of an incremental STAR, parsed
        later, possibly batched), a :class:`_Parsed` (other files, parsed
        whole) or ``None`` (nothing new, or not a particle file).
        """
        if not rec.path.lower().endswith(".star"):
            return self._parse_whole_other(rec)
        with open(rec.path, "rb") as f:
            if rec.header_len:
                header = f.read(rec.header_len)
                if (
                    len(header) == rec.header_len
                    and hashlib.sha1(header).hexdigest() == rec.header_sha1
                    and rec.size >= rec.offset
                ):
                    if rec.incremental:
                        f.seek(rec.offset)
                        data = f.read()
                        body = data[: data.rfind(b"\n") + 1]
                        if _DATA_RE.search(body) is None:
                            return self._parse_body(rec, header, body)
                        # a data block follows the particles: parse whole files from now on
                        rec.incremental = False
                        rec.offset, rec.skip_rows = 0, rec.rows_consumed
                else:
                    logger.info("%s was rewritten; reading it again from the start", rec.path)
                    self._reset(rec)
                f.seek(0)
            data = f.read()
        text = data[: data.rfind(b"\n") + 1]
        if _IMAGE_NAME_RE.search(data) is None:
            if data.strip():
                logger.debug("%s has no rlnImageName column: not a particle file", rec.path)
                rec.status = "not-particles"
                return None
            raise _NotReady("the file is empty")
        header_len = _particle_header_end(text)
        if header_len is None:
            raise _NotReady("the particle table header is not complete yet")
        if rec.header_len == 0:
            rec.header_len = header_len
            rec.header_sha1 = hashlib.sha1(text[:header_len]).hexdigest()
        if rec.incremental and _DATA_RE.search(text, header_len) is None:
            rec.offset = max(rec.offset, header_len)
            return self._parse_body(rec, text[:header_len], text[rec.offset :])
        rec.incremental = False
        rec.offset, rec.skip_rows = 0, rec.rows_consumed
        return self._parse_text(rec, text, len(text))

    def _reset(self, rec: _FileRecord) -> None:
        """Forget the consumption of a rewritten file (images already taken stay taken)."""
        rec.header_len, rec.header_sha1, rec.offset, rec.skip_rows = 0, "", 0, 0
        rec.rows_consumed = 0
        rec.incremental = True

    def _parse_body(self, rec: _FileRecord, header: bytes, body: bytes) -> _Body | None:
        return _Body(header, body) if body.strip() else None

    def _read_star_text(self, text: bytes) -> ParticleSet | None:
        """Parse STAR text (stacks not resolved); ``None`` when it has no particle rows."""
        from napari_class2d.io.star import read_star

        fd, tmp = tempfile.mkstemp(suffix=".star", dir=self._tmpdir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            try:
                return read_star(tmp, self.pixel_size_A, check_stacks_exist=False)
            except ParticleFileError as err:
                if "has no rows" in err.reason:
                    return None
                err.path = None  # the scratch file means nothing to the user
                raise
        finally:
            os.unlink(tmp)

    def _parse_text(self, rec: _FileRecord, text: bytes, n_body_bytes: int) -> _Parsed | None:
        from napari_class2d.io.star import parse_image_names

        try:
            ps = self._read_star_text(text)
        except ParticleFileError as err:
            raise ParticleFileError(rec.path, err.reason, row=err.row, column=err.column) from None
        if ps is None:
            return None
        if rec.skip_rows:
            if rec.skip_rows >= ps.n_particles:
                return None
            ps = ps.subset(np.arange(rec.skip_rows, ps.n_particles))
        image_index, stack_code, stack_names = parse_image_names(
            Path(rec.path), ps.metadata["rlnImageName"]
        )
        return _Parsed(ps, stack_names, stack_code, image_index, n_body_bytes)

    def _parse_whole_other(self, rec: _FileRecord) -> _Parsed | None:
        """Non-STAR particle files (cryoSPARC ``.cs``): read whole, skip consumed rows."""
        from napari_class2d.io.readers import read_particles

        rec.incremental = False
        ps = read_particles(rec.path, pixel_size_A=self.pixel_size_A, project_dir=self.project_dir)
        if rec.skip_rows >= ps.n_particles:
            return None
        ps = ps.subset(np.arange(rec.skip_rows, ps.n_particles))
        # the reader resolved and checked the stacks: keep them as they are
        names = [str(ps.images.stack_path(s)) for s in range(len(ps.images.stacks))]
        return _Parsed(ps, names, ps.images.stack_index, ps.images.image_index, 0)

    # -- images ---------------------------------------------------------------------
    def _resolve(self, rec: _FileRecord, name: str) -> Path | None:
        from napari_class2d.io.paths import candidate_paths, resolve_first

        star = Path(rec.path)
        p = Path(name)
        if p.is_absolute() and p.is_file():
            return p
        bases = [star.parent, self.project_dir, star.parent.parent, star.parent.parent.parent]
        return resolve_first(candidate_paths(name, bases))

    def _stack_header(self, path: Path):
        """The header of a complete stack (cached by size and mtime); raises _NotReady."""
        from napari_class2d.io.mrc import check_stack_header, read_stack_header

        key = str(path)
        try:
            st = os.stat(path)
        except OSError:
            raise _NotReady(f"image stack {path} not found") from None
        cached = self._header_cache.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        if self.stable_seconds and time.time() - st.st_mtime < self.stable_seconds:
            raise _NotReady(
                f"image stack {path} was modified less than {self.stable_seconds} s ago"
            )
        try:
            header = read_stack_header(path)
            if header.file_size < header.expected_size:
                raise _NotReady(
                    f"image stack {path} is incomplete: {header.file_size} of "
                    f"{header.expected_size} bytes"
                )
            header = check_stack_header(header, as_stack=True)
        except ParticleFileError as err:
            raise _NotReady(f"image stack {path}: {err.reason}") from None
        self._header_cache[key] = (st.st_size, st.st_mtime_ns, header)
        return header

    def _check_images(self, rec: _FileRecord, parsed: _Parsed):
        """Resolved stacks and, per row, whether its image is complete (vectorised per stack)."""
        n_stacks = len(parsed.stack_names)
        stacks: list[Path | None] = [None] * n_stacks
        n_images = np.zeros(n_stacks, dtype=np.int64)
        reasons = [""] * n_stacks
        # stacks in order of first use, so the first row's stack sets the box of a new stream
        order = np.unique(parsed.stack_code, return_index=True)
        box = self._box
        for s in order[0][np.argsort(order[1])]:
            name = parsed.stack_names[s]
            path = self._resolve(rec, name)
            if path is None:
                reasons[s] = f"image stack {name!r} not found (yet)"
                continue
            try:
                header = self._stack_header(path)
            except _NotReady as err:
                reasons[s] = str(err)
                continue
            box = header.nx if box is None else box
            if header.nx != box:
                reasons[s] = f"image stack {path} has {header.nx} px images; expected {box} px"
                continue
            stacks[s] = path
            n_images[s] = header.nz
        ok = parsed.image_index < n_images[parsed.stack_code]
        reason = ""
        if not ok.all():
            row = int(np.argmin(ok))
            s = int(parsed.stack_code[row])
            reason = reasons[s] or (
                f"image {int(parsed.image_index[row]) + 1} is beyond the end of "
                f"{stacks[s]} ({int(n_images[s])} images so far)"
            )
        return stacks, ok, reason

    def _build(self, rec: _FileRecord, parsed: _Parsed, stacks: list, n: int) -> ParticleSet:
        """The first ``n`` parsed rows as a particle set with resolved, checked stacks."""
        ps = parsed.particles
        rows = parsed.row_indices[:n]
        code = parsed.stack_code[:n]
        used = np.unique(code)
        remap = np.full(len(stacks), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        box = self._stack_header(stacks[int(used[0])]).nx
        if self._has_ctf is not None and ps.has_ctf != self._has_ctf:
            raise _NotReady(
                f"{'has' if ps.has_ctf else 'has no'} CTF parameters, unlike the "
                "particles taken before"
            )
        images = ImageSource([stacks[int(s)] for s in used], remap[code], parsed.image_index[:n])
        out = ParticleSet(
            ps.metadata.iloc[rows].reset_index(drop=True),
            images,
            ps.pixel_size_A[rows],
            box,
            ps.ctf.take(rows) if ps.ctf is not None else None,
            ps.optics,
            ps.optics_group[rows],
            rec.path,
            ps.source_format,
        )
        self._box = box
        self._has_ctf = ps.has_ctf
        return out

    def _dedupe(self, rec: _FileRecord, part: ParticleSet) -> ParticleSet | None:
        """Drop images taken before (from any file) and repeated ones; mark the rest taken."""
        src = part.images
        keep = np.ones(part.n_particles, dtype=bool)
        for s, entry in enumerate(src.stacks):
            where = np.flatnonzero(src.stack_index == s)
            idx = src.image_index[where]
            key = str(entry)
            taken = self._taken_images.get(key)
            need = int(idx.max()) + 1
            if taken is None or len(taken) < need:
                grown = np.zeros(max(need, 0 if taken is None else len(taken)), dtype=bool)
                if taken is not None:
                    grown[: len(taken)] = taken
                taken = self._taken_images[key] = grown
            _, first = np.unique(idx, return_index=True)
            fresh = np.zeros(len(idx), dtype=bool)
            fresh[first] = True
            fresh &= ~taken[idx]
            keep[where] = fresh
            taken[idx] = True
        n_dup = int((~keep).sum())
        if n_dup:
            self.n_duplicates_skipped += n_dup
            logger.info(
                "%s: %d particle(s) skipped: their images were already taken", rec.path, n_dup
            )
            if not keep.any():
                return None
            part = part.subset(np.flatnonzero(keep))
        return part


def _join(parts: list[ParticleSet]) -> ParticleSet:
    """Concatenate ``parts`` in order.

    Runs of parts that share one optics table object (rows of files parsed
    together) are stacked directly; :meth:`ParticleSet.concat` then merges the
    optics tables of the few runs left.
    """
    runs: list[list[ParticleSet]] = []
    for p in parts:
        prev = runs[-1][0] if runs else None
        if prev is not None and prev.optics is not None and p.optics is prev.optics:
            runs[-1].append(p)
        else:
            runs.append([p])
    joined = []
    for run in runs:
        if len(run) == 1:
            joined.append(run[0])
            continue
        paths = {str(p.source_path) for p in run}
        joined.append(
            ParticleSet(
                pd.concat([p.metadata for p in run], ignore_index=True, sort=False),
                ImageSource.concat([p.images for p in run]),
                np.concatenate([p.pixel_size_A for p in run]),
                run[0].box,
                CTFParams.concat([p.ctf for p in run]) if run[0].ctf is not None else None,
                run[0].optics,
                np.concatenate([p.optics_group for p in run]),
                run[0].source_path if len(paths) == 1 else None,
                run[0].source_format,
            )
        )
    return joined[0] if len(joined) == 1 else ParticleSet.concat(joined)


def _cache_key(rec: _FileRecord) -> tuple:
    return (rec.size, rec.mtime_ns, rec.offset, rec.skip_rows, rec.header_len)


def _particle_header_end(text: bytes) -> int | None:
    """Byte offset just after the column names of the loop that holds ``_rlnImageName``.

    ``None`` until a data line follows the column names (a writer may not have
    flushed all of them yet).
    """
    m = _IMAGE_NAME_RE.search(text)
    if m is None:
        return None
    pos = m.start()
    while True:  # one step per column name, not per particle
        nl = text.find(b"\n", pos)
        if nl < 0:
            return None
        line = text[pos:nl].strip()
        if line.startswith(b"_"):
            pos = nl + 1
            header_end = pos
        elif line and not line.startswith(b"#"):
            return header_end
        else:
            pos = nl + 1


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
