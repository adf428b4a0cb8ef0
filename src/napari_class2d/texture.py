"""Is a class average a particle or a noise texture? Two checks on the image alone.

A 2D class average of real particles is one compact object near the box centre on a flat
background, and most of its power is in its overall shape. A class that has locked onto
noise ("Einstein from noise") shows a pattern instead: blotches, stripes, dots or rings
that fill the whole mask, or a fine-grained pattern (dots, noise amplified by the filter)
over a blob. Two measures, both relative to the particle diameter ``D`` the job was run
with and taken inside the engine's default mask (radius ``0.6 D``), after subtracting the
mean level of the annulus between ``0.35 D`` and ``0.6 D`` (the background):

- **outer energy fraction**: the share of the contrast energy in that annulus. A pattern
  that fills the mask evenly puts about 1 - (0.35 / 0.6)^2 = 0.66 of its energy there.
  Measured: the 32 RELION tutorial averages of β-galactosidase (``D`` = 200 Å) 0.03-0.14,
  projections of its map 0.00-0.04; noise, stripes, dot lattices and concentric rings under
  the mask 0.35-0.69, the collapsed β-gal classes of issue 12 0.36-0.69.
- **fine power fraction**: the share of the masked average's power at periods shorter than
  ``D / 6``. Measured: the tutorial averages 0.00, 100 RELION class averages of EMPIAR-10268
  (sharp, high-resolution; ``D`` = 90 % of the box) at most 0.11; white noise 0.96, 20-25 Å
  stripes and dots 1.00, the dotted classes of the raw mrcfile micrographs 0.25-0.45.

An average is flagged when either is above its threshold (:data:`NOISE_TEXTURE_THRESHOLD`,
:data:`FINE_POWER_THRESHOLD`). Both assume the diameter given to the job is at least the
particle's size and that classes are centred (the engine re-centres them); a particle
whose long axis reaches the mask edge, an off-centre class, or neighbours in a crowded
field raise the outer energy fraction (junk, not noise, but flagged all the same).
"""

from __future__ import annotations

import numpy as np
import torch

#: outer energy fraction above which an average fills its mask like a texture
NOISE_TEXTURE_THRESHOLD = 0.25
#: fine power fraction above which an average is a fine-grained pattern
FINE_POWER_THRESHOLD = 0.2

#: core and mask radii, and the finest "shape" period, as fractions of the particle diameter
CORE_RADIUS = 0.35
MASK_RADIUS = 0.6
FINE_PERIOD = 1.0 / 6.0


def _as_stack(averages) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(averages) if not torch.is_tensor(averages) else averages)
    x = x.double()
    return x[None] if x.ndim == 2 else x


def _background_removed(x: torch.Tensor, pixel_size_A: float, particle_diameter_A: float):
    """Images minus their annulus mean, the radius of each pixel (Å), the core and mask radii."""
    box = x.shape[-1]
    c = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) * pixel_size_A
    outer_A = min(MASK_RADIUS * particle_diameter_A, 0.5 * box * pixel_size_A)
    core_A = min(CORE_RADIUS * particle_diameter_A, 0.9 * outer_A)
    annulus = (r < outer_A) & (r >= core_A)
    y = x - x[:, annulus].mean(dim=1)[:, None, None]
    return y, r, core_A, outer_A


def outer_energy_fraction(
    averages: torch.Tensor | np.ndarray, pixel_size_A: float, particle_diameter_A: float
) -> np.ndarray:
    """Share of each average's contrast energy beyond ``0.35 x`` the particle diameter.

    Parameters
    ----------
    averages
        ``(K, D, D)`` (or ``(D, D)``) class averages.
    pixel_size_A
        Their pixel size, Å.
    particle_diameter_A
        The particle diameter the job was run with, Å.

    Returns
    -------
    np.ndarray
        ``(K,)`` fractions in [0, 1]; NaN for a blank (constant) image.
    """
    x = _as_stack(averages)
    y, r, core_A, outer_A = _background_removed(x, pixel_size_A, particle_diameter_A)
    inside = r < outer_A
    total = (y[:, inside] ** 2).sum(dim=1)
    outer = (y[:, inside & (r >= core_A)] ** 2).sum(dim=1)
    out = (outer / total.clamp_min(1e-300)).numpy()
    out[blank_averages(x.numpy()) | (total <= 0).numpy()] = np.nan
    return out


def fine_power_fraction(
    averages: torch.Tensor | np.ndarray, pixel_size_A: float, particle_diameter_A: float
) -> np.ndarray:
    """Share of each masked average's power at periods shorter than ``D / 6``.

    The average, minus its background level, is multiplied by a soft disc of radius
    ``0.6 D`` (edge 5 % of the box) before the Fourier transform. Parameters as
    :func:`outer_energy_fraction`; NaN for a blank image.
    """
    x = _as_stack(averages)
    box = x.shape[-1]
    y, r, _, outer_A = _background_removed(x, pixel_size_A, particle_diameter_A)
    edge_A = 0.05 * box * pixel_size_A
    t = ((r - outer_A) / edge_A + 0.5).clamp(0, 1)
    mask = 0.5 * (1 + torch.cos(torch.pi * t))
    power = torch.fft.rfftn(y * mask, dim=(-2, -1)).abs() ** 2
    power[..., 1:-1] *= 2  # the columns an rfft stores once but stand for two
    fy = torch.fft.fftfreq(box, dtype=torch.float64)
    fx = torch.fft.rfftfreq(box, dtype=torch.float64)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / pixel_size_A  # 1/Å
    fine = f > 1.0 / (FINE_PERIOD * particle_diameter_A)
    total = power.flatten(1).sum(dim=1)
    out = (power[:, fine].sum(dim=1) / total.clamp_min(1e-300)).numpy()
    out[blank_averages(x.numpy()) | (total <= 0).numpy()] = np.nan
    return out


def blank_averages(averages: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(K,)`` True where an average is blank (constant, e.g. an empty class written as zeros)."""
    x = np.asarray(averages, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    flat = x.reshape(len(x), -1)
    return flat.std(axis=1) <= 1e-12 * np.maximum(np.abs(flat).max(axis=1), 1e-30)


def texture_measures(
    averages: torch.Tensor | np.ndarray, pixel_size_A: float, particle_diameter_A: float
) -> dict[str, np.ndarray]:
    """Both measures, blankness and the verdict per average.

    Returns
    -------
    dict
        ``outer_energy_fraction``, ``fine_power_fraction`` (``(K,)`` float, NaN when blank),
        ``blank`` and ``noise_texture`` (``(K,)`` bool; a blank average is not a texture).
    """
    oef = outer_energy_fraction(averages, pixel_size_A, particle_diameter_A)
    fpf = fine_power_fraction(averages, pixel_size_A, particle_diameter_A)
    texture = (np.nan_to_num(oef, nan=0.0) > NOISE_TEXTURE_THRESHOLD) | (
        np.nan_to_num(fpf, nan=0.0) > FINE_POWER_THRESHOLD
    )
    return {
        "outer_energy_fraction": oef,
        "fine_power_fraction": fpf,
        "blank": blank_averages(averages),
        "noise_texture": texture,
    }


def noise_texture_flags(
    averages: torch.Tensor | np.ndarray, pixel_size_A: float, particle_diameter_A: float
) -> np.ndarray:
    """``(K,)`` True where an average looks like a noise texture (blank averages: False)."""
    return texture_measures(averages, pixel_size_A, particle_diameter_A)["noise_texture"]
