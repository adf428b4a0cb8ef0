"""The built-in micelle map: a membrane protein with a nanobody in a detergent micelle."""

from __future__ import annotations

import argparse
import json

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from napari_class2d.sim.filters import bandpass
from napari_class2d.sim.micelle import PROTEIN_DA_PER_A3, micelle_particle
from napari_class2d.sim.project import FourierProjector
from napari_class2d.sim.score import align_to_views
from napari_class2d.sim.simulate import simulate_dataset
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import rotate_and_shift, soft_disk

BOX, APIX = 64, 2.0  # 128 Å: holds the ~100 Å particle, renders in a fraction of a second


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def parts():
    return micelle_particle().render_parts(BOX, APIX)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_map_is_fixed_and_fits_the_benchmark_box(parts):
    """Same map every time; ~100 Å across, measured on the micelle, in box 96 at 1.3 Å."""
    again = micelle_particle().render_parts(BOX, APIX)
    for name in ("protein", "nanobody", "micelle"):
        torch.testing.assert_close(parts[name], again[name], rtol=0, atol=0)
    model = micelle_particle()
    big = model.render_parts(96, 1.3)
    diameter_A = model.diameter_px(big) * 1.3
    assert 95.0 <= diameter_A <= 105.0 < 96 * 1.3
    assert round(1.1 * diameter_A) == 110  # what benchmarks/quality.py passes the classifier
    # the protein alone is narrower: the micelle sets the measured diameter
    no_micelle = {**big, "micelle": torch.zeros_like(big["micelle"])}
    assert model.diameter_px(no_micelle) * 1.3 < diameter_A - 3.0
    # nothing reaches the box edge
    whole = sum(big.values())
    edge = torch.cat([whole[[0, -1]].flatten(), whole[:, [0, -1]].flatten()])
    assert float(edge.abs().max()) < 1e-3 * float(whole.max())
    # sizes as described: a small membrane protein, a ~14 kDa nanobody
    assert 25.0 < model.protein_kDa < 45.0 and 11.0 < model.nanobody_kDa < 16.0


def test_map_has_no_symmetry(parts):
    v = sum(parts.values()).numpy()
    ops = [np.roll(np.flip(v, ax), 1, ax) for ax in range(3)]
    ops += [np.roll(np.rot90(v, 2, ax), (1, 1), ax) for ax in ((0, 1), (1, 2), (0, 2))]
    for other in ops:
        assert _corr(v, other) < 0.8


def _posed_similarity(proj, mask, band_A):
    """Correlation of image 0 with every image in its best in-plane pose (no mirror),
    both band-passed to ``band_A`` (``None``: open) and masked."""
    lo, hi = band_A
    al = align_to_views(proj[:1], proj, APIX, mask, (lo or 1e9, hi), rotation_step_deg=4.0)
    posed = rotate_and_shift(proj, al["psi_deg"][0], al["shift_A"][0], APIX)
    ref = bandpass(proj[0] * mask, APIX, lo, hi) * mask
    return [_corr(ref, bandpass(p * mask, APIX, lo, hi) * mask) for p in posed]


def test_views_about_the_membrane_normal_differ_by_the_protein(parts):
    """Side views turned about the membrane normal share the micelle's outline: alike at
    low resolution, more alike with the micelle than without; the protein tells them
    apart at 20-8 Å."""
    full = sum(parts.values())
    protein = parts["protein"] + parts["nanobody"]
    rot, tilt = [0.0, 60.0, 130.0, 200.0], [90.0, 90.0, 90.0, 90.0]
    mask = soft_disk(BOX, 0.55 * 100.0 / APIX, edge_px=4.0)
    P_full = FourierProjector(full).project(rot, tilt, 0.0)
    P_prot = FourierProjector(protein).project(rot, tilt, 0.0)
    fine = _posed_similarity(P_full, mask, (20.0, 8.0))[1:]
    coarse_full = _posed_similarity(P_full, mask, (None, 30.0))[1:]
    coarse_prot = _posed_similarity(P_prot, mask, (None, 30.0))[1:]
    assert max(fine) < 0.8
    assert min(coarse_full) > 0.85
    assert np.mean(coarse_full) > np.mean(coarse_prot)


def test_micelle_fraction_sets_the_detergent_density():
    """Detergent density in the belt / protein density over its molecular volume = fraction."""
    model = micelle_particle()
    mass = 1000.0 * (model.protein_kDa + model.nanobody_kDa)
    n_protein = int(round(mass / PROTEIN_DA_PER_A3 / APIX**3))
    r = (np.arange(BOX) - BOX // 2) * APIX
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    z0 = model.micelle_centre_A[2]
    # a ring inside the belt: clear of the helix bundle, the micelle's edge and the domains
    belt = (np.abs(z - z0) < 8.0) & (np.hypot(x, y) > 28.0) & (np.hypot(x, y) < 38.0)
    ratios = {}
    for fraction in (0.0, 0.3, 0.5):
        vol = sum(micelle_particle(fraction).render_parts(BOX, APIX).values()).numpy()
        protein_density = np.sort(vol.ravel())[::-1][:n_protein].mean()
        ratios[fraction] = float(np.median(vol[belt]) / protein_density)
    assert ratios[0.0] == pytest.approx(0.0, abs=0.01)
    assert ratios[0.3] == pytest.approx(0.3, rel=0.1)
    assert ratios[0.5] == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="micelle_fraction"):
        micelle_particle(1.5)


def test_simulated_micelle_set_reads_back(tmp_path):
    """The benchmark's kind of set, small: 14 views of which 3 rare, 8 % junk, box 96 at 1.3 Å."""
    res = simulate_dataset(
        tmp_path / "mic",
        map_path="micelle",
        n_particles=600,
        box=96,
        pixel_size_A=1.3,
        snr=0.03,
        junk_fraction=0.08,
        n_views=14,
        rare_views=3,
        rare_fraction=0.01,
        n_micrographs=3,
        seed=0,
    )
    info = json.loads(res.truth_json.read_text())
    assert info["volume"]["source"] == "micelle"
    assert info["volume"]["micelle"]["micelle_fraction"] == 0.4
    assert 95.0 <= info["particle_diameter_A"] <= 105.0
    blocks = starfile.read(res.particles_star, always_dict=True)
    assert blocks["optics"]["rlnImagePixelSize"][0] == pytest.approx(1.3)
    assert blocks["optics"]["rlnImageSize"][0] == 96
    assert len(blocks["particles"]) == 600
    n_images = 0
    for stack in res.stack_files:
        with mrcfile.open(stack, permissive=False) as mrc:
            assert mrc.data.shape[1:] == (96, 96)
            assert mrc.voxel_size.x == pytest.approx(1.3, abs=1e-4)
            n_images += mrc.data.shape[0]
    assert n_images == 600
    truth = starfile.read(res.truth_star)
    counts = truth["sim_view"].value_counts()
    assert counts[-1] == 48  # 8 % junk
    assert sorted(counts.drop(-1).index) == list(range(14))
    assert info["rare_views"] == [11, 12, 13]
    assert all(counts[v] == 6 for v in info["rare_views"])  # 1 % each
    assert all(counts[v] > 6 for v in range(11))
    assert mrcfile.read(res.truth_views).shape == (14, 96, 96)


def test_cli_and_parameter_errors(tmp_path, capsys):
    from napari_class2d.cli import simulate as cmd

    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    argv = ["--map", "micelle", "--n", "40", "--box", "80", "--apix", "1.6", "--views", "4"]
    argv += ["--rare-views", "1", "--micrographs", "1", "--micelle-fraction", "0.3"]
    assert cmd.main(parser.parse_args(["--out", str(tmp_path / "a"), *argv])) == 0
    info = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert info["volume"]["source"] == "micelle"
    assert info["parameters"]["micelle_fraction"] == 0.3
    # too small a box for a ~100 Å particle: refused with a message
    small = ["--out", str(tmp_path / "b"), "--map", "micelle", "--box", "48", "--apix", "1.3"]
    assert cmd.main(parser.parse_args(small)) == 2
    assert "larger box" in capsys.readouterr().err
    with pytest.raises(ValueError, match="phantom_diameter_A"):
        simulate_dataset(tmp_path / "c", map_path="micelle", phantom_diameter_A=80.0)
