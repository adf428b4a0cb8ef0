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
