"""Is a class average a particle or a noise texture? A check on the image alone.

A 2D class average of real particles is one compact object near the box centre on a
flat background: nearly all of its contrast lies within about a third of the particle
diameter from the centre. The failure this check is for, a class that has locked onto
noise ("Einstein from noise": stripes, dots, rings, blotches), fills the whole mask with
contrast of the same strength. The measure is the **outer energy fraction**: of the
contrast energy inside the mask (radius ``0.6 x`` the particle diameter, where the
engine's default mask ends), the share in the outer annulus beyond ``0.35 x`` the
diameter, after subtracting the annulus's mean level (the background). A pattern that
fills the mask evenly puts about 1 - (0.35 / 0.6)^2 = 0.66 of its energy there; the
32 RELION tutorial averages of β-galactosidase (particle diameter 200 Å) put 0.03-0.14
there, projections of its map 0.00-0.04, and pure noise, stripes, dot lattices and
concentric rings 0.37-0.69 (measured; ``tests/test_texture.py``, ``docs/benchmarks.md``).
:data:`NOISE_TEXTURE_THRESHOLD` sits between the two.

It assumes the particle diameter given to the job is at least the particle's size and
that classes are centred (the engine re-centres them); a very elongated particle whose
long axis reaches the mask edge scores higher than a globular one.
"""

from __future__ import annotations

import numpy as np
import torch

#: outer energy fraction above which a class average is taken for a noise texture
NOISE_TEXTURE_THRESHOLD = 0.25

#: core and mask radii as fractions of the particle diameter
CORE_RADIUS = 0.35
MASK_RADIUS = 0.6


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
    x = torch.as_tensor(np.asarray(averages) if not torch.is_tensor(averages) else averages)
    x = x.double()
    if x.ndim == 2:
        x = x[None]
    box = x.shape[-1]
    c = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) * pixel_size_A  # Å
    outer_A = min(MASK_RADIUS * particle_diameter_A, 0.5 * box * pixel_size_A)
    core_A = min(CORE_RADIUS * particle_diameter_A, 0.9 * outer_A)
    inside = r < outer_A
    annulus = inside & (r >= core_A)
    background = x[:, annulus].mean(dim=1)
    y = x - background[:, None, None]
    total = (y[:, inside] ** 2).sum(dim=1)
    outer = (y[:, annulus] ** 2).sum(dim=1)
    out = (outer / total.clamp_min(1e-300)).numpy()
    out[blank_averages(x.numpy()) | (total <= 0).numpy()] = np.nan
    return out


def blank_averages(averages: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(K,)`` True where an average is blank (constant, e.g. an empty class written as zeros)."""
    x = np.asarray(averages, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    flat = x.reshape(len(x), -1)
    return flat.std(axis=1) <= 1e-12 * np.maximum(np.abs(flat).max(axis=1), 1e-30)


def noise_texture_flags(
    averages: torch.Tensor | np.ndarray,
    pixel_size_A: float,
    particle_diameter_A: float,
    threshold: float = NOISE_TEXTURE_THRESHOLD,
) -> np.ndarray:
    """``(K,)`` True where an average looks like a noise texture (blank averages: False)."""
    oef = outer_energy_fraction(averages, pixel_size_A, particle_diameter_A)
    return np.nan_to_num(oef, nan=0.0) > threshold
