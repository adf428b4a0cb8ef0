"""Class selection without Qt: load a 2D classification result, export chosen classes.

A result is what a 2D classification wrote: a particle table with
``rlnClassNumber`` (``run_data.star``), the class averages (``run_classes.mrcs``)
and the per-class model (``run_model.star``). RELION Class2D folders
(``run_itNNN_data.star`` ...) are read too; the last iteration is taken.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from napari_class2d.engine.lineage import LINEAGE_FILE, read_lineage
from napari_class2d.io.errors import ParticleFileError
from napari_class2d.io.mrc import open_stack, read_stack_header
from napari_class2d.io.particles import ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.starparse import read_star_blocks
from napari_class2d.io.writers import write_class_averages, write_particle_star

#: model.star columns that may hold a class's ECA (effective number of classes assigned)
ECA_COLUMNS = ("rlnClassECA", "rlnEffectiveNumberOfClasses", "rlnClassEffectiveClassesAssigned")

_ITER_DATA = re.compile(r"^(?P<root>.*)_it(?P<it>\d+)_data\.star$")


@dataclass
class ClassificationResult:
    """A 2D classification result, ready for class selection.

    Attributes
    ----------
    data_star
        The particle file with ``rlnClassNumber`` (1-based).
    model_star, classes_mrcs
        The model and the class-average stack (``None`` when absent).
    particles
        The particle table with every original column, one row per particle.
    optics
        The RELION 3.1+ optics table, or ``None`` (RELION 3.0 files).
    class_number
        1-based class of each particle, ``(N,)`` int64.
    class_averages
        ``(K, D, D)`` float32 class averages, or ``None`` when the stack is absent.
    pixel_size_A
        Pixel size of the class averages in Å (``None`` when unknown).
    class_counts
        Particles per class, ``(K,)`` (class k at index k-1).
    class_resolution_A
        Estimated resolution per class in Å (``inf`` when unknown).
    class_eca
        Effective number of classes assigned per class (``nan`` when the model has none).
    class_distribution
        Class prior from the model, ``(K,)`` (``counts / N`` when the model has none).
    iteration
        Iteration number of a RELION ``_itNNN_`` result, else ``None``.
    particle_set
        The particles as a :class:`ParticleSet` (stack paths resolved as the
        readers do; images are not needed to export a selection).
    particle_diameter_A
        The particle diameter the job ran with, Å (``rlnParticleDiameter`` of the model,
        or of a RELION job's ``*_optimiser.star``), or ``None``.
    lineage
        The job's class lineage record (``run_lineage.json`` beside the particle file,
        see :mod:`napari_class2d.engine.lineage`), or ``None``.
    lineage_file
        That file, or ``None``.
    """

    data_star: Path
    model_star: Path | None
    classes_mrcs: Path | None
    particles: pd.DataFrame
    optics: pd.DataFrame | None
    class_number: np.ndarray
    class_averages: np.ndarray | None
    pixel_size_A: float | None
    class_counts: np.ndarray
    class_resolution_A: np.ndarray
    class_eca: np.ndarray
    class_distribution: np.ndarray
    iteration: int | None = None
    particle_set: ParticleSet | None = None
    particle_diameter_A: float | None = None
    lineage: dict | None = None
    lineage_file: Path | None = None

    @property
    def n_classes(self) -> int:
        return int(len(self.class_counts))

    @property
    def n_particles(self) -> int:
        return int(len(self.particles))

    def metric(self, name: str) -> np.ndarray:
        """Per-class values of ``"count"``, ``"resolution"`` (Å) or ``"eca"``."""
        table = {
            "count": self.class_counts.astype(np.float64),
            "resolution": self.class_resolution_A,
            "eca": self.class_eca,
        }
        if name not in table:
            raise ValueError(f"unknown class metric {name!r}; expected one of {sorted(table)}")
        return table[name]

    def particle_mask(self, keep_classes: Iterable[int]) -> np.ndarray:
        """Boolean ``(N,)``: particles whose class is in ``keep_classes`` (1-based)."""
        keep = _check_classes(keep_classes, self.n_classes)
        return np.isin(self.class_number, keep)

    def empty_classes(self, keep_classes: Iterable[int]) -> np.ndarray:
        """The classes of ``keep_classes`` (1-based) that hold no particle."""
        keep = _check_classes(keep_classes, self.n_classes)
        return keep[self.class_counts[keep - 1] == 0]

    @property
    def own_files(self) -> list[Path]:
        """The files of the result itself (never written over by an export)."""
        files = (self.data_star, self.model_star, self.classes_mrcs, self.lineage_file)
        return [p for p in files if p is not None]

    def n_particles_in(self, keep_classes: Iterable[int]) -> int:
        """Particles in the classes ``keep_classes`` (1-based)."""
        keep = _check_classes(keep_classes, self.n_classes)
        return int(self.class_counts[keep - 1].sum()) if len(keep) else 0


def _check_classes(keep_classes: Iterable[int], n_classes: int) -> np.ndarray:
    keep = np.unique(np.asarray(list(keep_classes), dtype=np.int64))
    bad = keep[(keep < 1) | (keep > n_classes)]
    if len(bad):
        raise ValueError(
            f"class number(s) {', '.join(map(str, bad))} out of range: classes are 1..{n_classes}"
        )
    return keep


# -- finding the files ----------------------------------------------------------------
def find_result_files(result: str | Path) -> tuple[Path, Path | None, Path | None, int | None]:
    """``(data_star, model_star, classes_mrcs, iteration)`` of a result folder or file.

    ``result`` is a folder (``run_data.star``, or the last ``*_itNNN_data.star``
    of a RELION Class2D job) or a ``*_data.star`` / ``*_model.star`` file.
    """
    result = Path(result)
    if result.is_dir():
        data = result / "run_data.star"
        if not data.is_file():
            found = []
            for p in result.glob("*_it*_data.star"):
                m = _ITER_DATA.match(p.name)
                if m:
                    found.append((int(m["it"]), p))
            if not found:
                raise FileNotFoundError(
                    f"{result}: no run_data.star or RELION run_itNNN_data.star in this folder"
                )
            data = max(found)[1]
    elif result.name.endswith("_model.star"):
        data = result.with_name(result.name[: -len("_model.star")] + "_data.star")
    else:
        data = result
    if not data.is_file():
        raise FileNotFoundError(f"{data}: result particle file not found")
    stem = data.name[: -len("_data.star")] if data.name.endswith("_data.star") else data.stem
    model = data.with_name(stem + "_model.star")
    classes = data.with_name(stem + "_classes.mrcs")
    m = _ITER_DATA.match(data.name)
    return (
        data,
        model if model.is_file() else None,
        classes if classes.is_file() else None,
        int(m["it"]) if m else None,
    )


# -- reading ----------------------------------------------------------------------------
def _read_data_star(path: Path, project_dir=None) -> ParticleSet:
    particles = read_particles(path, project_dir=project_dir, check_stacks=False)
    if "rlnClassNumber" not in particles.metadata.columns:
        raise ParticleFileError(
            path,
            "no rlnClassNumber column: not a 2D classification result",
            column="rlnClassNumber",
        )
    return particles


def _read_model_classes(path: Path) -> pd.DataFrame | None:
    blocks = read_star_blocks(path)
    classes = blocks.get("model_classes")
    return classes.reset_index(drop=True) if isinstance(classes, pd.DataFrame) else None


def _read_stack(path: Path) -> tuple[np.ndarray, float | None]:
    apix = read_stack_header(path).voxel_size_A
    data = np.array(open_stack(path), dtype=np.float32)
    return data, (apix if apix > 0 else None)


def load_result(result: str | Path, project_dir: str | Path | None = None) -> ClassificationResult:
    """Load a classification result folder, ``*_data.star`` or ``*_model.star``.

    ``project_dir`` is the RELION project folder when image paths are relative to it
    (tried automatically: the result folder and its two parents).

    Raises
    ------
    FileNotFoundError
        When the folder holds no result particle file.
    ParticleFileError
        When the particle file has no ``rlnClassNumber`` or a class number is invalid.
    """
    data_star, model_star, classes_mrcs, iteration = find_result_files(result)
    particle_set = _read_data_star(data_star, project_dir)
    particles, optics = particle_set.metadata, particle_set.optics
    class_number = pd.to_numeric(particles["rlnClassNumber"], errors="coerce").to_numpy()
    bad = np.nonzero(~np.isfinite(class_number) | (class_number < 1))[0]
    if len(bad):
        raise ParticleFileError(
            data_star,
            f"rlnClassNumber must be an integer >= 1, got {particles['rlnClassNumber'][bad[0]]!r}",
            row=int(bad[0]),
            column="rlnClassNumber",
        )
    class_number = class_number.astype(np.int64)

    model = _read_model_classes(model_star) if model_star is not None else None
    averages, apix = _read_stack(classes_mrcs) if classes_mrcs is not None else (None, None)
    if model is not None:
        n_classes = len(model)
    elif averages is not None:
        n_classes = len(averages)
    else:
        n_classes = int(class_number.max()) if len(class_number) else 0
    if len(class_number) and class_number.max() > n_classes:
        row = int(np.argmax(class_number))
        raise ParticleFileError(
            data_star,
            f"class {class_number[row]} but the result has {n_classes} classes",
            row=row,
            column="rlnClassNumber",
        )

    counts = np.bincount(class_number - 1, minlength=n_classes)[:n_classes]

    def model_column(name: str, default: float) -> np.ndarray:
        if model is not None and name in model:
            return np.array(pd.to_numeric(model[name], errors="coerce"), dtype=np.float64)
        return np.full(n_classes, default, dtype=np.float64)

    resolution = model_column("rlnEstimatedResolution", np.inf)
    # RELION writes 999 Å for "not determined"
    resolution[~np.isfinite(resolution) | (resolution <= 0) | (resolution >= 999)] = np.inf
    eca = np.full(n_classes, np.nan)
    for name in ECA_COLUMNS:
        if model is not None and name in model:
            eca = model_column(name, np.nan)
            break
    if model is not None and "rlnClassDistribution" in model:
        distribution = model_column("rlnClassDistribution", 0.0)
    else:
        distribution = counts / max(counts.sum(), 1)
    if apix is None and model_star is not None:
        apix = _model_pixel_size(model_star)
    diameter = _model_general(model_star, "rlnParticleDiameter") if model_star else None
    if diameter is None:
        optimiser = data_star.with_name(data_star.name.replace("_data.star", "_optimiser.star"))
        if optimiser != data_star and optimiser.is_file():
            diameter = _model_general(optimiser, "rlnParticleDiameter")
    lineage, lineage_file = _lineage_beside(data_star, n_classes)
    return ClassificationResult(
        data_star=data_star,
        model_star=model_star,
        classes_mrcs=classes_mrcs,
        particles=particles,
        optics=optics,
        class_number=class_number,
        class_averages=averages,
        pixel_size_A=apix,
        class_counts=counts,
        class_resolution_A=resolution,
        class_eca=eca,
        class_distribution=distribution,
        iteration=iteration,
        particle_set=particle_set,
        particle_diameter_A=diameter if diameter and diameter > 0 else None,
        lineage=lineage,
        lineage_file=lineage_file,
    )


def _model_pixel_size(model_star: Path) -> float | None:
    return _model_general(model_star, "rlnPixelSize")


def _model_general(star: Path, label: str) -> float | None:
    """A number from the first block of ``star`` that holds ``label`` as a single value
    (``data_model_general``, RELION's ``data_optimiser_general``), or ``None``."""
    for block in read_star_blocks(star).values():
        try:
            if isinstance(block, dict) and label in block:
                return float(block[label])
            if isinstance(block, pd.DataFrame) and label in block and len(block) == 1:
                return float(block[label].iloc[0])
        except (TypeError, ValueError):
            return None
    return None


def _lineage_beside(data_star: Path, n_classes: int) -> tuple[dict | None, Path | None]:
    """The lineage record written beside ``run_data.star`` when it fits the result."""
    if data_star.name != "run_data.star":
        return None, None
    path = data_star.with_name(LINEAGE_FILE)
    if not path.is_file():
        return None, None
    try:
        record = read_lineage(path)
    except (OSError, ValueError):
        return None, path
    if int(record.get("n_classes", -1)) != n_classes:
        return None, path
    return record, path


# -- selecting --------------------------------------------------------------------------
def classes_by_threshold(
    result: ClassificationResult, metric: str, threshold: float, side: str = "above"
) -> np.ndarray:
    """1-based classes whose ``metric`` is ``>= threshold`` (``"above"``) or ``<=`` (``"below"``).

    The comparison is literal: for ``"resolution"`` (Å) the good classes are
    *below* a threshold. Classes with unknown values (``inf``/``nan``) are never chosen.
    """
    values = result.metric(metric)
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below', got {side!r}")
    known = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        chosen = (values >= threshold) if side == "above" else (values <= threshold)
    return np.nonzero(chosen & known)[0] + 1


def sort_classes(result: ClassificationResult, by: str = "count") -> np.ndarray:
    """1-based class numbers, best first: most particles, finest resolution or lowest ECA."""
    if by == "class":
        return np.arange(1, result.n_classes + 1)
    values = result.metric(by)
    if by == "count":
        key = -values
    else:  # finer resolution (smaller Å) and fewer classes assigned are better
        key = np.where(np.isfinite(values), values, np.inf)
    return np.argsort(key, kind="stable") + 1


# -- exporting --------------------------------------------------------------------------
def export_selection(
    result: ClassificationResult | str | Path,
    keep_classes: Iterable[int],
    out_star: str | Path,
    rejected_out: str | Path | None = None,
    classes_out: str | Path | None = None,
    overwrite: bool = False,
) -> int:
    """Write the particles of the kept classes (RELION STAR, original columns kept).

    Parameters
    ----------
    result
        A loaded result, or a result folder / ``*_data.star`` to load.
    keep_classes
        1-based class numbers to keep.
    out_star
        The particle STAR file to write; the optics table keeps only the optics
        groups of the kept particles.
    rejected_out
        Also write the particles of the other classes here.
    classes_out
        Also write the kept class averages (in ``keep_classes`` order, ascending) here.
    overwrite
        Replace existing files; otherwise an existing file is an error.

    Returns
    -------
    int
        Number of particles written to ``out_star``.

    Raises
    ------
    ValueError
        An output is one of the result's own files, or two outputs are the same file.
    FileExistsError
        An output exists and ``overwrite`` is false.
    """
    if not isinstance(result, ClassificationResult):
        result = load_result(result)
    keep = _check_classes(keep_classes, result.n_classes)
    outputs = [Path(p) for p in (out_star, rejected_out, classes_out) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ValueError("out_star, rejected_out and classes_out must be different files")
    own = {p.resolve() for p in result.own_files}
    for p in outputs:
        if p.resolve() in own:
            raise ValueError(
                f"{p} is a file of the classification result itself; write the selection "
                "to another file (the result is never replaced, even with --overwrite)"
            )
    if not overwrite:
        for p in outputs:
            if p.exists():
                raise FileExistsError(f"{p}: exists (pass overwrite=True to replace it)")
    if classes_out is not None and result.class_averages is None:
        raise FileNotFoundError(f"{result.data_star}: the result has no class averages to write")
    mask = result.particle_mask(keep)
    _write_particles(Path(out_star), result, mask, overwrite)
    if rejected_out is not None:
        _write_particles(Path(rejected_out), result, ~mask, overwrite)
    if classes_out is not None:
        _write_averages(
            Path(classes_out), result.class_averages[keep - 1], result.pixel_size_A, overwrite
        )
    return int(mask.sum())


def _write_particles(path: Path, result: ClassificationResult, mask: np.ndarray, overwrite):
    write_particle_star(path, result.particle_set, rows=np.nonzero(mask)[0], overwrite=overwrite)


def _write_averages(path: Path, averages: np.ndarray, pixel_size_A, overwrite):
    write_class_averages(path, averages, pixel_size_A or 1.0, overwrite=overwrite)
