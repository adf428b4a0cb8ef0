"""A class's particles: aligned to the class by the job's poses, best first, read a page at
a time, and their positions on micrographs."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from napari_class2d.class_particles import (
    PAGE_SIZE,
    ClassParticles,
    align_particles,
    read_micrograph,
)
from napari_class2d.selection import load_result
from napari_class2d.sim.oracle import oracle_classification
from napari_class2d.sim.simulate import simulate_dataset
from napari_class2d.sim.transforms import rotate_and_shift
from synthetic import blob_views


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_alignment_undoes_the_relion_pose():
    """A particle made from its class by RELION's pose (rlnAnglePsi, rlnOriginX/YAngst, as
    the simulator, which is pinned to RELION's projector) aligns back onto the class."""
    view = blob_views(1, 48, seed=5)[0]
    psi = np.array([30.0, 100.0, 250.0])
    shift_A = np.array([[6.0, -4.0], [-3.0, 5.0], [2.0, 2.0]])
    particles = rotate_and_shift(
        torch.from_numpy(np.repeat(view[None], 3, 0)),
        torch.from_numpy(psi).float(),
        torch.from_numpy(shift_A).float(),
        2.0,
    ).numpy()
    origin = -shift_A  # rlnOriginX/YAngst re-centre the particle
    aligned = align_particles(particles, psi, origin, 2.0)
    assert min(_corr(a, view) for a in aligned) > 0.999
    assert max(_corr(p, view) for p in particles) < 0.6
    # the opposite convention does not
    wrong = align_particles(particles, -psi, -origin, 2.0)
    assert max(_corr(a, view) for a in wrong) < 0.6


@pytest.fixture(scope="module")
def oracle_result(tmp_path_factory):
    """The true classification (true poses) of a small simulated set without CTF."""
    tmp = tmp_path_factory.mktemp("oracle")
    sim = simulate_dataset(
        tmp / "sim",
        n_particles=240,
        box=48,
        pixel_size_A=5.0,
        snr=2.0,
        junk_fraction=0.0,
        n_views=3,
        rare_views=0,
        seed=2,
        ctf=False,
    )
    oracle_classification(sim.out_dir, tmp / "job")
    # the oracle writes no probabilities: give each particle one, to sort by
    data = starfile.read(tmp / "job" / "run_data.star", always_dict=True)
    n = len(data["particles"])
    data["particles"]["rlnMaxValueProbDistribution"] = np.random.default_rng(1).uniform(0, 1, n)
    starfile.write(data, tmp / "job" / "run_data.star", overwrite=True)
    views = mrcfile.read(sim.out_dir / "truth_views.mrcs")
    return load_result(tmp / "job"), views, tmp


def test_particles_of_a_class_align_onto_its_view_best_first(oracle_result):
    result, views, _ = oracle_result
    for k in (1, 2, 3):
        cp = ClassParticles.of(result, k)
        assert len(cp) == int((result.class_number == k).sum())
        p = cp.probability
        assert np.all(np.diff(p) <= 0) and len(p) == len(cp)  # best first
        aligned = cp.aligned(0, len(cp))
        raw = result.particle_set.read_images(cp.rows)
        assert _corr(aligned.mean(0), views[k - 1]) > 0.99
        assert _corr(aligned.mean(0), views[k - 1]) > _corr(raw.mean(0), views[k - 1]) + 0.02


def test_pages_are_read_only_when_looked_at(oracle_result, monkeypatch):
    result, _, _ = oracle_result
    cp = ClassParticles.of(result, 1)
    reads = []
    original = result.particle_set.read_images

    def counting(rows):
        reads.append(np.asarray(rows).copy())
        return original(rows)

    monkeypatch.setattr(result.particle_set, "read_images", counting)
    pages = cp.pages(page_size=16, columns=4)
    assert pages.shape[0] == -(-len(cp) // 16) and not reads  # nothing read yet
    second = np.asarray(pages[1])
    assert len(reads) == 1 and np.array_equal(reads[0], cp.rows[16:32])
    assert second.shape == cp.page_shape(16, 4)
    assert PAGE_SIZE >= 16


def test_micrographs_and_positions(oracle_result):
    result, _, tmp = oracle_result
    cp = ClassParticles.of(result, 2)
    table = cp.micrographs()
    names = result.particles["rlnMicrographName"].iloc[cp.rows]
    assert table["n_particles"].sum() == len(cp)
    assert table["micrograph"].iloc[0] == names.value_counts().index[0]
    assert table["path"].isna().all()  # the simulator names micrographs it does not write
    # a folder holding them (found by file name)
    folder = tmp / "mics"
    folder.mkdir()
    name = table["micrograph"].iloc[0]
    image = np.random.default_rng(0).normal(size=(64, 80)).astype(np.float32)
    with mrcfile.new(folder / name.split("/")[-1]) as mrc:
        mrc.set_data(image)
    found = cp.micrographs(folder)
    assert found["path"].iloc[0] is not None
    np.testing.assert_allclose(read_micrograph(found["path"].iloc[0]), image)
    yx, prob = cp.positions(name)
    on = names.to_numpy() == name
    rows = result.particles.iloc[cp.rows[on]]
    np.testing.assert_allclose(yx[:, 0], rows["rlnCoordinateY"])
    np.testing.assert_allclose(yx[:, 1], rows["rlnCoordinateX"])
    assert len(prob) == on.sum()
    assert len(cp.all_positions(name)) >= len(yx)


def test_micrograph_images_in_other_formats(tmp_path):
    import matplotlib.image

    rgb = np.zeros((20, 30, 3), np.float32)
    rgb[..., 1] = 0.75
    matplotlib.image.imsave(tmp_path / "m.png", rgb)
    grey = read_micrograph(tmp_path / "m.png")
    assert grey.shape == (20, 30)


def test_particles_without_probability_keep_file_order(tmp_path):
    from _selection_data import make_result

    make_result(tmp_path, n_particles=40, n_classes=3)
    data = starfile.read(tmp_path / "run_data.star")
    data["particles"] = data["particles"].drop(columns="rlnMaxValueProbDistribution")
    starfile.write(data, tmp_path / "run_data.star", overwrite=True)
    cp = ClassParticles.of(load_result(tmp_path), 2)
    assert np.all(np.diff(cp.rows) > 0) and np.isnan(cp.probability).all()
    with pytest.raises(ValueError, match="out of range"):
        ClassParticles.of(load_result(tmp_path), 4)
    assert isinstance(cp.micrographs(), pd.DataFrame)
