"""FolderWatcher: only complete particle files/rows are taken, each exactly once."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from napari_class2d.io.particles import ParticleSet
from napari_class2d.stream.watcher import FolderWatcher, is_temp_name

BOX = 32
APIX = 2.0


# -- writing particle files like an extraction job ----------------------------------
def stack_images(first_id: int, n: int, box: int = BOX) -> np.ndarray:
    """Images whose mean is their global particle id (so reads can be checked)."""
    ids = np.arange(first_id, first_id + n, dtype=np.float32)
    rng = np.random.default_rng(first_id)
    noise = rng.normal(scale=0.01, size=(n, box, box)).astype(np.float32)
    return noise - noise.mean(axis=(1, 2), keepdims=True) + ids[:, None, None]


def write_stack(path: Path, images: np.ndarray) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.voxel_size = APIX


def star_tables(names: list[str], box: int = BOX) -> dict[str, pd.DataFrame]:
    n = len(names)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [APIX],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnDefocusU": np.full(n, 15000.0),
            "rlnDefocusV": np.full(n, 14000.0),
            "rlnDefocusAngle": np.full(n, 30.0),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    return {"optics": optics, "particles": particles}


def write_micrograph(
    folder: Path, name: str, first_id: int, n: int, *, box: int = BOX, star: bool = True
) -> tuple[Path, Path]:
    """``folder/name.mrcs`` and ``folder/name.star`` (RELION 3.1) with ``n`` particles."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = folder / f"{name}.mrcs"
    write_stack(stack, stack_images(first_id, n, box))
    star_path = folder / f"{name}.star"
    if star:
        names = [f"{i + 1:06d}@{stack.name}" for i in range(n)]
        starfile.write(star_tables(names, box), star_path, overwrite=True)
    return star_path, stack


def ids_of(ps) -> np.ndarray:
    """Global particle ids of a set, read back from the images (checks image access)."""
    return np.rint(ps.read_images().mean(axis=(1, 2))).astype(int)


def all_ids(parts) -> np.ndarray:
    parts = [p for p in parts if p is not None]
    return np.concatenate([ids_of(p) for p in parts]) if parts else np.zeros(0, int)


def truncate(path: Path, size: int) -> bytes:
    """Cut ``path`` to ``size`` bytes; return the full content it had."""
    data = path.read_bytes()
    path.write_bytes(data[:size])
    return data


# -- tests ------------------------------------------------------------------------------
def test_takes_complete_files_in_name_order_once(tmp_path):
    write_micrograph(tmp_path / "Movies", "mic002", 100, 30)
    write_micrograph(tmp_path / "Movies", "mic001", 0, 50)
    watcher = FolderWatcher(tmp_path)
    ps = watcher.poll()
    assert ps.n_particles == 80 and ps.box == BOX and ps.has_ctf
    np.testing.assert_array_equal(ids_of(ps), np.r_[np.arange(50), np.arange(100, 130)])
    np.testing.assert_allclose(ps.pixel_size_A, APIX)
    assert watcher.poll() is None
    assert watcher.n_taken == 80 and watcher.pending_files == [] and not watcher.broken_files

    write_micrograph(tmp_path / "Movies", "mic003", 200, 20)
    ps = watcher.poll()
    np.testing.assert_array_equal(ids_of(ps), np.arange(200, 220))
    assert ps.source_path == tmp_path / "Movies" / "mic003.star"
    assert watcher.poll() is None and watcher.n_taken == 100


def test_nested_relion_layout_with_project_relative_paths(tmp_path):
    """RELION: Extract/job012/Movies/*.star name stacks relative to the project folder."""
    movies = tmp_path / "Extract" / "job012" / "Movies"
    for m in range(3):
        _, stack = write_micrograph(movies, f"mic{m}", 10 * m, 10, star=False)
        names = [f"{i + 1:06d}@Extract/job012/Movies/{stack.name}" for i in range(10)]
        starfile.write(star_tables(names), movies / f"mic{m}.star")
    watcher = FolderWatcher(tmp_path / "Extract", project_dir=tmp_path)
    np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(30))


def test_half_written_stack_waits_then_is_taken_exactly_once(tmp_path, caplog):
    write_micrograph(tmp_path, "mic001", 0, 20)
    star, stack = write_micrograph(tmp_path, "mic002", 100, 40)
    full = truncate(stack, 1024 + 5 * BOX * BOX * 4)  # header + 5 of 40 images
    watcher = FolderWatcher(tmp_path)
    with caplog.at_level(logging.WARNING, logger="napari_class2d.stream.watcher"):
        np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(20))
    assert str(star) in watcher.pending_files
    assert any("mic002.star" in r.getMessage() for r in caplog.records)
    assert watcher.poll() is None  # still incomplete: retried, nothing taken

    truncate(stack, 500)  # even the header is incomplete now
    assert watcher.poll() is None

    stack.write_bytes(full)
    np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(100, 140))
    assert watcher.poll() is None and watcher.pending_files == []
    assert watcher.n_taken == 60


def test_star_referencing_missing_stack_waits(tmp_path):
    star, stack = write_micrograph(tmp_path, "mic001", 0, 25)
    data = stack.read_bytes()
    stack.unlink()
    watcher = FolderWatcher(tmp_path)
    for _ in range(3):
        assert watcher.poll() is None
    assert watcher.pending_files == [str(star)]
    stack.write_bytes(data)
    np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(25))
    assert watcher.poll() is None


def test_file_broken_forever_is_reported_by_name(tmp_path, caplog):
    bad_star, bad_stack = write_micrograph(tmp_path, "mic001", 0, 10)
    truncate(bad_stack, 2000)
    not_star = tmp_path / "mic002.star"  # not a STAR file at all
    not_star.write_text("this is not\na STAR file\n")
    wrong_box, _ = write_micrograph(tmp_path, "mic004", 500, 5, box=24)
    write_micrograph(tmp_path, "mic003", 300, 10)
    watcher = FolderWatcher(tmp_path, broken_after_polls=2, broken_after_seconds=0.0)
    with caplog.at_level(logging.WARNING, logger="napari_class2d.stream.watcher"):
        parts = [watcher.poll() for _ in range(4)]
    np.testing.assert_array_equal(all_ids(parts), np.arange(300, 310))
    assert set(watcher.broken_files) == {str(bad_star), str(wrong_box)}
    assert "incomplete" in watcher.broken_files[str(bad_star)]
    assert "24 px" in watcher.broken_files[str(wrong_box)]
    assert str(not_star) not in watcher.pending_files  # not a particle file: ignored
    assert any(
        str(bad_star) in r.getMessage() and "stayed incomplete" in r.getMessage()
        for r in caplog.records
    )
    # a broken file that gets repaired is still taken (and leaves broken_files)
    write_micrograph(tmp_path, "mic001", 0, 10)
    parts = [watcher.poll() for _ in range(3)]
    np.testing.assert_array_equal(all_ids(parts), np.arange(10))
    assert set(watcher.broken_files) == {str(wrong_box)}


def test_growing_star_with_partial_last_line(tmp_path):
    movies = tmp_path / "Movies"
    stacks = [write_micrograph(movies, f"mic{m}", 100 * m, 10, star=False)[1] for m in range(3)]
    names = [f"{i + 1:06d}@Movies/{s.name}" for s in stacks for i in range(10)]
    tables = star_tables(names)
    tables["particles"]["rlnAutopickFigureOfMerit"] = np.linspace(0.5, 0.9, 30)  # last column
    starfile.write(tables, tmp_path / "full.star")
    text = (tmp_path / "full.star").read_text()
    first_row = text.index("000001@Movies/mic0.mrcs")
    header = text[:first_row]
    rows = [r for r in text[first_row:].splitlines(keepends=True) if r.strip()]
    assert len(rows) == 30
    cut = len(rows[12]) - 4  # inside the last number of row 13

    growing = tmp_path / "run_data.star"
    watcher = FolderWatcher(growing)  # may not exist yet
    assert watcher.poll() is None
    growing.write_text(header)
    assert watcher.poll() is None
    with open(growing, "a") as f:
        f.write("".join(rows[:12]) + rows[12][:cut])  # ends mid-line
    ps = watcher.poll()
    np.testing.assert_array_equal(ids_of(ps), np.r_[np.arange(10), 100, 101])
    assert watcher.poll() is None
    # the rest of the line, more rows, and again a partial line
    with open(growing, "a") as f:
        f.write(rows[12][cut:] + "".join(rows[13:15]) + rows[15][:cut])
    ps = watcher.poll()
    np.testing.assert_array_equal(ids_of(ps), np.arange(102, 105))
    np.testing.assert_allclose(  # row 13 was taken whole, with its full last value
        ps.metadata["rlnAutopickFigureOfMerit"],
        tables["particles"]["rlnAutopickFigureOfMerit"][12:15],
        atol=1e-6,
    )
    # then rows whose stack does not exist yet
    stacks[2].rename(tmp_path / "hidden.mrcs")
    with open(growing, "a") as f:
        f.write(rows[15][cut:] + "".join(rows[16:]))
    np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(105, 110))
    assert watcher.pending_files == [str(growing)]
    assert watcher.poll() is None
    (tmp_path / "hidden.mrcs").rename(stacks[2])
    np.testing.assert_array_equal(ids_of(watcher.poll()), np.arange(200, 210))
    assert watcher.poll() is None and watcher.n_taken == 30 and watcher.pending_files == []


def test_state_restore_does_not_reimport(tmp_path):
    write_micrograph(tmp_path, "mic001", 0, 20)
    write_micrograph(tmp_path, "mic002", 100, 20)
    first = FolderWatcher(tmp_path)
    assert first.poll().n_particles == 40
    state = json.loads(json.dumps(first.state()))  # must survive JSON
    assert state["n_taken"] == 40
    assert {k: v["rows_taken"] for k, v in state["files"].items()} == {
        "mic001.star": 20,
        "mic002.star": 20,
    }

    again = FolderWatcher(tmp_path)
    again.restore(state)
    assert again.poll() is None and again.n_taken == 40
    write_micrograph(tmp_path, "mic003", 200, 15)
    np.testing.assert_array_equal(ids_of(again.poll()), np.arange(200, 215))
    assert again.n_taken == 55

    with pytest.raises(ValueError, match="not a FolderWatcher state"):
        again.restore({"format": "something else"})


def test_restore_growing_star_takes_only_appended_rows(tmp_path):
    _, stack = write_micrograph(tmp_path, "mic0", 0, 30, star=False)
    names = [f"{i + 1:06d}@{stack.name}" for i in range(30)]
    starfile.write(star_tables(names), tmp_path / "full.star")
    text = (tmp_path / "full.star").read_text()
    first_row = text.index("000001@")
    header = text[:first_row]
    rows = [r for r in text[first_row:].splitlines(keepends=True) if r.strip()]
    growing = tmp_path / "particles.star"
    growing.write_text(header + "".join(rows[:10]))
    first = FolderWatcher(growing)
    assert first.poll().n_particles == 10
    state = json.loads(json.dumps(first.state()))
    with open(growing, "a") as f:
        f.write("".join(rows[10:]))
    again = FolderWatcher(growing)
    again.restore(state)
    np.testing.assert_array_equal(ids_of(again.poll()), np.arange(10, 30))


def test_same_images_listed_twice_are_taken_once(tmp_path):
    """RELION's job-level particles.star repeats the per-micrograph files."""
    movies = tmp_path / "Movies"
    stars = [write_micrograph(movies, f"mic{m}", 10 * m, 10)[0] for m in range(2)]
    watcher = FolderWatcher(tmp_path)
    assert watcher.poll().n_particles == 20
    names = [f"{i + 1:06d}@Movies/mic{m}.mrcs" for m in range(2) for i in range(10)]
    starfile.write(star_tables(names), tmp_path / "particles.star")
    assert watcher.poll() is None
    assert watcher.n_duplicates_skipped == 20 and watcher.n_taken == 20
    assert len(stars) == 2


def test_ignores_temp_names_and_excluded_folders(tmp_path):
    for name in (".mic001.star", "mic002.star.tmp", "mic003.star.part", "mic004.star~"):
        star, _ = write_micrograph(tmp_path / "w", "x" + name.replace(".", "_"), 0, 5)
        star.rename(tmp_path / "w" / name)
    write_micrograph(tmp_path / "w" / ".hidden", "mic005", 0, 5)
    write_micrograph(tmp_path / "w" / "out", "run_data", 0, 5)
    watcher = FolderWatcher(tmp_path / "w", exclude=[tmp_path / "w" / "out"])
    assert watcher.poll() is None
    assert watcher.pending_files == [] and not watcher.broken_files
    assert is_temp_name("a.star.tmp") and is_temp_name(".a.star") and not is_temp_name("a.star")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FolderWatcher(tmp_path / "nope")


class _Handshake:
    """The writer pauses after each piece it writes until the reader has polled once."""

    def __init__(self):
        self.written = threading.Event()
        self.polled = threading.Event()
        self.done = False

    def wrote(self):
        self.polled.clear()
        self.written.set()
        if not self.polled.wait(10):
            raise TimeoutError("the reader stopped polling")


def _write_in_pieces(path: Path, data: bytes, rng, step: _Handshake) -> None:
    with open(path, "wb") as f:
        for cut in np.sort(rng.integers(1, len(data), 3)).tolist() + [len(data)]:
            f.write(data[f.tell() : cut])
            f.flush()
            step.wrote()


def _writer(folder: Path, n_files: int, per_file: int, step: _Handshake) -> None:
    """Write micrographs as an extraction job does: the stack in pieces, then the STAR."""
    rng = np.random.default_rng(0)
    scratch = folder.parent / "scratch"
    scratch.mkdir()
    try:
        for m in range(n_files):
            write_stack(scratch / "s.mrcs", stack_images(m * per_file, per_file))
            names = [f"{i + 1:06d}@mic{m:03d}.mrcs" for i in range(per_file)]
            starfile.write(star_tables(names), scratch / "s.star", overwrite=True)
            pieces = [("mrcs", scratch / "s.mrcs"), ("star", scratch / "s.star")]
            for suffix, src in pieces if m % 2 == 0 else pieces[::-1]:  # odd: STAR first
                _write_in_pieces(folder / f"mic{m:03d}.{suffix}", src.read_bytes(), rng, step)
    finally:
        step.done = True
        step.written.set()


def test_concurrent_writer_every_particle_exactly_once(tmp_path, caplog):
    n_files, per_file = 8, 15
    folder = tmp_path / "stream"
    folder.mkdir()
    step = _Handshake()
    thread = threading.Thread(target=_writer, args=(folder, n_files, per_file, step))
    watcher = FolderWatcher(folder)
    parts = []
    thread.start()
    with caplog.at_level(logging.WARNING, logger="napari_class2d.stream.watcher"):
        while not step.done:
            step.written.wait(10)
            step.written.clear()
            parts.append(watcher.poll())  # sees every half-written state in turn
            step.polled.set()
    thread.join()
    parts.append(watcher.poll())
    ids = all_ids(parts)
    np.testing.assert_array_equal(ids, np.arange(n_files * per_file))
    assert watcher.n_taken == n_files * per_file
    assert watcher.pending_files == [] and not watcher.broken_files
    # half-written files were seen: STARs whose stack was incomplete waited, and
    # STARs cut mid-table were taken in several pieces
    assert sum("not complete yet" in r.getMessage() for r in caplog.records) >= n_files // 2
    assert sum(p is not None for p in parts) > n_files


def test_poll_is_cheap_for_many_taken_files(tmp_path):
    """Files already taken are only stat-ed again (no parsing)."""
    for m in range(60):
        write_micrograph(tmp_path, f"mic{m:03d}", 5 * m, 5)
    watcher = FolderWatcher(tmp_path)
    assert watcher.poll().n_particles == 300
    t0 = time.perf_counter()
    for _ in range(5):
        assert watcher.poll() is None
    per_poll = (time.perf_counter() - t0) / 5
    assert per_poll < 0.05, f"{per_poll * 1e3:.1f} ms per poll of 60 taken files"


@pytest.fixture(scope="module")
def small_simulation(tmp_path_factory):
    from napari_class2d.sim.simulate import simulate_dataset

    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(
        out, n_particles=120, box=32, pixel_size_A=4.0, n_views=3, rare_views=0,
        n_micrographs=4, seed=3,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("atomic", [False, True])
def test_simulated_feed_every_particle_exactly_once(small_simulation, tmp_path, atomic):
    """`simulate --stream-into`: stacks grow under their final name (atomic=False)."""
    from napari_class2d.io.readers import read_particles
    from napari_class2d.sim.simulate import stream_into

    watch = tmp_path / "incoming"
    watcher = FolderWatcher(watch.parent)  # the feeder creates the folder inside
    feeder = threading.Thread(
        target=stream_into, args=(small_simulation, watch, 600.0), kwargs={"atomic": atomic}
    )
    parts = []
    feeder.start()
    while feeder.is_alive():
        parts.append(watcher.poll())
        time.sleep(0.005)
    feeder.join()
    parts.append(watcher.poll())
    got = ParticleSet.concat([p for p in parts if p is not None])
    truth = read_particles(small_simulation / "particles.star")
    assert got.n_particles == truth.n_particles == 120
    names = got.metadata["rlnImageName"].str.replace(r"@.*/", "@", regex=True)
    assert sorted(names) == sorted(
        truth.metadata["rlnImageName"].str.replace(r"@.*/", "@", regex=True)
    )
    # same images, in the same (micrograph) order
    np.testing.assert_array_equal(got.read_images(), truth.read_images())
    assert not watcher.broken_files and watcher.pending_files == []
