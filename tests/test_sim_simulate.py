"""The simulator: populations, files, truth that matches the images, determinism, the CLI."""

from __future__ import annotations

import argparse
import json

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from napari_class2d.sim.ctf import shift_and_ctf
from napari_class2d.sim.score import align_to_views
from napari_class2d.sim.simulate import simulate_dataset
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import rotate_and_shift, soft_disk

SMALL = dict(
    n_particles=400,
    box=48,
    pixel_size_A=4.0,
    n_views=6,
    rare_views=2,
    rare_fraction=0.025,
    junk_fraction=0.1,
    n_micrographs=4,
    seed=7,
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "out"
    return simulate_dataset(out, **SMALL)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_populations_are_as_requested(small_sim):
    truth = starfile.read(small_sim.truth_star)
    info = json.loads(small_sim.truth_json.read_text())
    counts = truth["sim_view"].value_counts()
    assert counts[-1] == 40  # 10 % junk
    rare = info["rare_views"]
    assert len(rare) == 2
    for v in rare:
        assert counts[v] == 10  # 2.5 % of 400 each
    kinds = [v["kind"] for v in info["views"]]
    assert kinds.count("dominant") == 1 and kinds.count("medium") == 3
    dominant = next(v["view"] for v in info["views"] if v["kind"] == "dominant")
    medium = [v["view"] for v in info["views"] if v["kind"] == "medium"]
    assert all(counts[dominant] > 2 * counts[m] for m in medium)
    assert sum(info["junk"]["kinds"].values()) == 40
    assert set(truth.loc[truth.sim_view < 0, "sim_junk_kind"]) == set(info["junk"]["kinds"])
    assert set(truth.loc[truth.sim_view >= 0, "sim_junk_kind"]) == {"none"}
    # views were chosen to look different (band-passed, rotation-maximised correlation)
    assert max(v["max_similarity_to_other_views"] for v in info["views"]) < 0.7


def test_files_are_relion31_and_read_back(small_sim):
    out = small_sim.out_dir
    blocks = starfile.read(small_sim.particles_star, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    optics, parts = blocks["optics"], blocks["particles"]
    for col in (
        "rlnOpticsGroup",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
    ):
        assert col in optics
    assert optics["rlnImagePixelSize"][0] == 4.0 and optics["rlnImageSize"][0] == 48
    for col in ("rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
        assert col in parts
    assert (parts["rlnDefocusU"] >= parts["rlnDefocusV"]).all()
    assert parts["rlnDefocusU"].between(9000, 26000).all()  # 1-2.5 µm in Å, + astigmatism
    assert len(parts) == 400
    # every image named exists and the stacks hold what their headers say
    n_images = 0
    for stack in small_sim.stack_files:
        with mrcfile.open(stack, permissive=False) as mrc:
            assert mrc.is_image_stack()
            assert mrc.data.shape[1:] == (48, 48)
            assert mrc.voxel_size.x == pytest.approx(4.0)
            n_images += mrc.data.shape[0]
    assert n_images == 400
    first = parts["rlnImageName"].iloc[0]
    idx, name = first.split("@")
    assert (out / name).is_file() and int(idx) == 1
    # per-micrograph STAR files name their stack relative to their own folder
    per_mic = starfile.read(out / "stacks" / "mic_0002.star", always_dict=True)["particles"]
    assert per_mic["rlnImageName"].iloc[0] == "000001@mic_0002.mrcs"
    # the truth lines up with the particles row by row
    truth = starfile.read(small_sim.truth_star)
    assert list(truth["rlnImageName"]) == list(parts["rlnImageName"])
    views = mrcfile.read(small_sim.truth_views)
    assert views.shape == (6, 48, 48)


def test_project_reader_reads_simulation(small_sim):
    readers = pytest.importorskip("napari_class2d.io.readers")
    ps = readers.read_particles(small_sim.particles_star)
    assert ps.n_particles == 400 and ps.box == 48 and ps.has_ctf
    np.testing.assert_allclose(ps.pixel_size_A, 4.0)
    parts = starfile.read(small_sim.particles_star)["particles"]
    np.testing.assert_allclose(ps.ctf.defocus_u_A, parts["rlnDefocusU"])
    img = ps.read_images([0, 399])
    stack = mrcfile.read(small_sim.stack_files[-1])
    np.testing.assert_array_equal(img[1], stack[-1])


def test_noise_level_matches_snr(tmp_path):
    """Images are signal / sigma + N(0, 1) with var(signal in disk) / sigma^2 = snr."""
    res = simulate_dataset(tmp_path / "s", **{**SMALL, "snr": 1.0, "junk_fraction": 0.2})
    truth = starfile.read(res.truth_star)
    images = np.concatenate([mrcfile.read(s) for s in res.stack_files])
    empty = images[(truth["sim_junk_kind"] == "noise").to_numpy()]
    assert empty.std() == pytest.approx(1.0, abs=0.02)
    disk = soft_disk(48, 0.5 * res.truth["particle_diameter_A"] / 4.0, edge_px=0.0).numpy() > 0.5
    particles = images[(truth["sim_view"] >= 0).to_numpy()]
    var_in_disk = particles[:, disk].var(axis=1).mean()
    assert var_in_disk == pytest.approx(2.0, rel=0.1)  # noise 1 + signal 1 at SNR 1


@pytest.mark.slow
def test_truth_pose_recovered_from_clean_particles(tmp_path):
    """Align each view's clean projection to noise-free particles: recorded psi and shift."""
    res = simulate_dataset(
        tmp_path / "s",
        **{
            **SMALL,
            "n_particles": 60,
            "snr": 1e6,
            "junk_fraction": 0.0,
            "rare_views": 0,
            "box": 64,
            "pixel_size_A": 3.0,
        },
        ctf=False,
        view_jitter_deg=0.0,
    )
    truth = starfile.read(res.truth_star)
    images = torch.as_tensor(np.concatenate([mrcfile.read(f) for f in res.stack_files]))
    views = torch.as_tensor(mrcfile.read(res.truth_views))
    mask = soft_disk(64, 29.0, edge_px=2.0)
    al = align_to_views(images, views, 3.0, mask, band_A=(200.0, 8.0), rotation_step_deg=3.0)
    v = truth["sim_view"].to_numpy()
    best_view = al["score"].argmax(dim=1).numpy()
    assert (best_view == v).all()
    k = np.arange(len(v))
    psi = al["psi_deg"].numpy()[k, v]
    dpsi = (psi - truth["sim_psi_deg"].to_numpy() + 180) % 360 - 180
    assert np.abs(dpsi).max() <= 1.0
    shift = al["shift_A"].numpy()[k, v]
    true_shift = truth[["sim_shift_x_A", "sim_shift_y_A"]].to_numpy()
    assert np.abs(shift - true_shift).max() <= 3.0  # one pixel
    assert res.truth["parameters"]["max_shift_A"] == pytest.approx(0.05 * 64 * 3.0)
    assert np.hypot(*true_shift.T).max() <= 0.05 * 64 * 3.0 + 1e-6


def test_particle_is_ctf_of_posed_view(tmp_path):
    """Each image = CTF (from its STAR row) applied to its view in its recorded pose."""
    res = simulate_dataset(
        tmp_path / "s",
        **{**SMALL, "n_particles": 24, "snr": 1e6, "junk_fraction": 0.0, "rare_views": 0},
        view_jitter_deg=0.0,
    )
    parts = starfile.read(res.particles_star)["particles"]
    truth = starfile.read(res.truth_star)
    images = np.concatenate([mrcfile.read(f) for f in res.stack_files])
    views = torch.as_tensor(mrcfile.read(res.truth_views))
    v = truth["sim_view"].to_numpy()
    posed = rotate_and_shift(
        views[v],
        truth["sim_psi_deg"].to_numpy(),
        truth[["sim_shift_x_A", "sim_shift_y_A"]].to_numpy(),
        4.0,
    )
    ctf = {
        "defocus_u_A": parts["rlnDefocusU"].to_numpy(),
        "defocus_v_A": parts["rlnDefocusV"].to_numpy(),
        "defocus_angle_deg": parts["rlnDefocusAngle"].to_numpy(),
        "voltage_kV": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.1,
    }
    expected = shift_and_ctf(posed, None, ctf, 4.0).numpy()
    for got, exp in zip(images, expected, strict=True):
        assert _corr(got, exp) > 0.995
    # the CTF matters: the same pose without the CTF, or at another defocus, fits worse
    assert _corr(images[0], posed[0]) < 0.9
    wrong = {k: (v[:1] if isinstance(v, np.ndarray) else v) for k, v in ctf.items()}
    wrong["defocus_u_A"] = wrong["defocus_u_A"] * 0.5
    wrong["defocus_v_A"] = wrong["defocus_v_A"] * 0.5
    assert _corr(images[0], shift_and_ctf(posed[:1], None, wrong, 4.0)[0]) < 0.9


def test_same_seed_same_files_other_seed_differs(tmp_path):
    kw = {**SMALL, "n_particles": 80, "n_micrographs": 2}
    a = simulate_dataset(tmp_path / "a", **kw)
    b = simulate_dataset(tmp_path / "b", **kw)
    c = simulate_dataset(tmp_path / "c", **{**kw, "seed": 8})
    for sa, sb in zip(a.stack_files, b.stack_files, strict=True):
        np.testing.assert_array_equal(mrcfile.read(sa), mrcfile.read(sb))
    for name in ("truth.star", "particles.star"):
        ta, tb = starfile.read(a.out_dir / name), starfile.read(b.out_dir / name)
        ta = ta["particles"] if isinstance(ta, dict) else ta
        tb = tb["particles"] if isinstance(tb, dict) else tb
        assert ta.equals(tb)
    assert not np.array_equal(mrcfile.read(a.stack_files[0]), mrcfile.read(c.stack_files[0]))


def test_refuses_to_overwrite_and_bad_parameters(small_sim, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate_dataset(small_sim.out_dir, **SMALL)
    with pytest.raises(ValueError, match="box=47"):
        simulate_dataset(tmp_path / "x", **{**SMALL, "box": 47})
    with pytest.raises(ValueError, match="rare"):
        simulate_dataset(tmp_path / "y", **{**SMALL, "rare_views": 7})
    with pytest.raises(ValueError, match="junk_fraction"):
        simulate_dataset(tmp_path / "z", **{**SMALL, "junk_fraction": 0.97})


@pytest.mark.slow
def test_map_input_and_missing_voxel_size(shared_data, tmp_path):
    betagal = shared_data / "maps" / "relion_betagal_ref_model_100px_3.54A.mrc"
    res = simulate_dataset(
        tmp_path / "bg", map_path=betagal, **{**SMALL, "box": 64, "pixel_size_A": 4.0}
    )
    assert res.truth["volume"]["source"] == "map"
    assert 150 < res.truth["particle_diameter_A"] < 260  # beta-galactosidase, ~200 Å
    ribosome = shared_data / "maps" / "aspire_clean70SRibosome_vol_65p.mrc"
    with pytest.warns(UserWarning, match="voxel size is 0"):
        simulate_dataset(tmp_path / "rb", map_path=ribosome, **{**SMALL, "box": 80})
    res = simulate_dataset(
        tmp_path / "rb5",
        map_path=ribosome,
        map_pixel_size_A=5.0,
        **{**SMALL, "box": 96, "pixel_size_A": 4.0},
    )
    assert res.truth["volume"]["map_pixel_size_A"] == 5.0
    with pytest.raises(ValueError, match="does not fit|box"):
        simulate_dataset(
            tmp_path / "small",
            map_path=ribosome,
            map_pixel_size_A=5.0,
            **{**SMALL, "box": 32, "pixel_size_A": 4.0},
        )


def test_cli_simulate(tmp_path, capsys):
    from napari_class2d.cli import simulate as cmd

    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--n", "120", "--box", "32", "--apix", "5", "--views", "4"]
    argv += ["--rare-views", "1", "--micrographs", "3", "--seed", "3"]
    argv += ["--stream-into", str(tmp_path / "watch"), "--rate", "100000"]
    assert cmd.main(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert str(out / "particles.star") in printed and "streamed 3 micrographs" in printed
    assert len(list((tmp_path / "watch").glob("mic_*.mrcs"))) == 3
    assert cmd.main(parser.parse_args(argv[:2])) == 2  # exists: refused with a message
    assert "overwrite" in capsys.readouterr().err
