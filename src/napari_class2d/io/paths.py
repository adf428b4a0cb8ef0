"""Where the image stack named in a particle file lives, and header checks of all stacks.

Particle files name stacks by paths relative to some folder (the STAR file's,
the RELION or cryoSPARC project's, or the working directory). Each distinct
stack is resolved and its header checked once; nothing here loops over
particles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import StackHeader, check_stack_header, read_stack_header

#: the file RELION (2.0 to 5) keeps in the folder of a project
RELION_PIPELINE = "default_pipeline.star"


def relion_project_of(folder: str | Path) -> Path | None:
    """The RELION project ``folder`` lies in: the nearest of ``folder`` and its parents
    that holds :data:`RELION_PIPELINE`; ``None`` outside a RELION project."""
    here = Path(os.path.abspath(folder))
    for candidate in (here, *here.parents):
        if (candidate / RELION_PIPELINE).is_file():
            return candidate
    return None


def project_folders(star_path: Path) -> list[Path | None]:
    """Folders a STAR file's relative image names are tried against after its own folder
    and the working directory: the two above its folder (a ``Class2D/job008/x.star``
    inside a project) and the RELION project it lies in (``None`` outside one)."""
    folder = star_path.parent
    return [folder.parent, folder.parent.parent, relion_project_of(folder)]


def candidate_paths(
    name: str,
    bases: Sequence[Path | None],
    *,
    as_is: bool = True,
    then: Sequence[Path | None] = (),
) -> list[Path]:
    """Paths to try, in order, for stack ``name``.

    Parameters
    ----------
    name
        The path as written in the particle file.
    bases
        Folders to resolve a relative ``name`` against (``None`` entries skipped).
    as_is
        Also try ``name`` itself (relative to the working directory).
    then
        Folders tried after that (e.g. parents of the STAR file's folder, where
        a RELION project usually is).
    """
    p = Path(name)
    if p.is_absolute():
        return [p]
    out: list[Path] = []
    for base in bases:
        if base is not None:
            out.append(Path(base) / p)
    if as_is:
        out.append(p)
    out.extend(Path(base) / p for base in then if base is not None)
    seen, unique = set(), []
    for c in out:
        key = os.path.normpath(str(c))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def resolve_first(candidates: Sequence[Path]) -> Path | None:
    """The first existing file of ``candidates`` (absolute), or ``None``."""
    for c in candidates:
        if c.is_file():
            return Path(os.path.abspath(c))
    return None


def resolve_stack(
    star_path: Path, name: str, project_dir: str | Path | None = None
) -> tuple[Path | None, list[Path]]:
    """Where the stack ``name`` of STAR file ``star_path`` is, and every path tried.

    Tried in order: the STAR file's folder, ``project_dir``, the working
    directory, then :func:`project_folders` (the two folders above the STAR
    file's and the RELION project it lies in).
    """
    bases = [star_path.parent, Path(project_dir) if project_dir is not None else None]
    tried = candidate_paths(name, bases, then=project_folders(star_path))
    return resolve_first(tried), tried


def check_stacks(
    source: Path,
    stacks: Sequence[Path],
    stack_index: np.ndarray,
    image_index: np.ndarray,
    *,
    index_column: str,
    index_base: int,
) -> int:
    """Check every stack header and every image index; return the box size.

    Only headers are read (1 KiB per stack), so this takes milliseconds per
    stack whatever the data size.

    Parameters
    ----------
    source
        The particle file (named in errors).
    stacks
        Resolved stack files.
    stack_index, image_index
        Per particle: which stack, and the 0-based image in it.
    index_column
        Column that holds the image index (named in errors).
    index_base
        How the particle file numbers images (1 for RELION, 0 for cryoSPARC),
        used to quote indices back to the user as written.

    Raises
    ------
    ParticleFileError
        A stack is bad (see :func:`napari_class2d.io.mrc.check_stack_header`);
        an image index is beyond its stack (names the particle file, row and
        stack); the stacks hold images of different sizes.
    """
    headers: list[StackHeader] = []
    first_row = _first_rows(stack_index, len(stacks))
    for s, stack in enumerate(stacks):
        try:
            headers.append(check_stack_header(read_stack_header(stack), as_stack=True))
        except ParticleFileError as err:
            raise ParticleFileError(
                source,
                f"image stack {stack} (first used in row {first_row[s]}) is unusable: "
                f"{err.reason}",
                row=int(first_row[s]),
                column=index_column,
            ) from None
    n_images = np.array([h.nz for h in headers], dtype=np.int64)
    beyond = image_index >= n_images[stack_index]
    if beyond.any():
        row = int(np.argmax(beyond))
        s = int(stack_index[row])
        raise ParticleFileError(
            source,
            f"image {int(image_index[row]) + index_base} is beyond the end of stack "
            f"{stacks[s]}, which holds {int(n_images[s])} images",
            row=row,
            column=index_column,
        )
    boxes = np.array([h.nx for h in headers], dtype=np.int64)
    if len(np.unique(boxes)) > 1:
        # Name one stack of each size, with the first row that uses it.
        parts = []
        for b in np.unique(boxes):
            s = int(np.argmax(boxes == b))
            parts.append(f"{b} px in {stacks[s]} (row {first_row[s]})")
        raise ParticleFileError(
            source,
            "particles have different box sizes: "
            + "; ".join(parts)
            + ". Expected one box size (re-extract or split the data set).",
        )
    return int(boxes[0]) if len(boxes) else 0


def _first_rows(stack_index: np.ndarray, n_stacks: int) -> np.ndarray:
    """For each stack, the first particle row that uses it."""
    first = np.full(n_stacks, -1, dtype=np.int64)
    if len(stack_index):
        rows = np.arange(len(stack_index))[::-1]
        first[stack_index[::-1]] = rows  # last write wins: the smallest row
    return first
