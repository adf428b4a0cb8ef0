"""Faults a new user hit on real files, through the commands they typed (issue 13).

Each test runs ``napari-class2d classify`` (or the runner under it) on small
simulated files and checks what the user sees: the exit code, one line of
error without a traceback, a note, and files read back with starfile/mrcfile.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from io_fixtures import fill_up
from napari_class2d.cli import main
from napari_class2d.engine import checkpoint
from napari_class2d.engine.config import Class2DConfig
from napari_class2d.io.particles import ImageSource, ParticleSet
from napari_class2d.io.readers import read_particles
from napari_class2d.io.writers import write_particle_star
from napari_class2d.run.runner import JobRunner, RunError
from napari_class2d.run.spec import JobSpec

#: a job of a few seconds: 3 classes, 2 online iterations of 60 particles, 1 full
TINY = ["--classes", "3", "--batch-per-class", "20", "--online-iters", "2", "--device", "cpu"]
TINY_CONFIG = Class2DConfig(
    n_classes=3, batch_size_per_class=20, n_online_em_iterations=2, device="cpu"
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """240 simulated particles (box 32, 4 Å), RELION 3.1 STAR with CTF."""
    from napari_class2d.sim.simulate import simulate_dataset

    out = tmp_path_factory.mktemp("sim")
    return simulate_dataset(out, n_particles=240, box=32, pixel_size_A=4.0, seed=2).particles_star


def classify(capsys, *args) -> tuple[int, str, str]:
    rc = main(["classify", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_sim(sim, folder):
    """``sim``'s particles.star and stacks/ copied into ``folder``; returns the STAR."""
    folder.mkdir(exist_ok=True)
    shutil.copy(sim, folder / sim.name)
    shutil.copytree(sim.parent / "stacks", folder / "stacks")
    return folder / sim.name


def link_stacks(sim, folder) -> None:
    """Make ``sim``'s stacks/ visible from ``folder`` (for STAR files written there)."""
    os.symlink(sim.parent / "stacks", folder / "stacks")


def with_pixel_size(star, folder, pixel_size_A: float):
    """The particles of ``star`` with another pixel size (same stacks)."""
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = pixel_size_A
    out = folder / "binned.star"
    starfile.write(blocks, out)
    link_stacks(star, folder)
    return out


# -- fault 1: binned data ----------------------------------------------------------------
def test_binned_data_default_max_res_follows_nyquist(sim, tmp_path, capsys):
    """3.54 Å/px: Nyquist 7.08 Å is coarser than the default 6 Å. The default follows the
    data (said in one line); an explicit finer --max-res is a one-line error."""
    binned = with_pixel_size(sim, tmp_path, 3.54)
    rc, out, err = classify(capsys, binned, "--out", tmp_path / "job", *TINY)
    assert rc == 0, err
    assert (
        "max_res_A: the default 6 Å is finer than the data's Nyquist limit 7.08 Å "
        "(pixel 3.540 Å); using 7.08 Å" in out
    )
    with mrcfile.open(tmp_path / "job" / "run_classes.mrcs", permissive=True) as mrc:
        assert mrc.data.shape == (3, 32, 32) and mrc.voxel_size.x == pytest.approx(3.54)
    rc, out, err = classify(capsys, binned, "--out", tmp_path / "job2", "--max-res", "5", *TINY)
    assert_one_line_error(rc, err, "max_res_A=5.0: finer than the data's Nyquist limit 7.08 Å")


# -- fault 2: RELION 3.1 without defocus --------------------------------------------------
def test_relion31_without_defocus_is_classified_without_ctf(sim, tmp_path, capsys):
    blocks = starfile.read(sim, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(
        columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    )
    assert {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"} <= set(
        blocks["optics"].columns
    )
    star = tmp_path / "nodefocus.star"
    starfile.write(blocks, star)
    link_stacks(sim, tmp_path)
    rc, out, err = classify(capsys, star, "--out", tmp_path / "job", *TINY)
    assert rc == 0, err
    assert "no CTF parameters (no defocus columns); classifying without CTF correction" in out
    data = starfile.read(tmp_path / "job" / "run_data.star")["particles"]
    assert len(data) == 240 and data["rlnClassNumber"].between(1, 3).all()
    rc, out, err = classify(capsys, star, "--out", tmp_path / "job_off", "--ctf", "off", *TINY)
    assert rc == 0 and "no CTF parameters" not in out, err


# -- fault 3: image names with spaces -----------------------------------------------------
def test_image_names_with_spaces_are_written_and_resumed(sim, tmp_path, capsys):
    """Stacks named "mic 000.mrcs": the job's run_data.star is written (RELION's quotes),
    and a stopped job resumes and writes it too (both used to fail at the very end)."""
    ps = read_particles(sim)
    stacks = []
    for s in range(len(ps.images.stacks)):
        path = ps.images.stack_path(s)
        spaced = tmp_path / f"{path.stem} with space.mrcs"
        shutil.copy(path, spaced)
        stacks.append(spaced)
    images = ImageSource(stacks, ps.images.stack_index, ps.images.image_index)
    spaced_set = ParticleSet(
        ps.metadata, images, ps.pixel_size_A, ps.box, ps.ctf, ps.optics, ps.optics_group
    )
    star = write_particle_star(tmp_path / "spaced.star", spaced_set)
    # stop after the first iteration, through the same runner the command uses
    runner = JobRunner(JobSpec(TINY_CONFIG, star, tmp_path / "job"))
    for update in runner.run():
        if update.snapshot is not None:
            runner.request_stop()
    assert runner.outcome == "stopped"
    rc, out, err = classify(capsys, star, "--out", tmp_path / "job", "--resume", *TINY)
    assert rc == 0, err
    data = starfile.read(tmp_path / "job" / "run_data.star")["particles"]
    assert data["rlnImageName"].str.contains(" with space.mrcs").all() and len(data) == 240
    back = read_particles(tmp_path / "job" / "run_data.star")
    np.testing.assert_array_equal(back.read_images([0, 239]), ps.read_images([0, 239]))


# -- fault 6: a full disk ----------------------------------------------------------------
def test_no_room_for_the_cache_is_said_before_it_is_made(sim, tmp_path, capsys, monkeypatch):
    """The memory-mapped cache on a full disk died with SIGBUS; free space is checked first."""
    monkeypatch.setattr("napari_class2d.engine.job.free_bytes", lambda folder: 10_000)
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", *TINY)
    assert_one_line_error(
        rc, err, f"no space left on {tmp_path / 'job' / 'cache'} (needed ", "9.8 KiB free"
    )
    assert "for the cache of 240 particles" in err
    assert not list((tmp_path / "job").rglob("*.npy"))


@pytest.mark.slow
def test_a_disk_that_fills_up_keeps_the_last_checkpoint(sim, small_filesystem, capsys):
    """On a real file system that fills up during the job: a one-line error naming the
    folder and the size needed, the previous checkpoint intact, no temporary file left;
    with room again, the job resumes from that checkpoint."""
    disk = small_filesystem(80 * 2**20)
    out = disk / "job"
    runner = JobRunner(JobSpec(TINY_CONFIG, sim, out))
    filler = None
    with pytest.raises(RunError) as err:
        for update in runner.run():
            if update.snapshot is not None and filler is None:
                good = (out / "checkpoint.pt").read_bytes()
                filler = fill_up(disk)
    message = str(err.value)
    assert message.startswith(f"no space left on {out} (needed ") and "\n" not in message
    assert runner.outcome == "failed"
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    filler.unlink()
    rc, stdout, stderr = classify(capsys, sim, "--out", out, "--resume", *TINY)
    assert rc == 0, stderr
    assert "resumed after iteration 1" in stdout
    assert len(starfile.read(out / "run_data.star")["particles"]) == 240


# -- fault 7: configuration errors found with the data -----------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mask-diameter", "1000"], "mask_inner_diameter_A=1000.0: larger than the box (128"),
        (["--particle-diameter", "500"], "particle_diameter_A=500.0: larger than the box"),
        (["--device", "cuda:7"], "device='cuda:7': this machine has"),
        (["--classes", "0"], "n_classes=0: must be >= 1"),
    ],
)
def test_configuration_errors_are_one_line(sim, tmp_path, capsys, args, fragment):
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", *TINY, *args)
    assert_one_line_error(rc, err, "napari-class2d classify: error: ", fragment)


def test_an_output_that_is_a_file_is_one_line(sim, tmp_path, capsys):
    (tmp_path / "job").write_text("not a folder")
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", *TINY)
    assert_one_line_error(rc, err, f"{tmp_path / 'job'}: the output folder is a file")


def test_a_read_only_output_is_one_line(sim, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: use a read-only mount
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            pytest.skip("cannot mount a read-only file system here")
    else:
        folder.chmod(0o555)
    try:
        rc, out, err = classify(capsys, sim, "--out", folder / "job", *TINY)
        assert_one_line_error(rc, err, f"{folder / 'job'}: cannot create the output folder (")
        assert not (folder / "job").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


# -- fault 8: bad pixels, empty data, too many classes ------------------------------------
def _copy_with_stack(sim, folder, edit) -> tuple:
    """``sim`` copied into ``folder``; ``edit(data)`` changes the first stack's pixels.
    Returns (star, first stack)."""
    star = copy_sim(sim, folder / "copy")
    first = read_particles(star).images.stack_path(0)
    with mrcfile.open(first, mode="r+") as mrc:
        data = np.array(mrc.data)
        edit(data)
        mrc.set_data(data)
    return star, first


def test_nan_pixels_are_one_line_naming_stack_and_image(sim, tmp_path, capsys):
    def nan_in_image_5(data):
        data[5, 3, 4] = np.nan

    star, stack = _copy_with_stack(sim, tmp_path, nan_in_image_5)
    rc, out, err = classify(capsys, star, "--out", tmp_path / "job", *TINY)
    assert_one_line_error(
        rc, err, str(stack), "image 5 (0-based; RELION 000006@) contains NaN or infinite"
    )


def test_all_zero_images_and_too_many_classes_warn(sim, tmp_path, capsys):
    def zeros(data):
        data[:] = 0

    star, _ = _copy_with_stack(sim, tmp_path, zeros)
    ps = read_particles(star)
    only_zero = ps.subset(np.flatnonzero(ps.images.stack_index == 0))
    zero_star = write_particle_star(tmp_path / "zero.star", only_zero)
    rc, out, err = classify(capsys, zero_star, "--out", tmp_path / "job", *TINY)
    assert rc == 0, err
    assert "warning: all " in out and "are constant (0 everywhere)" in out
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job50", *TINY, "--classes", "50")
    assert rc == 0, err
    assert "warning: 240 particles for 50 classes (fewer than 10 per class)" in out


# -- fault 9: resuming with other particles ----------------------------------------------
def test_resume_with_other_particles_is_refused(sim, tmp_path, capsys):
    runner = JobRunner(JobSpec(TINY_CONFIG, sim, tmp_path / "job"))
    for update in runner.run():
        if update.snapshot is not None:
            runner.request_stop()
    ps = read_particles(sim)
    other = write_particle_star(tmp_path / "other.star", ps, rows=np.arange(200))
    before = (tmp_path / "job" / "checkpoint.pt").read_bytes()
    rc, out, err = classify(capsys, other, "--out", tmp_path / "job", "--resume", *TINY)
    assert_one_line_error(
        rc, err, f"the checkpoint was made from {sim} (240 particles)", "(200 particles)"
    )
    assert (tmp_path / "job" / "checkpoint.pt").read_bytes() == before


# -- checkpoints are data ----------------------------------------------------------------
def test_checkpoint_is_data_and_other_versions_are_refused(sim, tmp_path, capsys):
    runner = JobRunner(JobSpec(TINY_CONFIG, sim, tmp_path / "job"))
    for update in runner.run():
        if update.snapshot is not None:
            runner.request_stop()
    path = tmp_path / "job" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)  # nothing but tensors, strings and dicts
    assert set(raw) == {"json", "tensors"}
    document, tensors = checkpoint.load(path)
    assert document["version"] == checkpoint.VERSION
    assert document["counters"]["iteration"] == 1
    assert {"model/references", "assignments/best_class", "seen"} <= set(tensors)
    # a checkpoint of another version: a clear error, not a traceback
    checkpoint.save(path, {**document, "version": 99} | {"format": checkpoint.FORMAT}, tensors)
    raw = torch.load(path, weights_only=True)
    raw["json"] = raw["json"].replace('"version": 2', '"version": 99')
    torch.save(raw, path)
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", "--resume", *TINY)
    assert_one_line_error(rc, err, "is a checkpoint of version 99", f"resumes version {2} only")
    # an old pickled checkpoint is never unpickled
    torch.save({"assignments": ParticleSet}, path)  # a pickled class, like version 1
    rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", "--resume", *TINY)
    assert_one_line_error(rc, err, "a pickled checkpoint, which is not loaded")


# -- fault 10: permissions, no scratch folder ----------------------------------------------
def test_outputs_are_readable_by_the_group(sim, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        rc, out, err = classify(capsys, sim, "--out", tmp_path / "job", *TINY)
    finally:
        os.umask(old)
    assert rc == 0, err
    for name in ("run_data.star", "run_classes.mrcs", "run_model.star", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / "job" / name).stat().st_mode) == 0o644, name


@pytest.mark.slow
def test_streaming_leaves_no_temporary_folder(sim, tmp_path, capsys, monkeypatch):
    """The watcher used to parse STAR text through a scratch folder in the system's temporary
    folder, left behind when the job died; it now parses in memory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    watch = tmp_path / "watch"
    copy_sim(sim, watch)
    args = ["stream", watch, "--out", tmp_path / "out", "--poll-seconds", "0.1"]
    rc = main([*map(str, args), "--finish-after-idle", "1", *TINY])
    assert rc == 0, capsys.readouterr().err
    rc = main([*map(str, args), "--finish-after-idle", "1", *TINY, "--classes", "0"])
    assert rc == 2
    assert list(scratch.iterdir()) == []
