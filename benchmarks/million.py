"""A million particles on one machine: the default job from the memory-mapped cache.

A simulated set (default 6000 particles, box 96 at 3 Å, the phantom) is replicated on
disk by its STAR file: the STAR file of ``N`` particles lists every image ``N / 6000``
times, so the stacks are not copied (their 221 MB stay in the page cache: reading
them is faster than reading a million distinct images from disk would be; the
particle cache the job writes and reads is the job's own, ``N`` rows). Each ``N``
runs in its own process with the default schedule (K = 50, 20 online iterations of
100 particles per class, 1 full iteration, 6 Å) and records the time of every phase
and its resident memory over the run (``_jobrun.py``). Before a run the free disk is
checked against the cache it needs; an ``N`` that does not fit is cut to the largest
that does (and said so).

``--extrapolate 200`` also measures the per-particle cost of the iterations at K = 50
and K = 200 on a subset (2 online iterations of 100 per class and 1 full iteration
over ``--subset`` particles) and scales the largest run's phases to 200 classes.

Usage::

    nice -n 19 python benchmarks/million.py [--n 100000 1000000] [--extrapolate 200]
        [--subset 20000] [--out DIR] [--set key=value ...]

Writes ``OUT/million.json`` and ``OUT/memory.png`` (resident memory over each run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import sys
from pathlib import Path

from _common import REPO, add_set_argument, machine, parse_overrides, simulate_in_child, write_json
from _jobrun import engine_commit, folder_bytes
from scale import _replicate

#: room left on the disk beside the cache (outputs, checkpoints, other users), bytes
DISK_MARGIN = 8 * 2**30


def cache_bytes_per_particle(settings: dict, box: int, apix: float) -> int:
    from napari_class2d.engine.config import Class2DConfig
    from napari_class2d.engine.job import CACHE_BYTES_PER_COEFFICIENT
    from napari_class2d.engine.pool import working_grid

    params = Class2DConfig(**settings).resolve(box, apix)
    return working_grid(params).n * CACHE_BYTES_PER_COEFFICIENT


def _child(star: str, job_dir: str, settings: dict, record: str) -> dict:
    from _jobrun import run_recorded

    return run_recorded(star, job_dir, settings, record)


def run_in_child(star: Path, job_dir: Path, settings: dict, record: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_child, str(star), str(job_dir), settings, str(record)).result()


def fit_to_disk(n: int, per_particle: int, folder: Path) -> tuple[int, int]:
    """``(particles that fit, free bytes)`` for a cache of ``per_particle`` bytes each."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    fits = max(0, (free - DISK_MARGIN) // per_particle)
    return min(n, int(fits)), free


def per_particle_costs(record: dict) -> dict:
    """Seconds per particle of the online and of the full iterations."""
    out = {}
    for kind in ("online", "full"):
        rows = [r for r in record["iterations"] if r["phase"] == kind]
        n = sum(r["n_particles"] for r in rows)
        if n:
            out[kind] = sum(r["iteration_s"] for r in rows) / n
    return out


def extrapolate(big: dict, small: dict, k_to: int) -> dict:
    """The phases of ``big`` (K = 50) scaled to ``k_to`` classes with the per-particle cost
    ratios measured on the subset (``small``: {K: record})."""
    k_from = big["settings"]["n_classes"]
    cost_from = per_particle_costs(small[k_from])
    cost_to = per_particle_costs(small[k_to])
    ratio = {k: cost_to[k] / cost_from[k] for k in cost_from if k in cost_to}
    batch_ratio = k_to / k_from  # online batches are batch_size_per_class x K
    online = big["online"]["seconds"] * ratio.get("online", 1.0) * batch_ratio
    full = big["full"]["seconds"] * ratio.get("full", 1.0)
    fixed = big["read_star_s"] + big["preprocessing_s"] + big["checkpoints_s"] + big["outputs_s"]
    init = big["initialisation_s"] * batch_ratio
    return {
        "n_classes": k_to,
        "per_particle_cost_ratio": ratio,
        "online_batch_ratio": batch_ratio,
        "online_s": online,
        "full_s": full,
        "initialisation_s": init,
        "reading_preprocessing_outputs_s": fixed,
        "total_s": online + full + init + fixed,
    }


def plot_memory(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for rec in records:
        s = rec.get("memory_series") or []
        if not s:
            continue
        t = [x[0] / 3600 for x in s]
        label = f"{rec['n_particles']:,} particles"
        (line,) = ax.plot(t, [x[1] / 1024 for x in s], label=f"{label}: anonymous")
        ax.plot(t, [x[2] / 1024 for x in s], "--", color=line.get_color(), alpha=0.6,
                label=f"{label}: file-backed (page cache of the memory maps)")  # fmt: skip
        start = next((r for r in rec["iterations"]), None)
        if start is not None:
            ax.axvline(start["ended_at_s"] / 3600, color=line.get_color(), lw=0.5, alpha=0.4)
    ax.set_xlabel("hours since the job started")
    ax.set_ylabel("resident memory, GiB")
    ax.set_title("Resident memory of the default job (K = 50) from the memory-mapped cache")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(rec: dict) -> str:
    lines = [
        f"{rec['n_particles']:,} particles ({'complete' if rec.get('complete') else 'partial'}):",
        f"  read STAR {rec['read_star_s']:.1f} s; preprocessing {rec['preprocessing_s']:.0f} s "
        f"({rec['preprocessing_particles_per_s'] or 0:.0f} particles/s; CPU "
        f"{rec.get('preprocessing_cpu_s') or 0:.0f} s); "
        f"initialisation {rec['initialisation_s']:.1f} s",
    ]
    for kind in ("online", "full"):
        p = rec[kind]
        lines.append(
            f"  {kind}: {p['iterations']} iterations, {p['seconds']:.0f} s "
            f"(CPU {p['cpu_seconds']:.0f} s), "
            f"{p['particles_per_s'] or 0:.0f} particles/s "
            f"({p['marginalised_particles']:.0f} particles with rotations marginalised)"
        )
    lines.append(
        f"  checkpoints {rec['checkpoints_s']:.0f} s, RELION outputs {rec['outputs_s']:.0f} s; "
        f"wall {rec['wall_s']:.0f} s"
    )
    for name, m in rec.get("memory_by_phase_MB", {}).items():
        lines.append(
            f"  peak memory, {name}: anonymous {m['anonymous']:.0f} MiB, "
            f"file-backed {m['file_backed']:.0f} MiB"
        )
    if "cache_bytes" in rec:
        lines.append(f"  particle cache on disk: {rec['cache_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="particles per run (none: only --extrapolate, from the runs in OUT/million.json)",
    )
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--base-n", type=int, default=6000, help="particles simulated (replicated)")
    ap.add_argument("--extrapolate", type=int, default=None, metavar="K")
    ap.add_argument("--subset", type=int, default=20000, help="particles of the K runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "million")
    ap.add_argument("--keep-cache", action="store_true", help="keep each run's particle cache")
    add_set_argument(ap)
    args = ap.parse_args(argv)

    sim_dir = args.out / "sim"
    if not (sim_dir / "particles.star").is_file():
        print(f"simulating {args.base_n} particles ...", flush=True)
        simulate_in_child(
            sim_dir, n_particles=args.base_n, box=96, pixel_size_A=3.0, overwrite=True
        )
    settings = {"n_classes": args.classes, "seed": 0} | parse_overrides(args.set)
    per_particle = cache_bytes_per_particle(settings, 96, 3.0)
    result: dict = {
        "machine": machine(),
        "engine_commit": engine_commit(),
        "settings": settings,
        "cache_bytes_per_particle": per_particle,
        "runs": [],
    }
    json_path = args.out / "million.json"
    if not args.n and json_path.is_file():  # keep the runs measured before
        result["runs"] = json.loads(json_path.read_text())["runs"]
    for n in args.n:
        work = args.out / f"n{n}"
        fits, free = fit_to_disk(n, per_particle, args.out)
        note = None
        if fits < n:
            note = (
                f"{n} particles need {n * per_particle / 2**30:.1f} GiB of cache, "
                f"{free / 2**30:.1f} GiB are free: measured with {fits} particles"
            )
            print(note, flush=True)
            n = fits
        base = args.base_n
        star = _replicate(sim_dir / "particles.star", -(-n // base), work)
        if n % base:
            _truncate_star(star, n)
        print(
            f"classifying {n} particles (cache {n * per_particle / 2**30:.1f} GiB) ...", flush=True
        )
        rec = run_in_child(star, work / "job", settings, work / "record.json")
        rec["cache_bytes"] = folder_bytes(work / "job" / "cache")
        rec["job_folder_bytes"] = folder_bytes(work / "job")
        rec["disk_free_before_bytes"] = free
        rec["note"] = note
        print(describe(rec), flush=True)
        if not args.keep_cache:
            shutil.rmtree(work / "job" / "cache", ignore_errors=True)
        result["runs"].append(rec)
        write_json(json_path, result)
        plot_memory(result["runs"], args.out / "memory.png")

    if args.extrapolate:
        small = {}
        star = _replicate(
            sim_dir / "particles.star", -(-args.subset // args.base_n), args.out / "subset"
        )
        _truncate_star(star, args.subset)
        for k in (args.classes, args.extrapolate):
            s = settings | {
                "n_classes": k,
                "n_online_em_iterations": 2,
                "n_final_full_iterations": 1,
            }
            print(f"subset of {args.subset} particles, K = {k} ...", flush=True)
            rec = run_in_child(star, args.out / f"subset_k{k}", s, args.out / f"subset_k{k}.json")
            rec.pop("memory_series", None)
            small[k] = rec
            shutil.rmtree(args.out / f"subset_k{k}" / "cache", ignore_errors=True)
        result["subset"] = {str(k): v for k, v in small.items()}
        biggest = max(result["runs"], key=lambda r: r["n_particles"])
        result["extrapolated"] = extrapolate(biggest, small, args.extrapolate)
        e = result["extrapolated"]
        print(
            f"extrapolated to K = {args.extrapolate}, {biggest['n_particles']:,} particles: "
            f"online {e['online_s'] / 3600:.2f} h, full {e['full_s'] / 3600:.2f} h, "
            f"reading/preprocessing/outputs {e['reading_preprocessing_outputs_s'] / 3600:.2f} h, "
            f"total {e['total_s'] / 3600:.2f} h (per-particle cost ratios "
            f"{ {k: round(v, 2) for k, v in e['per_particle_cost_ratio'].items()} })",
            flush=True,
        )
        write_json(json_path, result)
    print(f"wrote {json_path}")
    return 0


def _truncate_star(star: Path, n: int) -> None:
    """Keep the first ``n`` particles of a replicated STAR file."""
    import starfile

    from napari_class2d.io.starwriter import write_star_file

    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:n].reset_index(drop=True)
    write_star_file(star, blocks)


if __name__ == "__main__":
    sys.exit(main())
