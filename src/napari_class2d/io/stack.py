"""A bare MRC image stack (``.mrcs``/``.mrc``) as a particle set without CTF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import check_stack_header, read_stack_header
from napari_class2d.io.particles import ImageSource, ParticleSet


def read_mrcs_particles(
    path: str | Path, pixel_size_A: float | None = None, *, as_stack: bool = False
) -> ParticleSet:
    """A bare image stack as a particle set without CTF.

    Parameters
    ----------
    path
        ``.mrcs`` (always a stack) or ``.mrc`` (a stack when its space group is
        0 or it holds one image; otherwise refused unless ``as_stack``).
    pixel_size_A
        Pixel size in Å. Overrides the header, whose voxel size is often a
        placeholder (1.0 or 0).
    as_stack
        Accept a ``.mrc`` whose header says volume as an image stack.

    Returns
    -------
    ParticleSet
        ``source_format="mrcs"``, ``ctf=None``, metadata with ``rlnImageName``.

    Raises
    ------
    ParticleFileError
        Bad stack (see :func:`~napari_class2d.io.mrc.check_stack_header`), or no pixel size in the
        header and none given.
    """
    path = Path(path)
    header = check_stack_header(read_stack_header(path), as_stack=as_stack)
    if pixel_size_A is not None:
        if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ParticleFileError(path, f"pixel size must be > 0 Å, got {pixel_size_A}")
        apix = float(pixel_size_A)
    elif header.voxel_size_A > 0:
        apix = header.voxel_size_A
    else:
        raise ParticleFileError(
            path, "the header has no pixel size (voxel size 0); give the pixel size in Å"
        )
    n = header.nz
    index = np.arange(n, dtype=np.int64)
    numbers = np.char.zfill((index + 1).astype(str), 6)
    names = np.char.add(np.char.add(numbers, "@"), path.name)
    metadata = pd.DataFrame({"rlnImageName": names})
    images = ImageSource([path.resolve()], np.zeros(n, dtype=np.int64), index)
    return ParticleSet(
        metadata,
        images,
        apix,
        header.nx,
        ctf=None,
        optics=None,
        optics_group=np.ones(n, dtype=np.int64),
        source_path=path,
        source_format="mrcs",
    )
