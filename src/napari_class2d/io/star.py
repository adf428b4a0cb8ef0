"""RELION particle STAR files, versions 1.x to 5.

* RELION 3.1, 4 and 5: a ``data_optics`` block (pixel size, voltage, Cs,
  amplitude contrast per optics group) and a ``data_particles`` block, in either
  order; origins in Å (``rlnOriginXAngst``).
* RELION 3.0 and older (1.x, 2.x): one block (``data_``, ``data_images``, ...)
  with optics values per particle; pixel size from ``rlnImagePixelSize`` or
  ``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification``; origins in pixels.

Images are named ``NNNNNN@path`` (1-based index into an MRC stack). All parsing
is vectorised with pandas; only distinct stack files are visited one by one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import CTFParams, ImageSource, ParticleSet
from napari_class2d.io.paths import check_stacks, resolve_stack
from napari_class2d.io.starparse import parse_star, read_star_blocks

#: RELION column -> CTFParams field, for the columns every CTF needs
REQUIRED_CTF_COLUMNS = {
    "rlnDefocusU": "defocus_u_A",
    "rlnDefocusV": "defocus_v_A",
    "rlnDefocusAngle": "astigmatism_angle_deg",
    "rlnVoltage": "voltage_kV",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}
#: the per-particle columns without which there is no CTF
DEFOCUS_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
#: optional CTF columns and their defaults
OPTIONAL_CTF_COLUMNS = {
    "rlnPhaseShift": ("phase_shift_deg", 0.0),
    "rlnCtfBfactor": ("bfactor_A2", 0.0),
}
#: block names that hold particles, most specific first
_PARTICLE_BLOCK_NAMES = ("particles", "images", "")


def _as_frame(block) -> pd.DataFrame | None:
    """A loop block as is, a single-value block as a one-row table."""
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        return pd.DataFrame({k: [v] for k, v in block.items()})
    return None


def find_particle_block(path: Path, blocks: dict) -> tuple[str, pd.DataFrame]:
    """The name and table of the block holding ``rlnImageName``.

    Raises
    ------
    ParticleFileError
        No block, or several ambiguous blocks, with an ``rlnImageName`` column.
    """
    candidates = {}
    for name, block in blocks.items():
        frame = _as_frame(block)
        if frame is not None and "rlnImageName" in frame.columns:
            candidates[name] = frame
    if not candidates:
        names = ", ".join(f"data_{n}" for n in blocks) or "none"
        raise ParticleFileError(
            path,
            f"no particle block: no data block has an rlnImageName column (blocks: {names}). "
            "Expected a RELION particle STAR file (e.g. run_data.star, particles.star).",
            column="rlnImageName",
        )
    for preferred in _PARTICLE_BLOCK_NAMES:
        if preferred in candidates:
            return preferred, candidates[preferred]
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    names = ", ".join(f"data_{n}" for n in candidates)
    raise ParticleFileError(
        path,
        f"several blocks have an rlnImageName column ({names}); expected one particle "
        "block (named data_particles)",
    )


def find_optics_block(blocks: dict, particle_block: str) -> pd.DataFrame | None:
    """The optics table (``data_optics``, or an unnamed block that looks like one)."""
    if "optics" in blocks and particle_block != "optics":
        return _as_frame(blocks["optics"])
    for name, block in blocks.items():
        frame = _as_frame(block)
        if name == particle_block or frame is None:
            continue
        cols = set(frame.columns)
        if "rlnOpticsGroup" in cols and "rlnImageName" not in cols:
            if cols & {"rlnImagePixelSize", "rlnVoltage", "rlnImageSize"}:
                return frame
    return None


def _numeric(path: Path, values: pd.Series | np.ndarray, column: str) -> np.ndarray:
    """``values`` as float64; a non-number names its row."""
    series = pd.Series(values)
    out = pd.to_numeric(series, errors="coerce")
    bad = out.isna() & series.notna()
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise ParticleFileError(
            path, f"value {series.iloc[row]!r} is not a number", row=row, column=column
        )
    return out.to_numpy(dtype=np.float64)


def _finite(path: Path, values: np.ndarray, column: str, *, positive: bool = False) -> None:
    bad = ~np.isfinite(values)
    if positive:
        bad |= ~(values > 0)
    if bad.any():
        row = int(np.argmax(bad))
        what = "a finite number > 0" if positive else "a finite number"
        raise ParticleFileError(
            path, f"value {values[row]!r} is not {what}", row=row, column=column
        )


def parse_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split ``NNNNNN@stack`` names (vectorised).

    Returns
    -------
    image_index
        0-based index of each image in its stack.
    stack_code
        For each particle, the index of its stack name in ``stack_names``.
    stack_names
        The distinct stack paths as written (``:mrcs`` suffixes removed).

    Raises
    ------
    ParticleFileError
        An empty name, a non-numeric or non-positive index (names the row).
    """
    text = names.astype(str).str.strip()
    at = text.str.find("@").to_numpy()
    number = pd.Series("1", index=text.index, dtype=object)  # no '@': one-image file
    stack = text.copy()
    # Slice at each distinct '@' position (usually one: fixed-width NNNNNN@),
    # which is much faster than splitting a million strings.
    for p in np.unique(at[at >= 0]):
        rows = at == p
        part = text[rows]
        number[rows] = part.str.slice(0, int(p))
        stack[rows] = part.str.slice(int(p) + 1)
    suffixed = stack.str.endswith((":mrcs", ":mrc")).to_numpy()
    if suffixed.any():
        stack[suffixed] = stack[suffixed].str.replace(r":mrcs?$", "", regex=True)
    empty = stack.str.len().fillna(0).to_numpy() == 0
    if empty.any():
        row = int(np.argmax(empty))
        raise ParticleFileError(
            path,
            f"image name {names.iloc[row]!r} has no stack file; expected NNNNNN@stack.mrcs",
            row=row,
            column="rlnImageName",
        )
    try:
        index = number.astype(np.int64).to_numpy()
        bad = index < 1
    except (ValueError, TypeError):
        as_float = pd.to_numeric(number, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(as_float) | (as_float < 1) | (as_float != np.floor(as_float))
        index = np.where(bad, 1, np.nan_to_num(as_float)).astype(np.int64)
    if bad.any():
        row = int(np.argmax(bad))
        raise ParticleFileError(
            path,
            f"image name {names.iloc[row]!r} does not start with a 1-based image number; "
            "expected NNNNNN@stack.mrcs",
            row=row,
            column="rlnImageName",
        )
    codes, uniques = pd.factorize(stack, sort=False)
    return index - 1, codes.astype(np.int64), [str(u) for u in uniques]


@dataclass
class ParticleTable:
    """A particle STAR file parsed, its image stacks not yet looked for.

    Attributes
    ----------
    path
        The STAR file (named in errors; relative stack names start from its folder).
    metadata
        The particle block with its original columns.
    optics
        The optics table (RELION 3.1+), or ``None``.
    pixel_size_A, optics_group
        Per particle.
    ctf
        CTF parameters per particle, ``None`` without defocus columns.
    image_index
        0-based index of each particle's image in its stack.
    stack_code
        Per particle, the index of its stack in ``stack_names``.
    stack_names
        The distinct stacks as written in the file.
    box
        Image size from the optics table's ``rlnImageSize`` (0 when absent).
    """

    path: Path
    metadata: pd.DataFrame
    optics: pd.DataFrame | None
    pixel_size_A: np.ndarray
    optics_group: np.ndarray
    ctf: CTFParams | None
    image_index: np.ndarray
    stack_code: np.ndarray
    stack_names: list[str]
    box: int
    optics_row: np.ndarray | None = None

    @property
    def n_particles(self) -> int:
        return len(self.metadata)

    @property
    def source_format(self) -> str:
        return "relion3.1" if self.optics is not None else "relion3.0"

    def particles(
        self,
        project_dir: str | Path | None = None,
        *,
        check_stacks_exist: bool = True,
    ) -> ParticleSet:
        """The particles, with every stack looked for (see :func:`read_star`)."""
        path = self.path
        stacks: list[Path] = []
        for code, name in enumerate(self.stack_names):
            found, tried = resolve_stack(path, name, project_dir)
            if found is None:
                if check_stacks_exist:
                    row = int(np.argmax(self.stack_code == code))
                    tried_text = ", ".join(str(t) for t in tried)
                    raise ParticleFileError(
                        path,
                        f"image stack {name!r} not found; tried: {tried_text}. Give the RELION "
                        "project folder (project_dir / --project-dir) if paths are relative "
                        "to it.",
                        row=row,
                        column="rlnImageName",
                    )
                found = tried[0]
            stacks.append(found)
        box = self.box
        if check_stacks_exist:
            box = check_stacks(
                path,
                stacks,
                self.stack_code,
                self.image_index,
                index_column="rlnImageName",
                index_base=1,
            )
            _check_image_size(path, self.optics, self.optics_row, box)
        return ParticleSet(
            self.metadata,
            ImageSource(stacks, self.stack_code, self.image_index),
            self.pixel_size_A,
            box,
            ctf=self.ctf,
            optics=self.optics,
            optics_group=self.optics_group,
            source_path=path,
            source_format=self.source_format,
        )


def parse_particle_blocks(
    blocks: dict, path: str | Path, pixel_size_A: float | None = None
) -> ParticleTable | None:
    """The particle table of parsed STAR ``blocks`` (``None`` when its block has no rows).

    Raises
    ------
    ParticleFileError
        As :func:`read_star`, except for problems with the image stacks.
    """
    path = Path(path)
    block_name, particles = find_particle_block(path, blocks)
    particles = particles.reset_index(drop=True)
    n = len(particles)
    if n == 0:
        return None
    optics = find_optics_block(blocks, block_name)
    if optics is not None:
        optics = optics.reset_index(drop=True)

    optics_row = _optics_rows(path, particles, optics)

    def column(name: str) -> np.ndarray | None:
        """Per-particle float values from the optics table, else the particle block."""
        if optics is not None and name in optics.columns:
            values = _numeric(path, optics[name], name)
            return values[optics_row]
        if name in particles.columns:
            return _numeric(path, particles[name], name)
        return None

    apix = _pixel_size(path, column, pixel_size_A, n)
    ctf = _ctf(path, particles, optics, column)

    # Optics group per particle.
    if optics is not None:
        groups = _numeric(path, optics["rlnOpticsGroup"], "rlnOpticsGroup")[optics_row]
        groups = groups.astype(np.int64)
    elif "rlnOpticsGroup" in particles.columns:
        groups = _numeric(path, particles["rlnOpticsGroup"], "rlnOpticsGroup").astype(np.int64)
    else:
        keys = {"apix": apix}
        if ctf is not None:
            keys.update(kv=ctf.voltage_kV, cs=ctf.cs_mm, ac=ctf.amplitude_contrast)
        groups = pd.DataFrame(keys).groupby(list(keys), sort=False).ngroup().to_numpy() + 1

    image_index, stack_code, stack_names = parse_image_names(path, particles["rlnImageName"])
    return ParticleTable(
        path=path,
        metadata=particles,
        optics=optics,
        pixel_size_A=apix,
        optics_group=groups,
        ctf=ctf,
        image_index=image_index,
        stack_code=stack_code,
        stack_names=stack_names,
        box=_box_from_optics(optics),
        optics_row=optics_row,
    )


def read_star(
    path: str | Path,
    pixel_size_A: float | None = None,
    project_dir: str | Path | None = None,
    *,
    check_stacks_exist: bool = True,
) -> ParticleSet:
    """Read a RELION particle STAR file (any version) without loading images.

    Parameters
    ----------
    path
        The STAR file.
    pixel_size_A
        Pixel size in Å, used only when the file gives none
        (``rlnImagePixelSize``, or ``rlnDetectorPixelSize``/``rlnMagnification``).
    project_dir
        RELION project folder, tried after the STAR file's folder when resolving
        stack paths.
    check_stacks_exist
        Resolve every stack and check its header and the image indices (headers
        only, fast). With ``False`` only the STAR file is parsed (metadata-only:
        ``box`` comes from ``rlnImageSize`` when present, else 0, and stacks are
        opened when images are first read).

    Returns
    -------
    ParticleSet
        ``source_format`` ``"relion3.1"`` (optics table present) or
        ``"relion3.0"``; ``metadata`` is the particle block with its original
        columns; ``ctf`` is ``None`` when the file has no defocus columns (a
        RELION 3.1 optics table always has voltage, Cs and amplitude contrast).

    Raises
    ------
    ParticleFileError
        Names the STAR file and, where relevant, the row and column: empty or
        unreadable file, no particle block, a repeated column, partial CTF
        columns, non-finite CTF values, no pixel size, unknown optics group,
        missing stack (with every path tried), image index beyond its stack,
        mixed box sizes.
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    table = parse_particle_blocks(blocks, path, pixel_size_A)
    if table is None:
        block_name, _ = find_particle_block(path, blocks)
        raise ParticleFileError(path, f"particle block data_{block_name} has no rows")
    return table.particles(project_dir, check_stacks_exist=check_stacks_exist)


def read_star_text(
    text: str | bytes, path: str | Path, pixel_size_A: float | None = None
) -> ParticleTable | None:
    """Parse particle STAR text held in memory (e.g. the rows appended to a growing file).

    ``path`` is the file the text came from: errors name it and relative stack
    names start from its folder. ``None`` when the particle block has no rows.
    """
    return parse_particle_blocks(parse_star(text, path), path, pixel_size_A)


def _optics_rows(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> np.ndarray:
    """For each particle, the row of its optics group in ``optics`` (vectorised)."""
    n = len(particles)
    if optics is None:
        return np.zeros(n, dtype=np.int64)
    if len(optics) == 0:
        raise ParticleFileError(path, "the optics block has no rows", column="rlnOpticsGroup")
    if "rlnOpticsGroup" not in optics.columns:
        raise ParticleFileError(
            path, "the optics block has no rlnOpticsGroup column", column="rlnOpticsGroup"
        )
    table_groups = _numeric(path, optics["rlnOpticsGroup"], "rlnOpticsGroup")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) == 1:
            return np.zeros(n, dtype=np.int64)
        raise ParticleFileError(
            path,
            f"the optics block has {len(optics)} groups but the particle block has no "
            "rlnOpticsGroup column",
            column="rlnOpticsGroup",
        )
    wanted = _numeric(path, particles["rlnOpticsGroup"], "rlnOpticsGroup")
    rows = pd.Index(table_groups).get_indexer(wanted)
    if (rows < 0).any():
        row = int(np.argmax(rows < 0))
        known = ", ".join(str(int(g)) for g in table_groups)
        raise ParticleFileError(
            path,
            f"optics group {wanted[row]:g} is not in the optics block (groups: {known})",
            row=row,
            column="rlnOpticsGroup",
        )
    return rows.astype(np.int64)


def _pixel_size(path: Path, column, pixel_size_A: float | None, n: int) -> np.ndarray:
    """Per-particle pixel size in Å (file first, then the user's value)."""
    apix = column("rlnImagePixelSize")
    name = "rlnImagePixelSize"
    if apix is None:
        detector = column("rlnDetectorPixelSize")
        magnification = column("rlnMagnification")
        if detector is not None and magnification is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                apix = detector * 1e4 / magnification
            name = "rlnDetectorPixelSize/rlnMagnification"
    if apix is None:
        if pixel_size_A is None:
            raise ParticleFileError(
                path,
                "no pixel size: the file has neither rlnImagePixelSize nor "
                "rlnDetectorPixelSize with rlnMagnification; give the pixel size in Å "
                "(pixel_size_A / --pixel-size)",
                column="rlnImagePixelSize",
            )
        if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ParticleFileError(path, f"pixel size must be > 0 Å, got {pixel_size_A}")
        return np.full(n, float(pixel_size_A))
    _finite(path, apix, name, positive=True)
    if pixel_size_A is not None and not np.allclose(apix, pixel_size_A, rtol=1e-3):
        warnings.warn(
            f"{path}: the file gives a pixel size of {np.unique(apix)} Å; "
            f"the given {pixel_size_A} Å is not used",
            stacklevel=3,
        )
    return apix


def _ctf(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None, column):
    """CTF parameters, ``None`` when the file has no defocus columns.

    Voltage, Cs and amplitude contrast alone (every RELION 3.1 optics table has
    them) describe the microscope, not a CTF: without defocus there is none.
    """
    available = set(particles.columns) | (set(optics.columns) if optics is not None else set())
    present = [c for c in REQUIRED_CTF_COLUMNS if c in available]
    if not any(c in available for c in DEFOCUS_COLUMNS):
        return None
    missing = [c for c in REQUIRED_CTF_COLUMNS if c not in available]
    if missing:
        raise ParticleFileError(
            path,
            f"incomplete CTF parameters: has {', '.join(present)} but not "
            f"{', '.join(missing)}; expected all of {', '.join(REQUIRED_CTF_COLUMNS)} "
            "(or none, for no CTF correction)",
            column=missing[0],
        )
    values = {}
    for name, field in REQUIRED_CTF_COLUMNS.items():
        values[field] = column(name)
        _finite(path, values[field], name)
    n = len(particles)
    for name, (field, default) in OPTIONAL_CTF_COLUMNS.items():
        v = column(name)
        if v is None:
            v = np.full(n, default, dtype=np.float64)
        _finite(path, v, name)
        values[field] = v
    return CTFParams(**values)


def _box_from_optics(optics: pd.DataFrame | None) -> int:
    if optics is not None and "rlnImageSize" in optics.columns:
        sizes = pd.to_numeric(optics["rlnImageSize"], errors="coerce").dropna().unique()
        if len(sizes) == 1:
            return int(sizes[0])
    return 0


def _check_image_size(path: Path, optics, optics_row: np.ndarray, box: int) -> None:
    """The optics table's ``rlnImageSize`` must match the stacks."""
    if optics is None or "rlnImageSize" not in optics.columns:
        return
    sizes = _numeric(path, optics["rlnImageSize"], "rlnImageSize")[optics_row]
    bad = sizes != box
    if bad.any():
        row = int(np.argmax(bad))
        raise ParticleFileError(
            path,
            f"the optics group says rlnImageSize {sizes[row]:g} but the image stacks hold "
            f"{box}x{box} images",
            row=row,
            column="rlnImageSize",
        )
