"""Neighbouring picks are masked out of each particle (``mask_neighbours``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from io_fixtures import write_stack, write_star
from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.engine.job import Class2DJob
from napari_class2d.engine.neighbours import (
    MAX_PICKS_PER_MICROGRAPH,
    neighbour_masks,
    neighbour_offsets_A,
    pick_positions_A,
)
from napari_class2d.engine.pool import ParticlePool, working_grid
from napari_class2d.io.cryosparc import read_cs
from napari_class2d.io.readers import read_particles

BOX, APIX, MIC_APIX = 48, 4.0, 2.0
DIAMETER_A = 120.0


def blob(box: int, x: float, y: float, sigma: float) -> np.ndarray:
    c = np.arange(box) - box // 2
    return np.exp(-0.5 * ((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) / sigma**2)


def crowded_set(
    tmp_path, n_pairs: int = 20, distance_px: float = 20.0, seed: int = 0, brightness: float = 1.5
):
    """Particles extracted from a crowded micrograph, with pick coordinates that say so.

    Picks come in pairs ``distance_px`` apart along x (micrograph pixels of 2 Å; pairs far
    from each other); each image holds its own asymmetric particle at the box centre and
    the edge of its partner (``brightness`` times as bright) at ``±distance_px``: the first
    of a pair sees its partner at +x, the second at -x. Returns the STAR file, the images
    and the side (+1/-1) of each particle's neighbour.
    """
    rng = np.random.default_rng(seed)
    own = blob(BOX, 0, 0, 4.0) + 0.6 * blob(BOX, 0, -6, 2.5)
    side = np.tile([1.0, -1.0], n_pairs)
    images = np.stack([own + brightness * blob(BOX, s * distance_px, 0, 4.0) for s in side])
    images = (images + rng.normal(0, 0.05, images.shape)).astype(np.float32)
    x = np.repeat(np.arange(n_pairs) * 400.0 + 200.0, 2)
    x[1::2] += distance_px * APIX / MIC_APIX
    n = 2 * n_pairs
    write_stack(tmp_path / "stack.mrcs", data=images, voxel_size=APIX)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [MIC_APIX],
            "rlnImagePixelSize": [APIX],
            "rlnImageSize": [BOX],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
            "rlnMicrographName": ["mic.mrc"] * n,
            "rlnCoordinateX": x,
            "rlnCoordinateY": np.full(n, 300.0),
            "rlnOpticsGroup": np.ones(n, int),
        }
    )
    star = write_star(tmp_path / "particles.star", {"optics": optics, "particles": particles})
    return star, images, side


def test_pick_positions_in_angstrom_from_relion_and_cryosparc(tmp_path):
    star, _, _ = crowded_set(tmp_path, n_pairs=2)
    group, xy = pick_positions_A(read_particles(star))
    assert group.tolist() == [0, 0, 0, 0]
    # micrograph pixels of rlnMicrographOriginalPixelSize (2 Å), not the image's 4 Å
    assert xy[:, 0].tolist() == pytest.approx([400.0, 480.0, 1200.0, 1280.0])
    assert xy[:, 1].tolist() == pytest.approx([600.0] * 4)

    blob_dtype = [
        ("uid", "<u8"),
        ("blob/path", "S64"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("location/micrograph_uid", "<u8"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/micrograph_psize_A", "<f4"),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
    ]
    cs = np.zeros(4, dtype=blob_dtype)
    cs["uid"] = np.arange(4)
    cs["blob/path"] = b"stack.mrcs"
    cs["blob/idx"] = np.arange(4)
    cs["blob/shape"] = BOX
    cs["blob/psize_A"] = APIX
    cs["location/micrograph_uid"] = [7, 7, 9, 9]
    cs["location/micrograph_shape"] = [1000, 2000]  # (y, x) pixels
    cs["location/micrograph_psize_A"] = 1.5
    cs["location/center_x_frac"] = [0.1, 0.2, 0.1, 0.5]
    cs["location/center_y_frac"] = [0.5, 0.5, 0.25, 0.25]
    path = tmp_path / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, cs)
    group, xy = pick_positions_A(read_cs(path))
    assert group.tolist() == [0, 0, 1, 1]
    assert xy[:, 0].tolist() == pytest.approx([300.0, 600.0, 300.0, 1500.0])
    assert xy[:, 1].tolist() == pytest.approx([750.0, 750.0, 375.0, 375.0])


def test_neighbour_offsets_nearest_first_within_reach_on_the_same_micrograph():
    group = np.array([0, 0, 0, 0, 1])
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, -50.0], [10.0, 0.0], [5.0, 5.0]])
    off = neighbour_offsets_A(group, xy, reach_A=120.0, same_A=20.0)
    # particle 0: the pick 10 Å away is the same particle picked twice; then -50 y, +100 x
    assert off[0, 0].tolist() == [0.0, -50.0] and off[0, 1].tolist() == [100.0, 0.0]
    assert np.isnan(off[0, 2:]).all()
    # particle 4 is alone on its micrograph
    assert np.isnan(off[4]).all()
    # nothing beyond reach
    far = neighbour_offsets_A(group, xy, reach_A=95.0, same_A=20.0)
    assert far[1, 0].tolist() == [-90.0, 0.0] and np.isnan(far[1, 1:]).all()


def test_a_file_without_real_micrograph_names_is_not_masked():
    n = MAX_PICKS_PER_MICROGRAPH + 1
    xy = np.random.default_rng(0).uniform(0, 1e6, (n, 2))
    with pytest.warns(UserWarning, match="not real ones"):
        off = neighbour_offsets_A(np.zeros(n, np.int64), xy, reach_A=200.0, same_A=30.0)
    assert np.isnan(off).all()


def test_neighbour_mask_keeps_the_particle_side_of_the_bisector():
    box = 32
    off = torch.tensor([[[12.0, 0.0], [math.nan, math.nan]], [[math.nan] * 2] * 2])
    m = neighbour_masks(off, box, edge_px=4.0)
    c = box // 2
    assert m[0, c, c] == 1.0 and m[0, c, c + 12] == 0.0  # own pick kept, neighbour's gone
    assert float(m[0, c, c + 6]) == pytest.approx(0.5)  # the bisector, mid-edge
    assert float(m[0, 0, c - 4]) == 1.0  # the far side untouched
    assert (m[1] == 1.0).all()  # no neighbours: no mask


def _cached_images(star, centres=None, **config):
    particles = read_particles(star)
    params = Class2DConfig(particle_diameter_A=DIAMETER_A, ctf_correction="off", **config).resolve(
        BOX, APIX
    )
    pool = ParticlePool(params, working_grid(params))
    pool.add(particles)
    x = pool.get(np.arange(particles.n_particles), centres=centres)[0]
    return pool.grid.inverse(x).numpy()


def test_pool_masks_the_neighbours_and_keeps_the_particle(tmp_path):
    star, images, side = crowded_set(tmp_path)
    masked = _cached_images(star)
    plain = _cached_images(star, mask_neighbours=False)
    assert masked.shape[-1] == BOX
    c = np.arange(BOX) - BOX // 2
    r = np.hypot(c[None, :], c[:, None])
    # past the bisector (10 px) on the neighbour's side, inside the particle mask
    toward = ((c[None, :] * side[:, None, None]) > 12) & (r < 17)
    own = r < 6

    def spread(a, where):  # contrast in a region, whatever its mean level
        return np.array([a[i][where[i]].std() for i in range(len(a))])

    # the neighbour's edge is gone where the mask is on, there where it is off
    assert (spread(masked, toward) < 0.2 * spread(plain, toward)).all()
    # the particle itself is untouched (the cache holds no mean level: compare patterns)
    for a, b in zip(masked, plain, strict=True):
        assert np.corrcoef(a[own], b[own])[0, 1] > 0.99
    # without pick coordinates nothing is masked
    bare = read_particles(star)
    bare.metadata = bare.metadata.drop(columns=["rlnCoordinateX", "rlnCoordinateY"])
    assert pick_positions_A(bare) is None


def test_class_average_of_a_crowded_field_shows_no_neighbour(tmp_path):
    config = dict(
        n_classes=1,
        particle_diameter_A=DIAMETER_A,
        ctf_correction="off",
        n_online_em_iterations=3,
        batch_size_per_class=40,
        seed=0,
        # every particle of this set lies at the same angle, so its unaligned mean is not
        # round: the fixed-pattern removal, which assumes random angles, is left out
        remove_fixed_pattern=False,
    )
    c = np.arange(BOX) - BOX // 2
    r = np.hypot(c[None, :], c[:, None])
    ring = (r > 11) & (r < 17)  # where the neighbours' edges fall, inside the class mask
    core = r < 6

    def ring_share(folder, brightness=1.5, **changes):
        folder.mkdir()
        star, _, _ = crowded_set(folder, brightness=brightness)
        job = Class2DJob(read_particles(star), Class2DConfig(**(config | changes)))
        job.run_to_end()
        a = job.model.class_averages()[0]
        # the neighbours show as contrast that is not round (a masked side is filled with
        # the particles' round average)
        bins = np.rint(r).astype(int)
        profile = np.bincount(bins.ravel(), a.ravel()) / np.bincount(bins.ravel())
        not_round = (a - profile[bins]) ** 2
        return float(not_round[ring].sum() / (a**2)[core].sum())

    alone = ring_share(tmp_path / "alone", brightness=0.0)  # the particle without neighbours
    masked = ring_share(tmp_path / "masked")
    plain = ring_share(tmp_path / "plain", mask_neighbours=False)
    # the neighbours put their edges into the class average unless they are masked
    assert plain > 4.0 * alone, (plain, alone)
    assert masked - alone < 0.3 * (plain - alone), (masked, plain, alone)


def test_masks_follow_the_particle_centre_found_by_the_search(tmp_path):
    """With ``masks_follow_shifts``, a pick 6 px off its particle: read at the centre the
    search found, the circular mask and the neighbour bisector are placed around that
    centre (as RELION masks a particle after moving it by its offset), not around the
    pick; by default (masks at the pick) the centre changes nothing."""
    star, images, side = crowded_set(tmp_path)
    moved = np.roll(images, 6, axis=1)  # particle and neighbour 6 px below the pick
    write_stack(tmp_path / "stack.mrcs", data=moved, voxel_size=APIX)
    n = len(images)
    centres = np.tile([0.0, 6.0], (n, 1))
    follow = dict(masks_follow_shifts=True, shift_prior="gaussian")
    at_centre = _cached_images(star, centres, **follow)
    at_pick = _cached_images(star, **follow)
    plain = _cached_images(star, centres, mask_neighbours=False, mask_particles_with_zeros=False)
    np.testing.assert_array_equal(_cached_images(star, centres), _cached_images(star))
    c = np.arange(BOX) - BOX // 2
    params = Class2DConfig(particle_diameter_A=DIAMETER_A).resolve(BOX, APIX)
    outer = 0.5 * params.mask_outer_diameter_A / APIX
    from_pick = np.hypot(c[None, :], c[:, None])
    from_centre = np.hypot(c[None, :], c[:, None] - 6)
    # zero outside the circle around the centre, not around the pick
    beyond = (from_centre > outer + 1) & (from_pick < outer - 3)
    there = np.abs(plain[:, beyond]).mean()
    # (what is left outside is the ringing of the mask's edge in the kept band: 13 %)
    assert np.abs(at_centre[:, beyond]).mean() < 0.25 * there
    assert np.abs(at_pick[:, beyond]).mean() > 0.8 * there
    # the particle (around the centre) untouched, its neighbour gone
    own = from_centre < 6
    toward = ((c[None, :] * side[:, None, None]) > 12) & (from_centre < outer - 1)
    for a, b, t in zip(at_centre, plain, toward, strict=True):
        assert np.corrcoef(a[own], b[own])[0, 1] > 0.99
        assert a[t].std() < 0.2 * b[t].std()


def test_mask_shift_limit_bounds_how_far_the_masks_follow(tmp_path):
    """``mask_shift_limit_A``: a particle shifted 24 Å (6 px) has its masks 8 Å (2 px)
    from its pick in the shift's direction with a limit of 8 Å, at its centre with a limit
    beyond the shift, and at the pick with 0; refused without ``masks_follow_shifts``."""
    star, images, _ = crowded_set(tmp_path)
    n = len(images)
    centres = np.tile([0.0, 6.0], (n, 1))
    follow = dict(masks_follow_shifts=True, shift_prior="gaussian")
    limited = _cached_images(star, centres, mask_shift_limit_A=2 * APIX, **follow)
    np.testing.assert_allclose(
        limited, _cached_images(star, np.tile([0.0, 2.0], (n, 1)), **follow), atol=1e-5
    )
    assert not np.allclose(limited, _cached_images(star, centres, **follow), atol=1e-3)
    np.testing.assert_allclose(
        _cached_images(star, centres, mask_shift_limit_A=40.0, **follow),
        _cached_images(star, centres, **follow),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        _cached_images(star, centres, mask_shift_limit_A=0.0, **follow),
        _cached_images(star, **follow),
        atol=1e-5,
    )
    with pytest.raises(ConfigError, match="mask_shift_limit_A"):
        Class2DConfig(mask_shift_limit_A=8.0).validate()
    with pytest.raises(ConfigError, match="mask_shift_limit_A"):
        Class2DConfig(
            mask_shift_limit_A=-1.0, masks_follow_shifts=True, shift_prior="gaussian"
        ).validate()
