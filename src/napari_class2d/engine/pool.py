"""The particle pool: preprocessed particles cached at the working box.

Each particle is read once: background-normalised, softly windowed at the box edge,
Fourier cropped to the working box and stored as float16 kept coefficients (real and
imaginary planes) with its CTF parameters. Iterations never touch the original
stacks again.

The particle masks (the circular mask with ``mask_particles_with_zeros``, the
neighbour mask with ``mask_neighbours``) are applied at the pick before the transform
and cached with the particle (default). With ``masks_follow_shifts`` they are not
cached: they are applied when a chunk is read (:meth:`ParticlePool.get`), around each
particle's current centre, as RELION masks each particle after moving it by its current
offset (a mask cached at the pick moves with the particle when the search shifts it).

With ``remove_fixed_pattern`` each particle first loses the part of its
micrograph's unaligned mean box that is not round (``ParticlePool._fixed_patterns``):
particles lie at random in-plane angles, so whatever that mean holds beyond its
rotational average is fixed in the box's frame, not the particle's.

The pool grows (streaming) by appending blocks; with a cache folder each block is a
memory-mapped ``.npy`` file, so a data set larger than RAM runs from disk.

In a distributed job (:mod:`napari_class2d.engine.distributed`) a process holds only
the particles of its :class:`~napari_class2d.engine.distributed.Shard`: it reads,
preprocesses and caches those (in ``cache/rankRRR-of-WWW/``); the pool still counts
and indexes every particle of the job, and its half sets are the same as one
process's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from napari_class2d.engine.config import ResolvedParams
from napari_class2d.engine.ctf import CTF_COLUMNS, ctf_values
from napari_class2d.engine.distributed import Shard
from napari_class2d.engine.fourier import FourierGrid, soft_circle, soft_edge
from napari_class2d.engine.neighbours import (
    MAX_NEIGHBOURS,
    SAME_PARTICLE_FRACTION,
    micrograph_groups,
    neighbour_masks,
    neighbour_offsets_A,
    pick_positions_A,
)
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import ParticleSet

#: cache file names of the particles' coefficients: masked at the pick, or not masked
#: (``masks_follow_shifts``); a job resumed in the other mode preprocesses them again
CACHE_KIND = {False: "block", True: "particles"}

#: micrographs with fewer particles keep their boxes as they are: the mean of a few
#: particles is mostly their noise, which subtracting would add to all of them
MIN_PATTERN_PARTICLES = 30

#: a micrograph's pattern is kept ring by ring only as far as its power exceeds this many
#: times the noise of its estimate (1: a Wiener filter; 3: what is kept is clearly there)
PATTERN_DETECTION = 3.0

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
        Folder for memory-mapped blocks; ``None`` keeps blocks in memory. A process
        of a distributed job keeps its blocks in a sub-folder of its own.
    seed
        Seeds the half-set assignment (for per-class FRC resolution).
    chunk_size
        Particles preprocessed at a time (bounds memory).
    shard
        The particles this process holds (default: all).
    device
        Where the particles are preprocessed (Fourier transforms, CTFs): the job's
        device; the cache is on the host either way.
    """

    def __init__(
        self,
        params: ResolvedParams,
        grid: FourierGrid,
        cache_dir: Path | None = None,
        seed: int = 0,
        chunk_size: int = 512,
        shard: Shard | None = None,
        device: torch.device | str = "cpu",
    ):
        self.params = params
        self.grid = grid
        self.device = torch.device(device)
        self.shard = shard if shard is not None else Shard()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None and self.shard.folder is not None:
            self.cache_dir = self.cache_dir / self.shard.folder
        self.seed = seed
        self.chunk_size = chunk_size
        self.sets: list[ParticleSet] = []
        self._coeffs: list[np.ndarray] = []  # (n, 2, F) float16 per block
        self._ctf: list[np.ndarray] = []  # (n, 8) float32 per block
        self._ctf_values: list[np.ndarray] = []  # (n, F) float16 per block (CTF at kept freqs)
        self._rows: list[np.ndarray] = []  # per block: row of each particle in it, -1: not held
        # per block: (n, M, 2) float32 neighbour offsets in working px (None: not masked)
        self._neighbours: list[np.ndarray | None] = []
        self._fills: list[torch.Tensor] = []  # per block: the fill's radial profile
        self._fill_stack: torch.Tensor | None = None  # (blocks, R), made when first read
        self._starts = [0]
        self.half = np.zeros(0, dtype=np.int64)
        self.has_ctf = np.zeros(0, dtype=bool)
        d0 = params.box
        radius_px = 0.5 * params.particle_diameter_A / params.pixel_size_A
        c = np.arange(d0) - d0 // 2
        r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
        background = torch.from_numpy((r > min(radius_px, 0.95 * d0 / 2)).ravel())
        self._background_at = torch.nonzero(background).flatten().to(self.device)
        self._window = particle_window(params).to(self.device)
        self._edge = box_edge_window(d0).to(self.device)
        self._full_grid = FourierGrid.create(d0, self.device)
        self._ctf_grid = FourierGrid.create(grid.box, self.device)
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
            device=self.device,
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

    @property
    def has_bfactor(self) -> bool:
        """Whether any particle held has a CTF B-factor (read on the host: no device sync)."""
        column = CTF_COLUMNS.index("bfactor_A2")
        return any(bool(np.any(c[:, column] != 0)) for c in self._ctf)

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
        held = self.shard.mine(np.arange(self.n, self.n + n)) - self.n
        coeffs, ctf_vals = self._preprocess_block(particles, held, len(self._coeffs))
        self._add_masks(particles, held, coeffs)
        self.sets.append(particles)
        self._coeffs.append(coeffs)
        self._ctf.append(self._ctf_array(particles))
        self._ctf_values.append(ctf_vals)
        self._rows.append(_row_index(n, held))
        self._starts.append(self.n + n)
        rng = np.random.default_rng([self.seed, len(self.sets)])
        self.half = np.concatenate([self.half, rng.integers(0, 2, n)])
        self.has_ctf = np.concatenate([self.has_ctf, np.full(n, particles.has_ctf)])
        return np.arange(self.n - n, self.n)

    @property
    def n_held(self) -> int:
        """Particles this process holds (all of them, outside a distributed job)."""
        return sum(len(c) for c in self._coeffs)

    def _preprocess_block(
        self, particles: ParticleSet, held: np.ndarray, block: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cache block ``block``: the particles ``held`` (rows of ``particles``),
        preprocessed chunk by chunk (never all images in memory)."""
        p = self.params
        coeffs = self._new_block(len(held), self._cache_kind, (2, self.grid.n), block)
        ctf = self._ctf_array(particles)
        ctf_vals = self._new_block(len(held), "ctf", (self.grid.n,), block)
        follow = p.masks_follow_shifts
        neighbours = None if follow else self._neighbour_offsets_px(particles, p.pixel_size_A)
        fill = None
        pattern_of, patterns = self._fixed_patterns(particles)
        for start in range(0, len(held), self.chunk_size):  # CTF once per particle, cached
            sel = slice(start, min(start + self.chunk_size, len(held)))
            if particles.has_ctf:
                rows = torch.from_numpy(ctf[held[sel]]).to(self.device)
                vals = ctf_values(rows, self._ctf_grid, p.working_pixel_size_A)
            else:
                vals = torch.ones((sel.stop - sel.start, self.grid.n))
            ctf_vals[sel] = vals.to(torch.float16).cpu().numpy()
        for start in range(0, len(held), self.chunk_size):
            sel = slice(start, min(start + self.chunk_size, len(held)))
            idx = held[sel]
            x = torch.from_numpy(particles.read_images(idx))
            if not torch.isfinite(x).all():
                bad = int(idx[torch.nonzero(~torch.isfinite(x).flatten(1).all(1))[0, 0]])
                raise ParticleFileError(
                    particles.source_path, "image holds NaN or infinite values", row=bad
                )
            if patterns is not None:
                x = self._pattern_removed(x.to(self.device), pattern_of[idx], patterns)
            x = self._normalised(x)
            if follow:  # masked when read (get), around the particle's current centre
                coeffs[sel] = self._preprocess(x)
                continue
            near = None
            if neighbours is not None:
                near = torch.from_numpy(neighbours[idx])
                if fill is None:  # from the block's first chunk, already read
                    fill = self._fill_image(x)
            coeffs[sel] = self._preprocess_at_pick(x, near, fill)
        if self.cache_dir is not None:
            coeffs.flush()
            ctf_vals.flush()
        return coeffs, ctf_vals

    def _new_block(self, n: int, kind: str, shape: tuple[int, ...], block: int) -> np.ndarray:
        shape = (n,) + shape
        if self.cache_dir is None or n == 0:  # (an empty file cannot be memory-mapped)
            return np.empty(shape, dtype=np.float16)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{kind}_{block:05d}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

    def _neighbour_offsets_px(
        self, particles: ParticleSet, pixel_size_A: float
    ) -> np.ndarray | None:
        """``(N, M, 2)`` offsets (pixels of ``pixel_size_A``) of the neighbouring picks within
        reach of each particle's window, or ``None`` (neighbours not masked, or no pick
        coordinates)."""
        p = self.params
        if not p.mask_neighbours:
            return None
        picks = pick_positions_A(particles)
        if picks is None:
            return None
        radius = (
            0.5 * p.mask_outer_diameter_A
            if p.mask_particles_with_zeros
            else 0.99 * 0.5 * p.box * p.pixel_size_A
        )
        offsets = neighbour_offsets_A(
            *picks,
            # a mask that follows the particle's shift: neighbours a shift farther away too
            reach_A=2.0 * (radius + (p.max_shift_A if p.masks_follow_shifts else 0.0))
            + self._neighbour_edge_px * p.pixel_size_A,
            same_A=SAME_PARTICLE_FRACTION * p.particle_diameter_A,
        )
        return offsets / np.float32(pixel_size_A)

    @property
    def _neighbour_edge_px(self) -> float:
        """Width of a neighbour mask's edge in pixels of the original box: that of the
        circular mask (at least 2 px)."""
        p = self.params
        return max(0.5 * (p.mask_outer_diameter_A - p.mask_inner_diameter_A) / p.pixel_size_A, 2.0)

    @property
    def _cache_kind(self) -> str:
        return CACHE_KIND[self.params.masks_follow_shifts]

    def _add_masks(self, particles: ParticleSet, held: np.ndarray, coeffs: np.ndarray) -> None:
        """Record a new block's neighbour offsets and the radial profile of its fill (masks
        applied when particles are read: ``masks_follow_shifts``)."""
        if not self.params.masks_follow_shifts:
            self._neighbours.append(None)
            self._fills.append(torch.zeros(1, device=self.device))
            return
        near = self._neighbour_offsets_px(particles, self.params.working_pixel_size_A)
        if near is not None:  # the slots empty for every particle are not kept
            near = near[held][:, : _used_slots(near[held])]
        self._neighbours.append(near if near is not None and near.shape[1] else None)
        self._fills.append(self._fill_profile(coeffs[: self.chunk_size]))
        self._fill_stack = None

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Images minus their background's mean, over its standard deviation."""
        x = x.to(self.device)
        bg = x.flatten(1)[:, self._background_at]
        mean = bg.mean(1)
        std = bg.std(1).clamp(min=1e-6)
        return (x - mean[:, None, None]) / std[:, None, None]

    def _fill_profile(self, coeffs: np.ndarray) -> torch.Tensor:
        """What a particle's masked-out neighbour side becomes: the rotational average of
        the mean of the cached particles ``coeffs`` (the block's first chunk), as a profile
        over whole working pixels of radius, ``(R,)``.

        Filling with zeros would leave every class darker on the side its members'
        neighbours were cut from, and the particles would then be turned to put their cut
        there (alignment on the cut instead of on the neighbour). The rotational average
        is what that side holds on average, whatever the particle's orientation.
        """
        if len(coeffs) == 0:
            return torch.zeros(self.grid.box, device=self.device)
        t = torch.from_numpy(np.asarray(coeffs)).to(self.device).float()
        return _radial_profile(self.grid.inverse(torch.complex(t[:, 0], t[:, 1])).mean(0))[0]

    def _fill_image(self, x: torch.Tensor) -> torch.Tensor:
        """The fill of a particle masked at its pick: the rotational average of the mean of
        the normalised images ``x`` (the block's first chunk; ``(D, D)``); see
        :meth:`_fill_profile`."""
        return _round_part(x.mean(0))

    def _fixed_patterns(self, particles: ParticleSet) -> tuple[np.ndarray, torch.Tensor | None]:
        """What is fixed in the box's frame, per micrograph (``remove_fixed_pattern``).

        Every particle of the set is read once (all of them, also in a distributed job,
        so every process subtracts the same patterns) and averaged per micrograph as cut,
        in the stack's units: a fixed pattern adds the same values to every box, so it
        is subtracted before the normalisation scales each box by its own background. A
        micrograph's pattern is that mean minus its rotational average (with a CTF:
        minus the round mean the micrograph's CTF modulates, :meth:`_ctf_round_part`),
        shrunk ring by ring in Fourier space by :data:`PATTERN_DETECTION` times the noise
        of a mean of that many boxes. Memory: one
        ``(D, D)`` float64 sum per micrograph of the block while it is read (1,000
        micrographs at box 256: 524 MB), then one float32 pattern; not per particle.

        Returns the pattern row of each particle (``(N,)``; the last row is zeros: no
        micrograph, or fewer than :data:`MIN_PATTERN_PARTICLES`) and the
        ``(M + 1, D, D)`` patterns, or ``None`` when nothing is subtracted.
        """
        n = particles.n_particles
        group = micrograph_groups(particles) if self.params.remove_fixed_pattern else None
        if group is None or n == 0:
            return np.zeros(n, np.int64), None
        d0, m = self.params.box, int(group.max()) + 1
        counts = np.bincount(group, minlength=m + 1).astype(np.float64)
        enough = counts >= MIN_PATTERN_PARTICLES
        if not enough.any():  # no micrograph has enough particles: nothing to read
            return np.zeros(n, np.int64), None
        g = self._full_grid
        sums = torch.zeros((m + 1, d0, d0), dtype=torch.float64)  # on the host
        power = torch.zeros((m + 1, g.n_rings), dtype=torch.float64)
        ctf_rows = self._ctf_array(particles) if particles.has_ctf else None
        ctf_sums = torch.zeros((m + 1, g.n), dtype=torch.float64) if particles.has_ctf else None
        for start in range(0, n, self.chunk_size):
            rows = np.arange(start, min(start + self.chunk_size, n))
            x = torch.from_numpy(particles.read_images(rows))
            at = torch.from_numpy(group[rows])
            sums.index_add_(0, at, x.double())
            ring_power = g.ring_average(g.forward(x.to(self.device).float()).abs() ** 2)
            power.index_add_(0, at, ring_power.double().cpu())
            if ctf_sums is not None:
                c = ctf_values(
                    torch.from_numpy(ctf_rows[rows]).to(self.device), g, self.params.pixel_size_A
                )
                ctf_sums.index_add_(0, at, c.double().cpu())
        per = torch.from_numpy(counts).clamp(min=1)
        means = (sums / per[:, None, None]).float()
        del sums
        mean_coeffs = g.forward(means.to(self.device))
        if ctf_sums is None:
            round_means = torch.stack([_round_part(mean) for mean in means]).to(self.device)
            coeffs = g.forward(means.to(self.device) - round_means)
        else:  # what the micrograph's CTF makes of a round mean is not a pattern either
            ctf = (ctf_sums / per[:, None]).float().to(self.device)
            coeffs = mean_coeffs - self._ctf_round_part(mean_coeffs, ctf)
        # each estimate is shrunk ring by ring by its own noise (the boxes' spread over
        # the number of boxes) times PATTERN_DETECTION: a ring where the estimate is not
        # clearly above its noise keeps nothing, so a micrograph without a pattern has
        # nothing subtracted (its particles stay exactly as they were)
        found = g.ring_average(coeffs.abs() ** 2).double().cpu()
        spread = (
            power / per[:, None] - g.ring_average(mean_coeffs.abs() ** 2).double().cpu()
        ).clamp(min=0)
        noise = PATTERN_DETECTION * spread / per[:, None]
        gain = (1.0 - noise / found.clamp(min=1e-30)).clamp(0.0, 1.0)
        patterns = g.inverse(coeffs * gain.float().to(self.device)[:, g.ring])
        patterns[torch.from_numpy(~enough).to(self.device)] = 0.0
        return np.where(enough[group], group, m), patterns

    def _ctf_round_part(self, coeffs: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
        """What is round in mean boxes ``(M, F)`` (coefficients) once their micrograph's
        mean CTF ``(M, F)`` is accounted for: ``CTF(f)·A(|f|) + B(|f|)``, ``A`` and ``B``
        fitted ring by ring (least squares; ``B``: what the CTF does not modulate, such
        as the background level each box was cut with). An astigmatic CTF turns the
        particles' round mean into an elliptical one, which is signal, not a pattern of
        the box."""
        g = self._full_grid
        m = coeffs.real
        cc, c1 = g.ring_average(ctf * ctf), g.ring_average(ctf)
        cm, m1 = g.ring_average(ctf * m), g.ring_average(m)
        det = (cc - c1 * c1).clamp(min=1e-12)
        a, b = (cm - c1 * m1) / det, (cc * m1 - c1 * cm) / det
        return ctf * a[:, g.ring] + b[:, g.ring]

    def _pattern_removed(
        self, x: torch.Tensor, rows: np.ndarray, patterns: torch.Tensor
    ) -> torch.Tensor:
        """Images ``x`` as read less their micrograph's pattern (``rows`` into
        ``patterns``; the last row: none); images without a pattern as they are."""
        has = torch.from_numpy(rows < len(patterns) - 1).to(self.device)
        removed = x - patterns[torch.from_numpy(rows).to(self.device)]
        return torch.where(has[:, None, None], removed, x)

    def _preprocess(self, x: torch.Tensor) -> np.ndarray:
        """Normalised ``x``: windowed at the box edge, Fourier cropped (masked when read)."""
        return self._cropped(x * self._edge)

    def _preprocess_at_pick(
        self,
        x: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        fill: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Normalised ``x``: neighbours masked, windowed by :func:`particle_window` at the
        pick, Fourier cropped."""
        if neighbours is not None:
            keep = neighbour_masks(
                neighbours.to(self.device), self.params.box, self._neighbour_edge_px
            )
            x = keep * x + (1.0 - keep) * fill
        return self._cropped(x * self._window)

    def _cropped(self, x: torch.Tensor) -> np.ndarray:
        c = self._full_grid.forward(x)[:, self._crop_index] * self._scale
        return torch.stack((c.real, c.imag), 1).to(torch.float16).cpu().numpy()

    @property
    def masks_on_read(self) -> bool:
        """Whether :meth:`get` masks the particles (``masks_follow_shifts``, with a circular
        mask or neighbours)."""
        return self.params.masks_follow_shifts and (
            self.params.mask_particles_with_zeros or any(m is not None for m in self._neighbours)
        )

    def _masked(
        self,
        x: torch.Tensor,
        centres: torch.Tensor,
        neighbours: torch.Tensor | None,
        fills: torch.Tensor,
    ) -> torch.Tensor:
        """Particles ``x`` ``(B, F)`` masked around their centres ``(B, 2)`` (x, y working
        px): neighbours ``(B, M, 2)`` (working px from the pick, NaN: none) cut away and
        replaced by the fill (radial profiles ``(B, R)``), then the circular mask with
        ``mask_particles_with_zeros``. One inverse and one forward transform per particle
        at the working box."""
        p, d = self.params, self.grid.box
        img = self.grid.inverse(x)
        c = torch.arange(d, device=x.device, dtype=torch.float32) - d // 2
        dx = c[None, None, :] - centres[:, 0, None, None]
        dy = c[None, :, None] - centres[:, 1, None, None]
        r = torch.sqrt(dx**2 + dy**2)
        if neighbours is not None:
            edge = self._neighbour_edge_px * d / p.box
            keep = neighbour_masks(neighbours, d, edge, centres)
            at = r.round().long().clamp(max=fills.shape[1] - 1).flatten(1)
            fill = fills.gather(1, at).reshape(img.shape)
            img = keep * img + (1.0 - keep) * fill
        if p.mask_particles_with_zeros:
            scale = 1.0 / p.working_pixel_size_A
            img = img * soft_edge(
                r, 0.5 * p.mask_inner_diameter_A * scale, 0.5 * p.mask_outer_diameter_A * scale
            )
        return self.grid.forward(img)

    @staticmethod
    def _ctf_array(particles: ParticleSet) -> np.ndarray:
        if particles.ctf is None:
            return np.tile(NO_CTF, (particles.n_particles, 1))
        cols = [np.asarray(getattr(particles.ctf, c), dtype=np.float32) for c in CTF_COLUMNS]
        return np.stack(cols, 1)

    def reopen(self, sets: list[ParticleSet], half: np.ndarray) -> int:
        """Re-attach the cached blocks of ``sets`` (a resumed job) without re-reading stacks.

        A block whose cache is missing or was written for another number of processes
        (a job resumed with more or fewer of them) is preprocessed again from the stacks.
        Returns the number of blocks preprocessed again.
        """
        rebuilt = 0
        for i, particles in enumerate(sets):
            n = particles.n_particles
            held = self.shard.mine(np.arange(self.n, self.n + n)) - self.n
            cached = self._open_cached(i, len(held))
            if cached is None:
                cached = self._preprocess_block(particles, held, i)
                rebuilt += 1
            self._coeffs.append(cached[0])
            self._ctf_values.append(cached[1])
            self._ctf.append(self._ctf_array(particles))
            self._rows.append(_row_index(n, held))
            self._add_masks(particles, held, cached[0])
            self.sets.append(particles)
            self._starts.append(self.n + n)
            self.has_ctf = np.concatenate([self.has_ctf, np.full(n, particles.has_ctf)])
        self.half = np.asarray(half)
        return rebuilt

    def _open_cached(self, block: int, n_held: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The memory maps of cache block ``block`` when they hold ``n_held`` particles."""
        if n_held == 0:
            return np.empty((0, 2, self.grid.n), np.float16), np.empty(
                (0, self.grid.n), np.float16
            )
        kinds = (self._cache_kind, "ctf")
        paths = [self.cache_dir / f"{kind}_{block:05d}.npy" for kind in kinds]
        if not all(p.is_file() for p in paths):
            return None
        try:
            maps = tuple(np.load(p, mmap_mode="r") for p in paths)
        except (OSError, ValueError):
            return None
        if any(m.shape[0] != n_held or m.shape[-1] != self.grid.n for m in maps):
            return None
        return maps

    # -- reading --------------------------------------------------------------------
    def get(
        self,
        indices: np.ndarray,
        device: torch.device | str = "cpu",
        centres: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Particles at ``indices``: coefficients (complex64 ``(B, F)``), CTF values at the
        kept frequencies (``(B, F)``) and CTF parameters (``(B, 8)``).

        ``centres``: ``(B, 2)`` each particle's current centre (x, y) in working pixels
        from its pick (its shift; default: the pick). With ``masks_follow_shifts`` the
        particle masks are placed there (see the module's description), at most
        ``mask_shift_limit_A`` from the pick; the coefficients stay in the pick's frame.
        """
        indices = np.asarray(indices, dtype=np.int64)
        coeffs = np.empty((len(indices), 2, self.grid.n), dtype=np.float16)
        ctf_vals = np.empty((len(indices), self.grid.n), dtype=np.float16)
        params = np.empty((len(indices), len(CTF_COLUMNS)), dtype=np.float32)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        near = None
        if any(self._neighbours[b] is not None for b in np.unique(which)):
            near = np.full((len(indices), MAX_NEIGHBOURS, 2), np.nan, dtype=np.float32)
        for b in np.unique(which):  # loop over cache blocks, not particles
            sel = np.nonzero(which == b)[0]
            local = indices[sel] - self._starts[b]
            rows = self._rows[b][local]
            if len(rows) and rows.min() < 0:
                raise IndexError(
                    f"particle {int(indices[sel][np.argmin(rows)])} is held by another "
                    "process of the distributed job"
                )
            coeffs[sel] = self._coeffs[b][rows]
            ctf_vals[sel] = self._ctf_values[b][rows]
            params[sel] = self._ctf[b][local]
            if near is not None and self._neighbours[b] is not None:
                near[sel, : self._neighbours[b].shape[1]] = self._neighbours[b][rows]
        # float16 over the bus and converted on the device (half the bytes of float32;
        # on a CPU the same conversion as before)
        t = torch.from_numpy(coeffs).to(device).float()
        x = torch.complex(t[:, 0], t[:, 1])
        if self.masks_on_read:
            if centres is None:
                centres = torch.zeros((len(indices), 2))
            centres = torch.as_tensor(centres, dtype=torch.float32).to(device)
            if self.params.mask_shift_limit_A is not None:  # no farther than this from the pick
                limit = self.params.mask_shift_limit_A / self.params.working_pixel_size_A
                dist = centres.norm(dim=1, keepdim=True)
                centres = centres * (limit / dist.clamp(min=1e-6)).clamp(max=1.0)
            if self._fill_stack is None:
                self._fill_stack = torch.stack(self._fills)
            fills = self._fill_stack.to(device)[torch.from_numpy(which).to(device)]
            if near is not None:  # the slots empty for every particle of the chunk go
                used = _used_slots(near)
                near = torch.from_numpy(near[:, :used]).to(device) if used else None
            x = self._masked(x, centres, near, fills)
        return (
            x,
            torch.from_numpy(ctf_vals).to(device).float(),
            torch.from_numpy(params).to(device),
        )

    def chunk_size_for(self, bytes_per_particle: float, budget_GB: float) -> int:
        """Particles per chunk so that ``bytes_per_particle`` each fit the budget (GiB)."""
        return max(1, min(4096, int(budget_GB * 2**30 / max(bytes_per_particle, 1.0))))


def box_edge_window(box: int) -> torch.Tensor:
    """``(D, D)`` soft edge at the box border (0.85-0.99 of the box radius)."""
    return soft_circle(box, 0.85 * box / 2, 0.99 * box / 2)


def _radial_profile(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotational average of a centred ``(D, D)`` image over whole pixels of radius,
    ``(R,)`` float32, and each pixel's radius bin, ``(D·D,)``."""
    d = image.shape[-1]
    c = torch.arange(d, device=image.device) - d // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2).round().long().flatten()
    profile = torch.bincount(r, weights=image.flatten().double()) / torch.bincount(r)
    return profile.float(), r


def _round_part(image: torch.Tensor) -> torch.Tensor:
    """The rotational average of a centred ``(D, D)`` image, as an image."""
    profile, r = _radial_profile(image)
    return profile[r].reshape(image.shape)


def _used_slots(near: np.ndarray) -> int:
    """Neighbour slots ``(N, M, 2)`` (nearest first, NaN: none) used by any particle."""
    return int((~np.isnan(near[..., 0])).sum(1).max(initial=0))


def _row_index(n: int, held: np.ndarray) -> np.ndarray:
    """``(n,)`` int64: the cache row of each particle of a block (-1: another process's)."""
    rows = np.full(n, -1, dtype=np.int64)
    rows[held] = np.arange(len(held))
    return rows


def particle_window(params: ResolvedParams) -> torch.Tensor:
    """``(D, D)`` real-space window every particle is multiplied by before its transform.

    A soft edge at the box border (0.85-0.99 of the box radius) keeps the transform
    free of edge artefacts; with ``mask_particles_with_zeros`` the particle is also
    multiplied by the soft circular mask of the class averages (inner to outer mask
    diameter), so only what lies inside the particle's circle is aligned and averaged.
    With ``masks_follow_shifts`` the cache holds particles with the edge only and the
    circle is applied when they are read, around each particle's current centre
    (:meth:`ParticlePool.get`). This window, at the pick, gives
    :attr:`ParticlePool.independent_fraction`.
    """
    d0 = params.box
    window = box_edge_window(d0)
    if params.mask_particles_with_zeros:
        inner = 0.5 * params.mask_inner_diameter_A / params.pixel_size_A
        outer = 0.5 * params.mask_outer_diameter_A / params.pixel_size_A
        window = window * soft_circle(d0, inner, outer)
    return window


def working_grid(params: ResolvedParams) -> FourierGrid:
    """The kept frequencies of the working box."""
    return FourierGrid.create(params.working_box)
