"""Streaming benchmark: the quality set delivered in chunks at a steady rate vs the batch job.

Reuses (or makes) the simulation of ``quality.py``, then classifies the same particles
twice with the same seed and parameters: once as a batch job and once as a stream that
receives ``--chunks`` equal parts, one every ``--interval`` seconds, through the same
stream-source interface the folder watcher implements. Both results are scored against
the truth and written side by side.

Usage::

    python benchmarks/streaming.py --map phantom [--chunks 20] [--interval 10] [--out DIR]
        [--batch-json DIR/quality.json]  # reuse a batch run of quality.py on the same set
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from _common import (
    MAPS,
    REPO,
    add_set_argument,
    machine,
    map_path,
    parse_overrides,
    peak_rss_mb,
    simulate_in_child,
    write_json,
)


class TimedChunks:
    """A stream source that releases one chunk of a particle set every ``interval`` s
    (a :class:`~napari_class2d.io.source.ParticleSource`)."""

    streaming = True

    def __init__(self, particles, n_chunks: int, interval_s: float):
        self.parts = np.array_split(np.arange(particles.n_particles), n_chunks)
        self.particles = particles
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self.taken = 0

    def poll(self):
        due = min(len(self.parts), int((time.perf_counter() - self.start) / self.interval_s) + 1)
        if due <= self.taken:
            return None
        idx = np.concatenate(self.parts[self.taken : due])
        self.taken = due
        return self.particles.subset(idx)

    @property
    def exhausted(self) -> bool:
        return self.taken == len(self.parts)

    def state(self) -> dict:
        return {"taken": self.taken}

    def restore(self, state: dict) -> None:
        self.taken = state["taken"]

    def redelivered(self):
        return [self.particles.subset(np.concatenate(self.parts[: self.taken]))]

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", choices=sorted(MAPS), default="phantom")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between chunks")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--batch-json",
        type=Path,
        default=None,
        help="quality.json of a batch run on the same simulation (skips the batch)",
    )
    add_set_argument(
        ap, help="Class2DConfig overrides for both jobs (those of the --batch-json run)"
    )
    args = ap.parse_args(argv)

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles
    from napari_class2d.sim.score import score_classification

    preset = MAPS[args.map]
    out = args.out or REPO / "bench_out" / f"streaming_{args.map}"
    sim_dir = out / "sim"
    if args.batch_json is not None:
        sim_dir = Path(json.loads(args.batch_json.read_text())["simulation"]["dir"])
    if not (sim_dir / "truth.json").is_file():
        simulate_in_child(
            sim_dir,
            map_path=map_path(args.map),
            map_pixel_size_A=preset["map_apix"],
            n_particles=6000,
            box=preset["box"],
            pixel_size_A=preset["apix"],
            snr=0.03,
            junk_fraction=0.08,
            n_views=14,
            rare_views=3,
            rare_fraction=0.01,
            seed=args.seed,
            overwrite=True,
        )
    truth = json.loads((sim_dir / "truth.json").read_text())
    apix = truth["pixel_size_A"]
    config = Class2DConfig(
        n_classes=args.classes,
        max_res_A=max(6.0, math.ceil(20 * apix) / 10),
        particle_diameter_A=round(1.1 * truth["particle_diameter_A"]),
        seed=args.seed,
        **parse_overrides(args.set),
    ).validate()
    particles = read_particles(sim_dir / "particles.star")

    def score(job_dir: Path) -> dict:
        s = score_classification(sim_dir, job_dir / "run_data.star", job_dir / "run_classes.mrcs")
        return {
            "views_recovered": s["views_recovered"],
            "n_views": s["n_views"],
            "rare_views_recovered": s["rare_views_recovered"],
            "n_rare_views": s["n_rare_views"],
            "purity": round(s["purity"], 3),
            "junk_in_recovered_classes": round(s["junk_in_recovered_classes"], 3),
            "junk_share_of_recovered_classes": round(s["junk_share_of_recovered_classes"], 4),
        }

    results = {}
    if args.batch_json is not None:
        batch = json.loads(args.batch_json.read_text())
        results["batch"] = {"source": str(args.batch_json), **batch["summary"]}
    else:
        t0 = time.perf_counter()
        job = Class2DJob(particles, config, out_dir=out / "batch", overwrite=True)
        job.run_to_end()
        results["batch"] = {"wall_s": round(time.perf_counter() - t0, 1), **score(out / "batch")}
        print("batch:", results["batch"], flush=True)

    source = TimedChunks(particles, args.chunks, args.interval)
    job = Class2DJob(source, config, out_dir=out / "stream", overwrite=True, poll_seconds=1.0)
    t0 = time.perf_counter()
    log = []
    for snap in job.run():
        log.append(
            {
                "t_s": round(time.perf_counter() - t0, 1),
                "phase": snap.phase,
                "seen": snap.n_particles_seen,
                "annealing": snap.annealing_factor,
                "message": snap.message,
            }
        )
        print(f"  {log[-1]}", flush=True)
        if source.exhausted and snap.phase == "waiting":
            job.request_finish()
    results["stream"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        **score(out / "stream"),
        "chunks": args.chunks,
        "interval_s": args.interval,
    }
    print("stream:", results["stream"])
    write_json(
        out / "streaming.json",
        {
            "results": results,
            "config": config.to_dict(),
            "log": log,
            "machine": machine(),
            "peak_rss_MB": round(peak_rss_mb()),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
