"""Every classifier parameter has an effect a user can see (and invalid values are refused)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import starfile
import torch

from napari_class2d.engine.config import Class2DConfig, ConfigError
from napari_class2d.engine.fourier import FourierGrid
from napari_class2d.engine.job import Class2DJob
from synthetic import make_particles, purity

BASE = dict(
    n_classes=4,
    max_res_A=10.0,
    n_online_em_iterations=5,
    batch_size_per_class=40,
    n_final_full_iterations=1,
    particle_diameter_A=110.0,
    annealing_start_iteration=0,
    n_annealing_iterations=1,
    seed=1,
)


@pytest.fixture(scope="module")
def data():
    return make_particles(240, box=32, pixel_size_A=5.0, n_views=3, snr=1.0, seed=11)


@pytest.fixture(scope="module")
def baseline(data):
    return run(data[0])


def run(particles, **changes):
    job = Class2DJob(particles, Class2DConfig(**(BASE | changes)))
    snaps = list(job.run())
    return job, snaps


def radial_profile(image: np.ndarray) -> np.ndarray:
    d = image.shape[-1]
    c = np.arange(d) - d // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return r


def test_baseline_classifies(data, baseline):
    job, snaps = baseline
    # chance is ~0.4; this 6-iteration run on 240 particles gives 0.95 (classes start as
    # blobs and two merged views split apart by the third or fourth iteration)
    assert purity(data[1], job.assignments.best_class) >= 0.85
    assert len(snaps) == 6


def test_max_resolution_sets_the_working_box(data):
    job, snaps = run(data[0], max_res_A=20.0)
    # Nyquist of the working box is the maximum resolution: 2 * 32 * 5 / 20 = 16 px
    assert snaps[-1].class_averages.shape[-1] == 16
    assert snaps[-1].pixel_size_A == pytest.approx(10.0)


def poses_with_noise_outside(job, lo: float, hi: float):
    """Search the job's particles after burying the band lo <= |f| < hi (px) in strong noise."""
    from napari_class2d.engine.fourier import rotated_coefficients
    from napari_class2d.engine.search import SearchTables, search

    m = job.model
    x, ctf, _ = job.pool.get(np.arange(job.pool.n))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.complex64) * 50 * x.abs().mean()
    sel = (m.grid.radius >= lo) & (m.grid.radius < hi)
    x = x + noise * sel
    table = rotated_coefficients(m.references, m.space.fine_angles_deg, m.align_grid)
    tables = SearchTables.build(table, m.space, m.align_phases)
    res = search(
        x,
        ctf,
        m._weight() * m.space.align_band,
        tables,
        m.space,
        m.grid,
        True,
        1.0,
        m.align_phases,
    )
    return res.class_loglik.argmax(1), res.rotation[:, 0], res.shift[:, 0]


def test_max_alignment_resolution_ignores_finer_frequencies(data, baseline):
    job, _ = run(data[0], max_align_res_A=20.0)
    r_max = 32 * 5.0 / 20.0  # 8 px
    radius = job.model.grid.radius[job.model.space.align_band]
    assert float(radius.max()) <= r_max + 1e-6
    assert int(job.model.space.align_band.sum()) < int(baseline[0].model.space.align_band.sum())
    clean = poses_with_noise_outside(job, 99, 100)
    noisy = poses_with_noise_outside(job, r_max + 0.5, 99)
    for a, b in zip(clean, noisy, strict=True):
        assert torch.equal(a, b)  # what lies beyond the limit changes nothing
    full = poses_with_noise_outside(baseline[0], r_max + 0.5, 99)
    clean_full = poses_with_noise_outside(baseline[0], 99, 100)
    assert not torch.equal(full[1], clean_full[1])  # the full band does see it


def test_max_alignment_finer_than_max_resolution_is_clamped_with_a_warning(data):
    with pytest.warns(UserWarning, match="clamped"):
        params = Class2DConfig(**(BASE | {"max_align_res_A": 5.0})).resolve(32, 5.0)
    assert params.max_align_res_A == 10.0


def test_min_alignment_resolution_removes_low_frequencies(data, baseline):
    job, _ = run(data[0], min_align_res_A=50.0)
    r_min = 32 * 5.0 / 50.0
    radius = job.model.grid.radius[job.model.space.align_band]
    assert float(radius.min()) >= r_min - 1e-6
    clean = poses_with_noise_outside(job, 99, 100)
    noisy = poses_with_noise_outside(job, 0, r_min - 0.01)
    for a, b in zip(clean, noisy, strict=True):
        assert torch.equal(a, b)  # what lies below the limit changes nothing
    assert not np.allclose(job.assignments.loglik, baseline[0].assignments.loglik)


def test_white_noise_model_is_flat(data, baseline):
    _, snaps = run(data[0], white_noise=True)
    white = snaps[-1].noise_spectrum[1:16]
    coloured = baseline[1][-1].noise_spectrum[1:16]
    assert np.ptp(white) / white.mean() < 1e-5
    assert np.ptp(coloured) / coloured.mean() > 0.05


def correlation_with_views(job, views):
    """Best correlation of each class average with any true view over rotations."""
    from napari_class2d.engine.fourier import rotate_images

    avgs = torch.from_numpy(job.model.class_averages())
    ang = torch.arange(0, 360, 3.0)
    best = []
    for a in avgs:
        rot = rotate_images(a.expand(len(ang), *a.shape), ang)
        r = rot.flatten(1)
        r = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)
        v = torch.from_numpy(views).flatten(1)
        v = (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)
        best.append(float((r @ v.T).max() / r.shape[1]))
    return np.mean(best)


def test_ctf_correction_modes_differ_and_full_restores_the_views(data, baseline):
    views = data[4]
    flip, _ = run(data[0], ctf_correction="flip")
    off, _ = run(data[0], ctf_correction="off")
    full_corr = correlation_with_views(baseline[0], views)
    off_corr = correlation_with_views(off, views)
    assert full_corr > off_corr + 0.05
    assert not np.allclose(flip.model.class_averages(), baseline[0].model.class_averages())


def test_clamp_solvent_zeroes_density_outside_the_mask(data, baseline):
    job, _ = run(
        data[0], clamp_solvent=True, mask_inner_diameter_A=100.0, mask_outer_diameter_A=120.0
    )
    avgs = job.model.class_averages()
    r = radial_profile(avgs[0])
    outside = r > 0.5 * 120.0 / 5.0
    assert np.abs(avgs[:, outside]).max() <= 1e-5 * np.abs(avgs).max()
    plain, _ = run(data[0], mask_inner_diameter_A=100.0, mask_outer_diameter_A=120.0)
    assert not np.allclose(avgs, plain.model.class_averages(), atol=1e-4)


def test_mask_diameters_bound_the_class_averages(data):
    job, snaps = run(data[0], mask_inner_diameter_A=60.0, mask_outer_diameter_A=80.0)
    avgs = snaps[-1].class_averages
    r = radial_profile(avgs[0])
    assert np.abs(avgs[:, r > 0.5 * 80.0 / 5.0 + 0.5]).max() == 0.0
    assert np.abs(avgs[:, r < 0.5 * 60.0 / 5.0]).max() > 0
    assert snaps[-1].mask_inner_diameter_A == 60.0 and snaps[-1].mask_outer_diameter_A == 80.0


def centre_offset(avgs: np.ndarray) -> float:
    d = avgs.shape[-1]
    c = np.arange(d) - d // 2
    out = []
    for a in avgs:
        w = np.clip(a, 0, None) * (a > 0.2 * a.max())
        out.append(np.hypot((w * c[None, :]).sum() / w.sum(), (w * c[:, None]).sum() / w.sum()))
    return float(np.mean(out))


def test_recentring_moves_classes_to_the_box_centre():
    ps, *_ = make_particles(
        240,
        box=32,
        pixel_size_A=5.0,
        n_views=3,
        snr=1.0,
        seed=11,
        max_shift_px=0.0,
        offset_px=(6.0, -5.0),
    )
    on, _ = run(ps, max_shift_A=10.0)
    off, _ = run(ps, max_shift_A=10.0, recenter=False)
    assert centre_offset(on.model.class_averages()) < 1.5
    assert centre_offset(off.model.class_averages()) > 3.0
    binary, _ = run(ps, max_shift_A=10.0, recenter_binary=True, recenter_threshold=0.5)
    # (every pick here is 7.8 px off; the Gaussian shift prior holds the particles near
    # them, so the binary variant's classes end 1.6 px from the centre, < 1.5 px without it)
    assert centre_offset(binary.model.class_averages()) < 2.0
    assert not np.allclose(binary.model.class_averages(), on.model.class_averages())


def test_marginalising_over_poses_sums_over_poses(data, baseline):
    """Off: each class's score is the log-sum-exp over the poses searched, never below the max."""
    from napari_class2d.engine.fourier import rotated_coefficients
    from napari_class2d.engine.search import SearchTables, search

    job = baseline[0]
    m = job.model
    x, ctf, _ = job.pool.get(np.arange(50))
    table = rotated_coefficients(m.references, m.space.fine_angles_deg, m.align_grid)
    tables = SearchTables.build(table, m.space, m.align_phases)
    w = m._weight() * m.space.align_band
    best = search(x, ctf, w, tables, m.space, m.grid, True, 1.0, m.align_phases)
    summed = search(x, ctf, w, tables, m.space, m.grid, False, 1.0, m.align_phases)
    finite = torch.isfinite(best.class_loglik)
    assert torch.all(summed.class_loglik[finite] >= best.class_loglik[finite] - 1e-3)
    assert torch.any(summed.class_loglik[finite] > best.class_loglik[finite] + 1e-3)
    marg, _ = run(data[0], force_max_over_poses=False)
    assert not np.allclose(marg.assignments.loglik, job.assignments.loglik)


def test_masks_follow_shifts_with_a_prior_that_holds_shifts_near_the_picks(data, baseline):
    """``masks_follow_shifts``: the particle masks sit at each particle's current centre
    and the Gaussian prior on the shifts (``shift_prior="gaussian"``, RELION's
    ``sigma_offset``) holds them near their picks; every search stage takes the prior into
    account."""
    from napari_class2d.engine.fourier import rotated_coefficients
    from napari_class2d.engine.search import SearchTables, search

    job = baseline[0]
    m = job.model
    x, ctf, _ = job.pool.get(np.arange(80))
    table = rotated_coefficients(m.references, m.space.fine_angles_deg, m.align_grid)
    tables = SearchTables.build(table, m.space, m.align_phases)
    w = m._weight() * m.space.align_band
    free = search(x, ctf, w, tables, m.space, m.grid, True, 1.0, m.align_phases)
    held = search(x, ctf, w, tables, m.space, m.grid, True, 1.0, m.align_phases, shift_penalty=1e6)
    assert (free.shift != 0).any()
    assert (held.shift == 0).all()  # an overwhelming prior: every stage keeps the pick
    # the prior's term: the same scores less penalty x |shift|² (at the poses both found)
    mild = search(
        x, ctf, w, tables, m.space, m.grid, True, 1.0, m.align_phases, shift_penalty=1e-3
    )
    same = (mild.classes[:, 0] == free.classes[:, 0]) & (mild.shift[:, 0] == free.shift[:, 0]).all(
        1
    )
    same &= mild.rotation[:, 0] == free.rotation[:, 0]
    expect = free.class_loglik.gather(1, free.classes[:, :1])[:, 0] - 1e-3 * (
        free.shift[:, 0] ** 2
    ).sum(1)
    got = mild.class_loglik.gather(1, mild.classes[:, :1])[:, 0]
    torch.testing.assert_close(got[same], expect[same], rtol=1e-5, atol=1e-3)

    follow, _ = run(data[0], masks_follow_shifts=True, shift_prior="gaussian")
    assert purity(data[1], follow.assignments.best_class) >= 0.85
    fm = follow.model
    assert fm._shift_penalty(2.0) > 0.0
    assert 1.0 <= fm.sigma2_offset_px <= fm._max_sigma2_offset_px
    limit_px = fm.params.max_shift_A / fm.pixel_size_A
    assert np.hypot(*follow.assignments.shift_px.T).max() <= limit_px + 1e-6
    assert not np.allclose(follow.assignments.loglik, job.assignments.loglik)


def test_shift_prior_gaussian_or_uniform(data, tmp_path):
    """``shift_prior``: the Gaussian prior's variance follows the particles' shifts (their
    mean square per axis, within one working pixel and (max shift / 2)²) and enters the
    scores; the uniform prior adds nothing; masks that follow the shifts need the
    Gaussian prior."""
    # a search limit wide enough that the learned variance stays below its ceiling
    gauss, _ = run(data[0], shift_prior="gaussian", max_shift_A=25.0)
    uniform, _ = run(data[0], shift_prior="uniform", max_shift_A=25.0)
    gm, um = gauss.model, uniform.model
    assert um._shift_penalty(2.0) == 0.0
    assert um.sigma2_offset_px == um._max_sigma2_offset_px  # never updated
    assert gm._shift_penalty(2.0) == pytest.approx(2.0 / (2.0 * gm.sigma2_offset_px))
    assert 1.0 <= gm.sigma2_offset_px < gm._max_sigma2_offset_px
    mean_sq = float(np.mean(np.square(gauss.assignments.shift_px)))
    assert 0.5 * mean_sq <= gm.sigma2_offset_px <= 2.0 * max(mean_sq, 1.0)
    # the prior holds the particles nearer their picks than a uniform one does
    assert mean_sq < float(np.mean(np.square(uniform.assignments.shift_px)))
    assert purity(data[1], gauss.assignments.best_class) >= 0.85
    assert not np.allclose(gauss.assignments.loglik, uniform.assignments.loglik)
    # its width is written where RELION keeps its own (run_model.star, Å)
    general = starfile.read(gauss.write_outputs(tmp_path / "g")["model"])["model_general"]
    assert general["rlnSigmaOffsetsAngst"] == pytest.approx(
        math.sqrt(gm.sigma2_offset_px) * gm.pixel_size_A, rel=1e-5
    )
    general = starfile.read(uniform.write_outputs(tmp_path / "u")["model"])["model_general"]
    assert "rlnSigmaOffsetsAngst" not in general
    with pytest.raises(ConfigError, match="shift_prior"):
        Class2DConfig(masks_follow_shifts=True, shift_prior="uniform").validate()
    with pytest.raises(ConfigError, match="shift_prior"):
        Class2DConfig(shift_prior="laplace").validate()


def _split_between_twins(job, share_0: float, final: bool = False) -> np.ndarray:
    """Soft counts of one E-step over every particle (one of the ``final`` full
    iterations or not) after class 1 is made a copy of class 0 whose prior (learned
    share) is a tenth of class 0's ``share_0``."""
    from napari_class2d.engine.model import ParticleAssignments

    m = job.model
    k = m.config.n_classes
    for stats in (m.num, m.den):
        stats[:, 1] = stats[:, 0]
    m.tau2[1] = m.tau2[0]
    m.references[1] = m.references[0]
    prior = torch.full((k,), (1.0 - 1.1 * share_0) / (k - 2))
    prior[0], prior[1] = share_0, share_0 / 10
    m.prior = prior / prior.sum()
    idx = np.arange(job.pool.n)
    empty = ParticleAssignments.empty(job.pool.n)
    stats = m.iterate(job.pool, idx, empty, 1.0, 1.0, False, False, job.rng, final=final)
    return stats.counts_soft


def test_class_prior_learned_or_uniform(data):
    """``class_prior``: with the learned class shares a particle that two classes fit
    equally well goes mostly to the larger one (in proportion to the shares); with a
    uniform prior the two are chosen by their fit alone, so it is shared equally."""
    learned, _ = run(data[0], class_prior="learned")
    uniform, _ = run(data[0], class_prior="uniform")
    m = uniform.model
    assert torch.equal(m._log_class_prior(), torch.zeros(m.config.n_classes))
    lm = learned.model
    torch.testing.assert_close(lm._log_class_prior(), torch.log(lm.prior))
    assert purity(data[1], uniform.assignments.best_class) >= 0.85
    # twins: class 1 a copy of class 0 with a tenth of its share
    c_learned = _split_between_twins(learned, 0.5)
    c_uniform = _split_between_twins(uniform, 0.5)
    assert c_learned[0] > 0  # the view class 0 held is fitted by both twins
    assert c_learned[1] / c_learned[0] == pytest.approx(0.1, abs=0.02)
    assert c_uniform[1] / c_uniform[0] == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ConfigError, match="class_prior"):
        Class2DConfig(class_prior="dirichlet").validate()


def test_class_prior_learned_then_uniform(data, monkeypatch):
    """``class_prior="learned_then_uniform"``: the learned shares weigh the classes in
    the online iterations, and only the fit in the job's final full iterations."""
    from napari_class2d.engine.model import Class2DModel

    asked = []
    prior_of = Class2DModel._log_class_prior

    def watched(self, final=False):
        asked.append(final)
        return prior_of(self, final)

    monkeypatch.setattr(Class2DModel, "_log_class_prior", watched)
    job, _ = run(data[0], class_prior="learned_then_uniform", n_final_full_iterations=2)
    online = BASE["n_online_em_iterations"]
    assert asked == [False] * online + [True, True]
    monkeypatch.undo()
    m = job.model
    torch.testing.assert_close(m._log_class_prior(), torch.log(m.prior))
    assert torch.equal(m._log_class_prior(final=True), torch.zeros(m.config.n_classes))
    assert purity(data[1], job.assignments.best_class) >= 0.85
    while_forming = _split_between_twins(job, 0.5)
    at_the_end = _split_between_twins(job, 0.5, final=True)
    assert while_forming[1] / while_forming[0] == pytest.approx(0.1, abs=0.02)
    assert at_the_end[1] / at_the_end[0] == pytest.approx(1.0, abs=0.02)


def test_inplane_step_sets_the_angular_grid(data):
    job, _ = run(data[0], inplane_step_deg=10.0)
    psi = job.assignments.psi_deg
    step = 360.0 / job.model.space.n_fine
    assert step <= 10.0
    np.testing.assert_allclose(np.round(psi / step) * step, psi, atol=1e-3)
    assert job.model.space.n_fine < run(data[0], inplane_step_deg=3.0)[0].model.space.n_fine


def test_max_shift_bounds_the_shifts(data):
    job, _ = run(data[0], max_shift_A=5.0)
    shift_A = np.hypot(*job.assignments.shift_px.T) * job.model.pixel_size_A
    assert shift_A.max() <= 5.0 + 1e-6
    none, _ = run(data[0], max_shift_A=0.0)
    assert np.abs(none.assignments.shift_px).max() == 0.0


def test_hard_classification_last_gives_one_hot_counts(data, baseline):
    _, snaps = run(data[0], hard_classification_last=True, icuf=6.0)
    last = snaps[-1]
    np.testing.assert_allclose(last.class_counts_soft, last.class_counts_hard, atol=1e-4)


def test_icuf_and_annealing_schedule(data):
    _, snaps = run(
        data[0],
        icuf=4.0,
        n_online_em_iterations=4,
        annealing_start_iteration=1,
        n_annealing_iterations=2,
    )
    factors = [s.annealing_factor for s in snaps]
    assert factors == [4.0, 4.0, 2.5, 1.0, 1.0]


def test_icuf_keeps_assignments_uncertain(data):
    soft, snaps_soft = run(
        data[0],
        icuf=50.0,
        n_annealing_iterations=10,
        n_online_em_iterations=2,
        n_final_full_iterations=0,
    )
    sharp, _ = run(data[0], icuf=1.0, n_online_em_iterations=2, n_final_full_iterations=0)
    assert soft.assignments.ess_class.mean() > sharp.assignments.ess_class.mean()


def test_iteration_counts_and_batch_size(data):
    _, snaps = run(
        data[0], n_online_em_iterations=3, batch_size_per_class=20, n_final_full_iterations=2
    )
    assert [s.phase for s in snaps] == ["online"] * 3 + ["full"] * 2
    assert [s.n_particles_used for s in snaps] == [80, 80, 80, 240, 240]


def test_regularisation_factor_changes_the_averages(data, baseline):
    job, _ = run(data[0], regularisation_factor=20.0)
    assert not np.allclose(job.model.class_averages(), baseline[0].model.class_averages())


def test_memory_budget_changes_chunking_not_results(data, baseline):
    job, _ = run(data[0], memory_budget_GB=0.001)
    assert np.array_equal(job.assignments.best_class, baseline[0].assignments.best_class)
    np.testing.assert_allclose(
        job.model.class_averages(),
        baseline[0].model.class_averages(),
        rtol=1e-3,
        atol=1e-4 * np.abs(baseline[0].model.class_averages()).max(),
    )


def test_reseeding_refills_an_emptied_class(data, baseline):
    """An emptied class takes one side of the fullest class, split along the first
    principal component of its aligned members; a class holding two views splits them."""
    job, _ = run(data[0])
    m = job.model
    labels = data[1]
    indices = np.arange(job.pool.n)
    # a class that merged two views (every particle of views 0 and 1 in class 0), view 2
    # shared by classes 1 and 2, and class 3 emptied out in the last mini-batch
    assignments = job.assignments
    merged = np.isin(labels, [0, 1])
    assignments.best_class[:] = np.where(merged, 0, 1 + np.arange(len(labels)) % 2)
    counts = torch.tensor(np.bincount(assignments.best_class, minlength=4), dtype=torch.float32)
    empty = 3
    m.num[:, empty] = 0
    m.den[:, empty] = 0
    den_before = float(m.den[:, 0].sum())
    prior = m.prior.clone()
    shared = float(prior[0] / (prior.sum() - prior[empty]))  # after renormalising
    m._reseed(job.pool, indices, assignments, counts, job.rng)
    assert float(m.den[:, empty].sum()) > 0  # refilled
    # the donor's weight and prior are shared between the two sides
    assert float(m.den[:, [0, empty]].sum()) == pytest.approx(den_before, rel=1e-4)
    assert float(m.prior[0] + m.prior[empty]) == pytest.approx(shared, rel=1e-4)
    # the split follows the views: each side is mostly one of them
    side = m._split(job.pool, np.nonzero(merged)[0], assignments)
    agree = np.mean(side == (labels[merged] == 1))
    assert max(agree, 1 - agree) >= 0.9
    # nothing empties when every class holds particles
    assignments.best_class[:] = indices % 4
    before = m.num.clone()
    m._reseed(job.pool, indices, job.assignments, torch.full((4,), 60.0), job.rng)
    assert torch.equal(before, m.num)
    # the option switches it off in a job
    off, snaps = run(data[0], n_classes=8, reseed_empty_classes=False)
    assert off.config.reseed_empty_classes is False


def test_device_option(data):
    job, _ = run(data[0], device="cpu")
    assert job.model.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            Class2DJob(data[0], Class2DConfig(**(BASE | {"device": "cuda:0"})))


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"n_classes": 0}, "n_classes"),
        ({"max_res_A": -1.0}, "max_res_A"),
        ({"min_align_res_A": 8.0}, "min_align_res_A"),
        ({"icuf": 0.5}, "icuf"),
        ({"ctf_correction": "maybe"}, "ctf_correction"),
        ({"mask_inner_diameter_A": 100.0, "mask_outer_diameter_A": 50.0}, "mask_outer_diameter_A"),
        ({"recenter_threshold": 1.5}, "recenter_threshold"),
        ({"device": "tpu"}, "device"),
        ({"n_online_em_iterations": 0, "n_final_full_iterations": 0}, "n_final_full_iterations"),
    ],
)
def test_invalid_values_are_refused_before_work(bad, field):
    with pytest.raises(ConfigError, match=field):
        Class2DConfig(**(BASE | bad)).validate()


def test_values_that_do_not_fit_the_data_are_refused(data):
    with pytest.raises(ConfigError, match="Nyquist"):
        Class2DJob(data[0], Class2DConfig(**(BASE | {"max_res_A": 6.0}))).run_to_end()
    with pytest.raises(ConfigError, match="particle_diameter_A"):
        Class2DJob(data[0], Class2DConfig(**(BASE | {"particle_diameter_A": 500.0}))).run_to_end()


def test_annealing_factor_formula():
    cfg = Class2DConfig(icuf=3.0, annealing_start_iteration=2, n_annealing_iterations=4)
    assert [cfg.annealing_factor(j) for j in range(8)] == [3, 3, 3, 2.5, 2, 1.5, 1, 1]
    assert math.isclose(cfg.annealing_factor(2.5), 2.75)


def test_fourier_grid_round_trip():
    grid = FourierGrid.create(24)
    img = torch.randn(2, 24, 24)
    low = grid.inverse(grid.forward(img))
    torch.testing.assert_close(grid.inverse(grid.forward(low)), low, atol=1e-5, rtol=0)


def test_each_half_set_is_aligned_to_the_other_halfs_averages(baseline):
    """No particle is scored against an average that holds its own noise."""
    model = baseline[0].model
    g = model.grid
    assert model.n_updates >= 3
    before = model._search_references().clone()
    # a half-0 particle's noise, added to class 0's half-0 statistics
    noise = torch.randn((g.box, g.box), generator=torch.Generator().manual_seed(0))
    coeffs = g.forward(noise) * (g.ring <= 4)  # where the classes' SNR is high
    coeffs = coeffs * (model.num[0, 0].abs().mean() / coeffs.abs().mean())
    saved = model.num.clone()
    try:
        model.num[0, 0] += coeffs
        after = model._search_references()
    finally:
        model.num = saved

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))

    seen_by_half0 = after[0, 0] - before[0, 0]  # aligns half 0: built from half 1
    seen_by_half1 = after[1, 0] - before[1, 0]
    pattern = g.inverse(coeffs) * model.mask
    assert abs(corr(seen_by_half0, pattern)) < 0.1
    assert corr(seen_by_half1, pattern) > 0.5
