"""GPU benchmark: the default job on one GPU and on all GPUs of the node, in one command.

Simulates a set (default 6000 particles, box 96 at 3 Å), replicates it on disk by its
STAR file to ``--n`` particles (default 1,000,000; see ``million.py``), and runs the
default schedule (20 online iterations of 100 particles per class, 1 full iteration,
6 Å) with ``--classes`` classes (default 200) under ``torchrun``: once with one process
(one GPU), once with one process per GPU of the node (``--nproc``, default: 1 and the
number of GPUs). Each process records its phases (``_jobrun.py``); printed and written
to ``OUT/gpu.json``: time per phase, particles/s, peak GPU memory per process (what
torch allocated), resident host memory, and the speed-up and efficiency per GPU of
each run against the one-process run.

With ``--device cpu`` it runs the same on the CPU with gloo (``--nproc 1 2``), so the
script is exercised where no GPU is lent (``tests/test_benchmarks_gpu.py`` runs it on
a few hundred particles). Usage::

    python benchmarks/gpu.py                                  # 1M particles, K = 200
    python benchmarks/gpu.py --n 200000 --classes 50 --nproc 1 2 4 8
    python benchmarks/gpu.py --device cpu --n 600 --classes 4 --nproc 1 2 \\
        --set n_online_em_iterations=2 batch_size_per_class=20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _common import REPO, add_set_argument, machine, parse_overrides, simulate_in_child, write_json
from _jobrun import engine_commit, folder_bytes

HERE = Path(__file__).resolve().parent


#: environment variable that makes this script one process of a run (set by launch();
#: arguments after the script would be taken by torchrun's own parser)
WORKER = "NAPARI_CLASS2D_GPU_BENCH_WORKER"


def worker(job: dict) -> int:
    """One process of a run (started by torchrun): the job, recorded per rank."""
    from _jobrun import run_recorded

    from napari_class2d.engine import distributed

    rank = int(os.environ.get("RANK", 0))
    records = Path(job["records"])
    run_recorded(
        job["star"],
        job["job_dir"],
        job["settings"],
        records / f"rank{rank}.json",
        profile_iteration=job.get("profile_iteration"),
        trace_path=records / f"trace_rank{rank}.json",
    )
    distributed.shutdown()
    return 0


def launch(
    nproc: int,
    star: Path,
    job_dir: Path,
    records: Path,
    settings: dict,
    profile_iteration: int | None = None,
) -> int:
    """Run the job over ``nproc`` processes (torchrun); the exit code."""
    records.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    # the host's cores shared among the processes (reading stacks, writing outputs)
    cores = max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", "1" if settings.get("device") == "cpu" else str(cores))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), str(HERE / "gpu.py")]
    job = {"star": str(star), "job_dir": str(job_dir), "records": str(records)}
    job["profile_iteration"] = profile_iteration
    env[WORKER] = json.dumps(job | {"settings": settings})
    return subprocess.run(cmd, env=env).returncode


def summarise(nproc: int, records: Path) -> dict:
    """The run's figures from its ranks' records."""
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(nproc)]
    main = ranks[0]
    gpu = [
        max((row.get("gpu_peak_allocated_MB", 0.0) for row in r["iterations"]), default=0.0)
        for r in ranks
    ]
    total_iter = main["online"]["seconds"] + main["full"]["seconds"]
    return {
        "nproc": nproc,
        "device": main.get("device"),
        "gpu_name": main.get("gpu_name"),
        "complete": all(r.get("complete") for r in ranks),
        "n_particles": main["n_particles"],
        "particles_held_per_process": [r.get("n_particles_held") for r in ranks],
        "wall_s": main["wall_s"],
        "read_star_s": main["read_star_s"],
        "preprocessing_s": max(r["preprocessing_s"] for r in ranks),
        "initialisation_s": main["initialisation_s"],
        "online_s": main["online"]["seconds"],
        "online_particles_per_s": main["online"]["particles_per_s"],
        "full_s": main["full"]["seconds"],
        "full_particles_per_s": main["full"]["particles_per_s"],
        "iterations_s": total_iter,
        "checkpoints_and_outputs_s": main["checkpoints_s"] + main["outputs_s"],
        "gpu_peak_allocated_MB_per_process": gpu,
        "host_peak_anonymous_MB_per_process": [r.get("peak_anon_MB") for r in ranks],
        "engine_commit": main.get("engine_commit"),
        "profile": main.get("profile"),
    }


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    head = (
        f"{'processes':>9} {'wall s':>8} {'preproc s':>9} {'online s':>8} {'full s':>8} "
        f"{'full p/s':>9} {'outputs s':>9} {'GPU MiB':>8} {'speed-up':>8} {'per proc':>8}"
    )
    print(head)
    for r in rows:
        speed = base["iterations_s"] / r["iterations_s"] if r["iterations_s"] else float("nan")
        r["speed_up_iterations"] = speed
        r["efficiency_per_process"] = speed / (r["nproc"] / base["nproc"])
        print(
            f"{r['nproc']:>9d} {r['wall_s']:>8.1f} {r['preprocessing_s']:>9.1f} "
            f"{r['online_s']:>8.1f} {r['full_s']:>8.1f} {r['full_particles_per_s'] or 0:>9.0f} "
            f"{r['checkpoints_and_outputs_s']:>9.1f} "
            f"{max(r['gpu_peak_allocated_MB_per_process']):>8.0f} {speed:>8.2f} "
            f"{r['efficiency_per_process']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per process) or cpu")
    ap.add_argument("--nproc", type=int, nargs="+", default=None, help="default: 1 and all GPUs")
    ap.add_argument("--base-n", type=int, default=6000)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "gpu")
    add_set_argument(ap)
    ap.add_argument("--keep-cache", action="store_true")
    ap.add_argument(
        "--profile-iteration",
        type=int,
        default=None,
        metavar="N",
        help="trace iteration N with torch.profiler (OUT/nprocP/records/trace_rankR.json) and "
        "count its host-device copies and synchronisations",
    )
    if os.environ.get(WORKER):
        return worker(json.loads(os.environ[WORKER]))
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu to exercise the script", file=sys.stderr)
        return 2
    nproc = args.nproc or sorted({1, max(torch.cuda.device_count(), 1)})
    sim_dir = args.out / "sim"
    if not (sim_dir / "particles.star").is_file():
        print(f"simulating {args.base_n} particles ...", flush=True)
        simulate_in_child(
            sim_dir, n_particles=args.base_n, box=96, pixel_size_A=3.0, overwrite=True
        )
    from million import _truncate_star
    from scale import _replicate

    star = _replicate(sim_dir / "particles.star", -(-args.n // args.base_n), args.out / "data")
    if args.n % args.base_n:
        _truncate_star(star, args.n)
    settings = {"n_classes": args.classes, "seed": 0, "device": args.device}
    settings |= parse_overrides(args.set)
    rows = []
    for p in nproc:
        work = args.out / f"nproc{p}"
        shutil.rmtree(work, ignore_errors=True)
        print(f"{p} process(es), {args.n} particles, K = {args.classes}, {args.device} ...")
        code = launch(p, star, work / "job", work / "records", settings, args.profile_iteration)
        if code != 0:
            print(f"the run with {p} process(es) failed (exit code {code})", file=sys.stderr)
            return code
        row = summarise(p, work / "records")
        row["cache_bytes"] = folder_bytes(work / "job" / "cache")
        rows.append(row)
        if not args.keep_cache:
            shutil.rmtree(work / "job" / "cache", ignore_errors=True)
    print_table(rows)
    result = {
        "machine": machine(),
        "engine_commit": engine_commit(),
        "settings": settings,
        "n_particles": args.n,
        "runs": rows,
    }
    write_json(args.out / "gpu.json", result)
    print(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
