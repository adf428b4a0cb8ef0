"""Density maps for simulation: read, resample to the requested pixel size and box, normalise."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import torch
from torch_fourier_rescale import fourier_rescale_3d


class MapError(ValueError):
    """A map that cannot be used for simulation; the message names the file."""


def read_map(
    path: str | Path, map_pixel_size_A: float | None = None
) -> tuple[np.ndarray, float | None]:
    """A cubic map ``[z, y, x]`` as float32 and its voxel size in Å.

    Parameters
    ----------
    path
        ``.mrc`` file.
    map_pixel_size_A
        Voxel size to use instead of the header's (needed when the header says 0).

    Returns
    -------
    volume, voxel_size_A
        The voxel size is ``map_pixel_size_A`` when given, else the header's, or
        ``None`` when the header holds 0 (unknown).
    """
    path = Path(path)
    if not path.is_file():
        raise MapError(f"{path}: no such map file")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            if mrc.data is None:
                raise MapError(f"{path}: not a readable MRC file (no data block)")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            header_apix = float(mrc.voxel_size.x)
    except ValueError as err:
        if isinstance(err, MapError):
            raise
        raise MapError(f"{path}: not a readable MRC file ({err})") from None
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise MapError(f"{path}: expected a cubic 3D map, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise MapError(f"{path}: map holds non-finite values")
    if map_pixel_size_A is not None:
        if not map_pixel_size_A > 0:
            raise MapError(f"{path}: map pixel size must be > 0 Å (got {map_pixel_size_A})")
        apix = float(map_pixel_size_A)
    else:
        apix = header_apix if header_apix > 0 else None
    return data, apix


def particle_diameter_px(volume: torch.Tensor, threshold: float = 0.05) -> float:
    """Diameter in voxels of the density above ``threshold * max``, from the box centre."""
    box = volume.shape[-1]
    r = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    mask = volume > threshold * float(volume.max())
    if not mask.any():
        return 0.0
    return 2.0 * float(torch.sqrt(x[mask] ** 2 + y[mask] ** 2 + z[mask] ** 2).max()) + 1.0


def content_resolution_A(volume: torch.Tensor, pixel_size_A: float, floor: float = 1e-4) -> float:
    """Finest resolution (Å) at which the map still has signal.

    The radially averaged power spectrum is compared with its largest value
    beyond the first shell; the answer is the finest shell above ``floor``
    times that value (a map low-pass filtered at 40 Å answers about 40 Å).
    """
    box = volume.shape[-1]
    power = torch.fft.rfftn(volume.double()).abs() ** 2
    f = torch.fft.fftfreq(box)
    fz, fy, fx = torch.meshgrid(f, f, torch.fft.rfftfreq(box), indexing="ij")
    shell = torch.round(torch.sqrt(fx**2 + fy**2 + fz**2) * box).long().flatten()
    n = box // 2 + 1
    keep = shell < n
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, shell[keep], power.flatten()[keep])
    count = torch.bincount(shell[keep], minlength=n).clamp(min=1)
    radial = (total / count)[1:]
    above = torch.nonzero(radial > floor * radial.max()).flatten()
    finest = int(above.max()) + 1 if len(above) else 1
    return box * pixel_size_A / finest


def _fit_box(volume: torch.Tensor, box: int) -> torch.Tensor:
    """Centre-pad or centre-crop a cubic map to ``box`` (centre voxel ``n//2`` -> ``box//2``)."""
    n = volume.shape[-1]
    if n == box:
        return volume
    out = torch.zeros((box, box, box), dtype=volume.dtype)
    m = min(n, box)
    s0 = n // 2 - box // 2 if n > box else 0  # first source voxel kept
    d0 = box // 2 - n // 2 if n < box else 0  # where it lands
    out[d0 : d0 + m, d0 : d0 + m, d0 : d0 + m] = volume[s0 : s0 + m, s0 : s0 + m, s0 : s0 + m]
    return out


def load_map(
    path: str | Path,
    pixel_size_A: float,
    box: int,
    map_pixel_size_A: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """A map ready to project: at ``pixel_size_A``, in a ``box``-voxel cube, normalised.

    Steps: read (:func:`read_map`); Fourier-rescale to ``pixel_size_A``
    (teamtomo ``torch-fourier-rescale``; the new size is rounded to whole
    voxels, so the pixel size is exact to ``1/n``); centre-pad or crop to
    ``box``; subtract the mean of the outer shell (background 0); scale to a
    maximum of 1.

    A map whose header voxel size is 0 (unknown) and no ``map_pixel_size_A`` is
    taken to be sampled at ``pixel_size_A`` already (no resampling), with a warning.

    Returns
    -------
    volume, info
        ``(box, box, box)`` float32 map ``[z, y, x]`` and a dict with
        ``map_pixel_size_A``, ``resampled_pixel_size_A``, ``particle_diameter_A`` and
        ``content_resolution_A`` (see :func:`content_resolution_A`).

    Raises
    ------
    MapError
        Unreadable file, not cubic, or the particle does not fit in the box.
    """
    data, apix = read_map(path, map_pixel_size_A)
    if apix is None:
        warnings.warn(
            f"{path}: header voxel size is 0; assuming the map is sampled at the output "
            f"pixel size {pixel_size_A} Å (pass map_pixel_size_A / --map-apix to set it)",
            stacklevel=2,
        )
        apix = float(pixel_size_A)
    vol = torch.as_tensor(data)
    n = vol.shape[-1]
    new_n = int(round(n * apix / pixel_size_A))
    if new_n != n:
        vol, _ = fourier_rescale_3d(vol, target_shape=(new_n, new_n, new_n))
    resampled_apix = apix * n / new_n
    shell = torch.ones_like(vol, dtype=torch.bool)
    k = max(2, vol.shape[-1] // 16)
    shell[k:-k, k:-k, k:-k] = False
    vol = vol - vol[shell].mean()
    diameter_px = particle_diameter_px(vol)
    if diameter_px > box:
        raise MapError(
            f"{path}: the particle is about {diameter_px * pixel_size_A:.0f} Å across but the box "
            f"is {box} px x {pixel_size_A} Å = {box * pixel_size_A:.0f} Å; use a larger box or "
            "pixel size"
        )
    vol = _fit_box(vol, box)
    vmax = float(vol.max())
    if not vmax > 0 or not math.isfinite(vmax):
        raise MapError(f"{path}: the map has no positive density above its background")
    vol = vol / vmax
    info = {
        "map_path": str(Path(path).resolve()),
        "map_pixel_size_A": apix,
        "resampled_pixel_size_A": resampled_apix,
        "particle_diameter_A": diameter_px * pixel_size_A,
        "content_resolution_A": content_resolution_A(vol, pixel_size_A),
    }
    return vol.float(), info
