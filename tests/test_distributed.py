"""One job over several processes (``torchrun``, gloo on this CPU machine): the same
classes and averages as one process, stop and resume, a process that dies.

Tolerance of "the same": the processes sum their partial statistics, so the float32
sums are added in another order than one process adds them (and the E-step's matrix
products run on other batch sizes). The difference is a few float32 roundings: on
these data the class averages differ by less than 1e-6 of their largest value and the
per-particle probabilities by ~3e-5. The tests ask for identical classes, rotations and
shifts (poses come from a discrete grid, so a rounding changes one only at an exact
tie) and for averages within 1e-5 of their largest value, log-likelihoods within 1e-5
relative and probabilities within 1e-3. A difference in the algorithm (a particle
counted twice or not at all, another random draw) moves the averages by ~1e-2 and the
classes of many particles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

import napari_class2d
from napari_class2d.cli import main as cli_main
from napari_class2d.engine import distributed
from napari_class2d.engine.config import Class2DConfig
from napari_class2d.engine.distributed import LOCAL, SHARD_BLOCK, Shard
from napari_class2d.engine.job import CHECKPOINT
from napari_class2d.engine.pool import ParticlePool, working_grid
from synthetic import make_particles

HERE = Path(__file__).resolve().parent
FLAGS = [
    "--classes", "4", "--max-res", "10", "--online-iters", "4", "--batch-per-class", "40",
    "--full-iters", "1", "--particle-diameter", "120", "--anneal-start", "1",
    "--anneal-iters", "2", "--device", "cpu",
]  # fmt: skip
N_ITERATIONS = 5


def write_particles(folder: Path, n: int = 400, seed: int = 3, files: int = 1) -> Path:
    """RELION 3.1 particle files with their stacks: 3 views, CTF, SNR 0.5, box 32; with
    ``files`` > 1 one STAR file and stack per micrograph (a folder to stream)."""
    folder.mkdir(parents=True, exist_ok=True)
    ps = make_particles(n, box=32, pixel_size_A=5.0, n_views=3, snr=0.5, seed=seed)[0]
    if files > 1:
        for f, rows in enumerate(np.array_split(np.arange(n), files)):
            _write(folder / f"mic{f:03d}", ps.subset(rows))
        return folder
    return _write(folder / "particles", ps)


def _write(stem: Path, ps) -> Path:
    with mrcfile.new(stem.with_suffix(".mrcs"), overwrite=True) as m:
        m.set_data(ps.read_images())
        m.set_image_stack()
        m.voxel_size = 5.0
    n = ps.n_particles
    c = ps.ctf
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [5.0],
            "rlnImageSize": [32],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stem.name}.mrcs" for i in range(n)],
            "rlnOpticsGroup": 1,
            "rlnDefocusU": c.defocus_u_A,
            "rlnDefocusV": c.defocus_v_A,
            "rlnDefocusAngle": c.astigmatism_angle_deg,
        }
    )
    star = stem.with_suffix(".star")
    starfile.write({"optics": optics, "particles": particles}, star, float_format="%.6f")
    return star


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` with this checkout's package."""
    src = str(Path(napari_class2d.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def classify(nproc: int, star: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    result = torchrun(nproc, "-m", "napari_class2d", "classify", str(star), "--out", str(out),
                      *FLAGS, *extra)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def result_of(out: Path) -> dict:
    particles = starfile.read(out / "run_data.star", always_dict=True)["particles"]
    with mrcfile.open(out / "run_classes.mrcs") as m:
        averages = m.data.copy()
    return {"particles": particles, "averages": averages}


def assert_same_result(a: dict, b: dict, ties: int = 0) -> None:
    """The tolerance of the module docstring; ``ties``: how many particles may take
    another class or pose (a tie that float32 summation order decides), their
    contributions then moving the averages by up to 10⁻² of their largest value."""
    pa, pb = a["particles"], b["particles"]
    differ = (pa["rlnClassNumber"] != pb["rlnClassNumber"]).to_numpy().copy()
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        differ |= np.abs(pa[col] - pb[col]).to_numpy() > 1e-4
    assert differ.sum() <= ties, f"{differ.sum()} particles differ in class or pose"
    same = ~differ
    np.testing.assert_allclose(
        pa["rlnMaxValueProbDistribution"][same], pb["rlnMaxValueProbDistribution"][same],
        atol=1e-3 if not ties else 2e-2,
    )  # fmt: skip
    np.testing.assert_allclose(
        pa["rlnLogLikeliContribution"][same], pb["rlnLogLikeliContribution"][same],
        rtol=1e-5 if not ties else 1e-3, atol=1e-3,
    )  # fmt: skip
    scale = float(np.abs(a["averages"]).max())
    atol = (1e-5 if not ties else 1e-2) * scale
    np.testing.assert_allclose(a["averages"], b["averages"], rtol=0, atol=atol)


def checkpoint_counters(out: Path) -> dict:
    raw = torch.load(out / CHECKPOINT, weights_only=True)
    return json.loads(raw["json"])["counters"]


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    return write_particles(tmp_path_factory.mktemp("particles"))


@pytest.fixture(scope="module")
def one_process(star, tmp_path_factory) -> dict:
    """The job in this process, through the command line."""
    out = tmp_path_factory.mktemp("one") / "job"
    assert cli_main(["classify", str(star), "--out", str(out), "--quiet", *FLAGS]) == 0
    return result_of(out)


# -- without processes -----------------------------------------------------------------
def test_shards_split_every_particle_once_in_blocks_whatever_the_batch():
    idx = np.arange(1000)
    for world in (1, 2, 3, 8):
        owners = np.stack([Shard(r, world).owns(idx) for r in range(world)])
        assert (owners.sum(0) == 1).all()  # each particle held by exactly one process
        if world > 1:
            first = np.argmax(owners, 0)
            assert (first == (idx // SHARD_BLOCK) % world).all()
    # a batch (any order) is split by the same rule: its parts are the particles' owners'
    batch = np.random.default_rng(0).permutation(1000)[:300]
    parts = [Shard(r, 3).mine(batch) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(batch.tolist())
    assert Shard().folder is None and Shard(1, 4).folder == "rank001-of-004"


def test_one_process_reducer_changes_nothing():
    t = torch.arange(4.0)
    (same,) = LOCAL.sum(t)
    assert same is t and LOCAL.any(False, True) == (False, True)
    assert LOCAL.broadcast_object({"a": 1}) == {"a": 1} and LOCAL.is_main
    assert distributed.current() is LOCAL and not distributed.launched()


def test_a_process_caches_only_its_particles_as_one_process_does(tmp_path):
    ps = make_particles(150, box=32, pixel_size_A=5.0, n_views=3, seed=1)[0]
    params = Class2DConfig(max_res_A=10.0, particle_diameter_A=120.0).resolve(32, 5.0)
    whole = ParticlePool(params, working_grid(params), tmp_path / "c")
    whole.add(ps)
    part = ParticlePool(params, working_grid(params), tmp_path / "c", shard=Shard(1, 2))
    part.add(ps)
    held = Shard(1, 2).mine(np.arange(150))
    assert part.n == 150 and part.n_held == len(held) == 64
    assert (tmp_path / "c" / "rank001-of-002" / "block_00000.npy").is_file()
    np.testing.assert_array_equal(part.half, whole.half)  # the same half sets
    for a, b in zip(part.get(held), whole.get(held), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(IndexError, match="another process"):
        part.get([0])
    # resumed with the same number of processes: the cache is reused
    again = ParticlePool(params, working_grid(params), tmp_path / "c", shard=Shard(1, 2))
    assert again.reopen([ps], part.half) == 0
    # with another number: preprocessed again, the same values
    three = ParticlePool(params, working_grid(params), tmp_path / "c", shard=Shard(0, 3))
    assert three.reopen([ps], part.half) == 1
    mine = Shard(0, 3).mine(np.arange(150))
    np.testing.assert_array_equal(three.get(mine)[0].numpy(), whole.get(mine)[0].numpy())


def test_resume_command_names_the_launcher(monkeypatch):
    assert distributed.launch_words(["classify", "p.star"]) == [
        "napari-class2d",
        "classify",
        "p.star",
    ]
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.launch_words(["classify"]) == [
        "torchrun", "--nnodes", "2", "...", "--nproc-per-node", "4", "-m", "napari_class2d",
        "classify",
    ]  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.rank_device("cuda") == f"cuda:{3 % max(torch.cuda.device_count(), 1)}"
    assert distributed.rank_device("cpu") == "cpu"


# -- under torchrun ----------------------------------------------------------------------
def test_two_processes_give_the_one_process_result(star, one_process, tmp_path):
    out = tmp_path / "two"
    run = classify(2, star, out)
    assert_same_result(one_process, result_of(out))
    # one process prints the job's lines; each caches its own particles
    assert run.stdout.count("Done:") == 1
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "rank000-of-002",
        "rank001-of-002",
    ]


@pytest.mark.slow
def test_stop_under_torchrun_then_resume_gives_the_uninterrupted_result(
    star, one_process, tmp_path
):
    out = tmp_path / "job"
    # Ctrl-C reaches one process only (rank 1, which writes nothing): all stop together
    stopped = torchrun(2, str(HERE / "dist_driver.py"), "--stop-rank", "1", "--after", "2",
                       "--", "classify", str(star), "--out", str(out), *FLAGS)  # fmt: skip
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert checkpoint_counters(out)["iteration"] == 2
    assert (
        "Resume with:" in stopped.stdout
        and "torchrun --standalone --nproc-per-node 2" in stopped.stdout
    )
    resumed = classify(2, star, out, "--resume")
    assert "resumed after iteration 2" in resumed.stdout
    assert checkpoint_counters(out)["done"]
    assert_same_result(one_process, result_of(out))


@pytest.mark.slow
def test_a_process_that_dies_stops_the_job_with_a_clear_error_and_resume_continues(
    star, one_process, tmp_path
):
    out = tmp_path / "job"
    failed = torchrun(2, str(HERE / "dist_driver.py"), "--kill-rank", "1", "--after", "2",
                      "--", "classify", str(star), "--out", str(out), *FLAGS)  # fmt: skip
    text = failed.stdout + failed.stderr
    assert failed.returncode != 0
    # the launcher names the process that died; rank 0 says why it stops and how to go on
    assert "rank      : 1 (local_rank: 1)" in text and "SIGKILL" in text
    line = next(x for x in text.splitlines() if "classify (rank 0 of 2)" in x)
    assert (
        "another process of the job stopped or cannot be reached" in line
        or "stopped by SIGTERM (under torchrun: another process of the job failed" in line
    ), line
    assert 1 <= checkpoint_counters(out)["iteration"] <= 2
    # resumed in one process: the cache of two processes is made again for one
    assert cli_main(["classify", str(star), "--out", str(out), "--resume", "--quiet", *FLAGS]) == 0
    assert (out / "cache" / "block_00000.npy").is_file()
    assert_same_result(one_process, result_of(out))


@pytest.mark.slow
def test_a_stream_under_torchrun_gives_the_one_process_result(tmp_path):
    """Rank 0 watches the folder and hands what arrives to rank 1. All files are there at
    the start and no full iteration is triggered before the idle finish, so the schedule
    does not depend on timing.

    Without re-seeding: on this set one particle of the 4th update's 160 sits on a tie
    between two classes that float32 summation order decides (measured: 18 vs 19
    members), and the split that re-seeds an emptied class right after it cuts at the
    median of 94 or 93 members, so the two runs go on to different classes. That is the
    tie, not the distribution under test (docs/distributed.md)."""
    watch = write_particles(tmp_path / "watch", files=5)
    flags = [*FLAGS, "--full-every", "100000", "--finish-after-idle", "1", "--poll-seconds", "0.2"]
    flags.append("--no-reseed")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["stream", str(watch), "--out", str(one), "--quiet", *flags]) == 0
    run = torchrun(2, "-m", "napari_class2d", "stream", str(watch), "--out", str(two), *flags)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same_result(result_of(one), result_of(two), ties=2)
    assert (two / "cache" / "particles_00000.star").is_file()  # rank 0 keeps the block tables


@pytest.mark.slow
def test_a_process_that_hangs_stops_the_job_after_the_timeout(
    star, one_process, tmp_path, monkeypatch
):
    """Rank 1 stops answering (SIGSTOP); rank 0 waits NAPARI_CLASS2D_TIMEOUT_S at the next
    exchange, then stops with one line and exit code 3 (torchrun then kills rank 1)."""
    out = tmp_path / "job"
    monkeypatch.setenv("NAPARI_CLASS2D_TIMEOUT_S", "5")
    failed = torchrun(2, str(HERE / "dist_driver.py"), "--hang-rank", "1", "--after", "2",
                      "--", "classify", str(star), "--out", str(out), *FLAGS)  # fmt: skip
    text = failed.stdout + failed.stderr
    assert failed.returncode != 0
    line = next(x for x in text.splitlines() if "classify (rank 0 of 2): error:" in x)
    assert "cannot be reached" in line and "Timed out" in line, line
    assert "exitcode  : 3" in text  # torchrun's report: rank 0 stopped itself
    assert checkpoint_counters(out)["iteration"] == 2
    assert cli_main(["classify", str(star), "--out", str(out), "--resume", "--quiet", *FLAGS]) == 0
    assert_same_result(one_process, result_of(out))
