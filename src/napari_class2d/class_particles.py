"""A class's particles, aligned to its average and sorted by probability, read a page at a
time; and where they sit on their micrographs. No Qt.

The pose convention is RELION's (``docs/simulation.md``): with ``x = (column - D//2,
row - D//2)`` in pixels, ``psi = rlnAnglePsi`` and ``t = -(rlnOriginXAngst,
rlnOriginYAngst) / pixel size``, a particle is its class average turned and shifted,

    particle(x) = average(R(psi) @ (x - t)),   R(psi) = [[cos psi, -sin psi],
                                                         [sin psi,  cos psi]]

so the particle aligned to the average is ``aligned(y) = particle(R(-psi) @ y + t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import mrcfile
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.image import imread as plt_imread

from napari_class2d.io.paths import candidate_paths, project_folders, resolve_first
from napari_class2d.selection import ClassificationResult

#: particles per page (a tiled mosaic of PAGE_COLUMNS columns)
PAGE_SIZE = 48
PAGE_COLUMNS = 8
#: empty pixels between the particles of a page
PAGE_GAP = 2


def align_particles(
    images: np.ndarray,
    psi_deg: np.ndarray,
    origin_A: np.ndarray,
    pixel_size_A: float | np.ndarray,
) -> np.ndarray:
    """Particles turned and shifted onto their class average (bicubic interpolation).

    Parameters
    ----------
    images
        ``(n, D, D)`` particle images.
    psi_deg
        ``(n,)`` ``rlnAnglePsi``, degrees.
    origin_A
        ``(n, 2)`` ``rlnOriginXAngst, rlnOriginYAngst``, Å.
    pixel_size_A
        Pixel size of the images, Å (a number or ``(n,)``).

    Returns
    -------
    np.ndarray
        ``(n, D, D)`` float32: ``aligned(y) = particle(R(-psi) @ y + t)``,
        ``t = -origin / pixel size``; zero outside the particle's box.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    n, box = x.shape[0], x.shape[-1]
    if n == 0:
        return np.zeros((0, box, box), np.float32)
    psi = torch.deg2rad(torch.as_tensor(np.array(psi_deg, dtype=np.float64)))
    apix = torch.as_tensor(np.broadcast_to(np.asarray(pixel_size_A, np.float64), (n,)).copy())
    t = -torch.as_tensor(np.array(origin_A, dtype=np.float64)) / apix[:, None]
    r = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
    # R(-psi) @ (x, y) = (c x + s y, -s x + c y)
    sx = c * xx + s * yy + t[:, 0, None, None] + box // 2
    sy = -s * xx + c * yy + t[:, 1, None, None] + box // 2
    grid = torch.stack((sx, sy), dim=-1) * (2.0 / (box - 1)) - 1.0  # align_corners=True
    out = F.grid_sample(
        x[:, None], grid.float(), mode="bicubic", padding_mode="zeros", align_corners=True
    )
    return out[:, 0].numpy()


def lowpass(images: np.ndarray, pixel_size_A: float, resolution_A: float) -> np.ndarray:
    """Images with a raised-cosine low-pass filter at ``resolution_A`` (10 % edge)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    box = x.shape[-1]
    fy = torch.fft.fftfreq(box)
    fx = torch.fft.rfftfreq(box)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / pixel_size_A
    cut = 1.0 / resolution_A
    t = ((f - cut) / (0.1 * cut) + 0.5).clamp(0, 1)
    w = 0.5 * (1 + torch.cos(math.pi * t))
    return torch.fft.irfftn(torch.fft.rfftn(x, dim=(-2, -1)) * w, s=(box, box)).numpy()


def tile(images: np.ndarray, columns: int = PAGE_COLUMNS, rows: int | None = None) -> np.ndarray:
    """``(n, D, D)`` images tiled row by row, each scaled to zero mean and unit
    deviation; gaps and empty places at the minimum."""
    n, box = images.shape[0], images.shape[-1]
    rows = rows if rows is not None else max(1, math.ceil(n / columns))
    flat = images.reshape(n, -1)
    mean = flat.mean(axis=1)[:, None, None] if n else 0.0
    std = flat.std(axis=1)[:, None, None] if n else 1.0
    norm = (images - mean) / np.where(np.asarray(std) > 0, std, 1.0)
    fill = float(norm.min()) if n else 0.0
    step = box + PAGE_GAP
    out = np.full((rows * step - PAGE_GAP, columns * step - PAGE_GAP), fill, np.float32)
    for i in range(min(n, rows * columns)):  # one page of images, not all particles
        r, c = divmod(i, columns)
        out[r * step : r * step + box, c * step : c * step + box] = norm[i]
    return out


@dataclass
class ClassParticles:
    """The particles of one class, best first, for viewing.

    Attributes
    ----------
    result
        The classification result.
    class_number
        1-based class.
    rows
        Row numbers of the class's particles in ``result.particles``, sorted by
        ``rlnMaxValueProbDistribution`` (highest first; file order without it).
    probability
        Their ``rlnMaxValueProbDistribution`` in that order (nan without it).
    """

    result: ClassificationResult
    class_number: int
    rows: np.ndarray
    probability: np.ndarray

    @classmethod
    def of(cls, result: ClassificationResult, class_number: int) -> ClassParticles:
        """The particles of class ``class_number`` (1-based), highest probability first."""
        if not 1 <= class_number <= result.n_classes:
            raise ValueError(
                f"class {class_number} out of range: classes are 1..{result.n_classes}"
            )
        rows = np.nonzero(result.class_number == class_number)[0]
        table = result.particles
        if "rlnMaxValueProbDistribution" in table:
            p = pd.to_numeric(table["rlnMaxValueProbDistribution"], errors="coerce").to_numpy()
            p = p[rows].astype(np.float64)
            order = np.argsort(-np.nan_to_num(p, nan=-np.inf), kind="stable")
            rows, p = rows[order], p[order]
        else:
            p = np.full(len(rows), np.nan)
        return cls(result, int(class_number), rows, p)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def box(self) -> int:
        return int(self.result.particle_set.box)

    @property
    def pixel_size_A(self) -> float:
        return float(np.median(self.result.particle_set.pixel_size_A))

    def aligned(self, start: int, stop: int, lowpass_A: float | None = None) -> np.ndarray:
        """Particles ``start:stop`` (in probability order) aligned to the class average;
        low-pass filtered at ``lowpass_A`` when given. Reads only those images."""
        rows = self.rows[start:stop]
        ps = self.result.particle_set
        images = ps.read_images(rows)
        table = self.result.particles.iloc[rows]

        def column(name: str) -> np.ndarray:
            if name not in table:
                return np.zeros(len(rows))
            return pd.to_numeric(table[name], errors="coerce").fillna(0.0).to_numpy(float)

        origin = np.stack([column("rlnOriginXAngst"), column("rlnOriginYAngst")], axis=1)
        out = align_particles(images, column("rlnAnglePsi"), origin, ps.pixel_size_A[rows])
        if lowpass_A:
            out = lowpass(out, self.pixel_size_A, lowpass_A)
        return out

    def micrograph_pixel_size_A(self) -> float:
        """Pixel size of the micrographs, Å: ``rlnMicrographOriginalPixelSize`` of the
        optics table, else the particles' (coordinates are in micrograph pixels)."""
        optics = self.result.optics
        if optics is not None and "rlnMicrographOriginalPixelSize" in optics:
            value = pd.to_numeric(optics["rlnMicrographOriginalPixelSize"], errors="coerce")
            if value.notna().any() and float(value.median()) > 0:
                return float(value.median())
        return self.pixel_size_A

    # -- pages -----------------------------------------------------------------------------
    def n_pages(self, page_size: int = PAGE_SIZE) -> int:
        return max(1, math.ceil(len(self) / page_size))

    def page(
        self, i: int, page_size: int = PAGE_SIZE, columns: int = PAGE_COLUMNS, lowpass_A=None
    ) -> np.ndarray:
        """Page ``i`` as one tiled image (``page_size`` particles, ``columns`` wide)."""
        rows = math.ceil(page_size / columns)
        start = i * page_size
        images = self.aligned(start, min(start + page_size, len(self)), lowpass_A)
        if not len(images):
            images = np.zeros((0, self.box, self.box), np.float32)
        return tile(images, columns, rows)

    def pages(
        self, page_size: int = PAGE_SIZE, columns: int = PAGE_COLUMNS, lowpass_A=None
    ) -> da.Array:
        """Every page, lazily: a dask array ``(pages, H, W)`` whose page ``i`` is read and
        aligned only when it is looked at (a class of 100k particles opens at once)."""
        n = self.n_pages(page_size)
        shape = self.page_shape(page_size, columns)

        def block(block_info=None):
            i = block_info[None]["chunk-location"][0]
            return self.page(i, page_size, columns, lowpass_A)[None]

        return da.map_blocks(block, dtype=np.float32, chunks=((1,) * n, (shape[0],), (shape[1],)))

    def page_shape(self, page_size: int = PAGE_SIZE, columns: int = PAGE_COLUMNS):
        rows = math.ceil(page_size / columns)
        step = self.box + PAGE_GAP
        return rows * step - PAGE_GAP, columns * step - PAGE_GAP

    # -- micrographs -----------------------------------------------------------------------
    def micrographs(self, micrograph_dir: str | Path | None = None) -> pd.DataFrame:
        """The micrographs of the class's particles: ``micrograph`` (as in the file),
        ``n_particles``, ``path`` (the file when it is found, else ``None``), most
        particles first. Empty without ``rlnMicrographName``.

        A micrograph is looked for as its name says (relative to the particle file's
        folder, the project folders above it, the working directory), then by its file
        name in ``micrograph_dir``.
        """
        table = self.result.particles
        if "rlnMicrographName" not in table or not len(self):
            return pd.DataFrame(columns=["micrograph", "n_particles", "path"])
        names = table["rlnMicrographName"].iloc[self.rows].astype(str)
        counts = names.value_counts(sort=True)
        star = self.result.data_star
        source = self.result.particle_set.source_path
        bases = [star.parent] + ([Path(source).parent] if source is not None else [])
        paths = []
        for name in counts.index:  # one look-up per micrograph, not per particle
            tried = candidate_paths(name, bases, then=project_folders(star))
            if micrograph_dir is not None:
                tried = tried + [Path(micrograph_dir) / Path(name).name]
            paths.append(resolve_first(tried))
        return pd.DataFrame(
            {"micrograph": counts.index, "n_particles": counts.to_numpy(), "path": paths}
        )

    def positions(self, micrograph: str) -> tuple[np.ndarray, np.ndarray]:
        """``(n, 2)`` (row, column) pixel positions of the class's particles on
        ``micrograph`` (``rlnCoordinateY``, ``rlnCoordinateX``), and their probabilities."""
        table = self.result.particles.iloc[self.rows]
        if not {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= set(table.columns):
            return np.zeros((0, 2)), np.zeros(0)
        on = (table["rlnMicrographName"].astype(str) == str(micrograph)).to_numpy()
        yx = np.stack(
            [
                pd.to_numeric(table["rlnCoordinateY"], errors="coerce").to_numpy(float)[on],
                pd.to_numeric(table["rlnCoordinateX"], errors="coerce").to_numpy(float)[on],
            ],
            axis=1,
        )
        return yx, self.probability[on]

    def all_positions(self, micrograph: str) -> np.ndarray:
        """``(n, 2)`` (row, column) of every particle of the result on ``micrograph``."""
        table = self.result.particles
        if not {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= set(table.columns):
            return np.zeros((0, 2))
        on = (table["rlnMicrographName"].astype(str) == str(micrograph)).to_numpy()
        return np.stack(
            [
                pd.to_numeric(table["rlnCoordinateY"], errors="coerce").to_numpy(float)[on],
                pd.to_numeric(table["rlnCoordinateX"], errors="coerce").to_numpy(float)[on],
            ],
            axis=1,
        )


def read_micrograph(path: str | Path) -> np.ndarray:
    """A micrograph as a 2D float32 array: MRC (the first section of a stack) or an image
    file (PNG, JPEG, TIFF: grey, or the mean of its colours)."""
    path = Path(path)
    if path.suffix.lower() in (".mrc", ".mrcs", ".map", ".st"):
        with mrcfile.open(path, permissive=True) as mrc:
            data = mrc.data
            return np.array(data[0] if data.ndim == 3 else data, dtype=np.float32)
    image = np.asarray(plt_imread(path), dtype=np.float32)
    return image.mean(axis=-1) if image.ndim == 3 else image
