"""The batch engine end to end on small synthetic data: views recovered, determinism,
stop/resume, RELION outputs, streaming equivalence."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.job import Class2DJob
from napari_class2d.io.particles import ParticleSet
from synthetic import make_particles, purity

SMALL = dict(
    n_classes=4,
    max_res_A=10.0,
    n_online_em_iterations=4,
    batch_size_per_class=40,
    n_final_full_iterations=1,
    particle_diameter_A=120.0,
    annealing_start_iteration=1,
    n_annealing_iterations=2,
)


@pytest.fixture(scope="module")
def data():
    return make_particles(400, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=3)


def run(particles, **changes):
    job = Class2DJob(particles, Class2DConfig(**(SMALL | changes)))
    snaps = list(job.run())
    return job, snaps


def test_recovers_views_and_in_plane_angles(data):
    ps, labels, psi, _, _ = data
    job, snaps = run(ps)
    classes = job.assignments.best_class
    assert purity(labels, classes) >= 0.9
    # within a class, estimated minus true angle is constant (poses are consistent): in
    # every class that holds a tenth of the particles, and over all particles of all classes
    # (a fragment of a few tens of particles may be less consistent)
    spreads = []
    for c in np.unique(classes):
        sel = (classes == c) & (labels == np.bincount(labels[classes == c]).argmax())
        if sel.sum() < 10:
            continue
        # blob views can be nearly two-fold symmetric, so a 180° flip is not an error here
        d = (job.assignments.psi_deg[sel] - psi[sel]) % 180
        spread = np.abs((d - np.median(d) + 90) % 180 - 90)
        spreads.append(spread)
        if sel.sum() >= 0.1 * len(classes):
            assert np.median(spread) < 6.0, (c, sel.sum(), np.median(spread))
    assert np.median(np.concatenate(spreads)) < 4.0
    # one snapshot per iteration, averages at the working box
    assert [s.phase for s in snaps] == ["online"] * 4 + ["full"]
    assert snaps[-1].class_averages.shape == (4, 32, 32)
    assert snaps[-1].class_counts_hard.sum() == 400


def test_same_seed_same_classes_other_seed_differs(data):
    ps = data[0]
    a, _ = run(ps, seed=7)
    b, _ = run(ps, seed=7)
    c, _ = run(ps, seed=8)
    assert np.array_equal(a.assignments.best_class, b.assignments.best_class)
    np.testing.assert_array_equal(a.model.class_averages(), b.model.class_averages())
    assert not np.array_equal(a.model.class_averages(), c.model.class_averages())


def stop_after_two_iterations(ps, cfg, out) -> None:
    """Run a job into ``out`` and stop it after its second iteration (checkpoint kept)."""
    job = Class2DJob(ps, cfg, out_dir=out)
    it = job.run()
    next(it)
    next(it)
    job.request_stop()
    assert list(it) == []


def assert_uninterrupted_result(resumed, ps) -> None:
    """``resumed`` (run to its end) has the classes and averages of a job never stopped."""
    straight, _ = run(ps)
    assert np.array_equal(resumed.assignments.best_class, straight.assignments.best_class)
    np.testing.assert_allclose(
        resumed.model.class_averages(), straight.model.class_averages(), atol=1e-6
    )


def test_stop_and_resume_gives_the_uninterrupted_result(data, tmp_path):
    ps = data[0]
    cfg = Class2DConfig(**SMALL)
    stop_after_two_iterations(ps, cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(FileExistsError):
        Class2DJob(ps, cfg, out_dir=tmp_path)  # never overwrite without asking
    resumed = Class2DJob(ps, cfg, out_dir=tmp_path, resume=True)
    rest = list(resumed.run())
    assert [s.iteration for s in rest] == [3, 4, 5]
    assert_uninterrupted_result(resumed, ps)


def test_checkpoint_from_before_the_priors_resumes_with_those_it_started_with(data, tmp_path):
    """A checkpoint written before ``shift_prior`` and ``class_prior`` existed (a uniform
    shift prior unless masks followed the shifts; the learned class shares) resumes with
    the priors it was started with, not the new default nor what the resume asks for."""
    import torch

    ps = data[0]
    cfg = Class2DConfig(**SMALL, shift_prior="uniform")
    stop_after_two_iterations(ps, cfg, tmp_path)
    path = tmp_path / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    document = json.loads(saved["json"])
    del document["config"]["shift_prior"], document["config"]["class_prior"]
    torch.save({"json": json.dumps(document), "tensors": saved["tensors"]}, path)
    resumed = Class2DJob(
        ps, Class2DConfig(**SMALL, class_prior="uniform"), out_dir=tmp_path, resume=True
    )
    list(resumed.run())
    assert resumed.config.shift_prior == "uniform"
    # nor before class_prior existed: the learned class shares, whatever is asked now
    assert resumed.config.class_prior == "learned"
    straight, _ = run(ps, shift_prior="uniform")
    assert np.array_equal(resumed.assignments.best_class, straight.assignments.best_class)


def test_checkpoint_without_the_shown_averages_resumes(data, tmp_path):
    """A checkpoint written before the shown class averages were kept (they are derived
    from the statistics) resumes, and the job ends as the uninterrupted one."""
    import torch

    from napari_class2d.engine import checkpoint

    ps = data[0]
    cfg = Class2DConfig(**SMALL)
    stop_after_two_iterations(ps, cfg, tmp_path)
    path = tmp_path / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    document, tensors = json.loads(saved["json"]), saved["tensors"]
    assert "averages" in document["model"]["arrays"] and "model/averages" in tensors
    del document["model"]["arrays"]["averages"], tensors["model/averages"]
    torch.save({"json": json.dumps(document), "tensors": tensors}, path)
    assert "averages" not in checkpoint.load(path)[0]["model"]["arrays"]
    resumed = Class2DJob(ps, cfg, out_dir=tmp_path, resume=True)
    list(resumed.run())
    assert_uninterrupted_result(resumed, ps)


def test_outputs_read_back_as_relion_files(data, tmp_path):
    ps, labels = data[0], data[1]
    job = Class2DJob(ps, Class2DConfig(**SMALL), out_dir=tmp_path)
    job.run_to_end()
    star = starfile.read(tmp_path / "run_data.star", always_dict=True)
    parts = star["particles"]
    assert len(parts) == 400 and "optics" in star
    assert set(parts["rlnClassNumber"]) <= {1, 2, 3, 4} and parts["rlnClassNumber"].min() >= 1
    for col in (
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnMaxValueProbDistribution",
        "rlnNrOfSignificantSamples",
        "rlnLogLikeliContribution",
        "rlnImageName",
    ):
        assert col in parts.columns
    assert purity(labels, parts["rlnClassNumber"].to_numpy()) >= 0.9
    model = starfile.read(tmp_path / "run_model.star", always_dict=True)
    classes = model["model_classes"]
    assert (
        classes["rlnReferenceImage"].iloc[0]
        == f"000001@{(tmp_path / 'run_classes.mrcs').resolve()}"
    )
    assert abs(classes["rlnClassDistribution"].sum() - 1) < 1e-6
    assert (classes["rlnClassECA"] >= 1).all()
    with mrcfile.open(tmp_path / "run_classes.mrcs") as m:
        assert m.data.shape == (4, 32, 32)
        assert abs(float(m.voxel_size.x) - 5.0) < 1e-4


def test_class_averages_are_written_at_the_particle_box(data, tmp_path):
    """A job at a Fourier-cropped working box (16 px at 10 Å) writes its averages as
    RELION does, at the particles' box and pixel size (32 px, 5 Å), losing nothing."""
    import torch

    job, snaps = run(data[0], max_res_A=20.0)
    assert snaps[-1].class_averages.shape == (4, 16, 16)  # the working box
    paths = job.write_outputs(tmp_path)
    with mrcfile.open(paths["classes"]) as m:
        written = np.asarray(m.data)
        assert written.shape == (4, 32, 32)
        assert abs(float(m.voxel_size.x) - 5.0) < 1e-4
    general = starfile.read(paths["model"], always_dict=True)["model_general"]
    assert general["rlnOriginalImageSize"] == 32
    assert abs(general["rlnPixelSize"] - 5.0) < 1e-4
    # cropping the written averages' transform back to 16 px gives the job's averages
    spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(torch.from_numpy(written))))
    crop = spec[:, 8:24, 8:24] * (16 / 32) ** 2
    back = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(crop))).real.numpy()
    ref = snaps[-1].class_averages
    assert np.abs(back - ref).max() < 0.05 * np.abs(ref).max()
    # and nothing beyond the working Nyquist (10 Å) was invented
    c = np.arange(32) - 16
    outside = np.hypot(c[:, None], c[None, :]) >= 8
    assert np.abs(spec.numpy()[:, outside]).max() < 1e-3 * np.abs(spec.numpy()).max()


class ListSource:
    """A real stream source over in-memory particle sets (delivers one set per poll)."""

    streaming = True

    def __init__(self, sets: list[ParticleSet]):
        self.sets = list(sets)
        self.taken = 0

    def poll(self):
        if self.taken >= len(self.sets):
            return None
        self.taken += 1
        return self.sets[self.taken - 1]

    def state(self):
        return {"taken": self.taken}

    def restore(self, state):
        self.taken = state["taken"]

    def redelivered(self):
        return self.sets[: self.taken]

    def close(self):
        pass


def test_stream_with_everything_at_start_equals_batch(data):
    ps = data[0]
    batch, _ = run(ps)
    job = Class2DJob(ListSource([ps]), Class2DConfig(**SMALL), poll_seconds=0.0)
    job.request_finish()
    snaps = list(job.run())
    assert [s.phase for s in snaps] == ["online"] * 4 + ["full"]
    assert np.array_equal(job.assignments.best_class, batch.assignments.best_class)
    np.testing.assert_allclose(job.model.class_averages(), batch.model.class_averages(), atol=1e-5)


def test_stream_waits_for_warm_up_and_anneals_with_distinct_particles(data):
    ps = data[0]
    chunks = [ps.subset(np.arange(i, min(i + 60, 400))) for i in range(0, 400, 60)]
    job = Class2DJob(ListSource(chunks), Class2DConfig(**SMALL), poll_seconds=0.0)
    snaps = []
    for snap in job.run():
        snaps.append(snap)
        if snap.phase == "waiting" and job.source.taken == len(chunks):
            job.request_finish()
    first_iteration = next(s for s in snaps if s.phase != "waiting")
    # 160 particles (batch 40 x 4 classes) are needed before the first iteration
    assert first_iteration.n_particles_seen >= 160
    assert snaps[0].phase == "waiting" and snaps[0].n_particles_needed > 0
    # the schedule never runs ahead of the distinct particles seen
    for s in snaps:
        if s.phase == "online" and s.message == "":
            assert s.n_particles_seen >= 160 or job.config.n_online_em_iterations == 0
    assert job.online_done == 4 and job.full_done == 1
    assert (job.assignments.best_class >= 0).all()


def test_relion_pose_convention_matches_the_simulation_truth(tmp_path):
    """rlnAnglePsi / rlnOriginX/YAngst follow RELION (the simulator is pinned to RELION's
    projector): re-applying them to the class average gives the particle."""
    from napari_class2d.io.readers import read_particles
    from napari_class2d.sim.score import score_classification
    from napari_class2d.sim.simulate import simulate_dataset

    sim = simulate_dataset(
        tmp_path / "sim",
        n_particles=500,
        box=48,
        pixel_size_A=5.0,
        snr=0.5,
        junk_fraction=0.0,
        n_views=3,
        rare_views=0,
        seed=2,
    )
    job = Class2DJob(
        read_particles(sim.particles_star),
        Class2DConfig(
            # 6 classes for 3 views: with 4, some seeds merge two views into one class,
            # whose particles then carry another view's poses (a classification miss,
            # not a convention error)
            **(SMALL | {"n_classes": 6, "max_res_A": 12.0, "particle_diameter_A": 180.0})
        ),
        out_dir=tmp_path / "job",
    )
    job.run_to_end()
    score = score_classification(
        sim.out_dir, tmp_path / "job" / "run_data.star", tmp_path / "job" / "run_classes.mrcs"
    )
    pose = score["pose_error"]
    assert pose["n_particles"] >= 400, pose  # the convention is checked on most particles
    assert pose["fraction_psi_within_6deg"] >= 0.8, pose
    assert pose["fraction_shift_within_2px"] >= 0.8, pose


STREAM_PARAMS = [
    {"max_align_res_A": 20.0},
    {"min_align_res_A": 50.0},
    {"white_noise": True},
    {"ctf_correction": "flip"},
    {"ctf_correction": "off"},
    {"clamp_solvent": True},
    {"mask_inner_diameter_A": 80.0, "mask_outer_diameter_A": 100.0},
    {"recenter": False},
    {"force_max_over_poses": False},
]


@pytest.fixture(scope="module")
def stream_default(data):
    job = Class2DJob(
        ListSource([data[0]]),
        Class2DConfig(**(SMALL | {"n_online_em_iterations": 2})),
        poll_seconds=0.0,
    )
    job.request_finish()
    job.run_to_end()
    return job.model.class_averages()


@pytest.mark.parametrize("change", STREAM_PARAMS, ids=lambda c: ",".join(c))
def test_every_parameter_acts_in_streaming_exactly_as_in_batch(data, stream_default, change):
    """A streaming job honours each parameter: with every particle present it gives the
    batch job's classes under that parameter, and those differ from the default's."""
    ps = data[0]
    cfg = Class2DConfig(**(SMALL | {"n_online_em_iterations": 2} | change))
    batch = Class2DJob(ps, cfg)
    batch.run_to_end()
    stream = Class2DJob(ListSource([ps]), cfg, poll_seconds=0.0)
    stream.request_finish()
    stream.run_to_end()
    np.testing.assert_array_equal(stream.assignments.best_class, batch.assignments.best_class)
    np.testing.assert_allclose(
        stream.model.class_averages(), batch.model.class_averages(), atol=1e-5
    )
    assert not np.allclose(stream.model.class_averages(), stream_default, atol=1e-6)
