"""The classification scorer: perfect input scores perfectly, broken input does not."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from torch_fourier_rescale import fourier_rescale_2d

from napari_class2d.sim.score import ScoreInputError, score_classification
from napari_class2d.sim.simulate import simulate_dataset
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import rotate_and_shift

V = 5  # views
APIX, BOX, CLASS_BOX = 3.0, 64, 48  # class averages at 4 Å, as a classifier's working box


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "sim"
    return simulate_dataset(
        out,
        n_particles=500,
        box=BOX,
        pixel_size_A=APIX,
        n_views=V,
        rare_views=2,
        rare_fraction=0.04,
        junk_fraction=0.1,
        n_micrographs=2,
        seed=11,
    )


def _write(tmp, sim, classes, labels, poses=None):
    """A run_data.star with ``labels`` (1-based) and a run_classes.mrcs at 4 Å."""
    parts = starfile.read(sim.particles_star)
    data = parts["particles"].copy()
    data["rlnClassNumber"] = labels
    if poses is not None:
        data["rlnAnglePsi"], data["rlnOriginXAngst"], data["rlnOriginYAngst"] = poses
    star = tmp / "run_data.star"
    starfile.write({"optics": parts["optics"], "particles": data}, star)
    mrcs = tmp / "run_classes.mrcs"
    with mrcfile.new(mrcs, overwrite=True) as mrc:
        mrc.set_data(np.asarray(classes, dtype=np.float32))
        mrc.voxel_size = BOX * APIX / CLASS_BOX
    return star, mrcs


def _perfect(sim, rng):
    """Truth labels as classes; averages = truth views in a random pose, at 4 Å; junk class."""
    truth = starfile.read(sim.truth_star)
    views = torch.as_tensor(mrcfile.read(sim.truth_views))
    phi = rng.uniform(-180, 180, V)
    s = rng.uniform(-6, 6, (V, 2))
    posed = rotate_and_shift(views, phi, s, APIX)
    small, _ = fourier_rescale_2d(posed, target_shape=(CLASS_BOX, CLASS_BOX))
    junk_avg = torch.as_tensor(rng.normal(size=(1, CLASS_BOX, CLASS_BOX)), dtype=torch.float32)
    classes = torch.cat([small, 0.01 * junk_avg]).numpy()
    view = truth["sim_view"].to_numpy()
    labels = np.where(view < 0, V + 1, view + 1)
    # each particle's pose relative to its class: psi_e = psi - phi, t_e = t - R(-psi_e) s
    v = np.maximum(view, 0)
    psi_e = truth["sim_psi_deg"].to_numpy() - phi[v]
    a = np.deg2rad(-psi_e)
    S = s[v]
    rs = np.stack(
        (np.cos(a) * S[:, 0] - np.sin(a) * S[:, 1], np.sin(a) * S[:, 0] + np.cos(a) * S[:, 1]), -1
    )
    t_e = truth[["sim_shift_x_A", "sim_shift_y_A"]].to_numpy() - rs
    return classes, labels, (psi_e, -t_e[:, 0], -t_e[:, 1])


def test_perfect_classification_scores_perfectly(sim, tmp_path):
    classes, labels, poses = _perfect(sim, np.random.default_rng(0))
    star, mrcs = _write(tmp_path, sim, classes, labels, poses)
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["views_recovered"] == V and sc["n_views"] == V
    assert sc["rare_views_recovered"] == sc["n_rare_views"] == 2
    assert sc["purity"] == 1.0
    assert sc["junk_in_recovered_classes"] == 0.0
    assert sc["junk_share_of_recovered_classes"] == 0.0
    assert sc["median_class_resolution_A"] < 10.0  # Nyquist of the 4 Å averages is 8 Å
    assert sc["class_pixel_size_A"] == pytest.approx(4.0)
    pose = sc["pose_error"]
    assert pose["median_psi_error_deg"] < 1.0 and pose["median_shift_error_A"] < 1.0
    for pv in sc["per_view"]:
        assert pv["recovered"] and pv["class"] == pv["view"] + 1 and pv["class_purity"] == 1.0


def test_wrong_poses_show_in_pose_error(sim, tmp_path):
    classes, labels, (psi, ox, oy) = _perfect(sim, np.random.default_rng(0))
    star, mrcs = _write(tmp_path, sim, classes, labels, (-psi, ox, oy))  # psi sign flipped
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["views_recovered"] == V  # the classes are still right
    assert sc["pose_error"]["fraction_psi_within_6deg"] < 0.2


def test_shuffled_labels_give_low_purity_and_no_views(sim, tmp_path):
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    shuffled = np.random.default_rng(1).permutation(labels)
    star, mrcs = _write(tmp_path, sim, classes, shuffled)
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["purity"] < 0.5
    assert sc["views_recovered"] == 0


def test_blurred_or_mirrored_averages_are_not_recovered(sim, tmp_path):
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    # blur to ~40 Å: the right particles, but averages that do not reach 25 Å
    f = torch.fft.rfftn(torch.as_tensor(classes), dim=(-2, -1))
    fy = torch.fft.fftfreq(CLASS_BOX)[:, None]
    fx = torch.fft.rfftfreq(CLASS_BOX)[None, :]
    s2 = (fx**2 + fy**2) / 4.0**2  # 1/Å^2 at 4 Å pixels
    blurred = torch.fft.irfftn(
        f * torch.exp(-s2 * 40.0**2 * 2), dim=(-2, -1), s=classes.shape[-2:]
    )
    star, mrcs = _write(tmp_path, sim, blurred.numpy(), labels)
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["purity"] == 1.0 and sc["views_recovered"] == 0
    assert all(pv["resolution_A"] > 25.0 for pv in sc["per_view"])
    # mirrored averages: a 2D class is never a mirror image of its view
    mirrored = classes.copy()
    mirrored[:V] = np.roll(mirrored[:V, :, ::-1], 1, axis=-1)
    star, mrcs = _write(tmp_path, sim, mirrored, labels)
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["views_recovered"] <= 1  # a near-symmetric view might still match


def test_junk_in_a_recovered_class_is_counted(sim, tmp_path):
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    truth = starfile.read(sim.truth_star)
    dominant = int(truth.loc[truth.sim_view >= 0, "sim_view"].value_counts().idxmax())
    junk = np.nonzero(labels == V + 1)[0]
    moved = labels.copy()
    moved[junk[: len(junk) // 2]] = dominant + 1  # half the junk joins the dominant view
    star, mrcs = _write(tmp_path, sim, classes, moved)
    sc = score_classification(sim.out_dir, star, mrcs)
    assert sc["views_recovered"] == V
    assert sc["junk_in_recovered_classes"] == pytest.approx(0.5, abs=0.02)
    # contamination of the selection: the moved junk over all particles in recovered classes
    n_moved = len(junk) // 2
    assert sc["junk_share_of_recovered_classes"] == pytest.approx(
        n_moved / (np.count_nonzero(labels <= V) + n_moved), abs=1e-6
    )
    assert sc["purity"] < 1.0


def test_junk_in_recovered_classes_by_kind(sim, tmp_path):
    """Each junk kind's share in recovered classes, and the share without aggregates."""
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    truth = starfile.read(sim.truth_star)
    kind = truth["sim_junk_kind"].to_numpy()
    dominant = int(truth.loc[truth.sim_view >= 0, "sim_view"].value_counts().idxmax())
    moved = labels.copy()
    moved[kind == "aggregate"] = dominant + 1  # every aggregate joins the dominant view
    blobs = np.nonzero(kind == "blob")[0]
    moved[blobs[:1]] = dominant + 1  # and one blob
    star, mrcs = _write(tmp_path, sim, classes, moved)
    sc = score_classification(sim.out_dir, star, mrcs)
    by_kind = sc["junk_by_kind"]
    assert set(by_kind) == {"noise", "blob", "aggregate", "edge"}
    assert sum(v["n"] for v in by_kind.values()) == sc["n_junk"]
    assert by_kind["aggregate"]["in_recovered_classes"] == 1.0
    assert by_kind["blob"]["in_recovered_classes"] == pytest.approx(1 / len(blobs))
    assert by_kind["noise"]["in_recovered_classes"] == 0.0
    not_aggregate = np.count_nonzero((kind != "none") & (kind != "aggregate"))
    assert sc["non_aggregate_junk_in_recovered_classes"] == pytest.approx(1 / not_aggregate)


def test_split_view_and_minimum_share(sim, tmp_path):
    """A view split over two pure classes is recovered; a tiny pure class alone is not."""
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    truth = starfile.read(sim.truth_star)
    rare = sim.truth["rare_views"][0]
    members = np.nonzero(labels == rare + 1)[0]  # 20 particles
    extra = np.concatenate([classes, classes[rare : rare + 1]])
    split = labels.copy()
    split[members[:10]] = V + 2  # two classes of 10, both pure
    star, mrcs = _write(tmp_path, sim, extra, split)
    assert score_classification(sim.out_dir, star, mrcs)["per_view"][rare]["recovered"]
    # 5 of the 20 in a pure class, the rest mixed into junk: not a meaningful share
    tiny = labels.copy()
    tiny[members[5:]] = V + 1
    tiny[members[:5]] = V + 2
    star, mrcs = _write(tmp_path, sim, extra, tiny)
    pv = score_classification(sim.out_dir, star, mrcs)["per_view"][rare]
    assert not pv["recovered"]
    assert len(truth) == len(labels)


def test_bad_inputs_name_the_file(sim, tmp_path):
    classes, labels, _ = _perfect(sim, np.random.default_rng(0))
    star, mrcs = _write(tmp_path, sim, classes, labels + 10)
    with pytest.raises(ScoreInputError, match="rlnClassNumber .* not in 1..6"):
        score_classification(sim.out_dir, star, mrcs)
    data = starfile.read(star)
    data["particles"].loc[3, "rlnImageName"] = "000999@stacks/mic_0001.mrcs"
    data["particles"]["rlnClassNumber"] = labels
    starfile.write(data, star)
    with pytest.raises(ScoreInputError, match="row 4: image 000999@"):
        score_classification(sim.out_dir, star, mrcs)
    with pytest.raises(ScoreInputError, match="truth.json"):
        score_classification(tmp_path, star, mrcs)


def test_oracle_classification_recovers_every_view(sim, tmp_path):
    """True labels and poses, averaged with a CTF Wiener filter: every view passes."""
    from napari_class2d.sim.oracle import oracle_classification

    paths = oracle_classification(sim.out_dir, tmp_path / "oracle")
    sc = score_classification(sim.out_dir, paths["data"], paths["classes"])
    assert sc["views_recovered"] == V and sc["purity"] == 1.0
    assert sc["pose_error"]["median_psi_error_deg"] < 1.0
    # a wrong CTF sign would flip the average's contrast and fail the match
    with mrcfile.open(paths["classes"], mode="r+") as mrc:
        mrc.data[:V] *= -1
    assert (
        score_classification(sim.out_dir, paths["data"], paths["classes"])["views_recovered"] == 0
    )
