"""Write particles, class averages and models as RELION files, atomically.

Every writer builds the file under a temporary name in the destination folder
and moves it into place with :func:`os.replace`, so a reader never sees a half
written file, and refuses to replace an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from napari_class2d.io.errors import DiskFullError, free_bytes, is_disk_full
from napari_class2d.io.mrc import read_stack_header
from napari_class2d.io.optics import OPTICS_CTF_COLUMNS, optics_table_for
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.paths import relion_project_of
from napari_class2d.io.starwriter import write_star_file

#: CTFParams field -> RELION particle column
CTF_PARTICLE_COLUMNS = {
    "defocus_u_A": "rlnDefocusU",
    "defocus_v_A": "rlnDefocusV",
    "astigmatism_angle_deg": "rlnDefocusAngle",
    "phase_shift_deg": "rlnPhaseShift",
    "bfactor_A2": "rlnCtfBfactor",
}
#: per-particle columns of RELION <= 3.0 that RELION 3.1 keeps in the optics table
_LEGACY_OPTICS_COLUMNS = (
    "rlnImagePixelSize",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    *OPTICS_CTF_COLUMNS,
)
#: RELION's value for "no resolution estimate"
RELION_NO_RESOLUTION = 999.0


def atomic_write(
    path: str | Path,
    writer_fn: Callable[[Path], object],
    overwrite: bool = False,
    *,
    size_hint: int | None = None,
) -> Path:
    """Write ``path`` through a temporary file in the same folder.

    The temporary file is created with the permissions a new file gets (0666
    less the umask), so the result is readable by the group and others as the
    umask allows; it is flushed to disk (fsync) before it takes ``path``'s
    place, and removed whatever happens.

    Parameters
    ----------
    path
        Destination file; its folder must exist.
    writer_fn
        Called with the temporary path; must write the complete file there.
    overwrite
        Replace an existing ``path``. Without it an existing file is never
        touched, even if it appears while ``writer_fn`` runs.
    size_hint
        Bytes the file is expected to take (named when the disk is full).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false (names the path).
    FileNotFoundError
        The destination folder does not exist.
    DiskFullError
        No space left in the folder (``path`` is left as it was).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not overwrite and path.exists():
        raise FileExistsError(
            17, f"{path} exists; pass overwrite=True (--overwrite) to replace it", str(path)
        )
    if not folder.is_dir():
        raise FileNotFoundError(2, f"output folder {folder} does not exist", str(folder))
    tmp = _new_temporary(folder, path.name)
    try:
        writer_fn(tmp)
        with open(tmp, "rb+") as fh:  # durable before it becomes visible
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic "create only if absent"
            except FileExistsError:
                raise FileExistsError(
                    17,
                    f"{path} exists; pass overwrite=True (--overwrite) to replace it",
                    str(path),
                ) from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(
                        17,
                        f"{path} exists; pass overwrite=True (--overwrite) to replace it",
                        str(path),
                    ) from None
                os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err) or _full_after(err, folder):
            if size_hint is None and path.exists():  # the file it replaces: about as large
                raise DiskFullError(
                    folder, path.stat().st_size, what=path.name, approximate=True
                ) from None
            raise DiskFullError(folder, size_hint, what=path.name) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _new_temporary(folder: Path, name: str) -> Path:
    """A new empty file ``.NAME.XXXXXXXX.tmp`` in ``folder``, mode 0666 less the umask."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(folder, what=name) from None
            raise
        os.close(fd)
        return tmp
    raise FileExistsError(17, f"cannot create a temporary file in {folder}", str(folder))


def _full_after(err: BaseException, folder: Path) -> bool:
    """Writers that wrap the OS error (e.g. a C++ library's "unexpected pos"): the disk
    is full if nothing is left on it."""
    if isinstance(err, (FileExistsError, FileNotFoundError, PermissionError)):
        return False
    free = free_bytes(folder)
    return free is not None and free < 64 * 1024


def _stack_name(target: Path, project: Path | None) -> str:
    """``target`` relative to the RELION ``project`` folder when it lies inside it,
    otherwise absolute."""
    target = Path(os.path.abspath(target))
    if project is not None:
        project = Path(os.path.abspath(project))
        if target.is_relative_to(project):
            return target.relative_to(project).as_posix()
    return str(target)


def image_names_for(particles: ParticleSet, star_folder: Path) -> np.ndarray:
    """``NNNNNN@stack`` names that RELION, cryoSPARC and napari-class2d all resolve.

    RELION resolves image names against the folder it runs in, the project
    folder. So a file written inside a RELION project (a folder holding
    ``default_pipeline.star``, found from ``star_folder`` upwards) names its
    stacks relative to that project, as RELION's own files do; anywhere else
    the names are absolute paths, which every program finds whatever folder
    it runs in. Particles in in-memory stacks keep their ``rlnImageName`` (or
    get ``NNNNNN@memory``).
    """
    project = relion_project_of(star_folder)
    src = particles.images
    relative = []
    for s in range(len(src.stacks)):
        p = src.stack_path(s)
        relative.append("" if p is None else _stack_name(p, project))
    relative = np.asarray(relative, dtype=object)
    numbers = pd.Series(src.image_index + 1).astype(str).str.zfill(6)
    names = (numbers + "@" + pd.Series(relative[src.stack_index], dtype=object)).to_numpy(
        dtype=object
    )
    in_memory = np.array([src.stack_path(s) is None for s in range(len(src.stacks))], bool)
    if in_memory.any():
        mask = in_memory[src.stack_index]
        if "rlnImageName" in particles.metadata.columns:
            names[mask] = particles.metadata["rlnImageName"].to_numpy(dtype=object)[mask]
        else:
            names[mask] = (numbers[mask] + "@memory").to_numpy(dtype=object)
    return names


def _extra_frame(extra, n_written: int, rows: np.ndarray | None, n_total: int) -> pd.DataFrame:
    if extra is None:
        return pd.DataFrame(index=range(n_written))
    frame = pd.DataFrame(extra)
    if len(frame) == n_written:
        return frame.reset_index(drop=True)
    if rows is not None and len(frame) == n_total:
        return frame.iloc[rows].reset_index(drop=True)
    raise ValueError(
        f"extra_columns has {len(frame)} rows; expected {n_written} (one per written "
        f"particle)" + (f" or {n_total} (one per input particle)" if rows is not None else "")
    )


def particle_star_blocks(
    path: str | Path,
    particles: ParticleSet,
    rows: Sequence[int] | np.ndarray | None = None,
    extra_columns: pd.DataFrame | dict | None = None,
) -> dict[str, pd.DataFrame]:
    """The ``optics`` and ``particles`` blocks :func:`write_particle_star` writes."""
    path = Path(path)
    n_total = particles.n_particles
    rows_arr = None if rows is None else np.asarray(rows, dtype=np.int64)
    ps = particles if rows_arr is None else particles.subset(rows_arr)
    extra = _extra_frame(extra_columns, ps.n_particles, rows_arr, n_total)
    optics, groups = optics_table_for(ps)

    meta = ps.metadata
    keep = [c for c in meta.columns if str(c).startswith("rln")]  # drops cryoSPARC fields
    table = meta[keep].copy()
    if ps.optics is None:
        # RELION <= 3.0 style input: origins to Å, optics values into the optics table.
        for axis in ("X", "Y"):
            old, new = f"rlnOrigin{axis}", f"rlnOrigin{axis}Angst"
            if old in table.columns:
                if new not in table.columns:
                    pos = table.columns.get_loc(old)
                    values = pd.to_numeric(table[old], errors="coerce") * ps.pixel_size_A
                    table.insert(pos, new, values.to_numpy())
                table = table.drop(columns=old)
        drop = [c for c in _LEGACY_OPTICS_COLUMNS if c in table.columns]
        if ps.ctf is None:
            drop = [c for c in drop if c not in OPTICS_CTF_COLUMNS]
        table = table.drop(columns=drop)
    table["rlnImageName"] = image_names_for(ps, path.parent)
    table["rlnOpticsGroup"] = groups
    if ps.ctf is not None:
        for field, column in CTF_PARTICLE_COLUMNS.items():
            table[column] = np.asarray(getattr(ps.ctf, field), dtype=np.float64)
    for column in extra.columns:
        table[column] = extra[column].to_numpy()
    return {"optics": optics, "particles": table.reset_index(drop=True)}


def write_particle_star(
    path: str | Path,
    particles: ParticleSet,
    rows: Sequence[int] | np.ndarray | None = None,
    extra_columns: pd.DataFrame | dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write particles as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``).

    Parameters
    ----------
    path
        Output ``.star`` file.
    particles
        Any particle set (RELION 1.x-5, cryoSPARC, bare stack, in memory).
    rows
        Indices of the particles to write (default: all), in the order given.
    extra_columns
        Columns to add, one value per written particle (or per input particle
        when ``rows`` is given); a column of the same name is replaced (e.g.
        ``rlnClassNumber``, ``rlnAnglePsi``, ``rlnOriginXAngst``).
    overwrite
        Replace an existing file.

    Returns
    -------
    Path

    Notes
    -----
    * The original particle columns are kept (for cryoSPARC input only the
      ``rln*`` ones: cryoSPARC field names are not STAR labels).
    * The optics table of RELION 3.1+ input is kept with only the groups still
      used; for other input one is built from the pixel size, voltage, Cs and
      amplitude contrast (plus ``rlnImageSize`` and
      ``rlnImageDimensionality`` = 2). RELION <= 3.0 per-particle optics
      columns move to it and ``rlnOriginX/Y`` (pixels) become
      ``rlnOriginX/YAngst``.
    * CTF values are written as ``rlnDefocusU/V`` (Å), ``rlnDefocusAngle``,
      ``rlnPhaseShift`` (degrees) and ``rlnCtfBfactor`` (Å²).
    * ``rlnImageName`` is ``NNNNNN@stack`` with the stack path relative to the
      RELION project folder when the output file is inside one, otherwise
      absolute (see :func:`image_names_for`): RELION resolves image names
      against the folder it runs in, not the STAR file's folder.
    """
    path = Path(path)
    blocks = particle_star_blocks(path, particles, rows, extra_columns)

    def write(tmp: Path) -> None:
        write_star_file(tmp, blocks)

    return atomic_write(path, write, overwrite=overwrite)


def write_class_averages(
    path: str | Path, averages: np.ndarray, pixel_size_A: float, overwrite: bool = False
) -> Path:
    """Write class averages as an MRC image stack (``run_classes.mrcs``).

    Parameters
    ----------
    path
        Output ``.mrcs`` file.
    averages
        ``(K, D, D)`` images (written as float32, MRC mode 2).
    pixel_size_A
        Pixel size of the averages in Å (stored as the voxel size).
    overwrite
        Replace an existing file.

    Returns
    -------
    Path
    """
    data = np.asarray(averages, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"class averages must be (K, D, D); got shape {data.shape}")
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"pixel size must be > 0 Å, got {pixel_size_A}")

    def write(tmp: Path) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data))
            mrc.set_image_stack()  # ispg 0: a stack of 2D images, not a volume
            mrc.voxel_size = float(pixel_size_A)
            mrc.update_header_stats()

    return atomic_write(path, write, overwrite=overwrite)


def write_model_star(
    path: str | Path,
    classes_mrcs_name: str,
    class_distribution: Sequence[float] | np.ndarray,
    class_resolution_A: Sequence[float] | np.ndarray,
    pixel_size_A: float,
    extra_class_columns: pd.DataFrame | dict | None = None,
    overwrite: bool = False,
    *,
    original_image_size: int | None = None,
    extra_general: dict | None = None,
) -> Path:
    """Write a RELION-style 2D model STAR file (``run_model.star``).

    Parameters
    ----------
    path
        Output ``.star`` file.
    classes_mrcs_name
        The class-average stack, a path relative to the model file's folder
        (normally the file name, e.g. ``run_classes.mrcs``, beside it). The
        model names it as RELION resolves it: relative to the RELION project
        when the model is inside one, otherwise absolute (as
        :func:`image_names_for`).
    class_distribution
        Fraction of particles in each class, shape ``(K,)``.
    class_resolution_A
        Estimated resolution of each class in Å; ``inf``/NaN are written as 999
        (RELION's "no estimate").
    pixel_size_A
        Pixel size of the class averages in Å.
    extra_class_columns
        More per-class columns (``K`` rows), e.g. ``rlnAccuracyRotations``,
        ``rlnAccuracyTranslationsAngst``.
    overwrite
        Replace an existing file.
    original_image_size
        Box of the class averages in pixels; read from ``classes_mrcs_name``
        (beside ``path``) when not given.
    extra_general
        More ``data_model_general`` entries.

    Returns
    -------
    Path
    """
    path = Path(path)
    distribution = np.asarray(class_distribution, dtype=np.float64).reshape(-1)
    resolution = np.asarray(class_resolution_A, dtype=np.float64).reshape(-1)
    k = len(distribution)
    if len(resolution) != k:
        raise ValueError(f"{k} class distributions but {len(resolution)} resolutions")
    resolution = np.where(np.isfinite(resolution), resolution, RELION_NO_RESOLUTION)
    if original_image_size is None:
        original_image_size = read_stack_header(path.parent / classes_mrcs_name).nx
    reference = _stack_name(path.parent / classes_mrcs_name, relion_project_of(path.parent))
    finite = resolution[resolution < RELION_NO_RESOLUTION]
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": int(original_image_size),
        "rlnCurrentResolution": float(finite.min()) if len(finite) else RELION_NO_RESOLUTION,
        "rlnCurrentImageSize": int(original_image_size),
        "rlnPixelSize": float(pixel_size_A),
        "rlnNrClasses": int(k),
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
    }
    general.update(extra_general or {})
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": [f"{i + 1:06d}@{reference}" for i in range(k)],
            "rlnClassDistribution": distribution,
            "rlnEstimatedResolution": resolution,
        }
    )
    if extra_class_columns is not None:
        extra = pd.DataFrame(extra_class_columns).reset_index(drop=True)
        if len(extra) != k:
            raise ValueError(f"extra_class_columns has {len(extra)} rows; expected {k}")
        for column in extra.columns:
            classes[column] = extra[column].to_numpy()

    def write(tmp: Path) -> None:
        write_star_file(tmp, {"model_general": general, "model_classes": classes})

    return atomic_write(path, write, overwrite=overwrite)
