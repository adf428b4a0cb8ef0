"""Helpers of the real-data benchmarks (``real_betagal.py``, ``raw_micrographs.py``).

Running the classifier on a RELION particle set with the project's defaults, references
to judge class averages against (map projections, round blobs), agreement between two
labelings, and the pictures.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np


# -- classifying -------------------------------------------------------------------------
def classify(particles, settings: dict, out_dir: Path, log=print) -> dict:
    """Run a default job through the engine API; write its outputs into ``out_dir``.

    Returns the paths, the config, per-iteration lines, and the wall and CPU time of the
    classification (CPU: this process, all threads, user + system).
    """
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob

    config = Class2DConfig(**settings).validate()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    job = Class2DJob(particles, config, out_dir=out_dir, overwrite=True)
    iterations = []
    for snap in job.run():
        counts = np.asarray(snap.class_counts_hard)
        line = {
            "iteration": snap.iteration,
            "phase": snap.phase,
            "n_particles_used": snap.n_particles_used,
            "elapsed_s": round(time.perf_counter() - t0, 2),
            "classes_populated": int((counts > 0).sum()),
            "classes_with_20": int((counts >= 20).sum()),
        }
        iterations.append(line)
        log(
            f"  it {snap.iteration:3d}/{snap.n_iterations_planned} {snap.phase:7s} "
            f"{snap.n_particles_used:6d} particles  {line['elapsed_s']:7.1f} s  "
            f"{line['classes_populated']:3d} classes populated ({line['classes_with_20']} with "
            f">= 20)"
        )
    paths = job.write_outputs(out_dir, overwrite=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "config": config.to_dict(),
        "iterations": iterations,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
    }


def read_result(job_dir: Path) -> dict:
    """Class averages ``(K, D, D)``, their pixel size, the particle table of a job and the
    engine's own resolution estimate per class (Å, from ``run_model.star``)."""
    import mrcfile
    import starfile

    from napari_class2d.selection import load_result

    with mrcfile.open(job_dir / "run_classes.mrcs", permissive=True) as mrc:
        averages = np.asarray(mrc.data, dtype=np.float32).copy()
        apix = float(mrc.voxel_size.x)
    data = starfile.read(job_dir / "run_data.star", always_dict=True)
    table = data.get("particles", next(iter(data.values())))
    resolution = load_result(job_dir).class_resolution_A
    return {
        "averages": averages,
        "pixel_size_A": apix,
        "particles": table,
        "resolution_A": np.asarray(resolution, dtype=float),
    }


def finite(value, digits: int = 1) -> float | None:
    """``value`` rounded, or None when it is not finite (JSON has no infinity)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


# -- references --------------------------------------------------------------------------
def map_projections(path: Path, pixel_size_A: float, box: int, n_directions: int) -> dict:
    """Projections of a map over ``n_directions`` near-uniform directions of the whole sphere.

    Returns ``images`` ``(n, D, D)``, ``rot_deg``, ``tilt_deg`` and the map's info.
    """
    from napari_class2d.sim.maps import load_map
    from napari_class2d.sim.project import FourierProjector
    from napari_class2d.sim.views import fibonacci_directions

    volume, info = load_map(path, pixel_size_A, box)
    rot, tilt = fibonacci_directions(n_directions, np.random.default_rng(0))
    images = FourierProjector(volume).project(rot, tilt, 0.0).numpy()
    return {"images": images, "rot_deg": rot, "tilt_deg": tilt, "info": info}


def equivalent_diameter_A(images: np.ndarray, pixel_size_A: float, level: float = 0.25) -> float:
    """Mean diameter of the disc with the area above ``level x max`` of each image, Å."""
    area = (images > level * images.max(axis=(-2, -1), keepdims=True)).sum(axis=(-2, -1))
    return float(np.mean(2.0 * np.sqrt(area / math.pi)) * pixel_size_A)


def round_blobs(box: int, pixel_size_A: float, diameter_A: float) -> dict[str, np.ndarray]:
    """A soft disc of ``diameter_A`` (10 Å edge) and a Gaussian with ``2 sigma = diameter / 2``."""
    c = np.arange(box) - box // 2
    r = np.hypot(*np.meshgrid(c, c, indexing="ij")) * pixel_size_A
    t = np.clip((r - 0.5 * diameter_A) / 10.0 + 0.5, 0, 1)
    disc = 0.5 * (1 + np.cos(np.pi * t))
    gauss = np.exp(-0.5 * (r / (0.25 * diameter_A)) ** 2)
    return {
        f"disc {diameter_A:.0f} Å": disc.astype(np.float32),
        f"gaussian {diameter_A:.0f} Å": gauss.astype(np.float32),
    }


# -- agreement ---------------------------------------------------------------------------
def normalised_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two labelings, arithmetic normalisation ``2 I / (H(a) + H(b))`` (scikit-learn's
    default); 0 for independent labels, 1 for the same partition."""
    _, ai = np.unique(np.asarray(a), return_inverse=True)
    _, bi = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1.0)
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return 0.0 if ha + hb == 0 else 2.0 * mi / (ha + hb)


def shuffled_nmi(a: np.ndarray, b: np.ndarray, n: int = 5, seed: int = 0) -> float:
    """NMI of ``a`` against ``b`` with ``a`` shuffled: what chance gives for these class sizes."""
    rng = np.random.default_rng(seed)
    return float(np.mean([normalised_mutual_information(rng.permutation(a), b) for _ in range(n)]))


# -- neighbours --------------------------------------------------------------------------
def nearest_neighbour_direction(
    micrograph: np.ndarray, xy_A: np.ndarray, diameter_A: float
) -> np.ndarray:
    """Direction (degrees, from the image x axis toward +y) from each pick to its nearest
    other pick on the same micrograph, NaN where none is nearer than ``diameter_A``."""
    from napari_class2d.engine.neighbours import SAME_PARTICLE_FRACTION, neighbour_offsets_A

    group = np.unique(np.asarray(micrograph).astype(str), return_inverse=True)[1]
    off = neighbour_offsets_A(group, xy_A, diameter_A, SAME_PARTICLE_FRACTION * diameter_A)
    return np.degrees(np.arctan2(off[:, 0, 1], off[:, 0, 0]))


def neighbour_alignment(
    direction_deg: np.ndarray,
    classes: np.ndarray,
    psi_deg: np.ndarray,
    min_members: int = 20,
    sign: float = 1.0,
    seed: int = 0,
) -> dict:
    """How much a classification has aligned its particles on their neighbours.

    For each class with ``min_members`` particles, the mean resultant length ``R`` of the
    directions to its members' nearest neighbours turned into the class frame
    (``direction + sign * psi``): about ``1/sqrt(n)`` when the neighbours lie anywhere
    around the aligned particle, up to 1 when every member was turned until its neighbour
    sits at the same place (the class then shows the neighbour as a crescent at its mask
    edge). Also the same with the angles shuffled among the particles (what chance gives).
    """
    has = np.isfinite(direction_deg)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(np.asarray(psi_deg, float))

    def resultant(angles: np.ndarray) -> float:
        return float(np.abs(np.exp(1j * np.radians(angles)).mean()))

    per_class, chance = {}, []
    for c in np.unique(classes):
        members = classes == c
        near = members & has
        if members.sum() < min_members or near.sum() < 2:
            continue
        per_class[int(c)] = round(resultant(direction_deg[near] + sign * psi_deg[near]), 3)
        chance.append(resultant(direction_deg[near] + sign * shuffled[near]))
    values = list(per_class.values())
    return {
        "share_with_neighbour": round(float(has.mean()), 3),
        "median_R": round(float(np.median(values)), 3) if values else None,
        "median_R_shuffled": round(float(np.median(chance)), 3) if chance else None,
        "classes_R_above_0.3": int(sum(v > 0.3 for v in values)),
        "classes": len(values),
        "per_class_R": per_class,
    }


# -- pictures ----------------------------------------------------------------------------
def show(ax, img, title: str | None = None, color: str = "black") -> None:
    """Grey-scale image, contrast from its 1st to 99.5th percentile, no ticks."""
    lo, hi = np.percentile(img, [1.0, 99.5])
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=6.5, color=color, pad=2, linespacing=1.0)


def save_figure(fig, png: Path, dpi: int = 100) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".part.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(png)
    return png


def class_gallery(
    averages: np.ndarray,
    counts: np.ndarray,
    titles: list[str],
    colors: list[str],
    png: Path,
    title: str,
    ncol: int = 10,
) -> Path:
    """Class averages, largest first (classes with no particle left out), one title each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    ncol = min(ncol, max(1, len(order)))
    nrow = max(1, -(-len(order) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 * ncol, 1.35 * nrow + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), order, strict=False):
        ax.axis("on")
        show(ax, averages[k], titles[k], colors[k])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    out = save_figure(fig, png)
    plt.close(fig)
    return out
