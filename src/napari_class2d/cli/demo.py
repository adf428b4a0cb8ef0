"""Simulate a built-in ground-truth particle set, classify it and print the scores.

Everything is made on the fly (the procedural phantom; no downloads). The
default is small enough to finish in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="napari_class2d_demo", help="output folder")
    parser.add_argument("--n", type=int, default=3000, help="particles to simulate")
    parser.add_argument("--classes", type=int, default=20, help="number of classes")
    parser.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo")


def main(args: argparse.Namespace) -> int:
    # imported here: torch and the simulator load slowly, and other commands need neither
    from napari_class2d.cli._run import run_spec
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.run.spec import JobSpec
    from napari_class2d.sim.score import score_classification
    from napari_class2d.sim.simulate import simulate_dataset

    out = Path(args.out)
    t0 = time.perf_counter()
    sim = simulate_dataset(
        out / "particles",
        n_particles=args.n,
        box=64,
        pixel_size_A=4.0,
        snr=args.snr,
        n_views=8,
        rare_views=2,
        rare_fraction=0.03,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    t_sim = time.perf_counter() - t0
    print(f"simulated {args.n} particles in {t_sim:.0f} s: {sim.particles_star}")
    spec = JobSpec(
        config=Class2DConfig(
            n_classes=args.classes,
            max_res_A=10.0,
            batch_size_per_class=100,
            seed=args.seed,
        ),
        input=sim.particles_star,
        out_dir=out / "class2d",
        overwrite=args.overwrite,
    )
    resume = f"napari-class2d classify {sim.particles_star} --out {out / 'class2d'} --resume"
    rc = run_spec(spec, "napari-class2d demo", lambda: resume)
    if rc:
        return rc
    t_cls = time.perf_counter() - t0 - t_sim
    scores = score_classification(
        sim.out_dir, out / "class2d" / "run_data.star", out / "class2d" / "run_classes.mrcs"
    )
    summary = {
        k: scores[k]
        for k in (
            "n_views",
            "views_recovered",
            "n_rare_views",
            "rare_views_recovered",
            "purity",
            "junk_in_recovered_classes",
            "junk_share_of_recovered_classes",
            "median_class_resolution_A",
        )
        if k in scores
    }
    summary["classification_seconds"] = round(t_cls, 1)
    print(json.dumps(summary, indent=2, default=float))
    print(f"outputs: {out / 'class2d'} (run_data.star, run_classes.mrcs, run_model.star)")
    print(f"look at them: napari {out / 'class2d' / 'run_classes.mrcs'}")
    return 0
