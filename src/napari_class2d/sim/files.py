"""Atomic writers for the simulator's files (temp name in the same folder + ``os.replace``)."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def temp_name(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to ``path``."""
    return path.parent / f".{path.name}.tmp"


def write_stack(path: str | Path, images: np.ndarray, pixel_size_A: float) -> Path:
    """Write ``(n, D, D)`` float32 images as an MRC image stack, atomically."""
    path = Path(path)
    tmp = temp_name(path)
    data = np.ascontiguousarray(images, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_A)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_star(path: str | Path, blocks: dict[str, pd.DataFrame] | pd.DataFrame) -> Path:
    """Write STAR data blocks (``{"optics": df, "particles": df}``), atomically."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        starfile.write(blocks, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
