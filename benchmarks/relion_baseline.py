"""RELION's Class2D on a simulated set, scored like ours: the established tool's baseline.

Runs ``relion_refine`` (RELION 3.1 from Debian: ``apt-get install relion``) with the
settings its GUI gives a Class2D job (EM algorithm, K = 50, 25 iterations,
regularisation T = 2, in-plane sampling 6° and translations ±5 px in 1 px steps with
oversampling 1, CTF correction, mask with zeros, normalisation and scale
correction, class centring) on a simulation written by ``quality.py``, then scores
RELION's last iteration with :func:`napari_class2d.sim.score.score_classification`,
the rule our classifier is scored by. Wall time and peak memory of RELION are
measured here, so run it on an idle machine and compare with ``quality.py`` runs
on the same set.

``--subset N`` runs RELION on the first N particles only and ``--compare-ours`` then
runs our classifier on the same particles with the same number of full iterations
over all of them (no online phase), in the same process run, so the per-iteration
times of the two give a speed ratio measured in one run. ``--ours-default`` runs our
default schedule on the same particles instead (quality.py's settings: the same mask
diameter as RELION's, 6 Å or Nyquist; ``--set`` overrides any field) and scores it
beside RELION; ``--reuse-relion`` scores an earlier RELION run in ``DIR/relion``
again instead of running it; a run that was stopped (or is still running: RELION writes
every iteration) is scored at the last iteration it finished, with the time of its
iterations only (from the times RELION wrote its model files). ``--continue-relion``
continues a stopped run in ``DIR/relion`` from the last iteration it finished (RELION's
own ``relion_refine --continue``), for a set whose 25 iterations take longer than one
sitting; it records when the iteration it resumes from had finished and when the
continuation started (``DIR/relion/continued.json``), so no iteration's time holds the
pause between sittings (the first one continued holds the time RELION takes to read the
particles again).

Usage::

    python benchmarks/quality.py --map phantom --oracle --out OUT   # writes OUT/sim
    python benchmarks/relion_baseline.py OUT/sim [--out DIR] [--iter 25] [--classes 50]
        [--threads 2] [--subset N] [--compare-ours | --ours-default [--set KEY=VALUE ...]]
        [--reuse-relion | --continue-relion] [--extra "--relion_option value"]

Writes ``DIR/relion.json`` (default DIR: the simulation's parent folder) and keeps
RELION's files in ``DIR/relion/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    add_set_argument,
    machine,
    parse_overrides,
    peak_rss_mb,
    score_summary,
    write_json,
)


def model_file_times(prefix: Path, iterations: int) -> list[float]:
    """When RELION wrote ``PREFIX_itNNN_model.star`` for iterations 0, 1, ... (those it
    has written so far, up to ``iterations``): the run's progress and its iterations'
    times, for a run finished, stopped or still going."""
    models = [Path(f"{prefix}_it{i:03d}_model.star") for i in range(iterations + 1)]
    return [m.stat().st_mtime for m in models if m.exists()]


def iteration_seconds(
    stamps: list[float], continued: dict[int, tuple[float, float]] | None = None
) -> list[float]:
    """Seconds of each RELION iteration 1, 2, ... from its model files' times
    (:func:`model_file_times`) and the run's continuations (:func:`continuations`).

    RELION rewrites the model file of the iteration it continues from when it resumes,
    so that iteration ends when its file was first written (recorded before the
    continuation) and the next one starts when the continuation started: the pause
    between sittings is in neither.
    """
    continued = continued or {}
    ends = [continued[i][0] if i in continued else t for i, t in enumerate(stamps)]
    starts = [continued[i][1] if i in continued else t for i, t in enumerate(stamps)]
    return [round(b - a, 1) for a, b in zip(starts, ends[1:], strict=False)]


def continuations(job: Path) -> dict[int, tuple[float, float]]:
    """The continuations of the run in ``job`` (``job/continued.json``; empty for a run
    never continued): for the iteration each continued from, when that iteration had
    finished and when the continuation started (epoch seconds)."""
    record = job / "continued.json"
    if not record.exists():
        return {}
    return {int(k): tuple(v) for k, v in json.loads(record.read_text()).items()}


def continue_relion(job: Path, sim_dir: Path, args) -> None:
    """Continue the stopped run ``job/run`` from the last iteration it finished (RELION's
    ``--continue`` with its optimiser file), in the simulation folder as the run started,
    and record when that iteration had finished and when the continuation started
    (:func:`continuations`)."""
    stamps = model_file_times(job / "run", args.iter)
    reached = len(stamps) - 1
    if reached < 0:
        sys.exit(f"no RELION run to continue in {job} (no run_it000_model.star)")
    if reached >= args.iter:
        return  # finished: nothing to continue
    cmd = [
        "relion_refine",
        "--continue",
        str(job / f"run_it{reached:03d}_optimiser.star"),
        "--o",
        str((job / "run").resolve()),
        "--j",
        str(args.threads),
    ]
    print(" ".join(cmd), flush=True)
    record = continuations(job) | {reached: (stamps[-1], time.time())}
    write_json(job / "continued.json", {str(k): v for k, v in record.items()})
    with open(job / "relion.log", "a") as log:
        done = subprocess.run(cmd, cwd=sim_dir, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"relion_refine --continue failed (exit {done.returncode}); see {job}/relion.log")


def relion_command(particles: str, out_prefix: Path, args, diameter_A: float) -> list[str]:
    """``relion_refine`` as the RELION GUI runs a Class2D job with its default settings."""
    return [
        "relion_refine",
        "--i",
        particles,
        "--o",
        str(out_prefix.resolve()),
        "--dont_combine_weights_via_disc",
        "--pool",
        "30",
        "--pad",
        "2",
        "--ctf",
        "--iter",
        str(args.iter),
        "--tau2_fudge",
        "2",
        "--particle_diameter",
        str(diameter_A),
        "--K",
        str(args.classes),
        "--flatten_solvent",
        "--zero_mask",
        "--center_classes",
        "--oversampling",
        "1",
        # the GUI's 6° in-plane and 1 px translation steps are passed doubled
        # (oversampling 1 halves them in the last pass)
        "--psi_step",
        "12",
        "--offset_range",
        "5",
        "--offset_step",
        "2",
        "--norm",
        "--scale",
        "--j",
        str(args.threads),
        "--random_seed",
        str(args.seed),
        *shlex.split(args.extra),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sim", type=Path, help="simulation folder (particles.star, truth.json)")
    ap.add_argument("--out", type=Path, default=None, help="default: the simulation's parent")
    ap.add_argument("--iter", type=int, default=25, help="RELION iterations (GUI default 25)")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more relion_refine options")
    ap.add_argument("--subset", type=int, default=0, help="only the first N particles")
    ap.add_argument(
        "--compare-ours",
        action="store_true",
        help="also run our classifier on the same particles with --iter full iterations",
    )
    ap.add_argument(
        "--ours-default",
        action="store_true",
        help="also run and score our default schedule on the same particles",
    )
    add_set_argument(ap, help="our overrides")
    again = ap.add_mutually_exclusive_group()
    again.add_argument(
        "--reuse-relion", action="store_true", help="score the RELION run already in DIR/relion"
    )
    again.add_argument(
        "--continue-relion",
        action="store_true",
        help="continue the stopped RELION run in DIR/relion from its last finished "
        "iteration, then score it",
    )
    args = ap.parse_args(argv)

    if shutil.which("relion_refine") is None:
        sys.exit("relion_refine not found: install RELION (Debian: apt-get install relion)")
    sim_dir = args.sim.resolve()
    truth = json.loads((sim_dir / "truth.json").read_text())
    out = (args.out or sim_dir.parent).resolve()
    job = out / "relion"
    job.mkdir(parents=True, exist_ok=True)
    diameter = round(1.1 * truth["particle_diameter_A"])  # as quality.py gives ours
    particles = "particles.star"  # RELION runs in the simulation folder: names are relative
    if args.subset:
        import starfile

        blocks = starfile.read(sim_dir / "particles.star", always_dict=True)
        table = blocks["particles"].iloc[: args.subset].copy()
        table["rlnImageName"] = [
            f"{n.split('@')[0]}@{sim_dir / n.split('@')[1]}" for n in table["rlnImageName"]
        ]
        particles = str(job / "particles_subset.star")
        starfile.write({"optics": blocks["optics"], "particles": table}, particles)
    cmd = relion_command(particles, job / "run", args, diameter)
    version = subprocess.run(
        ["relion_refine", "--version"], capture_output=True, text=True
    ).stdout.strip()
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if args.continue_relion:
        continue_relion(job, sim_dir, args)
    finished = (job / f"run_it{args.iter:03d}_model.star").exists()
    earlier = None
    if args.reuse_relion and finished and (out / "relion.json").exists():
        earlier = json.loads((out / "relion.json").read_text())["summary"]
        if earlier.get("iterations", args.iter) != args.iter or earlier["wall_s"] is None:
            earlier = None  # recorded while the run was unfinished: not its whole time
    if earlier is not None:  # wall time and memory as measured when RELION ran
        wall, peak_mb = earlier["wall_s"], earlier["peak_rss_MB"]
    elif args.reuse_relion or args.continue_relion:  # stopped, running or continued
        wall, peak_mb = None, None
    else:
        (job / "continued.json").unlink(missing_ok=True)  # a new run: no continuations
        with open(job / "relion.log", "w") as log:
            done = subprocess.run(cmd, cwd=sim_dir, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        peak_mb = round(peak_rss_mb(children=True))
        if done.returncode:
            sys.exit(f"relion_refine failed (exit {done.returncode}); see {job / 'relion.log'}")
    # iteration boundaries: when RELION wrote each iteration's model (a stopped run is
    # scored at the last iteration it finished)
    stamps = model_file_times(job / "run", args.iter)
    reached = len(stamps) - 1
    if reached < 1:
        sys.exit(f"no finished RELION iteration in {job}")
    relion_iteration_s = iteration_seconds(stamps, continuations(job))
    if wall is None:  # iterations 1 to `reached` only, without the pauses between sittings
        wall = sum(relion_iteration_s)
    ours = _run_ours(Path(particles) if args.subset else sim_dir / particles, out, args, truth)

    from napari_class2d.sim.score import score_classification

    last = f"run_it{reached:03d}"
    score = score_classification(sim_dir, job / f"{last}_data.star", job / f"{last}_classes.mrcs")
    summary = {
        **score_summary(score),
        "median_class_resolution_A": score["median_class_resolution_A"],
        "wall_s": round(wall, 1),
        "iterations": reached,
        "s_per_iteration": round(wall / reached, 1),
        "peak_rss_MB": peak_mb,
        "n_particles": args.subset or truth["n_particles"],
        "relion_iteration_s": relion_iteration_s,
    }
    if args.ours_default:
        summary["ours_default"] = _run_ours_default(
            Path(particles) if args.subset else sim_dir / particles, sim_dir, out, args, truth
        )
    if ours is not None:
        summary["ours_iteration_s"] = ours
        summary["relion_over_ours_total"] = round(sum(relion_iteration_s) / sum(ours), 1)
        summary["relion_over_ours_last_iteration"] = round(relion_iteration_s[-1] / ours[-1], 1)
    write_json(
        out / "relion.json",
        {
            "benchmark": "relion_baseline",
            "relion_version": version,
            "command": cmd,
            "simulation": str(sim_dir),
            "machine": machine(),
            "summary": summary,
            "score": score,
        },
    )
    print(json.dumps(summary, indent=2))
    for pv in score["per_view"]:
        res = pv.get("resolution_A")
        res_text = "-" if res is None or not math.isfinite(res) else f"{res:.1f}"
        print(
            f"  view {pv['view']:2d} {pv['kind']:8s} n={pv['n_particles']:4d} "
            f"{'RECOVERED' if pv['recovered'] else 'missed'} res={res_text} Å"
        )
    print(f"wrote {out / 'relion.json'}")
    return 0


def _our_settings(args, truth: dict) -> dict:
    """quality.py's settings: K, 6 Å or Nyquist, RELION's mask diameter, the seed."""
    apix = truth["pixel_size_A"]
    return {
        "n_classes": args.classes,
        "max_res_A": max(6.0, math.ceil(20 * apix) / 10),
        "particle_diameter_A": round(1.1 * truth["particle_diameter_A"]),
        "seed": args.seed,
    }


def _run_ours_default(particles: Path, sim_dir: Path, out: Path, args, truth: dict) -> dict:
    """Our default schedule (with ``--set`` overrides) on the same particles, scored."""
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles
    from napari_class2d.sim.score import score_classification

    settings = _our_settings(args, truth) | parse_overrides(args.set)
    t0 = time.perf_counter()
    job = Class2DJob(
        read_particles(particles), Class2DConfig(**settings), out / "ours", overwrite=True
    )
    job.run_to_end()
    wall = time.perf_counter() - t0
    s = score_classification(
        sim_dir, out / "ours" / "run_data.star", out / "ours" / "run_classes.mrcs"
    )
    return {
        "settings": settings,
        **score_summary(s),
        "median_class_resolution_A": s["median_class_resolution_A"],
        "wall_s": round(wall, 1),
    }


def _run_ours(particles: Path, out: Path, args, truth: dict) -> list[float] | None:
    """Our classifier on the same particles: ``args.iter`` full iterations; seconds each."""
    if not args.compare_ours:
        return None
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import Class2DJob
    from napari_class2d.io.readers import read_particles

    config = Class2DConfig(
        **_our_settings(args, truth), n_online_em_iterations=0, n_final_full_iterations=args.iter
    )
    job = Class2DJob(read_particles(particles), config, out / "ours", overwrite=True)
    times, t0 = [], time.perf_counter()
    for snap in job.run():
        t1 = time.perf_counter()
        times.append(round(t1 - t0, 2))
        print(f"  ours it {snap.iteration}: {t1 - t0:.1f} s", flush=True)
        t0 = t1
    return times


if __name__ == "__main__":
    sys.exit(main())
