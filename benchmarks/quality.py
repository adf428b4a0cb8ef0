"""Quality benchmark: simulate a ground-truth data set, classify it, score the classes.

Default set (as in the project brief): 6000 particles, 14 views of which 3 hold
1 % each, 8 % junk, SNR 0.03, realistic CTF, box 96 at the map's pixel size.
``--hard``: SNR 0.01 and 20 % junk. The classifier runs through the engine API
(``Class2DJob(read_particles(star), Class2DConfig(...))``) with the
default schedule; the result is scored with
:func:`napari_class2d.sim.score.score_classification`.

Usage::

    python benchmarks/quality.py --map {phantom,micelle,ribosome,betagal} [--hard]
        [--classes 50] [--out DIR] [--seed 0] [--reuse] [--set key=value ...]

Prints a summary and writes ``OUT/quality.json`` (scores, wall time of the
classification, peak RSS of the classifying process, per-iteration timings).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from _common import (
    MAPS,
    REPO,
    add_set_argument,
    machine,
    map_path,
    parse_overrides,
    peak_rss_mb,
    score_summary,
    simulate_in_child,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", choices=sorted(MAPS), default="phantom")
    ap.add_argument("--hard", action="store_true", help="SNR 0.01 and 20 %% junk")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--n", type=int, default=6000, help="particles (6000)")
    ap.add_argument("--seed", type=int, default=0, help="simulation and classifier seed")
    ap.add_argument("--out", type=Path, default=None, help="default: bench_out/quality_<map>")
    ap.add_argument("--reuse", action="store_true", help="reuse a simulation already in OUT/sim")
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="score the true classification (true labels and poses) instead of the classifier",
    )
    ap.add_argument(
        "--score-every",
        type=int,
        default=0,
        metavar="N",
        help="also score the outputs of every N-th iteration (shows views appearing or vanishing)",
    )
    add_set_argument(ap)
    args = ap.parse_args(argv)

    preset = MAPS[args.map]
    name = f"quality_{args.map}{'_hard' if args.hard else ''}"
    out = args.out or REPO / "bench_out" / name
    sim_dir = out / "sim"
    snr, junk = (0.01, 0.20) if args.hard else (0.03, 0.08)

    sim_seconds = None
    if not (args.reuse and (sim_dir / "truth.json").is_file()):
        print(
            f"simulating {args.n} particles ({args.map}, SNR {snr}, junk {junk:.0%}) ...",
            flush=True,
        )
        sim = simulate_in_child(
            sim_dir,
            map_path=map_path(args.map),
            map_pixel_size_A=preset["map_apix"],
            n_particles=args.n,
            box=preset["box"],
            pixel_size_A=preset["apix"],
            snr=snr,
            junk_fraction=junk,
            n_views=14,
            rare_views=3,
            rare_fraction=0.01,
            seed=args.seed,
            overwrite=True,
        )
        sim_seconds = sim["seconds"]
        print(f"  done in {sim_seconds:.1f} s -> {sim_dir}", flush=True)

    import json

    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles
    from napari_class2d.sim.score import score_classification

    truth = json.loads((sim_dir / "truth.json").read_text())
    apix = truth["pixel_size_A"]
    content = truth["volume"].get("content_resolution_A")
    if content is not None and content > 25.0:
        print(
            f"WARNING: the {args.map} map holds no signal finer than ~{content:.0f} Å, so no "
            "class can pass the 25 Å FRC criterion (see benchmarks/README.md)",
            flush=True,
        )
    settings = {
        "n_classes": args.classes,
        # cryoSPARC's 6 Å default, or Nyquist when the pixel is coarser
        "max_res_A": max(6.0, math.ceil(20 * apix) / 10),
        "particle_diameter_A": round(1.1 * truth["particle_diameter_A"]),
        "seed": args.seed,
    }
    settings.update(parse_overrides(args.set))
    config = Class2DConfig(**settings).validate()

    if args.oracle:
        from napari_class2d.sim.oracle import oracle_classification

        paths = oracle_classification(sim_dir, out / "oracle")
        score = score_classification(sim_dir, paths["data"], paths["classes"])
        keys = ("views_recovered", "rare_views_recovered", "purity", "median_class_resolution_A")
        print(json.dumps({k: score[k] for k in keys}, indent=2))
        for pv in score["per_view"]:
            print(
                f"  view {pv['view']:2d} {pv['kind']:8s} n={pv['n_particles']:4d} "
                f"res={pv['resolution_A']:.1f} Å {'RECOVERED' if pv['recovered'] else 'missed'}"
            )
        write_json(out / "oracle.json", {"benchmark": name, "oracle": True, "score": score})
        print(f"wrote {out / 'oracle.json'}")
        return 0

    job_dir = out / "class2d"
    t0 = time.perf_counter()
    particles = read_particles(sim_dir / "particles.star")
    job = Class2DJob(particles, config, out_dir=job_dir, overwrite=True)
    iterations = []
    for snap in job.run():
        t = snap.timings
        iterations.append(
            {
                "iteration": snap.iteration,
                "phase": snap.phase,
                "n_particles_used": snap.n_particles_used,
                "elapsed_s": round(time.perf_counter() - t0, 3),
                "timings": {k: float(v) for k, v in t.items()},
            }
        )
        print(
            f"  it {snap.iteration:3d}/{snap.n_iterations_planned} {snap.phase:7s} "
            f"{snap.n_particles_used:6d} particles  {time.perf_counter() - t0:7.1f} s  "
            f"search {t.get('search_s', 0):6.2f} s  "
            f"{t.get('evaluations_per_s', 0) / 1e6:8.1f} M evals/s",
            flush=True,
        )
        if args.score_every and snap.iteration % args.score_every == 0 and not job.done:
            ts = time.perf_counter()
            s = score_classification(
                sim_dir, job_dir / "run_data.star", job_dir / "run_classes.mrcs"
            )
            iterations[-1]["score"] = {
                k: s[k] for k in ("views_recovered", "rare_views_recovered", "purity")
            } | {"junk_in_recovered_classes": s["junk_in_recovered_classes"]}
            iterations[-1]["views"] = [pv["recovered"] for pv in s["per_view"]]
            t0 += time.perf_counter() - ts  # scoring is not classification time
            print(
                f"      score: {s['views_recovered']}/{s['n_views']} views, "
                f"{s['rare_views_recovered']}/{s['n_rare_views']} rare, "
                f"purity {s['purity']:.3f}, junk {s['junk_in_recovered_classes']:.3f}, "
                f"views {''.join('x' if pv['recovered'] else '.' for pv in s['per_view'])}",
                flush=True,
            )
    paths = job.write_outputs(job_dir, overwrite=True)
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()

    score = score_classification(sim_dir, paths["data"], paths["classes"])
    summary = {
        **score_summary(score),
        "median_class_resolution_A": score["median_class_resolution_A"],
        "pose_error": score["pose_error"],
        "classification_wall_s": round(wall, 1),
        "peak_rss_MB": round(rss),
    }
    result = {
        "benchmark": name,
        "map": args.map,
        "hard": args.hard,
        "simulation": {"dir": str(sim_dir), "seconds": sim_seconds, **truth["parameters"]},
        "config": config.to_dict(),
        "summary": summary,
        "score": score,
        "iterations": iterations,
        "machine": machine(),
    }
    write_json(out / "quality.json", result)
    print(json.dumps(summary, indent=2))
    for pv in score["per_view"]:
        purity = "-" if pv["class_purity"] is None else f"{pv['class_purity']:.2f}"
        res = "-" if pv["resolution_A"] is None else f"{pv['resolution_A']:.1f}"
        print(
            f"  view {pv['view']:2d} {pv['kind']:8s} n={pv['n_particles']:4d} "
            f"{'RECOVERED' if pv['recovered'] else 'missed   '} class={pv['class']} "
            f"purity={purity} res={res} Å  (best match: class {pv['best_matching_class']} "
            f"at {pv['best_matching_resolution_A']:.1f} Å)"
        )
    print(f"wrote {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
