"""cryoSPARC particle files (``.cs``: a numpy structured array saved with ``np.save``).

Fields used: ``blob/path`` (stack, bytes, often ``>``-prefixed and relative to
the cryoSPARC project folder), ``blob/idx`` (0-based image index),
``blob/shape``, ``blob/psize_A``, and the CTF fields ``ctf/df1_A``,
``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
``ctf/amp_contrast``, ``ctf/phase_shift_rad``, ``ctf/bfactor``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.particles import CTFParams, ImageSource, ParticleSet
from napari_class2d.io.paths import candidate_paths, check_stacks, resolve_first

#: cryoSPARC field -> (CTFParams field, scale to RELION units)
REQUIRED_CTF_FIELDS = {
    "ctf/df1_A": ("defocus_u_A", 1.0),
    "ctf/df2_A": ("defocus_v_A", 1.0),
    "ctf/df_angle_rad": ("astigmatism_angle_deg", 180.0 / np.pi),
    "ctf/accel_kv": ("voltage_kV", 1.0),
    "ctf/cs_mm": ("cs_mm", 1.0),
    "ctf/amp_contrast": ("amplitude_contrast", 1.0),
}
OPTIONAL_CTF_FIELDS = {
    "ctf/phase_shift_rad": ("phase_shift_deg", 180.0 / np.pi),
    "ctf/bfactor": ("bfactor_A2", 1.0),
}
#: the first bytes of every ``.npy``/``.cs`` file
_NPY_MAGIC = b"\x93NUMPY"


def load_cs(path: str | Path) -> np.ndarray:
    """The structured array of a ``.cs`` file.

    Raises
    ------
    ParticleFileError
        Missing file, or not a cryoSPARC file (not a numpy structured array; a
        pickled object is never loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleFileError(path, "cryoSPARC .cs file not found")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
    except OSError as err:
        raise ParticleFileError(path, f"cannot read the file: {err.strerror}") from None
    if magic != _NPY_MAGIC:
        raise ParticleFileError(
            path, "not a cryoSPARC .cs file (expected a numpy structured array)"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise ParticleFileError(
                path,
                "not a cryoSPARC .cs file (it holds Python objects, not a numpy structured array)",
            ) from None
        raise ParticleFileError(path, f"not a readable cryoSPARC .cs file ({err})") from None
    except Exception as err:
        raise ParticleFileError(path, f"not a readable cryoSPARC .cs file ({err})") from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise ParticleFileError(
            path, "not a cryoSPARC .cs file (expected a numpy structured array)"
        )
    return data


def cs_to_dataframe(data: np.ndarray) -> pd.DataFrame:
    """A table with the ``.cs`` field names as columns.

    Bytes fields are decoded to ``str``; a field with several values per
    particle (e.g. ``alignments2D/shift``, shape ``(2,)``) becomes columns
    ``alignments2D/shift/0``, ``alignments2D/shift/1``.
    """
    columns: dict[str, np.ndarray] = {}
    for name in data.dtype.names:
        values = data[name]
        if values.ndim > 1:
            flat = values.reshape(len(values), -1)
            for j in range(flat.shape[1]):
                columns[f"{name}/{j}"] = flat[:, j]
        elif values.dtype.kind == "S":
            columns[name] = np.char.decode(values, "utf-8", errors="replace").astype(object)
        else:
            columns[name] = values
    return pd.DataFrame(columns)


def _floats(path: Path, data: np.ndarray, field: str, scale: float = 1.0) -> np.ndarray:
    values = np.asarray(data[field], dtype=np.float64) * scale
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise ParticleFileError(
            path, f"value {data[field][row]!r} is not a finite number", row=row, column=field
        )
    return values


def read_cs(
    path: str | Path,
    pixel_size_A: float | None = None,
    project_dir: str | Path | None = None,
    *,
    check_stacks_exist: bool = True,
) -> ParticleSet:
    """Read a cryoSPARC ``.cs`` particle file without loading images.

    Parameters
    ----------
    path
        The ``.cs`` file.
    pixel_size_A
        Pixel size in Å, used only when ``blob/psize_A`` is absent or zero.
    project_dir
        cryoSPARC project folder (the one holding ``J1``, ``J2``...). Stack
        paths are tried relative to the ``.cs`` folder, then this folder, then
        as the bare file name in the ``.cs`` folder.
    check_stacks_exist
        Resolve and header-check every stack (fast); ``False`` parses the
        ``.cs`` only.

    Returns
    -------
    ParticleSet
        ``source_format="cryosparc"``; metadata with the ``.cs`` field names;
        defocus in Å, angles converted from radians to degrees. Optics groups
        number the distinct (exposure group, pixel size, voltage, Cs, amplitude
        contrast) combinations from 1.

    Raises
    ------
    ParticleFileError
        Names the ``.cs`` file, and the row and field where relevant: no
        ``blob/path``, no particles, partial CTF fields, non-finite values,
        non-square or mixed box sizes, no pixel size, missing stack (with every
        path tried), image index beyond its stack.
    """
    path = Path(path)
    data = load_cs(path)
    fields = set(data.dtype.names)
    for field in ("blob/path", "blob/idx"):
        if field not in fields:
            raise ParticleFileError(
                path,
                f"no {field} field: this .cs file does not locate particle images "
                "(use the particles .cs of an Extract, Import or 2D/3D job, or its "
                "passthrough file)",
                column=field,
            )
    n = len(data)
    if n == 0:
        raise ParticleFileError(path, "the .cs file holds no particles")
    metadata = cs_to_dataframe(data)

    # Stacks.
    raw = metadata["blob/path"].astype(str).str.strip().str.lstrip(">")
    codes, uniques = pd.factorize(raw, sort=False)
    codes = codes.astype(np.int64)
    raw_index = np.asarray(data["blob/idx"])
    if raw_index.dtype.kind not in "iu":
        as_float = raw_index.astype(np.float64)
        bad = ~np.isfinite(as_float) | (as_float != np.floor(as_float))
        if bad.any():
            row = int(np.argmax(bad))
            raise ParticleFileError(
                path,
                f"image index {float(raw_index[row]):g} is not a whole number",
                row=row,
                column="blob/idx",
            )
    image_index = raw_index.astype(np.int64)
    if (image_index < 0).any():
        row = int(np.argmax(image_index < 0))
        raise ParticleFileError(
            path, f"negative image index {image_index[row]}", row=row, column="blob/idx"
        )
    bases = [path.parent, Path(project_dir) if project_dir is not None else None]
    stacks: list[Path] = []
    for code, name in enumerate(uniques):
        name = str(name)
        tried = candidate_paths(name, bases, as_is=False)
        basename = path.parent / Path(name).name
        if basename not in tried:
            tried.append(basename)
        found = resolve_first(tried)
        if found is None:
            if check_stacks_exist:
                row = int(np.argmax(codes == code))
                raise ParticleFileError(
                    path,
                    f"image stack {name!r} not found; tried: "
                    f"{', '.join(str(t) for t in tried)}. Give the cryoSPARC project "
                    "folder (project_dir / --project-dir).",
                    row=row,
                    column="blob/path",
                )
            found = tried[0]
        stacks.append(found)

    # Box from blob/shape (checked against the stacks below).
    box = 0
    if "blob/shape" in fields:
        shape = np.asarray(data["blob/shape"], dtype=np.int64).reshape(n, -1)
        if shape.shape[1] >= 2:
            nonsquare = shape[:, -1] != shape[:, -2]
            if nonsquare.any():
                row = int(np.argmax(nonsquare))
                raise ParticleFileError(
                    path,
                    f"image shape {tuple(shape[row])} is not square",
                    row=row,
                    column="blob/shape",
                )
        sizes = np.unique(shape[:, -1])
        if len(sizes) > 1:
            rows = [int(np.argmax(shape[:, -1] == s)) for s in sizes[:4]]
            raise ParticleFileError(
                path,
                "particles have different box sizes: "
                + ", ".join(f"{s} px (row {r})" for s, r in zip(sizes, rows, strict=False)),
                column="blob/shape",
            )
        box = int(sizes[0])
    if check_stacks_exist:
        stack_box = check_stacks(
            path, stacks, codes, image_index, index_column="blob/idx", index_base=0
        )
        if box and stack_box != box:
            raise ParticleFileError(
                path,
                f"blob/shape says {box} px images but the stacks hold {stack_box} px images",
                column="blob/shape",
            )
        box = stack_box

    # Pixel size.
    apix = None
    if "blob/psize_A" in fields:
        apix = np.asarray(data["blob/psize_A"], dtype=np.float64)
        if not (apix > 0).any():
            apix = None
    if apix is None:
        if pixel_size_A is None:
            raise ParticleFileError(
                path,
                "no pixel size: blob/psize_A is absent or zero; give the pixel size in Å "
                "(pixel_size_A / --pixel-size)",
                column="blob/psize_A",
            )
        apix = np.full(n, float(pixel_size_A))
    else:
        bad = ~(np.isfinite(apix) & (apix > 0))
        if bad.any():
            row = int(np.argmax(bad))
            raise ParticleFileError(
                path, f"pixel size {apix[row]} is not > 0 Å", row=row, column="blob/psize_A"
            )
        if pixel_size_A is not None and not np.allclose(apix, pixel_size_A, rtol=1e-3):
            warnings.warn(
                f"{path}: the file gives a pixel size of {np.unique(apix)} Å; "
                f"the given {pixel_size_A} Å is not used",
                stacklevel=2,
            )

    ctf = _ctf(path, data, fields)

    # Optics groups: distinct exposure group / optics combinations, numbered from 1.
    keys = {"apix": apix}
    if "ctf/exp_group_id" in fields:
        keys["exp"] = np.asarray(data["ctf/exp_group_id"], dtype=np.int64)
    if ctf is not None:
        keys.update(kv=ctf.voltage_kV, cs=ctf.cs_mm, ac=ctf.amplitude_contrast)
    groups = pd.DataFrame(keys).groupby(list(keys), sort=True).ngroup().to_numpy() + 1

    return ParticleSet(
        metadata,
        ImageSource(stacks, codes, image_index),
        apix,
        box,
        ctf=ctf,
        optics=None,
        optics_group=groups.astype(np.int64),
        source_path=path,
        source_format="cryosparc",
    )


def _ctf(path: Path, data: np.ndarray, fields: set[str]) -> CTFParams | None:
    present = [f for f in REQUIRED_CTF_FIELDS if f in fields]
    if not present:
        return None
    missing = [f for f in REQUIRED_CTF_FIELDS if f not in fields]
    if missing:
        raise ParticleFileError(
            path,
            f"incomplete CTF fields: has {', '.join(present)} but not {', '.join(missing)}",
            column=missing[0],
        )
    values = {}
    for field, (name, scale) in REQUIRED_CTF_FIELDS.items():
        values[name] = _floats(path, data, field, scale)
    for field, (name, scale) in OPTIONAL_CTF_FIELDS.items():
        if field in fields:
            values[name] = _floats(path, data, field, scale)
        else:
            values[name] = np.zeros(len(data), dtype=np.float64)
    return CTFParams(**values)
