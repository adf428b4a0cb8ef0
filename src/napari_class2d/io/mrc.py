"""MRC image stacks: header checks and memory-mapped access.

Only the 1024-byte header (plus the file size) is read to validate a stack, so
a data set of any size is checked in milliseconds per file; pixel data are read
lazily through a memory map, and non-finite pixels are caught per read chunk
(see :meth:`napari_class2d.io.particles.ImageSource.read`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header

from napari_class2d.io.errors import ParticleFileError

#: MRC space group of an image stack (MRC2014); 1-230 mean a volume, 401-630 a volume stack.
IMAGE_STACK_SPACEGROUP = 0

_HEADER_BYTES = 1024
#: (MRC mode, data type, bytes per pixel) of the real-valued modes
_MODE_SIZES = (
    (0, "int8", 1),
    (1, "int16", 2),
    (2, "float32", 4),
    (6, "uint16", 2),
    (12, "float16", 2),
)


@dataclass(frozen=True)
class StackHeader:
    """What the header of an MRC file says about its pixel data.

    Attributes
    ----------
    path
        The file.
    nx, ny, nz
        Columns, rows and sections (images in a stack).
    mode
        MRC data mode (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
    dtype
        numpy dtype of the pixel data (byte order included).
    ispg
        Space group: 0 for an image stack, 1-230 for a volume.
    voxel_size_A
        Pixel size in Å along x from the header (0 when unset).
    data_offset
        Byte offset of the pixel data (header plus extended header).
    expected_size
        File size in bytes the header implies.
    file_size
        Actual file size in bytes.
    """

    path: Path
    nx: int
    ny: int
    nz: int
    mode: int
    dtype: np.dtype
    ispg: int
    voxel_size_A: float
    data_offset: int
    expected_size: int
    file_size: int

    @property
    def is_complete(self) -> bool:
        """Whether the file holds every byte the header promises."""
        return self.file_size >= self.expected_size

    @property
    def box(self) -> int:
        return self.nx

    @property
    def n_images(self) -> int:
        return self.nz

    @property
    def looks_like_volume(self) -> bool:
        """A multi-section file whose space group says volume, not image stack."""
        return self.nz > 1 and self.ispg != IMAGE_STACK_SPACEGROUP


def read_stack_header(path: str | Path) -> StackHeader:
    """Read and check the header of an MRC file; no pixel data are touched.

    Parameters
    ----------
    path
        An ``.mrcs`` or ``.mrc`` file.

    Returns
    -------
    StackHeader

    Raises
    ------
    ParticleFileError
        When the file is missing, is not readable as MRC, has an unsupported
        data mode, or is smaller than its header says (truncated).
    """
    path = Path(path)
    try:
        file_size = os.stat(path).st_size
    except FileNotFoundError:
        raise ParticleFileError(path, "image stack file not found") from None
    except OSError as err:
        raise ParticleFileError(path, f"cannot access image stack: {err}") from None
    if file_size < _HEADER_BYTES:
        raise ParticleFileError(
            path,
            f"file is {file_size} bytes, shorter than the 1024-byte MRC header "
            "(truncated or not an MRC file)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive: odd map IDs/stamps are common
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
    except Exception as err:  # mrcfile raises ValueError/OSError/struct errors
        raise ParticleFileError(path, f"not a readable MRC file: {err}") from None
    if header is None:
        raise ParticleFileError(path, "not a readable MRC file (no header)")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise ParticleFileError(
            path, f"header gives non-positive dimensions nx={nx} ny={ny} nz={nz}"
        )
    try:
        dtype = data_dtype_from_header(header)
    except ValueError:
        raise ParticleFileError(
            path,
            f"unsupported MRC data mode {int(header.mode)} "
            "(expected 0 int8, 1 int16, 2 float32, 6 uint16 or 12 float16)",
        ) from None
    if dtype.kind == "c":
        raise ParticleFileError(
            path, f"MRC data mode {int(header.mode)} is complex; expected real-valued images"
        )
    offset = _HEADER_BYTES + max(int(header.nsymbt), 0)
    expected = offset + nx * ny * nz * dtype.itemsize
    mx = int(header.mx)
    voxel = float(header.cella.x) / mx if mx > 0 else 0.0
    return StackHeader(
        path=path,
        nx=nx,
        ny=ny,
        nz=nz,
        mode=int(header.mode),
        dtype=dtype,
        ispg=int(header.ispg),
        voxel_size_A=voxel,
        data_offset=offset,
        expected_size=expected,
        file_size=file_size,
    )


def check_stack_header(header: StackHeader, *, as_stack: bool = True) -> StackHeader:
    """Refuse headers that cannot be a particle stack.

    Parameters
    ----------
    header
        From :func:`read_stack_header`.
    as_stack
        The file is known to be an image stack (referenced from a STAR or
        ``.cs`` file, or a ``.mrcs``); when ``False`` a ``.mrc`` whose space
        group says volume is refused.

    Raises
    ------
    ParticleFileError
        Truncated file, a file larger than its header says (the data mode
        disagrees with the data: read as that mode, the pixels would be
        garbage), non-square images, or a volume used as particles.
    """
    path = header.path
    if header.file_size > header.expected_size:
        pixels = header.nx * header.ny * header.nz
        fits = [
            f"mode {mode} ({name})"
            for mode, name, size in _MODE_SIZES
            if mode != header.mode and header.data_offset + pixels * size == header.file_size
        ]
        raise ParticleFileError(
            path,
            f"the header says mode {header.mode} ({header.dtype.name}): {header.nz} images of "
            f"{header.nx}x{header.ny} take {header.expected_size} bytes with the header, but "
            f"the file has {header.file_size} bytes"
            + (f", as {' or '.join(fits)} would" if fits else "")
            + "; the header does not describe the data, so it is not read",
        )
    if not header.is_complete:
        raise ParticleFileError(
            path,
            f"file is truncated: header says {header.nz} images of "
            f"{header.nx}x{header.ny} {header.dtype.name} "
            f"({header.expected_size} bytes with header) but the file has "
            f"{header.file_size} bytes",
        )
    if header.nx != header.ny:
        raise ParticleFileError(
            path, f"images are {header.nx}x{header.ny} pixels; expected square images"
        )
    if not as_stack and header.looks_like_volume and path.suffix.lower() != ".mrcs":
        raise ParticleFileError(
            path,
            f"this is a 3D map (space group {header.ispg}, {header.nx}x{header.ny}x"
            f"{header.nz}), not an image stack; rename it to .mrcs or pass "
            "as_stack=True if it really holds particle images",
        )
    return header


def open_stack(path: str | Path, *, as_stack: bool = True) -> np.ndarray:
    """Memory-map an MRC image stack as an ``(n, box, box)`` array view.

    Parameters
    ----------
    path
        ``.mrcs`` or ``.mrc`` file.
    as_stack
        Treat a multi-section ``.mrc`` as an image stack even when its space
        group says volume (RELION and cryoSPARC address such files by image
        index). With ``False`` such a file is refused as a 3D map.

    Returns
    -------
    numpy.ndarray
        A read-only memory map of shape ``(n, box, box)`` in the file's data
        type; nothing is read until it is indexed.

    Raises
    ------
    ParticleFileError
        Missing, truncated, non-square, unsupported mode, or a volume.
    """
    header = check_stack_header(read_stack_header(path), as_stack=as_stack)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(header.path, mode="r", permissive=True) as mrc:
                data = mrc.data  # stays valid after close: numpy keeps the mapping
    except Exception as err:
        raise ParticleFileError(header.path, f"cannot memory-map MRC data: {err}") from None
    if data is None:
        raise ParticleFileError(header.path, "mrcfile could not map the data block")
    return data.reshape(header.nz, header.ny, header.nx)


def first_nonfinite(block: np.ndarray) -> int | None:
    """Index of the first image in ``(n, h, w)`` ``block`` with NaN/inf pixels."""
    if block.dtype.kind != "f" or block.size == 0:
        return None
    finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if finite.all():
        return None
    return int(np.argmin(finite))
