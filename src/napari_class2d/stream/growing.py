"""Reading particle files that grow: only the bytes appended since the last read.

A STAR file whose particle table is its last block is read incrementally: its
header (up to the particle columns) is remembered with a hash, and only the
complete lines appended after the consumed offset are parsed. Appended text of
files sharing one header (the per-micrograph files of one job) is parsed
together, in memory (:func:`napari_class2d.io.star.read_star_text`). Other
files (a STAR with a block after the particles, cryoSPARC ``.cs``) are parsed
whole and their consumed rows skipped.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np

from napari_class2d.io.readers import read_particles
from napari_class2d.io.star import read_star_text
from napari_class2d.stream.records import Body, FileRecord, NotReady, Parsed

logger = logging.getLogger(__name__)

_IMAGE_NAME_RE = re.compile(rb"^[ \t]*_rlnImageName\b", re.M)
_DATA_RE = re.compile(rb"^[ \t]*data_", re.M)
_ROW_RE = re.compile(rb"^[ \t]*[^\s#]", re.M)  # a data line (not blank, not a comment)
_COMMENT_RE = re.compile(rb"^[ \t]*#[^\n]*\n", re.M)
#: files whose new rows are parsed together (bounds the text of one parse)
PARSE_CHUNK_FILES = 256


def particle_header_end(text: bytes) -> int | None:
    """Byte offset just after the column names of the loop that holds ``_rlnImageName``.

    ``None`` until a data line follows the column names (a writer may not have
    flushed all of them yet).
    """
    m = _IMAGE_NAME_RE.search(text)
    if m is None:
        return None
    pos = m.start()
    header_end = pos
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


class GrowingReader:
    """The new rows of particle files, parsed.

    Parameters
    ----------
    pixel_size_A
        Pixel size in Å for STAR files that give none.
    project_dir
        Project folder for the stacks of ``.cs`` files (read whole).
    """

    def __init__(self, pixel_size_A: float | None = None, project_dir: Path | None = None):
        self.pixel_size_A = pixel_size_A
        self.project_dir = project_dir

    def parse_many(self, recs: list[FileRecord]) -> dict[str, object]:
        """Parse the new rows of each file: ``{name: Parsed | None | Exception}``.

        Appended text of STAR files with the same header (per-micrograph files of
        one job) is parsed in one go: the fixed cost of a STAR parse, not the rows,
        dominates for small files.
        """
        results: dict[str, object] = {}
        groups: dict[bytes, list[tuple[FileRecord, bytes, bytes]]] = {}
        for rec in recs:
            if rec.cache is not None and rec.cache_key == rec.current_key():
                results[rec.name] = rec.cache
                continue
            rec.cache, rec.cache_key = None, ()
            try:
                got = self.read_new(rec)
            except Exception as err:
                results[rec.name] = err
                continue
            if isinstance(got, Body):
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
            if isinstance(results[rec.name], Parsed):
                rec.cache, rec.cache_key = results[rec.name], rec.current_key()
        return results

    def read_new(self, rec: FileRecord) -> Body | Parsed | None:
        """The text of ``rec`` not consumed yet (complete lines only).

        Returns a :class:`Body` (appended rows of an incremental STAR, parsed
        later, possibly batched), a :class:`Parsed` (other files, parsed whole)
        or ``None`` (nothing new, or not a particle file).

        Raises
        ------
        NotReady
            The file is empty or its particle columns are not complete yet.
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
                            return Body(header, body) if body.strip() else None
                        # a data block follows the particles: parse whole files from now on
                        rec.incremental = False
                        rec.offset, rec.skip_rows = 0, rec.rows_consumed
                else:
                    logger.info("%s was rewritten; reading it again from the start", rec.path)
                    rec.forget_consumption()
                f.seek(0)
            data = f.read()
        text = data[: data.rfind(b"\n") + 1]
        if _IMAGE_NAME_RE.search(data) is None:
            if data.strip():
                logger.debug("%s has no rlnImageName column: not a particle file", rec.path)
                rec.status = "not-particles"
                return None
            raise NotReady("the file is empty")
        header_len = particle_header_end(text)
        if header_len is None:
            raise NotReady("the particle table header is not complete yet")
        if rec.header_len == 0:
            rec.header_len = header_len
            rec.header_sha1 = hashlib.sha1(text[:header_len]).hexdigest()
        if rec.incremental and _DATA_RE.search(text, header_len) is None:
            rec.offset = max(rec.offset, header_len)
            body = text[rec.offset :]
            return Body(text[:header_len], body) if body.strip() else None
        rec.incremental = False
        rec.offset, rec.skip_rows = 0, rec.rows_consumed
        return self._parse_text(rec, text, len(text))

    def _parse_text(self, rec: FileRecord, text: bytes, n_body_bytes: int) -> Parsed | None:
        table = read_star_text(text, rec.path, self.pixel_size_A)
        if table is None or rec.skip_rows >= table.n_particles:
            return None
        return _rows_of(table, np.arange(rec.skip_rows, table.n_particles), n_body_bytes)

    def _parse_batch(self, header: bytes, items: list[tuple[FileRecord, bytes]]) -> dict:
        """Parse the bodies of several files sharing ``header`` in one STAR parse."""
        counts = [len(_ROW_RE.findall(body)) for _, body in items]
        text = header + b"".join(body for _, body in items)
        table = read_star_text(text, items[0][0].path, self.pixel_size_A)
        if table is None or table.n_particles != sum(counts):
            raise ValueError("rows parsed do not match the data lines of the files")
        out: dict[str, Parsed | None] = {}
        start = 0
        for (rec, body), n in zip(items, counts, strict=True):
            rows = np.arange(start + min(rec.skip_rows, n), start + n)
            start += n
            out[rec.name] = _rows_of(table, rows, len(body)) if len(rows) else None
        return out

    def _parse_whole_other(self, rec: FileRecord) -> Parsed | None:
        """Non-STAR particle files (cryoSPARC ``.cs``): read whole, skip consumed rows."""
        rec.incremental = False
        ps = read_particles(rec.path, pixel_size_A=self.pixel_size_A, project_dir=self.project_dir)
        if rec.skip_rows >= ps.n_particles:
            return None
        ps = ps.subset(np.arange(rec.skip_rows, ps.n_particles))
        # the reader resolved and checked the stacks: keep them as they are
        names = [str(ps.images.stack_path(s)) for s in range(len(ps.images.stacks))]
        return Parsed(ps, names, ps.images.stack_index, ps.images.image_index, 0)


def _rows_of(table, rows: np.ndarray, n_body_bytes: int) -> Parsed:
    """The ``rows`` of a parsed STAR table, with their stacks numbered among themselves."""
    used, code = np.unique(table.stack_code[rows], return_inverse=True)
    return Parsed(
        table,
        [table.stack_names[int(u)] for u in used],
        code.astype(np.int64),
        table.image_index[rows],
        n_body_bytes,
        rows,
    )
