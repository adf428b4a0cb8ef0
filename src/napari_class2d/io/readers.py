"""Read any supported particle file into a :class:`ParticleSet` (dispatch on suffix).

Reading touches only the particle file and the 1 KiB header of each image
stack, so a data set of any size opens in seconds; pixels are read when
:meth:`ParticleSet.read_images` asks for them.
"""

from __future__ import annotations

from pathlib import Path

from napari_class2d.io.cryosparc import read_cs
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.stack import read_mrcs_particles
from napari_class2d.io.star import read_star

#: suffix -> format name, for messages and docs
SUPPORTED_SUFFIXES = {
    ".star": "RELION particle STAR file (1.x-5)",
    ".cs": "cryoSPARC particle file",
    ".mrcs": "MRC image stack",
    ".mrc": "MRC image stack",
}


def read_particles(
    path: str | Path,
    pixel_size_A: float | None = None,
    project_dir: str | Path | None = None,
    *,
    check_stacks: bool = True,
) -> ParticleSet:
    """Read a particle file without loading its images.

    Parameters
    ----------
    path
        ``.star`` (RELION 1.x-5), ``.cs`` (cryoSPARC) or ``.mrcs``/``.mrc``
        (bare stack, no CTF).
    pixel_size_A
        Pixel size in Å. For STAR and ``.cs`` files it is used only when the
        file gives none; for a bare stack it overrides the header.
    project_dir
        RELION or cryoSPARC project folder, tried when a stack path is not
        found relative to the particle file's folder.
    check_stacks
        Resolve every image stack, check its header (size, box, truncation) and
        every image index against it. Only headers are read. ``False`` parses
        the particle file only (metadata-only).

    Returns
    -------
    ParticleSet

    Raises
    ------
    ParticleFileError
        Unknown suffix, or any problem with the file (the message names the
        file, and the row and column where relevant).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        return read_star(path, pixel_size_A, project_dir, check_stacks_exist=check_stacks)
    if suffix == ".cs":
        return read_cs(path, pixel_size_A, project_dir, check_stacks_exist=check_stacks)
    if suffix in (".mrcs", ".mrc"):
        return read_mrcs_particles(path, pixel_size_A)
    supported = ", ".join(f"{s} ({d})" for s, d in SUPPORTED_SUFFIXES.items())
    kind = path.suffix or "(no suffix)"
    raise ParticleFileError(path, f"unknown particle file type {kind!r}; supported: {supported}")
