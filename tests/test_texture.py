"""The noise-texture check passes compact particle averages and fails textures that fill the mask.

Negative controls (each must be flagged): white noise, noise with a real-image-like
spectrum, stripes, a dot lattice and concentric rings, under the engine's default mask.
Positive controls: projections of the built-in phantom, with some noise left in them.
The real β-galactosidase averages are checked in ``tests/test_real_betagal.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_class2d.compare import soft_disc
from napari_class2d.sim.phantom import default_phantom
from napari_class2d.sim.transforms import euler_to_matrix
from napari_class2d.texture import (
    FINE_POWER_THRESHOLD,
    NOISE_TEXTURE_THRESHOLD,
    blank_averages,
    fine_power_fraction,
    noise_texture_flags,
    outer_energy_fraction,
    texture_measures,
)

APIX, BOX, DIAMETER = 3.54, 100, 200.0


def engine_mask() -> torch.Tensor:
    """The engine's default class mask: flat to the particle diameter, soft to 1.2x it."""
    inner, outer = DIAMETER / APIX, 1.2 * DIAMETER / APIX
    return soft_disc(BOX, inner, 0.5 * (outer - inner))


def textures(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Noise and pattern 'class averages' of the kinds a collapsed classification shows."""
    c = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(x, y)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(BOX), np.fft.fftfreq(BOX), indexing="ij")) / APIX
    # a denoised micrograph's spectrum: almost all power coarser than ~20 Å
    coloured = np.real(
        np.fft.ifft2(np.fft.fft2(rng.normal(size=(BOX, BOX))) * np.exp(-((f * 25) ** 2)))
    )
    out = {
        "white noise": rng.normal(size=(BOX, BOX)),
        "coloured noise": coloured,
    }
    for period, angle in ((20.0, 0.3), (45.0, 1.2)):
        out[f"stripes {period:.0f} Å"] = np.cos(
            2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) * APIX / period
        )
    for period in (25.0, 50.0):
        out[f"dots {period:.0f} Å"] = np.cos(2 * math.pi * x * APIX / period) * np.cos(
            2 * math.pi * y * APIX / period
        )
    for period in (30.0, 60.0):
        out[f"rings {period:.0f} Å"] = np.cos(2 * math.pi * r * APIX / period)
    mask = engine_mask().numpy()
    return {k: (v * mask).astype(np.float32) for k, v in out.items()}


def particles(rng: np.random.Generator) -> np.ndarray:
    """Phantom projections (170 Å across) with noise at a tenth of their contrast, masked."""
    rot, tilt = rng.uniform(0, 360, 8), np.degrees(np.arccos(rng.uniform(-1, 1, 8)))
    proj = default_phantom().project(euler_to_matrix(rot, tilt, 0.0), BOX, APIX, radius_A=85.0)
    proj = proj.numpy()
    noisy = proj + 0.1 * proj.std() * rng.normal(size=proj.shape)
    return (noisy * engine_mask().numpy()).astype(np.float32)


def test_noise_textures_are_flagged():
    tex = textures(np.random.default_rng(0))
    oef = outer_energy_fraction(np.stack(list(tex.values())), APIX, DIAMETER)
    flags = noise_texture_flags(np.stack(list(tex.values())), APIX, DIAMETER)
    report = {k: round(float(v), 3) for k, v in zip(tex, oef, strict=True)}
    assert flags.all(), f"textures not flagged (threshold {NOISE_TEXTURE_THRESHOLD}): {report}"
    assert (oef > NOISE_TEXTURE_THRESHOLD + 0.08).all(), report


def test_particle_averages_pass():
    avg = particles(np.random.default_rng(1))
    oef = outer_energy_fraction(avg, APIX, DIAMETER)
    assert not noise_texture_flags(avg, APIX, DIAMETER).any(), oef
    assert (oef < NOISE_TEXTURE_THRESHOLD - 0.08).all(), oef


def test_fine_dots_over_a_particle_are_flagged():
    """A particle with a fine dot lattice over the whole mask (what noise amplified by the
    filter looks like on raw images) keeps most energy in the centre, so only the fine-power
    check sees it."""
    avg = particles(np.random.default_rng(4))
    c = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    dots = np.cos(2 * math.pi * x * APIX / 12.0) * np.cos(2 * math.pi * y * APIX / 12.0)
    dots = dots * engine_mask().numpy()
    # dots with 40 % of the particle's contrast energy
    scale = np.sqrt(0.4 * (avg**2).sum(axis=(1, 2)) / (dots**2).sum())
    dotted = avg + scale[:, None, None] * dots
    m = texture_measures(dotted, APIX, DIAMETER)
    assert (m["outer_energy_fraction"] < NOISE_TEXTURE_THRESHOLD).all(), m
    assert (m["fine_power_fraction"] > FINE_POWER_THRESHOLD).all(), m
    assert m["noise_texture"].all()
    assert (fine_power_fraction(avg, APIX, DIAMETER) < 0.05).all()


def test_sharp_real_class_averages_have_little_fine_power(shared_data):
    """100 RELION class averages of EMPIAR-10268 (sharp, high resolution; mask at 90 % of the
    box) are not fine-grained patterns. Some are junk (edges, aggregates, off-centre) that
    the outer energy fraction rightly flags, so only the fine-power check is asserted."""
    import mrcfile

    avg = mrcfile.read(shared_data / "class_averages" / "slicem_mixture_2D_EMPIAR-10268.mrcs")
    fpf = fine_power_fraction(avg, 1.0, 0.9 * avg.shape[-1])
    assert np.nanmax(fpf) < 0.6 * FINE_POWER_THRESHOLD, np.sort(fpf)[-5:]


def test_blank_averages_are_blank_not_textures():
    avg = np.zeros((3, BOX, BOX), dtype=np.float32)
    avg[1] = particles(np.random.default_rng(2))[0]
    avg[2] = 5.0  # a constant image is blank too
    assert blank_averages(avg).tolist() == [True, False, True]
    oef = outer_energy_fraction(avg, APIX, DIAMETER)
    assert np.isnan(oef[[0, 2]]).all() and np.isfinite(oef[1])
    assert not noise_texture_flags(avg, APIX, DIAMETER).any()


@pytest.mark.parametrize("shape", [(BOX, BOX), (1, BOX, BOX)])
def test_single_image_or_stack(shape):
    img = particles(np.random.default_rng(3))[0].reshape(shape)
    assert outer_energy_fraction(img, APIX, DIAMETER).shape == (1,)
