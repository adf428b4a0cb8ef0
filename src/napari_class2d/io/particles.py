"""The particle set: a metadata table plus lazy, memory-mapped image access.

A :class:`ParticleSet` never holds the images of a file-backed data set in
memory. Images are read on demand from memory-mapped ``.mrcs`` stacks, grouped
by stack file so each file is touched once per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import first_nonfinite, open_stack
from napari_class2d.io.optics import merge_optics, optics_table_for


@dataclass(frozen=True)
class CTFParams:
    """CTF parameters of a set of particles, one value per particle, physical units.

    Attributes
    ----------
    defocus_u_A, defocus_v_A
        Defocus along the major / minor axis in Å (underfocus positive, RELION).
    astigmatism_angle_deg
        Angle of the defocus-U axis from the image x axis, degrees.
    voltage_kV
        Acceleration voltage in kV.
    cs_mm
        Spherical aberration in mm.
    amplitude_contrast
        Amplitude contrast fraction (0-1).
    phase_shift_deg
        Additional phase shift (phase plate), degrees.
    bfactor_A2
        CTF B-factor in Å^2 (0 when absent).
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    astigmatism_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray

    def take(self, indices: np.ndarray) -> CTFParams:
        """The parameters of the particles at ``indices``."""
        return CTFParams(**{k: np.asarray(v)[indices] for k, v in self.__dict__.items()})

    @classmethod
    def concat(cls, parts: Sequence[CTFParams]) -> CTFParams:
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in keys})


class ImageSource:
    """Lazy access to particle images stored in one or more stacks.

    Parameters
    ----------
    stacks
        One entry per stack: either a path to an ``.mrcs``/``.mrc`` file (memory
        mapped on first use) or an in-memory ``(n, box, box)`` array.
    stack_index
        For each particle, which entry of ``stacks`` holds it.
    image_index
        For each particle, its 0-based index inside that stack.
    """

    #: most stacks kept memory-mapped at once (each map holds a file descriptor)
    max_open_stacks: int = 256

    def __init__(
        self,
        stacks: Sequence[str | Path | np.ndarray],
        stack_index: np.ndarray,
        image_index: np.ndarray,
    ):
        self.stacks = list(stacks)
        self.stack_index = np.asarray(stack_index, dtype=np.int64)
        self.image_index = np.asarray(image_index, dtype=np.int64)
        # Shared between an ImageSource and the subsets taken from it.
        self._mmaps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.stack_index)

    def __getstate__(self) -> dict:
        # open memory maps are not part of the state: they reopen lazily on the next read
        return {**self.__dict__, "_mmaps": OrderedDict()}

    @classmethod
    def from_array(cls, images: np.ndarray) -> ImageSource:
        images = np.asarray(images)
        n = len(images)
        return cls([images], np.zeros(n, dtype=np.int64), np.arange(n))

    def stack_path(self, s: int) -> Path | None:
        """The file of stack ``s`` (``None`` for an in-memory array)."""
        entry = self.stacks[s]
        return None if isinstance(entry, np.ndarray) else Path(entry)

    def _stack(self, s: int) -> np.ndarray:
        cache = self._mmaps
        if s in cache:
            cache.move_to_end(s)
            return cache[s]
        entry = self.stacks[s]
        if isinstance(entry, np.ndarray):
            data = entry if entry.ndim == 3 else entry[None]
        else:
            data = open_stack(entry)
        cache[s] = data
        while len(cache) > self.max_open_stacks:
            cache.popitem(last=False)  # drop the least recently used map
        return data

    def read(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Images at ``indices`` (particle order kept) as float32 ``(n, box, box)``.

        Raises
        ------
        ParticleFileError
            An image lies beyond the end of its stack, or holds NaN/inf pixels
            (the error names the stack file and the 0-based image index).
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        stack_ids = self.stack_index[indices]
        for s in np.unique(stack_ids):
            where = np.nonzero(stack_ids == s)[0]
            data = self._stack(int(s))
            idx = self.image_index[indices[where]]
            order = np.argsort(idx, kind="stable")  # sequential reads through the mmap
            idx_sorted = idx[order]
            if len(idx_sorted) and idx_sorted[-1] >= len(data):
                raise ParticleFileError(
                    self.stack_path(int(s)),
                    f"image index {int(idx_sorted[-1])} (0-based) is beyond the end of "
                    f"the stack, which holds {len(data)} images",
                )
            block = np.asarray(data[idx_sorted], dtype=np.float32)
            bad = first_nonfinite(block)
            if bad is not None:
                raise ParticleFileError(
                    self.stack_path(int(s)),
                    f"image {int(idx_sorted[bad])} (0-based; RELION "
                    f"{int(idx_sorted[bad]) + 1:06d}@) contains NaN or infinite pixel values",
                )
            if out is None:
                out = np.empty((len(indices),) + block.shape[1:], dtype=np.float32)
            out[where[order]] = block
        if out is None:
            return np.empty((0, 0, 0), dtype=np.float32)
        return out

    def take(self, indices: np.ndarray) -> ImageSource:
        indices = np.asarray(indices, dtype=np.int64)
        new = ImageSource(self.stacks, self.stack_index[indices], self.image_index[indices])
        new._mmaps = self._mmaps
        return new

    @classmethod
    def concat(cls, sources: Sequence[ImageSource]) -> ImageSource:
        """One source over all particles of ``sources`` (in order).

        Stacks named by the same file (or the very same array) are merged.
        """
        stacks: list[str | Path | np.ndarray] = []
        key_to_id: dict[object, int] = {}
        stack_index = []
        for src in sources:
            remap = np.empty(len(src.stacks), dtype=np.int64)
            for i, entry in enumerate(src.stacks):
                key = ("array", id(entry)) if isinstance(entry, np.ndarray) else str(entry)
                if key not in key_to_id:
                    key_to_id[key] = len(stacks)
                    stacks.append(entry)
                remap[i] = key_to_id[key]
            stack_index.append(remap[src.stack_index] if len(src) else src.stack_index)
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            stacks,
            np.concatenate(stack_index) if stack_index else empty,
            np.concatenate([s.image_index for s in sources]) if sources else empty,
        )


class ParticleSet:
    """Particles: metadata table, optics table, CTF parameters and lazy images.

    Parameters
    ----------
    metadata
        One row per particle, with the original columns of the source file under
        their original names (RELION ``rln*`` names for STAR files, cryoSPARC
        field names for ``.cs``). Its index is reset to ``0..N-1``.
    images
        Where the images are.
    pixel_size_A
        Pixel size of each particle image in Å, shape ``(N,)``.
    box
        Image edge length in pixels (square images).
    ctf
        CTF parameters per particle, or ``None`` when the source has none.
    optics
        RELION optics table (3.1+), or ``None``.
    optics_group
        Optics group number of each particle (1 when the source has none).
    source_path
        The file the set was read from (``None`` for in-memory sets).
    source_format
        One of ``"relion3.0"``, ``"relion3.1"``, ``"cryosparc"``, ``"mrcs"``,
        ``"memory"``, or ``"mixed"`` (from :meth:`concat` of different formats).
    """

    def __init__(
        self,
        metadata: pd.DataFrame,
        images: ImageSource,
        pixel_size_A: np.ndarray | float,
        box: int,
        ctf: CTFParams | None = None,
        optics: pd.DataFrame | None = None,
        optics_group: np.ndarray | None = None,
        source_path: str | Path | None = None,
        source_format: str = "memory",
    ):
        n = len(images)
        if len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} rows but {n} images")
        self.metadata = metadata.reset_index(drop=True)
        self.images = images
        self.pixel_size_A = np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), (n,))
        self.box = int(box)
        self.ctf = ctf
        self.optics = optics
        self.optics_group = (
            np.ones(n, dtype=np.int64) if optics_group is None else np.asarray(optics_group)
        )
        self.source_path = Path(source_path) if source_path is not None else None
        self.source_format = source_format

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        images: np.ndarray,
        pixel_size_A: float,
        ctf: CTFParams | None = None,
        metadata: pd.DataFrame | None = None,
    ) -> ParticleSet:
        """An in-memory particle set (tests, simulations)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ParticleFileError(None, f"expected (n, box, box) images, got {images.shape}")
        n = len(images)
        if metadata is None:
            metadata = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@memory" for i in range(n)]})
        return cls(metadata, ImageSource.from_array(images), pixel_size_A, images.shape[1], ctf)

    # -- properties -----------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return self.n_particles

    @property
    def has_ctf(self) -> bool:
        return self.ctf is not None

    @property
    def pixel_size_by_optics_group(self) -> dict[int, float]:
        """Pixel size in Å of each optics group present."""
        out = {}
        for g in np.unique(self.optics_group):
            out[int(g)] = float(self.pixel_size_A[np.nonzero(self.optics_group == g)[0][0]])
        return out

    # -- images ---------------------------------------------------------------------
    def read_images(self, indices: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Images as float32 ``(n, box, box)``; reads are grouped by stack file."""
        if indices is None:
            indices = np.arange(self.n_particles)
        return self.images.read(indices)

    def chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` over all particles, ``chunk_size`` at a time."""
        for start in range(0, self.n_particles, chunk_size):
            idx = np.arange(start, min(start + chunk_size, self.n_particles))
            yield idx, self.read_images(idx)

    # -- subsets --------------------------------------------------------------------
    def subset(self, indices: np.ndarray | Sequence[int]) -> ParticleSet:
        """The particles at ``indices`` (same order), sharing the open stacks."""
        indices = np.asarray(indices, dtype=np.int64)
        return ParticleSet(
            self.metadata.iloc[indices].reset_index(drop=True),
            self.images.take(indices),
            self.pixel_size_A[indices],
            self.box,
            self.ctf.take(indices) if self.ctf is not None else None,
            self.optics,
            self.optics_group[indices],
            self.source_path,
            self.source_format,
        )

    @classmethod
    def concat(cls, sets: Sequence[ParticleSet]) -> ParticleSet:
        """All particles of ``sets``, in order, as one set.

        Metadata tables are stacked (the union of their columns; missing cells
        are NaN), images keep pointing at their stacks, CTF parameters and
        pixel sizes are concatenated. Optics tables are merged: a group keeps
        its number unless another set already uses that number for different
        optics, in which case it gets the next free number (in ``optics``,
        ``optics_group`` and the metadata's ``rlnOpticsGroup``). When only some
        sets have an optics table, one is built for the others from their
        pixel size, voltage, Cs and amplitude contrast.

        Raises
        ------
        ValueError
            No sets, different box sizes, or some sets with CTF and some without.
        """
        sets = list(sets)
        if not sets:
            raise ValueError("ParticleSet.concat needs at least one particle set")
        if len(sets) == 1:
            return sets[0]
        boxes = {s.box for s in sets if s.n_particles}
        if len(boxes) > 1:
            detail = ", ".join(f"{s.source_path or '<memory>'}: {s.box} px" for s in sets)
            raise ValueError(f"cannot concatenate particle sets of different box sizes ({detail})")
        box = boxes.pop() if boxes else sets[0].box
        with_ctf = [s.has_ctf for s in sets]
        if any(with_ctf) and not all(with_ctf):
            detail = ", ".join(
                f"{s.source_path or '<memory>'}: {'CTF' if s.has_ctf else 'no CTF'}" for s in sets
            )
            raise ValueError(f"cannot concatenate sets with and without CTF ({detail})")
        # Runs of sets that share one optics table (rows of files parsed together) are
        # stacked directly: only the optics tables of what is left need merging.
        runs: list[list[ParticleSet]] = []
        for s in sets:
            if runs and s.optics is not None and s.optics is runs[-1][0].optics:
                runs[-1].append(s)
            else:
                runs.append([s])
        if len(runs) < len(sets):
            sets = [run[0] if len(run) == 1 else cls._stack(run, box) for run in runs]
            if len(sets) == 1:
                return sets[0]

        metadata = [s.metadata for s in sets]
        if any(s.optics is not None for s in sets):
            built = [optics_table_for(s) for s in sets]
            optics, groups, maps = merge_optics([t for t, _ in built], [g for _, g in built])
        else:
            # No optics tables: compare groups by their pixel size and CTF optics.
            tables, group_arrays = [], []
            for s in sets:
                table, g = optics_table_for(s)
                tables.append(table)
                group_arrays.append(g)
            _, groups, maps = merge_optics(tables, group_arrays)
            optics = None
        for i, (s, mapping) in enumerate(zip(sets, maps, strict=True)):
            if "rlnOpticsGroup" in s.metadata.columns and (
                mapping or not np.array_equal(groups[i], s.optics_group)
            ):
                metadata[i] = s.metadata.copy()
                metadata[i]["rlnOpticsGroup"] = groups[i]
        paths = {str(s.source_path) for s in sets}
        formats = {s.source_format for s in sets}
        return cls(
            pd.concat(metadata, ignore_index=True, sort=False),
            ImageSource.concat([s.images for s in sets]),
            np.concatenate([s.pixel_size_A for s in sets]),
            box,
            CTFParams.concat([s.ctf for s in sets]) if all(with_ctf) else None,
            optics,
            np.concatenate(groups),
            sets[0].source_path if len(paths) == 1 else None,
            formats.pop() if len(formats) == 1 else "mixed",
        )

    @classmethod
    def _stack(cls, sets: list[ParticleSet], box: int) -> ParticleSet:
        """Sets sharing one optics table (same group numbers) as one set."""
        paths = {str(s.source_path) for s in sets}
        formats = {s.source_format for s in sets}
        return cls(
            pd.concat([s.metadata for s in sets], ignore_index=True, sort=False),
            ImageSource.concat([s.images for s in sets]),
            np.concatenate([s.pixel_size_A for s in sets]),
            box,
            CTFParams.concat([s.ctf for s in sets]) if sets[0].ctf is not None else None,
            sets[0].optics,
            np.concatenate([s.optics_group for s in sets]),
            sets[0].source_path if len(paths) == 1 else None,
            formats.pop() if len(formats) == 1 else "mixed",
        )

    def __repr__(self) -> str:
        return (
            f"ParticleSet(n={self.n_particles}, box={self.box}, "
            f"pixel_size_A={self.pixel_size_by_optics_group}, ctf={self.has_ctf}, "
            f"format={self.source_format!r}, path={str(self.source_path)!r})"
        )
