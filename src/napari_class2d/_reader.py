"""napari readers: particle stacks (``.mrcs``/``.mrc``) and particle files (``.star``/``.cs``).

Both readers are lazy: the layer data is a dask array over memory-mapped stacks,
so a 100 GB stack opens at once and only the images on screen are read.
A STAR file that is not a particle file (e.g. a ``run_model.star``) is refused
(``None``) so napari can try other readers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_class2d.io.readers import read_particles

#: layer metadata keys the plugin's widgets look for
META_SOURCE = "napari_class2d_source_path"
META_PARTICLES = "napari_class2d_particles"
META_PIXEL_SIZE = "napari_class2d_pixel_size_A"

#: images per dask chunk (a 256-pixel box: 64 images = 16 MiB)
CHUNK_IMAGES = 64
#: images read to set the initial contrast limits (never the whole stack)
CONTRAST_SAMPLE = 16


def _single_path(path):
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


def is_particle_star(path: str | Path, max_bytes: int = 4 << 20) -> bool:
    """Whether a STAR file's header names particle images (``_rlnImageName``).

    Only the first ``max_bytes`` are scanned, so a million-particle file is not read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(max_bytes)
    except OSError:
        return False
    return "_rlnImageName" in head


def is_particle_cs(path: str | Path) -> bool:
    """Whether a cryoSPARC ``.cs`` file has particle image fields (``blob/path``)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    names = getattr(arr.dtype, "names", None) or ()
    return "blob/path" in names


def get_reader(path):
    """npe2 reader hook: a reader function for a supported file, else ``None``."""
    path = _single_path(path)
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix in (".mrcs", ".mrc"):
        return read_stack
    if suffix == ".star" and is_particle_star(path):
        return read_particle_file
    if suffix == ".cs" and is_particle_cs(path):
        return read_particle_file
    return None


def _contrast_limits(sample: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class _ParticleImages:
    """Array-like ``(N, box, box)`` float32 view of a ParticleSet's images (for dask)."""

    def __init__(self, particles):
        self.particles = particles
        n, b = particles.n_particles, particles.box
        self.shape = (n, b, b)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        idx = np.arange(self.shape[0])[first]
        images = self.particles.read_images(np.atleast_1d(idx))
        if np.ndim(idx) == 0:
            return images[0][rest]
        return images[(slice(None), *rest)]


class _MappedStack:
    """Array-like over a memory map: dask copies plain ndarrays (memmaps too) eagerly."""

    def __init__(self, data: np.ndarray):
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim

    def __getitem__(self, key):
        return np.array(self._data[key])


def particle_images_dask(particles, chunk_images: int = CHUNK_IMAGES):
    """A lazy dask array ``(N, box, box)`` over ``particles.read_images``."""
    import dask.array as da

    lazy = _ParticleImages(particles)
    return da.from_array(
        lazy,
        chunks=(chunk_images, lazy.shape[1], lazy.shape[2]),
        name=f"napari-class2d-particles-{id(particles):x}",
        meta=np.empty((0, 0, 0), dtype=np.float32),
        asarray=True,
        fancy=False,
    )


def read_stack(path) -> list[tuple]:
    """Open an ``.mrcs``/``.mrc`` stack as a lazy image layer (memory mapped)."""
    import dask.array as da
    import mrcfile

    path = _single_path(path)
    mrc = mrcfile.mmap(path, mode="r", permissive=True)
    if mrc.data is None:
        raise ValueError(f"{path}: not a readable MRC file (no data block)")
    data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
    apix = float(mrc.voxel_size.x) or 1.0
    sample = np.asarray(data[: min(CONTRAST_SAMPLE, len(data))], dtype=np.float32)
    lazy = da.from_array(
        _MappedStack(data),
        chunks=(min(CHUNK_IMAGES, len(data)), data.shape[1], data.shape[2]),
        name=f"napari-class2d-mrc-{Path(path).name}-{id(mrc):x}",
        meta=np.empty((0, 0, 0), dtype=data.dtype),
        asarray=True,
        fancy=False,
    )
    meta = {
        "name": Path(path).stem,
        "contrast_limits": _contrast_limits(sample),
        "multiscale": False,
        "metadata": {META_SOURCE: str(path), META_PIXEL_SIZE: apix, "_mrcfile": mrc},
    }
    return [(lazy, meta, "image")]


def read_particle_file(path) -> list[tuple]:
    """Open a particle ``.star``/``.cs`` file as a lazy image layer of its particles.

    The layer metadata carries the source path and the :class:`ParticleSet`
    (keys :data:`META_SOURCE`, :data:`META_PARTICLES`) for the plugin's widgets.
    """
    path = _single_path(path)
    particles = read_particles(path)
    data = particle_images_dask(particles)
    sample = particles.read_images(np.arange(min(CONTRAST_SAMPLE, particles.n_particles)))
    meta = {
        "name": Path(path).stem,
        "contrast_limits": _contrast_limits(sample),
        "multiscale": False,
        "metadata": {
            META_SOURCE: str(path),
            META_PARTICLES: particles,
            META_PIXEL_SIZE: float(particles.pixel_size_A[0]) if len(particles) else 1.0,
        },
    }
    return [(data, meta, "image")]
