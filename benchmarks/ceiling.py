"""Ceiling benchmark: how well can particles be classified against the *true* class averages?

The quality benchmark asks a classifier for class purity and recovered views. How
much of that the data allow is measured here: the true classification of a simulated
set (``sim/oracle.py``: one class per view, in the view's frame, and one for all
junk) gives the references, and one E-step of the engine (its noise model, CTF and
pose search; annealing factor 1, no prior preference) assigns every particle to one
of them. The assignments are then scored with the same rule as the quality
benchmark (using the true averages, so every class passes the resolution test and
the score measures the assignments). ``--brute-force`` replaces the coarse-to-fine
pose search with every fine rotation and every integer shift at the full alignment
band, which is the best this likelihood can do (slow: run it on ``--subset``).
``--junk-per-kind`` gives every kind of junk (empty boxes, blobs, edges, aggregates...)
a reference of its own, the unaligned mean of its particles, instead of one for all
junk: what spare classes that each gather one kind of junk could do. ``--max-res-A``
aligns to a coarser limit than the job's 6 Å (at low SNR the full band can cost views).

Usage::

    python benchmarks/ceiling.py OUT [--subset N] [--brute-force] [--junk-per-kind]
        [--max-res-A RES]

where ``OUT`` holds ``sim/`` (a folder written by ``benchmarks/quality.py``).
Prints the per-view fraction of particles assigned to their view and the score;
writes ``OUT/ceiling[_brute].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from _common import image_key, machine, score_summary, write_json


def _all_shifts(max_shift_px: float):
    import torch

    r = int(max_shift_px)
    g = torch.arange(-r, r + 1, dtype=torch.float32)
    sx, sy = torch.meshgrid(g, g, indexing="xy")
    shifts = torch.stack((sx.flatten(), sy.flatten()), 1)
    return shifts[(shifts**2).sum(1) <= max_shift_px**2 + 1e-6]


def _unaligned_mean(particles, rows, chunk: int = 512):
    """``(D, D)`` plain mean of the particle images ``rows`` of a particle set."""
    import numpy as np

    total = 0.0
    for s in range(0, len(rows), chunk):
        total = total + particles.read_images(rows[s : s + chunk]).astype(np.float64).sum(0)
    return (total / len(rows)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import json

    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile
    import torch

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.engine.model import ParticleAssignments
    from napari_class2d.io.readers import read_particles
    from napari_class2d.io.starwriter import write_star_file
    from napari_class2d.sim.oracle import oracle_classification
    from napari_class2d.sim.score import score_classification

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder holding sim/ (from benchmarks/quality.py)")
    ap.add_argument("--subset", type=int, default=0, help="random particles scored (0: all)")
    ap.add_argument("--brute-force", action="store_true", help="exhaustive pose search")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--refine", type=int, default=0, help="classes refined (0: engine's)")
    ap.add_argument(
        "--candidates", type=int, default=0, help="classes past the coarse pass (0: engine's)"
    )
    ap.add_argument("--junk-per-kind", action="store_true", help="one reference per kind of junk")
    ap.add_argument(
        "--max-res-A",
        type=float,
        default=0.0,
        help="finest resolution aligned to, Å (0: the job's, 6 Å or Nyquist)",
    )
    args = ap.parse_args(argv)

    sim = args.out / "sim"
    truth_info = json.loads((sim / "truth.json").read_text())
    apix = truth_info["pixel_size_A"]
    oracle = oracle_classification(sim, args.out / "ceiling" / "oracle")
    refs = torch.from_numpy(mrcfile.read(oracle["classes"]).astype(np.float32))
    particles = read_particles(sim / "particles.star")
    truth = starfile.read(sim / "truth.star")

    t = truth.set_index(image_key(truth.rlnImageName)).loc[
        image_key(particles.metadata.rlnImageName)
    ]
    n_views = refs.shape[0] - 1
    kind = t.sim_junk_kind.to_numpy()
    label = np.where(kind != "none", n_views, t.sim_view).astype(int)
    classes_file = oracle["classes"]
    if args.junk_per_kind:
        kinds = sorted(set(kind.tolist()) - {"none"})
        means = [_unaligned_mean(particles, np.nonzero(kind == j)[0]) for j in kinds]
        refs = torch.cat([refs[:n_views], torch.from_numpy(np.stack(means))])
        for j, name in enumerate(kinds):
            label[kind == name] = n_views + j
        classes_file = args.out / "ceiling" / "junk_per_kind_classes.mrcs"
        with mrcfile.new(classes_file, overwrite=True) as f:
            f.set_data(refs.numpy())
            f.voxel_size = apix
    k = refs.shape[0]
    config = Class2DConfig(
        n_classes=k,
        max_res_A=args.max_res_A or max(6.0, math.ceil(20 * apix) / 10),
        particle_diameter_A=round(1.1 * truth_info["particle_diameter_A"]),
        n_online_em_iterations=1,
        n_final_full_iterations=0,
        reseed_empty_classes=False,
    ).validate()
    job = Class2DJob(particles, config, out_dir=args.out / "ceiling" / "job", overwrite=True)
    next(job.run())  # preprocessing and the noise model of one iteration
    model, pool = job.model, job.pool
    if model.references.shape[-1] < refs.shape[-1]:  # Fourier-cropped working box
        from napari_class2d.ranking import fourier_crop

        refs = fourier_crop(refs, model.references.shape[-1])
    if model.references.shape != refs.shape:
        sys.exit(f"working box {tuple(model.references.shape)} != oracle box {tuple(refs.shape)}")

    idx = np.arange(pool.n)
    if args.subset:
        rng = np.random.default_rng(args.seed)
        idx = np.sort(rng.choice(pool.n, min(args.subset, pool.n), replace=False))
    space = model.space
    if args.brute_force:
        model.space = dataclasses.replace(
            space,
            stride=1,
            coarse_band=space.align_band.clone(),
            coarse_shifts=_all_shifts(space.max_shift_px),
            n_candidates=k,
            refine_offsets=torch.tensor([-1, 1]),
            n_coarse_poses=1,
        )
    if args.candidates:
        model.space = dataclasses.replace(model.space, n_candidates=min(args.candidates, k))
    if args.refine:
        model.space = dataclasses.replace(model.space, n_refine=min(args.refine, k))
    model.references = refs * model.mask
    # the full alignment band: not the band the first iteration's classes had grown to
    model.current_radius = model._max_align_radius
    model.n_updates = 0  # search against these references, not half-set averages
    model.prior = torch.full((k,), 1.0 / k)
    assignments = ParticleAssignments.empty(pool.n)
    t0 = time.perf_counter()
    stats = model.iterate(pool, idx, assignments, 1.0, 1.0, False, False, job.rng)
    seconds = time.perf_counter() - t0

    label = label[idx]
    correct = assignments.best_class[idx] == label
    per_label = {
        int(v): round(float(correct[label == v].mean()), 3) for v in range(k) if (label == v).any()
    }
    star = args.out / "ceiling" / ("assigned_brute.star" if args.brute_force else "assigned.star")
    write_star_file(
        star,
        {
            "particles": pd.DataFrame(
                {
                    "rlnImageName": particles.metadata.rlnImageName.to_numpy()[idx],
                    "rlnClassNumber": assignments.best_class[idx] + 1,
                }
            )
        },
    )
    score = score_classification(sim, star, classes_file)
    result = {
        "search": "brute force" if args.brute_force else "engine (coarse-to-fine)",
        "n_particles": int(len(idx)),
        "fraction_assigned_to_their_view": round(float(correct.mean()), 3),
        "per_view_fraction": per_label,
        "junk_labels": list(range(n_views, k)),
        **score_summary(score),
        "junk_by_kind_in_recovered_classes": {
            j: round(v["in_recovered_classes"], 3) for j, v in score["junk_by_kind"].items()
        },
        # particles whose rotation posterior is broad even against the true averages
        "marginalised_fraction": round(stats.timings["marginalised_fraction"], 3),
        "search_ms_per_particle": round(1e3 * stats.timings["search_s"] / len(idx), 2),
        "e_step_s": round(seconds, 1),
        "machine": machine(),
    }
    name = "ceiling_brute.json" if args.brute_force else "ceiling.json"
    if args.junk_per_kind:
        name = name.replace(".json", "_junk_per_kind.json")
    if args.max_res_A:
        name = name.replace(".json", f"_{args.max_res_A:g}A.json")
    if args.candidates or args.refine:
        name = name.replace(".json", f"_c{args.candidates}_r{args.refine}.json")
    write_json(args.out / name, result)
    print(json.dumps({k_: v for k_, v in result.items() if k_ != "machine"}, indent=2))
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
