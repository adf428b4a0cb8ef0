"""Real particles: the default job on the first 600 of RELION's β-galactosidase tutorial particles.

The particles (EMPIAR-10017, denoised micrographs, box 100 at 3.54 Å, inverted) are cut from
``../shared/data/real_micrographs/betagal_empiar10017_cryosegnet`` with
``../shared/tools/extract_particles.py`` into ``tmp_path``; the tests skip when the shared
folder is absent. The job runs with the defaults except 10 classes and the default schedule
shortened to 8 online iterations (so it takes well under a minute on 2 CPU cores), CTF off
(denoised JPEGs, no defocus) and the RELION tutorial's particle diameter of 200 Å. It runs
on one torch thread: the classes of a job depend on the thread count (the order of the
sums), so one thread gives the same classes on CI and on any other machine, and on these
2-core machines one thread is also 3-5x faster than two for this job.

What a user must see (issue 12): the job starts with no flag beyond the particle diameter
and CTF off; the classes do not collapse (most are populated, no empty class left as a blank
image after re-seeding); the averages are not noise textures (stripes, dots, rings), judged by
:mod:`napari_class2d.texture`, whose negative controls (noise and stripe "averages" made from
these particles' own spectrum) and positive controls (the tutorial's 32 real averages) are
checked here too, so the check is shown able to fail and to pass.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_class2d.compare import soft_disc
from napari_class2d.sim.threads import torch_threads
from napari_class2d.texture import blank_averages, noise_texture_flags, texture_measures

BETAGAL = Path("real_micrographs") / "betagal_empiar10017_cryosegnet"
N_PARTICLES, K, DIAMETER_A, APIX, BOX = 600, 10, 200.0, 3.54, 100
#: the defaults, except: 10 classes, the schedule shortened to 8 online iterations
SETTINGS = {
    "n_classes": K,
    "n_online_em_iterations": 8,
    "annealing_start_iteration": 1,
    "n_annealing_iterations": 6,
    "particle_diameter_A": DIAMETER_A,
    "ctf_correction": "off",
    "seed": 0,
}
#: a class is populated when it holds at least 2 % of the particles
MIN_PARTICLES = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory) -> Path:
    """``particles.star`` of the first 600 tutorial particles, as the benchmark extracts them."""
    tool = shared_data.parent / "tools" / "extract_particles.py"
    data = shared_data / BETAGAL
    if not tool.is_file() or not (data / "coords_relion_tutorial.star").is_file():
        pytest.skip(f"{tool} or {data} not present")
    out = tmp_path_factory.mktemp("betagal") / "particles"
    cmd = [sys.executable, str(tool), str(data / "coords_relion_tutorial.star")]
    cmd += [str(data / "micrographs"), str(out), "--apix", "1.77", "--box", "200", "--bin", "2"]
    cmd += ["--invert", "--limit", str(N_PARTICLES)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out / "particles.star"


def engine_mask() -> np.ndarray:
    """The engine's default class mask: flat to the particle diameter, soft to 1.2x it."""
    inner, outer = DIAMETER_A / APIX, 1.2 * DIAMETER_A / APIX
    return soft_disc(BOX, inner, 0.5 * (outer - inner)).numpy()


def test_default_job_starts_on_binned_particles_without_defocus(subset, tmp_path):
    """``napari-class2d classify particles.star --particle-diameter 200 --ctf off`` runs on the
    extracted set (RELION 3.1 optics with voltage, Cs and amplitude contrast but no defocus;
    3.54 Å pixels, Nyquist 7.08 Å). Here shortened to 4 classes and one online iteration."""
    from napari_class2d.cli import main

    out = tmp_path / "job"
    argv = ["classify", str(subset), "--out", str(out), "--particle-diameter", "200"]
    argv += ["--ctf", "off", "--classes", "4", "--online-iters", "1", "--batch-per-class", "50"]
    argv += ["--quiet"]
    assert main(argv) == 0
    assert (out / "run_data.star").is_file() and (out / "run_classes.mrcs").is_file()


@pytest.fixture(scope="module")
def classified(subset, tmp_path_factory) -> dict:
    """The shortened default job on the subset: averages, class sizes and what it took."""
    import mrcfile
    import starfile

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles

    particles = read_particles(subset)
    settings = dict(SETTINGS)
    out = tmp_path_factory.mktemp("betagal_job")
    t0 = time.perf_counter()
    with torch_threads(1):  # the same classes on any machine (see the module docstring)
        job = Class2DJob(particles, Class2DConfig(**settings), out_dir=out, overwrite=True)
        populated_per_iteration = [int((s.class_counts_hard > 0).sum()) for s in job.run()]
        paths = job.write_outputs(out, overwrite=True)
    seconds = time.perf_counter() - t0

    averages = mrcfile.read(paths["classes"]).astype(np.float32)
    table = starfile.read(paths["data"], always_dict=True)["particles"]
    counts = np.bincount(table["rlnClassNumber"].to_numpy(int), minlength=K + 1)[1:]
    tex = texture_measures(averages, APIX, DIAMETER_A)
    summary = (
        f"{N_PARTICLES} β-gal particles, K = {K}, {seconds:.0f} s; "
        f"classes populated per iteration {populated_per_iteration}; "
        f"final class sizes {counts.tolist()}; blank averages "
        f"{np.nonzero(tex['blank'])[0].tolist()}; outer energy fractions "
        f"{np.round(tex['outer_energy_fraction'], 2).tolist()}, fine power fractions "
        f"{np.round(tex['fine_power_fraction'], 2).tolist()}; noise textures "
        f"{np.nonzero(tex['noise_texture'])[0].tolist()}"
    )
    print("\n" + summary)
    return {"averages": averages, "counts": counts, "texture": tex, "summary": summary}


def test_most_classes_are_populated(classified):
    populated = int((classified["counts"] >= MIN_PARTICLES).sum())
    assert populated >= 0.8 * K, classified["summary"]


def test_no_class_is_left_as_a_blank_image(classified):
    n_blank = int(blank_averages(classified["averages"]).sum())
    assert n_blank == 0, classified["summary"]


def test_class_averages_are_not_noise_textures(classified):
    big = classified["counts"] >= MIN_PARTICLES
    flags = noise_texture_flags(classified["averages"], APIX, DIAMETER_A)
    n_textures = int((flags & big).sum())
    assert n_textures == 0, classified["summary"]


def test_texture_check_fails_noise_and_stripes_and_passes_real_averages(subset, shared_data):
    """Controls on this data: 'class averages' of pure noise (60 noise images with the
    particles' own power spectrum, averaged) and of stripes are flagged; the tutorial's 32
    real averages (particles aligned with RELION's poses) pass, as they are and under the
    engine's mask."""
    import mrcfile

    stacks = sorted((subset.parent / "Particles").glob("*.mrcs"))
    images = np.concatenate([mrcfile.read(s) for s in stacks]).astype(np.float64)
    power = (np.abs(np.fft.fft2(images)) ** 2).mean(0)
    rng = np.random.default_rng(0)
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(5, 60, BOX, BOX))) * np.sqrt(power)))
    c = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    stripes = [
        np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) * APIX / p)
        for p, a in ((25.0, 0.4), (40.0, 2.0))
    ]
    negatives = np.concatenate([noise.mean(1), np.stack(stripes)]) * engine_mask()
    neg = texture_measures(negatives, APIX, DIAMETER_A)
    assert neg["noise_texture"].all(), neg

    tutorial = mrcfile.read(shared_data / BETAGAL / "relion_tutorial_class_averages.mrcs")
    for real in (tutorial, tutorial * engine_mask()):
        pos = texture_measures(real, APIX, DIAMETER_A)
        assert not pos["noise_texture"].any(), pos
    oef_neg, oef_pos = neg["outer_energy_fraction"], pos["outer_energy_fraction"]
    assert oef_neg.min() > 2 * np.nanmax(oef_pos), (oef_neg, oef_pos)
