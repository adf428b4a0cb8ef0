"""Read class models (``*_model.star``) and class averages (``*_classes.mrcs``).

Reads what this package writes and what RELION Class2D/Class3D/Refine3D write:
``data_model_general`` plus ``data_model_classes`` whose ``rlnReferenceImage``
is ``NNNNNN@run_it025_classes.mrcs`` (2D) or one file per class (3D).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import first_nonfinite, open_stack, read_stack_header
from napari_class2d.io.paths import candidate_paths, project_folders, resolve_first
from napari_class2d.io.starparse import read_star_blocks
from napari_class2d.io.writers import RELION_NO_RESOLUTION


@dataclass
class ClassModel:
    """The class table of a model STAR file.

    Attributes
    ----------
    path
        The model file.
    general
        ``data_model_general`` entries (RELION names).
    classes
        ``data_model_classes`` with its original columns, one row per class.
    class_numbers
        1-based class numbers, shape ``(K,)``.
    reference_paths
        Resolved file of each class reference (``None`` when not found).
    reference_index
        0-based image index of each reference in its file, shape ``(K,)``.
    distribution
        ``rlnClassDistribution`` (fraction of particles), shape ``(K,)``.
    resolution_A
        ``rlnEstimatedResolution`` in Å with RELION's 999 read as ``inf``
        (NaN when the column is absent), shape ``(K,)``.
    pixel_size_A
        ``rlnPixelSize`` in Å (NaN when absent).
    reference_dimensionality
        2 for 2D classes, 3 for 3D references.
    """

    path: Path
    general: dict
    classes: pd.DataFrame
    class_numbers: np.ndarray
    reference_paths: list[Path | None]
    reference_index: np.ndarray
    distribution: np.ndarray
    resolution_A: np.ndarray
    pixel_size_A: float
    reference_dimensionality: int

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class ClassAverages:
    """2D class averages with what is known about them.

    Attributes
    ----------
    images
        ``(K, D, D)`` float32.
    pixel_size_A
        Pixel size in Å (``None`` when neither model nor header says).
    class_numbers
        1-based class numbers, shape ``(K,)``.
    distribution, resolution_A
        Per class, from the model (``None`` when read from a bare stack).
    source_path
        The file read.
    """

    images: np.ndarray
    pixel_size_A: float | None
    class_numbers: np.ndarray
    distribution: np.ndarray | None
    resolution_A: np.ndarray | None
    source_path: Path


def read_model_star(path: str | Path, project_dir: str | Path | None = None) -> ClassModel:
    """Read the class table of a RELION-style model STAR file.

    Parameters
    ----------
    path
        ``run_model.star`` (this package) or ``run_itNNN_model.star`` (RELION).
    project_dir
        RELION project folder, tried when a reference path is not found
        relative to the model file's folder.

    Raises
    ------
    ParticleFileError
        Missing file, no ``data_model_classes`` block or no
        ``rlnReferenceImage`` column.
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    classes = blocks.get("model_classes")
    if isinstance(classes, dict):
        classes = pd.DataFrame({k: [v] for k, v in classes.items()})
    if not isinstance(classes, pd.DataFrame):
        names = ", ".join(f"data_{n}" for n in blocks)
        raise ParticleFileError(
            path, f"no data_model_classes block (blocks: {names}); expected a model STAR file"
        )
    if "rlnReferenceImage" not in classes.columns:
        raise ParticleFileError(
            path, "data_model_classes has no rlnReferenceImage column", column="rlnReferenceImage"
        )
    classes = classes.reset_index(drop=True)
    general = blocks.get("model_general")
    general = dict(general) if isinstance(general, dict) else {}

    names = classes["rlnReferenceImage"].astype(str).str.strip()
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna()
    files = parts[1].where(has_at, parts[0])
    index = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce")
    if index.isna().any():
        row = int(np.argmax(index.isna().to_numpy()))
        raise ParticleFileError(
            path,
            f"reference {names.iloc[row]!r} is not NNNNNN@file",
            row=row,
            column="rlnReferenceImage",
        )
    bases = [path.parent, Path(project_dir) if project_dir is not None else None]
    ancestors = project_folders(path)
    resolved: dict[str, Path | None] = {}
    for name in files.unique():
        tried = candidate_paths(name, bases, then=ancestors)
        tried.append(path.parent / Path(name).name)
        resolved[name] = resolve_first(tried)
    k = len(classes)

    def floats(column: str, default: float) -> np.ndarray:
        if column in classes.columns:
            return pd.to_numeric(classes[column], errors="coerce").to_numpy(dtype=np.float64)
        return np.full(k, default)

    resolution = floats("rlnEstimatedResolution", np.nan)
    resolution = np.where(resolution >= RELION_NO_RESOLUTION, np.inf, resolution)
    return ClassModel(
        path=path,
        general=general,
        classes=classes,
        class_numbers=np.arange(1, k + 1),
        reference_paths=[resolved[f] for f in files],
        reference_index=index.to_numpy(dtype=np.int64) - 1,
        distribution=floats("rlnClassDistribution", np.nan),
        resolution_A=resolution,
        pixel_size_A=float(general.get("rlnPixelSize", np.nan)),
        reference_dimensionality=int(general.get("rlnReferenceDimensionality", 2)),
    )


def read_class_averages(path: str | Path, project_dir: str | Path | None = None) -> ClassAverages:
    """Read 2D class averages from a model STAR file or a ``.mrcs`` stack.

    Parameters
    ----------
    path
        ``*_model.star`` (images found through ``rlnReferenceImage``) or
        ``*_classes.mrcs``.
    project_dir
        RELION project folder for model files with project-relative paths.

    Returns
    -------
    ClassAverages

    Raises
    ------
    ParticleFileError
        3D model, missing or bad reference stack, image index beyond the stack,
        NaN/inf pixels.
    """
    path = Path(path)
    if path.suffix.lower() != ".star":
        header = read_stack_header(path)
        data = open_stack(path)
        images = np.asarray(data, dtype=np.float32)
        _check_finite(path, images)
        return ClassAverages(
            images=images,
            pixel_size_A=header.voxel_size_A if header.voxel_size_A > 0 else None,
            class_numbers=np.arange(1, len(images) + 1),
            distribution=None,
            resolution_A=None,
            source_path=path,
        )
    model = read_model_star(path, project_dir)
    if model.reference_dimensionality != 2:
        raise ParticleFileError(
            path,
            f"rlnReferenceDimensionality is {model.reference_dimensionality}: this model "
            "holds 3D references, not 2D class averages",
            column="rlnReferenceDimensionality",
        )
    images = None
    for file in dict.fromkeys(model.reference_paths):
        rows = [i for i, p in enumerate(model.reference_paths) if p == file]
        if file is None:
            raise ParticleFileError(
                path,
                f"class average stack {model.classes['rlnReferenceImage'].iloc[rows[0]]!r} "
                "not found (tried the model folder, project_dir and its parents)",
                row=rows[0],
                column="rlnReferenceImage",
            )
        data = open_stack(file)
        idx = model.reference_index[rows]
        if (idx >= len(data)).any() or (idx < 0).any():
            bad = rows[int(np.argmax((idx >= len(data)) | (idx < 0)))]
            raise ParticleFileError(
                path,
                f"reference image {model.reference_index[bad] + 1} is outside {file} "
                f"({len(data)} images)",
                row=bad,
                column="rlnReferenceImage",
            )
        block = np.asarray(data[idx], dtype=np.float32)
        _check_finite(file, block, idx)
        if images is None:
            images = np.empty((model.n_classes,) + block.shape[1:], dtype=np.float32)
        images[rows] = block
    pixel = model.pixel_size_A if np.isfinite(model.pixel_size_A) else None
    return ClassAverages(
        images=images,
        pixel_size_A=pixel,
        class_numbers=model.class_numbers,
        distribution=model.distribution,
        resolution_A=model.resolution_A,
        source_path=path,
    )


def _check_finite(path: Path, images: np.ndarray, index: np.ndarray | None = None) -> None:
    bad = first_nonfinite(images)
    if bad is not None:
        i = int(index[bad]) if index is not None else bad
        raise ParticleFileError(path, f"class image {i} (0-based) has NaN or infinite pixels")
