"""Tiny 2D classification results written with starfile/mrcfile (for selection tests)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def make_result(
    folder: Path,
    n_particles: int = 60,
    n_classes: int = 5,
    box: int = 16,
    prefix: str = "run",
    relion_30: bool = False,
    seed: int = 0,
    eca: bool = True,
) -> dict:
    """Write ``{prefix}_data.star``, ``_classes.mrcs``, ``_model.star`` into ``folder``.

    Particles of classes 1-2 are in optics group 1, the rest in group 2, so a
    selection of classes 1-2 must drop optics group 2 from the optics table.
    Returns the written tables and arrays for comparison.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = rng.integers(1, n_classes + 1, n_particles)
    classes[:n_classes] = np.arange(1, n_classes + 1)  # every class present
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Extract/job007/stack.mrcs" for i in range(n_particles)],
            "rlnDefocusU": rng.uniform(8000, 30000, n_particles).round(2),
            "rlnDefocusV": rng.uniform(8000, 30000, n_particles).round(2),
            "rlnDefocusAngle": rng.uniform(0, 180, n_particles).round(2),
            "rlnMicrographName": [f"mic{i // 10:03d}.mrc" for i in range(n_particles)],
            "rlnClassNumber": classes,
            "rlnAnglePsi": rng.uniform(0, 360, n_particles).round(3),
            "rlnOriginXAngst": rng.normal(0, 2, n_particles).round(3),
            "rlnOriginYAngst": rng.normal(0, 2, n_particles).round(3),
            "rlnMaxValueProbDistribution": rng.uniform(0, 1, n_particles).round(4),
        }
    )
    optics = None
    if relion_30:
        particles["rlnMagnification"] = 10000.0
        particles["rlnDetectorPixelSize"] = 2.0
        particles["rlnVoltage"] = 300.0
        particles["rlnSphericalAberration"] = 2.7
        particles["rlnAmplitudeContrast"] = 0.1
        starfile.write(particles, folder / f"{prefix}_data.star", overwrite=True)
    else:
        particles["rlnOpticsGroup"] = np.where(classes <= 2, 1, 2)
        optics = pd.DataFrame(
            {
                "rlnOpticsGroup": [1, 2],
                "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
                "rlnImagePixelSize": [2.0, 2.0],
                "rlnImageSize": [box, box],
                "rlnVoltage": [300.0, 300.0],
                "rlnSphericalAberration": [2.7, 2.7],
                "rlnAmplitudeContrast": [0.1, 0.1],
            }
        )
        starfile.write(
            {"optics": optics, "particles": particles},
            folder / f"{prefix}_data.star",
            overwrite=True,
        )
    averages = rng.normal(size=(n_classes, box, box)).astype(np.float32)
    with mrcfile.new(folder / f"{prefix}_classes.mrcs", overwrite=True) as mrc:
        mrc.set_data(averages)
        mrc.voxel_size = 2.0
    resolution = np.linspace(8.0, 20.0, n_classes)
    model_classes = pd.DataFrame(
        {
            "rlnReferenceImage": [
                f"{k:06d}@{prefix}_classes.mrcs" for k in range(1, n_classes + 1)
            ],
            "rlnClassDistribution": np.bincount(classes - 1, minlength=n_classes) / n_particles,
            "rlnEstimatedResolution": resolution,
        }
    )
    if eca:
        model_classes["rlnClassECA"] = np.linspace(1.0, 3.0, n_classes)
    general = pd.DataFrame({"rlnNrClasses": [n_classes], "rlnPixelSize": [2.0]})
    starfile.write(
        {"model_general": general, "model_classes": model_classes},
        folder / f"{prefix}_model.star",
        overwrite=True,
    )
    return {
        "particles": particles,
        "optics": optics,
        "classes": classes,
        "averages": averages,
        "resolution": resolution,
    }


def make_ranked_result(folder: Path, seed: int = 0, lineage: bool = True) -> dict:
    """A 2D classification result whose classes a ranking should tell apart.

    Box 32 at 5 Å, particle diameter 120 Å (``rlnParticleDiameter``). Classes (1-based):
    1-2 one view (two classes, turned 10° apart), 3-4 a second view, 5 a third, 6 a
    fourth view with only 8 particles (the rare view), 7 a noise texture, 8 a round blob,
    9 empty. The particles are their class average turned and shifted by their pose
    (``rlnAnglePsi``, ``rlnOriginX/YAngst``) plus noise, on two micrographs that are
    written (``Micrographs/mic_1.mrc`` …, 400 x 400 px). With ``lineage`` a
    ``run_lineage.json`` records class 9 as stable for five updates, then emptied into
    class 1.
    """
    import torch

    from napari_class2d.engine.lineage import LINEAGE_FILE, ClassLineage
    from napari_class2d.sim.transforms import rotate_and_shift
    from synthetic import blob_views

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    box, apix = 32, 5.0
    views = blob_views(5, box, seed=11)
    c = np.arange(box) - box // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2

    def turned(image, deg):
        t = torch.from_numpy(image[None].astype(np.float32))
        return rotate_and_shift(t, torch.tensor([deg]), torch.zeros(1, 2), apix)[0].numpy()

    noise = rng.normal(size=(box, box)).astype(np.float32) * (r2 < 14**2)
    blob = np.exp(-r2 / (2 * 4.0**2)).astype(np.float32)
    averages = np.stack(
        [
            views[0],
            turned(views[0], 10.0),
            views[1],
            turned(views[1], 10.0),
            views[2],
            views[3],
            noise,
            blob,
            np.zeros((box, box), np.float32),
        ]
    ).astype(np.float32)
    counts = np.array([120, 110, 100, 105, 90, 8, 40, 30, 0])
    resolution = np.array([12.0, 12.5, 13.0, 12.5, 13.5, 15.0, 40.0, 35.0, 999.0])
    probability = np.array([0.5, 0.45, 0.5, 0.5, 0.55, 0.5, 0.1, 0.15, 0.0])
    classes = np.repeat(np.arange(1, 10), counts)
    n = len(classes)
    psi = rng.uniform(0, 360, n)
    shift = rng.uniform(-4, 4, (n, 2))  # Å
    images = rotate_and_shift(
        torch.from_numpy(averages[classes - 1]),
        torch.from_numpy(psi).float(),
        torch.from_numpy(shift).float(),
        apix,
    ).numpy()
    images += rng.normal(0, 0.3 * averages[:5].std(), images.shape).astype(np.float32)
    (folder / "Particles").mkdir(exist_ok=True)
    with mrcfile.new(folder / "Particles" / "stack.mrcs", overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.voxel_size = apix
    mic = np.where(np.arange(n) % 2 == 0, 1, 2)
    (folder / "Micrographs").mkdir(exist_ok=True)
    for m in (1, 2):
        with mrcfile.new(folder / "Micrographs" / f"mic_{m}.mrc", overwrite=True) as mrc:
            mrc.set_data(rng.normal(size=(400, 400)).astype(np.float32))
            mrc.voxel_size = apix
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(n)],
            "rlnMicrographName": [f"Micrographs/mic_{m}.mrc" for m in mic],
            "rlnCoordinateX": rng.uniform(20, 380, n).round(1),
            "rlnCoordinateY": rng.uniform(20, 380, n).round(1),
            "rlnOpticsGroup": 1,
            "rlnClassNumber": classes,
            "rlnAnglePsi": psi.round(3),
            "rlnOriginXAngst": (-shift[:, 0]).round(4),
            "rlnOriginYAngst": (-shift[:, 1]).round(4),
            "rlnMaxValueProbDistribution": np.clip(
                probability[classes - 1] + rng.normal(0, 0.05, n), 0.01, 1
            ).round(4),
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnMicrographOriginalPixelSize": [apix],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    starfile.write(
        {"optics": optics, "particles": particles}, folder / "run_data.star", overwrite=True
    )
    with mrcfile.new(folder / "run_classes.mrcs", overwrite=True) as mrc:
        mrc.set_data(averages)
        mrc.voxel_size = apix
    model_classes = pd.DataFrame(
        {
            "rlnReferenceImage": [f"{k:06d}@run_classes.mrcs" for k in range(1, 10)],
            "rlnClassDistribution": counts / n,
            "rlnEstimatedResolution": resolution,
        }
    )
    general = pd.DataFrame(
        {"rlnNrClasses": [9], "rlnPixelSize": [apix], "rlnParticleDiameter": [120.0]}
    )
    starfile.write(
        {"model_general": general, "model_classes": model_classes},
        folder / "run_model.star",
        overwrite=True,
    )
    if lineage:
        record = ClassLineage(9)
        final = classes - 1
        earlier = final.copy()
        earlier[:30] = 8  # 30 particles of class 1 were class 9's
        for it in range(1, 6):
            record.update(it, "online", earlier, resolution)
        record.update(6, "full", final, resolution)
        record.write(folder / LINEAGE_FILE)
    return {
        "classes": classes,
        "counts": counts,
        "averages": averages,
        "rare": 6,
        "junk": [7, 8],
        "empty": 9,
    }
