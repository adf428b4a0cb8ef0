"""stream_into: files appear at the requested rate and never half-written under a final name."""

from __future__ import annotations

import os
import threading
import time

import mrcfile
import numpy as np
import pytest
import starfile

from napari_class2d.sim.simulate import simulate_dataset, stream_into
from napari_class2d.sim.threads import torch_threads


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with torch_threads(1):
        return simulate_dataset(
            tmp_path_factory.mktemp("feed") / "sim",
            n_particles=160,
            box=32,
            pixel_size_A=5.0,
            n_views=3,
            rare_views=1,
            rare_fraction=0.05,
            n_micrographs=8,
            seed=2,
        )


def _expected_size(path) -> int | None:
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            h = mrc.header
            return 1024 + int(h.nsymbt) + int(h.nx) * int(h.ny) * int(h.nz) * 4
    except (FileNotFoundError, ValueError):
        return None


def test_visible_files_are_always_complete(sim, tmp_path):
    watch = tmp_path / "watch"
    problems: list[str] = []
    seen: set[str] = set()
    done = threading.Event()

    def scan():
        if not watch.is_dir():
            return
        names = set(os.listdir(watch))
        for name in names:
            if name.startswith("."):
                continue  # temporary names are allowed to be partial
            path = watch / name
            if name.endswith(".mrcs"):
                size = os.path.getsize(path)
                if size != _expected_size(path):
                    problems.append(f"{name}: {size} bytes")
            elif name.endswith(".star"):
                if name.replace(".star", ".mrcs") not in names:
                    problems.append(f"{name} visible before its stack")
            seen.add(name)

    def watcher():
        while not done.is_set():
            scan()
            time.sleep(0.001)
        scan()

    t = threading.Thread(target=watcher)
    t.start()
    t0 = time.monotonic()
    try:
        written = stream_into(sim.out_dir, watch, rate_per_second=800.0)
    finally:
        done.set()
        t.join()
    elapsed = time.monotonic() - t0
    assert problems == []
    assert len(written) == 8 and len(seen) == 16
    # paced at the requested rate: never faster; slower only by what a busy machine adds
    assert 160 / 800.0 - 0.02 <= elapsed < 160 / 800.0 + 1.0
    assert not [p for p in os.listdir(watch) if p.startswith(".")]  # no temp files left
    for star in written:
        src = sim.out_dir / "stacks" / star.name
        np.testing.assert_array_equal(
            mrcfile.read(star.with_suffix(".mrcs")), mrcfile.read(src.with_suffix(".mrcs"))
        )
        data = starfile.read(star, always_dict=True)
        assert set(data) == {"optics", "particles"}
        first = data["particles"]["rlnImageName"].iloc[0]
        assert (watch / first.split("@")[1]).is_file()


def test_stop_event_and_refusal_to_overwrite(sim, tmp_path):
    watch = tmp_path / "w"
    stop = threading.Event()
    got = []

    def progress(done, total, path):
        got.append(done)
        if len(got) == 3:
            stop.set()

    written = stream_into(sim.out_dir, watch, None, stop_event=stop, progress=progress)
    assert len(written) == 3 and got == [20, 40, 60]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stream_into(sim.out_dir, watch, None)
    assert len(stream_into(sim.out_dir, watch, None, overwrite=True)) == 8


def test_non_atomic_mode_writes_stack_in_pieces(sim, tmp_path):
    """atomic=False: a stack grows under its final name (for testing consumers)."""
    watch = tmp_path / "slow"
    sizes: list[int] = []
    done = threading.Event()

    def watcher():
        target = watch / "mic_0001.mrcs"
        while not done.is_set():
            if target.exists():
                sizes.append(os.path.getsize(target))
            time.sleep(0.0005)

    t = threading.Thread(target=watcher)
    t.start()
    try:
        stream_into(sim.out_dir, watch, rate_per_second=100.0, atomic=False, max_micrographs=1)
    finally:
        done.set()
        t.join()
    full = _expected_size(watch / "mic_0001.mrcs")
    assert sizes and sizes[-1] == full
    assert min(sizes) < full  # it was seen incomplete under its final name
    assert (watch / "mic_0001.star").is_file()
