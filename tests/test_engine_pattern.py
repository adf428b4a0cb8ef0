"""A pattern fixed in the box's frame is removed from the particles (``remove_fixed_pattern``).

Particles lie at random in-plane angles, so the unaligned mean of a micrograph's boxes is
round; a detector pattern or an illumination gradient is the same in every box of the
micrograph and is not. The pool subtracts, per micrograph, the part of that mean which is
not round, before the masks; micrographs with too few particles, and particles without a
micrograph name, are left as they are.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from io_fixtures import image_names, write_stack, write_star
from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.ctf import ctf_values
from napari_class2d.engine.fourier import FourierGrid
from napari_class2d.engine.pool import MIN_PATTERN_PARTICLES, ParticlePool, working_grid
from napari_class2d.io.readers import read_particles

BOX, APIX = 48, 4.0
DIAMETER_A = 120.0
#: particles per micrograph: two with enough particles, one with too few
COUNTS = {"a.mrc": 80, "b.mrc": 80, "c.mrc": MIN_PATTERN_PARTICLES - 10}


def blob(x: float, y: float, sigma: float) -> np.ndarray:
    c = np.arange(BOX) - BOX // 2
    return np.exp(-0.5 * ((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) / sigma**2)


def box_pattern() -> np.ndarray:
    """A gradient and fine stripes, the same in every box of a micrograph."""
    c = np.arange(BOX) - BOX // 2
    x = np.broadcast_to(c[None, :], (BOX, BOX))
    return 0.4 * x / BOX + 0.25 * np.cos(2 * np.pi * x / 4.0)


def particles(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` boxes of a blob with a lobe beside it, at random in-plane angles."""
    angles = rng.uniform(0, 2 * np.pi, n)
    return np.stack(
        [blob(0, 0, 4.0) + 0.8 * blob(7 * np.cos(a), 7 * np.sin(a), 2.5) for a in angles]
    )


def write_set(folder, images: np.ndarray, micrographs=None, ctf: dict | None = None):
    """``images`` as a stack and a RELION 3.1 STAR file in ``folder``, with the particles'
    micrograph names and CTF columns when given (and then the optics' voltage, Cs and
    amplitude contrast)."""
    n = len(images)
    write_stack(folder / "stack.mrcs", data=images.astype(np.float32), voxel_size=APIX)
    optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1]}
    if ctf is not None:
        optics |= {"rlnVoltage": [300.0], "rlnSphericalAberration": [2.7]}
        optics |= {"rlnAmplitudeContrast": [0.1]}
    optics |= {"rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]}
    table = {
        "rlnImageName": image_names("stack.mrcs", range(n)),
        "rlnOpticsGroup": np.ones(n, int),
    }
    if micrographs is not None:
        table["rlnMicrographName"] = list(micrographs)
    table |= ctf or {}
    blocks = {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(table)}
    return write_star(folder / "particles.star", blocks)


def particle_set(tmp_path, patterned: set[str], names: bool = True):
    """:func:`particles` with noise on the micrographs of :data:`COUNTS`; the boxes of the
    micrographs in ``patterned`` also hold :func:`box_pattern`. Returns the STAR file and
    the particles' micrograph names."""
    rng = np.random.default_rng(0)
    mics = [m for m, n in COUNTS.items() for _ in range(n)]
    clean = particles(rng, len(mics))
    clean = clean + rng.normal(0, 0.3, clean.shape)
    images = clean + np.stack([box_pattern() if m in patterned else 0.0 * clean[0] for m in mics])
    folder = tmp_path / ("with" if patterned else "without")
    folder.mkdir()
    return write_set(folder, images, mics if names else None), np.asarray(mics)


def cached_images(star, **config) -> np.ndarray:
    """The pool's particles of ``star`` back in real space (masked as the job masks them)."""
    particles = read_particles(star)
    params = Class2DConfig(particle_diameter_A=DIAMETER_A, ctf_correction="off", **config).resolve(
        particles.box, float(particles.pixel_size_A[0])
    )
    pool = ParticlePool(params, working_grid(params))
    pool.add(particles)
    x = pool.get(np.arange(particles.n_particles))[0]
    return pool.grid.inverse(x).numpy()


def test_a_pattern_fixed_in_the_box_is_removed_and_the_particles_kept(tmp_path):
    patterned = {"a.mrc", "c.mrc"}
    star, mics = particle_set(tmp_path, patterned)
    clean_star, _ = particle_set(tmp_path, set())
    clean = cached_images(clean_star, remove_fixed_pattern=False)
    removed = cached_images(star, remove_fixed_pattern=True)
    kept = cached_images(star, remove_fixed_pattern=False)

    def error(images, mic):  # mean squared difference from the clean particles, per pixel
        at = mics == mic
        return float(((images[at] - clean[at]) ** 2).mean())

    def power(images, mic):
        return float((clean[mics == mic] ** 2).mean())

    # micrograph a: the pattern is in every box; without the removal it is all over the
    # particles, with it little is left
    assert error(kept, "a.mrc") > 0.1 * power(clean, "a.mrc")
    assert error(removed, "a.mrc") < 0.1 * error(kept, "a.mrc")
    # micrograph b has no pattern: its estimate, all noise, is shrunk to almost nothing,
    # so the removal adds almost none of its mean's noise to its particles
    assert error(removed, "b.mrc") < 0.01 * power(clean, "b.mrc")
    assert error(removed, "b.mrc") < 0.2 * error(removed, "a.mrc")
    # micrograph c has too few particles for an estimate: left as it is
    at = mics == "c.mrc"
    np.testing.assert_array_equal(removed[at], kept[at])
    # the removal leaves the round part of each micrograph's mean (the particles' own)
    for mic in ("a.mrc", "b.mrc"):
        mean_clean = clean[mics == mic].mean(0)
        mean_removed = removed[mics == mic].mean(0)
        assert float(((mean_removed - mean_clean) ** 2).sum()) < 0.05 * float(
            (mean_clean**2).sum()
        )


def test_particles_without_a_micrograph_are_not_changed(tmp_path):
    star, _ = particle_set(tmp_path, {"a.mrc"}, names=False)
    np.testing.assert_array_equal(
        cached_images(star, remove_fixed_pattern=True),
        cached_images(star, remove_fixed_pattern=False),
    )


def test_an_astigmatic_ctf_is_not_taken_for_a_pattern(tmp_path):
    """Particles under one strongly astigmatic CTF (the micrograph's): their mean box is
    elliptical, not round, but that is the CTF acting on the particles, which the job
    models; only what the CTF does not explain is removed, so the particles keep it."""
    rng = np.random.default_rng(3)
    n = 120
    clean = particles(rng, n)
    ctf = {
        "rlnDefocusU": np.full(n, 12000.0),
        "rlnDefocusV": np.full(n, 9000.0),
        "rlnDefocusAngle": np.full(n, 30.0),
    }
    params = torch.tensor(
        [[12000.0, 9000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0]], dtype=torch.float32
    )
    grid = FourierGrid.create(BOX)
    modulated = grid.inverse(
        grid.forward(torch.from_numpy(clean).float()) * ctf_values(params, grid, APIX)
    ).numpy()
    images = modulated + rng.normal(0, 0.05, modulated.shape)
    star = write_set(tmp_path, images, ["a.mrc"] * n, ctf)
    kept = cached_images(star, remove_fixed_pattern=False)
    removed = cached_images(star, remove_fixed_pattern=True)
    # the mean box is not round (the astigmatism), and the removal leaves it as it is
    c = np.arange(BOX) - BOX // 2
    r = np.rint(np.hypot(c[None, :], c[:, None])).astype(int)

    def not_round(images):  # power of the mean box beyond its rotational average
        mean = images.mean(0)
        profile = np.bincount(r.ravel(), mean.ravel()) / np.bincount(r.ravel())
        return float(((mean - profile[r]) ** 2).sum()), float((mean**2).sum())

    left, total = not_round(kept)
    assert left > 0.01 * total
    assert not_round(removed)[0] > 0.8 * left
