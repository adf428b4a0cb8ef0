"""The particle pool: preprocessed particles cached at the working box.

Each particle is read once: background-normalised, softly windowed, Fourier
cropped to the working box and stored as float16 kept coefficients (real and
imaginary planes) with its CTF parameters. Iterations never touch the original
stacks again. The pool grows (streaming) by appending blocks; with a cache
folder each block is a memory-mapped ``.npy`` file, so a data set larger than
RAM runs from disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from napari_class2d.engine.config import ResolvedParams
from napari_class2d.engine.ctf import CTF_COLUMNS, ctf_values
from napari_class2d.engine.fourier import FourierGrid, soft_circle
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import ParticleSet

#: a particle without CTF (stack-only input, or CTF correction off) gets these
NO_CTF = np.array([0, 0, 0, 300, 0, 1.0, 0, 0], dtype=np.float32)


class ParticlePool:
    """Preprocessed particles, addressable by a pool index ``0..n-1``.

    Parameters
    ----------
    params
        Resolved job values (box, working box, diameters in Å).
    grid
        Kept frequencies at the working box.
    cache_dir
        Folder for memory-mapped blocks; ``None`` keeps blocks in memory.
    seed
        Seeds the half-set assignment (for per-class FRC resolution).
    chunk_size
        Particles preprocessed at a time (bounds memory).
    """

    def __init__(
        self,
        params: ResolvedParams,
        grid: FourierGrid,
        cache_dir: Path | None = None,
        seed: int = 0,
        chunk_size: int = 512,
    ):
        self.params = params
        self.grid = grid
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.chunk_size = chunk_size
        self.sets: list[ParticleSet] = []
        self._coeffs: list[np.ndarray] = []  # (n, 2, F) float16 per block
        self._ctf: list[np.ndarray] = []  # (n, 8) float32 per block
        self._ctf_values: list[np.ndarray] = []  # (n, F) float16 per block (CTF at kept freqs)
        self._starts = [0]
        self.half = np.zeros(0, dtype=np.int64)
        self.has_ctf = np.zeros(0, dtype=bool)
        d0 = params.box
        radius_px = 0.5 * params.particle_diameter_A / params.pixel_size_A
        c = np.arange(d0) - d0 // 2
        r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
        self._background = torch.from_numpy(r > min(radius_px, 0.95 * d0 / 2))
        self._window = particle_window(params)
        self._full_grid = FourierGrid.create(d0)
        # kept coefficients of the working box, located in the original box's list
        lookup = {
            (int(y), int(x)): i
            for i, (y, x) in enumerate(
                zip(self._full_grid.ky.tolist(), self._full_grid.kx.tolist(), strict=True)
            )
        }
        self._crop_index = torch.tensor(
            [
                lookup[(int(y), int(x))]
                for y, x in zip(grid.ky.tolist(), grid.kx.tolist(), strict=True)
            ],
            dtype=torch.long,
        )
        self._scale = grid.box / d0

    @property
    def independent_fraction(self) -> float:
        """Share of a particle's Fourier coefficients that are independent measurements.

        Every particle is multiplied by the same window (:func:`particle_window`), which
        correlates neighbouring coefficients: a window covering a fraction ``a`` of the
        box leaves about ``a`` of them independent (``Σ W² / D²``), while the Gaussian
        likelihood counts every coefficient as one. Posteriors computed without this
        are ``1/a`` times too confident (about 3x with a zero mask at the particle
        diameter), as if the noise model were ``a`` times too small.
        """
        return float((self._window**2).mean())

    # -- size -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.n

    # -- adding ---------------------------------------------------------------------
    def add(self, particles: ParticleSet) -> np.ndarray:
        """Preprocess and append ``particles``; return their pool indices."""
        p = self.params
        if particles.box != p.box:
            raise ParticleFileError(
                particles.source_path,
                f"box {particles.box} px differs from the job's box {p.box} px",
            )
        apix = np.unique(np.round(particles.pixel_size_A, 4))
        if np.any(np.abs(apix - p.pixel_size_A) > 0.01 * p.pixel_size_A):
            raise ParticleFileError(
                particles.source_path,
                f"pixel size(s) {apix.tolist()} Å differ from the job's {p.pixel_size_A} Å; "
                "re-extract the particles at one pixel size",
            )
        n = particles.n_particles
        coeffs = self._new_block(n, "block", (2, self.grid.n))
        ctf = self._ctf_array(particles)
        ctf_vals = self._new_block(n, "ctf", (self.grid.n,))
        for start in range(0, n, self.chunk_size):  # CTF once per particle, cached
            sel = slice(start, min(start + self.chunk_size, n))
            vals = (
                ctf_values(torch.from_numpy(ctf[sel]), self.grid, p.working_pixel_size_A)
                if particles.has_ctf
                else torch.ones((sel.stop - sel.start, self.grid.n))
            )
            ctf_vals[sel] = vals.to(torch.float16).numpy()
        for idx, images in particles.chunks(self.chunk_size):
            x = torch.from_numpy(images)
            if not torch.isfinite(x).all():
                bad = int(idx[torch.nonzero(~torch.isfinite(x).flatten(1).all(1))[0, 0]])
                raise ParticleFileError(
                    particles.source_path, "image holds NaN or infinite values", row=bad
                )
            coeffs[idx[0] : idx[-1] + 1] = self._preprocess(x)
        if self.cache_dir is not None:
            coeffs.flush()
            ctf_vals.flush()
        self.sets.append(particles)
        self._coeffs.append(coeffs)
        self._ctf.append(ctf)
        self._ctf_values.append(ctf_vals)
        self._starts.append(self.n + n)
        rng = np.random.default_rng([self.seed, len(self.sets)])
        self.half = np.concatenate([self.half, rng.integers(0, 2, n)])
        self.has_ctf = np.concatenate([self.has_ctf, np.full(n, particles.has_ctf)])
        return np.arange(self.n - n, self.n)

    def _new_block(self, n: int, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        shape = (n,) + shape
        if self.cache_dir is None:
            return np.empty(shape, dtype=np.float16)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{kind}_{len(self._coeffs):05d}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

    def _preprocess(self, x: torch.Tensor) -> np.ndarray:
        bg = x[:, self._background]
        mean = bg.mean(1)
        std = bg.std(1).clamp(min=1e-6)
        x = (x - mean[:, None, None]) / std[:, None, None] * self._window
        c = self._full_grid.forward(x)[:, self._crop_index] * self._scale
        return torch.stack((c.real, c.imag), 1).to(torch.float16).numpy()

    @staticmethod
    def _ctf_array(particles: ParticleSet) -> np.ndarray:
        if particles.ctf is None:
            return np.tile(NO_CTF, (particles.n_particles, 1))
        cols = [np.asarray(getattr(particles.ctf, c), dtype=np.float32) for c in CTF_COLUMNS]
        return np.stack(cols, 1)

    def reopen(self, sets: list[ParticleSet], half: np.ndarray) -> None:
        """Re-attach the cached blocks of ``sets`` (a resumed job) without re-reading stacks."""
        for i, particles in enumerate(sets):
            self._coeffs.append(np.load(self.cache_dir / f"block_{i:05d}.npy", mmap_mode="r"))
            self._ctf_values.append(np.load(self.cache_dir / f"ctf_{i:05d}.npy", mmap_mode="r"))
            self._ctf.append(self._ctf_array(particles))
            self.sets.append(particles)
            self._starts.append(self.n + particles.n_particles)
            self.has_ctf = np.concatenate(
                [self.has_ctf, np.full(particles.n_particles, particles.has_ctf)]
            )
        self.half = np.asarray(half)

    # -- reading --------------------------------------------------------------------
    def get(
        self, indices: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Particles at ``indices``: coefficients (complex64 ``(B, F)``), CTF values at the
        kept frequencies (``(B, F)``) and CTF parameters (``(B, 8)``)."""
        indices = np.asarray(indices, dtype=np.int64)
        coeffs = np.empty((len(indices), 2, self.grid.n), dtype=np.float16)
        ctf_vals = np.empty((len(indices), self.grid.n), dtype=np.float16)
        params = np.empty((len(indices), len(CTF_COLUMNS)), dtype=np.float32)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        for b in np.unique(which):  # loop over cache blocks, not particles
            sel = np.nonzero(which == b)[0]
            local = indices[sel] - self._starts[b]
            coeffs[sel] = self._coeffs[b][local]
            ctf_vals[sel] = self._ctf_values[b][local]
            params[sel] = self._ctf[b][local]
        t = torch.from_numpy(coeffs.astype(np.float32)).to(device)
        return (
            torch.complex(t[:, 0], t[:, 1]),
            torch.from_numpy(ctf_vals.astype(np.float32)).to(device),
            torch.from_numpy(params).to(device),
        )

    def chunk_size_for(self, bytes_per_particle: float, budget_GB: float) -> int:
        """Particles per chunk so that ``bytes_per_particle`` each fit the budget (GiB)."""
        return max(1, min(4096, int(budget_GB * 2**30 / max(bytes_per_particle, 1.0))))


def particle_window(params: ResolvedParams) -> torch.Tensor:
    """``(D, D)`` real-space window every particle is multiplied by before its transform.

    A soft edge at the box border (0.85-0.99 of the box radius) keeps the transform
    free of edge artefacts; with ``mask_particles_with_zeros`` the particle is also
    multiplied by the soft circular mask of the class averages (inner to outer mask
    diameter), so only what lies inside the particle's circle is aligned and averaged.
    """
    d0 = params.box
    window = soft_circle(d0, 0.85 * d0 / 2, 0.99 * d0 / 2)
    if params.mask_particles_with_zeros:
        inner = 0.5 * params.mask_inner_diameter_A / params.pixel_size_A
        outer = 0.5 * params.mask_outer_diameter_A / params.pixel_size_A
        window = window * soft_circle(d0, inner, outer)
    return window


def working_grid(params: ResolvedParams) -> FourierGrid:
    """The kept frequencies of the working box."""
    return FourierGrid.create(params.working_box)
