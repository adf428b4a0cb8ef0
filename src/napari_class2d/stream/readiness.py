"""Whether the image stacks that parsed rows point at are complete.

A row is ready when its stack exists, the stack's header is readable and the
file holds every byte the header promises (header + extended header +
nx·ny·nz·bytes per pixel), its box is the stream's, and its image index is
below nz. Headers are read once per (size, modification time) of a stack.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import StackHeader, check_stack_header, read_stack_header
from napari_class2d.io.paths import resolve_stack
from napari_class2d.stream.records import NotReady, Parsed


class StackReadiness:
    """Checks stacks for completeness, caching headers.

    Parameters
    ----------
    project_dir
        Project folder that relative stack names start from (after the STAR
        file's folder; see :func:`napari_class2d.io.paths.resolve_stack`).
    stable_seconds
        Only take a stack whose modification time is at least this old.
    """

    def __init__(self, project_dir: Path | None = None, stable_seconds: float = 0.0):
        self.project_dir = project_dir
        self.stable_seconds = float(stable_seconds)
        self._headers: dict[str, tuple[int, int, StackHeader]] = {}

    def header(self, path: Path) -> StackHeader:
        """The header of a complete stack.

        Raises
        ------
        NotReady
            Missing, changed too recently, incomplete or unusable (the message says which).
        """
        key = str(path)
        try:
            st = os.stat(path)
        except OSError:
            raise NotReady(f"image stack {path} not found") from None
        cached = self._headers.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        if self.stable_seconds and time.time() - st.st_mtime < self.stable_seconds:
            raise NotReady(
                f"image stack {path} was modified less than {self.stable_seconds} s ago"
            )
        try:
            header = read_stack_header(path)
            if header.file_size < header.expected_size:
                raise NotReady(
                    f"image stack {path} is incomplete: {header.file_size} of "
                    f"{header.expected_size} bytes"
                )
            header = check_stack_header(header, as_stack=True)
        except ParticleFileError as err:
            raise NotReady(f"image stack {path}: {err.reason}") from None
        self._headers[key] = (st.st_size, st.st_mtime_ns, header)
        return header

    def check(
        self, star_path: str, parsed: Parsed, box: int | None
    ) -> tuple[list[Path | None], np.ndarray, str]:
        """Resolved stacks of ``parsed`` and, per row, whether its image is complete.

        Parameters
        ----------
        star_path
            The particle file the rows come from (relative stack names start there).
        parsed
            Its parsed rows.
        box
            The stream's image size (``None``: not known yet; the first stack sets it).

        Returns
        -------
        stacks
            Per stack name of ``parsed``, its file (``None`` when not ready).
        ok
            Per row, whether its image can be taken.
        reason
            Why the first row that is not ok is not ("" when all are).
        """
        n_stacks = len(parsed.stack_names)
        stacks: list[Path | None] = [None] * n_stacks
        n_images = np.zeros(n_stacks, dtype=np.int64)
        reasons = [""] * n_stacks
        # stacks in order of first use, so the first row's stack sets the box of a new stream
        order = np.unique(parsed.stack_code, return_index=True)
        for s in order[0][np.argsort(order[1])]:
            name = parsed.stack_names[s]
            path, _ = resolve_stack(Path(star_path), name, self.project_dir)
            if path is None:
                reasons[s] = f"image stack {name!r} not found (yet)"
                continue
            try:
                header = self.header(path)
            except NotReady as err:
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
