"""Scale benchmark: one full iteration at 1x, 10x, 100x particles from a memory-mapped cache.

A simulated stack (default 6000 particles, box 96) is reused: the STAR file of
scale ``s`` lists every particle ``s`` times. Each scale runs in its own
process (so its peak memory is its own) as a Class2DJob with no online
iterations and one full iteration, with an output folder so the particle pool
is cached as memory-mapped files. Reported per scale: particles, wall time,
preprocessing (reading + caching) and iteration time, peak RSS split into anonymous
memory (what the job needs) and file-backed pages (reclaimable cache), cache size.
Usage::

    python benchmarks/scale.py [--scales 1 10 100] [--classes 50] [--out DIR] [--n 6000]
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

from _common import REPO, add_set_argument, machine, parse_overrides, simulate_in_child, write_json


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _replicate(star: Path, factor: int, out: Path) -> Path:
    """A STAR file listing every particle of ``star`` ``factor`` times (same images)."""
    import numpy as np
    import starfile

    from napari_class2d.io.starwriter import write_star_file

    blocks = starfile.read(star, always_dict=True)
    parts = blocks["particles"]
    stacks = star.parent.resolve()
    # image paths made absolute so the new STAR can live anywhere
    names = parts["rlnImageName"].str.split("@", n=1, expand=True)
    parts = parts.assign(rlnImageName=names[0] + "@" + (str(stacks) + "/" + names[1]))
    big = parts.iloc[np.tile(np.arange(len(parts)), factor)].reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "particles.star"
    write_star_file(path, {"optics": blocks["optics"], "particles": big})
    return path


def _run_scale(star: str, job_dir: str, settings: dict) -> dict:
    """One full iteration in this (child) process."""
    import resource

    from _common import MemorySampler

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles

    t0 = time.perf_counter()
    with MemorySampler() as memory:
        particles = read_particles(star)
        t_read = time.perf_counter() - t0
        config = Class2DConfig(**settings).validate()
        job = Class2DJob(particles, config, out_dir=job_dir, overwrite=True)
        snaps = []
        for snap in job.run():
            snaps.append(snap)
    wall = time.perf_counter() - t0
    last = snaps[-1]
    t = {k: float(v) for k, v in last.timings.items()}
    iteration_s = t.get("e_step_s", 0.0) + t.get("m_step_s", 0.0)
    return {
        "n_particles": int(particles.n_particles),
        "read_star_s": t_read,
        "wall_s": wall,
        "iteration_s": iteration_s,
        "preprocess_and_io_s": wall
        - t_read
        - sum(s.timings.get("e_step_s", 0.0) + s.timings.get("m_step_s", 0.0) for s in snaps),
        "timings": t,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_anon_MB": memory.peak_anon_MB,
        "peak_file_MB": memory.peak_file_MB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--n", type=int, default=6000, help="particles in the base simulation")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "scale")
    add_set_argument(ap)
    args = ap.parse_args(argv)

    sim_dir = args.out / "sim"
    if not (sim_dir / "particles.star").is_file():
        print(f"simulating {args.n} particles ...", flush=True)
        simulate_in_child(sim_dir, n_particles=args.n, box=96, pixel_size_A=3.0, overwrite=True)
    settings = {
        "n_classes": args.classes,
        "max_res_A": 6.0,
        "n_online_em_iterations": 0,
        "n_final_full_iterations": 1,
    }
    settings.update(parse_overrides(args.set))

    rows = []
    ctx = multiprocessing.get_context("spawn")
    for s in args.scales:
        star = _replicate(sim_dir / "particles.star", s, args.out / f"x{s}")
        job_dir = args.out / f"x{s}" / "job"
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            row = pool.submit(_run_scale, str(star), str(job_dir), settings).result()
        row["scale"] = s
        row["output_folder_MB"] = _folder_size(job_dir) / 2**20
        rows.append(row)
        print(
            f"x{s:<4d} {row['n_particles']:8d} particles: wall {row['wall_s']:8.1f} s, "
            f"iteration {row['iteration_s']:8.1f} s "
            f"({1e3 * row['iteration_s'] / row['n_particles']:.2f} ms/particle), "
            f"preprocessing+I/O {row['preprocess_and_io_s']:7.1f} s, "
            f"peak RSS {row['peak_rss_MB']:7.0f} MB (anonymous {row['peak_anon_MB']:6.0f} MB, "
            f"file-backed {row['peak_file_MB']:6.0f} MB), "
            f"job folder {row['output_folder_MB']:7.0f} MB",
            flush=True,
        )
    write_json(args.out / "scale.json", {"settings": settings, "rows": rows, "machine": machine()})
    print(f"wrote {args.out / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
