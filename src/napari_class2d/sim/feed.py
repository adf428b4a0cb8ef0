"""Feed a simulated data set into a folder over time, as a live pre-processing pipeline would.

Each "micrograph" arrives as a ``mic_NNNN.mrcs`` stack followed by its
``mic_NNNN.star`` (RELION 3.1, image names relative to the folder). By default
every file is written under a hidden temporary name (``.mic_0001.mrcs.tmp``)
and renamed when complete, the ``.mrcs`` before its ``.star``, so a watcher
never sees a partial file under a final name. ``atomic=False`` instead writes
the ``.mrcs`` in pieces under its final name (a slow copy over a network file
system), to test that a consumer waits until the size matches the header.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mrcfile

from napari_class2d.sim.files import temp_name


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = temp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _copy_in_pieces(src: Path, dst: Path, pieces: int, pause_s: float, stop) -> None:
    data = src.read_bytes()
    step = max(1, -(-len(data) // pieces))
    with open(dst, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            if start + step < len(data) and stop(pause_s):
                break


def micrograph_files(sim_dir: str | Path) -> list[tuple[Path, Path]]:
    """``(stack, star)`` pairs of a simulation's micrographs, in order."""
    stacks_dir = Path(sim_dir) / "stacks"
    stars = sorted(stacks_dir.glob("mic_*.star"))
    if not stars:
        raise FileNotFoundError(f"{stacks_dir}: no mic_*.star files (not a simulation output?)")
    pairs = []
    for star in stars:
        stack = star.with_suffix(".mrcs")
        if not stack.is_file():
            raise FileNotFoundError(f"{stack}: missing (named by {star})")
        pairs.append((stack, star))
    return pairs


def stream_into(
    out_dir: str | Path,
    watch_dir: str | Path,
    rate_per_second: float | None = 200.0,
    *,
    atomic: bool = True,
    stop_event: threading.Event | None = None,
    overwrite: bool = False,
    max_micrographs: int | None = None,
    progress: Callable[[int, int, Path], None] | None = None,
) -> list[Path]:
    """Copy a simulation's micrographs into ``watch_dir`` at ``rate_per_second`` particles/s.

    Micrograph ``k`` (``n_k`` particles) is complete in ``watch_dir`` at
    ``(n_1 + ... + n_k) / rate_per_second`` seconds after the start, so the
    particles arrive at the given rate; ``None`` (or ``inf``) copies everything
    at once.

    Parameters
    ----------
    out_dir
        A folder written by :func:`napari_class2d.sim.simulate.simulate_dataset`.
    watch_dir
        Folder to feed (created).
    rate_per_second
        Particles per second.
    atomic
        Write each file under ``.<name>.tmp`` and rename it (``True``), or write
        the ``.mrcs`` in pieces under its final name (``False``, see module doc).
    stop_event
        Set it (from another thread) to stop after the current file.
    overwrite
        Replace files already in ``watch_dir``; otherwise an existing
        ``mic_NNNN.mrcs``/``.star`` there raises ``FileExistsError``.
    max_micrographs
        Feed only the first this many micrographs.
    progress
        Called as ``progress(particles_done, n_particles_total, star_path)`` after each file.

    Returns
    -------
    list of Path
        The ``.star`` files written, in order.
    """
    pairs = micrograph_files(out_dir)
    if max_micrographs is not None:
        pairs = pairs[: int(max_micrographs)]
    watch = Path(watch_dir)
    watch.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        for stack, star in pairs:
            for f in (watch / stack.name, watch / star.name):
                if f.exists():
                    raise FileExistsError(f"{f} exists; pass overwrite=True to replace it")
    counts = []
    for stack, _ in pairs:
        with mrcfile.open(stack, header_only=True, permissive=True) as mrc:
            counts.append(int(mrc.header.nz))
    total = sum(counts)
    rate = None if rate_per_second is None or rate_per_second == float("inf") else rate_per_second
    if rate is not None and not rate > 0:
        raise ValueError(f"rate_per_second={rate_per_second}: must be > 0 particles/s")

    def stopped(wait_s: float = 0.0) -> bool:
        if stop_event is None:
            if wait_s > 0:
                time.sleep(wait_s)
            return False
        return stop_event.wait(wait_s) if wait_s > 0 else stop_event.is_set()

    written: list[Path] = []
    t0 = time.monotonic()
    done = 0
    for (stack, star), n in zip(pairs, counts, strict=True):
        due = t0 + (done + n) / rate if rate else t0
        if atomic:
            if stopped(max(0.0, due - time.monotonic())):
                break
            _copy_atomic(stack, watch / stack.name)
        else:
            # the stack grows under its final name while its particles "arrive"
            pause = max(0.0, due - time.monotonic()) / 4
            if stopped(0.0):
                break
            _copy_in_pieces(stack, watch / stack.name, 4, pause, stopped)
            if stopped(max(0.0, due - time.monotonic())):
                break
        _copy_atomic(star, watch / star.name)
        written.append(watch / star.name)
        done += n
        if progress is not None:
            progress(done, total, watch / star.name)
        if stopped(0.0):
            break
    return written
