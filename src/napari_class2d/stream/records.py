"""What the folder watcher knows about each particle file, and what one parse gave.

The data types shared by the watcher's parts (discovery, the growing-STAR
reader, the readiness checks and the ledger); nothing here touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class NotReady(Exception):
    """A file (or its images) is not complete yet; the message says why."""


@dataclass
class FileRecord:
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

    def current_key(self) -> tuple:
        """What the parse cache of this file depends on."""
        return (self.size, self.mtime_ns, self.offset, self.skip_rows, self.header_len)

    def forget_consumption(self) -> None:
        """A rewritten file is read again from the start (its images stay taken)."""
        self.header_len, self.header_sha1, self.offset, self.skip_rows = 0, "", 0, 0
        self.rows_consumed = 0
        self.incremental = True


@dataclass
class Body:
    """Appended text of an incremental STAR file, not parsed yet."""

    header: bytes
    body: bytes


@dataclass
class Parsed:
    """Rows parsed from a particle file, before the completeness check of their images.

    ``table`` is a :class:`~napari_class2d.io.star.ParticleTable` (STAR text) or a
    :class:`~napari_class2d.io.particles.ParticleSet` (``.cs`` files, read whole);
    either has ``metadata``, ``pixel_size_A``, ``ctf``, ``optics``, ``optics_group``
    and ``source_format``, and may hold other files' rows too (parsed together).
    """

    table: object
    stack_names: list[str]  # stacks as written in the file
    stack_code: np.ndarray  # per row: index into stack_names
    image_index: np.ndarray  # per row: 0-based image index
    n_body_bytes: int  # bytes of the parsed body (incremental STAR), to advance the offset
    rows: np.ndarray | None = None  # this file's rows of `table` (None: all of them)

    @property
    def row_indices(self) -> np.ndarray:
        return np.arange(len(self.image_index)) if self.rows is None else self.rows

    def after(self, n: int) -> Parsed:
        """The rows after the first ``n``."""
        return Parsed(
            self.table,
            self.stack_names,
            self.stack_code[n:],
            self.image_index[n:],
            self.n_body_bytes,
            self.row_indices[n:],
        )
