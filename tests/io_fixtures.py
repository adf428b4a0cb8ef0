"""Small real particle files for the io tests, written with mrcfile and starfile."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def write_stack(
    path: Path,
    n: int = 6,
    box: int = 16,
    *,
    voxel_size: float = 1.5,
    volume: bool = False,
    data: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Write an MRC stack (``ispg`` 0) or, with ``volume``, a map (``ispg`` 1)."""
    if data is None:
        data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data))
        if volume:
            mrc.set_volume()
        else:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_size
    return data


def ctf_columns(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    du = rng.uniform(8000, 30000, n).round(2)
    return {
        "rlnDefocusU": du,
        "rlnDefocusV": (du - rng.uniform(0, 500, n)).round(2),
        "rlnDefocusAngle": rng.uniform(-180, 180, n).round(3),
    }


def image_names(stack: str, indices) -> list[str]:
    return [f"{i + 1:06d}@{stack}" for i in indices]


def relion31_blocks(
    n: int = 6,
    stack: str = "stack.mrcs",
    *,
    groups: tuple[int, ...] = (1,),
    pixel_sizes: tuple[float, ...] | None = None,
    box: int = 16,
) -> dict[str, pd.DataFrame]:
    """RELION 3.1 optics + particles blocks; particle i is image i of ``stack``."""
    pixel_sizes = pixel_sizes or tuple(1.5 for _ in groups)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
            "rlnOpticsGroup": list(groups),
            "rlnMicrographOriginalPixelSize": [0.75] * len(groups),
            "rlnVoltage": [300.0 - 100 * (i % 2) for i in range(len(groups))],
            "rlnSphericalAberration": [2.7] * len(groups),
            "rlnAmplitudeContrast": [0.1] * len(groups),
            "rlnImagePixelSize": list(pixel_sizes),
            "rlnImageSize": [box] * len(groups),
            "rlnImageDimensionality": [2] * len(groups),
        }
    )
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": np.arange(n) * 10.0,
            "rlnCoordinateY": np.arange(n) * 20.0,
            "rlnImageName": image_names(stack, range(n)),
            "rlnMicrographName": ["mic.mrc"] * n,
            "rlnOpticsGroup": [groups[i % len(groups)] for i in range(n)],
            **ctf_columns(n),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOriginXAngst": np.linspace(-1, 1, n),
            "rlnOriginYAngst": np.linspace(1, -1, n),
            "rlnAnglePsi": np.linspace(0, 90, n),
            "rlnRandomSubset": [1 + i % 2 for i in range(n)],
        }
    )
    return {"optics": optics, "particles": particles}


def write_star(path: Path, blocks) -> Path:
    starfile.write(blocks, path, float_format="%.6f")
    return path


def make_relion31(tmp_path: Path, n: int = 6, box: int = 16, **kwargs):
    """A RELION 3.1 STAR file and its stack in ``tmp_path``; returns (star, blocks, images)."""
    images = write_stack(tmp_path / "stack.mrcs", n, box)
    blocks = relion31_blocks(n, box=box, **kwargs)
    star = write_star(tmp_path / "particles.star", blocks)
    return star, blocks, images


def relion30_block(n: int = 6, stack: str = "stack.mrcs") -> pd.DataFrame:
    """A RELION 3.0 particle block: optics values per particle, origins in pixels."""
    return pd.DataFrame(
        {
            "rlnImageName": image_names(stack, range(n)),
            "rlnMicrographName": ["mic.mrc"] * n,
            **ctf_columns(n),
            "rlnVoltage": np.full(n, 300.0),
            "rlnSphericalAberration": np.full(n, 2.7),
            "rlnAmplitudeContrast": np.full(n, 0.07),
            "rlnMagnification": np.full(n, 10000.0),
            "rlnDetectorPixelSize": np.full(n, 1.5),
            "rlnOriginX": np.linspace(-2, 2, n),
            "rlnOriginY": np.zeros(n),
        }
    )


def write_cs(path: Path, fields: dict[str, np.ndarray]) -> Path:
    """Save a cryoSPARC-style structured array (``np.save`` to a ``.cs`` file)."""
    n = len(next(iter(fields.values())))
    dtype = []
    for name, values in fields.items():
        values = np.asarray(values)
        if values.ndim > 1:
            dtype.append((name, values.dtype, values.shape[1:]))
        else:
            dtype.append((name, values.dtype))
    arr = np.zeros(n, dtype=dtype)
    for name, values in fields.items():
        arr[name] = values
    with open(path, "wb") as fh:  # np.save would append .npy
        np.save(fh, arr)
    return path


def cs_fields(n: int, stack: str, box: int = 16, psize: float = 1.25) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "uid": np.arange(n, dtype=np.uint64) + 1000,
        "blob/path": np.array([stack.encode()] * n, dtype=f"S{len(stack) + 1}"),
        "blob/idx": np.arange(n, dtype=np.uint32),
        "blob/shape": np.tile(np.array([box, box], dtype=np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, psize, dtype=np.float32),
        "ctf/accel_kv": np.full(n, 300, dtype=np.float32),
        "ctf/cs_mm": np.full(n, 2.7, dtype=np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, dtype=np.float32),
        "ctf/df1_A": rng.uniform(10000, 20000, n).astype(np.float32),
        "ctf/df2_A": rng.uniform(9000, 10000, n).astype(np.float32),
        "ctf/df_angle_rad": rng.uniform(-np.pi, np.pi, n).astype(np.float32),
        "ctf/phase_shift_rad": np.full(n, np.pi / 2, dtype=np.float32),
        "alignments2D/class": np.arange(n, dtype=np.uint32) % 3,
        "alignments2D/shift": rng.normal(size=(n, 2)).astype(np.float32),
    }


def fill_up(folder: Path, leave_bytes: int = 0) -> Path:
    """Write a file into ``folder`` until at most ``leave_bytes`` stay free; return it."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as fh:
        try:
            fh.write(b"\0" * max(free - leave_bytes, 0))
            fh.flush()
        except OSError:
            pass
    return filler
